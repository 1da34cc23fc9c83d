// Decode attention read in place from the paged KV cache (CPU).
//
// One query token per sequence. For each (sequence, KV head) the query heads
// that share the KV head are scored against the cache rows of the sequence's
// blocks, softmaxed and summed over the V rows: every cached K and V row is
// read once, straight from its block, where gathering the context into one
// tensor first and then running SDPA on the copy reads it three times.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

using namespace pdmesh_vec;

// Positions of a sequence's attended tokens as element offsets of their rows for KV head h.
inline void row_offsets(const int64_t* blocks, int64_t first, int64_t n, int64_t block_size,
                        int64_t row, int64_t head_offset, std::vector<int64_t>& out) {
  out.resize(n);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = first + t;
    out[t] = (blocks[pos / block_size] * block_size + pos % block_size) * row + head_offset;
  }
}

// Softmax of each query head's scores in place, left unnormalised: inv gets 1 / each head's sum.
inline void softmax(float* scores, int64_t group, int64_t n, float* inv) {
  for (int64_t g = 0; g < group; ++g) inv[g] = softmax_unnormalised(scores + g * n, n);
}

// The float32 kernel below holds the head size and group at compile time: each K and V row
// is loaded once for all the group's query heads, the query heads and output accumulators
// held in registers.
template <int DIM, int G>
void decode_f32(const float* q, const float* kc, const float* vc, const int64_t* table,
                const int64_t* lo, const int64_t* hi, float* out, int64_t batch, int64_t kv_heads,
                int64_t width, int64_t block_size, float scale) {
  constexpr int V = DIM / LANES;
  const int64_t row = kv_heads * DIM;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> offsets;
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads;
      const int64_t n = hi[b] - lo[b];
      row_offsets(table + b * width, lo[b], n, block_size, row, h * DIM, offsets);
      scores.resize(G * n);
      const float* qb = q + (b * kv_heads + h) * G * DIM;  // heads are KV-major
      vf qv[G][V];
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < V; ++i) qv[g][i] = load(qb + g * DIM + i * LANES) * scale;
      for (int64_t t = 0; t < n; ++t) {
        const float* k = kc + offsets[t];
        vf kv[V];
        for (int i = 0; i < V; ++i) kv[i] = load(k + i * LANES);
        for (int g = 0; g < G; ++g) {
          vf acc = qv[g][0] * kv[0];
          for (int i = 1; i < V; ++i) acc += qv[g][i] * kv[i];
          scores[g * n + t] = hsum(acc);
        }
      }
      float inv[G];
      softmax(scores.data(), G, n, inv);
      vf acc[G][V] = {};
      for (int64_t t = 0; t < n; ++t) {
        const float* v = vc + offsets[t];
        vf vv[V];
        for (int i = 0; i < V; ++i) vv[i] = load(v + i * LANES);
        for (int g = 0; g < G; ++g) {
          const float p = scores[g * n + t];
          for (int i = 0; i < V; ++i) acc[g][i] += p * vv[i];
        }
      }
      float* ob = out + (b * kv_heads + h) * G * DIM;
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < V; ++i) {
          const vf r = acc[g][i] * inv[g];
          __builtin_memcpy(ob + g * DIM + i * LANES, &r, sizeof r);
        }
    }
  });
}

// Any dtype, head size and group: scalar loops in float.
template <typename T>
void decode_any(const T* q, const T* kc, const T* vc, const int64_t* table, const int64_t* lo,
                const int64_t* hi, T* out, int64_t batch, int64_t kv_heads, int64_t group,
                int64_t dim, int64_t width, int64_t block_size, float scale) {
  const int64_t row = kv_heads * dim;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> offsets;
    std::vector<float> scores, acc(group * dim), inv(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads;
      const int64_t n = hi[b] - lo[b];
      row_offsets(table + b * width, lo[b], n, block_size, row, h * dim, offsets);
      scores.resize(group * n);
      const T* qb = q + (b * kv_heads + h) * group * dim;
      for (int64_t t = 0; t < n; ++t)
        for (int64_t g = 0; g < group; ++g) {
          float s = 0.f;
          for (int64_t j = 0; j < dim; ++j)
            s += static_cast<float>(qb[g * dim + j]) * static_cast<float>(kc[offsets[t] + j]);
          scores[g * n + t] = s * scale;
        }
      softmax(scores.data(), group, n, inv.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t g = 0; g < group; ++g)
          for (int64_t j = 0; j < dim; ++j)
            acc[g * dim + j] += scores[g * n + t] * static_cast<float>(vc[offsets[t] + j]);
      T* ob = out + (b * kv_heads + h) * group * dim;
      for (int64_t i = 0; i < group * dim; ++i) ob[i] = static_cast<T>(acc[i] * inv[i / dim]);
    }
  });
}

// The float32 kernel for this head size and group, or nullptr.
using F32Kernel = void (*)(const float*, const float*, const float*, const int64_t*, const int64_t*,
                           const int64_t*, float*, int64_t, int64_t, int64_t, int64_t, float);
template <int DIM>
struct Groups {
  template <int G>
  static constexpr F32Kernel of = decode_f32<DIM, G>;
};

F32Kernel f32_kernel(int64_t dim, int64_t group) {
  if (dim == 64) return pdmesh_vec::variant<F32Kernel, Groups<64>, 8>(group);
  if (dim == 128) return pdmesh_vec::variant<F32Kernel, Groups<128>, 8>(group);
  return nullptr;
}

}  // namespace

// q: [B, heads, dim]; k_cache, v_cache: [slots, kv_heads, dim]; table: [B, width]
// block ids; lo, hi: [B] first and one-past-last attended positions.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor table, torch::Tensor lo, torch::Tensor hi,
                           int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode: q [B, heads, dim] and caches [slots, kv_heads, dim] expected");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode: contiguous tensors expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_decode: q and caches of one dtype expected");
  TORCH_CHECK(table.scalar_type() == at::kLong && lo.scalar_type() == at::kLong &&
                  hi.scalar_type() == at::kLong,
              "paged_decode: int64 block table and bounds expected");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1);
  TORCH_CHECK(block_size > 0, "paged_decode: block_size must be positive");
  TORCH_CHECK(k_cache.size(2) == dim && heads % kv_heads == 0,
              "paged_decode: head dims differ or heads not a multiple of kv_heads");
  auto t = table.contiguous(), l = lo.contiguous(), u = hi.contiguous();
  TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && l.numel() == batch && u.numel() == batch,
              "paged_decode: a block table row and bounds for each of the ", batch, " sequences expected");
  const int64_t slots = k_cache.size(0), width = t.size(1);
  for (int64_t b = 0; b < batch; ++b) {  // reads stay inside the cache
    const int64_t first = l.data_ptr<int64_t>()[b], last = u.data_ptr<int64_t>()[b];
    TORCH_CHECK(0 <= first && first <= last && last <= width * block_size,
                "paged_decode: sequence ", b, " attends [", first, ", ", last, ") beyond its ", width, " blocks");
    for (int64_t i = first / block_size; i < (last + block_size - 1) / block_size; ++i) {
      const int64_t block = t.data_ptr<int64_t>()[b * width + i];
      TORCH_CHECK(0 <= block && (block + 1) * block_size <= slots, "paged_decode: block ", block,
                  " outside the cache's ", slots / block_size, " blocks");
    }
  }
  auto out = torch::empty_like(q);
  const int64_t group = heads / kv_heads;
  const float sc = static_cast<float>(scale);
  if (auto f32 = q.scalar_type() == at::kFloat ? f32_kernel(dim, group) : nullptr) {
    f32(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
        t.data_ptr<int64_t>(), l.data_ptr<int64_t>(), u.data_ptr<int64_t>(), out.data_ptr<float>(),
        batch, kv_heads, width, block_size, sc);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_any<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                         v_cache.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), l.data_ptr<int64_t>(),
                         u.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), batch, kv_heads, group, dim,
                         width, block_size, sc);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(pdmesh, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor table, Tensor lo, Tensor hi, "
        "int block_size, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, &paged_decode);
}
