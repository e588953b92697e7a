// CUDA kernels of the spra_tools ops (schemas: spra_tools/ops/library.py).
//
// Seeded ops: one launch for every adapted tensor of a call; supports are regenerated on the fly
// and never stored in global memory. The work is a random read-modify-write spread over the whole
// model, so what decides the speed is how many independent memory accesses are in flight, not
// arithmetic. tile_kernel therefore separates the two: a CTA takes a tile of consecutive 2**16-
// element blocks (a few thousand support elements), regenerates and sorts their offsets into
// shared memory (one warp per block: a counting sort by the top bits, then insertion sort inside a
// bucket of a few elements), and only then lets every thread issue `unroll` element loads before
// any of its stores. Consecutive CTAs take consecutive tiles, so the CTAs running at one time touch
// neighbouring memory. Blocks denser than kTileMax elements (density above ~1.5 %) go through
// seeded_kernel: a CTA per block, a bitonic sort or, for very dense blocks, a membership test of
// every position. Arithmetic is spelled with __fmul_rn / __fadd_rn so it is never contracted.
//
// Explicit ops (*_many): the same per-element work for indices given in global memory, one launch
// for all tensors of a call (a pointer table); they also serve staged adapters.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cub/block/block_scan.cuh>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "spra_common.h"

namespace spra {
namespace {

constexpr int kDenseThreads = 128;  // seeded_kernel
constexpr int kMaxThreads = 512;    // tile_kernel, indexed_kernel
constexpr int kTileMax = 1024;      // most support elements of a block that tile_kernel handles
constexpr int kMaxTileBlocks = 128;
constexpr int kMaxUnroll = 8;
constexpr int kBuckets = 64;        // of the counting sort
constexpr int kTableBytes = kRounds << 8;

// Launch shape of the tile and indexed kernels, chosen on an H200 among nine shapes (threads 128-512,
// tiles of 1024-8192 elements, 2-8 loads in flight): this one was fastest or within 10 % of it for
// attach, detach and gather at 0.1 % and 1 % (docs/BENCHMARKS.md).
struct Tuning {
  int threads = 256;  // per CTA
  int tile = 4096;    // support elements a tile may hold (shared memory: 3 bytes each)
  int unroll = 4;     // element loads each thread issues before its stores
};

constexpr Tuning tuning() { return Tuning{}; }

// Most support elements any block of the tensor holds: floor(d * L) + 1 for exact products, one
// more for the rounding of the two products whose floors are subtracted.
SPRA_HD int64_t block_bound(const TensorEntry& e) { return cum_count(e.density, e.numel < kBlock ? e.numel : kBlock) + 2; }
SPRA_HD bool in_tiles(const TensorEntry& e) { return block_bound(e) <= kTileMax; }

// --- what a kernel does with each support element ------------------------------------------------
// An op names, per block (or per tensor), a Base (the block's address, or its first flat index);
// `load` reads what one element needs, `store` writes its results. Kernels call every load of a
// batch before any store, so that the loads overlap.

struct IndicesOp {
  using Base = int64_t;
  struct Item {};
  int64_t* out;
  __device__ Base base(int, int64_t start) const { return start; }
  __device__ Item load(Base, int64_t, int64_t) const { return {}; }
  __device__ void store(Base b, int64_t off, int64_t k, Item) const { out[k] = b + off; }
};

template <typename W>
struct GatherOp {
  using Base = const W*;
  using Item = W;
  W* const* weights;
  W* out;
  __device__ Base base(int t, int64_t start) const { return weights[t] + start; }
  __device__ Item load(Base b, int64_t off, int64_t) const { return b[off]; }
  __device__ void store(Base, int64_t, int64_t k, Item w) const { out[k] = w; }
};

template <typename W, typename V>
__device__ __forceinline__ W add_scaled(W w, V v, float scale, bool scaled) {
  const float delta = scaled ? __fmul_rn(static_cast<float>(v), scale) : static_cast<float>(v);
  return static_cast<W>(__fadd_rn(static_cast<float>(w), delta));
}

template <typename W, typename V>
struct ApplyOp {
  using Base = W*;
  struct Item {
    W w;
    V v;
  };
  W* const* weights;
  const V* values;
  W* originals;  // may be null
  float scale;
  bool scaled;
  __device__ Base base(int t, int64_t start) const { return weights[t] + start; }
  __device__ Item load(Base b, int64_t off, int64_t k) const { return {b[off], values[k]}; }
  __device__ void store(Base b, int64_t off, int64_t k, Item it) const {
    if (originals) originals[k] = it.w;
    b[off] = add_scaled(it.w, it.v, scale, scaled);
  }
};

// Write-only: the originals replace the weights, which need not be read.
template <typename W>
struct RestoreOp {
  using Base = W*;
  using Item = W;
  W* const* weights;
  const W* originals;
  __device__ Base base(int t, int64_t start) const { return weights[t] + start; }
  __device__ Item load(Base, int64_t, int64_t k) const { return originals[k]; }
  __device__ void store(Base b, int64_t off, int64_t, Item w) const { b[off] = w; }
};

template <typename Op>
__device__ __forceinline__ void apply_one(const Op& op, int t, int64_t index, int64_t k) {
  const typename Op::Base b = op.base(t, 0);
  op.store(b, index, k, op.load(b, index, k));
}

// --- seeded supports: tiles of sparse blocks --------------------------------------------------

template <typename Base>
struct TileBlock {
  Base base;      // the op's handle on the block
  int64_t delta;  // element e of the tile is support element e + delta of the call
  int tensor;
  int count;      // its support elements handled here (0: none, or the dense kernel's)
  int pos;        // where its elements start in the tile
};

// One warp writes block k's m support offsets, sorted, to out[0, m) and `b` to tag[0, m): a counting
// sort on the top 6 bits (shared atomics place elements; they only decide the order inside a bucket,
// which the insertion sort then fixes, so the result is deterministic), then an insertion sort of
// each bucket (a few elements). The permutation is evaluated twice (count, place) instead of being
// kept: through a table of its round function when the block is dense enough to pay for one.
__device__ void sorted_offsets(const Block& k, int m, uint16_t* out, uint8_t* tag, uint8_t b, int* bucket,
                               uint8_t* table, int lane) {
  const bool tabled = 2 * m > (1 << (k.width / 2));
  if (tabled) {
    feistel_tabulate(table, k.keys, k.width, lane, 32);
    __syncwarp();
  }
  const int shift = k.width > 6 ? k.width - 6 : 0;
  auto offset = [&](int j) {
    return tabled ? permute_tabled(static_cast<uint32_t>(j), table, k.width, k.length)
                  : permute(static_cast<uint32_t>(j), k.keys, k.width, k.length);
  };
  bucket[lane] = 0;
  bucket[lane + 32] = 0;
  __syncwarp();
  for (int j = lane; j < m; j += 32) atomicAdd(&bucket[offset(j) >> shift], 1);
  __syncwarp();
  // Exclusive scan of the 64 bucket sizes: lane l owns buckets 2l and 2l+1.
  const int c0 = bucket[2 * lane], c1 = bucket[2 * lane + 1];
  int sum = c0 + c1;
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xFFFFFFFFu, sum, d);
    if (lane >= d) sum += up;
  }
  const int begin0 = sum - c0 - c1, begin1 = begin0 + c0;
  __syncwarp();
  bucket[2 * lane] = begin0;
  bucket[2 * lane + 1] = begin1;
  __syncwarp();
  for (int j = lane; j < m; j += 32) {
    const uint32_t y = offset(j);
    out[atomicAdd(&bucket[y >> shift], 1)] = static_cast<uint16_t>(y);
    tag[j] = b;
  }
  __syncwarp();
  for (int half = 0; half < 2; ++half) {
    const int lo = half ? begin1 : begin0, hi = lo + (half ? c1 : c0);
    for (int i = lo + 1; i < hi; ++i) {
      const uint16_t v = out[i];
      int j = i - 1;
      while (j >= lo && out[j] > v) {
        out[j + 1] = out[j];
        --j;
      }
      out[j + 1] = v;
    }
  }
  __syncwarp();  // bucket and table are reused for the warp's next block
}

size_t tile_shared_bytes(int threads, int tile) {
  return size_t(threads / 32) * (kBuckets * sizeof(int) + kTableBytes) + size_t(tile) * 3;
}

template <typename Op>
__global__ void __launch_bounds__(kMaxThreads)
    tile_kernel(const TensorEntry* entries, int n, int64_t blocks, int tile_blocks, int tile, int unroll, Op op) {
  extern __shared__ __align__(16) unsigned char shared[];
  __shared__ TileBlock<typename Op::Base> tb[kMaxTileBlocks];
  __shared__ int tile_count;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int* bucket = reinterpret_cast<int*>(shared) + warp * kBuckets;
  uint8_t* table = shared + warps * kBuckets * sizeof(int) + warp * kTableBytes;
  uint16_t* off = reinterpret_cast<uint16_t*>(shared + warps * (kBuckets * sizeof(int) + kTableBytes));
  uint8_t* tag = reinterpret_cast<uint8_t*>(off + tile);

  const int64_t g0 = int64_t(blockIdx.x) * tile_blocks;
  const int nb = static_cast<int>(blocks - g0 < tile_blocks ? blocks - g0 : tile_blocks);

  // 1. Each block's tensor and count, and the tile positions (warp 0; lane l owns blocks 4l..4l+3).
  if (warp == 0) {
    constexpr int kPer = kMaxTileBlocks / 32;
    int counts[kPer], sum = 0;
    int t = lane * kPer < nb ? find_entry(entries, n, g0 + lane * kPer) : 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int b = lane * kPer + i;
      counts[i] = 0;
      if (b >= nb) continue;
      const int64_t g = g0 + b;
      while (t + 1 < n && entries[t + 1].first_block <= g) ++t;
      const TensorEntry& e = entries[t];
      const int64_t start = (g - e.first_block) * kBlock;
      int64_t first = 0;
      if (in_tiles(e)) {
        const int64_t end = start + kBlock < e.numel ? start + kBlock : e.numel;
        const int64_t before = cum_count(e.density, start);
        counts[i] = static_cast<int>(cum_count(e.density, end) - before);
        first = e.first_value + before;
      }
      tb[b].base = op.base(t, start);
      tb[b].tensor = t;
      tb[b].count = counts[i];
      tb[b].delta = first;
      sum += counts[i];
    }
    int inclusive = sum;
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xFFFFFFFFu, inclusive, d);
      if (lane >= d) inclusive += up;
    }
    int pos = inclusive - sum;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int b = lane * kPer + i;
      if (b >= nb) continue;
      tb[b].pos = pos;
      tb[b].delta -= pos;
      pos += counts[i];
    }
    if (lane == 31) tile_count = inclusive;
  }
  __syncthreads();

  // 2. Regenerate and sort every block's offsets into shared memory (a warp per block).
  for (int b = warp; b < nb; b += warps) {
    const int m = tb[b].count;  // uniform across the warp
    if (m == 0) continue;
    const Block k = block_of(entries, tb[b].tensor, g0 + b);
    sorted_offsets(k, m, off + tb[b].pos, tag + tb[b].pos, static_cast<uint8_t>(b), bucket, table, lane);
  }
  __syncthreads();

  // 3. The memory pass: batches of `unroll` elements per thread, all loads before any store.
  const int total = tile_count;
  for (int e0 = 0; e0 < total; e0 += blockDim.x * unroll) {
    typename Op::Item item[kMaxUnroll];
#pragma unroll
    for (int i = 0; i < kMaxUnroll; ++i) {
      const int e = e0 + i * blockDim.x + threadIdx.x;
      if (i < unroll && e < total) {
        const TileBlock<typename Op::Base>& blk = tb[tag[e]];
        item[i] = op.load(blk.base, off[e], e + blk.delta);
      }
    }
#pragma unroll
    for (int i = 0; i < kMaxUnroll; ++i) {
      const int e = e0 + i * blockDim.x + threadIdx.x;
      if (i < unroll && e < total) {
        const TileBlock<typename Op::Base>& blk = tb[tag[e]];
        op.store(blk.base, off[e], e + blk.delta, item[i]);
      }
    }
  }
}

// --- seeded supports: dense blocks ----------------------------------------------------------------

template <typename Op>
__global__ void __launch_bounds__(kDenseThreads) seeded_kernel(const TensorEntry* entries, int n, int64_t blocks, Op op) {
  // Offsets within a block are < 2**16; padding with 0xFFFF is harmless: it sorts last, and a
  // real offset 0xFFFF among the pads reads back the same value.
  __shared__ uint16_t offsets[kSortMax];
  using Scan = cub::BlockScan<int, kDenseThreads>;
  __shared__ typename Scan::TempStorage scan;

  for (int64_t g = blockIdx.x; g < blocks; g += gridDim.x) {
    const Block blk = locate_block(entries, n, g);
    const int64_t m = blk.count;
    if (m == 0 || in_tiles(entries[blk.tensor])) continue;  // uniform across the CTA

    if (m <= kSortMax) {
      int p = 1;
      while (p < m) p <<= 1;
      for (int j = threadIdx.x; j < p; j += kDenseThreads)
        offsets[j] = j < m ? static_cast<uint16_t>(permute(static_cast<uint32_t>(j), blk.keys, blk.width, blk.length))
                           : 0xFFFF;
      __syncthreads();
      for (int k = 2; k <= p; k <<= 1) {  // bitonic sort of p entries
        for (int j = k >> 1; j > 0; j >>= 1) {
          for (int i = threadIdx.x; i < p; i += kDenseThreads) {
            const int partner = i ^ j;
            if (partner > i) {
              const uint16_t a = offsets[i], c = offsets[partner];
              if ((a > c) == ((i & k) == 0)) {
                offsets[i] = c;
                offsets[partner] = a;
              }
            }
          }
          __syncthreads();
        }
      }
      for (int r = threadIdx.x; r < m; r += kDenseThreads) apply_one(op, blk.tensor, blk.start + offsets[r], blk.first + r);
    } else {
      int64_t rank = 0;
      for (int64_t x0 = 0; x0 < blk.length; x0 += kDenseThreads) {
        const int64_t x = x0 + threadIdx.x;
        const int member =
            x < blk.length && permute_inverse(static_cast<uint32_t>(x), blk.keys, blk.width, blk.length) < m;
        int below, total;
        Scan(scan).ExclusiveSum(member, below, total);
        if (member) apply_one(op, blk.tensor, blk.start + x, blk.first + rank + below);
        rank += total;
        __syncthreads();
      }
    }
    __syncthreads();  // shared memory is reused by the next block
  }
}

// A few KiB of launch arguments (entries, pointers), copied to the device without a host sync.
at::Tensor upload(const std::vector<char>& bytes, const at::Device& device) {
  auto host = at::empty({static_cast<int64_t>(bytes.size())}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
  return host.to(device, /*non_blocking=*/true);
}

template <typename T>
void append(std::vector<char>* bytes, const T* data, size_t n) {
  const char* p = reinterpret_cast<const char*>(data);
  bytes->insert(bytes->end(), p, p + n * sizeof(T));
}

// Entries and weight pointers of a seeded call, on the device.
struct Table {
  at::Tensor buffer;
  int n = 0;
  int64_t blocks = 0, values = 0;
  int64_t tile_bound = 0;  // the largest block_bound among tensors in tiles (0: none)
  bool has_dense = false;  // any tensor for seeded_kernel
  const TensorEntry* entries() const { return reinterpret_cast<const TensorEntry*>(buffer.data_ptr()); }
  template <typename W>
  W* const* pointers() const {
    return reinterpret_cast<W* const*>(static_cast<const char*>(buffer.data_ptr()) + n * sizeof(TensorEntry));
  }
};

Table make_table(at::IntArrayRef keys, at::IntArrayRef numels, at::ArrayRef<double> densities,
                 const std::vector<void*>& pointers, const at::Device& device) {
  TORCH_CHECK(keys.size() == numels.size() && keys.size() == densities.size(), "keys, numels, densities differ in length");
  Table table;
  table.n = static_cast<int>(keys.size());
  std::vector<TensorEntry> entries(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0 && densities[i] > 0.0 && densities[i] <= 1.0, "invalid numel or density");
    entries[i] = {static_cast<uint64_t>(keys[i]), numels[i], densities[i], table.blocks, table.values};
    table.blocks += (numels[i] + kBlock - 1) / kBlock;
    table.values += cum_count(densities[i], numels[i]);
    if (numels[i] == 0) continue;
    if (in_tiles(entries[i])) table.tile_bound = std::max(table.tile_bound, block_bound(entries[i]));
    else table.has_dense = true;
  }
  TORCH_CHECK(table.blocks < (int64_t(1) << 31), "too many blocks for one launch");
  std::vector<char> bytes;
  append(&bytes, entries.data(), entries.size());
  append(&bytes, pointers.data(), pointers.size());
  table.buffer = upload(bytes, device);
  return table;
}

template <typename Op>
void launch(const Table& table, Op op) {
  if (table.blocks == 0 || table.values == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (table.tile_bound > 0) {
    const Tuning tu = tuning();
    const int tile_blocks = static_cast<int>(std::min<int64_t>(kMaxTileBlocks, tu.tile / table.tile_bound));
    const int64_t grid = (table.blocks + tile_blocks - 1) / tile_blocks;
    const size_t bytes = tile_shared_bytes(tu.threads, tu.tile);
    if (bytes > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(tile_kernel<Op>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    tile_kernel<<<static_cast<unsigned>(grid), tu.threads, bytes, stream>>>(table.entries(), table.n, table.blocks,
                                                                           tile_blocks, tu.tile, tu.unroll, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (table.has_dense) {
    int device, sms;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t grid = std::min<int64_t>(table.blocks, int64_t(sms) * 16);
    seeded_kernel<<<static_cast<unsigned>(grid), kDenseThreads, 0, stream>>>(table.entries(), table.n, table.blocks, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::vector<void*> weight_pointers(const at::TensorList& weights, std::vector<int64_t>* numels) {
  std::vector<void*> p;
  for (const auto& w : weights) {
    TORCH_CHECK(w.is_cuda() && w.is_contiguous(), "weights must be contiguous CUDA tensors");
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type() && w.device() == weights[0].device(),
                "weights of one call must share dtype and device");
    p.push_back(w.data_ptr());
    numels->push_back(w.numel());
  }
  return p;
}
at::Tensor seeded_indices_cuda(const at::Tensor& device_like, at::IntArrayRef keys, at::IntArrayRef numels,
                               at::ArrayRef<double> densities) {
  const c10::cuda::CUDAGuard guard(device_like.device());
  Table table = make_table(keys, numels, densities, {}, device_like.device());
  auto out = at::empty({table.values}, device_like.options().dtype(at::kLong));
  launch(table, IndicesOp{out.data_ptr<int64_t>()});
  return out;
}

at::Tensor seeded_gather_cuda(at::TensorList weights, at::IntArrayRef keys, at::ArrayRef<double> densities) {
  TORCH_CHECK(!weights.empty(), "need at least one weight");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<int64_t> numels;
  auto pointers = weight_pointers(weights, &numels);
  Table table = make_table(keys, numels, densities, pointers, weights[0].device());
  auto out = at::empty({table.values}, weights[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "seeded_gather", [&] {
    launch(table, GatherOp<scalar_t>{table.pointers<scalar_t>(), out.data_ptr<scalar_t>()});
  });
  return out;
}

at::Tensor seeded_apply_cuda(at::TensorList weights, at::IntArrayRef keys, at::ArrayRef<double> densities,
                             const at::Tensor& values, double scale, bool save_originals) {
  TORCH_CHECK(!weights.empty(), "need at least one weight");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<int64_t> numels;
  auto pointers = weight_pointers(weights, &numels);
  Table table = make_table(keys, numels, densities, pointers, weights[0].device());
  TORCH_CHECK(values.is_contiguous() && values.device() == weights[0].device() && values.numel() == table.values,
              "values must be contiguous on the weights' device with one entry per support element");
  auto originals = at::empty({save_originals ? table.values : 0}, weights[0].options());
  const float s = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "seeded_apply", [&] {
    using W = scalar_t;
    W* orig = save_originals ? originals.data_ptr<W>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "seeded_apply_values", [&] {
      launch(table, ApplyOp<W, scalar_t>{table.pointers<W>(), values.data_ptr<scalar_t>(), orig, s, s != 1.0f});
    });
  });
  return originals;
}

void seeded_restore_cuda(at::TensorList weights, at::IntArrayRef keys, at::ArrayRef<double> densities,
                         const at::Tensor& originals) {
  TORCH_CHECK(!weights.empty(), "need at least one weight");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<int64_t> numels;
  auto pointers = weight_pointers(weights, &numels);
  Table table = make_table(keys, numels, densities, pointers, weights[0].device());
  TORCH_CHECK(originals.is_contiguous() && originals.numel() == table.values &&
                  originals.scalar_type() == weights[0].scalar_type() && originals.device() == weights[0].device(),
              "originals must hold one weight-dtype entry per support element, on the weights' device");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "seeded_restore", [&] {
    launch(table, RestoreOp<scalar_t>{table.pointers<scalar_t>(), originals.data_ptr<scalar_t>()});
  });
}

template <typename F>
__global__ void elementwise_kernel(int64_t n, F f) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) f(k);
}

template <typename F>
void elementwise(int64_t n, F f) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  elementwise_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --- explicit supports, many tensors in one launch ---------------------------------------------

// The last tensor t in [lo, hi] with firsts[t] <= k: the owner of support element k.
__device__ __forceinline__ int owner(const int64_t* firsts, int lo, int hi, int64_t k) {
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (firsts[mid] <= k) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Support elements [begin, begin + blockDim.x * unroll) per CTA; firsts[t] is tensor t's first
// element (n + 1 entries, the last = total). Each thread loads its `unroll` elements, then stores.
template <typename Op, typename I>
__global__ void __launch_bounds__(kMaxThreads)
    indexed_kernel(const int64_t* firsts, int n, const I* __restrict__ indices, int64_t total, int unroll, Op op) {
  __shared__ int range[2];
  const int64_t begin = int64_t(blockIdx.x) * blockDim.x * unroll;
  const int64_t end = std::min<int64_t>(total, begin + int64_t(blockDim.x) * unroll);
  if (threadIdx.x < 2) range[threadIdx.x] = owner(firsts, 0, n - 1, threadIdx.x ? end - 1 : begin);
  __syncthreads();
  const int lo = range[0], hi = range[1];
  typename Op::Item item[kMaxUnroll];
  typename Op::Base base[kMaxUnroll];
  int64_t index[kMaxUnroll];
#pragma unroll
  for (int i = 0; i < kMaxUnroll; ++i) {
    const int64_t k = begin + i * blockDim.x + threadIdx.x;
    if (i < unroll && k < end) {
      base[i] = op.base(owner(firsts, lo, hi, k), 0);
      index[i] = static_cast<int64_t>(indices[k]);
      item[i] = op.load(base[i], index[i], k);
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxUnroll; ++i) {
    const int64_t k = begin + i * blockDim.x + threadIdx.x;
    if (i < unroll && k < end) op.store(base[i], index[i], k, item[i]);
  }
}

// Per-tensor element offsets and weight pointers of an explicit call, on the device.
struct IndexedTable {
  at::Tensor buffer;
  int n = 0;
  int64_t total = 0;
  const int64_t* firsts() const { return static_cast<const int64_t*>(buffer.data_ptr()); }
  template <typename W>
  W* const* pointers() const {
    return reinterpret_cast<W* const*>(static_cast<const char*>(buffer.data_ptr()) + (n + 1) * sizeof(int64_t));
  }
};

IndexedTable make_indexed_table(const at::TensorList& weights, const at::Tensor& indices, at::IntArrayRef counts) {
  TORCH_CHECK(!weights.empty(), "need at least one weight");
  TORCH_CHECK(counts.size() == weights.size(), "need one count per weight");
  TORCH_CHECK(indices.dim() == 1 && indices.is_contiguous() && indices.device() == weights[0].device() &&
                  (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt),
              "indices must be 1-D contiguous int64 or int32 on the weights' device");
  std::vector<int64_t> numels;
  auto pointers = weight_pointers(weights, &numels);
  IndexedTable table;
  table.n = static_cast<int>(weights.size());
  std::vector<int64_t> firsts;
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0, "counts must not be negative");
    firsts.push_back(table.total);
    table.total += c;
  }
  firsts.push_back(table.total);
  TORCH_CHECK(indices.numel() == table.total, "indices must hold sum(counts) entries");
  std::vector<char> bytes;
  append(&bytes, firsts.data(), firsts.size());
  append(&bytes, pointers.data(), pointers.size());
  table.buffer = upload(bytes, weights[0].device());
  return table;
}

template <typename Op>
void launch_indexed(const IndexedTable& table, const at::Tensor& indices, Op op) {
  if (table.total == 0) return;
  const Tuning tu = tuning();
  const int64_t per = int64_t(tu.threads) * tu.unroll;
  const int64_t grid = (table.total + per - 1) / per;
  TORCH_CHECK(grid < (int64_t(1) << 31), "too many support elements for one launch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (indices.scalar_type() == at::kInt) {
    indexed_kernel<<<static_cast<unsigned>(grid), tu.threads, 0, stream>>>(
        table.firsts(), table.n, indices.data_ptr<int32_t>(), table.total, tu.unroll, op);
  } else {
    indexed_kernel<<<static_cast<unsigned>(grid), tu.threads, 0, stream>>>(
        table.firsts(), table.n, indices.data_ptr<int64_t>(), table.total, tu.unroll, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_many_cuda(at::TensorList weights, const at::Tensor& indices, at::IntArrayRef counts) {
  TORCH_CHECK(!weights.empty(), "need at least one weight");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  IndexedTable table = make_indexed_table(weights, indices, counts);
  auto out = at::empty({table.total}, weights[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "gather_many", [&] {
    launch_indexed(table, indices, GatherOp<scalar_t>{table.pointers<scalar_t>(), out.data_ptr<scalar_t>()});
  });
  return out;
}

at::Tensor scatter_apply_many_cuda(at::TensorList weights, const at::Tensor& indices, at::IntArrayRef counts,
                                   const at::Tensor& values, double scale, bool save_originals) {
  TORCH_CHECK(!weights.empty(), "need at least one weight");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  IndexedTable table = make_indexed_table(weights, indices, counts);
  TORCH_CHECK(values.is_contiguous() && values.device() == weights[0].device() && values.numel() == table.total,
              "values must be contiguous on the weights' device with one entry per index");
  auto originals = at::empty({save_originals ? table.total : 0}, weights[0].options());
  const float s = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "scatter_apply_many", [&] {
    using W = scalar_t;
    W* orig = save_originals ? originals.data_ptr<W>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "scatter_apply_many_values", [&] {
      launch_indexed(table, indices,
                     ApplyOp<W, scalar_t>{table.pointers<W>(), values.data_ptr<scalar_t>(), orig, s, s != 1.0f});
    });
  });
  return originals;
}

void restore_many_cuda(at::TensorList weights, const at::Tensor& indices, at::IntArrayRef counts,
                       const at::Tensor& originals) {
  TORCH_CHECK(!weights.empty(), "need at least one weight");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  IndexedTable table = make_indexed_table(weights, indices, counts);
  TORCH_CHECK(originals.is_contiguous() && originals.numel() == table.total &&
                  originals.scalar_type() == weights[0].scalar_type() && originals.device() == weights[0].device(),
              "originals must hold one weight-dtype entry per index, on the weights' device");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "restore_many", [&] {
    launch_indexed(table, indices, RestoreOp<scalar_t>{table.pointers<scalar_t>(), originals.data_ptr<scalar_t>()});
  });
}

// --- explicit supports, one tensor ------------------------------------------------------------------

template <typename W>
struct GatherAt {
  const W* w;
  const int64_t* i;
  W* o;
  __device__ void operator()(int64_t k) const { o[k] = w[i[k]]; }
};

template <typename W, typename V>
struct ApplyAt {
  W* w;
  const int64_t* i;
  const V* v;
  float scale;
  bool scaled;
  __device__ void operator()(int64_t k) const { w[i[k]] = add_scaled(w[i[k]], v[k], scale, scaled); }
};

template <typename W>
struct RestoreAt {
  W* w;
  const int64_t* i;
  const W* o;
  __device__ void operator()(int64_t k) const { w[i[k]] = o[k]; }
};

void check_explicit(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values) {
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1, "indices must be 1-D int64");
  TORCH_CHECK(values.numel() == indices.numel(), "one value per index");
  TORCH_CHECK(indices.device() == weight.device() && values.device() == weight.device(), "tensors must share a device");
}

at::Tensor gather_cuda(const at::Tensor& weight, const at::Tensor& indices) {
  check_explicit(weight, indices, indices);
  const c10::cuda::CUDAGuard guard(weight.device());
  auto idx = indices.contiguous();
  auto out = at::empty({idx.numel()}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gather", [&] {
    elementwise(idx.numel(), GatherAt<scalar_t>{weight.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>()});
  });
  return out;
}

void scatter_apply_cuda(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double scale) {
  check_explicit(weight, indices, values);
  const c10::cuda::CUDAGuard guard(weight.device());
  auto idx = indices.contiguous();
  auto val = values.contiguous();
  const float s = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "scatter_apply", [&] {
    using W = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(), "scatter_apply_values", [&] {
      elementwise(idx.numel(), ApplyAt<W, scalar_t>{weight.data_ptr<W>(), idx.data_ptr<int64_t>(),
                                                    val.data_ptr<scalar_t>(), s, s != 1.0f});
    });
  });
}

void restore_cuda(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& original) {
  check_explicit(weight, indices, original);
  TORCH_CHECK(original.scalar_type() == weight.scalar_type(), "originals must have the weight's dtype");
  const c10::cuda::CUDAGuard guard(weight.device());
  auto idx = indices.contiguous();
  auto orig = original.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "restore", [&] {
    elementwise(idx.numel(), RestoreAt<scalar_t>{weight.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), orig.data_ptr<scalar_t>()});
  });
}

}  // namespace
}  // namespace spra

TORCH_LIBRARY_IMPL(spra_tools, CUDA, m) {
  m.impl("seeded_indices", &spra::seeded_indices_cuda);
  m.impl("seeded_gather", &spra::seeded_gather_cuda);
  m.impl("seeded_apply", &spra::seeded_apply_cuda);
  m.impl("seeded_restore", &spra::seeded_restore_cuda);
  m.impl("gather", &spra::gather_cuda);
  m.impl("scatter_apply", &spra::scatter_apply_cuda);
  m.impl("restore", &spra::restore_cuda);
  m.impl("gather_many", &spra::gather_many_cuda);
  m.impl("scatter_apply_many", &spra::scatter_apply_many_cuda);
  m.impl("restore_many", &spra::restore_many_cuda);
}
