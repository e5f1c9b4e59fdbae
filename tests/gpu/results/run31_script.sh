#!/usr/bin/env bash
# run 31: the device sampler's full-row passes with loads in flight (kernels/cuda/sampling.cu:
# kRowLoadsInFlight), against main's sampler in the same run, and what sampling costs end to
# end (gpu_engine_bench --temperature / --top-p). Binaries built on the dev machine (sm_90):
# main's sampling_test and gpu_engine_bench (with the bench flags) copied to *_main before the
# sampler change, then
#   tests/gpu/pack-prebuilt.sh build sampling_test sampling_test_main gpu_engine_test \
#     gpu_engine_bench gpu_engine_bench_main
# carry [".gpu-deps", ".gpu-shared", ".gpu-prebuilt"]; RUN_BUDGET=420 bash tests/gpu/results/run31_script.sh
summarize() {
  for f in $L/sampling_test*.log; do echo "== $(basename $f)"; grep "^bench sample" $f; done
}
source tests/gpu/device_steps.sh
step sampling_test 40 $B/bin/sampling_test
step gpu_engine_test 40 $B/bin/gpu_engine_test
step sampling_main 30 $B/bin/sampling_test_main
A="$C --storage w4 --batches 1,8,64 --ttft 0"
step bench_1_main_t08p09 60 $B/bin/gpu_engine_bench_main $A --temperature 0.8 --top-p 0.9
step bench_2_new_t08p09 60 $B/bin/gpu_engine_bench $A --temperature 0.8 --top-p 0.9
step bench_3_new_t08 60 $B/bin/gpu_engine_bench $A --temperature 0.8
step bench_4_main_t08 60 $B/bin/gpu_engine_bench_main $A --temperature 0.8
step bench_5_new_greedy 60 $B/bin/gpu_engine_bench $A
step bench_6_new_t08k40p09 60 $B/bin/gpu_engine_bench $A --temperature 0.8 --top-k 40 --top-p 0.9
