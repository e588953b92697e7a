// CPU kernel of spra_tools::sparse_addmm (schema and contract: spra_tools/ops/library.py), with OpenMP.
//
// out[t, :] += x[t, :] · Mᵀ (or x · M when transposed) for the rows t of each segment, M the sparse
// matrix of the segment's slot: its support in blocks of 2**16 flat elements, each block's sorted
// in-block offsets either given (`offsets`) or regenerated from the slot's seeded key. Every output
// element is summed by one thread in support order, each product rounded to fp32 before it is
// added: the non-transposed product is bit-identical to the CUDA kernel's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "spra_common.h"

// fp32, fp16 and bf16 only: activations and values of another dtype are refused.
#define SPRA_DISPATCH_FLOAT(TYPE, NAME, ...)                                                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace spra {
namespace {

struct Element {
  int64_t flat;
  float value;
};

// What every task of one call reads: the operands, without their dtypes.
struct Operands {
  int64_t rows, cols, numel, blocks;
  const int64_t* block_ptrs;  // [slots, blocks + 1]
  const uint16_t* offsets;    // null: regenerate from keys
  const int64_t* keys;
};

// The support elements of `slot` with flat index in [f0, f1), in support order, values as fp32.
template <typename V>
void collect(const Operands& op, const V* values, int64_t slot, int64_t f0, int64_t f1, std::vector<Element>* out) {
  out->clear();
  if (f0 >= f1) return;
  const int64_t* ptr = op.block_ptrs + slot * (op.blocks + 1);
  std::vector<uint32_t> generated;
  for (int64_t b = f0 >> kBlockBits; b <= (f1 - 1) >> kBlockBits; ++b) {
    const int64_t p0 = ptr[b], m = ptr[b + 1] - p0, start = b << kBlockBits;
    if (m <= 0) continue;
    const uint16_t* off = op.offsets ? op.offsets + p0 : nullptr;
    if (!off) {
      const int64_t length = std::min<int64_t>(kBlock, op.numel - start);
      const RoundKeys keys = round_keys(static_cast<uint64_t>(op.keys[slot]), b);
      const int width = feistel_width(length);
      generated.resize(m);
      for (int64_t j = 0; j < m; ++j) generated[j] = permute(static_cast<uint32_t>(j), keys, width, length);
      std::sort(generated.begin(), generated.end());
    }
    for (int64_t i = 0; i < m; ++i) {
      const int64_t flat = start + (off ? off[i] : generated[i]);
      if (flat >= f0 && flat < f1) out->push_back({flat, static_cast<float>(values[p0 + i])});
    }
  }
}

struct Segment {
  int64_t begin, end, slot;
};

// Output rows [r0, r1) of the non-transposed product for the segment's tokens: acc[t][r] summed
// over the row's elements in support order, then out = cast(out + acc) where acc != 0.
template <typename T, typename V>
void rows_task(const Operands& op, const V* values, const Segment& s, int64_t r0, int64_t r1, const T* x,
               int64_t xs_t, int64_t xs_f, T* out, int64_t os, std::vector<Element>* elements, std::vector<float>* acc) {
  collect(op, values, s.slot, r0 * op.cols, r1 * op.cols, elements);
  if (elements->empty()) return;
  const int64_t width = r1 - r0;
  acc->assign(width, 0.0f);
  for (int64_t t = s.begin; t < s.end; ++t) {
    std::fill(acc->begin(), acc->end(), 0.0f);
    const T* xt = x + t * xs_t;
    for (const Element& e : *elements) {
      const float product = e.value * static_cast<float>(xt[(e.flat % op.cols) * xs_f]);
      (*acc)[e.flat / op.cols - r0] += product;
    }
    T* ot = out + t * os;
    for (int64_t r = 0; r < width; ++r)
      if ((*acc)[r] != 0.0f) ot[r0 + r] = static_cast<T>(static_cast<float>(ot[r0 + r]) + (*acc)[r]);
  }
}

// Tokens [t0, t1) of the transposed product: every element of the slot's support, in support order.
template <typename T>
void tokens_task(const Operands& op, const std::vector<Element>& elements, int64_t t0, int64_t t1, const T* x,
                 int64_t xs_t, int64_t xs_f, T* out, int64_t os, std::vector<float>* acc) {
  acc->assign(op.cols, 0.0f);
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc->begin(), acc->end(), 0.0f);
    const T* xt = x + t * xs_t;
    for (const Element& e : elements) {
      const float product = e.value * static_cast<float>(xt[(e.flat / op.cols) * xs_f]);
      (*acc)[e.flat % op.cols] += product;
    }
    T* ot = out + t * os;
    for (int64_t c = 0; c < op.cols; ++c)
      if ((*acc)[c] != 0.0f) ot[c] = static_cast<T>(static_cast<float>(ot[c]) + (*acc)[c]);
  }
}

template <typename T, typename V>
void run(const Operands& op, const V* values, const std::vector<Segment>& segs, const T* x, int64_t xs_t,
         int64_t xs_f, T* out, int64_t os, bool transposed) {
  if (!transposed) {
    // Tasks of about one block each: (segment, rows [r0, r0 + tile)).
    const int64_t tile = std::max<int64_t>(1, kBlock / std::max<int64_t>(op.cols, 1));
    const int64_t tiles = (op.rows + tile - 1) / tile;
    const int64_t tasks = static_cast<int64_t>(segs.size()) * tiles;
#pragma omp parallel
    {
      std::vector<Element> elements;
      std::vector<float> acc;
#pragma omp for schedule(dynamic, 4)
      for (int64_t k = 0; k < tasks; ++k) {
        const int64_t r0 = (k % tiles) * tile;
        rows_task(op, values, segs[k / tiles], r0, std::min(op.rows, r0 + tile), x, xs_t, xs_f, out, os, &elements,
                  &acc);
      }
    }
    return;
  }
  // Each segment's whole support once; then tasks of a few tokens each read it.
  for (const Segment& s : segs) {
    std::vector<Element> elements;
    collect(op, values, s.slot, 0, op.numel, &elements);
    if (elements.empty()) continue;
    const int64_t chunk = 4, tasks = (s.end - s.begin + chunk - 1) / chunk;
#pragma omp parallel
    {
      std::vector<float> acc;
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < tasks; ++k) {
        const int64_t t0 = s.begin + k * chunk;
        tokens_task(op, elements, t0, std::min(s.end, t0 + chunk), x, xs_t, xs_f, out, os, &acc);
      }
    }
  }
}

void sparse_addmm_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& values,
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
  Operands op;
  op.rows = transposed ? x.size(1) : out.size(1);
  op.cols = transposed ? out.size(1) : x.size(1);
  op.numel = op.rows * op.cols;
  op.blocks = (op.numel + kBlock - 1) / kBlock;
  TORCH_CHECK(block_ptrs.size(1) == op.blocks + 1, "block_ptrs has ", block_ptrs.size(1), " columns, need ",
              op.blocks + 1);
  op.block_ptrs = block_ptrs.data_ptr<int64_t>();
  op.offsets = offsets.numel() ? reinterpret_cast<const uint16_t*>(offsets.data_ptr<int16_t>()) : nullptr;
  op.keys = offsets.numel() ? nullptr : keys.data_ptr<int64_t>();

  std::vector<Segment> segs;
  const int32_t* sg = segments.data_ptr<int32_t>();
  for (int64_t s = 0; s < segments.size(0); ++s) {
    const Segment g{sg[3 * s], sg[3 * s + 1], sg[3 * s + 2]};
    TORCH_CHECK(g.begin >= 0 && g.begin <= g.end && g.end <= x.size(0) && g.end - g.begin <= max_rows &&
                    g.slot < block_ptrs.size(0),
                "segment ", s, " out of range");
    if (g.slot >= 0 && g.end > g.begin) segs.push_back(g);
  }
  if (segs.empty() || op.numel == 0) return;

  SPRA_DISPATCH_FLOAT(x.scalar_type(), "sparse_addmm", [&] {
    using T = scalar_t;
    SPRA_DISPATCH_FLOAT(values.scalar_type(), "sparse_addmm_values", [&] {
      run<T, scalar_t>(op, values.data_ptr<scalar_t>(), segs, x.data_ptr<T>(), x.stride(0), x.stride(1),
                       out.data_ptr<T>(), out.stride(0), transposed);
    });
  });
}

}  // namespace
}  // namespace spra

TORCH_LIBRARY_IMPL(spra_tools, CPU, m) { m.impl("sparse_addmm", &spra::sparse_addmm_cpu); }
