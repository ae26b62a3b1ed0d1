// apps/ringattn/report.hpp: printing (rank 0 only) and JSON reports.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "ringattn/ringattn.hpp"

namespace ringattn::cli {

// printf to stdout on rank 0 of the context's communicator only.
void print0(const Context& ctx, const char* format, ...) __attribute__((format(printf, 2, 3)));

// Host names of all ranks (collective).
std::vector<std::string> gather_hostnames(const Context& ctx);

// Environment variables that explain a run (NCCL_, CUDA_, OMPI_, SLURM_, UCX_); never
// the whole environment.
nlohmann::json relevant_environment();

// Writes `report` to `path` on rank 0 (collective: failures are agreed).
void write_json(const Context& ctx, const std::string& path, const nlohmann::json& report);

// Returns a progress callback for AttentionOptions::on_step that logs on rank 0 every few
// seconds once a run has taken longer than that.
std::function<void(int, int)> progress_logger(const Context& ctx, const char* what);

}  // namespace ringattn::cli
