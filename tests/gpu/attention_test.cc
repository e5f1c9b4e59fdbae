// kernels/cuda/attention.h (paged decode attention) against kernels/cpu/attention.h
// PagedCausalAttention (fp32, on the same fp16 q, keys and values upcast; a span of one token
// at position len - 1 per sequence). Plain executable: one PASS or FAIL line per case, exit
// status 1 on any failure. Fresh random inputs every run (seed printed; attention_test SEED).
//
// The pool has the engine's block layout ([block][layer][K | V][block_seq_len][kv_dim], 2
// layers, layer 1 tested), each sequence's blocks at shuffled ids; every pool row no sequence
// may read (the other layer, positions past a sequence's length in its last block, spare
// blocks) is NaN, so a read outside the visible positions shows. out is NaN before every launch.
// Cases: head_dim 8 / 64 / 128 with groups 1, 2, 3, 4, 6, 8, 10 (> 8: two blocks per kv head),
// block sizes 16 / 64 / 128 (8 and 16 with splits of 512), one batch of sequences of lengths 1, 7, 129, 4097 (and 3 of them
// for the short plans), split sizes auto, 64, 512 and one split (the direct path,
// max length <= 512); a length outside [1, max_seq_len] must give a NaN row.
//
// Tolerance: the output is the fp32 result rounded once to fp16 (2^-11 relative); scores,
// softmax and sums in fp32 in another order than the reference (~1e-6 relative). Per element
// |out - ref| <= 1e-3 |ref| + 1e-4 rms(ref) (long sequences average the values towards 0: the
// rms term), and ||out - ref|| / ||ref|| <= 1e-3.
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
  for (const Shape& s : shapes) {
    for (int bsl : {16, 64, 128}) {
      fails += RunCase(rng, s, bsl, {1, 7, 129, 4097}, 0, "auto");
      fails += RunCase(rng, s, bsl, {4097, 1, 129, 7}, 64, "64");
      fails += RunCase(rng, s, bsl, {7, 129, 1}, 512, "one");
      fails += RunCase(rng, s, bsl, {129, 7, 1}, 0, "auto");
      cases += 4;
    }
  }
  // The largest splits (512 positions) over small blocks (8, 16: 64 and 32 block ids a split).
  for (int bsl : {8, 16}) {
    fails += RunCase(rng, shapes[0], bsl, {4097, 1, 1500, 7}, 512, "512");
    fails += RunCase(rng, shapes[3], bsl, {4097, 1, 1500, 7}, 512, "512");
    cases += 2;
  }
  std::printf("attention_test: %s, %d failure(s) in %d cases, seed %u\n", fails == 0 ? "PASS" : "FAIL",
              fails, cases, seed);
  return fails == 0 ? 0 : 1;
}
