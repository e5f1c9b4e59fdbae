// kernels/cuda/ops.h against the CPU references of kernels/cpu/ops.h (fp32, on the fp16 inputs
// upcast). Plain executable: one PASS or FAIL line per case, exit status 1 on any failure.
// Fresh random non-zero inputs every run (the seed is printed; ops_test SEED replays it);
// outputs filled with NaN before every launch (in-place operands: every element must come out
// as the reference says, and the untouched parts of a fused buffer must keep their bits).
//
// Tolerances (fp16 output = the fp32 result rounded once: up to 2^-11 = 4.9e-4 relative; fp32
// arithmetic in another order than the reference: ~1e-6 relative):
//   RMSNorm, AddRmsNorm, SiLU*mul, RoPE: per element |y - ref| <= 1e-3 |ref| + 1e-5 rms(ref),
//   and ||y - ref|| / ||ref|| <= 1e-3. AddRmsNorm's stored x: bit-exact (x + r of two fp16
//   values is exact in fp32 at these magnitudes, then rounded once). Embedding: bit-exact.
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/half.h"
#include "kernels/cpu/ops.h"
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

constexpr double kRel = 1e-3, kAbsRms = 1e-5;

DeviceBuffer<uint16_t> Upload(const std::vector<uint16_t>& h) {
  DeviceBuffer<uint16_t> d(h.size());
  d.CopyFrom(h.data());
  return d;
}

DeviceBuffer<uint16_t> Poisoned(size_t n) {
  DeviceBuffer<uint16_t> d(n);
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(d.get(), 0xff, d.bytes()));
  return d;
}

std::vector<uint16_t> Download(const DeviceBuffer<uint16_t>& d) {
  std::vector<uint16_t> h(d.count());
  d.CopyTo(h.data());
  return h;
}

std::string Name(const char* op, int64_t rows, int64_t dim) {
  return std::string(op) + " rows=" + std::to_string(rows) + " dim=" + std::to_string(dim);
}

int TestRmsNorm(std::mt19937& rng, int64_t rows, int64_t dim) {
  const float eps = 1e-5f;
  const auto x = RandomHalf(rng, rows * dim, -1.0f, 1.0f);
  const auto w = RandomHalf(rng, dim, -1.5f, 1.5f);
  std::vector<float> ref(rows * dim);
  cpu::RmsNorm(ToFloat(x).data(), ToFloat(w).data(), rows, dim, eps, ref.data());
  auto dx = Upload(x), dw = Upload(w);
  auto dy = Poisoned(rows * dim);
  NIBBLE_TEST_CUDA_CHECK(cu::RmsNorm(dx.get(), dw.get(), rows, dim, eps, dy.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  int fails = CheckClose(Name("rmsnorm", rows, dim), Download(dy), ref, kRel, kAbsRms);
  // In place (y aliases x).
  NIBBLE_TEST_CUDA_CHECK(cu::RmsNorm(dx.get(), dw.get(), rows, dim, eps, dx.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  fails += CheckClose(Name("rmsnorm.inplace", rows, dim), Download(dx), ref, kRel, kAbsRms);
  return fails;
}

int TestAddRmsNorm(std::mt19937& rng, int64_t rows, int64_t dim) {
  const float eps = 1e-6f;
  const auto x = RandomHalf(rng, rows * dim, -1.0f, 1.0f);
  const auto r = RandomHalf(rng, rows * dim, -1.0f, 1.0f);
  const auto w = RandomHalf(rng, dim, -1.5f, 1.5f);
  std::vector<uint16_t> sum16(rows * dim);
  for (size_t i = 0; i < sum16.size(); ++i) {
    sum16[i] = cpu::FloatToHalf(cpu::HalfToFloat(x[i]) + cpu::HalfToFloat(r[i]));
  }
  std::vector<float> ref(rows * dim);
  cpu::RmsNorm(ToFloat(sum16).data(), ToFloat(w).data(), rows, dim, eps, ref.data());
  auto dx = Upload(x), dr = Upload(r), dw = Upload(w);
  auto dy = Poisoned(rows * dim);
  NIBBLE_TEST_CUDA_CHECK(cu::AddRmsNorm(dx.get(), dr.get(), dw.get(), rows, dim, eps, dy.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got_x = Download(dx);
  size_t diff = 0;
  for (size_t i = 0; i < sum16.size(); ++i) diff += got_x[i] != sum16[i];
  int fails = 0;
  if (diff != 0) {
    std::printf("FAIL %s: %zu of %zu stored x differ from fp16(x + r)\n",
                Name("addrmsnorm.x", rows, dim).c_str(), diff, sum16.size());
    ++fails;
  } else {
    std::printf("PASS %s bit-exact\n", Name("addrmsnorm.x", rows, dim).c_str());
  }
  return fails + CheckClose(Name("addrmsnorm.y", rows, dim), Download(dy), ref, kRel, kAbsRms);
}

// gate and up side by side in one fused buffer [rows, 2 * cols] (as a fused gate+up product
// writes them); out contiguous.
int TestSiluMul(std::mt19937& rng, int64_t rows, int64_t cols) {
  const auto fused = RandomHalf(rng, rows * 2 * cols, -8.0f, 8.0f);
  std::vector<float> gate(rows * cols), up(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      gate[r * cols + c] = cpu::HalfToFloat(fused[r * 2 * cols + c]);
      up[r * cols + c] = cpu::HalfToFloat(fused[r * 2 * cols + cols + c]);
    }
  }
  cpu::SiluMulInPlace(gate.data(), up.data(), rows * cols);
  auto df = Upload(fused);
  auto dout = Poisoned(rows * cols);
  NIBBLE_TEST_CUDA_CHECK(cu::SiluMul(df.get(), 2 * cols, df.get() + cols, 2 * cols, rows, cols,
                                     dout.get(), cols, nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  return CheckClose(Name("silumul", rows, cols), Download(dout), gate, kRel, kAbsRms);
}

// A product's output as split-k partial sums (split_sums.h): [splits][rows][width] fp32 (each
// split's share of values in [-1, 1] / splits) and a bias [width], their reduction on the host
// (fp32 additions in split order, then the bias, rounded once: the reduce kernel's rule) as
// fp16 [rows, width].
// misaligned: the sums start one float past a 16-byte boundary and the rows are width + 1
// floats apart, so the kernels must take their scalar path even where the width allows the
// vector one.
struct RandomSplitSums {
  RandomSplitSums(std::mt19937& rng, int32_t splits, int64_t rows, int64_t width, bool with_bias,
                  bool misaligned = false)
      : splits(splits), rows(rows), width(width), stride(width + (misaligned ? 1 : 0)),
        sums(1 + splits * rows * stride), bias(width), reduced(rows * width),
        d_sums(sums.size()), d_bias(width) {
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
    for (float& v : sums) v = unit(rng) / static_cast<float>(splits);
    for (float& v : bias) v = with_bias ? unit(rng) : 0.0f;
    const int64_t first = misaligned ? 1 : 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < width; ++c) {
        const int64_t i = first + r * stride + c;
        float sum = sums[i];
        for (int32_t sp = 1; sp < splits; ++sp) sum += sums[i + sp * rows * stride];
        if (with_bias) sum += bias[c];
        reduced[r * width + c] = cpu::FloatToHalf(sum);
      }
    }
    d_sums.CopyFrom(sums.data());
    d_bias.CopyFrom(bias.data());
    view.sums = d_sums.get() + first;
    view.row_stride = stride;
    view.split_stride = rows * stride;
    view.splits = splits;
    view.bias = with_bias ? d_bias.get() : nullptr;
  }
  int32_t splits;
  int64_t rows, width, stride;
  std::vector<float> sums, bias;
  std::vector<uint16_t> reduced;
  DeviceBuffer<float> d_sums, d_bias;
  cu::SplitSums view;
};

int Bitwise(const std::string& name, const std::vector<uint16_t>& got,
            const std::vector<uint16_t>& want) {
  size_t diff = 0;
  for (size_t i = 0; i < want.size(); ++i) diff += got[i] != want[i];
  std::printf("%s %s: %zu of %zu differ\n", diff == 0 ? "PASS" : "FAIL", name.c_str(), diff,
              want.size());
  return diff != 0;
}

// AddRmsNorm and SiluMul fed split sums against the same kernels fed their host reduction:
// the same bits in x, y and out.
int TestSplitSums(std::mt19937& rng, int32_t splits, int64_t rows, int64_t dim, bool with_bias,
                  bool misaligned = false) {
  const std::string tag = " splits=" + std::to_string(splits) + " bias=" + std::to_string(with_bias) +
                          (misaligned ? " misaligned" : "");
  int fails = 0;
  {
    const RandomSplitSums product(rng, splits, rows, dim, with_bias, misaligned);
    const auto x = RandomHalf(rng, rows * dim, -1.0f, 1.0f);
    const auto w = RandomHalf(rng, dim, -1.5f, 1.5f);
    // The reference's residual misaligned as the sums are (one half past a 16-byte boundary),
    // so that both calls take the same (scalar) path: the norm's sum of squares runs in another
    // order on the vector path, and y may differ there by an ulp.
    std::vector<uint16_t> residual(misaligned ? 1 : 0, 0);
    residual.insert(residual.end(), product.reduced.begin(), product.reduced.end());
    auto dw = Upload(w), dr_buffer = Upload(residual);
    const uint16_t* dr = dr_buffer.get() + (misaligned ? 1 : 0);
    auto dx_ref = Upload(x), dx = Upload(x);
    auto dy_ref = Poisoned(rows * dim), dy = Poisoned(rows * dim);
    NIBBLE_TEST_CUDA_CHECK(cu::AddRmsNorm(dx_ref.get(), dr, dw.get(), rows, dim, 1e-6f,
                                          dy_ref.get(), nullptr));
    NIBBLE_TEST_CUDA_CHECK(cu::AddRmsNorm(dx.get(), product.view, dw.get(), rows, dim, 1e-6f,
                                          dy.get(), nullptr));
    NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    fails += Bitwise(Name("addrmsnorm.sums.x", rows, dim) + tag, Download(dx), Download(dx_ref));
    fails += Bitwise(Name("addrmsnorm.sums.y", rows, dim) + tag, Download(dy), Download(dy_ref));
  }
  {
    // A stacked [gate | up] product: up is the sums' second half of columns.
    const RandomSplitSums product(rng, splits, rows, 2 * dim, with_bias, misaligned);
    auto dgu = Upload(product.reduced);
    auto dout_ref = Poisoned(rows * dim), dout = Poisoned(rows * dim);
    NIBBLE_TEST_CUDA_CHECK(cu::SiluMul(dgu.get(), 2 * dim, dgu.get() + dim, 2 * dim, rows, dim,
                                       dout_ref.get(), dim, nullptr));
    NIBBLE_TEST_CUDA_CHECK(cu::SiluMul(product.view, product.view.Columns(dim), rows, dim,
                                       dout.get(), dim, nullptr));
    NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    fails += Bitwise(Name("silumul.sums", rows, dim) + tag, Download(dout), Download(dout_ref));
  }
  return fails;
}

// q, k and v of `tokens` tokens in one fused qkv buffer; tokens grouped into spans, each with
// its own dynamic-NTK inverse frequencies (base from the span's length, as
// ModelConfig::RopeBaseForLength), positions spread up to ~40k.
// With `store`, RopeRotateHalf also writes the rotated keys and the values into a paged pool
// (RopeKvStore: blocks of 5 positions, 2 layers, this the second; the tokens at distinct
// shuffled slots): the pool, poisoned first, must hold exactly the reference's k and v rows
// at those slots and nothing else; q is rotated in place and the qkv buffer's k and v stay.
int TestRope(std::mt19937& rng, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t d,
             bool store = false) {
  const int64_t q_dim = heads * d, kv_dim = kv_heads * d, stride = q_dim + 2 * kv_dim;
  const int64_t half = d / 2;
  const auto qkv = RandomHalf(rng, tokens * stride, -2.0f, 2.0f);
  std::vector<int32_t> positions(tokens), freq_index(tokens);
  std::vector<float> inv_freq;
  std::uniform_int_distribution<int> span_len(1, 5), length(1, 40000);
  for (int64_t t = 0, span = 0; t < tokens; ++span) {
    const int64_t n = std::min<int64_t>(span_len(rng), tokens - t);
    const int64_t len = length(rng) + n;
    const double max_pos = 32768, factor = 2.0, d_ = static_cast<double>(d);
    double base = 1e6;
    if (len > max_pos) base *= std::pow(factor * len / max_pos - (factor - 1), d_ / (d_ - 2));
    std::vector<float> f(half);
    cpu::RopeInverseFrequencies(base, d, f.data());
    inv_freq.insert(inv_freq.end(), f.begin(), f.end());
    for (int64_t i = 0; i < n; ++i, ++t) {
      positions[t] = static_cast<int32_t>(len - n + i);
      freq_index[t] = static_cast<int32_t>(span);
    }
  }
  // Reference: every token's q and k heads rotated; v untouched.
  std::vector<float> ref = ToFloat(qkv);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* f = inv_freq.data() + freq_index[t] * half;
    cpu::RopeRotateHalf(ref.data() + t * stride, heads, d, positions[t], f);
    cpu::RopeRotateHalf(ref.data() + t * stride + q_dim, kv_heads, d, positions[t], f);
  }
  auto dqkv = Upload(qkv);
  DeviceBuffer<int32_t> dpos(tokens), didx(tokens);
  DeviceBuffer<float> dfreq(inv_freq.size());
  dpos.CopyFrom(positions.data());
  didx.CopyFrom(freq_index.data());
  dfreq.CopyFrom(inv_freq.data());
  const std::string name = std::string(store ? "rope+store" : "rope") + " tokens=" +
                           std::to_string(tokens) + " heads=" + std::to_string(heads) + "/" +
                           std::to_string(kv_heads) + " d=" + std::to_string(d);
  if (store) {
    constexpr int32_t kBlock = 5;
    const int64_t blocks = tokens / kBlock + 2, layer_halves = 2 * kBlock * kv_dim;
    const int64_t block_stride = 2 * layer_halves;  // two layers; this one is the second
    std::vector<int32_t> slots(blocks * kBlock);
    for (size_t i = 0; i < slots.size(); ++i) slots[i] = static_cast<int32_t>(i);
    std::shuffle(slots.begin(), slots.end(), rng);
    slots.resize(tokens);
    DeviceBuffer<int32_t> dslots(tokens);
    dslots.CopyFrom(slots.data());
    std::vector<uint16_t> pool(blocks * block_stride, nibble::testing::kHalfNaN);
    auto dpool = Upload(pool);
    uint16_t* keys = dpool.get() + layer_halves;
    uint16_t* values = keys + kBlock * kv_dim;
    const cu::RopeKvStore kv{dqkv.get() + q_dim + kv_dim, stride, dslots.get(), keys, values,
                             block_stride, kBlock};
    NIBBLE_TEST_CUDA_CHECK(cu::RopeRotateHalf(dqkv.get(), stride, heads, dqkv.get() + q_dim,
                                              stride, kv_heads, d, tokens, dpos.get(),
                                              dfreq.get(), didx.get(), nullptr, &kv));
    NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = Download(dqkv);
    const auto got_pool = Download(dpool);
    // Expected: q rotated in place, k and v of the buffer as they were; the pool's slot rows.
    std::vector<uint16_t> got_rot;
    std::vector<float> ref_rot;
    size_t kv_changed = 0, stray = 0;
    std::vector<char> written(pool.size(), 0);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t i = 0; i < q_dim; ++i) {
        got_rot.push_back(got[t * stride + i]);
        ref_rot.push_back(ref[t * stride + i]);
      }
      for (int64_t i = q_dim; i < stride; ++i) kv_changed += got[t * stride + i] != qkv[t * stride + i];
      const int64_t row = layer_halves + (slots[t] / kBlock) * block_stride +
                          (slots[t] % kBlock) * kv_dim;
      for (int64_t i = 0; i < kv_dim; ++i) {
        got_rot.push_back(got_pool[row + i]);  // the rotated key
        ref_rot.push_back(ref[t * stride + q_dim + i]);
        written[row + i] = 1;
        const int64_t vrow = row + kBlock * kv_dim;
        kv_changed += got_pool[vrow + i] != qkv[t * stride + q_dim + kv_dim + i];  // v, exact
        written[vrow + i] = 1;
      }
    }
    for (size_t i = 0; i < pool.size(); ++i) stray += !written[i] && got_pool[i] != pool[i];
    if (kv_changed != 0 || stray != 0) {
      std::printf("FAIL %s: %zu k/v values of the buffer changed or values copied wrongly, %zu "
                  "pool values outside the slots written\n", name.c_str(), kv_changed, stray);
      return 1;
    }
    return CheckClose(name, got_rot, ref_rot, kRel, kAbsRms);
  }
  NIBBLE_TEST_CUDA_CHECK(cu::RopeRotateHalf(dqkv.get(), stride, heads, dqkv.get() + q_dim, stride,
                                            kv_heads, d, tokens, dpos.get(), dfreq.get(),
                                            didx.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = Download(dqkv);
  std::vector<uint16_t> got_qk;
  std::vector<float> ref_qk;
  size_t v_changed = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < stride; ++i) {
      if (i < q_dim + kv_dim) {
        got_qk.push_back(got[t * stride + i]);
        ref_qk.push_back(ref[t * stride + i]);
      } else {
        v_changed += got[t * stride + i] != qkv[t * stride + i];
      }
    }
  }
  if (v_changed != 0) {
    std::printf("FAIL %s: %zu values of the v part changed\n", name.c_str(), v_changed);
    return 1;
  }
  return CheckClose(name, got_qk, ref_qk, kRel, kAbsRms);
}

int TestEmbedding(std::mt19937& rng, int64_t vocab, int64_t hidden, int64_t n) {
  const auto table = RandomHalf(rng, vocab * hidden, -1.0f, 1.0f);
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> ids(n);
  for (auto& i : ids) i = id(rng);
  ids[0] = static_cast<int32_t>(vocab - 1);  // the last row too
  auto dt = Upload(table);
  DeviceBuffer<int32_t> dids(n);
  dids.CopyFrom(ids.data());
  auto dout = Poisoned(n * hidden);
  NIBBLE_TEST_CUDA_CHECK(cu::Embedding(dt.get(), vocab, hidden, dids.get(), n, dout.get(), nullptr, ids.data()));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = Download(dout);
  size_t diff = 0;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < hidden; ++i) diff += got[r * hidden + i] != table[ids[r] * hidden + i];
  const std::string name = "embedding vocab=" + std::to_string(vocab) + " hidden=" +
                           std::to_string(hidden) + " n=" + std::to_string(n);
  int fails = 0;
  if (diff != 0) {
    std::printf("FAIL %s: %zu elements differ\n", name.c_str(), diff);
    ++fails;
  } else {
    std::printf("PASS %s bit-exact\n", name.c_str());
  }
  // An id out of range: refused on the host (nothing launched: the output keeps its poison);
  // without the host ids the kernel writes that row as NaN and reads nothing outside the table.
  std::vector<int32_t> bad = ids;
  bad[n - 1] = static_cast<int32_t>(vocab);
  dids.CopyFrom(bad.data());
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(dout.get(), 0xff, dout.bytes()));
  const cudaError_t refused = cu::Embedding(dt.get(), vocab, hidden, dids.get(), n, dout.get(), nullptr, bad.data());
  NIBBLE_TEST_CUDA_CHECK(cu::Embedding(dt.get(), vocab, hidden, dids.get(), n, dout.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got_bad = Download(dout);
  size_t nan_row = 0, other_diff = 0;
  for (int64_t i = 0; i < hidden; ++i) nan_row += got_bad[(n - 1) * hidden + i] == 0x7e00;
  for (int64_t r = 0; r + 1 < n; ++r)
    for (int64_t i = 0; i < hidden; ++i) other_diff += got_bad[r * hidden + i] != table[ids[r] * hidden + i];
  if (refused != cudaErrorInvalidValue || nan_row != static_cast<size_t>(hidden) || other_diff != 0) {
    std::printf("FAIL %s.bad_id: host check %s, NaN row %zu/%lld, other rows differ %zu\n",
                name.c_str(), cudaGetErrorName(refused), nan_row, static_cast<long long>(hidden), other_diff);
    ++fails;
  } else {
    std::printf("PASS %s.bad_id refused on the host, NaN row on the device\n", name.c_str());
  }
  return fails;
}

}  // namespace

// ArgMaxRows against std::max_element, rows with planted ties (the lowest index must win) and
// a row of equal values.
int TestArgMax(std::mt19937& rng, int64_t rows, int64_t cols) {
  std::uniform_real_distribution<float> unit(-10.0f, 10.0f);
  std::vector<float> x(rows * cols);
  for (float& v : x) v = unit(rng);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x.data() + r * cols;
    if (r % 3 == 1) {  // a tie between two positions of the row's maximum
      const float top = *std::max_element(row, row + cols) + 1.0f;
      row[(r * 7919) % cols] = top;
      row[(r * 104729 + 13) % cols] = top;
    }
    if (r % 5 == 4) std::fill(row, row + cols, 2.5f);
  }
  DeviceBuffer<float> d_x(x.size());
  DeviceBuffer<int32_t> d_out(rows);
  d_x.CopyFrom(x.data());
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(d_out.get(), 0xff, d_out.bytes()));
  NIBBLE_TEST_CUDA_CHECK(cu::ArgMaxRows(d_x.get(), rows, cols, cols, d_out.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<int32_t> got(rows);
  d_out.CopyTo(got.data());
  int64_t wrong = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x.data() + r * cols;
    wrong += got[r] != std::max_element(row, row + cols) - row;
  }
  std::printf("%s argmax rows=%lld cols=%lld wrong=%lld\n", wrong ? "FAIL" : "PASS",
              (long long)rows, (long long)cols, (long long)wrong);
  return wrong != 0;
}

int main(int argc, char** argv) {
  const unsigned seed = nibble::testing::TestSeed(argc, argv, "ops_test");
  std::mt19937 rng(seed);
  int fails = 0;
  // 4160 = 4096 + 64; 100 and 1030: dims that take the scalar path (not a multiple of 8).
  for (int64_t rows : {1, 3, 17}) {
    for (int64_t dim : {64, 2048, 4160, 100}) {
      fails += TestRmsNorm(rng, rows, dim);
      fails += TestAddRmsNorm(rng, rows, dim);
    }
    for (int64_t cols : {64, 2048, 4160, 14336, 1030}) fails += TestSiluMul(rng, rows, cols);
    fails += TestRope(rng, rows, 32, 8, 128);  // 7B
    fails += TestRope(rng, rows, 16, 8, 128);  // 1.8B
    fails += TestRope(rng, rows, 12, 4, 64);
    fails += TestRope(rng, rows, 8, 4, 8);     // stories260K
    fails += TestRope(rng, rows, 5, 1, 6);     // head_dim % 4 != 0: the scalar path
    fails += TestRope(rng, rows, 32, 8, 128, true);  // RoPE with the keys and values stored
    fails += TestRope(rng, rows, 8, 4, 8, true);
    fails += TestRope(rng, rows, 5, 1, 6, true);
    for (int64_t hidden : {64, 2048, 4160, 100}) fails += TestEmbedding(rng, 1000, hidden, rows);
  }
  fails += TestRope(rng, 5, 64, 64, 128, true);  // 4,096 items: one token in 16 blocks
  fails += TestRope(rng, 2, 1, 0, 4);            // q only, one item
  fails += TestRope(rng, 100, 32, 8, 128, true);  // past kRopeSlicedTokens: a block per token
  // Split sums: the engine's shapes (7B hidden 4096, ffn 14336) at its split counts and one
  // split; the scalar path for dims not a multiple of 8 (100, 1030), and for sums neither
  // aligned nor with a row stride a multiple of 4 at a dim that would take the vector path.
  fails += TestSplitSums(rng, 9, 32, 4096, false);
  fails += TestSplitSums(rng, 3, 32, 14336, true);
  fails += TestSplitSums(rng, 1, 17, 4096, true);
  fails += TestSplitSums(rng, 5, 3, 100, true);
  fails += TestSplitSums(rng, 4, 7, 1030, false);
  fails += TestSplitSums(rng, 3, 5, 4096, true, true);
  fails += TestRmsNorm(rng, 300, 4096);  // more rows than one block wave
  fails += TestEmbedding(rng, 92544, 4096, 17);
  for (int64_t cols : {1, 31, 512, 1030, 92544}) fails += TestArgMax(rng, 13, cols);
  std::printf("ops_test: %s, %d failure(s), seed %u\n", fails == 0 ? "PASS" : "FAIL", fails, seed);
  return fails == 0 ? 0 : 1;
}
