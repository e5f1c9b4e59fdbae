#!/usr/bin/env bash
# run 30: the final check of main's head on one card, every GPU test and benchmark from binaries
# built on the dev machine (cmake --preset release -DCMAKE_CUDA_ARCHITECTURES=90, ninja, ctest
# once for the fixtures), packed with
#   tests/gpu/pack-prebuilt.sh build w4a16_repack_test w4a16_test ops_test attention_test \
#     sampling_test gpu_engine_test gpu_awq_test gpu_engine_bench w4a16_bench attention_bench
# and called with carry [".gpu-deps", ".gpu-shared", ".gpu-prebuilt"]:
#   RUN_BUDGET=540 bash tests/gpu/results/run30_script.sh   (timeout ~590 s)
# Order: the tests, the end-to-end table (W4A16 and fp16, batches 1/8/32/64, time to first
# token), the W4A16 kernel table with its cuBLAS and torch int4 peers, the attention table.
summarize() {
  grep -h "^|\|copy" $L/bench_engine.log 2>/dev/null
  tail -n 40 $L/torch_summary.log 2>/dev/null
}
source tests/gpu/device_steps.sh
step w4a16_repack_test 20 $B/bin/w4a16_repack_test
step w4a16_test 40 $B/bin/w4a16_test
step ops_test 30 $B/bin/ops_test
step attention_test 60 $B/bin/attention_test
step sampling_test 40 $B/bin/sampling_test
step gpu_engine_test 40 $B/bin/gpu_engine_test
step gpu_awq_test 40 $B/bin/gpu_awq_test
step bench_engine 130 $B/bin/gpu_engine_bench $C --storage w4,fp16 --batches 1,8,32,64 --ttft 2048
step w4a16_bench 150 $B/bin/w4a16_bench $L/bench.csv $L/variants.csv
step torch_summary 120 env PYTHONUNBUFFERED=1 python3 tests/gpu/torch_int4_bench.py $L/bench.csv $L/summary.md $L/variants.csv
step attention_bench 20 $B/bin/attention_bench
