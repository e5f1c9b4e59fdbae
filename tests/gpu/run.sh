#!/usr/bin/env bash
# The GPU check of kernels/cuda in one go, for a GPU host (needs nvcc, CMake, ninja, a C++
# compiler, python3 with PyTorch for the torch peers): configure kernels-only, build, run the
# tests (PASS/FAIL lines; a failure stops here with a non-zero status), run the benchmarks,
# print the summary table last. Logs go to $OUT when it is set (else build-gpu/logs).
#   tests/gpu/run.sh [CUDA_ARCHS]   (default 90: H100/H200; "80;87;89;90" for all)
#   NIBBLE_PROFILE=1 also dumps SASS and an ncu profile of 7b.w1w3 at M = 1 (sass.txt, ncu.log).
#   NIBBLE_SKIP_W4A16=1 runs only the element-wise and attention kernels' tests and benchmark.
# Order: build; W4A16 tests; ops_test and attention_test (kernels/cuda/ops.h, attention.h);
# W4A16 benchmark; decode attention benchmark (its table); the W4A16 summary table last.
set -euo pipefail
cd "$(dirname "$0")/../.."
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
for t in ops_test attention_test; do
  "$BUILD/bin/$t" > "$LOGS/$t.tmp" 2>&1 || { cat "$LOGS/$t.tmp" >> "$KLOG"; grep -v ^PASS "$LOGS/$t.tmp"; exit 1; }
  cat "$LOGS/$t.tmp" >> "$KLOG"
  grep -c ^PASS "$LOGS/$t.tmp" | sed "s/^/$t PASS lines: /"; tail -1 "$LOGS/$t.tmp"
  rm -f "$LOGS/$t.tmp"
done
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
