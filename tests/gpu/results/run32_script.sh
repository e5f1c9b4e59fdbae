#!/usr/bin/env bash
# run 32: the AWQ job on main's final code (tests/gpu/awq_bench.sh, internlm2-chat-7b shapes,
# 128 x 2048 WikiText-2 tokens), 12 of the 32 layers (the session's device time left no room
# for the whole job's ~5 minutes): per-layer phase times and peak memory against run 3 (awq4).
# `nibble` built on the dev machine (sm_90) and packed: tests/gpu/pack-prebuilt.sh build nibble;
# carry [".gpu-deps", ".gpu-shared", ".gpu-prebuilt"]; RUN_BUDGET=300 bash tests/gpu/results/run32_script.sh
source tests/gpu/device_steps.sh
step awq_job 280 env BUILD_DIR=$B NIBBLE_BENCH_LAYERS=12 NIBBLE_BENCH_TIMEOUT=220 tests/gpu/awq_bench.sh
summarize() { cat $L/awq_job.log; }
