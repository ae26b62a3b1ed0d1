#include "problem.hpp"

#include <cctype>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>

#include "comm/agreement.hpp"
#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "io/npy_mpi.hpp"
#ifdef RINGATTN_HAVE_CUDA
#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "engine/cuda_resources.hpp"
#endif

namespace ringattn::cli {

std::int64_t hash_string(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return static_cast<std::int64_t>(h >> 1);
}

std::string show_other(std::int64_t) { return "(a different value)"; }

namespace {

using detail::FingerprintField;

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorCode::invalid_argument, message); }

std::string show_bool(std::int64_t v) { return v ? "true" : "false"; }

// --dtype auto: what the device computes with, keeping float16 files in fp16.
DType auto_dtype(DeviceKind device, bool float16_input) {
  if (float16_input) return DType::f16;
  return device == DeviceKind::cuda ? DType::bf16 : DType::f32;
}

constexpr std::size_t kAllFinite = static_cast<std::size_t>(-1);

double file_value(io::NpyDType dtype, const unsigned char* src, std::size_t i) {
  switch (dtype) {
    case io::NpyDType::f2: {
      std::uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      return detail::f16_to_f32(h);
    }
    case io::NpyDType::f4: {
      float x;
      std::memcpy(&x, src + 4 * i, 4);
      return x;
    }
    case io::NpyDType::f8: break;
  }
  double d;
  std::memcpy(&d, src + 8 * i, 8);
  return d;
}

// Converts n values of a file dtype into a storage dtype.
void convert_file_values(io::NpyDType from, const unsigned char* src, DType to, unsigned char* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    detail::store_f32(to, dst, static_cast<std::int64_t>(i), static_cast<float>(file_value(from, src, i)));
  }
}

// The index of the first value of `n` in `dtype` that is NaN or inf (all exponent bits set),
// or kAllFinite.
std::size_t first_non_finite(DType dtype, const unsigned char* data, std::size_t n) {
  if (dtype == DType::f32) {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint32_t bits;
      std::memcpy(&bits, data + 4 * i, 4);
      if ((bits & 0x7f800000u) == 0x7f800000u) return i;
    }
    return kAllFinite;
  }
  const std::uint16_t exponent = dtype == DType::f16 ? 0x7c00u : 0x7f80u;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, data + 2 * i, 2);
    if ((bits & exponent) == exponent) return i;
  }
  return kAllFinite;
}

// An index as the files show it: "[b, i, j, ...]", without b when they have no batch dimension.
std::string file_index(const Problem& p, std::int64_t b, std::initializer_list<std::int64_t> rest) {
  std::string text = "[" + (!p.from_files || p.batched_files ? std::to_string(b) + ", " : std::string());
  for (const std::int64_t& x : rest) text += std::to_string(x) + (&x == rest.end() - 1 ? "]" : ", ");
  return text;
}

// Element i of this rank's dense (B, S_local, heads, D) buffer as the file's (or the whole
// problem's) index [b, s, h, d].
std::string element_index(const Problem& p, std::int64_t heads, std::size_t i) {
  const auto at = static_cast<std::int64_t>(i);
  const std::int64_t d = at % p.head_dim, h = at / p.head_dim % heads, row = at / (p.head_dim * heads);
  return file_index(p, row / p.local_len(), {p.positions[static_cast<std::size_t>(row % p.local_len())], h, d});
}

std::string show_number(double x) {
  if (std::isnan(x)) return "nan";  // printf shows the sign bit: "-nan"
  char text[32];
  std::snprintf(text, sizeof text, "%g", x);
  return text;
}

void convert_to_file_values(DType from, const unsigned char* src, io::NpyDType to, unsigned char* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const float x = detail::load_f32(from, src, static_cast<std::int64_t>(i));
    switch (to) {
      case io::NpyDType::f2: {
        const std::uint16_t h = detail::f32_to_f16(x);
        std::memcpy(dst + 2 * i, &h, 2);
        break;
      }
      case io::NpyDType::f4: std::memcpy(dst + 4 * i, &x, 4); break;
      case io::NpyDType::f8: {
        const double d = x;
        std::memcpy(dst + 8 * i, &d, 8);
        break;
      }
    }
  }
}

// The records of a (B, S, ...) array that this rank's layout segments cover, batch-major,
// matching a dense (B, S_local, ...) local buffer.
std::vector<io::RecordRun> token_runs(const Layout& layout, int rank, std::int64_t batch) {
  std::vector<io::RecordRun> runs;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (const Segment& s : layout.segments(rank)) {
      runs.push_back({b * layout.seq_len() + s.global_begin, s.length, s.stride});
    }
  }
  return runs;
}

struct FileShape {
  bool batched;
  std::int64_t batch, seq, heads, head_dim;
};

FileShape file_shape(const char* name, const std::string& path, const io::NpyHeader& h) {
  if (h.shape.size() != 3 && h.shape.size() != 4) {
    invalid(std::string(name) + " (" + path + "): expected shape [S, H, D] or [B, S, H, D], got " +
            std::to_string(h.shape.size()) + " dimensions");
  }
  const bool batched = h.shape.size() == 4;
  const std::size_t o = batched ? 1 : 0;
  FileShape f{batched, batched ? h.shape[0] : 1, h.shape[o], h.shape[o + 1], h.shape[o + 2]};
  if (f.batch < 1 || f.seq < 1 || f.heads < 1 || f.head_dim < 1) {
    invalid(std::string(name) + " (" + path + "): every dimension must be >= 1");
  }
  return f;
}

void check_flag(const char* flag, bool given, std::int64_t value, std::int64_t from_file, const std::string& path) {
  if (given && value != from_file) {
    invalid(std::string(flag) + " " + std::to_string(value) + " conflicts with " + path + " (" +
            std::to_string(from_file) + ")");
  }
}

}  // namespace

// CLI11's own number validators print the whole double range in their messages.
CLI::Validator at_least(std::int64_t minimum) {
  return CLI::Validator(
      [minimum](std::string& value) -> std::string {
        try {
          std::size_t used = 0;
          if (std::stoll(value, &used) >= minimum && used == value.size()) return {};
        } catch (const std::exception&) {
        }
        return "must be an integer >= " + std::to_string(minimum) + ", got '" + value + "'";
      },
      "INT>=" + std::to_string(minimum));
}

namespace {

// A flag whose value must be a number (the whole text) that `accept` takes; `rule` completes
// "must be ..." in the error.
CLI::Validator number_validator(bool (*accept)(double), const char* rule, const char* name) {
  return CLI::Validator(
      [accept, rule](std::string& value) -> std::string {
        try {
          std::size_t used = 0;
          const double x = std::stod(value, &used);
          if (used == value.size() && accept(x)) return {};
        } catch (const std::exception&) {
        }
        return std::string("must be ") + rule + ", got '" + value + "'";
      },
      name);
}

// --seed: any 64-bit unsigned integer, decimal or 0x-hex; std::stoull alone would wrap "-1" to
// 2^64 - 1 and CLI11 saturates values past it.
CLI::Validator seed_value() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        try {
          std::size_t used = 0;
          if (!value.empty() && std::isdigit(static_cast<unsigned char>(value[0]))) {
            const bool hex = value.size() > 2 && value[0] == '0' && (value[1] == 'x' || value[1] == 'X');
            std::stoull(value, &used, hex ? 16 : 10);
            if (used == value.size()) return {};
          }
        } catch (const std::exception&) {
        }
        return "must be an integer from 0 to 18446744073709551615, got '" + value + "'";
      },
      "UINT64");
}

}  // namespace

// A tolerance: a finite number >= 0 (CLI11's Range lets NaN through: NaN compares false).
CLI::Validator non_negative_finite() {
  return number_validator([](double x) { return std::isfinite(x) && x >= 0.0; }, "a finite number >= 0", "FLOAT>=0");
}

void add_problem_options(CLI::App& cmd, ProblemOptions& o) {
  cmd.add_option("--batch,-B", o.batch, "Batch size")->check(at_least(1));
  cmd.add_option("--seq,-S", o.seq, "Global sequence length (tokens over all ranks)")->check(at_least(1));
  cmd.add_option("--heads,-H", o.heads, "Query heads")->check(at_least(1));
  cmd.add_option("--kv-heads", o.kv_heads, "Key/value heads (GQA/MQA); must divide --heads; default = --heads")
      ->check(at_least(0));
  cmd.add_option("--head-dim,-D", o.head_dim, "Head dimension (at most 256)")->check(at_least(1));
  cmd.add_flag("--causal", o.causal, "Causal mask: query i attends keys <= i");
  cmd.add_option("--layout", o.layout, "Sequence sharding: contiguous, zigzag or striped")
      ->check(CLI::IsMember({"contiguous", "zigzag", "striped"}));
  cmd.add_option("--dtype", o.dtype,
                 "Storage dtype: fp32, fp16 or bf16 (compute is fp32); auto = fp32 on cpu, bf16 on cuda, "
                 "fp16 for float16 files")
      ->check(CLI::IsMember({"auto", "fp32", "fp16", "bf16"}));
  cmd.add_option("--scale", o.scale, "Softmax scale (default 1/sqrt(head-dim); softmax attention only)")
      ->check(number_validator(
          [](double x) { return x > 0.0 && x <= kMaxScale && static_cast<float>(x) > 0.0f; },
          "a positive number that fp32 can hold, 1.4e-45 to 2.36e38 (kernels multiply it by log2(e))", "FLOAT>0"));
  cmd.add_option("--seed", o.seed, "Seed of the generated inputs")->check(seed_value());
  cmd.add_option("--gpus", o.gpus,
                 "Run in this one process on N local GPUs, one thread each (no mpirun; implies --device cuda); "
                 "the same plans and results as mpirun -np N")
      ->check(at_least(1));
  cmd.add_option("--device", o.device, "Where to compute: cpu, or cuda (one GPU per rank, NCCL ring)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd.add_option("--kernel", o.kernel,
                 "GPU block kernel: auto (the faster where measured: native for the forward blocks where it beats cuDNN on H100/H200, else cuDNN's fused attention where available, else native), cudnn, native")
      ->check(CLI::IsMember({"auto", "cudnn", "native"}));
  cmd.add_option("--q", o.q_path, "Queries .npy, float32/float16/float64, [S, H, D] or [B, S, H, D]");
  cmd.add_option("--k", o.k_path, "Keys .npy, like --q with H_kv heads");
  cmd.add_option("--v", o.v_path, "Values .npy, shaped like --k");
  cmd.add_flag("--backward", o.backward, "Also compute dQ, dK, dV (cpu and cuda)");
  cmd.add_option("--dout", o.dout_path, "dO for --backward: a .npy shaped like --q (default: seeded values)");
  cmd.add_option("--attention", o.attention,
                 "softmax (the ring), or linear: kernelised linear attention, one prefix scan across ranks ("
                 "contiguous layout)")
      ->check(CLI::IsMember({"softmax", "linear"}));
  cmd.add_option("--feature-map", o.feature_map,
                 "Linear attention's phi: elu1 (elu(x)+1, normalised) or identity (unnormalised)")
      ->check(CLI::IsMember({"elu1", "identity"}));
  cmd.add_option("--decay", o.decay, "Linear attention, causal: decay in (0, 1] applied per token to the state")
      ->check(number_validator([](double x) { return x > 0.0 && x <= 1.0; }, "a number in (0, 1]", "(0,1]"));
  cmd.add_option("--window", o.window,
                 "Sliding window: query i attends keys in [i - W, i] (with --causal) or [i - W, i + W] ("
                 "contiguous layout); the ring stops once every window is covered")
      ->check(CLI::Range(std::int64_t{0}, std::numeric_limits<std::int64_t>::max()));
  cmd.add_option("--timeout", o.timeout,
                 "Seconds a rank waits for a ring transfer (cpu) or its GPU work (the NCCL communicator is then "
                 "aborted) before it gives up, names the step and the peer and the job exits 124; 0 = forever, else "
                 "at least 1")
      // A bound below a second would fail healthy ranks busy with one step, and blame a peer.
      ->check(number_validator([](double x) { return x == 0.0 || (x >= 1.0 && x <= 1e9); },
                               "0 (wait forever) or 1 to 1e9 seconds", "SECONDS"));
  cmd.add_option("--sinks", o.sinks, "With --window: the first K tokens are always attended (attention sinks)")
      ->check(at_least(0));
}

void note_explicit_options(const CLI::App& cmd, ProblemOptions& o) {
  o.explicit_batch = cmd.count("--batch") > 0;
  o.explicit_seq = cmd.count("--seq") > 0;
  o.explicit_heads = cmd.count("--heads") > 0;
  o.explicit_kv_heads = cmd.count("--kv-heads") > 0;
  o.explicit_head_dim = cmd.count("--head-dim") > 0;
  o.explicit_device = cmd.count("--device") > 0;
}

double Problem::flops() const {
  if (attention == AttentionKind::linear) {
    // Per token and head: the state update (2 D^2) and the read-out (2 D^2).
    return 4.0 * static_cast<double>(batch) * static_cast<double>(seq) * static_cast<double>(heads) *
           static_cast<double>(head_dim) * static_cast<double>(head_dim);
  }
  if (window >= 0) {
    // The pairs the window and the sinks allow: query p sees min(p, W) + 1 keys of its window
    // and min(sinks, p - W) sink keys before it. (A window or sinks past S count as S.)
    const std::int64_t window = std::min(this->window, seq), sinks = std::min(this->sinks, seq);
    double pairs = 0.0;
    for (std::int64_t pos = 0; pos < seq; ++pos) {
      pairs += static_cast<double>(std::min(pos, window) + 1 + std::clamp<std::int64_t>(pos - window, 0, sinks));
      if (!causal) {  // the keys after the query, and sink keys beyond the window's right edge
        pairs += static_cast<double>(std::min(seq - 1 - pos, window) + std::max<std::int64_t>(0, sinks - (pos + window + 1)));
      }
    }
    return 4.0 * static_cast<double>(batch) * pairs * static_cast<double>(heads) * static_cast<double>(head_dim);
  }
  const double f = 4.0 * static_cast<double>(batch) * static_cast<double>(seq) * static_cast<double>(seq) *
                   static_cast<double>(heads) * static_cast<double>(head_dim);
  return causal ? f / 2.0 : f;
}

AttentionOptions Problem::attention_options() const {
  AttentionOptions a;
  a.causal = causal;
  a.scale = scale;
  a.layout = layout;
  a.kernel = kernel;
  a.seq_len = seq;
  a.attention = attention;
  a.feature_map = feature_map;
  a.decay = decay;
  a.window = window;
  a.sinks = sinks;
  a.timeout_s = timeout;
  return a;
}

TensorView Problem::q_view() { return TensorView::contiguous(q.data(), dtype, {batch, local_len(), heads, head_dim}); }
TensorView Problem::k_view() { return TensorView::contiguous(k.data(), dtype, {batch, local_len(), kv_heads, head_dim}); }
TensorView Problem::v_view() { return TensorView::contiguous(v.data(), dtype, {batch, local_len(), kv_heads, head_dim}); }

Problem load_problem(Context& ctx, const ProblemOptions& o) {
  MPI_Comm comm = ctx.comm();
  // Ranks started with different flags (an MPMD launch) must fail together, before any
  // collective file access could leave some of them waiting.
  detail::agree_fingerprint(comm,
                            {{"--batch", o.batch},
                             {"--seq", o.seq},
                             {"--heads", o.heads},
                             {"--kv-heads", o.kv_heads},
                             {"--head-dim", o.head_dim},
                             {"--causal", o.causal, show_bool},
                             {"--layout", hash_string(o.layout), show_other},
                             {"--dtype", hash_string(o.dtype), show_other},
                             {"--scale", o.scale ? hash_string(std::to_string(*o.scale)) : 0, show_other},
                             {"--seed", static_cast<std::int64_t>(o.seed)},
                             {"--device", hash_string(o.device), show_other},
                             {"--kernel", hash_string(o.kernel), show_other},
                             {"--q", hash_string(o.q_path), show_other},
                             {"--k", hash_string(o.k_path), show_other},
                             {"--v", hash_string(o.v_path), show_other},
                             {"--backward", o.backward, show_bool},
                             {"--dout", hash_string(o.dout_path), show_other},
                             {"--attention", hash_string(o.attention), show_other},
                             {"--feature-map", hash_string(o.feature_map), show_other},
                             {"--decay", o.decay ? hash_string(std::to_string(*o.decay)) : 0, show_other},
                             {"--window", o.window},
                             {"--sinks", o.sinks},
                             {"--timeout", hash_string(std::to_string(o.timeout)), show_other},
                             {"--gpus", o.gpus}},
                            "command-line options");

  Problem p;
  p.causal = o.causal;
  p.scale = o.scale;
  p.seed = o.seed;
  p.from_files = !o.q_path.empty() || !o.k_path.empty() || !o.v_path.empty();
  p.backward = o.backward;
  io::NpyHeader hq, hk, hv;
  // Everything below derives from the options and broadcast file headers, but a failure on
  // any rank (say, memory) must still reach all of them: agree on the outcome.
  detail::agree_on(comm, [&] {
    p.layout = parse_layout(o.layout);
    p.device = o.device == "cuda" ? DeviceKind::cuda : DeviceKind::cpu;
    p.gpus = o.gpus;
    if (o.gpus > 0) {
      if (ctx.size() > 1) {
        invalid("--gpus runs one process on several GPUs; under mpirun use one rank per GPU instead (got " +
                std::to_string(ctx.size()) + " ranks)");
      }
      if (o.device == "cpu" && o.explicit_device) invalid("--gpus computes on GPUs: drop --device cpu");
      p.device = DeviceKind::cuda;
    }
    p.kernel = parse_kernel(o.kernel);
    if (p.kernel != KernelKind::automatic && p.device != DeviceKind::cuda) {
      invalid("--kernel " + o.kernel + " needs --device cuda");
    }
    if (!o.dout_path.empty() && !o.backward) invalid("--dout needs --backward");
    p.attention = parse_attention(o.attention);
    p.feature_map = parse_feature_map(o.feature_map);
    if (p.attention != AttentionKind::linear && (o.decay || o.feature_map != "elu1")) {
      invalid("--decay and --feature-map need --attention linear");
    }
    if (o.decay) p.decay = {*o.decay};
    p.window = o.window;
    p.timeout = o.timeout;
    p.sinks = o.sinks;
    if (!o.dout_path.empty() && !p.from_files) invalid("--dout needs the inputs as files too (--q, --k, --v)");
    if (p.from_files) {
      if (o.q_path.empty() || o.k_path.empty() || o.v_path.empty()) invalid("--q, --k and --v must be given together");
    } else {
      p.batch = o.batch;
      p.seq = o.seq;
      p.heads = o.heads;
      p.kv_heads = o.kv_heads == 0 ? o.heads : o.kv_heads;
      p.head_dim = o.head_dim;
      p.dtype = o.dtype == "auto" ? auto_dtype(p.device, false) : parse_dtype(o.dtype);
      p.out_file_dtype = p.dtype == DType::f16 ? io::NpyDType::f2 : io::NpyDType::f4;
    }
  });
  if (p.from_files) {
    // Rank 0 reads each header and broadcasts its bytes: every rank parses the same bytes.
    detail::agree_on(comm, [&] {
      hq = io::npy_read_header(comm, o.q_path);
      hk = io::npy_read_header(comm, o.k_path);
      hv = io::npy_read_header(comm, o.v_path);
    });
    detail::agree_on(comm, [&] {
      const FileShape fq = file_shape("q", o.q_path, hq);
      const FileShape fk = file_shape("k", o.k_path, hk);
      const FileShape fv = file_shape("v", o.v_path, hv);
      if (fk.batched != fq.batched || fv.batched != fq.batched) invalid("q, k and v files must all have a batch dimension, or none");
      for (const auto& [name, path, f] : {std::tuple{"k", o.k_path, fk}, {"v", o.v_path, fv}}) {
        if (f.batch != fq.batch) invalid(std::string(name) + " (" + path + "): batch " + std::to_string(f.batch) + " differs from q's " + std::to_string(fq.batch));
        if (f.seq != fq.seq) invalid(std::string(name) + " (" + path + "): sequence length " + std::to_string(f.seq) + " differs from q's " + std::to_string(fq.seq));
        if (f.head_dim != fq.head_dim) invalid(std::string(name) + " (" + path + "): head_dim " + std::to_string(f.head_dim) + " differs from q's " + std::to_string(fq.head_dim));
      }
      if (fv.heads != fk.heads) invalid("v (" + o.v_path + "): heads " + std::to_string(fv.heads) + " differs from k's " + std::to_string(fk.heads));
      check_flag("--batch", o.explicit_batch, o.batch, fq.batch, o.q_path);
      check_flag("--seq", o.explicit_seq, o.seq, fq.seq, o.q_path);
      check_flag("--heads", o.explicit_heads, o.heads, fq.heads, o.q_path);
      check_flag("--kv-heads", o.explicit_kv_heads, o.kv_heads, fk.heads, o.k_path);
      check_flag("--head-dim", o.explicit_head_dim, o.head_dim, fq.head_dim, o.q_path);
      p.batch = fq.batch;
      p.seq = fq.seq;
      p.heads = fq.heads;
      p.kv_heads = fk.heads;
      p.head_dim = fq.head_dim;
      p.batched_files = fq.batched;
      p.out_file_dtype = hq.dtype;
      p.dtype = o.dtype == "auto" ? auto_dtype(p.device, hq.dtype == io::NpyDType::f2) : parse_dtype(o.dtype);
    });
  }

  detail::agree_on(comm, [&] {
    // The largest tensor's bytes (and the fp64 reference's) must be countable: sizes whose
    // product overflows would otherwise wrap to a small buffer.
    std::int64_t bytes = 8;
    for (const std::int64_t dim : {p.batch, p.seq, std::max(p.heads, p.kv_heads), p.head_dim}) {
      if (__builtin_mul_overflow(bytes, dim, &bytes)) {
        invalid("the problem is too large: batch " + std::to_string(p.batch) + " x seq " + std::to_string(p.seq) +
                " x heads " + std::to_string(std::max(p.heads, p.kv_heads)) + " x head_dim " +
                std::to_string(p.head_dim) + " values do not fit in memory");
      }
    }
    const Layout layout(p.layout, p.seq, ctx.size());
    p.positions = layout.positions(ctx.rank());
    const auto n = static_cast<std::size_t>(p.batch * p.local_len() * p.head_dim);
    const std::size_t elem = dtype_size(p.dtype);
    p.q.resize(n * static_cast<std::size_t>(p.heads) * elem);
    p.k.resize(n * static_cast<std::size_t>(p.kv_heads) * elem);
    p.v.resize(p.k.size());
    if (p.backward) p.dout.resize(p.q.size());
    if (p.backward && o.dout_path.empty()) {
      detail::fill_synthetic(p.seed, detail::SyntheticTensor::dout, p.dtype, p.batch, p.positions, p.heads, p.head_dim,
                             p.dout.data());
    }
    if (!p.from_files) {
      using detail::SyntheticTensor;
      detail::fill_synthetic(p.seed, SyntheticTensor::q, p.dtype, p.batch, p.positions, p.heads, p.head_dim, p.q.data());
      detail::fill_synthetic(p.seed, SyntheticTensor::k, p.dtype, p.batch, p.positions, p.kv_heads, p.head_dim, p.k.data());
      detail::fill_synthetic(p.seed, SyntheticTensor::v, p.dtype, p.batch, p.positions, p.kv_heads, p.head_dim, p.v.data());
    }
  });
  if (p.from_files) {
    const Layout layout(p.layout, p.seq, ctx.size());
    const std::vector<io::RecordRun> runs = token_runs(layout, ctx.rank(), p.batch);
    auto read = [&](const char* name, const std::string& path, const io::NpyHeader& h, std::int64_t heads,
                    std::vector<unsigned char>& dst) {
      const std::size_t values = static_cast<std::size_t>(p.batch * p.local_len() * heads * p.head_dim);
      std::vector<unsigned char> raw(values * io::npy_dtype_size(h.dtype));
      io::npy_read_records(comm, path, h, runs, static_cast<std::size_t>(heads * p.head_dim) * io::npy_dtype_size(h.dtype),
                           raw.data());
      convert_file_values(h.dtype, raw.data(), p.dtype, dst.data(), values);
      const std::size_t bad = first_non_finite(p.dtype, dst.data(), values);
      // A NaN or inf input (or one the storage dtype cannot hold) would make every output row
      // it reaches NaN: refuse it, naming the first one.
      detail::agree_on(comm, [&] {
        if (bad == kAllFinite) return;
        const double x = file_value(h.dtype, raw.data(), bad);
        const std::string where = std::string(name) + " (" + path + "): the value " + show_number(x) + " at " +
                                  element_index(p, heads, bad);
        if (!std::isfinite(x)) invalid(where + " is not finite; every input value must be");
        const double largest = p.dtype == DType::f16    ? 65504.0
                               : p.dtype == DType::bf16 ? 0x1.fep127
                                                        : std::numeric_limits<float>::max();
        invalid(where + " does not fit " + to_string(p.dtype) + " (largest " + show_number(largest) +
                "): choose a wider --dtype or scale the inputs down");
      });
    };
    read("q", o.q_path, hq, p.heads, p.q);
    read("k", o.k_path, hk, p.kv_heads, p.k);
    read("v", o.v_path, hv, p.kv_heads, p.v);
    if (p.backward && !o.dout_path.empty()) {
      io::NpyHeader hd;
      detail::agree_on(comm, [&] { hd = io::npy_read_header(comm, o.dout_path); });
      detail::agree_on(comm, [&] {
        if (hd.shape != hq.shape) {
          std::string dims;
          for (std::int64_t d : hd.shape) dims += (dims.empty() ? "" : "x") + std::to_string(d);
          invalid("dout (" + o.dout_path + "): shape " + dims + " differs from q's");
        }
      });
      read("dout", o.dout_path, hd, p.heads, p.dout);
    }
  }
  return p;
}

namespace {

// The agreed error of check_finite: `value` found at `where` in `what`.
void report_overflow(Context& ctx, const Problem& p, const char* what, bool found, double value,
                     const std::function<std::string()>& where) {
  detail::agree_on(ctx.comm(), [&] {
    if (!found) return;
    invalid(std::string(what) + " is " + show_number(value) + " at " + where() +
            ": the inputs are finite, so the computation overflowed (scale * q.k beyond fp32, or a result beyond " +
            to_string(p.dtype) + "); lower --scale or the inputs' magnitude, or choose a wider --dtype (" + what +
            " and the outputs after it were not written)");
  });
}

}  // namespace

void check_finite(Context& ctx, const Problem& p, const char* what, const std::vector<unsigned char>& values,
                  std::int64_t heads) {
  const std::size_t bad = first_non_finite(p.dtype, values.data(), values.size() / dtype_size(p.dtype));
  const bool found = bad != kAllFinite;
  report_overflow(ctx, p, what, found, found ? detail::load_f32(p.dtype, values.data(), static_cast<std::int64_t>(bad)) : 0.0,
                  [&] { return element_index(p, heads, bad); });
}

void check_finite_lse(Context& ctx, const Problem& p, const std::vector<float>& lse) {
  const std::size_t bad =
      first_non_finite(DType::f32, reinterpret_cast<const unsigned char*>(lse.data()), lse.size());
  const bool found = bad != kAllFinite;
  report_overflow(ctx, p, "LSE", found, found ? lse[bad] : 0.0, [&] {
    // (B, H, S_local) here; the file's [b, h, s] (or [h, s]).
    const auto at = static_cast<std::int64_t>(bad), L = p.local_len();
    return file_index(p, at / L / p.heads, {at / L % p.heads, p.positions[static_cast<std::size_t>(at % L)]});
  });
}

void write_outputs(Context& ctx, const Problem& p, const std::string& out_path, const std::string& lse_path,
                   const std::vector<unsigned char>& out, const std::vector<float>& lse) {
  const Layout layout(p.layout, p.seq, ctx.size());
  // Outputs keep the inputs' form: a leading batch dimension unless q.npy had none.
  const bool batched = !p.from_files || p.batched_files;
  if (!out_path.empty()) {
    const std::size_t values = static_cast<std::size_t>(p.batch * p.local_len() * p.heads * p.head_dim);
    const std::size_t elem = io::npy_dtype_size(p.out_file_dtype);
    std::vector<unsigned char> raw(values * elem);
    convert_to_file_values(p.dtype, out.data(), p.out_file_dtype, raw.data(), values);
    std::vector<std::int64_t> shape = {p.seq, p.heads, p.head_dim};
    if (batched) shape.insert(shape.begin(), p.batch);
    io::npy_write_records(ctx.comm(), out_path, p.out_file_dtype, shape, token_runs(layout, ctx.rank(), p.batch),
                          static_cast<std::size_t>(p.heads * p.head_dim) * elem, raw.data());
  }
  if (!lse_path.empty()) {
    // lse is (B, H, S): one record per value, each (b, h) row holding this rank's segments.
    std::vector<io::RecordRun> runs;
    for (std::int64_t b = 0; b < p.batch; ++b) {
      for (std::int64_t h = 0; h < p.heads; ++h) {
        for (const Segment& s : layout.segments(ctx.rank())) {
          runs.push_back({(b * p.heads + h) * p.seq + s.global_begin, s.length, s.stride});
        }
      }
    }
    std::vector<std::int64_t> shape = {p.heads, p.seq};
    if (batched) shape.insert(shape.begin(), p.batch);
    io::npy_write_records(ctx.comm(), lse_path, io::NpyDType::f4, shape, runs, sizeof(float), lse.data());
  }
}

namespace {

// The whole sequence of one input, (B, S, heads, D) fp32 as stored: seeded values from
// global positions, or the whole .npy file when `path` is set.
std::vector<float> load_full(Context& ctx, const Problem& p, detail::SyntheticTensor which, const std::string& path,
                             std::int64_t heads) {
  const auto values = static_cast<std::size_t>(p.batch * p.seq * heads * p.head_dim);
  std::vector<unsigned char> stored(values * dtype_size(p.dtype));
  if (path.empty()) {
    std::vector<std::int64_t> all(static_cast<std::size_t>(p.seq));
    for (std::int64_t t = 0; t < p.seq; ++t) all[static_cast<std::size_t>(t)] = t;
    detail::fill_synthetic(p.seed, which, p.dtype, p.batch, all, heads, p.head_dim, stored.data());
  } else {
    io::NpyHeader h;
    detail::agree_on(ctx.comm(), [&] { h = io::npy_read_header(ctx.comm(), path); });
    std::vector<unsigned char> raw(values * io::npy_dtype_size(h.dtype));
    io::npy_read_records(ctx.comm(), path, h, {{0, p.batch * p.seq, 1}},
                         static_cast<std::size_t>(heads * p.head_dim) * io::npy_dtype_size(h.dtype), raw.data());
    convert_file_values(h.dtype, raw.data(), p.dtype, stored.data(), values);
  }
  std::vector<float> out(values);
  detail::convert_to_f32(p.dtype, stored.data(), out.data(), values);
  return out;
}

}  // namespace

void load_full_kv(Context& ctx, const Problem& p, const ProblemOptions& o, std::vector<float>& k, std::vector<float>& v) {
  k = load_full(ctx, p, detail::SyntheticTensor::k, o.k_path, p.kv_heads);
  v = load_full(ctx, p, detail::SyntheticTensor::v, o.v_path, p.kv_heads);
}

std::vector<float> load_full_rows(Context& ctx, const Problem& p, detail::SyntheticTensor which,
                                  const std::string& path) {
  return load_full(ctx, p, which, path, p.heads);
}

void write_gradients(Context& ctx, const Problem& p, const std::string& dq_path, const std::string& dk_path,
                     const std::string& dv_path, const std::vector<unsigned char>& dq,
                     const std::vector<unsigned char>& dk, const std::vector<unsigned char>& dv) {
  const Layout layout(p.layout, p.seq, ctx.size());
  const bool batched = !p.from_files || p.batched_files;
  const std::size_t elem = io::npy_dtype_size(p.out_file_dtype);
  auto write = [&](const std::string& path, const std::vector<unsigned char>& grad, std::int64_t heads) {
    if (path.empty()) return;
    const std::size_t values = static_cast<std::size_t>(p.batch * p.local_len() * heads * p.head_dim);
    std::vector<unsigned char> raw(values * elem);
    convert_to_file_values(p.dtype, grad.data(), p.out_file_dtype, raw.data(), values);
    std::vector<std::int64_t> shape = {p.seq, heads, p.head_dim};
    if (batched) shape.insert(shape.begin(), p.batch);
    io::npy_write_records(ctx.comm(), path, p.out_file_dtype, shape, token_runs(layout, ctx.rank(), p.batch),
                          static_cast<std::size_t>(heads * p.head_dim) * elem, raw.data());
  };
  write(dq_path, dq, p.heads);
  write(dk_path, dk, p.kv_heads);
  write(dv_path, dv, p.kv_heads);
}

#ifdef RINGATTN_HAVE_CUDA
struct ProblemTensors::Device {
  detail::DeviceBuffer q, k, v, out, lse;
};
#else
struct ProblemTensors::Device {};
#endif

ProblemTensors::ProblemTensors(Context& ctx, Problem& p, std::vector<unsigned char>& out,
                               std::vector<float>& lse)
    : host_out_(out), host_lse_(lse) {
  const std::int64_t n = p.local_len();
  if (p.device == DeviceKind::cpu) {
    q = p.q_view();
    k = p.k_view();
    v = p.v_view();
    this->out = TensorView::contiguous(out.data(), p.dtype, {p.batch, n, p.heads, p.head_dim});
    this->lse = TensorView::contiguous(lse.data(), DType::f32, {p.batch, p.heads, n});
    return;
  }
#ifdef RINGATTN_HAVE_CUDA
  const int device = ctx.cuda().device();  // collective: opens the device and NCCL
  device_ = std::make_unique<Device>();
  detail::agree_on(ctx.comm(), [&] {
    RINGATTN_CUDA_CHECK(cudaSetDevice(device));
    auto upload = [](const std::vector<unsigned char>& src) {
      detail::DeviceBuffer d(src.size());
      RINGATTN_CUDA_CHECK(cudaMemcpy(d.get(), src.data(), src.size(), cudaMemcpyHostToDevice));
      return d;
    };
    device_->q = upload(p.q);
    device_->k = upload(p.k);
    device_->v = upload(p.v);
    device_->out = detail::DeviceBuffer(out.size());
    device_->lse = detail::DeviceBuffer(lse.size() * sizeof(float));
  });
  auto view = [&](const detail::DeviceBuffer& b, DType dt, std::initializer_list<std::int64_t> shape) {
    return TensorView::contiguous(b.get(), dt, shape, DeviceKind::cuda, device);
  };
  q = view(device_->q, p.dtype, {p.batch, n, p.heads, p.head_dim});
  k = view(device_->k, p.dtype, {p.batch, n, p.kv_heads, p.head_dim});
  v = view(device_->v, p.dtype, {p.batch, n, p.kv_heads, p.head_dim});
  this->out = view(device_->out, p.dtype, {p.batch, n, p.heads, p.head_dim});
  this->lse = view(device_->lse, DType::f32, {p.batch, p.heads, n});
#else
  (void)ctx;
  throw Error(ErrorCode::invalid_argument, "--device cuda: this build of ringattn has no CUDA backend", true);
#endif
}

ProblemTensors::~ProblemTensors() = default;

void ProblemTensors::download() {
#ifdef RINGATTN_HAVE_CUDA
  if (!device_) return;
  RINGATTN_CUDA_CHECK(cudaMemcpy(host_out_.data(), device_->out.get(), host_out_.size(), cudaMemcpyDeviceToHost));
  RINGATTN_CUDA_CHECK(cudaMemcpy(host_lse_.data(), device_->lse.get(), host_lse_.size() * sizeof(float),
                                 cudaMemcpyDeviceToHost));
#endif
}

#ifdef RINGATTN_HAVE_CUDA
struct GradientTensors::Device {
  detail::DeviceBuffer dout, dq, dk, dv;
};
#else
struct GradientTensors::Device {};
#endif

GradientTensors::GradientTensors(Context& ctx, Problem& p) : dq(p.q.size()), dk(p.k.size()), dv(p.v.size()) {
  const std::int64_t n = p.local_len();
  auto rows = [&](void* d, std::int64_t heads, DeviceKind device, int index) {
    return TensorView::contiguous(d, p.dtype, {p.batch, n, heads, p.head_dim}, device, index);
  };
  if (p.device == DeviceKind::cpu) {
    dout_view = rows(p.dout.data(), p.heads, DeviceKind::cpu, 0);
    dq_view = rows(dq.data(), p.heads, DeviceKind::cpu, 0);
    dk_view = rows(dk.data(), p.kv_heads, DeviceKind::cpu, 0);
    dv_view = rows(dv.data(), p.kv_heads, DeviceKind::cpu, 0);
    return;
  }
#ifdef RINGATTN_HAVE_CUDA
  const int device = ctx.cuda().device();
  device_ = std::make_unique<Device>();
  detail::agree_on(ctx.comm(), [&] {
    RINGATTN_CUDA_CHECK(cudaSetDevice(device));
    device_->dout = detail::DeviceBuffer(p.dout.size());
    RINGATTN_CUDA_CHECK(cudaMemcpy(device_->dout.get(), p.dout.data(), p.dout.size(), cudaMemcpyHostToDevice));
    device_->dq = detail::DeviceBuffer(dq.size());
    device_->dk = detail::DeviceBuffer(dk.size());
    device_->dv = detail::DeviceBuffer(dv.size());
  });
  dout_view = rows(device_->dout.get(), p.heads, DeviceKind::cuda, device);
  dq_view = rows(device_->dq.get(), p.heads, DeviceKind::cuda, device);
  dk_view = rows(device_->dk.get(), p.kv_heads, DeviceKind::cuda, device);
  dv_view = rows(device_->dv.get(), p.kv_heads, DeviceKind::cuda, device);
#else
  (void)ctx;
  throw Error(ErrorCode::invalid_argument, "--device cuda: this build of ringattn has no CUDA backend", true);
#endif
}

GradientTensors::~GradientTensors() = default;

void GradientTensors::download() {
#ifdef RINGATTN_HAVE_CUDA
  if (!device_) return;
  RINGATTN_CUDA_CHECK(cudaMemcpy(dq.data(), device_->dq.get(), dq.size(), cudaMemcpyDeviceToHost));
  RINGATTN_CUDA_CHECK(cudaMemcpy(dk.data(), device_->dk.get(), dk.size(), cudaMemcpyDeviceToHost));
  RINGATTN_CUDA_CHECK(cudaMemcpy(dv.data(), device_->dv.get(), dv.size(), cudaMemcpyDeviceToHost));
#endif
}

}  // namespace ringattn::cli
