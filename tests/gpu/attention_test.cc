// kernels/cuda/attention.h (paged decode attention) against kernels/cpu/attention.h
// PagedCausalAttention (fp32, on the same fp16 q, keys and values upcast; a span of one token
// at position len - 1 per sequence). Plain executable: one PASS or FAIL line per case, exit
// status 1 on any failure. Fresh random inputs every run (seed printed; attention_test SEED;
// attention_test SEED prefill runs the prefill cases alone, SEED prefill-quick a few of them).
//
// The pool has the engine's block layout ([block][layer][K | V][block_seq_len][kv_dim], 2
// layers, layer 1 tested), each sequence's blocks at shuffled ids; every pool row no sequence
// may read (the other layer, positions past a sequence's length in its last block, spare
// blocks) is NaN, so a read outside the visible positions shows. out is NaN before every launch.
// Cases: head_dim 8 / 64 / 128 with groups 1, 2, 3, 4, 6, 8, 10 (> 8: two blocks per kv head),
// block sizes 16 / 64 / 128 (8 and 16 with splits of 512), one batch of sequences of lengths 1, 7, 129, 4097 (and 3 of them
// for the short plans), split sizes auto, 32, 64, 512 and one split (the direct path,
// max length <= 512); a length outside [1, max_seq_len] must give a NaN row.
//
// Tolerance: the output is the fp32 result rounded once to fp16 (2^-11 relative); scores,
// softmax and sums in fp32 in another order than the reference (~1e-6 relative). Per element
// |out - ref| <= 1e-3 |ref| + 1e-4 rms(ref) (long sequences average the values towards 0: the
// rms term), and ||out - ref|| / ||ref|| <= 1e-3.
//
// Prefill (PagedPrefillAttention) against the same reference with spans of many tokens: each
// case a batch of spans of one shape, starts 0 and > 0 (a chunk after cached tokens), lengths
// 1, 17, 64, 200, 300, 1000, ... in the same pool layout (NaN wherever no span may read), block
// sizes 16, 48 and one block as long as the longest sequence, and 45 short spans (some empty).
// The spans' rows sit in q / out in reverse span order with one unused row after each
// (first_row is honoured; the unused rows of out must stay NaN, every span row must be
// written: out is NaN before the launch). A second launch into a fresh NaN buffer must give
// the same bits (no race). Shapes: head_dim 128 (groups 4, 1, 10), 64 (groups 4, 3, 1), 8
// (groups 2, 6, 1), and one 2048-token prompt at the 7B shape; all of it with tiles of 64 and
// of 128 rows. Tolerance: P (the softmax numerators) is rounded to fp16 for the tensor cores,
// a relative error <= 2^-11 per weight, so an output element may be off by up to
// 2^-11 sum_i w_i |v_i| (w the softmax weights: the reference run once more on |V|, ref_abs);
// the output's own rounding adds 2^-11 |ref|; everything else (fp32 order, exp2) is ~1e-6.
// Per element |out - ref| <= 1e-3 |ref| + 1.5 * 2^-11 ref_abs + 1e-6, and
// ||out - ref|| / ||ref|| <= 1e-3 (a global rms term would not do: one span holds rows of 1
// and of 2048 visible positions, whose outputs differ 30x in size).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/half.h"
#include "kernels/cuda/attention.h"
#include "tests/gpu/compare.h"
#include "tests/gpu/device_buffer.h"

namespace cu = nibble::kernels::cuda;
namespace cpu = nibble::kernels::cpu;
using nibble::testing::CheckClose;
using nibble::testing::DeviceBuffer;
using nibble::testing::kHalfNaN;
using nibble::testing::RandomHalf;
using nibble::testing::ToFloat;

namespace {

struct Shape {
  int64_t heads, kv_heads, d;
};

// split: 0 auto, > 0 forced.
int RunCase(std::mt19937& rng, const Shape& s, int bsl, const std::vector<int>& lens,
            int split, const char* split_name) {
  const int64_t layers = 2, layer = 1;
  const int64_t kv_dim = s.kv_heads * s.d;
  const int64_t block_elems = 2 * layers * bsl * kv_dim;
  const int64_t seqs = static_cast<int64_t>(lens.size());
  const int max_len = *std::max_element(lens.begin(), lens.end());
  const int64_t table_stride = (max_len + bsl - 1) / bsl + 1;  // one unused entry per row
  int64_t used = 0;
  for (int len : lens) used += (len + bsl - 1) / bsl;
  const int64_t num_blocks = used + 3;  // spare blocks nobody owns
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> tables(seqs * table_stride, -1);
  // Pool: NaN everywhere, then random values at the rows sequences may read.
  std::vector<uint16_t> pool(num_blocks * block_elems, kHalfNaN);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  int64_t next = 0;
  for (int64_t q = 0; q < seqs; ++q) {
    for (int64_t b = 0; b * bsl < lens[q]; ++b) {
      const int32_t id = ids[next++];
      tables[q * table_stride + b] = id;
      const int64_t rows = std::min<int64_t>(bsl, lens[q] - b * bsl);
      uint16_t* k = pool.data() + id * block_elems + 2 * layer * bsl * kv_dim;
      const auto kr = RandomHalf(rng, rows * kv_dim, -1.0f, 1.0f);
      const auto vr = RandomHalf(rng, rows * kv_dim, -1.0f, 1.0f);
      std::copy(kr.begin(), kr.end(), k);
      std::copy(vr.begin(), vr.end(), k + bsl * kv_dim);
    }
  }
  const auto q = RandomHalf(rng, seqs * s.heads * s.d, -2.0f, 2.0f);

  // Reference.
  std::vector<float> poolf = ToFloat(pool);
  const auto qf = ToFloat(q);
  std::vector<cpu::AttentionSpan> spans(seqs);
  for (int64_t i = 0; i < seqs; ++i) {
    spans[i].tokens = 1;
    spans[i].start = lens[i] - 1;
    spans[i].kv.keys = poolf.data() + 2 * layer * bsl * kv_dim;
    spans[i].kv.values = spans[i].kv.keys + bsl * kv_dim;
    spans[i].kv.block_table = tables.data() + i * table_stride;
    spans[i].kv.block_seq_len = bsl;
    spans[i].kv.block_stride = block_elems;
  }
  std::vector<float> ref(seqs * s.heads * s.d);
  cpu::PagedCausalAttention(qf.data(), spans.data(), seqs, {s.heads, s.kv_heads, s.d}, ref.data());

  // GPU.
  cu::DecodeAttentionPlan plan;
  NIBBLE_TEST_CUDA_CHECK(cu::PlanPagedDecodeAttention({s.heads, s.kv_heads, s.d}, seqs, max_len, &plan, split));
  DeviceBuffer<uint16_t> dpool(pool.size()), dq(q.size()), dout(q.size());
  DeviceBuffer<int32_t> dtables(tables.size()), dlens(seqs);
  DeviceBuffer<char> ws(std::max<int64_t>(plan.workspace_bytes, 1));
  dpool.CopyFrom(pool.data());
  dq.CopyFrom(q.data());
  dtables.CopyFrom(tables.data());
  dlens.CopyFrom(lens.data());
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(dout.get(), 0xff, dout.bytes()));
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(ws.get(), 0xff, ws.bytes()));
  cu::PagedKvView view;
  view.keys = dpool.get() + 2 * layer * bsl * kv_dim;
  view.values = view.keys + bsl * kv_dim;
  view.block_stride = block_elems;
  view.block_seq_len = bsl;
  NIBBLE_TEST_CUDA_CHECK(cu::PagedDecodeAttention(plan, dq.get(), view, dtables.get(), table_stride,
                                                  dlens.get(), seqs, ws.get(), dout.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> got(q.size());
  dout.CopyTo(got.data());
  std::string lens_s;
  for (int len : lens) {
    if (!lens_s.empty()) lens_s += ",";
    lens_s += std::to_string(len);
  }
  const std::string name = "decode_attention d=" + std::to_string(s.d) + " heads=" +
                           std::to_string(s.heads) + "/" + std::to_string(s.kv_heads) +
                           " block=" + std::to_string(bsl) + " lens=" + lens_s + " split=" +
                           split_name + "(" + std::to_string(plan.split_tokens) + "x" +
                           std::to_string(plan.max_splits) + ")";
  int fails = CheckClose(name, got, ref, 1e-3, 1e-4);

  // The contract on lengths: sequence 0 given max_len + 1 positions comes out NaN, the others
  // unchanged.
  std::vector<int> bad_lens = lens;
  bad_lens[0] = max_len + 1;
  dlens.CopyFrom(bad_lens.data());
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(dout.get(), 0xff, dout.bytes()));
  NIBBLE_TEST_CUDA_CHECK(cu::PagedDecodeAttention(plan, dq.get(), view, dtables.get(), table_stride,
                                                  dlens.get(), seqs, ws.get(), dout.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> got_bad(q.size());
  dout.CopyTo(got_bad.data());
  const int64_t row = s.heads * s.d;
  int64_t nan0 = 0, same = 0;
  for (int64_t i = 0; i < row; ++i) nan0 += (got_bad[i] & 0x7c00) == 0x7c00 && (got_bad[i] & 0x3ff) != 0;
  for (int64_t i = row; i < static_cast<int64_t>(got.size()); ++i) same += got_bad[i] == got[i];
  if (nan0 != row || same != static_cast<int64_t>(got.size()) - row) {
    std::printf("FAIL %s.bad_len: NaN %lld/%lld, others unchanged %lld/%lld\n", name.c_str(),
                static_cast<long long>(nan0), static_cast<long long>(row), static_cast<long long>(same),
                static_cast<long long>(got.size() - row));
    ++fails;
  }
  return fails;
}

struct SpanSpec {
  int start, tokens;
};

// Per element |got - ref| <= 1e-3 |ref| + 1.5 * 2^-11 ref_abs + 1e-6, every element finite, and
// ||got - ref|| / ||ref|| <= 1e-3. One PASS or FAIL line (CheckClose's format); 1 on failure.
int CheckPrefill(const std::string& name, const std::vector<uint16_t>& got,
                 const std::vector<float>& ref, const std::vector<float>& ref_abs) {
  double ss_ref = 0, ss_err = 0, worst = 0;
  size_t bad = 0, first_bad = ref.size();
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = nibble::kernels::cpu::HalfToFloat(got[i]);
    const double e = std::fabs(g - ref[i]);
    const double bound = 1e-3 * std::fabs(ref[i]) + 1.5 * std::ldexp(1.0, -11) * ref_abs[i] + 1e-6;
    ss_ref += static_cast<double>(ref[i]) * ref[i];
    if (!std::isfinite(g) || !(e <= bound)) {
      if (bad++ == 0) first_bad = i;
    }
    if (std::isfinite(g)) {
      ss_err += e * e;
      worst = std::max(worst, e / bound);
    }
  }
  const double norm_rel = ss_ref > 0 ? std::sqrt(ss_err / ss_ref) : std::sqrt(ss_err);
  const bool ok = bad == 0 && norm_rel <= 1e-3;
  std::printf("%s %s n=%zu rel=%.2e worst/bound=%.2f", ok ? "PASS" : "FAIL", name.c_str(),
              ref.size(), norm_rel, worst);
  if (bad > 0) {
    std::printf(" bad=%zu first=[%zu] got %g ref %g ref_abs %g", bad, first_bad,
                nibble::kernels::cpu::HalfToFloat(got[first_bad]), ref[first_bad], ref_abs[first_bad]);
  }
  std::printf("\n");
  return ok ? 0 : 1;
}

// bsl 0: one block as long as the longest sequence.
int RunPrefillCase(std::mt19937& rng, int tile_rows, const Shape& s, int bsl_arg,
                   const std::vector<SpanSpec>& specs) {
  const int64_t layers = 2, layer = 1;
  const int64_t kv_dim = s.kv_heads * s.d;
  const int64_t num_spans = static_cast<int64_t>(specs.size());
  int max_end = 0;
  int64_t total = 0;
  for (const SpanSpec& sp : specs) {
    max_end = std::max(max_end, sp.start + sp.tokens);
    total += sp.tokens;
  }
  const int bsl = bsl_arg > 0 ? bsl_arg : max_end;
  const int64_t block_elems = 2 * layers * bsl * kv_dim;
  const int64_t table_stride = (max_end + bsl - 1) / bsl + 1;  // one unused entry per row
  int64_t used = 0;
  for (const SpanSpec& sp : specs) used += (sp.start + sp.tokens + bsl - 1) / bsl;
  const int64_t num_blocks = used + 3;  // spare blocks nobody owns
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> tables(num_spans * table_stride, -1);
  std::vector<uint16_t> pool(num_blocks * block_elems, kHalfNaN);
  int64_t next = 0;
  for (int64_t i = 0; i < num_spans; ++i) {
    const int64_t end = specs[i].start + specs[i].tokens;
    for (int64_t b = 0; b * bsl < end; ++b) {
      const int32_t id = ids[next++];
      tables[i * table_stride + b] = id;
      const int64_t rows = std::min<int64_t>(bsl, end - b * bsl);
      uint16_t* k = pool.data() + id * block_elems + 2 * layer * bsl * kv_dim;
      const auto kr = RandomHalf(rng, rows * kv_dim, -1.0f, 1.0f);
      const auto vr = RandomHalf(rng, rows * kv_dim, -1.0f, 1.0f);
      std::copy(kr.begin(), kr.end(), k);
      std::copy(vr.begin(), vr.end(), k + bsl * kv_dim);
    }
  }
  // Rows: the last span first, one unused row after every span.
  std::vector<int32_t> first_row(num_spans), starts(num_spans), tokens(num_spans);
  int64_t n_rows = 0;
  for (int64_t i = num_spans - 1; i >= 0; --i) {
    first_row[i] = static_cast<int32_t>(n_rows);
    starts[i] = specs[i].start;
    tokens[i] = specs[i].tokens;
    n_rows += specs[i].tokens + 1;
  }
  const int64_t row_elems = s.heads * s.d;
  const auto q = RandomHalf(rng, n_rows * row_elems, -2.0f, 2.0f);

  // Reference, span by span, gathered in span order; ref_abs: the same weights on |V|.
  std::vector<float> poolf = ToFloat(pool);
  std::vector<float> pool_abs(poolf.size());
  std::transform(poolf.begin(), poolf.end(), pool_abs.begin(), [](float v) { return std::fabs(v); });
  const auto qf = ToFloat(q);
  std::vector<float> ref(total * row_elems), ref_abs(total * row_elems);
  for (int64_t i = 0, at = 0; i < num_spans; ++i) {
    cpu::AttentionSpan span;
    span.tokens = specs[i].tokens;
    span.start = specs[i].start;
    span.kv.keys = poolf.data() + 2 * layer * bsl * kv_dim;
    span.kv.values = span.kv.keys + bsl * kv_dim;
    span.kv.block_table = tables.data() + i * table_stride;
    span.kv.block_seq_len = bsl;
    span.kv.block_stride = block_elems;
    cpu::PagedCausalAttention(qf.data() + first_row[i] * row_elems, &span, 1,
                              {s.heads, s.kv_heads, s.d}, ref.data() + at);
    span.kv.values = pool_abs.data() + 2 * layer * bsl * kv_dim + bsl * kv_dim;
    cpu::PagedCausalAttention(qf.data() + first_row[i] * row_elems, &span, 1,
                              {s.heads, s.kv_heads, s.d}, ref_abs.data() + at);
    at += specs[i].tokens * row_elems;
  }

  // GPU.
  cu::PrefillAttentionPlan plan;
  NIBBLE_TEST_CUDA_CHECK(
      cu::PlanPagedPrefillAttention({s.heads, s.kv_heads, s.d}, total, num_spans, &plan, tile_rows));
  DeviceBuffer<uint16_t> dpool(pool.size()), dq(q.size()), dout(q.size()), dout2(q.size());
  DeviceBuffer<int32_t> dtables(tables.size()), dfirst(num_spans), dstart(num_spans), dtokens(num_spans);
  dpool.CopyFrom(pool.data());
  dq.CopyFrom(q.data());
  dtables.CopyFrom(tables.data());
  dfirst.CopyFrom(first_row.data());
  dstart.CopyFrom(starts.data());
  dtokens.CopyFrom(tokens.data());
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(dout.get(), 0xff, dout.bytes()));
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(dout2.get(), 0xff, dout2.bytes()));
  cu::PagedKvView view;
  view.keys = dpool.get() + 2 * layer * bsl * kv_dim;
  view.values = view.keys + bsl * kv_dim;
  view.block_stride = block_elems;
  view.block_seq_len = bsl;
  cu::PrefillSpanTable table;
  table.first_row = dfirst.get();
  table.start = dstart.get();
  table.tokens = dtokens.get();
  table.block_tables = dtables.get();
  table.block_table_stride = table_stride;
  NIBBLE_TEST_CUDA_CHECK(cu::PagedPrefillAttention(plan, dq.get(), view, table, num_spans, dout.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cu::PagedPrefillAttention(plan, dq.get(), view, table, num_spans, dout2.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> all(q.size()), all2(q.size());
  dout.CopyTo(all.data());
  dout2.CopyTo(all2.data());
  std::vector<uint16_t> got(total * row_elems);
  int64_t untouched = 0;
  for (int64_t i = 0, at = 0; i < num_spans; ++i) {
    const int64_t b = first_row[i] * row_elems, e = b + specs[i].tokens * row_elems;
    std::copy(all.begin() + b, all.begin() + e, got.begin() + at);
    at += e - b;
    for (int64_t k = e; k < e + row_elems; ++k) untouched += all[k] == kHalfNaN;  // the unused row
  }

  std::string spans_s;
  for (const SpanSpec& sp : specs) {
    if (!spans_s.empty()) spans_s += ",";
    spans_s += std::to_string(sp.start) + "+" + std::to_string(sp.tokens);
  }
  const std::string name = "prefill_attention tile=" + std::to_string(plan.tile_rows) +
                           " d=" + std::to_string(s.d) + " heads=" +
                           std::to_string(s.heads) + "/" + std::to_string(s.kv_heads) +
                           " block=" + std::to_string(bsl) + " spans(start+tokens)=" + spans_s;
  int fails = CheckPrefill(name, got, ref, ref_abs);
  const bool same = all == all2;
  if (untouched != num_spans * row_elems || !same) {
    std::printf("FAIL %s.rows: unused rows left NaN %lld/%lld, second launch bit-identical %s\n",
                name.c_str(), static_cast<long long>(untouched),
                static_cast<long long>(num_spans * row_elems), same ? "yes" : "NO");
    ++fails;
  }
  return fails;
}

}  // namespace

int main(int argc, char** argv) {
  const unsigned seed = nibble::testing::TestSeed(argc, argv, "attention_test");
  std::mt19937 rng(seed);
  const Shape shapes[] = {
      {32, 8, 128},  // internlm2-7b: group 4
      {40, 4, 128},  // group 10: two blocks of query heads per kv head
      {8, 8, 128},   // group 1
      {16, 2, 64},   // group 8
      {12, 4, 64},   // group 3
      {8, 4, 8},     // stories260K: group 2
      {6, 1, 8},     // group 6
  };
  int fails = 0, cases = 0;
  // attention_test SEED prefill: the prefill cases only; SEED prefill-quick: the mixed spans
  // at blocks of 16 only (for compute-sanitizer).
  const std::string mode = argc > 2 ? argv[2] : "";
  const bool quick = mode == "prefill-quick";
  const bool prefill_only = mode == "prefill" || quick;
  for (const Shape& s : shapes) {
    if (prefill_only) break;
    for (int bsl : {16, 64, 128}) {
      fails += RunCase(rng, s, bsl, {1, 7, 129, 4097}, 0, "auto");
      fails += RunCase(rng, s, bsl, {4097, 1, 129, 7}, 64, "64");
      // Splits of one round of loads at head size 128 (the kernel's EARLY variant there; the
      // 64- and 512-position splits of the cases around it are one round at 64 and 8).
      fails += RunCase(rng, s, bsl, {129, 4097, 7, 1}, 32, "32");
      fails += RunCase(rng, s, bsl, {7, 129, 1}, 512, "one");
      fails += RunCase(rng, s, bsl, {129, 7, 1}, 0, "auto");
      cases += 5;
    }
  }
  // The largest splits (512 positions) over small blocks (8, 16: 64 and 32 block ids a split).
  for (int bsl : {8, 16}) {
    if (prefill_only) break;
    fails += RunCase(rng, shapes[0], bsl, {4097, 1, 1500, 7}, 512, "512");
    fails += RunCase(rng, shapes[3], bsl, {4097, 1, 1500, 7}, 512, "512");
    cases += 2;
  }
  // Prefill.
  const Shape prefill_shapes[] = {
      {32, 8, 128},  // internlm2-7b: group 4
      {8, 8, 128},   // group 1
      {40, 4, 128},  // group 10: a tile of 64 rows ends inside a token
      {16, 4, 64},   // group 4
      {12, 4, 64},   // group 3
      {4, 4, 64},    // group 1
      {8, 4, 8},     // stories260K: group 2
      {6, 1, 8},     // group 6
      {4, 4, 8},     // group 1
  };
  const std::vector<SpanSpec> mixed = {{0, 200}, {0, 1}, {37, 17}, {300, 64}, {5, 1}, {64, 64}, {0, 3}};
  const std::vector<SpanSpec> chunks = {{700, 300}, {0, 129}, {1, 1000}};
  for (int tile : {64, 128}) {
    for (const Shape& s : prefill_shapes) {
      for (int bsl : {16, 48, 0}) {
        fails += RunPrefillCase(rng, tile, s, bsl, mixed);
        ++cases;
        if (quick) break;
      }
      if (quick) continue;
      fails += RunPrefillCase(rng, tile, s, 16, chunks);
      fails += RunPrefillCase(rng, tile, s, 0, {{1, 63}, {0, 65}});
      cases += 2;
    }
    // 45 spans (the kernel finds a block's span 32 spans at a time): lengths 1 .. 40, starts
    // 0 .. 150, some of them empty (tokens 0: skipped, their rows stay NaN).
    std::vector<SpanSpec> many(45);
    std::uniform_int_distribution<int> len(1, 40), st(0, 150);
    for (size_t i = 0; i < many.size(); ++i) many[i] = {i % 3 == 0 ? 0 : st(rng), i % 11 == 5 ? 0 : len(rng)};
    fails += RunPrefillCase(rng, tile, prefill_shapes[0], 16, many);
    fails += RunPrefillCase(rng, tile, prefill_shapes[6], 16, many);
    cases += 2;
    if (quick) continue;
    fails += RunPrefillCase(rng, tile, prefill_shapes[0], 128, {{0, 2048}});  // the benchmark's prompt
    fails += RunPrefillCase(rng, tile, prefill_shapes[0], 128, {{1024, 1024}});
    cases += 2;
  }
  std::printf("attention_test: %s, %d failure(s) in %d cases, seed %u\n", fails == 0 ? "PASS" : "FAIL",
              fails, cases, seed);
  return fails == 0 ? 0 : 1;
}
