// Small AVX2/FMA (and, where the CPU has it, AVX-512) helpers shared by gpt2kit's CPU kernels
// (cpu_decode.cpp, cpu_train.cpp).
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cmath>

namespace gpt2kit {

// ---- element-wise operations, overloaded on the vector: __m256 always, __m512 in AVX-512 builds --------
// (so that exp and GELU's sigmoid below are written once for both widths)
inline __m256 splat(__m256, float x) { return _mm256_set1_ps(x); }
inline __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
inline __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 div(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
inline __m256 max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
inline __m256 min(__m256 a, __m256 b) { return _mm256_min_ps(a, b); }
inline __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256 fnmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fnmadd_ps(a, b, c); }
inline __m256 round(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m256 pow2(__m256 n) {  // 2^n for integral n in float32's exponent range
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

#if defined(__AVX512F__)
inline __m512 splat(__m512, float x) { return _mm512_set1_ps(x); }
inline __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 div(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
inline __m512 max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
inline __m512 min(__m512 a, __m512 b) { return _mm512_min_ps(a, b); }
inline __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m512 fnmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fnmadd_ps(a, b, c); }
inline __m512 round(__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m512 pow2(__m512 n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline float hmax(__m512 v) { return _mm512_reduce_max_ps(v); }
#endif

// e^x: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error ~1e-7,
// float32's own precision), 2^n put into the exponent bits.
template <class V>
inline V vexp(V x) {
  x = max(min(x, splat(x, 88.0f)), splat(x, -87.0f));
  const V n = round(mul(x, splat(x, 1.44269504088896341f)));
  V r = fnmadd(n, splat(x, 0.693145751953125f), x);  // ln2 split in two for accuracy
  r = fnmadd(n, splat(x, 1.428606765330187e-06f), r);
  V p = splat(x, 1.0f / 720);
  p = fmadd(p, r, splat(x, 1.0f / 120));
  p = fmadd(p, r, splat(x, 1.0f / 24));
  p = fmadd(p, r, splat(x, 1.0f / 6));
  p = fmadd(p, r, splat(x, 0.5f));
  p = fmadd(p, r, splat(x, 1.0f));
  p = fmadd(p, r, splat(x, 1.0f));
  return mul(p, pow2(n));
}

// ---- the widest float vector of this build, for the training kernels and the decoding products -------
// AVX-512 (16 floats) where kernels/__init__.py compiled with -mavx512f because the CPU has it, else AVX2
// (8 floats). Why two widths: on CPUs with AVX-512 (Intel Xeon since Skylake-SP, AMD Zen 4) the 512-bit
// forms do twice the work an instruction, and the training kernels are compute-bound in cache.
namespace vec {
#if defined(__AVX512F__)
constexpr int W = 16;
using V = __m512;
inline V zero() { return _mm512_setzero_ps(); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
#else
constexpr int W = 8;
using V = __m256;
inline V zero() { return _mm256_setzero_ps(); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
#endif
inline V set1(float x) { return splat(V{}, x); }
inline V exp(V x) { return vexp(x); }
using gpt2kit::add;
using gpt2kit::div;
using gpt2kit::fmadd;
using gpt2kit::fnmadd;
using gpt2kit::hmax;
using gpt2kit::hsum;
using gpt2kit::max;
using gpt2kit::min;
using gpt2kit::mul;
using gpt2kit::sub;
}  // namespace vec

inline void check_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
              what, " must be a contiguous float32 CPU tensor");
}

constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kKappa = 0.044715f;

// GELU's tanh form, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), is x * s with
// s = sigmoid(2u) = 1 / (1 + e^(-2u)) exactly; with s' = 2 s (1 - s) u', its derivative is s + x s'.
template <class T>
struct Same {  // keeps `du` out of template deduction, so that nullptr may be passed
  using type = T;
};

template <class V>
inline V sigmoid_2u(V x, typename Same<V>::type* du) {
  const V x2 = mul(x, x);
  const V u = mul(splat(x, kBeta), fmadd(mul(splat(x, kKappa), x2), x, x));
  if (du) *du = mul(splat(x, kBeta), fmadd(splat(x, 3 * kKappa), x2, splat(x, 1.0f)));
  return div(splat(x, 1.0f), add(splat(x, 1.0f), vexp(mul(splat(x, -2.0f), u))));
}

inline float sigmoid_2u(float x, float* du) {
  const float u = kBeta * (x + kKappa * x * x * x);
  if (du) *du = kBeta * (1.0f + 3 * kKappa * x * x);
  return 1.0f / (1.0f + std::exp(-2.0f * u));
}

}  // namespace gpt2kit

// cpu_train.cpp's functions, added to the extension module that cpu_decode.cpp defines
void register_training_kernels(pybind11::module& m);
// cpu_sample.cpp's functions, likewise
void register_sampling_kernels(pybind11::module& m);
