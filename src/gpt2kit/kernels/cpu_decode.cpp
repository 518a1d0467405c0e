// gpt2kit's decoding kernels for x86-64 CPUs with AVX2/FMA (products with AVX-512 where the CPU has it),
// float32.
//
// linear: y (M, N) = x (M, K) @ W (N, K)^T + b for small M. Why by hand: one-token decoding is nothing but
// such products with M = batch size (1..32), and on the CPUs we measured MKL's float32 GEMV/GEMM streams the
// weights at 14-22 GB/s for M = 1 and far less for M = 2..32 (the 50257 x 768 LM head at M = 8 took 31 ms),
// where a plain register-tiled loop over the row-major weights reaches the machine's streaming-read
// bandwidth (~30-34 GB/s on 2 cores). Each weight row is read from memory once and used for every input
// row while it sits in L1.
//
// decode_step: one whole decoding step of GPT-2 (every block, ln_f and the LM head) for B rows that all
// sit at the same position. Why by hand: with the products at the bandwidth limit, what was left of a
// 124M step (~2 of ~20 ms) went to ~150 small PyTorch operations (layer norms, GELU, residual adds,
// splits, the cache write, attention set-up) and the Python around them; here they are a few loops over
// vectors of n_embd floats between the products. Optionally its products read int8 weights (one float
// scale per row, widened to float32 in registers as they stream in): a quarter of the bytes of float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using gpt2kit::check_f32;
using gpt2kit::hsum;
using gpt2kit::sigmoid_2u;

namespace vec = gpt2kit::vec;
using vec::V;
using vec::W;

// W weights as floats (vec's width: 8, or 16 in AVX-512 builds): float32 as they are; int8 (weight-only
// quantisation) widened, to be multiplied by their row's scale at the end. The `half` forms read only 8
// values, zero above: the last step of a row whose length is an odd multiple of 8 in AVX-512 builds.
inline V loadw(const float* p) { return vec::load(p); }
#if defined(__AVX512F__)
inline V loadw(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline V loadw_half(const float* p) { return _mm512_maskz_loadu_ps(0xFF, p); }
inline V loadw_half(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
inline V loadw(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
template <typename T>
inline V loadw_half(const T* p) { return loadw(p); }  // (W is 8: never a half step)
#endif

// How many groups of weight rows ahead a batch tile prefetches (see linear_into).
constexpr int kPrefetchGroups = 8;

// R weight rows x MB input rows: R * MB accumulators stay in registers across the whole K loop.
// `scale` (int8 weights: one per row, else null) multiplies each row's dot product; with `add`, the result
// is added to what y holds (a residual connection) instead of replacing it. With PF, it also asks for the
// same rows kPrefetchGroups groups further on to be brought into L2, a cache line per row per step.
template <int R, int MB, bool PF, typename WT>
inline void tile(const float* x, const WT* w, const float* scale, const float* b, float* y, int64_t K, int64_t N,
                 bool add) {
  V acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = vec::zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = vec::load(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      if (PF) _mm_prefetch(reinterpret_cast<const char*>(w + (kPrefetchGroups * R + r) * K + k), _MM_HINT_T1);
      const V wv = loadw(w + r * K + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = vec::fmadd(wv, xv[m], acc[r][m]);
    }
  }
  if (k < K) {  // K % W == 8
    V xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = loadw_half(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const V wv = loadw_half(w + r * K + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = vec::fmadd(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      const float out = vec::hsum(acc[r][m]) * (scale ? scale[r] : 1.f) + (b ? b[r] : 0.f);
      y[m * N + r] = add ? y[m * N + r] + out : out;
    }
}

constexpr int kMB = W == 16 ? 4 : 2;

// Rows [n0, n1) of the output for every input row, R weight rows at a time; with `prefetch`, the first
// tile of each group of weight rows prefetches.
template <int R, int MB, typename WT>
void rows(const float* x, const WT* w, const float* scale, const float* b, float* y, int64_t M, int64_t K,
          int64_t N, int64_t n0, int64_t n1, bool add, bool prefetch) {
  for (int64_t n = n0; n < n1; n += R) {
    const WT* wn = w + n * K;
    const float* sn = scale ? scale + n : nullptr;
    const float* bn = b ? b + n : nullptr;
    int64_t m = 0;
    if (prefetch && M >= MB) {  // the group's first tile prefetches; the rest read what it brought
      tile<R, MB, true>(x, wn, sn, bn, y + n, K, N, add);
      m = MB;
    } else if (prefetch) {
      tile<R, 1, true>(x, wn, sn, bn, y + n, K, N, add);
      m = 1;
    }
    for (; m + MB <= M; m += MB) tile<R, MB, false>(x + m * K, wn, sn, bn, y + m * N + n, K, N, add);
    for (; m < M; ++m) tile<R, 1, false>(x + m * K, wn, sn, bn, y + m * N + n, K, N, add);
  }
}

// y (M, N) (+)= x (M, K) @ w (N, K)^T (* scale) + b, on torch's threads; K a multiple of 8.
template <typename WT>
void linear_into(const float* x, const WT* w, const float* scale, const float* b, float* y, int64_t M, int64_t K,
                 int64_t N, bool add) {
  // batch 1: 8 rows per tile (more independent streams in flight); batches: 4 rows x kMB inputs (2 with
  // AVX2's 16 registers; 4 with AVX-512's 32, which halves the loads per multiply: batch-8 decoding
  // 215 -> 253 tok/s on a 2-core Xeon). Batches also prefetch the weights kPrefetchGroups groups ahead
  // into L2: with 8 rows the multiplies take about as long as reading the weights, and without it the two
  // took turns instead of overlapping (batch-8 decoding on the Xeon 260 -> 286-299 tok/s; the LM head at
  // batch 8 8.1 -> 4.5 ms against 3.1-3.8 ms at batch 1). Batch 1 streams at the bandwidth without it.
  const int64_t R = M == 1 ? 8 : 4;
  const int64_t groups = N / R;
  // Chunks of ~64 KiB of weights handed out dynamically (torch's own OpenMP runtime and thread count):
  // a thread the OS pauses for a moment no longer holds up half the matrix, which on small shared
  // machines was worth 5-15% in the median step against an even static split.
  const int64_t per = std::max<int64_t>(1, (64 * 1024) / (R * K * static_cast<int64_t>(sizeof(WT))));
  const int64_t chunks = (groups + per - 1) / per;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t g0 = c * per, g1 = std::min(groups, g0 + per);
    if (M == 1)
      rows<8, 1>(x, w, scale, b, y, M, K, N, g0 * R, g1 * R, add, false);
    else
      rows<4, kMB>(x, w, scale, b, y, M, K, N, g0 * R, g1 * R, add, true);
  }
  rows<1, 1>(x, w, scale, b, y, M, K, N, groups * R, N, add, false);  // the last N % R rows
}

// y (M, C) = layer_norm(x (M, C)) * g + b, C a multiple of 8; the same two-pass mean and variance as
// PyTorch's CPU kernel, in float32.
void layer_norm(const float* x, const float* g, const float* b, float* y, int64_t M, int64_t C, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * C;
    float* ym = y + m * C;
    __m256 s = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; c += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xm + c));
    const __m256 mean = _mm256_set1_ps(hsum(s) / C);
    __m256 q = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xm + c), mean);
      q = _mm256_fmadd_ps(d, d, q);
    }
    const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(hsum(q) / C + eps));
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xm + c), mean), rstd);
      _mm256_storeu_ps(ym + c, _mm256_fmadd_ps(d, _mm256_loadu_ps(g + c), _mm256_loadu_ps(b + c)));
    }
  }
}

// GPT-2's GELU (the tanh approximation) in place over n floats, n a multiple of 8: x * sigmoid(2u), the
// same form as the training kernel's (simd.h).
void gelu_tanh(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(v, sigmoid_2u(v, nullptr)));
  }
}

// One query per head, every row at position `pos`: qkv (B, 3C) is c_attn's output (q, k, v side by side,
// C = nh * hs); k and v go into the cache (B, nh, S, hs) at slot pos, then each head's query attends to
// slots 0..pos. y (B, C), heads side by side (the layout c_proj wants).
void attention(const float* qkv, float* kc, float* vc, float* y, int64_t B, int64_t nh, int64_t S, int64_t hs,
               int64_t pos) {
  const int64_t C = nh * hs, kv_len = pos + 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  at::parallel_for(0, B * nh, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(kv_len);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nh, h = i % nh;
      const float* qh = qkv + b * 3 * C + h * hs;
      float* kh = kc + i * S * hs;
      float* vh = vc + i * S * hs;
      std::copy(qh + C, qh + C + hs, kh + pos * hs);  // this step's key and value into the cache
      std::copy(qh + 2 * C, qh + 2 * C + hs, vh + pos * hs);
      float mx = -INFINITY;
      for (int64_t s = 0; s < kv_len; ++s) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < hs; d += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kh + s * hs + d), acc);
        p[s] = hsum(acc) * scale;
        mx = std::max(mx, p[s]);
      }
      float sum = 0.f;
      for (int64_t s = 0; s < kv_len; ++s) {
        p[s] = std::exp(p[s] - mx);
        sum += p[s];
      }
      float* yh = y + b * C + h * hs;
      for (int64_t d = 0; d < hs; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t s = 0; s < kv_len; ++s)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), _mm256_loadu_ps(vh + s * hs + d), acc);
        _mm256_storeu_ps(yh + d, _mm256_mul_ps(acc, _mm256_set1_ps(1.0f / sum)));
      }
    }
  });
}

const float* ptr(const torch::Tensor& t) { return t.data_ptr<float>(); }

}  // namespace

torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "shapes: x (M, K), W (N, K)");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(w.is_contiguous() && x_in.size(1) % 8 == 0, "W row-major, K a multiple of 8");
  const torch::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == at::kFloat, "bias (N,)");
    bp = ptr(*bias);
  }
  linear_into(ptr(x), ptr(w), nullptr, bp, y.data_ptr<float>(), M, K, N, false);
  return y;
}

// x (B, C): token plus position embeddings of one step, every row at position pos. weights: per block
// ln_1.{weight,bias}, attn.c_attn.{weight,bias}, attn.c_proj.{weight,bias}, ln_2.{weight,bias},
// mlp.c_fc.{weight,bias}, mlp.c_proj.{weight,bias} (12 each, nn.Linear's (out, in) layout), then
// ln_f.{weight,bias} and the LM head's weight (vocab, C). caches: per block the key and value cache rows
// (B, nh, S, hs), written at slot pos. qweights: empty, or int8 weights to use for every product instead,
// as (weight int8 (N, K), scale float (N,)) pairs for c_attn, attn.c_proj, c_fc, mlp.c_proj of each block
// and then the LM head. Returns the logits (B, vocab).
torch::Tensor decode_step(const torch::Tensor& x_in, const std::vector<torch::Tensor>& weights,
                          const std::vector<torch::Tensor>& caches, const std::vector<torch::Tensor>& qweights,
                          int64_t pos, double eps_d) {
  check_f32(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 8 == 0, "x (B, C), C a multiple of 8");
  const int64_t B = x_in.size(0), C = x_in.size(1);
  const int64_t L = static_cast<int64_t>(caches.size()) / 2;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 12 * L + 3 && static_cast<int64_t>(caches.size()) == 2 * L,
              "12 weights and 2 caches a block, then 3");
  const bool quant = !qweights.empty();
  TORCH_CHECK(!quant || static_cast<int64_t>(qweights.size()) == 2 * (4 * L + 1), "2 int8 tensors a product");
  for (const auto& t : weights) check_f32(t, "every weight");
  for (size_t i = 0; i < qweights.size(); i += 2) {
    TORCH_CHECK(qweights[i].scalar_type() == at::kChar && qweights[i].is_contiguous(), "int8 weights, row-major");
    check_f32(qweights[i + 1], "every scale");
    TORCH_CHECK(qweights[i + 1].numel() == qweights[i].size(0), "one scale a row");
  }
  for (const auto& t : caches) {
    check_f32(t, "every cache");
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) * t.size(3) == C && t.size(3) % 8 == 0 &&
                pos >= 0 && pos < t.size(2), "caches (B, nh, S, hs) with pos < S");
  }
  const int64_t F = weights[8].size(0), V = weights[12 * L + 2].size(0);
  TORCH_CHECK(F % 8 == 0 && weights[8].size(1) == C && weights[12 * L + 2].size(1) == C, "shapes");
  // product j (4 a block, then the head): y (B, N) (+)= in (B, K) @ W^T + bias
  auto product = [&](int64_t j, const torch::Tensor& w, const float* bias, const float* in, float* y, int64_t K,
                     bool add) {
    if (quant) {
      const torch::Tensor& q = qweights[2 * j];
      TORCH_CHECK(q.size(0) == w.size(0) && q.size(1) == K, "int8 weights shaped like the float ones");
      linear_into(in, q.data_ptr<int8_t>(), ptr(qweights[2 * j + 1]), bias, y, B, K, q.size(0), add);
    } else {
      linear_into(in, ptr(w), nullptr, bias, y, B, K, w.size(0), add);
    }
  };
  const float eps = static_cast<float>(eps_d);
  torch::Tensor x = x_in.clone();  // the residual stream, updated in place
  std::vector<float> h(B * C), qkv(B * 3 * C), att(B * C), f(B * F);
  float* xp = x.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* w = &weights[12 * l];
    const torch::Tensor& kc = caches[2 * l];
    layer_norm(xp, ptr(w[0]), ptr(w[1]), h.data(), B, C, eps);
    product(4 * l, w[2], ptr(w[3]), h.data(), qkv.data(), C, false);
    attention(qkv.data(), kc.data_ptr<float>(), caches[2 * l + 1].data_ptr<float>(), att.data(), B, kc.size(1),
              kc.size(2), kc.size(3), pos);
    product(4 * l + 1, w[4], ptr(w[5]), att.data(), xp, C, true);  // x += c_proj(attention)
    layer_norm(xp, ptr(w[6]), ptr(w[7]), h.data(), B, C, eps);
    product(4 * l + 2, w[8], ptr(w[9]), h.data(), f.data(), C, false);
    gelu_tanh(f.data(), B * F);
    product(4 * l + 3, w[10], ptr(w[11]), f.data(), xp, F, true);  // x += mlp(ln_2(x))
  }
  layer_norm(xp, ptr(weights[12 * L]), ptr(weights[12 * L + 1]), h.data(), B, C, eps);
  torch::Tensor logits = torch::empty({B, V}, x.options());
  product(4 * L, weights[12 * L + 2], nullptr, h.data(), logits.data_ptr<float>(), C, false);
  return logits;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_training_kernels(m);  // cpu_train.cpp
  register_sampling_kernels(m);  // cpu_sample.cpp
  m.def("linear", &linear, "y = x @ W.T + b for small M (float32, AVX2/FMA)");
  m.def("decode_step", &decode_step, "one GPT-2 decoding step, every row at position pos: logits (B, vocab)");
}
