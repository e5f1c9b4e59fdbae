#!/usr/bin/env bash
# run 28a: attention (pre-wait loads, pipelined rounds) and the folded split-k reduce, A/B;
# the kernel timeline of a decode step. Most important first; the logs are tarred on any exit.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
L=$OUT/logs; mkdir -p $L
summarize() {
  for f in $L/*_test.log; do echo "$(basename $f): $(grep -c "^PASS" $f) PASS, $(grep -c "^FAIL" $f) FAIL; $(tail -1 $f)"; done >> $L/summary.txt
  for f in $L/bench_*.log; do echo "$(basename $f): $(grep -h "^| W4A16" $f | tr '\n' ' ')"; done >> $L/summary.txt
}
finish() {
  summarize; tar czf $OUT/logs.tgz -C $OUT logs
  cat $L/summary.txt; cat $L/timeline.md 2>/dev/null; grep -h "^| [0-9]" $L/attention_bench_*.log 2>/dev/null
}
trap finish EXIT
trap "exit 143" TERM INT
tests/gpu/run.sh --deps > $L/deps.log 2>&1; source /opt/nibble-deps/env.sh
B=$PWD/.gpu-prebuilt; tar -xJf $B/prebuilt.tar.xz -C $B
export NIBBLE_TEST_MODELS=$B/test-models NIBBLE_SHARED_DIR=$PWD/.gpu-shared NIBBLE_GOLDEN_DIR=$PWD/tests/golden
C=$PWD/.gpu-shared/models/configs/internlm2-chat-7b.json
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $L/gpu.txt 2>&1
cupti=$(find /usr/local/cuda* /usr/lib /opt /usr/local/lib -name 'libcupti.so*' 2>/dev/null | head -1)
echo "cupti: $cupti" >> $L/summary.txt
TR=$B/bin/kernel_trace.so
hdr=$(find /usr/local/cuda* -name cupti.h 2>/dev/null | head -1)
if [[ -n "$hdr" && -n "$cupti" ]] && g++ -O2 -shared -fPIC -I$(dirname $hdr) -I/usr/local/cuda/include tests/gpu/kernel_trace.cc -o /tmp/kt.so -L$(dirname $cupti) -lcupti >> $L/summary.txt 2>&1; then TR=/tmp/kt.so; fi
echo "tracer: $TR" >> $L/summary.txt
export LD_LIBRARY_PATH=$(dirname "$cupti"):$LD_LIBRARY_PATH
# Each step within its own limit and the whole run's (RUN_BUDGET seconds, default 520): a step
# that would not fit is cut short, so the logs are always tarred before the device's limit.
deadline=$((SECONDS + ${RUN_BUDGET:-520}))
step() {
  local name=$1 secs=$2; shift 2
  local left=$((deadline - SECONDS)); (( left < secs )) && secs=$left
  (( secs < 5 )) && { echo "$name skipped (no time left)" >> $L/summary.txt; return; }
  local t0=$SECONDS; timeout $secs "$@" > $L/$name.log 2>&1
  echo "$name rc $? $((SECONDS - t0)) s" >> $L/summary.txt
}
step attention_test 120 $B/bin/attention_test
step engine_test 90 $B/bin/gpu_engine_test
step ops_test 60 $B/bin/ops_test
step w4a16_test 120 $B/bin/w4a16_test
step bench_base_1 100 $B/bin/gpu_engine_bench_base $C --storage w4 --batches 1,8,32,64 --ttft 0
step bench_new_1 100 $B/bin/gpu_engine_bench $C --storage w4 --batches 1,8,32,64 --ttft 0
NIBBLE_CUDA_FOLD_REDUCE=0 step bench_new_nofold 100 $B/bin/gpu_engine_bench $C --storage w4 --batches 32,64 --ttft 0
NIBBLE_KERNEL_TRACE=$L/trace.csv step bench_traced 90 env LD_PRELOAD=$TR $B/bin/gpu_engine_bench $C --storage w4 --batches 1,8,32 --new 64 --ttft 0
python3 tests/gpu/kernel_timeline.py $L/trace.csv --label "batches 1, 8, 32" > $L/timeline.md 2>&1
gzip $L/trace.csv
step attention_bench_new 60 $B/bin/attention_bench
step attention_bench_base 60 $B/bin/attention_bench_base
step bench_base_2 100 $B/bin/gpu_engine_bench_base $C --storage w4 --batches 1,8,32,64 --ttft 0
step bench_new_2 100 $B/bin/gpu_engine_bench $C --storage w4 --batches 1,8,32,64 --ttft 0
