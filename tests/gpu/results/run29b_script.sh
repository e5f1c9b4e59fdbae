#!/usr/bin/env bash
# run 29b (prepared in the tenth session, run in the eleventh: results/run29b_*; every change
# lost or did nothing, none is on main; RESULTS.md "Run 29b").
# It measures tests/gpu/results/run29b.patch (NOTES.md "Run 29"): the decode products'
# activation lines asked into L1 after the PDL wait (w4a16.cu), the rotary angles and cache row
# before the attention's wait (attention.cu), NIBBLE_CUDA_O_WARPS and NIBBLE_CUDA_GATE_UP_WARPS
# (engine: the o and gate/up products' warps per block). To prepare, on the
# dev machine from main (build configured for sm_90, ctest run once):
#   ninja -C build && for b in gpu_engine_bench w4a16_bench; do cp build/bin/$b build/bin/${b}_main; done
#   git apply --include='kernels/cuda/attention*' --include='engine/*' tests/gpu/results/run29b.patch
#   ninja -C build bin/gpu_engine_bench && cp build/bin/gpu_engine_bench build/bin/gpu_engine_bench_noxpf
#   git apply --include='kernels/cuda/w4a16.cu' tests/gpu/results/run29b.patch && ninja -C build
#   tests/gpu/pack-prebuilt.sh build w4a16_test gpu_engine_test w4a16_bench_main w4a16_bench \
#     gpu_engine_bench_main gpu_engine_bench gpu_engine_bench_noxpf attention_test kernel_trace.so
# (kernel_trace.so: g++ -O2 -shared -fPIC tests/gpu/kernel_trace.cc against CUPTI, as
# kernel_trace.cc's header says), then call with carry [".gpu-deps", ".gpu-shared",
# ".gpu-prebuilt"]: RUN_BUDGET=420 bash tests/gpu/results/run29b_script.sh (timeout ~470 s;
# the steps run most important first, so a smaller budget cuts the least useful).
summarize() {
  for f in $L/w4a16_bench_*.log; do [[ -e $f ]] && { echo "== $f"; grep -h "ringpdl" $f | head -24; }; done
  cat $L/traced_new.md 2>/dev/null
}
source tests/gpu/device_steps.sh
step w4a16_test 40 $B/bin/w4a16_test
step attention_test 50 $B/bin/attention_test
A="$C --storage w4 --batches 1,8 --ttft 0"
step bench_1_main 60 $B/bin/gpu_engine_bench_main $A
step bench_2_new 60 $B/bin/gpu_engine_bench $A
step bench_3_o8 60 env NIBBLE_CUDA_O_WARPS=8 $B/bin/gpu_engine_bench $A
step bench_4_noxpf 60 $B/bin/gpu_engine_bench_noxpf $A
step bench_5_main 60 $B/bin/gpu_engine_bench_main $A
step bench_6_gu2 60 env NIBBLE_CUDA_GATE_UP_WARPS=2 $B/bin/gpu_engine_bench $A
step bench_7_gu8 60 env NIBBLE_CUDA_GATE_UP_WARPS=8 $B/bin/gpu_engine_bench $A
step gpu_engine_test 40 $B/bin/gpu_engine_test
step w4a16_bench_new 45 $B/bin/w4a16_bench $L/w4a16_new.csv $L/w4a16_new_variants.csv --decode
step w4a16_bench_main 45 $B/bin/w4a16_bench_main $L/w4a16_main.csv $L/w4a16_main_variants.csv --decode
trace_step traced_new 60 $B/bin/gpu_engine_bench $C --storage w4 --batches 1 --new 32 --ttft 0
