// CPU kernels of the spra_tools ops (schemas: spra_tools/ops/library.py), parallel with OpenMP.
//
// Seeded ops process every adapted tensor of a call in one parallel loop over (tensor, block)
// pairs; each block's support is regenerated on the fly (spra_common.h) and never stored.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "spra_common.h"

namespace spra {
namespace {

std::vector<TensorEntry> make_entries(at::IntArrayRef keys, at::IntArrayRef numels, at::ArrayRef<double> densities,
                                      int64_t* blocks, int64_t* values) {
  TORCH_CHECK(keys.size() == numels.size() && keys.size() == densities.size(), "keys, numels, densities differ in length");
  std::vector<TensorEntry> entries(keys.size());
  int64_t b = 0, v = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0 && densities[i] > 0.0 && densities[i] <= 1.0, "invalid numel or density");
    entries[i] = {static_cast<uint64_t>(keys[i]), numels[i], densities[i], b, v};
    b += (numels[i] + kBlock - 1) / kBlock;
    v += cum_count(densities[i], numels[i]);
  }
  *blocks = b;
  *values = v;
  return entries;
}

// Sorts distinct block offsets (< 2**16; n <= kSortMax) from `a` into `out`, with `count` (4097
// entries): bucket by the top bits, about half an offset a bucket, then insertion-sort within each
// bucket. Linear in n; far cheaper than a comparison sort of random data at these sizes.
void sort_offsets(const uint32_t* a, int64_t n, uint32_t* out, int32_t* count) {
  int bits = 4;
  while (bits < 12 && (int64_t(1) << bits) < 2 * n) ++bits;
  const int shift = 16 - bits, buckets = 1 << bits;
  std::fill(count, count + buckets + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++count[(a[i] >> shift) + 1];
  for (int d = 0; d < buckets; ++d) count[d + 1] += count[d];
  for (int64_t i = 0; i < n; ++i) out[count[a[i] >> shift]++] = a[i];
  for (int64_t i = 1; i < n; ++i) {  // buckets are in order: one insertion pass sorts within them
    const uint32_t v = out[i];
    if (out[i - 1] <= v) continue;
    int64_t j = i - 1;
    while (j >= 0 && out[j] > v) {
      out[j + 1] = out[j];
      --j;
    }
    out[j + 1] = v;
  }
}

// Runs f(k) for k in [0, n) on all cores when n is large enough to pay for them.
template <typename F>
void parallel_for(int64_t n, F f) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t k = 0; k < n; ++k) f(k);
}

// Calls f(tensor, flat index, position in the flat values) once for every support element.
// `touch(tensor, flat index)` runs over a block's elements first: a prefetch of the weights, so
// the block's cache misses overlap instead of following one another. Blocks dense enough to pay
// for it evaluate the permutation through a table of its round function (spra_common.h).
template <typename F, typename T>
void for_each_element(const std::vector<TensorEntry>& entries, int64_t blocks, F f, T touch) {
  if (entries.empty()) return;
#pragma omp parallel if (blocks >= 16)  // below that, waking the team costs more than it saves
  {
    std::vector<uint32_t> offsets, scratch(kSortMax);
    std::vector<int32_t> count(4097);
    uint8_t table[kRounds << 8];
#pragma omp for schedule(dynamic, 8)
    for (int64_t g = 0; g < blocks; ++g) {
      const Block k = locate_block(entries.data(), static_cast<int>(entries.size()), g);
      const int64_t m = k.count;
      if (m == 0) continue;
      offsets.clear();
      if (m <= kSortMax) {
        offsets.resize(m);
        uint32_t* s = scratch.data();
        if (m > (int64_t(1) << (k.width / 2))) {
          feistel_tabulate(table, k.keys, k.width, 0, 1);
          for (int64_t j = 0; j < m; ++j) s[j] = permute_tabled(static_cast<uint32_t>(j), table, k.width, k.length);
        } else if (k.length == kBlock) {  // no cycle walking: a loop the compiler vectorises
          for (int64_t j = 0; j < m; ++j) s[j] = feistel(static_cast<uint32_t>(j), k.keys, kBlockBits);
        } else {
          for (int64_t j = 0; j < m; ++j) s[j] = permute(static_cast<uint32_t>(j), k.keys, k.width, k.length);
        }
        sort_offsets(s, m, offsets.data(), count.data());
      } else {
        for (int64_t x = 0; x < k.length; ++x)
          if (permute_inverse(static_cast<uint32_t>(x), k.keys, k.width, k.length) < m)
            offsets.push_back(static_cast<uint32_t>(x));
      }
      for (int64_t r = 0; r < m; ++r) touch(k.tensor, k.start + offsets[r]);
      for (int64_t r = 0; r < m; ++r) f(k.tensor, k.start + offsets[r], k.first + r);
    }
  }
}

std::vector<TensorEntry> entries_for(const at::TensorList& weights, at::IntArrayRef keys, at::ArrayRef<double> densities,
                                     int64_t* blocks, int64_t* values) {
  std::vector<int64_t> numels;
  for (const auto& w : weights) {
    TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "weights must be contiguous CPU tensors");
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type(), "weights of one call must share a dtype");
    numels.push_back(w.numel());
  }
  return make_entries(keys, numels, densities, blocks, values);
}

constexpr auto no_touch = [](int, int64_t) {};

template <typename W>
auto prefetch(const std::vector<W*>& w) {
  return [&w](int t, int64_t index) { __builtin_prefetch(w[t] + index, 1); };
}

template <typename W>
std::vector<W*> pointers(const at::TensorList& weights) {
  std::vector<W*> p;
  for (const auto& w : weights) p.push_back(w.data_ptr<W>());
  return p;
}

at::Tensor seeded_indices_cpu(const at::Tensor& device_like, at::IntArrayRef keys, at::IntArrayRef numels,
                              at::ArrayRef<double> densities) {
  int64_t blocks, values;
  auto entries = make_entries(keys, numels, densities, &blocks, &values);
  auto out = at::empty({values}, device_like.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for_each_element(entries, blocks, [&](int, int64_t index, int64_t k) { o[k] = index; }, no_touch);
  return out;
}

at::Tensor seeded_gather_cpu(at::TensorList weights, at::IntArrayRef keys, at::ArrayRef<double> densities) {
  int64_t blocks, values;
  auto entries = entries_for(weights, keys, densities, &blocks, &values);
  if (weights.empty()) return at::empty({0});
  auto out = at::empty({values}, weights[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "seeded_gather", [&] {
    auto w = pointers<scalar_t>(weights);
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_element(entries, blocks, [&](int t, int64_t index, int64_t k) { o[k] = w[t][index]; }, prefetch(w));
  });
  return out;
}

template <typename W, typename V>
inline W add_scaled(W w, V v, float scale, bool scaled) {
  const float delta = scaled ? static_cast<float>(v) * scale : static_cast<float>(v);
  return static_cast<W>(static_cast<float>(w) + delta);
}

at::Tensor seeded_apply_cpu(at::TensorList weights, at::IntArrayRef keys, at::ArrayRef<double> densities,
                            const at::Tensor& values, double scale, bool save_originals) {
  int64_t blocks, count;
  auto entries = entries_for(weights, keys, densities, &blocks, &count);
  TORCH_CHECK(values.is_contiguous() && values.numel() == count, "values must be contiguous with one entry per support element");
  if (weights.empty()) return at::empty({0}, values.options());
  auto originals = at::empty({save_originals ? count : 0}, weights[0].options());
  const float s = static_cast<float>(scale);
  const bool scaled = s != 1.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "seeded_apply", [&] {
    using W = scalar_t;
    auto w = pointers<W>(weights);
    W* orig = save_originals ? originals.data_ptr<W>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "seeded_apply_values", [&] {
      const scalar_t* v = values.data_ptr<scalar_t>();
      for_each_element(entries, blocks, [&](int t, int64_t index, int64_t k) {
        W& x = w[t][index];
        if (orig) orig[k] = x;
        x = add_scaled(x, v[k], s, scaled);
      }, prefetch(w));
    });
  });
  return originals;
}

void seeded_restore_cpu(at::TensorList weights, at::IntArrayRef keys, at::ArrayRef<double> densities,
                        const at::Tensor& originals) {
  int64_t blocks, count;
  auto entries = entries_for(weights, keys, densities, &blocks, &count);
  if (weights.empty()) return;
  TORCH_CHECK(originals.numel() == count && originals.scalar_type() == weights[0].scalar_type(),
              "originals must hold one weight-dtype entry per support element");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "seeded_restore", [&] {
    auto w = pointers<scalar_t>(weights);
    const scalar_t* o = originals.data_ptr<scalar_t>();
    for_each_element(entries, blocks, [&](int t, int64_t index, int64_t k) { w[t][index] = o[k]; }, prefetch(w));
  });
}

// --- explicit supports, many tensors in one call -------------------------------------------------

// Calls f(tensor, flat index, k) for every element k of an explicit call: element k belongs to the
// tensor t with firsts[t] <= k < firsts[t + 1] and sits at indices[k] in it. Chunks run in
// parallel; inside one, each element is touched (prefetched) kAhead elements before its turn.
template <typename I, typename F, typename T>
void for_each_indexed(const std::vector<int64_t>& firsts, const I* indices, F f, T touch) {
  constexpr int64_t kChunk = 4096, kAhead = 24;
  const int n = static_cast<int>(firsts.size()) - 1;
  const int64_t total = firsts.back();
  const int64_t chunks = (total + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (total > 65536)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk, end = std::min(total, begin + kChunk);
    int t = static_cast<int>(std::upper_bound(firsts.begin(), firsts.begin() + n, begin) - firsts.begin()) - 1;
    int ahead = t;  // the tensor of the element being touched
    auto touch_at = [&](int64_t a) {
      while (firsts[ahead + 1] <= a) ++ahead;
      touch(ahead, static_cast<int64_t>(indices[a]));
    };
    for (int64_t a = begin; a < std::min(end, begin + kAhead); ++a) touch_at(a);
    for (int64_t k = begin; k < end; ++k) {
      if (k + kAhead < end) touch_at(k + kAhead);
      while (firsts[t + 1] <= k) ++t;
      f(t, static_cast<int64_t>(indices[k]), k);
    }
  }
}

// The first element of each tensor's indices (counts.size() + 1 entries, the last = total).
std::vector<int64_t> firsts_of(const at::TensorList& weights, const at::Tensor& indices, at::IntArrayRef counts) {
  TORCH_CHECK(!weights.empty() && counts.size() == weights.size(), "need one count per weight, and a weight");
  TORCH_CHECK(indices.dim() == 1 && indices.is_contiguous() &&
                  (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt),
              "indices must be 1-D contiguous int64 or int32");
  for (const auto& w : weights) {
    TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "weights must be contiguous CPU tensors");
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type(), "weights of one call must share a dtype");
  }
  std::vector<int64_t> firsts{0};
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0, "counts must not be negative");
    firsts.push_back(firsts.back() + c);
  }
  TORCH_CHECK(indices.numel() == firsts.back(), "indices must hold sum(counts) entries");
  return firsts;
}

template <typename F>
void dispatch_index(const at::Tensor& indices, F f) {
  if (indices.scalar_type() == at::kInt) f(indices.data_ptr<int32_t>());
  else f(indices.data_ptr<int64_t>());
}

at::Tensor gather_many_cpu(at::TensorList weights, const at::Tensor& indices, at::IntArrayRef counts) {
  auto firsts = firsts_of(weights, indices, counts);
  auto out = at::empty({firsts.back()}, weights[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "gather_many", [&] {
    auto w = pointers<scalar_t>(weights);
    scalar_t* o = out.data_ptr<scalar_t>();
    dispatch_index(indices, [&](const auto* idx) {
      for_each_indexed(firsts, idx, [&](int t, int64_t index, int64_t k) { o[k] = w[t][index]; }, prefetch(w));
    });
  });
  return out;
}

at::Tensor scatter_apply_many_cpu(at::TensorList weights, const at::Tensor& indices, at::IntArrayRef counts,
                                  const at::Tensor& values, double scale, bool save_originals) {
  auto firsts = firsts_of(weights, indices, counts);
  TORCH_CHECK(values.is_contiguous() && values.numel() == firsts.back(), "values must be contiguous with one entry per index");
  auto originals = at::empty({save_originals ? firsts.back() : 0}, weights[0].options());
  const float s = static_cast<float>(scale);
  const bool scaled = s != 1.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "scatter_apply_many", [&] {
    using W = scalar_t;
    auto w = pointers<W>(weights);
    W* orig = save_originals ? originals.data_ptr<W>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "scatter_apply_many_values", [&] {
      const scalar_t* v = values.data_ptr<scalar_t>();
      dispatch_index(indices, [&](const auto* idx) {
        for_each_indexed(firsts, idx, [&](int t, int64_t index, int64_t k) {
          W& x = w[t][index];
          if (orig) orig[k] = x;
          x = add_scaled(x, v[k], s, scaled);
        }, prefetch(w));
      });
    });
  });
  return originals;
}

void restore_many_cpu(at::TensorList weights, const at::Tensor& indices, at::IntArrayRef counts,
                      const at::Tensor& originals) {
  auto firsts = firsts_of(weights, indices, counts);
  TORCH_CHECK(originals.is_contiguous() && originals.numel() == firsts.back() &&
                  originals.scalar_type() == weights[0].scalar_type(),
              "originals must hold one weight-dtype entry per index");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "restore_many", [&] {
    auto w = pointers<scalar_t>(weights);
    const scalar_t* o = originals.data_ptr<scalar_t>();
    dispatch_index(indices, [&](const auto* idx) {
      for_each_indexed(firsts, idx, [&](int t, int64_t index, int64_t k) { w[t][index] = o[k]; }, prefetch(w));
    });
  });
}

// --- explicit supports, one tensor ------------------------------------------------------------------

void check_explicit(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values) {
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1, "indices must be 1-D int64");
  TORCH_CHECK(values.numel() == indices.numel(), "one value per index");
}

at::Tensor gather_cpu(const at::Tensor& weight, const at::Tensor& indices) {
  check_explicit(weight, indices, indices);
  auto idx = indices.contiguous();
  auto out = at::empty({idx.numel()}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gather", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t* i = idx.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    parallel_for(idx.numel(), [&](int64_t k) { o[k] = w[i[k]]; });
  });
  return out;
}

void scatter_apply_cpu(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double scale) {
  check_explicit(weight, indices, values);
  auto idx = indices.contiguous();
  auto val = values.contiguous();
  const float s = static_cast<float>(scale);
  const bool scaled = s != 1.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "scatter_apply", [&] {
    using W = scalar_t;
    W* w = weight.data_ptr<W>();
    const int64_t* i = idx.data_ptr<int64_t>();
    const int64_t n = idx.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(), "scatter_apply_values", [&] {
      const scalar_t* v = val.data_ptr<scalar_t>();
      parallel_for(n, [&](int64_t k) { w[i[k]] = add_scaled(w[i[k]], v[k], s, scaled); });
    });
  });
}

void restore_cpu(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& original) {
  check_explicit(weight, indices, original);
  TORCH_CHECK(original.scalar_type() == weight.scalar_type(), "originals must have the weight's dtype");
  auto idx = indices.contiguous();
  auto orig = original.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "restore", [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t* i = idx.data_ptr<int64_t>();
    const scalar_t* o = orig.data_ptr<scalar_t>();
    parallel_for(idx.numel(), [&](int64_t k) { w[i[k]] = o[k]; });
  });
}

}  // namespace
}  // namespace spra

TORCH_LIBRARY_IMPL(spra_tools, CPU, m) {
  m.impl("seeded_indices", &spra::seeded_indices_cpu);
  m.impl("seeded_gather", &spra::seeded_gather_cpu);
  m.impl("seeded_apply", &spra::seeded_apply_cpu);
  m.impl("seeded_restore", &spra::seeded_restore_cpu);
  m.impl("gather", &spra::gather_cpu);
  m.impl("scatter_apply", &spra::scatter_apply_cpu);
  m.impl("restore", &spra::restore_cpu);
  m.impl("gather_many", &spra::gather_many_cpu);
  m.impl("scatter_apply_many", &spra::scatter_apply_many_cpu);
  m.impl("restore_many", &spra::restore_many_cpu);
}
