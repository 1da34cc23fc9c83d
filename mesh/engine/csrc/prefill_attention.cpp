// Causal attention of a prompt chunk over its context (CPU, fp32).
//
// The chunk's queries are the last q_len of the context's positions; each attends
// to the keys at or before its own position (and within the sliding window, if
// any). Work items are (KV head, tile of TQ query tokens): the tile's rows, its
// tokens times the query heads that share the KV head, are scored against the
// keys up to the tile's last position as small matrix products, on a transposed
// copy of the KV head's keys (so that a score row is 16 lanes of keys, not one
// horizontal sum per key), softmaxed row by row and summed over the V rows, read
// in place. torch's flash kernel ran the small model's 360-token prompts at about
// 60 GFLOP/s on 2 cores, where its projections run at about 200.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace pdmesh_vec;

constexpr int TQ = 16;       // query tokens per work item
constexpr int KB = 2 * LANES;  // keys per score block
#ifdef __AVX512F__
constexpr int SR = 12;  // score rows per register block: 24 accumulators + 2 key vectors
#else
constexpr int SR = 3;   // a vf is two ymm halves: 12 + 4 of the 16 registers
#endif

// Scores of rows [r0, r0 + R) of q (scaled, [rows][DIM]) against keys [0, nk) of kt
// ([DIM][ldk], keys transposed, zero past the context) into s ([rows][lds]).
template <int DIM, int R>
void scores(const float* q, const float* kt, int64_t ldk, int64_t nk, float* s, int64_t lds, int r0) {
  for (int64_t k0 = 0; k0 < nk; k0 += KB) {
    vf acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vf{};
    for (int d = 0; d < DIM; ++d) {
      const vf k_lo = load(kt + d * ldk + k0), k_hi = load(kt + d * ldk + k0 + LANES);
      for (int r = 0; r < R; ++r) {
        const float x = q[(r0 + r) * DIM + d];
        acc[r][0] += x * k_lo;
        acc[r][1] += x * k_hi;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(s + (r0 + r) * lds + k0, acc[r][0]);
      store(s + (r0 + r) * lds + k0 + LANES, acc[r][1]);
    }
  }
}

// Rows [r0, r0 + R) of p ([rows][ldp], zero outside each row's keys) times v's rows [0, nk)
// (row i at v + i * ldv), each output row scaled by inv[row], into out (row r at out_rows[r]).
template <int DIM, int R>
void weighted_values(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nk,
                     const float* inv, float* const* out_rows, int r0) {
  constexpr int V = DIM / LANES;
  vf acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < V; ++i) acc[r][i] = vf{};
  for (int64_t t = 0; t < nk; ++t) {
    vf vv[V];
    for (int i = 0; i < V; ++i) vv[i] = load(v + t * ldv + i * LANES);
    for (int r = 0; r < R; ++r) {
      const float w = p[(r0 + r) * ldp + t];
      for (int i = 0; i < V; ++i) acc[r][i] += w * vv[i];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < V; ++i) store(out_rows[r0 + r] + i * LANES, acc[r][i] * inv[r0 + r]);
}

// f(rows_in_block, first_row) over [0, rows): blocks of CHUNK rows, then single rows.
template <int CHUNK, typename F>
inline void in_blocks(int rows, F f) {
  int r = 0;
  for (; r + CHUNK <= rows; r += CHUNK) f(std::integral_constant<int, CHUNK>{}, r);
  for (; r < rows; ++r) f(std::integral_constant<int, 1>{}, r);
}

// The keys of one KV head, transposed ([DIM][width]), filled as far as a thread's items need.
struct TransposedKeys {
  std::vector<float> data;
  int64_t head = -1, width = 0, filled = 0;

  template <int DIM>
  void cover(const float* k, int64_t kv_row, int64_t h, int64_t ctx_len, int64_t upto) {
    if (head != h) {
      width = (ctx_len + KB - 1) / KB * KB;
      data.assign(DIM * width, 0.f);
      head = h;
      filled = 0;
    }
    for (; filled < upto; ++filled) {
      const float* row = k + filled * kv_row + h * DIM;
      for (int d = 0; d < DIM; ++d) data[d * width + filled] = row[d];
    }
  }
};

template <int DIM, int G>
void prefill_f32(const float* q, int64_t q_row, const float* k, const float* v, float* out, int64_t q_len,
                 int64_t ctx_len, int64_t kv_heads, int64_t window, float scale) {
  constexpr int PR = DIM <= 64 ? 6 : 3;  // output rows per register block: PR x DIM / 16 accumulators
  const int64_t kv_row = kv_heads * DIM, out_row = kv_heads * G * DIM, first_pos = ctx_len - q_len;
  const int64_t tiles = (q_len + TQ - 1) / TQ;
  // Items alternate a head's first and last tiles (0, n-1, 1, n-2, ...): a causal tile's work
  // grows with its position, and each thread takes a contiguous range of items.
  at::parallel_for(0, kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    TransposedKeys keys;
    std::vector<float> qs(TQ * G * DIM), s, inv(TQ * G);
    std::vector<float*> out_rows(TQ * G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / tiles, i = item % tiles;
      const int64_t tile = i % 2 == 0 ? i / 2 : tiles - 1 - i / 2;
      const int64_t t0 = tile * TQ, tokens = std::min<int64_t>(TQ, q_len - t0);
      const int rows = static_cast<int>(tokens * G);
      const int64_t last_pos = first_pos + t0 + tokens - 1;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, first_pos + t0 - window + 1) : 0;
      const int64_t k0 = lo - lo % KB, nk = last_pos + 1 - k0;  // the tile's keys: [k0, last_pos]
      const int64_t lds = (nk + KB - 1) / KB * KB;
      keys.cover<DIM>(k, kv_row, h, ctx_len, last_pos + 1);
      for (int64_t t = 0; t < tokens; ++t)
        for (int g = 0; g < G; ++g) {
          const float* src = q + (t0 + t) * q_row + (h * G + g) * DIM;
          float* dst = qs.data() + (t * G + g) * DIM;
          for (int d = 0; d < DIM; ++d) dst[d] = src[d] * scale;
          out_rows[t * G + g] = out + (t0 + t) * out_row + (h * G + g) * DIM;
        }
      s.resize(static_cast<size_t>(rows) * lds);
      const float* kt = keys.data.data() + k0;
      in_blocks<SR>(rows, [&](auto r_block, int r0) {
        scores<DIM, decltype(r_block)::value>(qs.data(), kt, keys.width, nk, s.data(), lds, r0);
      });
      for (int r = 0; r < rows; ++r) {  // each row's own keys: [its window's start, its position]
        const int64_t pos = first_pos + t0 + r / G;
        const int64_t from = (window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0) - k0, to = pos + 1 - k0;
        float* row = s.data() + static_cast<size_t>(r) * lds;
        std::fill(row, row + from, 0.f);
        inv[r] = softmax_unnormalised(row + from, to - from);
        std::fill(row + to, row + nk, 0.f);
      }
      in_blocks<PR>(rows, [&](auto r_block, int r0) {
        weighted_values<DIM, decltype(r_block)::value>(s.data(), lds, v + k0 * kv_row + h * DIM, kv_row, nk,
                                                       inv.data(), out_rows.data(), r0);
      });
    }
  });
}

using Kernel = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t, float);

template <int DIM>
struct Groups {
  template <int G>
  static constexpr Kernel of = prefill_f32<DIM, G>;
};

Kernel kernel_for(int64_t dim, int64_t group) {
  switch (dim) {
    case 16: return pdmesh_vec::variant<Kernel, Groups<16>, 8>(group);
    case 32: return pdmesh_vec::variant<Kernel, Groups<32>, 8>(group);
    case 64: return pdmesh_vec::variant<Kernel, Groups<64>, 8>(group);
    case 128: return pdmesh_vec::variant<Kernel, Groups<128>, 8>(group);
    default: return nullptr;
  }
}

}  // namespace


// q: [q_len, heads, dim] (rows may be strided: a view of the step's q, k and v);
// k, v: [ctx_len, kv_heads, dim], contiguous; window: the sliding window, 0 for none.
// Returns [q_len, heads, dim].
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(),
              "prefill_attention: q [q_len, heads, dim] and k, v [ctx_len, kv_heads, dim] expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "prefill_attention: fp32 q, k and v expected");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "prefill_attention: contiguous k and v, and q rows of contiguous heads expected");
  const int64_t q_len = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t ctx_len = k.size(0), kv_heads = k.size(1);
  TORCH_CHECK(k.size(2) == dim && kv_heads > 0 && heads % kv_heads == 0,
              "prefill_attention: head dims differ or heads not a multiple of kv_heads");
  TORCH_CHECK(q_len <= ctx_len, "prefill_attention: ", q_len, " queries in a context of ", ctx_len);
  TORCH_CHECK(window >= 0, "prefill_attention: the window must be 0 (none) or positive");
  const Kernel f = kernel_for(dim, heads / kv_heads);
  TORCH_CHECK(f != nullptr, "prefill_attention: no kernel for heads of ", dim, " and groups of ", heads / kv_heads);
  auto out = torch::empty({q_len, heads, dim}, q.options());
  if (q_len > 0)
    f(q.data_ptr<float>(), q.stride(0), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(), q_len,
      ctx_len, kv_heads, window, static_cast<float>(scale));
  return out;
}

TORCH_LIBRARY_FRAGMENT(pdmesh, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, int window, float scale) -> Tensor");
  m.impl("prefill_attention", c10::DispatchKey::CPU, &prefill_attention);
}
