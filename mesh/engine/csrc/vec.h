// Float vectors for the CPU kernels: 16 lanes (AVX-512, or two AVX2 halves), GCC's vector
// extensions, so that one source builds for whatever -march=native finds.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

namespace pdmesh_vec {

typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
constexpr int LANES = 16;

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < LANES; ++i) s += v[i];
  return s;
}
inline vf splat(float x) { return vf{} + x; }

// e^x for x <= 0, 16 at a time (Cephes' expf: x = n ln2 + r, e^r by a degree-6 polynomial,
// 2^n through the exponent bits; relative error ~1e-7), where std::exp takes one at a time.
inline vf exp_nonpositive(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;  // e^-87 ~ 1.6e-38: the smallest normal's order
  const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);  // round(x / ln2), x <= 0
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf e = p * r * r + r + 1.0f;
  const vi bits = (n + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return e * two_n;
}

// s[0, n) replaced by e^(s - max s), unnormalised; returns 1 / their sum (0 when n is 0).
inline float softmax_unnormalised(float* s, int64_t n) {
  const int64_t whole = n - n % LANES;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
  vf total = vf{};
  for (int64_t t = 0; t < whole; t += LANES) {
    const vf e = exp_nonpositive(load(s + t) - m);
    store(s + t, e);
    total += e;
  }
  float rest = 0.f;
  for (int64_t t = whole; t < n; ++t) rest += (s[t] = std::exp(s[t] - m));
  const float sum = hsum(total) + rest;
  return sum > 0.f ? 1.f / sum : 0.f;
}

// A kernel compiled for each value of a count known only at run time (rows of a block, query
// heads per KV head): Variants::of<n> for n in 1..N as a table built at compile time.
template <typename Fn, typename Variants, int... I>
constexpr std::array<Fn, sizeof...(I)> variants(std::integer_sequence<int, I...>) {
  return {Variants::template of<I + 1>...};
}

// The variant for n, or nullptr outside 1..N.
template <typename Fn, typename Variants, int N>
Fn variant(int64_t n) {
  static constexpr auto table = variants<Fn, Variants>(std::make_integer_sequence<int, N>{});
  return n >= 1 && n <= N ? table[n - 1] : nullptr;
}

}  // namespace pdmesh_vec
