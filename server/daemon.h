// nibbled's life: load the configured models, start their engines, serve gRPC (Inference,
// Models, grpc.health.v1, reflection) and Prometheus metrics, and drain on SIGTERM/SIGINT.
#pragma once

#include "server/config.h"

namespace nibble::server {

// Call first thing in main, before any thread exists: blocks SIGTERM and SIGINT in every
// thread so that RunDaemon receives them with sigwait.
void BlockShutdownSignals();

// Runs until SIGTERM/SIGINT, then drains: health turns NOT_SERVING, new calls get UNAVAILABLE,
// running streams get `drain_grace_seconds` to finish and are then ended with UNAVAILABLE.
// Returns the process exit code: 0 after a drain, 1 when start-up fails (the reason printed
// as one line on stderr).
int RunDaemon(const ServerConfig& config);

}  // namespace nibble::server
