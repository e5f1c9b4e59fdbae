#!/usr/bin/env bash
# nibble's main job on its embedded default, from a fresh Debian 12 machine: install what is
# missing, build, fetch the tiny real model (llama2.c's stories260K), convert it to a Hugging
# Face directory, and stream a story from it on the CPU.
#
# Where the model comes from: $NIBBLE_MODEL_MIRROR (a directory or URL prefix holding
# stories260K.bin and tok512.bin) if set, else the public address
# https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K. Either way the files
# are verified against pinned sha256 sums.
set -euo pipefail
cd "$(dirname "$0")/.."

.ci/install-deps
cmake --preset release >/dev/null
cmake --build --preset release --target nibble -j "$(nproc)"

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
