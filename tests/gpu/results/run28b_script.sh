#!/usr/bin/env bash
# run 28b (run as run 29a in the tenth session: results/run29a_*). Before it: give DecodeSplitKernel
# __launch_bounds__(kThreads, (!EARLY && MAXG <= 4) ? 5 : 4) (ptxas: 93-96 registers, no
# spills), build, keep run 28a's attention_bench as attention_bench_pipe4 and main's as
# attention_bench_base in build/bin, repack with tests/gpu/pack-prebuilt.sh (the binaries named
# below), then run this: the pipelined rounds under a 5-block bound against the 4-block ones and
# main's; ops_test's fixed split-sums case; the engine; a batch-1 timeline with kernel names.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
L=$OUT/logs; mkdir -p $L
finish() {
  for f in $L/*_test.log; do echo "$(basename $f): $(grep -c "^PASS" $f) PASS, $(grep -c "^FAIL" $f) FAIL; $(tail -1 $f)"; done >> $L/summary.txt
  for f in $L/bench_*.log; do echo "$(basename $f): $(grep -h "^| w4" $f | tr '\n' ' ')"; done >> $L/summary.txt
  tar czf $OUT/logs.tgz -C $OUT logs; cat $L/summary.txt
  for f in $L/attention_bench_*.log; do echo "== $f"; grep -h "^| [0-9]" $f; done
}
trap finish EXIT
trap "exit 143" TERM INT
tests/gpu/run.sh --deps > $L/deps.log 2>&1; source /opt/nibble-deps/env.sh
B=$PWD/.gpu-prebuilt; tar -xJf $B/prebuilt.tar.xz -C $B
export NIBBLE_TEST_MODELS=$B/test-models NIBBLE_SHARED_DIR=$PWD/.gpu-shared NIBBLE_GOLDEN_DIR=$PWD/tests/golden
C=$PWD/.gpu-shared/models/configs/internlm2-chat-7b.json
nvidia-smi --query-gpu=name,driver_version --format=csv > $L/gpu.txt 2>&1
deadline=$((SECONDS + ${RUN_BUDGET:-200}))
step() {
  local name=$1 secs=$2; shift 2
  local left=$((deadline - SECONDS)); (( left < secs )) && secs=$left
  (( secs < 5 )) && { echo "$name skipped (no time left)" >> $L/summary.txt; return; }
  local t0=$SECONDS; timeout $secs "$@" > $L/$name.log 2>&1
  echo "$name rc $? $((SECONDS - t0)) s" >> $L/summary.txt
}
step attention_bench_bound5 30 $B/bin/attention_bench
step attention_bench_bound4 30 $B/bin/attention_bench_pipe4
step attention_bench_main 30 $B/bin/attention_bench_base
step ops_test 60 $B/bin/ops_test
step attention_test 90 $B/bin/attention_test
step bench_bound5 90 $B/bin/gpu_engine_bench $C --storage w4 --batches 1,8,32,64 --ttft 0
cupti=$(find /usr/local/cuda* -name 'libcupti.so*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH=$(dirname "$cupti"):$LD_LIBRARY_PATH
NIBBLE_KERNEL_TRACE=$L/trace.csv step bench_traced 60 env LD_PRELOAD=$B/bin/kernel_trace.so $B/bin/gpu_engine_bench $C --storage w4 --batches 1 --new 32 --ttft 0
python3 tests/gpu/kernel_timeline.py $L/trace.csv --label "batch 1" > $L/timeline.md 2>&1; gzip $L/trace.csv; cat $L/timeline.md
