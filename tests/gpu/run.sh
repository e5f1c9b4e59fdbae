#!/usr/bin/env bash
# The GPU check of kernels/cuda in one go, for a GPU host (needs nvcc, CMake, ninja, a C++
# compiler, python3 with PyTorch for the torch peers): configure kernels-only, build, run the
# tests (PASS/FAIL lines; a failure stops here with a non-zero status), run the benchmarks,
# print the summary table last. Logs go to $OUT when it is set (else build-gpu/logs).
#   tests/gpu/run.sh [CUDA_ARCHS]   (default 90: H100/H200; "80;87;89;90" for all)
#   NIBBLE_PROFILE=1 also dumps SASS and an ncu profile of 7b.w1w3 at M = 1 (sass.txt, ncu.log).
#   NIBBLE_SKIP_W4A16=1 runs only the element-wise and attention kernels' tests and benchmark.
# Order: build; W4A16 tests; ops_test, attention_test and sampling_test (kernels/cuda/ops.h,
# attention.h, sampling.h; sampling_test prints its timing lines too);
# W4A16 benchmark; decode attention benchmark (its table); the W4A16 summary table last.
#
#   tests/gpu/run.sh --deps   only the prefix below (for binaries built elsewhere, carried)
#
#   tests/gpu/run.sh --full [CUDA_ARCHS]   the whole project (engine, daemon, CLI, tests) with
#     the CUDA backend, on a host that lacks its libraries and the network: first, on the dev
#     machine, tests/gpu/fetch-deps.sh fills .gpu-deps/ (Debian 12 .debs) and .gpu-shared/
#     (test data); both travel with `carry`. Here the .debs are unpacked with `dpkg -x` into
#     NIBBLE_DEPS_PREFIX (default /opt/nibble-deps; never /), a library the host already has
#     (same soname in ldconfig's cache) is used in place of Debian's copy, CMake is pointed at
#     the prefix, build-gpu-full (BUILD_DIR) is configured (Release, NIBBLE_CUDA=ON unless
#     NIBBLE_CUDA says otherwise), built, and the ctest suite runs as a smoke test; its summary
#     is printed last. Logs: build.log and ctest.log in $OUT (else BUILD_DIR/logs).
#     Later commands on the same host: `source /opt/nibble-deps/env.sh` sets PATH,
#     LD_LIBRARY_PATH, PKG_CONFIG_PATH, CPATH and CMAKE_PREFIX_PATH for the prefix.
#     NIBBLE_FULL_BUILD_TIMEOUT (s, default 360) and NIBBLE_FULL_CTEST_TIMEOUT (s, default 180)
#     bound the two steps so that the logs come back within a lent host's 10-minute call.
#     NIBBLE_FULL_PREBUILT=1 skips configure, build and ctest: BUILD_DIR then holds binaries
#     built elsewhere for this host and carried (bin/, and test-models/ from the fixtures).
#     tests/gpu/pack-prebuilt.sh makes one (.gpu-prebuilt) on the dev machine, within the carry.
#     NIBBLE_DEVICE_SAMPLING_FILTER (default '*Sampled*'): which gpu_engine_test cases run a
#     second time with NIBBLE_CUDA_DEVICE_SAMPLING=0 (the device sampler off);
#     NIBBLE_NO_PDL_FILTER (default '*Paged*:*Synthetic*'): which run again with
#     NIBBLE_CUDA_PDL=0 (plain launches and the decode step's fused products).
set -euo pipefail
cd "$(dirname "$0")/../.."

# --full: unpacks .gpu-deps into the prefix (once per set of .debs), writes PREFIX/env.sh.
full_unpack() {
  local p="$1" debs="$2" stamp l t f soname sys
  stamp=$( (cd "$debs" && ls *.deb; declare -f full_unpack) | md5sum | cut -d' ' -f1)
  if [[ -f "$p/.stamp" && "$(cat "$p/.stamp")" == "$stamp" ]]; then
    echo "deps: $p already holds these .debs"
    return
  fi
  rm -rf "$p"
  mkdir -p "$p"
  for f in "$debs"/*.deb; do dpkg -x "$f" "$p"; done
  # Absolute links (zlib1g-dev's libz.so -> /lib/x86_64-linux-gnu/libz.so.1.2.13) into the prefix.
  while IFS= read -r l; do
    t=$(readlink "$l")
    if [[ "$t" == /* ]]; then ln -sfn "$p$t" "$l"; fi
  done < <(find "$p" -type l)
  # A library the host already has (same soname, listed by ldconfig, file present): the
  # host's copy, newer and the one its own programs load, replaces Debian's, so that
  # LD_LIBRARY_PATH never puts an older second copy of libz, libssl, ... under them. Never for
  # the libraries nibble is built against by name: Ubuntu's libsentencepiece.so.0 links the
  # shared libprotobuf-lite instead of carrying its own copy (Debian's), and beside nibble's
  # static protobuf every tokenizer load dies with SIGSEGV (server/README.md, "Linking").
  local replaced=() cache
  cache=$(ldconfig -p)
  while IFS= read -r f; do
    soname=$(objdump -p "$f" 2>/dev/null | awk '$1 == "SONAME" {print $2}')
    [[ -n "$soname" ]] || continue
    case "$soname" in
      libsentencepiece*|libprotobuf*|libprotoc*|libgrpc*|libgpr*|libupb*|libaddress_sorting*|\
      libabsl_*|libre2*|libcares*|libyaml-cpp*|libprometheus-cpp*|libcivetweb*) continue ;;
    esac
    sys=$(awk -v s="$soname" '$1 == s && $2 ~ /x86-64/ {print $NF; exit}' <<< "$cache")
    [[ -n "$sys" && -e "$sys" && "$sys" != "$p"/* ]] || continue
    ln -sfn "$(readlink -f "$sys")" "$f"
    replaced+=("$soname")
  done < <(find "$p/usr/lib/x86_64-linux-gnu" "$p/lib/x86_64-linux-gnu" -maxdepth 1 -type f \
             -name 'lib*.so*' 2>/dev/null)
  echo "deps: the host's own copy used for: ${replaced[*]:-none}"
  # pkg-config files name /usr: the prefix instead.
  find "$p" -name '*.pc' -exec sed -i -e "s#^prefix=/usr\$#prefix=$p/usr#" \
    -e "s#=/usr/#=$p/usr/#g" -e "s# -I/usr/# -I$p/usr/#g" -e "s# -L/usr/# -L$p/usr/#g" {} +
  local lib="$p/usr/lib/x86_64-linux-gnu"
  cat > "$p/env.sh" <<ENV
# The Debian libraries of .gpu-deps, unpacked by tests/gpu/run.sh --full: source this file.
export PATH="\$PATH:$p/usr/bin"
export LD_LIBRARY_PATH="$lib:$p/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PKG_CONFIG_PATH="$lib/pkgconfig:$p/usr/share/pkgconfig\${PKG_CONFIG_PATH:+:\$PKG_CONFIG_PATH}"
export CPATH="$p/usr/include/x86_64-linux-gnu\${CPATH:+:\$CPATH}"
export CMAKE_PREFIX_PATH="$p/usr\${CMAKE_PREFIX_PATH:+;\$CMAKE_PREFIX_PATH}"
ENV
  echo "$stamp" > "$p/.stamp"
  echo "deps: $(ls "$debs"/*.deb | wc -l) .debs unpacked into $p ($(du -sh "$p" | cut -f1))"
}

full_build() {
  local archs="${1:-90}" build="${BUILD_DIR:-build-gpu-full}" p="${NIBBLE_DEPS_PREFIX:-/opt/nibble-deps}"
  local debs=.gpu-deps data="${NIBBLE_SHARED_DIR:-$PWD/.gpu-shared}"
  local logs="${OUT:-$build/logs}" t0=$SECONDS build_status=failed ctest_status="not run"
  local pc_flag=() python engine_status="not run" awq_status="not run" sampling_status="not run"
  mkdir -p "$logs"
  if ! compgen -G "$debs/*.deb" > /dev/null; then
    echo "run.sh --full: no .debs in $debs: run tests/gpu/fetch-deps.sh on the dev machine and carry .gpu-deps" >&2
    exit 1
  fi
  [[ -f "$data/models/stories260K/stories260K.bin" ]] \
    || { echo "run.sh --full: no test data at $data (carry .gpu-shared or set NIBBLE_SHARED_DIR)" >&2; exit 1; }
  { nvidia-smi --query-gpu=name,driver_version --format=csv || true; } | tee "$logs/build.log"
  full_unpack "$p" "$debs" 2>&1 | tee -a "$logs/build.log"
  # shellcheck disable=SC1091
  source "$p/env.sh"
  # Libraries the unpacked files need that neither the prefix nor the host has.
  local missing
  missing=$(find "$p/usr/lib/x86_64-linux-gnu" "$p/usr/bin" -maxdepth 1 -type f \
              \( -name 'lib*.so.*' -o -perm -u+x \) -exec ldd {} + 2>/dev/null \
            | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ' || true)
  echo "deps: unresolved libraries: ${missing:-none}" | tee -a "$logs/build.log"
  command -v pkg-config > /dev/null || pc_flag=("-DPKG_CONFIG_EXECUTABLE=$p/usr/bin/pkgconf")
  # The host's g++ 13 no longer includes <cstdint> through other standard headers, and headers
  # written for g++ 12 (Debian 12's) may rely on it: it comes first in every C++ file
  # (NIBBLE_FULL_CXX_FLAGS replaces that; CUDA files are not affected).
  # The tests' reference runs on python3 with numpy (and grpcio/protobuf for the daemon's
  # tests): the one first on PATH, not /usr/bin/python3 (CMake's first choice).
  python=$(command -v python3)
  if [[ "${NIBBLE_FULL_PREBUILT:-0}" == 1 ]]; then
    # Binaries built elsewhere for this host and carried (BUILD_DIR/bin, BUILD_DIR/test-models):
    # no configure, build or ctest here. pack-prebuilt.sh carries them compressed.
    if [[ ! -d "$build/bin" && -f "$build/prebuilt.tar.xz" ]]; then
      tar -xJf "$build/prebuilt.tar.xz" -C "$build"
    fi
    [[ -d "$build/bin" ]] || { echo "run.sh --full: NIBBLE_FULL_PREBUILT=1 but no $build/bin" >&2; exit 1; }
    build_status=ok
    ctest_status="skipped (prebuilt binaries)"
  else
    echo "configure: cmake $(cmake --version | head -1 | awk '{print $3}'), python $python" | tee -a "$logs/build.log"
    if cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
         -DNIBBLE_CUDA="${NIBBLE_CUDA:-ON}" "-DCMAKE_CUDA_ARCHITECTURES=$archs" \
         -DNIBBLE_SHARED_DIR="$data" -DNIBBLE_SYSTEM_PYTHON="$python" \
         -DCMAKE_PREFIX_PATH="$p/usr" -DProtobuf_PROTOC_EXECUTABLE="$p/usr/bin/protoc" \
         -DCMAKE_POLICY_VERSION_MINIMUM=3.5 "${pc_flag[@]}" \
         "-DCMAKE_CXX_FLAGS=${NIBBLE_FULL_CXX_FLAGS--include cstdint}" >> "$logs/build.log" 2>&1; then
      echo "configure ok ($((SECONDS - t0)) s)"
      if timeout "${NIBBLE_FULL_BUILD_TIMEOUT:-360}" ninja -C "$build" >> "$logs/build.log" 2>&1; then
        build_status=ok
      else
        grep -B2 -A12 -m3 -E 'error|FAILED' "$logs/build.log" | head -60 || tail -40 "$logs/build.log"
      fi
    else
      grep -A8 -E 'CMake Error' "$logs/build.log" | head -60 || tail -40 "$logs/build.log"
    fi
    echo "build $build_status ($((SECONDS - t0)) s)"
  fi
  if [[ "$build_status" == ok ]]; then
    # The daemon must not load libprotobuf.so (server/README.md: protobuf beside SentencePiece).
    if [[ -x "$build/bin/nibbled" ]]; then
      echo "ldd bin/nibbled, protobuf or missing: $(ldd "$build/bin/nibbled" | grep -E 'protobuf|not found' | tr -s ' \t\n' ' ' || true)"
      echo "ldd bin/nibbled, sentencepiece: $(ldd "$build/bin/nibbled" | grep sentencepiece | tr -s ' \t\n' ' ' || true)"
    fi
    local rc=0 t1=$SECONDS
    if [[ "${NIBBLE_FULL_PREBUILT:-0}" != 1 ]]; then
      timeout "${NIBBLE_FULL_CTEST_TIMEOUT:-180}" ctest --test-dir "$build" -j "$(nproc)" \
        ${NIBBLE_FULL_CTEST_REGEX:+-R "$NIBBLE_FULL_CTEST_REGEX"} \
        --timeout 150 --output-on-failure > "$logs/ctest.log" 2>&1 || rc=$?
      if [[ $rc == 124 ]]; then
        ctest_status="timed out after ${NIBBLE_FULL_CTEST_TIMEOUT:-180} s"
      else
        ctest_status="done (exit $rc, $((SECONDS - t1)) s)"
      fi
    fi
    # The device sampler against the host rule, kernel by kernel (and its timing lines).
    if [[ -x "$build/bin/sampling_test" ]]; then
      rc=0
      timeout 120 "$build/bin/sampling_test" > "$logs/sampling_test.log" 2>&1 || rc=$?
      sampling_status="exit $rc"
    fi
    # The CUDA backend against the CPU backend, over the fixtures ctest just made.
    if [[ -x "$build/bin/gpu_engine_test" ]]; then
      rc=0
      NIBBLE_TEST_MODELS="$build/test-models" NIBBLE_SHARED_DIR="$data" \
        timeout "${NIBBLE_ENGINE_TEST_TIMEOUT:-240}" "$build/bin/gpu_engine_test" \
        > "$logs/engine_test.log" 2>&1 || rc=$?
      # The sampling tests again with the device sampler off (NIBBLE_CUDA_DEVICE_SAMPLING=0:
      # plain greedy spans through ArgMaxRows, the others through the host's rule).
      NIBBLE_CUDA_DEVICE_SAMPLING=0 NIBBLE_TEST_MODELS="$build/test-models" NIBBLE_SHARED_DIR="$data" \
        timeout "${NIBBLE_ENGINE_TEST_TIMEOUT:-240}" "$build/bin/gpu_engine_test" \
        --gtest_filter="${NIBBLE_DEVICE_SAMPLING_FILTER:-*Sampled*}" >> "$logs/engine_test.log" 2>&1 || rc=$?
      # The decode path of devices without PDL (the Jetson Orin, the A100) on this card: plain
      # launches, and the products with the norms, residual adds and SiLU·mul folded in
      # (kernels/cuda/w4a16.h W4A16Fusion), which the engine uses only there.
      NIBBLE_CUDA_PDL=0 NIBBLE_TEST_MODELS="$build/test-models" NIBBLE_SHARED_DIR="$data" \
        timeout "${NIBBLE_ENGINE_TEST_TIMEOUT:-240}" "$build/bin/gpu_engine_test" \
        --gtest_filter="${NIBBLE_NO_PDL_FILTER:-*Paged*:*Synthetic*}" >> "$logs/engine_test.log" 2>&1 || rc=$?
      engine_status="exit $rc"
    fi
    # The AWQ search on the GPU against the CPU's, over the same fixtures.
    if [[ -x "$build/bin/gpu_awq_test" ]]; then
      rc=0
      NIBBLE_TEST_MODELS="$build/test-models" NIBBLE_SHARED_DIR="$data" \
        NIBBLE_GOLDEN_DIR="$PWD/tests/golden" \
        timeout "${NIBBLE_AWQ_TEST_TIMEOUT:-240}" "$build/bin/gpu_awq_test" \
        > "$logs/awq_test.log" 2>&1 || rc=$?
      awq_status="exit $rc"
    fi
    # NIBBLE_ENGINE_BENCH="ARGS": end-to-end decode on a synthetic model (tests/gpu/engine_bench.cc).
    if [[ -n "${NIBBLE_ENGINE_BENCH:-}" && -x "$build/bin/gpu_engine_bench" ]]; then
      # shellcheck disable=SC2086
      timeout "${NIBBLE_ENGINE_BENCH_TIMEOUT:-300}" "$build/bin/gpu_engine_bench" $NIBBLE_ENGINE_BENCH \
        > "$logs/engine_bench.log" 2>&1 || echo "engine bench: exit $?" >> "$logs/engine_bench.log"
    fi
  fi
  # The summary, last.
  echo "== run.sh --full summary =="
  echo "host: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) | archs $archs | $(nproc) cores | $((SECONDS - t0)) s"
  echo "build: $build_status (log build.log)"
  echo "ctest: $ctest_status (log ctest.log)"
  if [[ -f "$logs/ctest.log" && "${NIBBLE_FULL_PREBUILT:-0}" != 1 ]]; then
    echo "passed: $(grep -cE 'Test +#[0-9]+: .* Passed' "$logs/ctest.log"), failed: $(grep -cE 'Test +#[0-9]+: .*(\*\*\*|Failed|Not Run|Exception)' "$logs/ctest.log")"
    grep -E 'tests passed|Total Test time' "$logs/ctest.log" || true
    sed -n '/The following tests FAILED/,$p' "$logs/ctest.log"
  fi
  if [[ -f "$logs/sampling_test.log" ]]; then
    echo "sampling_test: $sampling_status (log sampling_test.log)"
    grep -vE '^PASS' "$logs/sampling_test.log" | head -40 || true
    echo "PASS lines: $(grep -c '^PASS' "$logs/sampling_test.log")"
  fi
  if [[ -f "$logs/engine_test.log" ]]; then
    echo "gpu_engine_test: $engine_status (log engine_test.log)"
    grep -E '^\[  (PASSED|FAILED) |^\[  FAILED|top-1|perplexity|relative|Failure|Expected|Which is|error' "$logs/engine_test.log" | head -60
  fi
  if [[ -f "$logs/awq_test.log" ]]; then
    echo "gpu_awq_test: $awq_status (log awq_test.log)"
    grep -E '^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|perplexity|same ratio|search cpu|groups differ|Failure|Expected|Which is|error' "$logs/awq_test.log" | head -60
  fi
  if [[ -f "$logs/engine_bench.log" ]]; then
    echo "gpu_engine_bench (log engine_bench.log):"
    cat "$logs/engine_bench.log"
  fi
  # The status: the build and ctest, and every GPU test that ran (not run counts as passed).
  [[ "$build_status" == ok ]] || return 1
  [[ "$ctest_status" == "done (exit 0"* || "${NIBBLE_FULL_PREBUILT:-0}" == 1 ]] || return 1
  local s
  for s in "$sampling_status" "$engine_status" "$awq_status"; do
    [[ "$s" == "not run" || "$s" == "exit 0" ]] || return 1
  done
}

# --deps: only unpack .gpu-deps into the prefix and write its env.sh (for binaries built
# elsewhere for this host and carried here).
if [[ "${1:-}" == --deps ]]; then
  full_unpack "${NIBBLE_DEPS_PREFIX:-/opt/nibble-deps}" .gpu-deps
  exit
fi
if [[ "${1:-}" == --full ]]; then
  shift
  full_build "$@"
  exit
fi
ARCHS="${1:-90}"
BUILD="${BUILD_DIR:-build-gpu}"
LOGS="${OUT:-$BUILD/logs}"
mkdir -p "$LOGS"
# (at most 8 files come back from a lent GPU host: keep the logs few)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$LOGS/build.log"
cmake -S . -B "$BUILD" -G Ninja -DNIBBLE_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release \
  "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" >> "$LOGS/build.log" 2>&1 || { tail -30 "$LOGS/build.log"; exit 1; }
ninja -C "$BUILD" >> "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
echo "build ok"
SKIP_W4A16="${NIBBLE_SKIP_W4A16:-0}"
if [[ "$SKIP_W4A16" != 1 ]]; then
"$BUILD/bin/w4a16_repack_test" | tail -1
"$BUILD/bin/w4a16_test" > "$LOGS/w4a16_test.log" 2>&1 || { grep -v ^PASS "$LOGS/w4a16_test.log"; exit 1; }
grep -c ^PASS "$LOGS/w4a16_test.log" | sed 's/^/w4a16_test PASS lines: /'; tail -1 "$LOGS/w4a16_test.log"
fi
# The element-wise kernels and decode attention: one log (kernels.log) for both tests and the
# benchmark (few files come back from a lent host).
KLOG="$LOGS/kernels.log"
: > "$KLOG"
for t in ops_test attention_test sampling_test; do
  "$BUILD/bin/$t" > "$LOGS/$t.tmp" 2>&1 || { cat "$LOGS/$t.tmp" >> "$KLOG"; grep -v ^PASS "$LOGS/$t.tmp"; exit 1; }
  cat "$LOGS/$t.tmp" >> "$KLOG"
  grep -c ^PASS "$LOGS/$t.tmp" | sed "s/^/$t PASS lines: /"; tail -1 "$LOGS/$t.tmp"
  rm -f "$LOGS/$t.tmp"
done
# sampling_test's timings and any near ties it counted (rounding-level disagreements).
grep -E '^bench sample|near tie' "$KLOG" || true
if [[ "$SKIP_W4A16" == 1 ]]; then
  "$BUILD/bin/attention_bench" 2>&1 | tee -a "$KLOG"
  exit 0
fi
"$BUILD/bin/w4a16_bench" "$LOGS/bench.csv" "$LOGS/variants.csv" > "$LOGS/bench.log" 2>&1 \
  || { tail -30 "$LOGS/bench.log"; exit 1; }
tail -3 "$LOGS/bench.log"
# NIBBLE_PROFILE=1: the decode kernels' SASS and an ncu profile of 7b.w1w3 at M = 1.
if [[ "${NIBBLE_PROFILE:-0}" == 1 ]]; then
  cuobjdump -sass "$BUILD/kernels/libnibble_kernels_cuda.a" > "$LOGS/sass.txt" 2>&1 || true
  ncu --clock-control none --launch-skip 2 --launch-count 1 --kernel-name regex:Decode \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats \
    "$BUILD/bin/w4a16_bench" --profile 4096 14336 1 > "$LOGS/ncu.log" 2>&1 || true
  ncu --clock-control none --launch-skip 7 --launch-count 1 --kernel-name regex:Decode \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    "$BUILD/bin/w4a16_bench" --profile 4096 14336 1 >> "$LOGS/ncu.log" 2>&1 || true
  grep -E "Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|No Eligible|Block Size|Grid Size" "$LOGS/ncu.log" || true
fi
# The decode attention benchmark's lines and table, before the W4A16 summary (which stays last).
"$BUILD/bin/attention_bench" >> "$KLOG" 2>&1 || { tail -20 "$KLOG"; exit 1; }
sed -n '/^copy bandwidth/,$p' "$KLOG"
PYTHONUNBUFFERED=1 python3 tests/gpu/torch_int4_bench.py "$LOGS/bench.csv" "$LOGS/summary.md" \
  "$LOGS/variants.csv" 2>&1 | tail -n +1
