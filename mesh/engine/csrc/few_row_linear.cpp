// x @ weight.T + bias for a few rows (a decode step's batch), fp32 on CPU.
//
// With a few rows a projection is bound by reading its weight from memory: each
// weight element is used once per row. The weight is kept blocked as
// [N / NB][K][NB] (NB output features per block, zero-padded), so that one pass
// streams it front to back; each of a block's K rows of NB weights is loaded
// once into registers and multiplied by every input row's scalar at that k
// (broadcast), with the block's outputs for up to MB input rows held in
// registers. oneDNN's blocked product read the small model's decode weights at
// about 21-24 GB/s on a 30 GB/s host; this reads them at the host's bandwidth.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "vec.h"

namespace {

using namespace pdmesh_vec;

#ifdef __AVX512F__
constexpr int NV = 2, MB = 8;  // 16 accumulators and 2 weight vectors of the 32 zmm registers
#else
constexpr int NV = 1, MB = 6;  // a vf is two ymm halves: 12 + 2 of the 16 registers
#endif
constexpr int NB = NV * LANES;

// rows input rows of x (ldx apart) times one weight block; y gets the block's n_valid outputs.
template <int R>
void block(const float* x, int64_t ldx, const float* w, const float* bias, float* y, int64_t ldy,
           int64_t K, int64_t n_valid) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * NB;
    vf wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load(wk + v * LANES);
    for (int r = 0; r < R; ++r) {
      const float s = x[r * ldx + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * wv[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    float out[NB];
    __builtin_memcpy(out, acc[r], sizeof out);
    for (int64_t n = 0; n < n_valid; ++n) y[r * ldy + n] = out[n] + (bias ? bias[n] : 0.f);
  }
}

using BlockFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t);

struct Rows {
  template <int R>
  static constexpr BlockFn of = block<R>;
};

}  // namespace

// weight [N, K] -> [ceil(N / NB), K, NB], the last block's missing features zero.
torch::Tensor few_row_pack(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "few_row_pack: a 2-D fp32 weight expected");
  const int64_t N = weight.size(0), K = weight.size(1), nblocks = (N + NB - 1) / NB;
  auto padded = torch::zeros({nblocks * NB, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({nblocks, NB, K}).transpose(1, 2).contiguous();
}

// x [..., K] @ weight.T (+ bias) with weight packed by few_row_pack; out_features = N.
torch::Tensor few_row_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                             int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "few_row_linear: fp32 input and weight expected");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NB && packed.is_contiguous(),
              "few_row_linear: a weight packed by few_row_pack on this build expected");
  const int64_t K = packed.size(1), nblocks = packed.size(0), N = out_features;
  TORCH_CHECK(x.size(-1) == K, "few_row_linear: input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(0 < N && N <= nblocks * NB && N > (nblocks - 1) * NB,
              "few_row_linear: ", N, " output features do not fit the packed weight's ", nblocks, " blocks");
  auto b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  TORCH_CHECK(!b.defined() || (b.scalar_type() == at::kFloat && b.numel() == N),
              "few_row_linear: an fp32 bias of ", N, " features expected");
  auto xc = x.contiguous();
  const int64_t M = xc.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, nblocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t nb = first; nb < last; ++nb) {
      const int64_t n0 = nb * NB, n_valid = std::min<int64_t>(NB, N - n0);
      for (int64_t m = 0; m < M; m += MB) {
        const int64_t rows = std::min<int64_t>(MB, M - m);
        pdmesh_vec::variant<BlockFn, Rows, MB>(rows)(xp + m * K, K, wp + nb * K * NB, bp ? bp + n0 : nullptr, yp + m * N + n0, N, K, n_valid);
      }
    }
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(pdmesh, m) {
  m.def("few_row_pack(Tensor weight) -> Tensor");
  m.def("few_row_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.impl("few_row_pack", c10::DispatchKey::CPU, &few_row_pack);
  m.impl("few_row_linear", c10::DispatchKey::CPU, &few_row_linear);
}
