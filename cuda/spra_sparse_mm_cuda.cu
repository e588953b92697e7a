// CUDA kernel of spra_tools::sparse_addmm (schema and contract: spra_tools/ops/library.py).
//
// out[t, :] += x[t, :] · Mᵀ (or x · M when transposed) for the rows t of each segment, M the sparse
// [rows, cols] matrix of the segment's slot, its support in blocks of 2**16 flat elements whose
// sorted in-block offsets are either given (`offsets`) or regenerated from the slot's seeded key.
//
// One CTA per (tile of M's rows, segment, chunk of the segment's tokens). It streams the support
// elements of its rows in support order through shared memory (given offsets: read; regenerated:
// the block's permutation outputs ranked by counting, or for blocks denser than kRankMax each
// position's inverse image tested, in order) and, in the plain product, owns its outputs: each
// (token, row) is summed by one thread in support order, products rounded to fp32 before they are
// added (--fmad=false), and written once as cast(out + acc) — deterministic and bit-identical to
// the CPU kernel. The transposed product scatters into an fp32 scratch with atomics (the sum order
// of one output varies run to run in the last bits) and adds the scratch to `out` at the end.
// Outputs whose accumulated term is exactly zero are left untouched, as on every backend.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "spra_common.h"

// fp32, fp16 and bf16 only: activations and values of another dtype are refused.
#define SPRA_DISPATCH_FLOAT(TYPE, NAME, ...)                                                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace spra {
namespace {

constexpr int kThreads = 128;
constexpr int kItems = 4;                     // (row, token) outputs per thread
constexpr int kTile = kThreads * kItems;      // rows x tokens per CTA
constexpr int kChunk = 1024;                  // support elements staged in shared memory at once
constexpr int kChunkBlocks = 64;              // regenerated blocks staged at once
constexpr int kRankMax = kChunk;              // denser regenerated blocks take the membership path
constexpr int kMaxTileTokens = 32;

template <typename T, typename V>
struct Params {
  T* out;
  int64_t os;  // out[t, f] at out + t * os + f
  const T* x;
  int64_t xs_t, xs_f;
  const V* values;
  const int64_t* block_ptrs;  // [slots, blocks + 1]
  int64_t blocks;
  const uint16_t* offsets;  // null: regenerate from keys
  const int64_t* keys;
  const int32_t* segments;  // [S, 3]: first row, end row, slot
  int64_t rows, cols, numel;
  int tile_rows, tile_tokens;
  float* scratch;  // transposed: fp32 [T, cols]
};

// First position in [lo, hi) of the sorted `a` whose value is >= v.
__device__ __forceinline__ int64_t lower_bound(const uint16_t* a, int64_t lo, int64_t hi, int64_t v) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <bool kTransposed, typename T, typename V>
__global__ void __launch_bounds__(kThreads) sparse_addmm_kernel(const Params<T, V> p) {
  __shared__ int32_t s_line[kChunk];  // the element's row within the tile: -1 before it, R after it
  __shared__ int32_t s_col[kChunk];
  __shared__ float s_val[kChunk];
  __shared__ uint16_t s_gen[kChunk];  // regenerated offsets, before ranking
  __shared__ uint8_t s_owner[kChunk];  // ... and their block among the staged ones
  __shared__ int32_t s_first[kChunkBlocks + 1];
  __shared__ int64_t s_block[kChunkBlocks];
  __shared__ int64_t s_pos[kChunkBlocks];
  __shared__ int32_t s_rows[kTile + 1];  // plain product: first staged element of each tile row
  __shared__ float s_acc[2 * kTile];  // padded: (row, token) -> row * (tokens + 1) + token
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan;

  const int tid = threadIdx.x;
  const int32_t* seg = p.segments + 3 * int64_t(blockIdx.y);
  const int64_t slot = seg[2];
  const int64_t t0 = seg[0] + int64_t(blockIdx.z) * p.tile_tokens;
  const int64_t t1 = min(int64_t(seg[1]), t0 + p.tile_tokens);
  const int64_t r0 = int64_t(blockIdx.x) * p.tile_rows;
  const int64_t r1 = min(p.rows, r0 + p.tile_rows);
  if (slot < 0 || t0 >= t1 || r0 >= r1) return;  // uniform: before any barrier
  const int R = static_cast<int>(r1 - r0), lt = p.tile_tokens;
  const int64_t f0 = r0 * p.cols, f1 = r1 * p.cols;
  const int64_t* ptr = p.block_ptrs + slot * (p.blocks + 1);
  const bool narrow = int64_t(R) * p.cols < (int64_t(1) << 32);

  auto stage = [&](int pos, int64_t flat, float value) {
    int line = -1;
    int64_t col = 0;
    if (flat >= f1) {
      line = R;
    } else if (flat >= f0) {
      const int64_t local = flat - f0;
      if (narrow) {
        const uint32_t q = static_cast<uint32_t>(local) / static_cast<uint32_t>(p.cols);
        line = static_cast<int>(q);
        col = static_cast<uint32_t>(local) - q * static_cast<uint32_t>(p.cols);
      } else {
        line = static_cast<int>(local / p.cols);
        col = local - line * p.cols;
      }
    }
    s_line[pos] = line;
    s_col[pos] = static_cast<int32_t>(col);
    s_val[pos] = value;
  };

  float acc[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) acc[k] = 0.0f;

  // Adds the n staged elements' contributions; callers have synchronised after staging.
  auto consume = [&](int n) {
    if constexpr (!kTransposed) {
      for (int i = tid; i < n; i += kThreads) {
        const int line = min(s_line[i], R), prev = i ? min(s_line[i - 1], R) : -1;
        for (int r = prev + 1; r <= line; ++r) s_rows[r] = i;
      }
      for (int r = (n ? min(s_line[n - 1], R) : -1) + 1 + tid; r <= R; r += kThreads) s_rows[r] = n;
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int item = tid + k * kThreads, r = item / lt;
        const int64_t tok = t0 + item % lt;
        if (r < R && tok < t1) {
          const T* xr = p.x + tok * p.xs_t;
          float a = acc[k];
          for (int i = s_rows[r], e = s_rows[r + 1]; i < e; ++i)
            a = __fadd_rn(a, __fmul_rn(s_val[i], static_cast<float>(xr[s_col[i] * p.xs_f])));
          acc[k] = a;
        }
      }
    } else {
      for (int idx = tid; idx < n * lt; idx += kThreads) {
        const int i = idx / lt, line = s_line[i];
        const int64_t tok = t0 + idx % lt;
        if (tok < t1 && line >= 0 && line < R) {
          const float xv = static_cast<float>(p.x[tok * p.xs_t + (r0 + line) * p.xs_f]);
          atomicAdd(p.scratch + tok * p.cols + s_col[i], __fmul_rn(s_val[i], xv));
        }
      }
    }
    __syncthreads();  // the staging buffers are refilled next
  };

  const int64_t b_end = ((f1 - 1) >> kBlockBits) + 1;
  int64_t b = f0 >> kBlockBits, resume = -1;
  while (b < b_end) {
    // Fill one chunk. Control flow depends only on values every thread reads alike: uniform.
    int n = 0, staged_blocks = 0;
    bool dense = false;
    while (b < b_end && n < kChunk) {
      const int64_t p0 = ptr[b], p1 = ptr[b + 1], start = b << kBlockBits;
      if (p1 <= p0) {
        ++b;
        continue;
      }
      if (p.offsets) {
        int64_t lo = p0, hi = p1;
        if (start < f0) lo = lower_bound(p.offsets, lo, hi, f0 - start);
        if (start + kBlock > f1) hi = lower_bound(p.offsets, lo, hi, f1 - start);
        if (resume > lo) lo = resume;
        const int take = static_cast<int>(min(hi - lo, int64_t(kChunk - n)));
        for (int i = tid; i < take; i += kThreads)
          stage(n + i, start + p.offsets[lo + i], static_cast<float>(p.values[lo + i]));
        n += take;
        if (lo + take < hi) {
          resume = lo + take;  // the chunk is full: carry on inside this block next time
          break;
        }
        resume = -1;
        ++b;
      } else {
        const int64_t m = p1 - p0;
        if (m > kRankMax) {
          dense = n == 0;  // a dense block runs alone, after the chunk before it is flushed
          break;
        }
        if (n + m > kChunk || staged_blocks == kChunkBlocks) break;
        const int64_t length = min(kBlock, p.numel - start);
        const RoundKeys keys = round_keys(static_cast<uint64_t>(p.keys[slot]), b);
        const int width = feistel_width(length);
        for (int j = tid; j < m; j += kThreads) {
          s_gen[n + j] = static_cast<uint16_t>(permute(static_cast<uint32_t>(j), keys, width, length));
          s_owner[n + j] = static_cast<uint8_t>(staged_blocks);
        }
        if (tid == 0) {
          s_first[staged_blocks] = n;
          s_block[staged_blocks] = b;
          s_pos[staged_blocks] = p0;
        }
        n += static_cast<int>(m);
        ++staged_blocks;
        ++b;
      }
    }

    if (dense) {  // test every position of block b; members come out in order, ranked by a scan
      constexpr int kPer = kChunk / kThreads;
      const int64_t p0 = ptr[b], m = ptr[b + 1] - p0, start = b << kBlockBits;
      const int64_t length = min(kBlock, p.numel - start);
      const RoundKeys keys = round_keys(static_cast<uint64_t>(p.keys[slot]), b);
      const int width = feistel_width(length);
      int64_t ranked = 0;
      for (int64_t x0 = 0; x0 < length && start + x0 < f1; x0 += kChunk) {
        uint32_t member = 0;
        int count = 0;
        for (int u = 0; u < kPer; ++u) {
          const int64_t x = x0 + tid * kPer + u;
          if (x < length && permute_inverse(static_cast<uint32_t>(x), keys, width, length) < m) {
            member |= 1u << u;
            ++count;
          }
        }
        int before, total;
        Scan(scan).ExclusiveSum(count, before, total);
        for (int u = 0, k = 0; u < kPer; ++u) {
          if (member >> u & 1) {
            const int pos = before + k++;
            stage(pos, start + x0 + tid * kPer + u, static_cast<float>(p.values[p0 + ranked + pos]));
          }
        }
        ranked += total;
        __syncthreads();
        if (start + x0 + kChunk > f0) consume(total);  // chunks wholly before the tile only count ranks
      }
      ++b;
      continue;
    }
    if (!p.offsets && staged_blocks > 0) {  // rank each regenerated offset within its block
      if (tid == 0) s_first[staged_blocks] = n;
      __syncthreads();
      for (int i = tid; i < n; i += kThreads) {
        const int o = s_owner[i], lo = s_first[o], hi = s_first[o + 1];
        const uint16_t y = s_gen[i];
        int rank = 0;
        for (int j = lo; j < hi; ++j) rank += s_gen[j] < y;
        stage(lo + rank, (s_block[o] << kBlockBits) + y, static_cast<float>(p.values[s_pos[o] + rank]));
      }
    }
    if (n == 0) continue;
    __syncthreads();
    consume(n);
  }

  if constexpr (!kTransposed) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int item = tid + k * kThreads, r = item / lt;
      if (r < R) s_acc[r * (lt + 1) + item % lt] = acc[k];
    }
    __syncthreads();
    for (int idx = tid; idx < R * lt; idx += kThreads) {  // row-fastest: coalesced over the row's outputs
      const int t = idx / R, r = idx % R;
      const int64_t tok = t0 + t;
      const float a = s_acc[r * (lt + 1) + t];
      if (tok < t1 && a != 0.0f) {
        T* o = p.out + tok * p.os + r0 + r;
        *o = static_cast<T>(__fadd_rn(static_cast<float>(*o), a));
      }
    }
  }
}

// out = cast(out + scratch) on the segments' rows, where the scratch is not zero.
template <typename T>
__global__ void add_scratch_kernel(T* out, int64_t os, const float* scratch, int64_t cols, const int32_t* segments) {
  const int32_t* seg = segments + 3 * int64_t(blockIdx.y);
  if (seg[2] < 0) return;
  for (int64_t t = seg[0] + blockIdx.z; t < seg[1]; t += gridDim.z) {
    for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += int64_t(gridDim.x) * blockDim.x) {
      const float s = scratch[t * cols + c];
      if (s != 0.0f) out[t * os + c] = static_cast<T>(__fadd_rn(static_cast<float>(out[t * os + c]), s));
    }
  }
}

void sparse_addmm_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& values,
                       const at::Tensor& block_ptrs, const at::Tensor& offsets, const at::Tensor& keys,
                       const at::Tensor& segments, int64_t max_rows, bool transposed) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && out.size(0) == x.size(0), "need out [T, P] and x [T, Q]");
  TORCH_CHECK(out.stride(1) == 1 && out.scalar_type() == x.scalar_type(), "out must be row-major with x's dtype");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values must be 1-D contiguous");
  TORCH_CHECK(block_ptrs.dim() == 2 && block_ptrs.scalar_type() == at::kLong && block_ptrs.is_contiguous(),
              "block_ptrs must be int64 [slots, blocks + 1]");
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 3 && segments.scalar_type() == at::kInt &&
                  segments.is_contiguous(),
              "segments must be int32 [S, 3]");
  TORCH_CHECK(offsets.numel() == 0 || (offsets.scalar_type() == at::kShort && offsets.numel() == values.numel() &&
                                       offsets.is_contiguous()),
              "offsets must be empty or int16 parallel to values");
  TORCH_CHECK(offsets.numel() > 0 || (keys.scalar_type() == at::kLong && keys.numel() == block_ptrs.size(0) &&
                                      keys.is_contiguous()),
              "without offsets, keys must hold one int64 key per slot");
  for (const at::Tensor* t : {&x, &values, &block_ptrs, &segments})
    TORCH_CHECK(t->device() == out.device(), "all tensors must be on out's device");
  TORCH_CHECK(offsets.numel() == 0 || offsets.device() == out.device(), "offsets must be on out's device");
  TORCH_CHECK(offsets.numel() > 0 || keys.device() == out.device(), "keys must be on out's device");
  const int64_t rows = transposed ? x.size(1) : out.size(1), cols = transposed ? out.size(1) : x.size(1);
  const int64_t numel = rows * cols, blocks = (numel + kBlock - 1) / kBlock;
  TORCH_CHECK(block_ptrs.size(1) == blocks + 1, "block_ptrs has ", block_ptrs.size(1), " columns, need ", blocks + 1);
  TORCH_CHECK(cols < (int64_t(1) << 31), "matrices of 2**31 or more columns are not supported");
  const int64_t S = segments.size(0);
  if (S == 0 || max_rows <= 0 || numel == 0 || block_ptrs.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());

  int lt = 1;
  while (lt < max_rows && lt < kMaxTileTokens) lt <<= 1;
  const int tile_rows = kTile / lt;
  const int64_t chunks = (max_rows + lt - 1) / lt;
  TORCH_CHECK(S <= 65535 && chunks <= 65535, "too many segments or rows for one launch");
  const dim3 grid(static_cast<unsigned>((rows + tile_rows - 1) / tile_rows), static_cast<unsigned>(S),
                  static_cast<unsigned>(chunks));
  at::Tensor scratch;
  if (transposed) scratch = at::zeros({out.size(0), cols}, out.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();

  SPRA_DISPATCH_FLOAT(x.scalar_type(), "sparse_addmm", [&] {
    using T = scalar_t;
    SPRA_DISPATCH_FLOAT(values.scalar_type(), "sparse_addmm_values", [&] {
      using V = scalar_t;
      Params<T, V> p;
      p.out = out.data_ptr<T>();
      p.os = out.stride(0);
      p.x = x.data_ptr<T>();
      p.xs_t = x.stride(0);
      p.xs_f = x.stride(1);
      p.values = values.data_ptr<V>();
      p.block_ptrs = block_ptrs.data_ptr<int64_t>();
      p.blocks = blocks;
      p.offsets = offsets.numel() ? reinterpret_cast<const uint16_t*>(offsets.data_ptr<int16_t>()) : nullptr;
      p.keys = offsets.numel() ? nullptr : keys.data_ptr<int64_t>();
      p.segments = segments.data_ptr<int32_t>();
      p.rows = rows;
      p.cols = cols;
      p.numel = numel;
      p.tile_rows = tile_rows;
      p.tile_tokens = lt;
      p.scratch = transposed ? scratch.data_ptr<float>() : nullptr;
      if (transposed) {
        sparse_addmm_kernel<true, T, V><<<grid, kThreads, 0, stream>>>(p);
      } else {
        sparse_addmm_kernel<false, T, V><<<grid, kThreads, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (transposed) {
      const dim3 add_grid(static_cast<unsigned>(std::min<int64_t>((cols + 255) / 256, 64)), static_cast<unsigned>(S),
                          static_cast<unsigned>(std::min<int64_t>(max_rows, 64)));
      add_scratch_kernel<T><<<add_grid, 256, 0, stream>>>(out.data_ptr<T>(), out.stride(0), scratch.data_ptr<float>(),
                                                           cols, segments.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace
}  // namespace spra

TORCH_LIBRARY_IMPL(spra_tools, CUDA, m) { m.impl("sparse_addmm", &spra::sparse_addmm_cuda); }
