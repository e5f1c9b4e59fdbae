#!/usr/bin/env bash
# run 33: the device sampler's 64-bit bin sums through 32-bit shared atomics (SharedAdd64) and
# count selections adding counts only, against main's sampler (f728030) in the same run, then
# top-p end to end. Built on the dev machine (sm_90): f728030's sampling_test and
# gpu_engine_bench copied to *_main, then this change;
#   tests/gpu/pack-prebuilt.sh build sampling_test sampling_test_main gpu_engine_test gpu_engine_bench
# carry [".gpu-deps", ".gpu-shared", ".gpu-prebuilt"]; RUN_BUDGET=120 bash tests/gpu/results/run33_script.sh
summarize() {
  for f in $L/sampling_test*.log $L/sampling_main.log; do [[ -e $f ]] && { echo "== $(basename $f)"; grep "^bench sample" $f; }; done
}
source tests/gpu/device_steps.sh
step sampling_test 30 $B/bin/sampling_test
step sampling_main 30 $B/bin/sampling_test_main
step gpu_engine_test 40 $B/bin/gpu_engine_test
step bench_new_t08p09 60 $B/bin/gpu_engine_bench $C --storage w4 --batches 1,8 --ttft 0 --temperature 0.8 --top-p 0.9
