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
#include "kernels/cpu/ops.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/ops.h"
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

// A 2-layer pool in the engine's block layout, layer 1 the one tested: each sequence's blocks
// at shuffled ids (one unused table entry per row, 3 spare blocks nobody owns), random values
// at the rows a sequence may read, NaN everywhere else.
struct TestPool {
  static constexpr int64_t kLayers = 2, kLayer = 1;
  int bsl = 0;
  int64_t kv_dim = 0, block_elems = 0, table_stride = 0;
  std::vector<int32_t> tables;
  std::vector<uint16_t> pool;
  // Offset of this layer's keys of position p of sequence q in `pool` (+ bsl * kv_dim: values).
  int64_t KeyRow(int64_t q, int64_t p) const {
    return tables[q * table_stride + p / bsl] * block_elems + 2 * kLayer * bsl * kv_dim +
           (p % bsl) * kv_dim;
  }
  // The tested layer's keys of block 0 in a device copy of `pool` (+ bsl * kv_dim: values).
  uint16_t* LayerKeys(uint16_t* device_pool) const { return device_pool + 2 * kLayer * bsl * kv_dim; }
  cu::PagedKvView View(uint16_t* device_pool) const {
    cu::PagedKvView view;
    view.keys = LayerKeys(device_pool);
    view.values = view.keys + bsl * kv_dim;
    view.block_stride = block_elems;
    view.block_seq_len = bsl;
    return view;
  }
  // The CPU reference's spans (one token at position len - 1 per sequence) over poolf.
  std::vector<cpu::AttentionSpan> Spans(std::vector<float>& poolf,
                                        const std::vector<int>& lens) const {
    std::vector<cpu::AttentionSpan> spans(lens.size());
    for (size_t i = 0; i < lens.size(); ++i) {
      spans[i].tokens = 1;
      spans[i].start = lens[i] - 1;
      spans[i].kv.keys = poolf.data() + 2 * kLayer * bsl * kv_dim;
      spans[i].kv.values = spans[i].kv.keys + bsl * kv_dim;
      spans[i].kv.block_table = tables.data() + i * table_stride;
      spans[i].kv.block_seq_len = bsl;
      spans[i].kv.block_stride = block_elems;
    }
    return spans;
  }
};

TestPool MakeTestPool(std::mt19937& rng, const Shape& s, int bsl, const std::vector<int>& lens) {
  TestPool p;
  p.bsl = bsl;
  p.kv_dim = s.kv_heads * s.d;
  p.block_elems = 2 * TestPool::kLayers * bsl * p.kv_dim;
  const int64_t seqs = static_cast<int64_t>(lens.size());
  const int max_len = *std::max_element(lens.begin(), lens.end());
  p.table_stride = (max_len + bsl - 1) / bsl + 1;
  int64_t used = 0;
  for (int len : lens) used += (len + bsl - 1) / bsl;
  const int64_t num_blocks = used + 3;
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  p.tables.assign(seqs * p.table_stride, -1);
  p.pool.assign(num_blocks * p.block_elems, kHalfNaN);
  int64_t next = 0;
  for (int64_t q = 0; q < seqs; ++q) {
    for (int64_t b = 0; b * bsl < lens[q]; ++b) {
      const int32_t id = ids[next++];
      p.tables[q * p.table_stride + b] = id;
      const int64_t rows = std::min<int64_t>(bsl, lens[q] - b * bsl);
      uint16_t* k = p.pool.data() + id * p.block_elems + 2 * TestPool::kLayer * bsl * p.kv_dim;
      const auto kr = RandomHalf(rng, rows * p.kv_dim, -1.0f, 1.0f);
      const auto vr = RandomHalf(rng, rows * p.kv_dim, -1.0f, 1.0f);
      std::copy(kr.begin(), kr.end(), k);
      std::copy(vr.begin(), vr.end(), k + bsl * p.kv_dim);
    }
  }
  return p;
}

std::string CaseName(const char* what, const Shape& s, int bsl, const std::vector<int>& lens,
                     const char* split_name, const cu::DecodeAttentionPlan& plan) {
  std::string lens_s;
  for (int len : lens) {
    if (!lens_s.empty()) lens_s += ",";
    lens_s += std::to_string(len);
  }
  return std::string(what) + " d=" + std::to_string(s.d) + " heads=" + std::to_string(s.heads) +
         "/" + std::to_string(s.kv_heads) + " block=" + std::to_string(bsl) + " lens=" + lens_s +
         " split=" + split_name + "(" + std::to_string(plan.split_tokens) + "x" +
         std::to_string(plan.max_splits) + (plan.combine_in_cluster ? " cluster" : "") + ")";
}

// `plan` with the splits combined inside a cluster wherever one fits (`cluster`), whatever the
// planner chose for speed, or by the combine kernel (!cluster).
cu::DecodeAttentionPlan WithCombine(cu::DecodeAttentionPlan plan, bool cluster) {
  plan.combine_in_cluster = cluster && plan.cluster_fits;
  return plan;
}

// The planner's cluster choices (attention.h): it fits exactly where the device has clusters
// (sm_90) and there are 2-16 splits; it is taken where the split grid has at most one block per
// multiprocessor. Prints and counts a failure otherwise.
int CheckClusterPlan(const std::string& name, const Shape& s, int64_t seqs,
                     const cu::DecodeAttentionPlan& plan) {
  int device = 0, major = 0, sms = 0;
  NIBBLE_TEST_CUDA_CHECK(cudaGetDevice(&device));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t group = s.heads / s.kv_heads, maxg = group <= 4 ? 4 : 8;
  const int64_t blocks = s.kv_heads * ((group + maxg - 1) / maxg) * seqs * plan.max_splits;
  const bool fits = major >= 9 && plan.max_splits > 1 && plan.max_splits <= 16;
  if (plan.cluster_fits == fits && plan.combine_in_cluster == (fits && blocks <= sms)) return 0;
  std::printf("FAIL %s.plan: cluster_fits %d, combine_in_cluster %d with %d splits, %lld blocks "
              "on sm_%d with %d multiprocessors\n", name.c_str(), plan.cluster_fits,
              plan.combine_in_cluster, plan.max_splits, static_cast<long long>(blocks), major, sms);
  return 1;
}

// The cluster's combine and the combine kernel gave different bits: prints and counts a failure.
int CheckSameCombine(const std::string& name, const std::vector<uint16_t>& cluster,
                     const std::vector<uint16_t>& kernel) {
  if (cluster == kernel) return 0;
  int64_t diff = 0;
  for (size_t i = 0; i < cluster.size(); ++i) diff += cluster[i] != kernel[i];
  std::printf("FAIL %s.cluster_vs_combine_kernel: %lld of %zu elements differ\n", name.c_str(),
              static_cast<long long>(diff), cluster.size());
  return 1;
}

// The contract on lengths (attention.h): with sequence 0 past the plan's maximum, its output row
// (bad[0, row)) is all NaN and every other element has good's bits.
struct BadLength {
  int64_t nan = 0, row = 0, same = 0, others = 0;
  bool ok() const { return nan == row && same == others; }
};
BadLength CountBadLength(const std::vector<uint16_t>& bad, const std::vector<uint16_t>& good,
                         int64_t row) {
  BadLength c;
  c.row = row;
  c.others = static_cast<int64_t>(good.size()) - row;
  for (int64_t i = 0; i < row; ++i) c.nan += (bad[i] & 0x7c00) == 0x7c00 && (bad[i] & 0x3ff) != 0;
  for (int64_t i = row; i < static_cast<int64_t>(good.size()); ++i) c.same += bad[i] == good[i];
  return c;
}

// split: 0 auto, > 0 forced.
int RunCase(std::mt19937& rng, const Shape& s, int bsl, const std::vector<int>& lens,
            int split, const char* split_name) {
  const TestPool tp = MakeTestPool(rng, s, bsl, lens);
  const std::vector<uint16_t>& pool = tp.pool;
  const std::vector<int32_t>& tables = tp.tables;
  const int64_t table_stride = tp.table_stride;
  const int64_t seqs = static_cast<int64_t>(lens.size());
  const int max_len = *std::max_element(lens.begin(), lens.end());
  const auto q = RandomHalf(rng, seqs * s.heads * s.d, -2.0f, 2.0f);

  // Reference.
  std::vector<float> poolf = ToFloat(pool);
  const auto qf = ToFloat(q);
  const std::vector<cpu::AttentionSpan> spans = tp.Spans(poolf, lens);
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
  const cu::PagedKvView view = tp.View(dpool.get());
  const auto run = [&](const cu::DecodeAttentionPlan& p) {
    NIBBLE_TEST_CUDA_CHECK(cudaMemset(dout.get(), 0xff, dout.bytes()));
    NIBBLE_TEST_CUDA_CHECK(cudaMemset(ws.get(), 0xff, ws.bytes()));
    NIBBLE_TEST_CUDA_CHECK(cu::PagedDecodeAttention(p, dq.get(), view, dtables.get(), table_stride,
                                                    dlens.get(), seqs, ws.get(), dout.get(), nullptr));
    NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<uint16_t> got(q.size());
    dout.CopyTo(got.data());
    return got;
  };
  // In a cluster wherever one fits (the planner takes it for small grids only), and there
  // also with the combine kernel: the same bits.
  const cu::DecodeAttentionPlan tested = WithCombine(plan, true);
  const std::vector<uint16_t> got = run(tested);
  const std::string name = CaseName("decode_attention", s, bsl, lens, split_name, tested);
  int fails = CheckClose(name, got, ref, 1e-3, 1e-4) + CheckClusterPlan(name, s, seqs, plan);
  if (tested.combine_in_cluster) fails += CheckSameCombine(name, got, run(WithCombine(plan, false)));

  // The contract on lengths: sequence 0 given max_len + 1 positions comes out NaN, the others
  // unchanged.
  std::vector<int> bad_lens = lens;
  bad_lens[0] = max_len + 1;
  dlens.CopyFrom(bad_lens.data());
  const std::vector<uint16_t> got_bad = run(tested);
  const BadLength c = CountBadLength(got_bad, got, s.heads * s.d);
  if (!c.ok()) {
    std::printf("FAIL %s.bad_len: NaN %lld/%lld, others unchanged %lld/%lld\n", name.c_str(),
                static_cast<long long>(c.nan), static_cast<long long>(c.row),
                static_cast<long long>(c.same), static_cast<long long>(c.others));
    ++fails;
  }
  return fails;
}

// PagedDecodeAttentionWithRope: the new token's q, k, v unrotated in a q/k/v buffer (rows of
// stride q_dim + 2 kv_dim + 8, two inverse-frequency tables, freq_index alternating; or, packed,
// q, k and v each in a region of its own with contiguous rows and no freq_index: table 0),
// its rows in the pool NaN (the kernel must not read them). Against (1) the two-kernel route on the
// GPU (RopeRotateHalf with its RopeKvStore, q gathered, PagedDecodeAttention with the combine
// kernel) on a copy of the same pool: the same bits in the output and in the whole pool, for
// the one-kernel route in a cluster wherever one fits and with the combine kernel, and the q/k/v
// buffer left as it was; (2) the CPU: RopeRotateHalf in fp32, k and q rounded to fp16, the key
// and value put in the pool, PagedCausalAttention (the rotations' fp16 roundings may differ by one ulp from the
// GPU's sincosf: 2e-3 relative, 2e-4 of the rms); (3) a length past the plan's maximum: NaN
// row, the other rows the same bits, and that sequence's new rows in the pool still NaN.
int RunRopeCase(std::mt19937& rng, const Shape& s, int bsl, const std::vector<int>& lens,
                int split, const char* split_name, bool packed = false) {
  TestPool tp = MakeTestPool(rng, s, bsl, lens);
  const int64_t seqs = static_cast<int64_t>(lens.size());
  const int max_len = *std::max_element(lens.begin(), lens.end());
  const int64_t q_dim = s.heads * s.d, kv_dim = tp.kv_dim, half = s.d / 2;
  // Where row i of q, k and v starts in the q/k/v buffer, and the rows' strides.
  const int64_t stride = q_dim + 2 * kv_dim + 8;
  const int64_t q_stride = packed ? q_dim : stride, kv_stride = packed ? kv_dim : stride;
  const int64_t k_at = packed ? seqs * q_dim : q_dim;
  const int64_t v_at = packed ? seqs * (q_dim + kv_dim) : q_dim + kv_dim;
  const auto qkv = RandomHalf(rng, seqs * stride, -2.0f, 2.0f);
  std::vector<int32_t> positions(seqs), freq_index(seqs), slots(seqs);
  std::vector<float> inv_freq(2 * half);
  cpu::RopeInverseFrequencies(10000.0, s.d, inv_freq.data());
  cpu::RopeInverseFrequencies(1.0e6, s.d, inv_freq.data() + half);
  for (int64_t i = 0; i < seqs; ++i) {
    const int p = lens[i] - 1;
    positions[i] = p;
    freq_index[i] = packed ? 0 : static_cast<int32_t>(i % 2);
    slots[i] = tp.tables[i * tp.table_stride + p / bsl] * bsl + p % bsl;
    const int64_t row = tp.KeyRow(i, p);
    std::fill_n(tp.pool.begin() + row, kv_dim, kHalfNaN);
    std::fill_n(tp.pool.begin() + row + bsl * kv_dim, kv_dim, kHalfNaN);
  }

  // CPU: rotate, round to fp16 as the cache and q are, store, attend.
  std::vector<float> poolf = ToFloat(tp.pool);
  std::vector<float> qf(seqs * q_dim);
  const auto round16 = [](float v) { return cpu::HalfToFloat(cpu::FloatToHalf(v)); };
  const auto floats = [&](int64_t at, int64_t count) {
    return ToFloat(std::vector<uint16_t>(qkv.begin() + at, qkv.begin() + at + count));
  };
  for (int64_t i = 0; i < seqs; ++i) {
    std::vector<float> qr = floats(i * q_stride, q_dim), kr = floats(k_at + i * kv_stride, kv_dim);
    const std::vector<float> vr = floats(v_at + i * kv_stride, kv_dim);
    const float* f = inv_freq.data() + freq_index[i] * half;
    cpu::RopeRotateHalf(qr.data(), s.heads, s.d, positions[i], f);
    cpu::RopeRotateHalf(kr.data(), s.kv_heads, s.d, positions[i], f);
    for (int64_t j = 0; j < q_dim; ++j) qf[i * q_dim + j] = round16(qr[j]);
    const int64_t at = tp.KeyRow(i, positions[i]);
    for (int64_t j = 0; j < kv_dim; ++j) {
      poolf[at + j] = round16(kr[j]);
      poolf[at + bsl * kv_dim + j] = vr[j];
    }
  }
  const std::vector<cpu::AttentionSpan> spans = tp.Spans(poolf, lens);
  std::vector<float> ref(seqs * q_dim);
  cpu::PagedCausalAttention(qf.data(), spans.data(), seqs, {s.heads, s.kv_heads, s.d}, ref.data());

  cu::DecodeAttentionPlan plan;
  NIBBLE_TEST_CUDA_CHECK(cu::PlanPagedDecodeAttention({s.heads, s.kv_heads, s.d}, seqs, max_len, &plan, split));
  DeviceBuffer<uint16_t> dpool_two(tp.pool.size()), dpool_one(tp.pool.size());
  DeviceBuffer<uint16_t> dqkv_two(qkv.size()), dqkv_one(qkv.size()), dq(seqs * q_dim);
  DeviceBuffer<uint16_t> dout_two(seqs * q_dim), dout_one(seqs * q_dim);
  DeviceBuffer<int32_t> dtables(tp.tables.size()), dlens(seqs), dpos(seqs), didx(seqs), dslots(seqs);
  DeviceBuffer<float> dfreq(inv_freq.size());
  DeviceBuffer<char> ws(std::max<int64_t>(plan.workspace_bytes, 1));
  dpool_two.CopyFrom(tp.pool.data());
  dpool_one.CopyFrom(tp.pool.data());
  dqkv_two.CopyFrom(qkv.data());
  dqkv_one.CopyFrom(qkv.data());
  dtables.CopyFrom(tp.tables.data());
  dlens.CopyFrom(lens.data());
  dpos.CopyFrom(positions.data());
  didx.CopyFrom(freq_index.data());
  dslots.CopyFrom(slots.data());
  dfreq.CopyFrom(inv_freq.data());
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(dout_two.get(), 0xff, dout_two.bytes()));
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(dout_one.get(), 0xff, dout_one.bytes()));

  // The two-kernel route.
  const cu::PagedKvView view_two = tp.View(dpool_two.get());
  uint16_t* keys_two = tp.LayerKeys(dpool_two.get());
  const cu::RopeKvStore store{dqkv_two.get() + v_at, kv_stride, dslots.get(), keys_two,
                              keys_two + bsl * kv_dim, tp.block_elems, bsl};
  NIBBLE_TEST_CUDA_CHECK(cu::RopeRotateHalf(dqkv_two.get(), q_stride, s.heads, dqkv_two.get() + k_at,
                                            kv_stride, s.kv_heads, s.d, seqs, dpos.get(),
                                            dfreq.get(), packed ? nullptr : didx.get(), nullptr,
                                            &store));
  NIBBLE_TEST_CUDA_CHECK(cudaMemcpy2D(dq.get(), q_dim * 2, dqkv_two.get(), q_stride * 2, q_dim * 2,
                                      seqs, cudaMemcpyDeviceToDevice));
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(ws.get(), 0xff, ws.bytes()));
  NIBBLE_TEST_CUDA_CHECK(cu::PagedDecodeAttention(WithCombine(plan, false), dq.get(), view_two, dtables.get(),
                                                  tp.table_stride, dlens.get(), seqs, ws.get(),
                                                  dout_two.get(), nullptr));
  // One kernel (two with the combine).
  const cu::PagedKvView view_one = tp.View(dpool_one.get());
  uint16_t* keys_one = tp.LayerKeys(dpool_one.get());
  cu::DecodeRopeInput rope;
  rope.q = dqkv_one.get();
  rope.q_stride = q_stride;
  rope.k = dqkv_one.get() + k_at;
  rope.k_stride = kv_stride;
  rope.v = dqkv_one.get() + v_at;
  rope.v_stride = kv_stride;
  rope.positions = dpos.get();
  rope.inv_freq = dfreq.get();
  rope.freq_index = packed ? nullptr : didx.get();
  rope.slots = dslots.get();
  rope.keys = keys_one;
  rope.values = keys_one + bsl * kv_dim;
  // From a fresh copy of the pool: in a cluster wherever one fits (the planner takes it for
  // small grids only), and there also with the combine kernel.
  const cu::DecodeAttentionPlan tested = WithCombine(plan, true);
  const auto run_one = [&](const cu::DecodeAttentionPlan& p, DeviceBuffer<uint16_t>& out) {
    dpool_one.CopyFrom(tp.pool.data());
    NIBBLE_TEST_CUDA_CHECK(cudaMemset(out.get(), 0xff, out.bytes()));
    NIBBLE_TEST_CUDA_CHECK(cudaMemset(ws.get(), 0xff, ws.bytes()));
    NIBBLE_TEST_CUDA_CHECK(cu::PagedDecodeAttentionWithRope(p, rope, view_one, dtables.get(),
                                                            tp.table_stride, dlens.get(), seqs,
                                                            ws.get(), out.get(), nullptr));
    NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  };
  std::vector<uint16_t> out_two(seqs * q_dim), out_one(seqs * q_dim), pool_two(tp.pool.size()),
      pool_one(tp.pool.size()), qkv_after(qkv.size());
  dout_two.CopyTo(out_two.data());
  dpool_two.CopyTo(pool_two.data());
  const std::string name =
      CaseName(packed ? "decode_attention+rope packed" : "decode_attention+rope", s, bsl, lens,
               split_name, tested);
  int fails = 0;
  std::vector<uint16_t> out_tested;  // the tested plan's output (the length contract's baseline)
  for (bool cluster : {true, false}) {
    if (!cluster && !tested.combine_in_cluster) break;  // the first pass was the combine kernel
    run_one(WithCombine(plan, cluster), dout_one);
    dout_one.CopyTo(out_one.data());
    dpool_one.CopyTo(pool_one.data());
    dqkv_one.CopyTo(qkv_after.data());
    if (cluster) {
      fails += CheckClose(name, out_one, ref, 2e-3, 2e-4);
      out_tested = out_one;
    }
    if (out_one != out_two || pool_one != pool_two || qkv_after != qkv) {
      int64_t out_diff = 0, pool_diff = 0;
      for (size_t i = 0; i < out_one.size(); ++i) out_diff += out_one[i] != out_two[i];
      for (size_t i = 0; i < pool_one.size(); ++i) pool_diff += pool_one[i] != pool_two[i];
      std::printf("FAIL %s.same_bits%s: output %lld, pool %lld elements differ from RoPE + "
                  "attention; q/k/v %s\n", name.c_str(), cluster ? "" : " (combine kernel)",
                  static_cast<long long>(out_diff), static_cast<long long>(pool_diff),
                  qkv_after == qkv ? "unchanged" : "CHANGED");
      ++fails;
    }
  }

  // Sequence 0 past the plan's maximum: NaN row, nothing stored for it, the rest the same.
  std::vector<int> bad_lens = lens;
  bad_lens[0] = max_len + 1;
  dlens.CopyFrom(bad_lens.data());
  run_one(tested, dout_one);
  std::vector<uint16_t> got_bad(out_one.size()), pool_bad(tp.pool.size());
  dout_one.CopyTo(got_bad.data());
  dpool_one.CopyTo(pool_bad.data());
  const BadLength c = CountBadLength(got_bad, out_tested, q_dim);
  int64_t stored0 = 0;
  const int64_t row0 = tp.KeyRow(0, positions[0]);
  for (int64_t j = 0; j < kv_dim; ++j) {
    stored0 += pool_bad[row0 + j] != kHalfNaN;
    stored0 += pool_bad[row0 + bsl * kv_dim + j] != kHalfNaN;
  }
  if (!c.ok() || stored0 != 0) {
    std::printf("FAIL %s.bad_len: NaN %lld/%lld, others unchanged %lld/%lld, stored %lld\n",
                name.c_str(), static_cast<long long>(c.nan), static_cast<long long>(c.row),
                static_cast<long long>(c.same), static_cast<long long>(c.others),
                static_cast<long long>(stored0));
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
      // Splits combined in a cluster (sm_90): 5, 10 (past the portable 8) and 16 splits (the
      // most), each also against the combine kernel's bits; 17 splits: the combine kernel.
      fails += RunCase(rng, s, bsl, {300, 1, 77}, 64, "64");
      fails += RunCase(rng, s, bsl, {129, 7, 1, 300}, 32, "32");
      fails += RunCase(rng, s, bsl, {512, 1, 77}, 32, "32");
      fails += RunCase(rng, s, bsl, {544, 9}, 32, "32");
      cases += 9;
    }
  }
  // The rotation folded in (PagedDecodeAttentionWithRope): every shape, the new token in the
  // first or a later load step of a split's first round (24, 50, 60: steps 2, 3, 1 at d = 128),
  // in a later round, alone in its split, at a block's first row; EARLY (32), 64-position,
  // one-split and auto plans; the packed layout once a shape.
  for (const Shape& s : shapes) {
    if (prefill_only) break;
    for (int bsl : {16, 64}) {
      fails += RunRopeCase(rng, s, bsl, {1, 7, 129, 4097}, 0, "auto");
      fails += RunRopeCase(rng, s, bsl, {129, 4097, 7, 1, 33, 24, 60}, 32, "32");
      fails += RunRopeCase(rng, s, bsl, {4097, 65, 129, 7, 50, 24}, 64, "64");
      fails += RunRopeCase(rng, s, bsl, {7, 129, 1, 512}, 512, "one");
      // Combined in a cluster (sm_90): 10 and 5 splits, the new token in the last split or not.
      fails += RunRopeCase(rng, s, bsl, {129, 7, 1, 300, 33}, 32, "32");
      fails += RunRopeCase(rng, s, bsl, {300, 65, 1}, 64, "64");
      cases += 6;
    }
    fails += RunRopeCase(rng, s, 16, {40, 1, 300}, 0, "auto", true);
    ++cases;
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
