// Tiled sampled weight gradient (SDDMM) for support-only training (schema: spra_tools/ops/library.py):
//
//   out[n] = sum_t a[t, i_n] * b[t, j_n],   i_n = idx[n] / cols, j_n = idx[n] % cols,
//
// with a [T, rows] and b [T, cols] token-major, as autograd hands them over (no transposes). The
// support is grouped once into tiles of the weight (`order`, `tile_starts`: ops.sddmm_plan). A CTA
// owns one tile and one range of tokens. It stages the tile's features of a and b, kChunk tokens at a
// time, into shared memory — feature-major, one padded row of kChunk tokens per feature — while the
// previous chunk is consumed, and each thread accumulates up to kPerThread support elements of the
// tile in fp32 registers. Each staged value serves every support element of its row (or column) in
// the tile, so the traffic from L2 is (tile rows + tile cols) x tokens per tile rather than tokens
// per support element, and the work per support element is a few shared loads and fp32 FMAs per token.
// Token ranges of one tile ("splits") write partial sums that the caller adds in a fixed order, so the
// result is deterministic. Products are fp32 FMAs (an SDDMM, unlike apply, promises no bit pattern).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>

namespace spra {
namespace {

constexpr int kThreads = 512;
constexpr int kChunk = 16;      // tokens staged per step
constexpr int kPerThread = 8;  // support elements one thread accumulates per wave (register budget: 128)
constexpr int kWave = kThreads * kPerThread;
// At most this many tile rows + tile columns: bounds the staging registers and the shared memory.
template <typename T>
constexpr int tile_sum() {
  return sizeof(T) == 4 ? 1024 : 2048;
}

// Bytes of one staged feature row: kChunk tokens plus 16 bytes of padding (fewer bank conflicts).
template <typename T>
constexpr int row_bytes() {
  return kChunk * static_cast<int>(sizeof(T)) + 16;
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// acc += <row pa, row pb> over one chunk of tokens, in token order.
template <typename T>
__device__ __forceinline__ float dot_chunk(const char* pa, const char* pb, float acc) {
  const uint4* A = reinterpret_cast<const uint4*>(pa);
  const uint4* B = reinterpret_cast<const uint4*>(pb);
  constexpr int kVecs = kChunk * sizeof(T) / 16;
#pragma unroll
  for (int q = 0; q < kVecs; ++q) {
    const uint4 x = A[q], y = B[q];
    const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        acc = __fmaf_rn(bf16_lo(xs[w]), bf16_lo(ys[w]), acc);
        acc = __fmaf_rn(bf16_hi(xs[w]), bf16_hi(ys[w]), acc);
      } else if constexpr (std::is_same_v<T, at::Half>) {
        const float2 fx = __half22float2(*reinterpret_cast<const __half2*>(&xs[w]));
        const float2 fy = __half22float2(*reinterpret_cast<const __half2*>(&ys[w]));
        acc = __fmaf_rn(fx.x, fy.x, acc);
        acc = __fmaf_rn(fx.y, fy.y, acc);
      } else {
        acc = __fmaf_rn(__uint_as_float(xs[w]), __uint_as_float(ys[w]), acc);
      }
    }
  }
  return acc;
}

// One staging work item: the 16-byte vectors of one feature group at one token slot (two adjacent
// tokens for 2-byte types, so that shared memory is written one 32-bit word per feature).
template <typename T>
struct Stage {
  static constexpr int kTokensPerItem = sizeof(T) == 2 ? 2 : 1;
  static constexpr int kSlots = kChunk / kTokensPerItem;
  uint4 v[kTokensPerItem];
};

// Raw bits of one element (zero past the end of the tile).
template <typename T>
__device__ __forceinline__ uint32_t bits_at(const T* p, bool in) {
  if constexpr (sizeof(T) == 2) return in ? *reinterpret_cast<const uint16_t*>(p) : 0u;
  else return in ? *reinterpret_cast<const uint32_t*>(p) : 0u;
}

// 16 bytes of features [f0, f0 + E) of token row t; zeros past the tile's features or tokens.
template <typename T, bool kAligned>
__device__ __forceinline__ uint4 load_vec(const T* base, int64_t ld, int count, int64_t t, int f0, int64_t t_end) {
  constexpr int E = vec_elems<T>();
  if (t >= t_end || f0 >= count) return make_uint4(0, 0, 0, 0);
  const T* src = base + t * ld + f0;
  if (kAligned && f0 + E <= count) return __ldg(reinterpret_cast<const uint4*>(src));
  uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if constexpr (sizeof(T) == 2)
      w[q] = bits_at(src + 2 * q, f0 + 2 * q < count) | bits_at(src + 2 * q + 1, f0 + 2 * q + 1 < count) << 16;
    else
      w[q] = bits_at(src + q, f0 + q < count);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Items of one chunk: every (feature group, token slot) of operand A then B, spread over the threads.
template <typename T, bool kAligned>
struct Stager {
  static constexpr int E = vec_elems<T>();
  // (tile_sum / E) feature groups x kSlots token slots, spread over the threads.
  static constexpr int kItemsMax = (tile_sum<T>() / E * Stage<T>::kSlots + kThreads - 1) / kThreads;
  // Operand a's tile (then b's): first element of the tile's features in token row 0, row pitch,
  // features in the tile, work items (feature groups x token slots). Scalars, not arrays: a runtime
  // index into an array of them would put the stager in local memory.
  const T *a_base, *b_base;
  int64_t a_ld, b_ld;
  int a_count, b_count, a_items, b_items, b_smem;

  // Item k of this thread is item threadIdx.x + k * kThreads of the chunk; the loops are unrolled so
  // that `regs` stays in registers.
  __device__ __forceinline__ void load(Stage<T>* regs, int64_t t0, int64_t t_end) const {
#pragma unroll
    for (int k = 0; k < kItemsMax; ++k) {
      const int item = threadIdx.x + k * kThreads;
      if (item >= a_items + b_items) break;
      const bool second = item >= a_items;
      const int local = item - (second ? a_items : 0);
      const int slot = local % Stage<T>::kSlots, group = local / Stage<T>::kSlots;
      const T* base = second ? b_base : a_base;
      const int64_t ld = second ? b_ld : a_ld;
      const int count = second ? b_count : a_count;
#pragma unroll
      for (int s = 0; s < Stage<T>::kTokensPerItem; ++s)
        regs[k].v[s] = load_vec<T, kAligned>(base, ld, count, t0 + slot * Stage<T>::kTokensPerItem + s, group * E, t_end);
    }
  }

  __device__ __forceinline__ void store(char* buffer, const Stage<T>* regs) const {
#pragma unroll
    for (int k = 0; k < kItemsMax; ++k) {
      const int item = threadIdx.x + k * kThreads;
      if (item >= a_items + b_items) break;
      const bool second = item >= a_items;
      const int local = item - (second ? a_items : 0);
      const int slot = local % Stage<T>::kSlots, group = local / Stage<T>::kSlots;
      char* rows = buffer + (second ? b_smem : 0) + group * E * row_bytes<T>() + slot * 4;
      if constexpr (sizeof(T) == 2) {
        const uint16_t* lo = reinterpret_cast<const uint16_t*>(&regs[k].v[0]);
        const uint16_t* hi = reinterpret_cast<const uint16_t*>(&regs[k].v[1]);
#pragma unroll
        for (int e = 0; e < E; ++e)
          *reinterpret_cast<uint32_t*>(rows + e * row_bytes<T>()) = uint32_t(lo[e]) | (uint32_t(hi[e]) << 16);
      } else {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(&regs[k].v[0]);
#pragma unroll
        for (int e = 0; e < E; ++e) *reinterpret_cast<uint32_t*>(rows + e * row_bytes<T>()) = w[e];
      }
    }
  }
};

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads, 1)
    tiled_sddmm_kernel(const T* __restrict__ a, const T* __restrict__ b, const int64_t* __restrict__ idx,
                       const int32_t* __restrict__ order, const int32_t* __restrict__ tile_starts,
                       float* __restrict__ out, int64_t tokens, int64_t rows, int64_t cols, int tile_rows,
                       int tile_cols, int tiles_c, int64_t k, int64_t tokens_per_split) {
  extern __shared__ __align__(16) char smem[];
  const int tile = blockIdx.x, split = blockIdx.y;
  const int64_t r0 = int64_t(tile / tiles_c) * tile_rows, c0 = int64_t(tile % tiles_c) * tile_cols;
  const int nr = static_cast<int>(std::min<int64_t>(tile_rows, rows - r0));
  const int nc = static_cast<int>(std::min<int64_t>(tile_cols, cols - c0));
  const int64_t t_begin = split * tokens_per_split, t_end = std::min(tokens, t_begin + tokens_per_split);
  // Plan entries are trusted only as far as memory safety needs: clamp them into [0, k].
  const int64_t e_begin = std::clamp<int64_t>(tile_starts[tile], 0, k);
  const int64_t e_end = std::clamp<int64_t>(tile_starts[tile + 1], e_begin, k);
  if (e_begin == e_end || t_begin >= t_end) {
    for (int64_t e = e_begin + threadIdx.x; e < e_end; e += kThreads) {
      const int64_t p = order[e];
      if (p >= 0 && p < k) out[split * k + p] = 0.0f;
    }
    return;
  }
  constexpr int RB = row_bytes<T>();
  const int stage_bytes = (tile_rows + tile_cols) * RB;
  const Stager<T, kAligned> stager{a + r0, b + c0, rows, cols, nr, nc,
                                   tile_rows / vec_elems<T>() * Stage<T>::kSlots,
                                   tile_cols / vec_elems<T>() * Stage<T>::kSlots, tile_rows * RB};
  Stage<T> regs[Stager<T, kAligned>::kItemsMax];
  const int64_t chunks = (t_end - t_begin + kChunk - 1) / kChunk;

  for (int64_t wave = e_begin; wave < e_end; wave += kWave) {
    // Per owned element: its row and column in the tile (-1: none, or not in this tile), and its sum.
    // Its position in the support is read again from `order` at the end (fewer live registers).
    int rc[kPerThread];
    float acc[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t e = wave + threadIdx.x + int64_t(u) * kThreads;
      rc[u] = -1;
      acc[u] = __int_as_float(0x7fc00000);  // NaN unless the element is in this tile
      if (e < e_end) {
        const int64_t p = order[e];
        if (p >= 0 && p < k) {
          const int64_t flat = idx[p], i = flat / cols, j = flat - i * cols;
          const int64_t r = i - r0, c = j - c0;
          if (r >= 0 && r < nr && c >= 0 && c < nc) {
            rc[u] = static_cast<int>(r << 12 | c);  // tiles are at most 4096 wide
            acc[u] = 0.0f;
          }
        }
      }
    }
    stager.load(regs, t_begin, t_end);
    stager.store(smem, regs);
    __syncthreads();
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      char* current = smem + (chunk & 1) * stage_bytes;
      const bool more = chunk + 1 < chunks;
      if (more) stager.load(regs, t_begin + (chunk + 1) * kChunk, t_end);
#pragma unroll
      for (int u = 0; u < kPerThread; ++u)
        if (rc[u] >= 0)
          acc[u] = dot_chunk<T>(current + (rc[u] >> 12) * RB, current + (tile_rows + (rc[u] & 4095)) * RB, acc[u]);
      if (more) stager.store(smem + ((chunk + 1) & 1) * stage_bytes, regs);
      __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t e = wave + threadIdx.x + int64_t(u) * kThreads;
      if (e < e_end) {
        const int64_t p = order[e];
        if (p >= 0 && p < k) out[split * k + p] = acc[u];
      }
    }
  }
}

template <typename T, bool kAligned>
void launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& idx, const at::Tensor& order,
            const at::Tensor& tile_starts, at::Tensor& partial, int tile_rows, int tile_cols, int tiles_c, int tiles,
            int splits, int64_t tokens_per_split) {
  auto kernel = tiled_sddmm_kernel<T, kAligned>;
  const int smem = 2 * (tile_rows + tile_cols) * row_bytes<T>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      a.data_ptr<T>(), b.data_ptr<T>(), idx.data_ptr<int64_t>(), order.data_ptr<int32_t>(),
      tile_starts.data_ptr<int32_t>(), partial.data_ptr<float>(), a.size(0), a.size(1), b.size(1), tile_rows,
      tile_cols, tiles_c, idx.numel(), tokens_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sampled_grad_tiled_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                                   const at::Tensor& order, const at::Tensor& tile_starts, int64_t tile_rows,
                                   int64_t tile_cols) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "need a [T, rows] and b [T, cols]");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must share a dtype");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "a and b must be contiguous");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1 && indices.is_contiguous(),
              "indices must be contiguous 1-D int64");
  const int64_t k = indices.numel(), rows = a.size(1), cols = b.size(1), tokens = a.size(0);
  TORCH_CHECK(k < (int64_t(1) << 31), "too many support elements for one plan");
  TORCH_CHECK(order.scalar_type() == at::kInt && order.dim() == 1 && order.numel() == k && order.is_contiguous(),
              "order must be contiguous int32 with one entry per support element");
  const int elems = 16 / static_cast<int>(a.element_size());
  const int64_t most = a.element_size() == 4 ? 1024 : 2048;  // tile_sum<T>()
  TORCH_CHECK(tile_rows > 0 && tile_cols > 0 && tile_rows % elems == 0 && tile_cols % elems == 0 &&
                  tile_rows + tile_cols <= most,
              "tile sizes must be positive multiples of ", elems, " with rows + cols <= ", most);
  const int64_t tiles_r = (rows + tile_rows - 1) / tile_rows, tiles_c = (cols + tile_cols - 1) / tile_cols;
  TORCH_CHECK(tile_starts.scalar_type() == at::kInt && tile_starts.dim() == 1 &&
                  tile_starts.numel() == tiles_r * tiles_c + 1 && tile_starts.is_contiguous(),
              "tile_starts must be contiguous int32 with one entry per tile plus one");
  for (const at::Tensor* t : {&b, &indices, &order, &tile_starts})
    TORCH_CHECK(t->device() == a.device(), "tensors must share a device");
  TORCH_CHECK(rows * cols < (int64_t(1) << 62), "weight too large");
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({k}, a.options().dtype(at::kFloat));
  if (k == 0) return out;
  if (tokens == 0) return out.zero_();

  int device, sms, smem_max;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t smem = 2 * (tile_rows + tile_cols) * (kChunk * a.element_size() + 16);
  TORCH_CHECK(smem <= smem_max, "tiles of ", tile_rows, "x", tile_cols, " need ", smem, " bytes of shared memory; ",
              "the device has ", smem_max);
  const int64_t tiles = tiles_r * tiles_c;
  TORCH_CHECK(tiles < (int64_t(1) << 31), "too many tiles");
  // Enough CTAs to fill the GPU twice over, each with at least four chunks of tokens.
  const int64_t want = (2 * int64_t(sms) + tiles - 1) / tiles;
  const int64_t splits = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, tokens / (4 * kChunk)));
  const int64_t per_split = ((tokens + splits - 1) / splits + kChunk - 1) / kChunk * kChunk;
  const int64_t used = (tokens + per_split - 1) / per_split;
  TORCH_CHECK(used <= 65535, "too many token splits");
  auto partial = used == 1 ? out : at::empty({used, k}, out.options());
  const bool aligned = rows % elems == 0 && cols % elems == 0 &&
                       reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0;
  const int tr = static_cast<int>(tile_rows), tc = static_cast<int>(tile_cols);
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    if (aligned)
      launch<T, true>(a, b, indices, order, tile_starts, partial, tr, tc, static_cast<int>(tiles_c),
                      static_cast<int>(tiles), static_cast<int>(used), per_split);
    else
      launch<T, false>(a, b, indices, order, tile_starts, partial, tr, tc, static_cast<int>(tiles_c),
                       static_cast<int>(tiles), static_cast<int>(used), per_split);
  };
  switch (a.scalar_type()) {
    case at::kBFloat16: run(at::BFloat16()); break;
    case at::kHalf: run(at::Half()); break;
    case at::kFloat: run(float()); break;
    default: TORCH_CHECK(false, "sampled_grad_tiled takes bf16, fp16 or fp32 operands, not ", a.scalar_type());
  }
  if (used > 1) at::sum_out(out, partial, {0});  // a fixed order: deterministic
  return out;
}

}  // namespace
}  // namespace spra

TORCH_LIBRARY_IMPL(spra_tools, CUDA, m) { m.impl("sampled_grad_tiled", &spra::sampled_grad_tiled_cuda); }
