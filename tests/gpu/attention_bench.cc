// Decode attention benchmark at internlm2-chat-7b's attention shape (32 query heads, 8 kv heads,
// head_dim 128, blocks of 128 positions: the engine's default cache_block_seq_len), contexts
// 1k / 4k / 16k, batch 1 and 16, and 384 (gpu_engine_bench's longest) at batch 1 and 8, beside
// the floor (K and V read once + q + out) at the device-to-device copy bandwidth measured in the
// same run. Where the splits can combine in a cluster (sm_90, <= 16 splits: the plan's
// cluster_fits), both ways are timed (the planner takes the cluster for small grids only).
//
// Timing: a CUDA graph of one call per layer (split + combine kernels, or the split kernel alone) over L layer views of a
// pool of >= 512 MB (so nothing sits in the 50 MB L2 between calls; L = 2 .. 64), 20 replays
// after 3 warm-ups, each timed with events; the median replay / L is the time per call.
// Prints one line per shape and a markdown table (also written to argv[1] when given).
//
// Prefill (PagedPrefillAttention) at the same shape: one 2048-token prompt (start 0) and a
// 1024-token chunk after 1024 cached positions, blocks of 128 at shuffled ids, against the way
// the CUDA backend runs prefill today (PagedDecodeAttention with every query token its own
// sequence: row-expanded block tables, length position + 1). One layer's pool (K and V stay in
// L2, as after the engine's RoPE stores them); 3 warm-ups, the median of 20 event-timed calls, for
// tiles of 64 and of 128 rows (the speedup column: the plan's default tile).
// TFLOP/s counts the causal work only (4 * head_dim * heads per visible (query, key) pair).
// The two outputs are compared (||prefill - decode|| / ||decode||) as a sanity check. `attention_bench
// --prefill` runs this part alone.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/attention.h"
#include "tests/gpu/compare.h"
#include "tests/gpu/device_buffer.h"
#include "tests/gpu/timing.h"

namespace cu = nibble::kernels::cuda;
using nibble::testing::CopyBandwidth;
using nibble::testing::DeviceBuffer;
using nibble::testing::TimeUs;
using nibble::testing::RandomHalf;

namespace {

// The prefill section: returns its markdown table.
std::string PrefillBench(cudaStream_t stream) {
  const int64_t heads = 32, kv_heads = 8, d = 128, bsl = 128;
  const int64_t kv_dim = kv_heads * d;
  std::mt19937 rng(4321);
  std::string table =
      "| case | tokens | tile 64 µs | TFLOP/s | tile 128 µs | TFLOP/s | decode-per-row µs | "
      "speedup (default tile) | rel. L2 diff |\n"
      "|---|---|---|---|---|---|---|---|---|\n";
  struct Case {
    const char* name;
    int start, tokens;
  };
  for (const Case& c : {Case{"prompt 2048", 0, 2048}, Case{"chunk 1024 after 1024", 1024, 1024}}) {
    const int64_t end = c.start + c.tokens;
    const int64_t blocks = (end + bsl - 1) / bsl;
    const int64_t block_elems = 2 * bsl * kv_dim;  // one layer
    DeviceBuffer<uint16_t> pool(blocks * block_elems);
    const auto pool_h = RandomHalf(rng, pool.count(), -1.0f, 1.0f);
    pool.CopyFrom(pool_h.data());
    std::vector<int32_t> ids(blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    const auto q = RandomHalf(rng, c.tokens * heads * d, -2.0f, 2.0f);
    DeviceBuffer<uint16_t> dq(q.size()), out_prefill(q.size()), out_decode(q.size());
    dq.CopyFrom(q.data());
    cu::PagedKvView view;
    view.keys = pool.get();
    view.values = view.keys + bsl * kv_dim;
    view.block_stride = block_elems;
    view.block_seq_len = static_cast<int32_t>(bsl);

    // The new kernel: one span, tiles of 64 and of 128 rows.
    const int32_t first_row = 0, start = c.start, tokens = c.tokens;
    DeviceBuffer<int32_t> dfirst(1), dstart(1), dtokens(1), dids(ids.size());
    dfirst.CopyFrom(&first_row);
    dstart.CopyFrom(&start);
    dtokens.CopyFrom(&tokens);
    dids.CopyFrom(ids.data());
    cu::PrefillSpanTable spans;
    spans.first_row = dfirst.get();
    spans.start = dstart.get();
    spans.tokens = dtokens.get();
    spans.block_tables = dids.get();
    spans.block_table_stride = blocks;
    double t_tile[2];
    for (int k = 0; k < 2; ++k) {
      cu::PrefillAttentionPlan pplan;
      NIBBLE_TEST_CUDA_CHECK(cu::PlanPagedPrefillAttention({heads, kv_heads, d}, c.tokens, 1, &pplan, 64 << k));
      t_tile[k] = TimeUs(stream, 20, [&] {
        NIBBLE_TEST_CUDA_CHECK(cu::PagedPrefillAttention(pplan, dq.get(), view, spans, 1,
                                                         out_prefill.get(), stream));
      });
    }
    cu::PrefillAttentionPlan dplan_default;
    NIBBLE_TEST_CUDA_CHECK(cu::PlanPagedPrefillAttention({heads, kv_heads, d}, c.tokens, 1, &dplan_default));
    const double t_prefill = dplan_default.tile_rows == 128 ? t_tile[1] : t_tile[0];

    // Today's way: every row a decode sequence.
    std::vector<int32_t> row_tables(c.tokens * blocks), lens(c.tokens);
    for (int64_t t = 0; t < c.tokens; ++t) {
      std::copy(ids.begin(), ids.end(), row_tables.begin() + t * blocks);
      lens[t] = static_cast<int32_t>(c.start + t + 1);
    }
    DeviceBuffer<int32_t> drow_tables(row_tables.size()), dlens(lens.size());
    drow_tables.CopyFrom(row_tables.data());
    dlens.CopyFrom(lens.data());
    cu::DecodeAttentionPlan dplan;
    NIBBLE_TEST_CUDA_CHECK(cu::PlanPagedDecodeAttention({heads, kv_heads, d}, c.tokens, end, &dplan));
    DeviceBuffer<char> ws(std::max<int64_t>(dplan.workspace_bytes, 16));
    const double t_decode = TimeUs(stream, 20, [&] {
      NIBBLE_TEST_CUDA_CHECK(cu::PagedDecodeAttention(dplan, dq.get(), view, drow_tables.get(), blocks,
                                                      dlens.get(), c.tokens, ws.get(),
                                                      out_decode.get(), stream));
    });
    NIBBLE_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));

    // Sanity: the two outputs agree.
    std::vector<uint16_t> a(q.size()), b(q.size());
    out_prefill.CopyTo(a.data());
    out_decode.CopyTo(b.data());
    const auto af = nibble::testing::ToFloat(a), bf = nibble::testing::ToFloat(b);
    double ss = 0, ss_err = 0;
    for (size_t i = 0; i < af.size(); ++i) {
      ss += static_cast<double>(bf[i]) * bf[i];
      const double e = static_cast<double>(af[i]) - bf[i];
      ss_err += std::isfinite(e) ? e * e : INFINITY;
    }
    const double diff = std::sqrt(ss_err / ss);  // ||prefill - decode|| / ||decode||

    double pairs = 0;  // visible (query, key) pairs
    for (int64_t t = 0; t < c.tokens; ++t) pairs += static_cast<double>(c.start + t + 1);
    const double flop = 4.0 * d * heads * pairs;
    const double tf64 = flop / (t_tile[0] * 1e-6) / 1e12, tf128 = flop / (t_tile[1] * 1e-6) / 1e12;
    const double tf_decode = flop / (t_decode * 1e-6) / 1e12;
    std::printf("prefill attention 32/8 heads d=128 block=128 %s: tile 64 %.1f us (%.1f TFLOP/s), "
                "tile 128 %.1f us (%.1f TFLOP/s); decode kernel per row %.1f us (%.1f TFLOP/s, "
                "split %d x %d): %.1fx with the default tile (%d); relative L2 diff %.2e\n",
                c.name, t_tile[0], tf64, t_tile[1], tf128, t_decode, tf_decode, dplan.split_tokens,
                dplan.max_splits, t_decode / t_prefill, dplan_default.tile_rows, diff);
    char line[256];
    std::snprintf(line, sizeof line, "| %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1fx | %.1e |\n",
                  c.name, c.tokens, t_tile[0], tf64, t_tile[1], tf128, t_decode, t_decode / t_prefill, diff);
    table += line;
  }
  return table;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--prefill") {
    cudaStream_t stream;
    NIBBLE_TEST_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const std::string prefill = PrefillBench(stream);
    std::printf("\nPREFILL ATTENTION (one layer, 32/8 heads, d=128, blocks of 128)\n%s", prefill.c_str());
    NIBBLE_TEST_CUDA_CHECK(cudaStreamDestroy(stream));
    return 0;
  }
  const int64_t heads = 32, kv_heads = 8, d = 128, bsl = 128;
  const int64_t kv_dim = kv_heads * d;
  cudaStream_t stream;
  NIBBLE_TEST_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double copy_gbs = CopyBandwidth(stream);
  std::printf("copy bandwidth (1 GiB D2D, read + write): %.0f GB/s\n", copy_gbs);
  std::mt19937 rng(1234);
  std::string table =
      "| context | batch | split × splits | combine | µs / call | GB/s | % copy BW | floor µs |\n"
      "|---|---|---|---|---|---|---|---|\n";
  for (int64_t ctx : {384, 1024, 4096, 16384}) {
    for (int64_t batch : {1, ctx == 384 ? 8 : 16}) {
      const int64_t blocks_per_seq = (ctx + bsl - 1) / bsl;
      const int64_t layer_bytes = batch * ctx * kv_dim * 2 * 2;
      const int64_t layers = std::clamp<int64_t>((int64_t{512} << 20) / layer_bytes + 1, 2, 64);
      const int64_t num_blocks = batch * blocks_per_seq;
      const int64_t block_elems = 2 * layers * bsl * kv_dim;
      DeviceBuffer<uint16_t> pool(num_blocks * block_elems);
      {  // random fp16 in [-1, 1], written a block at a time (the pool is up to 2 GB)
        const auto chunk = RandomHalf(rng, block_elems, -1.0f, 1.0f);
        for (int64_t b = 0; b < num_blocks; ++b) {
          NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(pool.get() + b * block_elems, chunk.data(),
                                            block_elems * 2, cudaMemcpyHostToDevice));
        }
      }
      std::vector<int32_t> ids(num_blocks);
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      std::vector<int32_t> lens(batch, static_cast<int32_t>(ctx));
      DeviceBuffer<int32_t> dtables(ids.size()), dlens(batch);
      dtables.CopyFrom(ids.data());
      dlens.CopyFrom(lens.data());
      const auto q = RandomHalf(rng, batch * heads * d, -2.0f, 2.0f);
      DeviceBuffer<uint16_t> dq(q.size()), dout(q.size());
      dq.CopyFrom(q.data());
      cu::DecodeAttentionPlan planned;
      NIBBLE_TEST_CUDA_CHECK(cu::PlanPagedDecodeAttention({heads, kv_heads, d}, batch, ctx, &planned));
      DeviceBuffer<char> ws(std::max<int64_t>(planned.workspace_bytes, 1));
      for (bool cluster : {true, false}) {
        if (cluster && !planned.cluster_fits) continue;
        cu::DecodeAttentionPlan plan = planned;
        plan.combine_in_cluster = cluster;
        const char* combine = plan.max_splits == 1 ? "none" : cluster ? "cluster" : "kernel";

        cudaGraph_t graph;
        cudaGraphExec_t exec;
        NIBBLE_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        for (int64_t l = 0; l < layers; ++l) {
          cu::PagedKvView view;
          view.keys = pool.get() + 2 * l * bsl * kv_dim;
          view.values = view.keys + bsl * kv_dim;
          view.block_stride = block_elems;
          view.block_seq_len = static_cast<int32_t>(bsl);
          NIBBLE_TEST_CUDA_CHECK(cu::PagedDecodeAttention(plan, dq.get(), view, dtables.get(),
                                                          blocks_per_seq, dlens.get(), batch,
                                                          ws.get(), dout.get(), stream));
        }
        NIBBLE_TEST_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
        NIBBLE_TEST_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        const double t =
            TimeUs(stream, 20, [&] { NIBBLE_TEST_CUDA_CHECK(cudaGraphLaunch(exec, stream)); }) / layers;
        NIBBLE_TEST_CUDA_CHECK(cudaGetLastError());
        const double bytes = static_cast<double>(layer_bytes) + 2.0 * batch * heads * d * 2;
        const double gbs = bytes / (t * 1e-6) / 1e9;
        const double floor_us = bytes / (copy_gbs * 1e9) * 1e6;
        std::printf("decode attention 32/8 heads d=128 block=128 ctx=%lld batch=%lld: %.2f us/call "
                    "(split %d x %d, combine %s, %lld layers in the graph), %.0f GB/s = %.0f%% of copy, "
                    "floor %.2f us\n",
                    static_cast<long long>(ctx), static_cast<long long>(batch), t, plan.split_tokens,
                    plan.max_splits, combine, static_cast<long long>(layers), gbs,
                    100.0 * gbs / copy_gbs, floor_us);
        char line[256];
        std::snprintf(line, sizeof line, "| %lld | %lld | %d × %d | %s | %.2f | %.0f | %.0f%% | %.2f |\n",
                      static_cast<long long>(ctx), static_cast<long long>(batch), plan.split_tokens,
                      plan.max_splits, combine, t, gbs, 100.0 * gbs / copy_gbs, floor_us);
        table += line;
        NIBBLE_TEST_CUDA_CHECK(cudaGraphExecDestroy(exec));
        NIBBLE_TEST_CUDA_CHECK(cudaGraphDestroy(graph));
      }
    }
  }
  const std::string prefill = PrefillBench(stream);
  std::printf("\nDECODE ATTENTION (copy ceiling %.0f GB/s; bytes = K + V read once + q + out; CUDA-graph replays)\n%s",
              copy_gbs, table.c_str());
  std::printf("\nPREFILL ATTENTION (one layer, 32/8 heads, d=128, blocks of 128)\n%s", prefill.c_str());
  if (argc > 1) {
    if (FILE* f = std::fopen(argv[1], "w")) {
      std::fprintf(f, "copy %.0f GB/s\n%s\n%s", copy_gbs, table.c_str(), prefill.c_str());
      std::fclose(f);
    }
  }
  NIBBLE_TEST_CUDA_CHECK(cudaStreamDestroy(stream));
  return 0;
}
