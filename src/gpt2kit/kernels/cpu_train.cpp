// gpt2kit's training kernels for x86-64 CPUs with AVX2/FMA (AVX-512 where the CPU has it: simd.h's vec),
// float32: the parts of a GPT-2 training step besides the big matrix products, which PyTorch runs as
// several memory passes, with a slow vectorised tanh, or (attention) at a fraction of the CPU's speed.
//
// Why by hand: in a float32 124M step on 2 cores (2.55 s, ~2.1 s of it matrix products already at ~95% of
// the CPU's peak) the rest was what stood between gpt2kit and a larger lead over transformers. Measured
// per step before -> after (124M, 2 x 256 tokens):
// - causal attention, forward and backward: 141 -> 76 ms. PyTorch's CPU flash attention ran at ~30% of
//   peak on 64-wide heads; here each head's products are register-tiled 6 x 16 blocks over a T x T buffer
//   that stays in L2, skipping the blocks above the diagonal, straight from c_attn's (B, T, 3C) output and
//   into c_proj's (B, T, C) input, so no transposed copies of q, k, v or the output are made either.
// - GELU (tanh form): 67 -> ~17 ms. PyTorch's forward and backward took 2.7-2.8 ms each per layer for
//   512 x 3072 values; written as x * sigmoid(2u), one exp per value.
// - The cross-entropy over the (tokens x 50,257) logits: ~45 -> ~13 ms. logsumexp in the forward, then
//   sub + exp + scale in the backward were each a pass over 100 MB, with exp computed twice; here each row
//   is read while it sits in L2: its maximum, then e^(x - max) written in place with their sum, and the
//   backward only scales that buffer.
// - The gradient norm for clipping: 27 -> 14 ms, one pass over all gradients on both cores, summed in
//   float64 (PyTorch's per-tensor float32 norms were 5e-5 off on a tiny model).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <vector>

#include "simd.h"

namespace {

using gpt2kit::check_f32;
using gpt2kit::sigmoid_2u;
namespace vec = gpt2kit::vec;
using vec::V;
using vec::W;

constexpr int64_t kGrain = 1 << 15;  // values per task: large enough that threads pay off

}  // namespace

// y = gelu_tanh(x), any shape.
torch::Tensor gelu_forward(const torch::Tensor& x) {
  check_f32(x, "x");
  torch::Tensor y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
    int64_t i = b;
    for (; i + W <= e; i += W) {
      const V v = vec::load(xp + i);
      vec::store(yp + i, vec::mul(v, sigmoid_2u(v, nullptr)));
    }
    for (; i < e; ++i) yp[i] = xp[i] * sigmoid_2u(xp[i], nullptr);
  });
  return y;
}

// dx = dy * gelu_tanh'(x).
torch::Tensor gelu_backward(const torch::Tensor& dy, const torch::Tensor& x) {
  check_f32(dy, "dy");
  check_f32(x, "x");
  TORCH_CHECK(dy.numel() == x.numel(), "dy and x must have the same size");
  torch::Tensor dx = torch::empty_like(x);
  const float *gp = dy.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
    const V one = vec::set1(1.0f), two = vec::set1(2.0f);
    int64_t i = b;
    for (; i + W <= e; i += W) {
      const V v = vec::load(xp + i);
      V du;
      const V s = sigmoid_2u(v, &du);
      // s + x * 2 s (1 - s) u'
      const V ds = vec::mul(vec::mul(two, s), vec::mul(vec::sub(one, s), du));
      vec::store(dp + i, vec::mul(vec::load(gp + i), vec::fmadd(v, ds, s)));
    }
    for (; i < e; ++i) {
      float du;
      const float s = sigmoid_2u(xp[i], &du);
      dp[i] = gp[i] * (s + xp[i] * 2 * s * (1 - s) * du);
    }
  });
  return dx;
}

// Cross-entropy forward over logits (N, V) whose rows may be padded (row stride >= V, unit column
// stride). Returns {loss (N,): logsumexp(row) - row[target], 0 where target == ignore_index;
// inv_sum (N,): 1 / sum(e^(row - max))}, and leaves e^(row - max) in the logits: the softmax times
// sum, so that the backward pass needs only a scale per row (softmax_xent_backward).
std::vector<torch::Tensor> softmax_xent_forward(torch::Tensor logits, const torch::Tensor& targets,
                                                int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu() &&
                  logits.stride(1) == 1, "logits must be a float32 CPU (N, V) tensor with unit column stride");
  TORCH_CHECK(targets.dim() == 1 && targets.scalar_type() == at::kLong && targets.is_contiguous() &&
                  targets.size(0) == logits.size(0), "targets must be (N,) int64");
  const int64_t N = logits.size(0), Vn = logits.size(1), ld = logits.stride(0);
  torch::Tensor loss = torch::empty({N}, logits.options());
  torch::Tensor inv_sum = torch::empty({N}, logits.options());
  float* base = logits.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  float *lp = loss.data_ptr<float>(), *sp = inv_sum.data_ptr<float>();
  std::atomic<bool> bad_target{false};
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* x = base + r * ld;
      const int64_t t = tp[r];
      if (t != ignore_index && (t < 0 || t >= Vn)) {
        bad_target = true;
        continue;
      }
      const float picked = t == ignore_index ? 0.0f : x[t];
      V m8 = vec::set1(-INFINITY);
      int64_t i = 0;
      for (; i + W <= Vn; i += W) m8 = vec::max(m8, vec::load(x + i));
      float m = vec::hmax(m8);
      for (int64_t j = i; j < Vn; ++j) m = std::max(m, x[j]);
      const V mv = vec::set1(m);
      V s0 = vec::zero(), s1 = vec::zero();
      i = 0;
      for (; i + 2 * W <= Vn; i += 2 * W) {
        const V e0 = vec::exp(vec::sub(vec::load(x + i), mv));
        const V e1 = vec::exp(vec::sub(vec::load(x + i + W), mv));
        vec::store(x + i, e0);
        vec::store(x + i + W, e1);
        s0 = vec::add(s0, e0);
        s1 = vec::add(s1, e1);
      }
      double sum = vec::hsum(vec::add(s0, s1));
      for (; i < Vn; ++i) {
        x[i] = std::exp(x[i] - m);
        sum += x[i];
      }
      sp[r] = static_cast<float>(1.0 / sum);
      lp[r] = t == ignore_index ? 0.0f : static_cast<float>(m + std::log(sum) - picked);
    }
  });
  TORCH_CHECK(!bad_target, "a target is outside [0, ", Vn, ")");
  return {loss, inv_sum};
}

// sum over the tensors of sum(t^2), in double: the squared L2 norm of all gradients together.
double sum_squares(const std::vector<torch::Tensor>& tensors) {
  double total = 0;
  for (const torch::Tensor& t : tensors) {
    check_f32(t, "every tensor");
    const float* p = t.data_ptr<float>();
    total += at::parallel_reduce(0, t.numel(), 1 << 16, 0.0, [&](int64_t b, int64_t e, double acc) {
      double s = 0;
      for (int64_t i0 = b; i0 < e; i0 += 4096) {  // float partial sums over 4,096 values, then double
        const int64_t i1 = std::min(e, i0 + 4096);
        V a0 = vec::zero(), a1 = vec::zero();
        int64_t i = i0;
        for (; i + 2 * W <= i1; i += 2 * W) {
          const V v0 = vec::load(p + i), v1 = vec::load(p + i + W);
          a0 = vec::fmadd(v0, v0, a0);
          a1 = vec::fmadd(v1, v1, a1);
        }
        s += vec::hsum(vec::add(a0, a1));
        for (; i < i1; ++i) s += static_cast<double>(p[i]) * p[i];
      }
      return acc + s;
    }, std::plus<double>());
  }
  return total;
}


// ---- causal self-attention, forward and backward ----------------------------------------------------
//
// Per (batch row, head), straight from c_attn's output qkv (B, T, 3C) (q, k, v side by side, each head's
// hs columns at h * hs), into y (B, T, C) (heads side by side, c_proj's layout): S = scale * Q K^T over
// the causal lower triangle only, a row softmax, Y = P V. The backward recomputes P from the saved
// log-sum-exp and forms dV = P^T dY, dP = dY V^T, dS = P (dP - rowsum(dY Y)), dQ = scale dS K,
// dK = scale dS^T Q. Every product is the register-tiled `gemm` below over a T x T buffer that stays in
// L2, skipping the blocks above the diagonal.

namespace {

enum Mode { kFull, kCausalN, kLowerK, kUpperK };

// Rows of a micro-tile: 2 x 8 accumulators fit AVX-512's 32 registers, 2 x 6 AVX2's 16. The kLowerK and
// kUpperK sums read up to kMR - 1 values past the diagonal, which softmax_row leaves zero (7 of them).
constexpr int kMR = W == 16 ? 8 : 6;

// One row of a micro-tile: (c0, c1) += a * (b0, b1) (c0 only when NV is 1), a broadcast from memory.
template <int NV>
__attribute__((always_inline)) inline void fma_row(const float* a, V b0, V b1, V& c0, V& c1) {
  const V av = vec::set1(*a);
  c0 = vec::fmadd(av, b0, c0);
  if constexpr (NV > 1) c1 = vec::fmadd(av, b1, c1);
}

// C[m][n0..n0+NV*W) = alpha * sum_k A(m, k) B[k][n0..n0+NV*W) for MR rows; A(m, k) = a[m * sam + k * sak].
// The 2 x MR accumulators are named variables, not an array: GCC kept an array's copy on the stack,
// storing all 12 every iteration, at a third of the speed.
template <int MR, int NV>
inline void micro(const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t k0, int64_t k1, float alpha) {
  V c00 = vec::zero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00, c40 = c00,
    c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
  for (int64_t k = k0; k < k1; ++k) {
    const V b0 = vec::load(b + k * ldb), b1 = NV > 1 ? vec::load(b + k * ldb + W) : b0;
    const float* ak = a + k * sak;
    fma_row<NV>(ak, b0, b1, c00, c01);
    if constexpr (MR > 1) fma_row<NV>(ak + sam, b0, b1, c10, c11);
    if constexpr (MR > 2) fma_row<NV>(ak + 2 * sam, b0, b1, c20, c21);
    if constexpr (MR > 3) fma_row<NV>(ak + 3 * sam, b0, b1, c30, c31);
    if constexpr (MR > 4) fma_row<NV>(ak + 4 * sam, b0, b1, c40, c41);
    if constexpr (MR > 5) fma_row<NV>(ak + 5 * sam, b0, b1, c50, c51);
    if constexpr (MR > 6) fma_row<NV>(ak + 6 * sam, b0, b1, c60, c61);
    if constexpr (MR > 7) fma_row<NV>(ak + 7 * sam, b0, b1, c70, c71);
  }
  const V al = vec::set1(alpha);
  const V rows[8][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}, {c60, c61},
                        {c70, c71}};
  for (int r = 0; r < MR; ++r) {
    vec::store(c + r * ldc, vec::mul(al, rows[r][0]));
    if constexpr (NV > 1) vec::store(c + r * ldc + W, vec::mul(al, rows[r][1]));
  }
}

template <int NV>
inline void micro_rows(int mr, const float* am, int64_t sam, int64_t sak, const float* bn, int64_t ldb, float* cm,
                       int64_t ldc, int64_t k0, int64_t k1, float alpha) {
  switch (mr) {
    case 8: micro<8, NV>(am, sam, sak, bn, ldb, cm, ldc, k0, k1, alpha); break;
    case 7: micro<7, NV>(am, sam, sak, bn, ldb, cm, ldc, k0, k1, alpha); break;
    case 6: micro<6, NV>(am, sam, sak, bn, ldb, cm, ldc, k0, k1, alpha); break;
    case 5: micro<5, NV>(am, sam, sak, bn, ldb, cm, ldc, k0, k1, alpha); break;
    case 4: micro<4, NV>(am, sam, sak, bn, ldb, cm, ldc, k0, k1, alpha); break;
    case 3: micro<3, NV>(am, sam, sak, bn, ldb, cm, ldc, k0, k1, alpha); break;
    case 2: micro<2, NV>(am, sam, sak, bn, ldb, cm, ldc, k0, k1, alpha); break;
    default: micro<1, NV>(am, sam, sak, bn, ldb, cm, ldc, k0, k1, alpha); break;
  }
}

// C (M x N) = alpha * A (M x K) B (K x N), N a multiple of 16, B row-major with row stride ldb. mode:
// kCausalN computes only the column blocks that reach the diagonal (n0 <= m), for S and dP;
// kLowerK sums k <= m only (A zero above its diagonal: P and dS), kUpperK k >= m only (A = P^T, dS^T).
// Tiles are kMR rows by two vectors (16 columns with AVX2, 32 with AVX-512; a last block of 16 then takes one).
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb,
          float* c, int64_t ldc, Mode mode, float alpha) {
  static_assert(2 * W % 16 == 0 && 16 % W == 0, "tiles of 16 columns are one or two vectors");
  for (int64_t m0 = 0; m0 < M; m0 += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
    const int64_t k0 = mode == kUpperK ? m0 : 0, k1 = mode == kLowerK ? std::min(K, m0 + mr) : K;
    for (int64_t n0 = 0; n0 < N;) {
      if (mode == kCausalN && n0 > m0 + mr - 1) break;
      const float* am = a + m0 * sam;
      if (n0 + 2 * W <= N) {
        micro_rows<2>(mr, am, sam, sak, b + n0, ldb, c + m0 * ldc + n0, ldc, k0, k1, alpha);
        n0 += 2 * W;
      } else {  // AVX-512's last 16 columns
        micro_rows<1>(mr, am, sam, sak, b + n0, ldb, c + m0 * ldc + n0, ldc, k0, k1, alpha);
        n0 += W;
      }
    }
  }
}

// dst (hs x Tp, row stride ldd) = src (T x hs, row stride ld)^T, zero in the padding columns T..Tp; hs is a
// multiple of 16. In 8 x 8 blocks through AVX registers (in both builds): element by element it was ~10%
// of the forward kernel's time and ~9% of the backward's.
void transpose_into(const float* src, int64_t ld, int64_t T, int64_t hs, int64_t Tp, float* dst, int64_t ldd) {
  int64_t j0 = 0;
  for (; j0 + 8 <= T; j0 += 8) {
    for (int64_t d0 = 0; d0 < hs; d0 += 8) {
      __m256 r[8], t[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(src + (j0 + q) * ld + d0);
      for (int q = 0; q < 8; q += 2) {
        t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
        t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
      }
      for (int q = 0; q < 8; q += 4) {
        r[q] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int q = 0; q < 4; ++q) {  // rows d0 + q and d0 + q + 4 of dst
        _mm256_storeu_ps(dst + (d0 + q) * ldd + j0, _mm256_permute2f128_ps(r[q], r[q + 4], 0x20));
        _mm256_storeu_ps(dst + (d0 + q + 4) * ldd + j0, _mm256_permute2f128_ps(r[q], r[q + 4], 0x31));
      }
    }
  }
  for (int64_t j = j0; j < T; ++j) {  // the last T % 8 rows of src
    const float* row = src + j * ld;
    for (int64_t d = 0; d < hs; ++d) dst[d * ldd + j] = row[d];
  }
  for (int64_t d = 0; d < hs; ++d)
    for (int64_t j = T; j < Tp; ++j) dst[d * ldd + j] = 0.0f;
}

// dst (T x hs, row stride ldd) = src (T x hs, row stride ld)
void copy_rows(const float* src, int64_t ld, int64_t T, int64_t hs, float* dst, int64_t ldd) {
  for (int64_t j = 0; j < T; ++j) std::copy(src + j * ld, src + j * ld + hs, dst + j * ldd);
}

// Row strides of the per-head buffers: a power of two (T = 256 floats, C = 768) puts a column's values in
// the same few L1 sets, and the products read columns; 16 floats more spreads them over all of them.
inline int64_t padded_stride(int64_t n) { return (n + 15) / 16 * 16 + 16; }

// Row i of P from row i of S (scale already applied), for j <= i: e^(S - lse) with lse computed here
// (forward, returned) or given (backward); zero for j in (i, i + 8), which the kLowerK / kUpperK sums
// read within a block of kMR (at most 8) rows, and up to the next multiple of W. Whole vectors only: the
// columns from i + 1 to that multiple are set to -inf first, so they add nothing to the maximum and ~1e-38
// each to the sum (below float32's resolution of a sum >= 1), and are zeroed after; the row buffers are
// at least Tp long. (Scalar tails, one std::exp a column, were ~3% of the attention kernels' time.)
inline float softmax_row(float* s, int64_t i, int64_t Tp, const float* given_lse) {
  const int64_t n = i + 1, nv = (n + W - 1) / W * W;
  for (int64_t z = n; z < nv; ++z) s[z] = -INFINITY;
  float lse;
  if (given_lse) {  // backward: P = e^(S - lse)
    lse = *given_lse;
    const V lv = vec::set1(lse);
    for (int64_t j = 0; j < nv; j += W) vec::store(s + j, vec::exp(vec::sub(vec::load(s + j), lv)));
  } else {  // forward: e^(S - max), then divided by its sum
    V m8 = vec::set1(-INFINITY);
    for (int64_t j = 0; j < nv; j += W) m8 = vec::max(m8, vec::load(s + j));
    const float m = vec::hmax(m8);
    const V mv = vec::set1(m);
    V acc = vec::zero();
    for (int64_t j = 0; j < nv; j += W) {
      const V e = vec::exp(vec::sub(vec::load(s + j), mv));
      vec::store(s + j, e);
      acc = vec::add(acc, e);
    }
    const float sum = vec::hsum(acc);
    lse = m + std::log(sum);
    for (int64_t z = n; z < nv; ++z) s[z] = 0.0f;  // before scaling: ~1e-38 / sum would be subnormal (slow)
    const V inv = vec::set1(1.0f / sum);
    for (int64_t j = 0; j < nv; j += W) vec::store(s + j, vec::mul(vec::load(s + j), inv));
  }
  for (int64_t z = n; z < std::min(Tp, std::max(nv, n + 7)); ++z) s[z] = 0.0f;
  return lse;
}

void check_qkv(const torch::Tensor& qkv, int64_t nh) {
  check_f32(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % (3 * nh) == 0, "qkv must be (B, T, 3C) with C divisible by n_head");
  TORCH_CHECK((qkv.size(2) / (3 * nh)) % 16 == 0, "the head size must be a multiple of 16");
}

}  // namespace

// y (B, T, C), lse (B, nh, T) of causal attention over qkv (B, T, 3C), scale 1 / sqrt(hs).
std::vector<torch::Tensor> causal_attention_forward(const torch::Tensor& qkv, int64_t nh) {
  check_qkv(qkv, nh);
  const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3, hs = C / nh, Tp = (T + 15) / 16 * 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  torch::Tensor y = torch::empty({B, T, C}, qkv.options());
  torch::Tensor lse = torch::empty({B, nh, T}, qkv.options());
  const float* base = qkv.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t Ld = padded_stride(T), Lh = padded_stride(hs);
  at::parallel_for(0, B * nh, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S(Tp * Ld), Kt(hs * Ld), Vp(T * Lh);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nh, h = t % nh;
      const float* q = base + b * T * C3 + h * hs;
      transpose_into(q + C, C3, T, hs, Tp, Kt.data(), Ld);
      copy_rows(q + 2 * C, C3, T, hs, Vp.data(), Lh);
      gemm(T, Tp, hs, q, C3, 1, Kt.data(), Ld, S.data(), Ld, kCausalN, scale);
      for (int64_t i = 0; i < T; ++i) lp[t * T + i] = softmax_row(S.data() + i * Ld, i, Tp, nullptr);
      gemm(T, hs, T, S.data(), Ld, 1, Vp.data(), Lh, yp + b * T * C + h * hs, C, kLowerK, 1.0f);
    }
  });
  return {y, lse};
}

// dqkv (B, T, 3C) from dy (B, T, C) and the forward's qkv, y and lse.
torch::Tensor causal_attention_backward(const torch::Tensor& dy, const torch::Tensor& qkv, const torch::Tensor& y,
                                        const torch::Tensor& lse, int64_t nh) {
  check_qkv(qkv, nh);
  check_f32(dy, "dy");
  check_f32(y, "y");
  check_f32(lse, "lse");
  const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3, hs = C / nh, Tp = (T + 15) / 16 * 16;
  TORCH_CHECK(dy.sizes() == y.sizes() && y.size(0) == B && y.size(1) == T && y.size(2) == C, "dy and y: (B, T, C)");
  TORCH_CHECK(lse.numel() == B * nh * T, "lse: (B, nh, T)");
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  torch::Tensor dqkv = torch::empty_like(qkv);
  const float *base = qkv.data_ptr<float>(), *gp = dy.data_ptr<float>(), *yp = y.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  float* dbase = dqkv.data_ptr<float>();
  const int64_t Ld = padded_stride(T), Lh = padded_stride(hs);
  at::parallel_for(0, B * nh, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> P(Tp * Ld), dS(Tp * Ld), Kt(hs * Ld), Vt(hs * Ld), Qp(T * Lh), Kp(T * Lh), Gp(T * Lh), D(T);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nh, h = t % nh;
      const float* q = base + b * T * C3 + h * hs;
      const float *k = q + C, *v = q + 2 * C;
      const float* g = gp + b * T * C + h * hs;  // dY rows, stride C
      const float* o = yp + b * T * C + h * hs;
      float* dq = dbase + b * T * C3 + h * hs;
      for (int64_t i = 0; i < T; ++i) {  // D_i = dY_i . Y_i
        V acc = vec::zero();
        for (int64_t d = 0; d < hs; d += W) acc = vec::fmadd(vec::load(g + i * C + d), vec::load(o + i * C + d), acc);
        D[i] = vec::hsum(acc);
      }
      transpose_into(k, C3, T, hs, Tp, Kt.data(), Ld);
      transpose_into(v, C3, T, hs, Tp, Vt.data(), Ld);
      copy_rows(q, C3, T, hs, Qp.data(), Lh);
      copy_rows(k, C3, T, hs, Kp.data(), Lh);
      copy_rows(g, C, T, hs, Gp.data(), Lh);
      gemm(T, Tp, hs, Qp.data(), Lh, 1, Kt.data(), Ld, P.data(), Ld, kCausalN, scale);
      gemm(T, Tp, hs, Gp.data(), Lh, 1, Vt.data(), Ld, dS.data(), Ld, kCausalN, 1.0f);  // dP
      for (int64_t i = 0; i < T; ++i) {
        float* p = P.data() + i * Ld;
        float* ds = dS.data() + i * Ld;
        softmax_row(p, i, Tp, lp + t * T + i);
        const V dv = vec::set1(D[i]);
        // whole vectors: P is zero past the diagonal up to the next multiple of W, and dP finite there
        for (int64_t j = 0; j <= i; j += W) vec::store(ds + j, vec::mul(vec::load(p + j), vec::sub(vec::load(ds + j), dv)));
        for (int64_t z = i + 1; z < std::min(Tp, i + 8); ++z) ds[z] = 0.0f;
      }
      gemm(T, hs, T, P.data(), 1, Ld, Gp.data(), Lh, dq + 2 * C, C3, kUpperK, 1.0f);   // dV = P^T dY
      gemm(T, hs, T, dS.data(), Ld, 1, Kp.data(), Lh, dq, C3, kLowerK, scale);        // dQ = scale dS K
      gemm(T, hs, T, dS.data(), 1, Ld, Qp.data(), Lh, dq + C, C3, kUpperK, scale);    // dK = scale dS^T Q
    }
  });
  return dqkv;
}

void register_training_kernels(pybind11::module& m) {
  m.def("gelu_forward", &gelu_forward, "gelu(x, approximate='tanh'), float32");
  m.def("gelu_backward", &gelu_backward, "the gradient of gelu_forward: dy * gelu'(x)");
  m.def("softmax_xent_forward", &softmax_xent_forward,
        "cross-entropy per row; leaves e^(x - max) in the logits; returns (loss, 1 / sum)");
  m.def("causal_attention_forward", &causal_attention_forward,
        "causal self-attention from c_attn's output (B, T, 3C): (y (B, T, C), lse (B, nh, T))");
  m.def("causal_attention_backward", &causal_attention_backward, "dqkv (B, T, 3C) from dy, qkv, y, lse");
  m.def("sum_squares", &sum_squares, "sum of squares of every value of every tensor, in double");
}
