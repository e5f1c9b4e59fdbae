#!/usr/bin/env bash
# nibble's main job on its embedded default, from a fresh Debian 12 machine: install what is
# missing, build, fetch the tiny real model (llama2.c's stories260K), convert it to a Hugging
# Face directory, stream a story from it on the CPU, then start the daemon `nibbled` serving
# it on loopback and stream a chat reply from it with `nibble chat`. The daemon keeps running
# (its pid and log are printed; the next run of this script replaces it).
#
# Where the model comes from: $NIBBLE_MODEL_MIRROR (a directory or URL prefix holding
# stories260K.bin and tok512.bin) if set, else the public address
# https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K. Either way the files
# are verified against pinned sha256 sums.
set -euo pipefail
cd "$(dirname "$0")/.."

.ci/install-deps
cmake --preset release >/dev/null
cmake --build --preset release --target nibble nibbled -j "$(nproc)"

models="${NIBBLE_MODELS_DIR:-$PWD/models}"
build/bin/nibble fetch stories260K --out "$models/stories260K-llama2c"
if [ ! -f "$models/stories260K/config.json" ]; then
  build/bin/nibble convert llama2c \
    --checkpoint "$models/stories260K-llama2c/stories260K.bin" \
    --tokenizer "$models/stories260K-llama2c/tok512.bin" \
    --out "$models/stories260K"
fi
build/bin/nibble generate --model "$models/stories260K" --prompt "${1:-Once upon a time}" \
  --max-tokens 256 --temperature 0.8 --top-p 0.95 --seed 42
echo

# The daemon: loopback only (no TLS or tokens yet), ports from the environment.
listen="127.0.0.1:${NIBBLE_PORT:-50051}"
metrics="127.0.0.1:${NIBBLE_METRICS_PORT:-9464}"
pid_file="$models/nibbled.pid"
if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  kill "$(cat "$pid_file")"  # drains, then exits
  while kill -0 "$(cat "$pid_file")" 2>/dev/null; do sleep 0.2; done
fi
cat > "$models/nibbled.yaml" <<YAML
# Written by deploy/quickstart.sh; deploy/nibbled-edge.yaml documents every key.
listen: $listen
metrics_listen: $metrics
drain_grace_seconds: 5
models:
  - name: stories260K
    path: $models/stories260K
engine:
  cpu_memory_budget: 64MiB
YAML
# Idle OpenMP threads sleep instead of spinning: the daemon shares the machine.
OMP_WAIT_POLICY=passive nohup build/bin/nibbled --config "$models/nibbled.yaml" \
  >"$models/nibbled.log" 2>&1 &
echo $! >"$pid_file"
for _ in $(seq 100); do
  build/bin/nibble models list --server "$listen" >/dev/null 2>&1 && break
  kill -0 "$(cat "$pid_file")" 2>/dev/null || { cat "$models/nibbled.log" >&2; exit 1; }
  sleep 0.1
done
build/bin/nibble chat --server "$listen" --model stories260K \
  --prompt "${1:-Once upon a time}" --max-tokens 128 --temperature 0.8 --seed 42
echo
echo "nibbled is serving stories260K on $listen (metrics: http://$metrics/metrics)," \
  "pid $(cat "$pid_file"), log $models/nibbled.log."
echo "Chat with it:  build/bin/nibble chat --server $listen"
echo "Stop it:       kill $(cat "$pid_file")"
