// Options every command that loads a model takes: --model, --dtype, --threads.
#pragma once

#include <cstdio>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "clients/cli/commands.h"
#include "engine/model.h"

namespace nibble::cli {

struct ModelOptions {
  std::string dir;
  std::string dtype = "float32";
  int threads = 0;
  std::string device = "cpu";

  // `required` false: the command checks itself (generate takes --model or --server).
  void Register(CLI::App& command, bool required = true) {
    CLI::Option* model = command.add_option(
        "--model", dir, required ? "Hugging Face model directory"
                                 : "Hugging Face model directory (with --server: the model's name)");
    if (required) model->required();
    command.add_option("--dtype", dtype, "weight storage: float32 or float16 (compute is fp32)")
        ->check(CLI::IsMember({"float32", "float16"}));
    command.add_option("--threads", threads, "CPU threads (0: all cores)");
    command.add_option("--device", device,
                       "where the model runs: cpu, cuda or cuda:N (fp16 compute on the GPU)");
  }

  // Loads the model, or prints the error naming what is wrong and returns null.
  std::unique_ptr<engine::Model> Load(const char* command) const {
    engine::ModelLoadOptions options;
    options.weight_storage =
        dtype == "float16" ? engine::WeightStorage::kF16 : engine::WeightStorage::kF32;
    options.cpu_threads = threads;
    auto parsed = engine::ParseDevice(device);
    if (!parsed.ok()) {
      ReportError(command, parsed.status());
      return nullptr;
    }
    options.device = *parsed;
    auto model = engine::Model::Load(dir, options);
    if (!model.ok()) {
      ReportError(command, model.status());
      return nullptr;
    }
    return std::move(model).value();
  }
};

}  // namespace nibble::cli
