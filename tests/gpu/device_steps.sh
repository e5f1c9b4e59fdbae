# Sourced (bash) by a device call's script (tests/gpu/results/run*_script.sh) on the GPU host,
# from the repository root, with carry [".gpu-deps", ".gpu-shared", ".gpu-prebuilt"]
# (tests/gpu/pack-prebuilt.sh). It installs the carried dependencies, unpacks the binaries into
# $B/bin, sets NIBBLE_TEST_MODELS / NIBBLE_SHARED_DIR / NIBBLE_GOLDEN_DIR, C (the 7B config),
# and L ($OUT/logs), and defines
#   step NAME SECONDS COMMAND...   COMMAND's output into $L/NAME.log, within SECONDS and within
#                                  the whole run's RUN_BUDGET (default 400) from sourcing: a step
#                                  that would not fit is cut short or skipped, and its rc and
#                                  time go to $L/summary.txt;
#   trace_step NAME SECONDS COMMAND...   the same under kernel_trace.so, then $L/NAME.md: the
#                                  timeline (kernel_timeline.py), the trace gzipped beside it.
# On any exit the tests' PASS / FAIL counts and the engine bench rows (`| w4`) are added to the
# summary, the script's own summarize function (if it defines one) runs, $L is tarred into
# $OUT/logs.tgz (the device tool brings back at most 8 files of $OUT) and the summary printed.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
L=$OUT/logs
mkdir -p "$L"
device_steps_finish() {
  for f in "$L"/*_test.log; do
    [[ -e $f ]] && echo "$(basename "$f"): $(grep -c "^PASS" "$f") PASS, $(grep -c "^FAIL" "$f") FAIL; $(tail -1 "$f")"
  done >> "$L/summary.txt"
  for f in "$L"/bench_*.log; do
    [[ -e $f ]] && echo "$(basename "$f"): $(grep -h "^| w4" "$f" | tr '\n' ' ')"
  done >> "$L/summary.txt"
  declare -F summarize > /dev/null && summarize >> "$L/summary.txt"
  tar czf "$OUT/logs.tgz" -C "$OUT" logs
  cat "$L/summary.txt"
}
trap device_steps_finish EXIT
trap "exit 143" TERM INT
deadline=$((SECONDS + ${RUN_BUDGET:-400}))
tests/gpu/run.sh --deps > "$L/deps.log" 2>&1
source /opt/nibble-deps/env.sh
B=$PWD/.gpu-prebuilt
tar -xJf "$B/prebuilt.tar.xz" -C "$B"
export NIBBLE_TEST_MODELS=$B/test-models NIBBLE_SHARED_DIR=$PWD/.gpu-shared NIBBLE_GOLDEN_DIR=$PWD/tests/golden
C=$PWD/.gpu-shared/models/configs/internlm2-chat-7b.json
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$L/gpu.txt" 2>&1
step() {
  local name=$1 secs=$2
  shift 2
  local left=$((deadline - SECONDS))
  ((left < secs)) && secs=$left
  ((secs < 5)) && { echo "$name skipped (no time left)" >> "$L/summary.txt"; return; }
  local t0=$SECONDS
  timeout "$secs" "$@" > "$L/$name.log" 2>&1
  echo "$name rc $? $((SECONDS - t0)) s" >> "$L/summary.txt"
}
trace_step() {
  local name=$1 secs=$2
  shift 2
  local cupti
  cupti=$(find /usr/local/cuda* -name 'libcupti.so*' 2> /dev/null | head -1)
  NIBBLE_KERNEL_TRACE=$L/$name.csv LD_LIBRARY_PATH=$(dirname "$cupti"):$LD_LIBRARY_PATH \
    step "$name" "$secs" env LD_PRELOAD="$B/bin/kernel_trace.so" "$@"
  [[ -e "$L/$name.csv" ]] || return
  python3 tests/gpu/kernel_timeline.py "$L/$name.csv" --label "$name" > "$L/$name.md" 2>&1
  gzip -f "$L/$name.csv"
}
