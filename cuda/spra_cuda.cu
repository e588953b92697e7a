// CUDA kernels of the spra_tools ops (schemas: spra_tools/ops/library.py).
//
// Seeded ops: one launch for every adapted tensor of a call; each CTA walks over 2**16-element
// blocks (a grid-stride loop: at 0.1 % a block holds ~65 elements, too little work to pay for a
// CTA launch of its own). A CTA regenerates a block's support in shared memory (sorting the first m permutation
// outputs, or, for dense blocks, testing each position's inverse image and ranking by a block
// scan) and applies the op to each element; supports are never stored in global memory.
// Arithmetic is spelled with __fmul_rn / __fadd_rn so it is never contracted into an FMA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>
#include <cstring>
#include <vector>

#include "spra_common.h"

namespace spra {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Blocks with at most this many elements (density up to ~1.5 %) are handled by one warp each.
constexpr int kWarpMax = 1024;
constexpr int kBuckets = 64;  // of 1024 offsets each

// One warp per sparse block: bucket the permutation outputs by their top 6 bits (a counting
// sort: shared atomics place them), then sort each bucket — a few elements — by insertion. The
// atomics only decide the order inside a bucket, which the insertion sort then fixes, so the
// result is deterministic. O(m) work, against O(m log^2 m) for a bitonic sort over the CTA.
template <typename Op>
__global__ void __launch_bounds__(kThreads) warp_kernel(const TensorEntry* entries, int n, int64_t blocks, Op op) {
  __shared__ uint16_t unsorted[kWarps][kWarpMax];
  __shared__ uint16_t sorted[kWarps][kWarpMax];
  __shared__ int fill[kWarps][kBuckets];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint16_t* in = unsorted[warp];
  uint16_t* out = sorted[warp];
  int* slot = fill[warp];

  for (int64_t g = int64_t(blockIdx.x) * kWarps + warp; g < blocks; g += int64_t(gridDim.x) * kWarps) {
    const Block k = locate_block(entries, n, g);
    if (k.count == 0 || k.count > kWarpMax) continue;  // uniform across the warp
    const int m = static_cast<int>(k.count);

    slot[lane] = 0;
    slot[lane + 32] = 0;
    __syncwarp();
    for (int j = lane; j < m; j += 32) {
      const uint16_t y = static_cast<uint16_t>(permute(static_cast<uint32_t>(j), k.keys, k.width, k.length));
      in[j] = y;
      atomicAdd(&slot[y >> 10], 1);
    }
    __syncwarp();
    // Exclusive scan of the 64 bucket sizes: lane l owns buckets 2l and 2l+1.
    const int c0 = slot[2 * lane], c1 = slot[2 * lane + 1];
    int sum = c0 + c1;
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xFFFFFFFFu, sum, d);
      if (lane >= d) sum += up;
    }
    const int begin0 = sum - c0 - c1, begin1 = begin0 + c0;
    __syncwarp();
    slot[2 * lane] = begin0;
    slot[2 * lane + 1] = begin1;
    __syncwarp();
    for (int j = lane; j < m; j += 32) {
      const uint16_t y = in[j];
      out[atomicAdd(&slot[y >> 10], 1)] = y;
    }
    __syncwarp();
    for (int half = 0; half < 2; ++half) {  // insertion sort of this lane's two buckets
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
    __syncwarp();
    for (int r = lane; r < m; r += 32) op(k.tensor, k.start + out[r], k.first + r);
    __syncwarp();
  }
}

template <typename Op>
__global__ void __launch_bounds__(kThreads) seeded_kernel(const TensorEntry* entries, int n, int64_t blocks, Op op) {
  // Offsets within a block are < 2**16; padding with 0xFFFF is harmless: it sorts last, and a
  // real offset 0xFFFF among the pads reads back the same value.
  __shared__ uint16_t offsets[kSortMax];
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan;

  for (int64_t g = blockIdx.x; g < blocks; g += gridDim.x) {
    const Block blk = locate_block(entries, n, g);
    const int64_t m = blk.count;
    if (m <= kWarpMax) continue;  // sparse blocks belong to warp_kernel; uniform across the CTA

    if (m <= kSortMax) {
      int p = 1;
      while (p < m) p <<= 1;
      for (int j = threadIdx.x; j < p; j += kThreads)
        offsets[j] = j < m ? static_cast<uint16_t>(permute(static_cast<uint32_t>(j), blk.keys, blk.width, blk.length))
                           : 0xFFFF;
      __syncthreads();
      for (int k = 2; k <= p; k <<= 1) {  // bitonic sort of p entries
        for (int j = k >> 1; j > 0; j >>= 1) {
          for (int i = threadIdx.x; i < p; i += kThreads) {
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
      for (int r = threadIdx.x; r < m; r += kThreads) op(blk.tensor, blk.start + offsets[r], blk.first + r);
    } else {
      int64_t rank = 0;
      for (int64_t x0 = 0; x0 < blk.length; x0 += kThreads) {
        const int64_t x = x0 + threadIdx.x;
        const int member =
            x < blk.length && permute_inverse(static_cast<uint32_t>(x), blk.keys, blk.width, blk.length) < m;
        int below, total;
        Scan(scan).ExclusiveSum(member, below, total);
        if (member) op(blk.tensor, blk.start + x, blk.first + rank + below);
        rank += total;
        __syncthreads();
      }
    }
    __syncthreads();  // shared memory is reused by the next block
  }
}

struct IndicesOp {
  int64_t* out;
  __device__ void operator()(int, int64_t index, int64_t k) const { out[k] = index; }
};

template <typename W>
struct GatherOp {
  W* const* weights;
  W* out;
  __device__ void operator()(int t, int64_t index, int64_t k) const { out[k] = weights[t][index]; }
};

template <typename W, typename V>
__device__ __forceinline__ W add_scaled(W w, V v, float scale, bool scaled) {
  const float delta = scaled ? __fmul_rn(static_cast<float>(v), scale) : static_cast<float>(v);
  return static_cast<W>(__fadd_rn(static_cast<float>(w), delta));
}

template <typename W, typename V>
struct ApplyOp {
  W* const* weights;
  const V* values;
  W* originals;  // may be null
  float scale;
  bool scaled;
  __device__ void operator()(int t, int64_t index, int64_t k) const {
    W& x = weights[t][index];
    const W old = x;
    if (originals) originals[k] = old;
    x = add_scaled(old, values[k], scale, scaled);
  }
};

template <typename W>
struct RestoreOp {
  W* const* weights;
  const W* originals;
  __device__ void operator()(int t, int64_t index, int64_t k) const { weights[t][index] = originals[k]; }
};

// Entries and weight pointers, copied to the device in one buffer.
struct Table {
  at::Tensor buffer;
  int n = 0;
  int64_t blocks = 0, values = 0;
  bool has_sparse = false, has_dense = false;  // blocks for warp_kernel / seeded_kernel
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
    // A full block holds floor(d * 2**16) elements, give or take one; a short block fewer. The
    // margins only cost an idle launch; each kernel checks every block's own count.
    const int64_t typical = cum_count(densities[i], kBlock);
    table.has_sparse |= numels[i] > 0 && (typical - 2 <= kWarpMax || numels[i] % kBlock != 0);
    table.has_dense |= numels[i] > 0 && typical + 2 > kWarpMax;
  }
  TORCH_CHECK(table.blocks < (int64_t(1) << 31), "too many blocks for one launch");
  const size_t bytes = entries.size() * sizeof(TensorEntry) + pointers.size() * sizeof(void*);
  auto host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), entries.data(), entries.size() * sizeof(TensorEntry));
  std::memcpy(static_cast<char*>(host.data_ptr()) + entries.size() * sizeof(TensorEntry), pointers.data(),
              pointers.size() * sizeof(void*));
  table.buffer = host.to(device);  // a few KiB
  return table;
}

template <typename Op>
void launch(const Table& table, Op op) {
  if (table.blocks == 0 || table.values == 0) return;
  int device, sms;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (table.has_sparse) {
    const int64_t grid = std::min<int64_t>((table.blocks + kWarps - 1) / kWarps, int64_t(sms) * 16);
    warp_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(table.entries(), table.n, table.blocks, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (table.has_dense) {
    const int64_t grid = std::min<int64_t>(table.blocks, int64_t(sms) * 16);
    seeded_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(table.entries(), table.n, table.blocks, op);
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

// --- explicit supports ---------------------------------------------------------------------------

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
}
