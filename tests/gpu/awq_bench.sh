#!/usr/bin/env bash
# The AWQ job on the GPU at a real model's size: `nibble synth` writes an fp16 model with
# internlm2-chat-7b's shapes (random weights: the job's time and memory depend on the shapes,
# not the values), then `nibble quantize --device cuda` runs the whole job on it as a user
# would (128 x 2048 calibration tokens of WikiText-2: the PTB split in ../shared, ptb.valid,
# holds only 49 such windows under the Llama-2 tokenizer; the per-layer checkpoint, packing,
# writing),
# with the evaluation off (it loads the fp16 model whole onto the device: not the search's
# memory). Prints the job's time per phase, the search's peak device memory (cudaMemGetInfo,
# the CUDA context included) beside nvidia-smi's peak seen every 0.5 s, and the fp16 model's
# size, which is what a search that loads the model whole would need at least.
#   tests/gpu/awq_bench.sh [CONFIG.json]     after tests/gpu/run.sh --full (BUILD_DIR's nibble)
#   NIBBLE_BENCH_LAYERS=N (default: the config's), NIBBLE_BENCH_SAMPLES=S (default 128),
#   NIBBLE_BENCH_CALIB=NAME (default wikitext2), NIBBLE_BENCH_TIMEOUT=S (the job's limit, default
#   540: the summary is printed even when the job is stopped there).
# Logs: $OUT (else $WORK) awq_bench.log and smi.txt (nvidia-smi's samples).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD="${BUILD_DIR:-build-gpu-full}"
DATA="${NIBBLE_SHARED_DIR:-$PWD/.gpu-shared}"
WORK="${NIBBLE_BENCH_DIR:-/tmp/nibble-awq-bench}"
CONFIG="${1:-$DATA/models/configs/internlm2-chat-7b.json}"
SAMPLES="${NIBBLE_BENCH_SAMPLES:-128}"
LOGS="${OUT:-$WORK}"
p="${NIBBLE_DEPS_PREFIX:-/opt/nibble-deps}"
# shellcheck disable=SC1091
[[ -f "$p/env.sh" ]] && source "$p/env.sh"
rm -rf "$WORK"
mkdir -p "$WORK" "$LOGS"
log="$LOGS/awq_bench.log"
layers=()
[[ -n "${NIBBLE_BENCH_LAYERS:-}" ]] && layers=(--layers "$NIBBLE_BENCH_LAYERS")
t0=$SECONDS
"$BUILD/bin/nibble" synth --config "$CONFIG" --tokenizer "$DATA/models/llama2-tokenizer/tokenizer.model" \
  --out "$WORK/model" "${layers[@]}" > "$log" 2>&1
synth_s=$((SECONDS - t0))
fp16_bytes=$(du -sb "$WORK/model" | cut -f1)
# nvidia-smi's view of the card while the job runs (all processes).
(while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.5; done) \
  > "$LOGS/smi.txt" 2>/dev/null &
smi=$!
t1=$SECONDS
rc=0
timeout "${NIBBLE_BENCH_TIMEOUT:-540}" \
  "$BUILD/bin/nibble" quantize "$WORK/model" --work-dir "$WORK/awq" --device cuda \
  --calib-dataset "${NIBBLE_BENCH_CALIB:-wikitext2}" --datasets-dir "$DATA/datasets" --calib-samples "$SAMPLES" \
  --calib-seqlen 2048 --eval-dataset none >> "$log" 2>&1 || rc=$?
job_s=$((SECONDS - t1))
kill "$smi" 2>/dev/null || true
smi_peak=$(sort -n "$LOGS/smi.txt" | tail -1)
echo "== AWQ job on the GPU =="
echo "card: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "model: $(basename "$CONFIG") ${NIBBLE_BENCH_LAYERS:-all} layers, fp16 size $(awk -v b="$fp16_bytes" 'BEGIN{printf "%.2f GiB", b/2^30}'), synth $synth_s s"
echo "calibration: ${NIBBLE_BENCH_CALIB:-wikitext2}, $SAMPLES x 2048 tokens"
echo "quantize: exit $rc, $job_s s wall"
grep -E "^calibration|^wrote|^search:|error|layer done" "$log" | tail -12 || true
# Each search step's time: from its progress line to the next line (per layer, averaged).
awk '/^\[[0-9]+\/[0-9]+\] layer [0-9]+: / {
       match($0, /elapsed [0-9.]+s/); t = substr($0, RSTART + 8, RLENGTH - 9) + 0
       if (step != "") { sum[step] += t - last; n[step]++ }
       sub(/^\[[0-9]+\/[0-9]+\] layer [0-9]+: /, ""); sub(/  elapsed.*/, ""); step = $0; last = t
       if (first == "") first = t
       next }
     step != "" && /elapsed/ { match($0, /elapsed [0-9.]+s/); t = substr($0, RSTART + 8, RLENGTH - 9) + 0
       sum[step] += t - last; n[step]++; step = "" }
     END { if (first != "") printf "before the first layer: %.1f s\n", first
           for (s in sum) printf "per layer, %s: %.2f s (%d layers)\n", s, sum[s] / n[s], n[s] }' "$log" || true
echo "nvidia-smi peak memory.used: ${smi_peak:-?} MiB"
if [[ -f "$WORK/awq/nibble_manifest.json" ]]; then
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('phases (s):', m['report']['seconds'])" \
    "$WORK/awq/nibble_manifest.json" || true
  echo "artifact: $(du -sh "$WORK/awq" | cut -f1)"
fi
rm -rf "$WORK/model" "$WORK/awq"
exit "$rc"

