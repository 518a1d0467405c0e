// gpt2kit's decoding kernels for x86-64 CPUs with AVX2/FMA, float32.
//
// linear: y (M, N) = x (M, K) @ W (N, K)^T + b for small M. Why by hand: one-token decoding is nothing but such products with M = batch size (1..32), and on the
// CPUs we measured MKL's float32 GEMV/GEMM streams the weights at 14-22 GB/s for M = 1 and far less for
// M = 2..32 (the 50257 x 768 LM head at M = 8 took 31 ms), where a plain register-tiled loop over the
// row-major weights reaches the machine's streaming-read bandwidth (~30-34 GB/s on 2 cores). Each weight
// row is read from memory once and used for every input row while it sits in L1.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// R weight rows x MB input rows: R * MB accumulators stay in registers across the whole K loop.
template <int R, int MB>
inline void tile(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N) {
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) y[m * N + r] = hsum(acc[r][m]) + (b ? b[r] : 0.f);
}

// Rows [n0, n1) of the output for every input row, R weight rows at a time.
template <int R, int MB>
void rows(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K, int64_t N,
          int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += R) {
    const float* wn = w + n * K;
    const float* bn = b ? b + n : nullptr;
    int64_t m = 0;
    for (; m + MB <= M; m += MB) tile<R, MB>(x + m * K, wn, bn, y + m * N + n, K, N);
    for (; m < M; ++m) tile<R, 1>(x + m * K, wn, bn, y + m * N + n, K, N);
  }
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "shapes: x (M, K), W (N, K)");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(w.is_contiguous() && x_in.size(1) % 8 == 0, "W row-major, K a multiple of 8");
  const torch::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == at::kFloat, "bias (N,)");
    bp = bias->data_ptr<float>();
  }
  float* yp = y.data_ptr<float>();
  // batch 1: 8 rows per tile (more independent streams in flight); batches: 4 rows x 2 inputs
  const int64_t R = M == 1 ? 8 : 4;
  const int64_t groups = N / R;
  // Chunks of ~64 KiB of weights handed out dynamically (torch's own OpenMP runtime and thread count):
  // a thread the OS pauses for a moment no longer holds up half the matrix, which on small shared
  // machines was worth 5-15% in the median step against an even static split.
  const int64_t per = std::max<int64_t>(1, (64 * 1024) / (R * K * 4));  // groups of R rows per chunk
  const int64_t chunks = (groups + per - 1) / per;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t g0 = c * per, g1 = std::min(groups, g0 + per);
    if (M == 1)
      rows<8, 1>(xp, wp, bp, yp, M, K, N, g0 * R, g1 * R);
    else
      rows<4, 2>(xp, wp, bp, yp, M, K, N, g0 * R, g1 * R);
  }
  rows<1, 1>(xp, wp, bp, yp, M, K, N, groups * R, N);  // the last N % R rows
  return y;
}

// One decoding step of attention, every row at the same position `pos`: qkv (B, 3C) is c_attn's output
// (q, k, v side by side, C = nh * hs); k and v are written into the cache (B, nh, S_max, hs) at slot pos,
// then each head's query attends to slots 0..pos. Returns (B, C), heads side by side (the layout c_proj
// wants, so no transpose follows). Why by hand: at one query per head, PyTorch's
// scaled_dot_product_attention spends most of its ~40 us per layer on set-up rather than arithmetic, and
// the split / view / transpose / cache-copy ops around it cost as much again.
torch::Tensor decode_attention(const torch::Tensor& qkv_in, const torch::Tensor& k, const torch::Tensor& v,
                               int64_t pos) {
  TORCH_CHECK(qkv_in.dim() == 2 && k.dim() == 4 && k.sizes() == v.sizes(), "qkv (B, 3C), k and v (B, nh, S, hs)");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat && qkv_in.scalar_type() == at::kFloat, "float32 contiguous cache");
  const int64_t B = k.size(0), nh = k.size(1), S = k.size(2), hs = k.size(3), C = nh * hs;
  TORCH_CHECK(qkv_in.size(0) == B && qkv_in.size(1) == 3 * C && hs % 8 == 0 && pos >= 0 && pos < S, "shapes");
  const torch::Tensor qkv = qkv_in.contiguous();
  torch::Tensor y = torch::empty({B, C}, qkv.options());
  const float* qp = qkv.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  const int64_t kv_len = pos + 1;
  at::parallel_for(0, B * nh, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(kv_len);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nh, h = i % nh;
      const float* qh = qp + b * 3 * C + h * hs;
      float* kh = kp + i * S * hs;
      float* vh = vp + i * S * hs;
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
      float* yh = yp + b * C + h * hs;
      for (int64_t d = 0; d < hs; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t s = 0; s < kv_len; ++s)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), _mm256_loadu_ps(vh + s * hs + d), acc);
        _mm256_storeu_ps(yh + d, _mm256_mul_ps(acc, _mm256_set1_ps(1.0f / sum)));
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ W.T + b for small M (float32, AVX2/FMA)");
  m.def("decode_attention", &decode_attention, "write k, v at slot pos, then one-query attention over 0..pos");
}
