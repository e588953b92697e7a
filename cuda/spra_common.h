// Seeded-support scheme spra-seeded-v1 (docs/FORMAT.md §4), shared by the CPU and CUDA kernels.
//
// Everything here must stay bit-identical to the numpy spec in spra_tools/support.py: the tests
// compare both against the committed vectors. All integer arithmetic wraps modulo 2**64.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SPRA_HD __host__ __device__ __forceinline__
#else
#define SPRA_HD inline
#endif

namespace spra {

constexpr int kBlockBits = 16;
constexpr int64_t kBlock = int64_t(1) << kBlockBits;
constexpr int kRounds = 4;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// What a seeded kernel does with each support element (one kernel serves them all).
enum Mode : int { kIndices = 0, kGather = 1, kApply = 2, kRestore = 3 };

SPRA_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// floor(density * x) with one correctly rounded binary64 product (no FMA, no extended precision).
SPRA_HD int64_t cum_count(double density, int64_t x) {
#ifdef __CUDA_ARCH__
  return static_cast<int64_t>(floor(__dmul_rn(density, static_cast<double>(x))));
#else
  volatile double p = density * static_cast<double>(x);  // volatile: keep the product a double
  return static_cast<int64_t>(std::floor(p));
#endif
}

// Bits of the permutation domain for a block of `length` elements: even, at least 2.
SPRA_HD int feistel_width(int64_t length) {
  int w = 0;
  while ((int64_t(1) << w) < length) ++w;
  if (w < 2) w = 2;
  return w + (w & 1);
}

struct RoundKeys {
  uint64_t k[kRounds];
};

SPRA_HD RoundKeys round_keys(uint64_t tensor_key, int64_t block) {
  RoundKeys r;
  for (int i = 0; i < kRounds; ++i)
    r.k[i] = mix64(tensor_key + (static_cast<uint64_t>(block) * kRounds + i + 1) * kGolden);
  return r;
}

SPRA_HD uint32_t feistel(uint32_t x, const RoundKeys& rk, int width) {
  const int half = width / 2;
  const uint64_t mask = (uint64_t(1) << half) - 1;
  uint64_t left = x >> half, right = x & mask;
  for (int r = 0; r < kRounds; ++r) {
    uint64_t next = left ^ (mix64(rk.k[r] ^ right) & mask);
    left = right;
    right = next;
  }
  return static_cast<uint32_t>((left << half) | right);
}

SPRA_HD uint32_t feistel_inverse(uint32_t y, const RoundKeys& rk, int width) {
  const int half = width / 2;
  const uint64_t mask = (uint64_t(1) << half) - 1;
  uint64_t left = y >> half, right = y & mask;
  for (int r = kRounds - 1; r >= 0; --r) {
    uint64_t prev = right ^ (mix64(rk.k[r] ^ left) & mask);
    right = left;
    left = prev;
  }
  return static_cast<uint32_t>((left << half) | right);
}

// The block's permutation of [0, length), cycle-walked (a no-op for full blocks).
SPRA_HD uint32_t permute(uint32_t x, const RoundKeys& rk, int width, int64_t length) {
  uint32_t y = feistel(x, rk, width);
  while (y >= length) y = feistel(y, rk, width);
  return y;
}

SPRA_HD uint32_t permute_inverse(uint32_t y, const RoundKeys& rk, int width, int64_t length) {
  uint32_t x = feistel_inverse(y, rk, width);
  while (x >= length) x = feistel_inverse(x, rk, width);
  return x;
}

// feistel() with its round function tabulated: tab[(r << half) | v] = mix64(k[r] ^ v) & mask for
// v < 2**half (half <= 8, so one byte an entry). Tabulating costs 4 * 2**half mix64; it pays when a
// block holds more than about 2**half / 2 support elements (the direct path costs 4 mix64 each).
SPRA_HD void feistel_tabulate(uint8_t* tab, const RoundKeys& rk, int width, int from, int step) {
  const int half = width / 2;
  const uint64_t mask = (uint64_t(1) << half) - 1;
  for (int x = from; x < (kRounds << half); x += step)
    tab[x] = static_cast<uint8_t>(mix64(rk.k[x >> half] ^ static_cast<uint64_t>(x & mask)) & mask);
}

SPRA_HD uint32_t feistel_tabled(uint32_t x, const uint8_t* tab, int width) {
  const int half = width / 2;
  const uint32_t mask = (1u << half) - 1;
  uint32_t left = x >> half, right = x & mask;
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t next = left ^ tab[(r << half) | right];
    left = right;
    right = next;
  }
  return (left << half) | right;
}

SPRA_HD uint32_t permute_tabled(uint32_t x, const uint8_t* tab, int width, int64_t length) {
  uint32_t y = feistel_tabled(x, tab, width);
  while (y >= length) y = feistel_tabled(y, tab, width);
  return y;
}

// One adapted tensor of a multi-tensor call.
struct TensorEntry {
  uint64_t key;          // support.tensor_key(seed, name)
  int64_t numel;
  double density;
  int64_t first_block;   // index of its first block among all blocks of the call
  int64_t first_value;   // offset of its first element in the flat values / indices
};

// The tensor owning global block `g` (entries sorted by first_block; n >= 1).
SPRA_HD int find_entry(const TensorEntry* entries, int n, int64_t g) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (entries[mid].first_block <= g) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Where one block of a multi-tensor call lies and what its support is made of.
struct Block {
  int tensor;
  int64_t start;   // flat index of its first element
  int64_t length;  // elements in the block (2**16, or fewer for a tensor's last block)
  int64_t count;   // support elements in it
  int64_t first;   // position of its first support element in the flat values / indices
  RoundKeys keys;
  int width;       // bits of its Feistel permutation
};

// Block `g` of the call, known to belong to tensor `t`.
SPRA_HD Block block_of(const TensorEntry* entries, int t, int64_t g) {
  Block k;
  k.tensor = t;
  const TensorEntry& e = entries[t];
  const int64_t b = g - e.first_block;
  k.start = b * kBlock;
  const int64_t end = k.start + kBlock < e.numel ? k.start + kBlock : e.numel;
  k.length = end - k.start;
  const int64_t before = cum_count(e.density, k.start);
  k.count = cum_count(e.density, end) - before;
  k.first = e.first_value + before;
  k.keys = round_keys(e.key, b);
  k.width = feistel_width(k.length);
  return k;
}

SPRA_HD Block locate_block(const TensorEntry* entries, int n, int64_t g) {
  return block_of(entries, find_entry(entries, n, g), g);
}

// Supports at most this dense (per block) are generated by sorting the first m permutation
// outputs; denser ones by testing every position's inverse image (already in order).
constexpr int64_t kSortMax = 4096;

}  // namespace spra
