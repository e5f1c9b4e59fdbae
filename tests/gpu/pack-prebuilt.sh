#!/usr/bin/env bash
# On the dev machine: packs binaries built here for a GPU host into .gpu-prebuilt/ (git-ignored),
# laid out as tests/gpu/run.sh --full expects a prebuilt BUILD_DIR, so that a lent host with
# no network and little time runs them without building:
#   bin/          the GPU tests and benchmarks (stripped; the CUDA code stays in them)
#   test-models/  the fixtures gpu_engine_test and gpu_awq_test read (ctest makes them here),
#                 less those only the CPU tests read (broken, sharded, llama_bf16,
#                 internlm_zero_bias: ~17 MB)
# all of it compressed into .gpu-prebuilt/prebuilt.tar.xz (the only file left there: the
# binaries' CUDA code compresses ~6x, so every GPU test and benchmark fits the carry), and
# prints the size of the usual carry (.gpu-deps, .gpu-shared, .gpu-prebuilt, plus the tracked
# files) against the device tool's 64 MiB.
#   tests/gpu/pack-prebuilt.sh [BUILD] [BINARY ...]
#   (on the host, first: tar -xJf .gpu-prebuilt/prebuilt.tar.xz -C .gpu-prebuilt)
#     BUILD: a build folder configured with CMAKE_CUDA_ARCHITECTURES holding the host's arch
#     (default build; e.g. `cmake --preset release -DCMAKE_CUDA_ARCHITECTURES=90`), built, with
#     ctest run at least once (its fixtures write BUILD/test-models).
#     BINARY: which of BUILD/bin to pack (default: the tests and benchmarks listed below).
# On the host, with carry [".gpu-deps", ".gpu-shared", ".gpu-prebuilt"]:
#   NIBBLE_FULL_PREBUILT=1 BUILD_DIR=.gpu-prebuilt tests/gpu/run.sh --full
#     (sampling_test, gpu_engine_test and, when packed, gpu_awq_test; NIBBLE_ENGINE_BENCH="CONFIG
#     ARGS" adds the engine bench), or, for a script of one's own:
#   tests/gpu/run.sh --deps; source /opt/nibble-deps/env.sh
#   export NIBBLE_TEST_MODELS=$PWD/.gpu-prebuilt/test-models NIBBLE_SHARED_DIR=$PWD/.gpu-shared
#   .gpu-prebuilt/bin/gpu_engine_bench .gpu-shared/models/configs/internlm2-chat-7b.json ...
set -euo pipefail
cd "$(dirname "$0")/../.."
build="${1:-build}"
shift || true
binaries=("$@")
if [[ ${#binaries[@]} -eq 0 ]]; then
  binaries=(attention_test attention_bench gpu_engine_test gpu_engine_bench gpu_awq_test
            sampling_test w4a16_test w4a16_bench ops_test)
fi
out=.gpu-prebuilt
[[ -d "$build/test-models" ]] || { echo "pack-prebuilt: no $build/test-models (run ctest in $build first)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out/bin" "$out/test-models"
for b in "${binaries[@]}"; do
  [[ -x "$build/bin/$b" ]] || { echo "pack-prebuilt: no $build/bin/$b" >&2; exit 1; }
  cp "$build/bin/$b" "$out/bin/"
  strip "$out/bin/$b"
done
(cd "$build/test-models" && tar --exclude=./broken --exclude=./sharded --exclude='./llama_bf16*' \
   --exclude=./internlm_zero_bias -cf - .) | (cd "$out/test-models" && tar -xf -)
tar -cJf "$out.tar.xz" -C "$out" bin test-models
rm -rf "$out"
mkdir -p "$out"
mv "$out.tar.xz" "$out/prebuilt.tar.xz"
total=0
for d in .gpu-deps .gpu-shared "$out"; do
  [[ -d "$d" ]] || { echo "pack-prebuilt: no $d (tests/gpu/fetch-deps.sh makes .gpu-deps and .gpu-shared)" >&2; continue; }
  bytes=$(du -sb "$d" | cut -f1)
  total=$((total + bytes))
  echo "$d: $((bytes / 1048576)) MiB"
done
tracked=$(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c)
total=$((total + tracked))
echo "tracked files: $((tracked / 1048576)) MiB; carry in all: $((total / 1048576)) MiB of 64"
if (( total > 64 * 1048576 )); then
  echo "pack-prebuilt: over the 64 MiB carry: pack fewer binaries (arguments)" >&2
  exit 1
fi
