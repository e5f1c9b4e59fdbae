// `nibble models load|unload`: hot loading on a nibbled (Models.Load, Models.Unload), under
// the `models` command that chat_command.cc registers (`models list`). Both take the
// connection flags (connection_flags.h) and need a token with the admin scope on a daemon
// that checks tokens.
#include <cstdio>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "clients/cli/commands.h"
#include "clients/cli/connection_flags.h"
#include "nibble/v1/models.grpc.pb.h"
#include "rpc/channel.h"

namespace nibble::cli {
namespace {

struct HotLoadOptions {
  ConnectionFlags connection;
  bool json = false;
  // load
  std::string name;
  std::string artifact;
  std::string path;
  std::string peer;
  std::string dtype;
  int cpu_threads = 0;
  // unload
  bool cancel = false;
  double drain_seconds = 0;
};

// Runs one unary Models call with the connection flags' security; a load or an unload may
// take long (a pull, a drain), so without --timeout there is no deadline.
template <class Request, class Response>
absl::Status Call1(const ConnectionFlags& flags,
                   grpc::Status (nibble::v1::Models::Stub::*method)(grpc::ClientContext*,
                                                                    const Request&, Response*),
                   const Request& request, Response* response) {
  auto connection = flags.Open();
  if (!connection.ok()) return connection.status();
  auto stub = nibble::v1::Models::NewStub(connection->channel);
  return connection->Call(*stub, method, request, response, /*default_seconds=*/0);
}

int RunLoad(const HotLoadOptions& options) {
  nibble::v1::LoadModelRequest request;
  request.set_name(options.name);
  request.set_dtype(options.dtype);
  request.set_cpu_threads(options.cpu_threads);
  const int sources = !options.path.empty() + !options.peer.empty() +
                      (options.peer.empty() && !options.artifact.empty());
  if (sources != 1) {
    return ReportError("models load",
                       absl::InvalidArgumentError(
                           "name what to load: --artifact NAME (on the daemon), --path DIR "
                           "(under its artifacts.model_roots), or --peer HOST:PORT --artifact "
                           "NAME (pulled from another daemon)"));
  }
  if (!options.peer.empty()) {
    if (options.artifact.empty()) {
      return ReportError("models load",
                         absl::InvalidArgumentError("--peer needs --artifact NAME"));
    }
    request.mutable_peer()->set_address(options.peer);
    request.mutable_peer()->set_artifact(options.artifact);
  } else if (!options.path.empty()) {
    request.set_path(options.path);
  } else {
    request.set_artifact(options.artifact);
  }
  nibble::v1::ModelInfo info;
  absl::Status status =
      Call1(options.connection, &nibble::v1::Models::Stub::Load, request, &info);
  if (!status.ok()) return ReportError("models load", status);
  if (options.json) {
    std::printf("%s\n", Json(info).c_str());
  } else {
    std::printf("model %s loaded from %s (%s, %s, KV cache %lld bytes)\n", info.name().c_str(),
                info.path().c_str(), info.architecture().c_str(),
                info.quantization().method().c_str(),
                static_cast<long long>(info.cache().kv_cache_bytes()));
  }
  return 0;
}

int RunUnload(const HotLoadOptions& options) {
  nibble::v1::UnloadModelRequest request;
  request.set_name(options.name);
  request.set_mode(options.cancel ? nibble::v1::UNLOAD_MODE_CANCEL : nibble::v1::UNLOAD_MODE_DRAIN);
  request.set_timeout_seconds(options.drain_seconds);
  nibble::v1::UnloadModelResponse response;
  absl::Status status =
      Call1(options.connection, &nibble::v1::Models::Stub::Unload, request, &response);
  if (!status.ok()) return ReportError("models unload", status);
  if (options.json) {
    std::printf("%s\n", Json(response).c_str());
  } else {
    std::printf("model %s unloaded (%d requests ended)\n", options.name.c_str(),
                response.requests_ended());
  }
  return 0;
}

}  // namespace

CommandRunner RegisterModelsHotLoading(CLI::App& models) {
  auto options = std::make_shared<HotLoadOptions>();
  CLI::App* load = models.add_subcommand("load", "Load a model on the daemon and serve it");
  options->connection.Register(*load);
  load->add_option("--artifact", options->artifact,
                   "an artifact of the daemon (or, with --peer, of that daemon)");
  load->add_option("--path", options->path,
                   "a model directory under the daemon's artifacts.model_roots");
  load->add_option("--peer", options->peer,
                   "pull --artifact from this daemon (one of the config's artifacts.peers)");
  load->add_option("--name", options->name, "serve it under this name (default: the artifact's)");
  load->add_option("--dtype", options->dtype, "dense weight storage")
      ->check(CLI::IsMember({"float32", "float16"}));
  load->add_option("--cpu-threads", options->cpu_threads, "threads (0: all cores)")
      ->check(CLI::Range(0, 1024));
  load->add_flag("--json", options->json, "print the model as JSON");

  CLI::App* unload = models.add_subcommand("unload", "Stop serving a model");
  unload->add_option("name", options->name, "the model")->required();
  options->connection.Register(*unload);
  unload->add_flag("--cancel", options->cancel,
                   "end its running requests now (default: wait for them, refusing new ones)");
  unload->add_option("--drain-seconds", options->drain_seconds,
                     "how long to wait for running requests (default: the daemon's "
                     "drain_grace_seconds)")
      ->check(CLI::Range(0.0, 86400.0));
  unload->add_flag("--json", options->json, "print the result as JSON");

  return [options, load, unload]() {
    if (load->parsed()) return RunLoad(*options);
    if (unload->parsed()) return RunUnload(*options);
    return 2;
  };
}

}  // namespace nibble::cli
