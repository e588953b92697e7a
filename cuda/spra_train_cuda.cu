// CUDA kernels of the training ops (schemas: spra_tools/ops/library.py).
//
// sampled_grad — the weight gradient at the support only (an SDDMM):
//   out[n] = sum_t a[i_n, t] * b[j_n, t],   i_n = idx[n] / cols, j_n = idx[n] % cols,
// with a [rows, ld] and b [cols, ld] feature-major (tokens contiguous; ld a multiple of 8). One warp
// walks a run of consecutive support elements; the indices are sorted, so a run mostly stays in
// one row of `a`, which the warp keeps in registers and reloads only when the row changes. Each
// element then costs one coalesced read of its row of `b` (from L2: tokens are processed in chunks
// sized so that b's chunk stays resident) and a warp reduction. No atomics: every output has one
// writer, and the sum order is fixed, so results are deterministic.
//
// adamw_step — AdamW over every adapted tensor in one launch, writing W[s] = cast(W0[s] + delta).
// Each operation is rounded to fp32 exactly as the reference (__fmul_rn etc.: never contracted).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace spra {
namespace {

constexpr int kGradThreads = 256;

template <typename T>
struct Vec {
  static constexpr int kElems = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[kElems];
  };
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = __fadd_rn(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Tokens [t0, t0 + tlen) of the chunk; lane l holds vector groups l, l + 32, ..., l + 32 (U - 1).
template <typename T, int U>
__global__ void __launch_bounds__(kGradThreads)
    sampled_grad_kernel(const T* __restrict__ a, const T* __restrict__ b, const int64_t* __restrict__ idx,
                        float* __restrict__ out, int64_t k, int64_t cols, int64_t ld, int64_t t0, int64_t tlen,
                        int run, bool accumulate) {
  constexpr int E = Vec<T>::kElems;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * kGradThreads + threadIdx.x) >> 5;
  const int64_t n0 = warp * run;
  if (n0 >= k) return;
  const int64_t n1 = std::min<int64_t>(n0 + run, k);

  bool live[U];
#pragma unroll
  for (int u = 0; u < U; ++u) live[u] = int64_t(lane + 32 * u) * E < tlen;

  Vec<T> row_a[U];
  int64_t row = -1;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t flat = idx[n];
    const int64_t i = flat / cols, j = flat - i * cols;
    if (i != row) {  // uniform across the warp
      row = i;
      const T* src = a + i * ld + t0;
#pragma unroll
      for (int u = 0; u < U; ++u)
        row_a[u].raw = live[u] ? __ldg(reinterpret_cast<const uint4*>(src) + lane + 32 * u) : make_uint4(0, 0, 0, 0);
    }
    const T* src = b + j * ld + t0;
    Vec<T> col_b[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      col_b[u].raw = live[u] ? __ldg(reinterpret_cast<const uint4*>(src) + lane + 32 * u) : make_uint4(0, 0, 0, 0);
    float acc = 0.0f;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int e = 0; e < E; ++e)
        acc = __fmaf_rn(static_cast<float>(row_a[u].v[e]), static_cast<float>(col_b[u].v[e]), acc);
    acc = warp_sum(acc);
    if (lane == 0) out[n] = accumulate ? __fadd_rn(out[n], acc) : acc;
  }
}

template <typename T, int U>
void launch_sampled_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& idx, at::Tensor& out,
                         int64_t chunk, int run) {
  const int64_t k = idx.numel(), ld = a.size(1);
  const int64_t warps = (k + run - 1) / run;
  const int64_t blocks = (warps * 32 + kGradThreads - 1) / kGradThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "too many support elements for one launch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t t0 = 0; t0 < ld; t0 += chunk) {
    sampled_grad_kernel<T, U><<<static_cast<unsigned>(blocks), kGradThreads, 0, stream>>>(
        a.data_ptr<T>(), b.data_ptr<T>(), idx.data_ptr<int64_t>(), out.data_ptr<float>(), k, b.size(0), ld, t0,
        std::min(chunk, ld - t0), run, t0 > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor sampled_grad_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "a [rows, tokens] and b [cols, tokens]");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must share a dtype");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "a and b must be contiguous");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1, "indices must be 1-D int64");
  TORCH_CHECK(a.device() == b.device() && indices.device() == a.device(), "tensors must share a device");
  const c10::cuda::CUDAGuard guard(a.device());
  auto idx = indices.contiguous();
  auto out = at::empty({idx.numel()}, a.options().dtype(at::kFloat));
  if (idx.numel() == 0) return out;
  if (a.size(1) == 0) return out.zero_();
  const int64_t elem = a.element_size(), vec = 16 / elem;
  TORCH_CHECK(a.size(1) % vec == 0, "the token count must be a multiple of ", vec, " (pad it)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0,
              "a and b must be 16-byte aligned");

  // The chunk of b read per launch should stay in L2 (~20 MB of the H200's 50): cols * chunk * elem.
  int device, sms;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int units = 8;
  while (units > 1 && b.size(0) * 32 * vec * units * elem > (int64_t(20) << 20)) units >>= 1;
  while (units > 1 && 32 * vec * (units / 2) >= a.size(1)) units >>= 1;  // no idle lanes for short inputs
  const int64_t chunk = 32 * vec * units;
  // Runs long enough to reuse a's row, short enough to fill the GPU (~32 warps per SM).
  const int64_t want = std::max<int64_t>(1, idx.numel() / (int64_t(sms) * 32));
  const int run = static_cast<int>(std::clamp<int64_t>(want, 4, 64));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sampled_grad", [&] {
    switch (units) {
      case 8: launch_sampled_grad<scalar_t, 8>(a, b, idx, out, chunk, run); break;
      case 4: launch_sampled_grad<scalar_t, 4>(a, b, idx, out, chunk, run); break;
      case 2: launch_sampled_grad<scalar_t, 2>(a, b, idx, out, chunk, run); break;
      default: launch_sampled_grad<scalar_t, 1>(a, b, idx, out, chunk, run); break;
    }
  });
  return out;
}

// --- fused AdamW ------------------------------------------------------------------------------

struct AdamEntry {
  float* delta;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* weight;
  const int64_t* indices;
  const void* original;
  int64_t count;
};

struct AdamChunk {
  int32_t entry;
  int64_t start;
};

constexpr int kAdamThreads = 256;
constexpr int64_t kAdamChunk = 8192;

struct AdamScalars {
  float lr_decay;  // 1 - lr * weight_decay
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bias_correction2;
  bool decay;
};

template <typename W>
__global__ void __launch_bounds__(kAdamThreads)
    adamw_kernel(const AdamEntry* __restrict__ entries, const AdamChunk* __restrict__ chunks, AdamScalars s,
                 const float* __restrict__ grad_scale) {
  const AdamChunk c = chunks[blockIdx.x];
  const AdamEntry e = entries[c.entry];
  const int64_t end = std::min(c.start + kAdamChunk, e.count);
  W* weight = static_cast<W*>(e.weight);
  const W* original = static_cast<const W*>(e.original);
  const float scale = grad_scale ? *grad_scale : 1.0f;
  for (int64_t k = c.start + threadIdx.x; k < end; k += kAdamThreads) {
    float g = e.grad[k];
    if (grad_scale) g = __fmul_rn(g, scale);
    const float m = __fadd_rn(__fmul_rn(e.exp_avg[k], s.beta1), __fmul_rn(g, s.one_minus_beta1));
    const float v = __fadd_rn(__fmul_rn(e.exp_avg_sq[k], s.beta2), __fmul_rn(__fmul_rn(g, g), s.one_minus_beta2));
    float p = e.delta[k];
    if (s.decay) p = __fmul_rn(p, s.lr_decay);
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), s.inv_sqrt_bias_correction2), s.eps);
    p = __fsub_rn(p, __fmul_rn(__fdiv_rn(m, denom), s.step_size));
    e.exp_avg[k] = m;
    e.exp_avg_sq[k] = v;
    e.delta[k] = p;
    weight[e.indices[k]] = static_cast<W>(__fadd_rn(static_cast<float>(original[k]), p));
  }
}

void adamw_step_cuda(at::TensorList weights, at::TensorList indices, at::TensorList originals, at::TensorList deltas,
                     at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, double lr, double beta1,
                     double beta2, double eps, double weight_decay, double step_size, double inv_sqrt_bias_correction2,
                     const c10::optional<at::Tensor>& grad_scale) {
  const size_t n = weights.size();
  TORCH_CHECK(indices.size() == n && originals.size() == n && deltas.size() == n && grads.size() == n &&
                  exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "one index, original, delta, grad and moment tensor per weight");
  if (n == 0) return;
  const auto device = weights[0].device();
  const auto wtype = weights[0].scalar_type();
  const c10::cuda::CUDAGuard guard(device);
  std::vector<AdamEntry> entries(n);
  std::vector<AdamChunk> chunks;
  for (size_t t = 0; t < n; ++t) {
    const int64_t count = deltas[t].numel();
    TORCH_CHECK(weights[t].scalar_type() == wtype && originals[t].scalar_type() == wtype,
                "weights and originals of one call must share a dtype");
    for (const at::Tensor* x : {&deltas[t], &grads[t], &exp_avgs[t], &exp_avg_sqs[t]})
      TORCH_CHECK(x->scalar_type() == at::kFloat && x->is_contiguous() && x->numel() == count && x->device() == device,
                  "deltas, grads and moments must be contiguous fp32 of one length per tensor, on the weights' device");
    TORCH_CHECK(indices[t].scalar_type() == at::kLong && indices[t].numel() == count && originals[t].numel() == count &&
                    indices[t].is_contiguous() && originals[t].is_contiguous() && weights[t].is_contiguous(),
                "indices and originals must be contiguous, one per delta");
    TORCH_CHECK(weights[t].device() == device && indices[t].device() == device && originals[t].device() == device,
                "tensors must share a device");
    entries[t] = {deltas[t].data_ptr<float>(), grads[t].data_ptr<float>(), exp_avgs[t].data_ptr<float>(),
                  exp_avg_sqs[t].data_ptr<float>(), weights[t].data_ptr(), indices[t].data_ptr<int64_t>(),
                  originals[t].data_ptr(), count};
    for (int64_t start = 0; start < count; start += kAdamChunk) chunks.push_back({static_cast<int32_t>(t), start});
  }
  if (chunks.empty()) return;
  TORCH_CHECK(chunks.size() < (size_t(1) << 31), "too many elements for one launch");
  const float* scale = nullptr;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->scalar_type() == at::kFloat && grad_scale->numel() == 1 && grad_scale->device() == device,
                "grad_scale must be one fp32 value on the weights' device");
    scale = grad_scale->data_ptr<float>();
  }
  // Entries and chunks travel in one pinned buffer, copied asynchronously (the caching host
  // allocator keeps it alive until the copy has run).
  const size_t entry_bytes = n * sizeof(AdamEntry), bytes = entry_bytes + chunks.size() * sizeof(AdamChunk);
  auto host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), entry_bytes);
  std::memcpy(static_cast<char*>(host.data_ptr()) + entry_bytes, chunks.data(), chunks.size() * sizeof(AdamChunk));
  auto table = host.to(device, /*non_blocking=*/true);
  const auto* dev_entries = reinterpret_cast<const AdamEntry*>(table.data_ptr());
  const auto* dev_chunks = reinterpret_cast<const AdamChunk*>(static_cast<const char*>(table.data_ptr()) + entry_bytes);

  const AdamScalars s{static_cast<float>(1.0 - lr * weight_decay),
                      static_cast<float>(beta1),
                      static_cast<float>(1.0 - beta1),
                      static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta2),
                      static_cast<float>(eps),
                      static_cast<float>(step_size),
                      static_cast<float>(inv_sqrt_bias_correction2),
                      weight_decay != 0.0};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wtype, "adamw_step", [&] {
    adamw_kernel<scalar_t><<<static_cast<unsigned>(chunks.size()), kAdamThreads, 0, stream>>>(dev_entries, dev_chunks,
                                                                                              s, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace spra

TORCH_LIBRARY_IMPL(spra_tools, CUDA, m) {
  m.impl("sampled_grad", &spra::sampled_grad_cuda);
  m.impl("adamw_step", &spra::adamw_step_cuda);
}
