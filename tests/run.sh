#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine, builds nibble and runs every test: unit, integration
# (against the numpy reference's goldens), the CLI end to end, all of it again under ASan and
# UBSan, and the libFuzzer target on its seed corpus. This is the command README.md gives and .ci/run calls.
#
# Test data: NIBBLE_SHARED_DIR (default ../shared beside the checkout) must hold the real
# stories260K model and the TinyStories texts (see ../shared/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

.ci/install-deps

export NIBBLE_SHARED_DIR="${NIBBLE_SHARED_DIR:-$(cd .. && pwd)/shared}"
if [ ! -f "$NIBBLE_SHARED_DIR/models/stories260K/stories260K.bin" ]; then
  echo "tests/run.sh: no test data at $NIBBLE_SHARED_DIR (set NIBBLE_SHARED_DIR)" >&2
  exit 1
fi
jobs="$(nproc)"

cmake --preset release -DNIBBLE_SHARED_DIR="$NIBBLE_SHARED_DIR"
cmake --build --preset release -j "$jobs"
ctest --preset release -j "$jobs"

# Everything again under AddressSanitizer and UBSan: bad input must never mean a crash.
cmake --preset debug -DNIBBLE_SHARED_DIR="$NIBBLE_SHARED_DIR"
cmake --build --preset debug -j "$jobs"
ctest --preset debug -j "$jobs"

# The safetensors header parser under libFuzzer (clang), briefly, on its seed corpus.
cmake --preset fuzz
cmake --build --preset fuzz -j "$jobs"
ctest --preset fuzz
