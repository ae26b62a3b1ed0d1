// `ringattn verify`: runs the ring, then checks every rank's O and LSE against an fp64
// reference computed on that rank for its own rows (from generated or file inputs; the
// whole sequence's K and V are rebuilt or read locally, nothing is gathered).
#include <mpi.h>

#include <algorithm>
#include <cmath>

#include <memory>

#include "commands.hpp"
#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#include "core/dtype.hpp"
#include "engine/reference.hpp"
#include "report.hpp"

namespace ringattn::cli {

namespace {

struct Comparison {
  double max_abs = 0.0;    // largest |result - reference|
  double worst = 0.0;      // largest |result - reference| / (atol + rtol*|reference|); > 1 fails
  double wrong = 0.0;      // elements over the tolerance
  double checked = 0.0;
};

void compare(Comparison& c, double got, double ref, const detail::Tolerance& tol) {
  const double err = std::isnan(got) ? INFINITY : std::fabs(got - ref);
  const double bound = tol.atol + tol.rtol * std::fabs(ref);
  const bool within = err <= bound;  // false for a NaN on either side: such an element fails
  const double ratio = bound > 0.0 ? err / bound : (within ? 0.0 : INFINITY);
  c.max_abs = std::max(c.max_abs, err);
  c.worst = std::max(c.worst, std::isnan(ratio) ? INFINITY : ratio);
  c.wrong += within ? 0.0 : 1.0;
  c.checked += 1.0;
}

}  // namespace

int verify_command(Context& ctx, const VerifyOptions& o) {
  Problem p = load_problem(ctx, o.problem);
  std::vector<unsigned char> out(p.q.size());
  std::vector<float> lse(static_cast<std::size_t>(p.batch * p.heads * p.local_len()));
  AttentionOptions attention = p.attention_options();
  attention.on_step = progress_logger(ctx, "verify");
  const bool linear = p.attention == AttentionKind::linear;
  std::unique_ptr<ProblemTensors> tensors;
  LocalGradients local_grads;  // --gpus with --backward
  if (p.gpus > 0) {
    run_on_local_gpus(p, out, lse, &local_grads);
  } else {
    tensors = std::make_unique<ProblemTensors>(ctx, p, out, lse);
    forward(ctx, tensors->q, tensors->k, tensors->v, tensors->out, linear ? TensorView{} : tensors->lse, attention);
    tensors->download();
  }

  std::vector<float> k_all, v_all;
  load_full_kv(ctx, p, o.problem, k_all, v_all);
  std::vector<float> q_rows(p.q.size() / dtype_size(p.dtype));
  detail::convert_to_f32(p.dtype, p.q.data(), q_rows.data(), q_rows.size());
  detail::ReferenceProblem ref{p.batch, p.seq, p.heads, p.kv_heads, p.head_dim, p.causal,
                               p.scale.value_or(1.0 / std::sqrt(static_cast<double>(p.head_dim)))};
  ref.window = p.window;
  ref.sinks = p.sinks;
  std::vector<double> ref_out, ref_lse;
  if (linear) {
    // Linear attention: O only (it has no LSE), from its definition.
    std::vector<double> decay(static_cast<std::size_t>(p.heads), p.decay.empty() ? 1.0 : p.decay[0]);
    detail::reference_linear(ref, p.feature_map == FeatureMap::identity ? 1 : 0, decay, p.positions, q_rows, k_all,
                             v_all, ref_out);
  } else {
    detail::reference_forward(ref, p.positions, q_rows, k_all, v_all, ref_out, ref_lse);
  }

  double max_abs_v = 0.0;
  for (float x : v_all) max_abs_v = std::max(max_abs_v, static_cast<double>(std::fabs(x)));
  detail::Tolerance out_tol = detail::output_tolerance(p.dtype, max_abs_v);
  if (linear && p.feature_map == FeatureMap::identity) {
    // Unnormalised outputs are not bounded by max |V|: 8 unit roundoffs of the largest output.
    double biggest = 0.0, global_biggest = 0.0;
    for (double x : ref_out) biggest = std::max(biggest, std::fabs(x));
    detail::bounded_allreduce(ctx.comm(), &biggest, &global_biggest, 1, MPI_DOUBLE, MPI_MAX, "the reference's largest value");
    out_tol.atol = 8.0 * (p.dtype == DType::f32 ? 0x1p-24 : p.dtype == DType::f16 ? 0x1p-11 : 0x1p-8) * global_biggest + 1e-12;
  }
  if (o.atol) out_tol.atol = *o.atol;
  if (o.rtol) out_tol.rtol = *o.rtol;
  const detail::Tolerance lse_tol = detail::lse_tolerance();
  Comparison co, cl;
  for (std::size_t i = 0; i < ref_out.size(); ++i) {
    compare(co, detail::load_f32(p.dtype, out.data(), static_cast<std::int64_t>(i)), ref_out[i], out_tol);
  }
  for (std::size_t i = 0; i < ref_lse.size(); ++i) compare(cl, lse[i], ref_lse[i], lse_tol);

  double local[4] = {co.max_abs, co.worst, cl.max_abs, cl.worst};
  double global[4];
  detail::bounded_allreduce(ctx.comm(), local, global, 4, MPI_DOUBLE, MPI_MAX, "the largest errors");
  double counts[4] = {co.wrong, co.checked, cl.wrong, cl.checked};
  double total[4];
  detail::bounded_allreduce(ctx.comm(), counts, total, 4, MPI_DOUBLE, MPI_SUM, "the count of wrong elements");
  bool ok = total[0] == 0.0 && total[2] == 0.0;

  // --backward: dQ, dK, dV against the fp64 reference gradients (whole sequence, rebuilt
  // locally), on this rank's rows, relative to the largest reference gradient.
  double grad_err = 0.0;
  const double grad_tol = detail::gradient_tolerance(p.dtype);
  if (p.backward) {
    const std::int64_t n = p.local_len();
    std::unique_ptr<GradientTensors> grads;
    if (p.gpus == 0) {
      grads = std::make_unique<GradientTensors>(ctx, p);
      backward(ctx, tensors->q, tensors->k, tensors->v, tensors->out, linear ? TensorView{} : tensors->lse,
               grads->dout_view, grads->dq_view, grads->dk_view, grads->dv_view, attention);
      grads->download();
    }
    const std::vector<unsigned char>& dq = grads ? grads->dq : local_grads.dq;
    const std::vector<unsigned char>& dk = grads ? grads->dk : local_grads.dk;
    const std::vector<unsigned char>& dv = grads ? grads->dv : local_grads.dv;
    std::vector<double> rdq, rdk, rdv;
    const std::vector<float> q_all = load_full_rows(ctx, p, detail::SyntheticTensor::q, o.problem.q_path);
    const std::vector<float> dout_all = load_full_rows(ctx, p, detail::SyntheticTensor::dout, o.problem.dout_path);
    if (linear) {
      const std::vector<double> decay(static_cast<std::size_t>(p.heads), p.decay.empty() ? 1.0 : p.decay[0]);
      detail::reference_linear_backward(ref, p.feature_map == FeatureMap::identity ? 1 : 0, decay, q_all, k_all, v_all,
                                        dout_all, rdq, rdk, rdv);
    } else {
      detail::reference_backward(ref, q_all, k_all, v_all, dout_all, rdq, rdk, rdv);
    }
    double err = 0.0, biggest = 0.0;
    auto compare = [&](const std::vector<unsigned char>& got, const std::vector<double>& want, std::int64_t heads) {
      const std::int64_t width = heads * p.head_dim;
      for (std::int64_t b = 0; b < p.batch; ++b)
        for (std::int64_t i = 0; i < n; ++i)
          for (std::int64_t e = 0; e < width; ++e) {
            const double g = detail::load_f32(p.dtype, got.data(), (b * n + i) * width + e);
            const double w = want[static_cast<std::size_t>((b * p.seq + p.positions[static_cast<std::size_t>(i)]) * width + e)];
            err = std::max(err, std::isnan(g) ? INFINITY : std::fabs(g - w));
            biggest = std::max(biggest, std::fabs(w));
          }
    };
    compare(dq, rdq, p.heads);
    compare(dk, rdk, p.kv_heads);
    compare(dv, rdv, p.kv_heads);
    double local_g[2] = {err, biggest}, global_g[2];
    detail::bounded_allreduce(ctx.comm(), local_g, global_g, 2, MPI_DOUBLE, MPI_MAX, "the gradients' largest errors");
    grad_err = global_g[1] > 0.0 ? global_g[0] / global_g[1] : global_g[0];
    ok = ok && grad_err <= grad_tol;
  }

  print0(ctx, "ringattn verify: %s, %d ranks (%s), fp64 reference per rank\n", describe(p).c_str(), ctx.size(),
         to_string(p.device));
  print0(ctx, "  O:   max |err| %.3e   tolerance %.1e + %.1e*|ref|   worst err/tol %.3f   wrong %.0f of %.0f\n",
         global[0], out_tol.atol, out_tol.rtol, global[1], total[0], total[1]);
  if (linear) {
    print0(ctx, "  LSE: none (linear attention)\n");
  } else {
    print0(ctx, "  LSE: max |err| %.3e   tolerance %.1e + %.1e*|ref|   worst err/tol %.3f   wrong %.0f of %.0f\n",
           global[2], lse_tol.atol, lse_tol.rtol, global[3], total[2], total[3]);
  }
  if (p.backward) {
    print0(ctx, "  dQ, dK, dV: max |err| / max |ref| %.3e   tolerance %.1e\n", grad_err, grad_tol);
  }
  print0(ctx, "  %s\n", ok ? "PASSED" : "FAILED");

  if (!o.json_path.empty()) {
    nlohmann::json report = {
        {"command", "verify"},
        {"version", version()},
        {"problem", describe(p)},
        {"ranks", ctx.size()},
        {"out", {{"max_abs_err", global[0]}, {"worst_err_over_tol", global[1]}, {"wrong", total[0]}, {"checked", total[1]},
                 {"atol", out_tol.atol}, {"rtol", out_tol.rtol}}},
        {"lse", {{"max_abs_err", global[2]}, {"worst_err_over_tol", global[3]}, {"wrong", total[2]}, {"checked", total[3]},
                 {"atol", lse_tol.atol}, {"rtol", lse_tol.rtol}}},
        {"gradients", p.backward ? nlohmann::json{{"max_rel_err", grad_err}, {"tolerance", grad_tol}} : nlohmann::json(nullptr)},
        {"passed", ok},
        {"environment", relevant_environment()},
    };
    write_json(ctx, o.json_path, report);
  }
  return ok ? 0 : 1;
}

}  // namespace ringattn::cli
