// gpt2kit's sampling kernel: from next-token logits (B, V) to one token per row, each row with its own
// temperature, top-k, top-p, min-p, typical-p and uniform random number (sampling.py's `draw`).
//
// Why by hand: PyTorch needs a full sort of the 50,257 logits for top-p (4.4 ms a row on 2 cores; a 124M
// decoding step is ~23 ms) and a dozen passes over (B, V) for the rest, which at batch 32 on a small model
// cost several times the model. Here a row takes a few vectorised passes over its logits: the max and its
// index, the top-k threshold by a heap, exp and sums, top-p's and typical-p's cuts, then the draw by inverse
// CDF in vocabulary order, which reads only as far as the token it picks. A cut is found by radix selection
// (a histogram of the float keys' bits finds the bucket where the mass crosses, and only that bucket's few
// tokens are sorted). Top-p alone, the common case, first estimates where its cut lies (top_p_bracket, from
// the most likely tokens and a sample of the rest), so that the exp pass keeps only the tokens near it and
// no pass of its own is needed; a row whose estimate misses takes the histogram's way. Its z is recomputed
// from the logits rather than stored, so that a row's working set (logits, e) stays in a core's L2. Rows
// run in parallel.
//
// Semantics, shared with sampling.py's PyTorch path (which mirrors transformers' warpers, and whose kept
// sets these equal up to float32 rounding at a boundary): z = (x - max x) / T; top-k keeps x >= the k-th
// largest x; top-p keeps the tokens, most likely first (ties: higher id first, as transformers' stable
// ascending sort leaves them), until the kept mass reaches top_p; min-p keeps p >= min_p * max p; typical-p
// keeps |z - E[z]| <= the smallest s whose set {|z - E[z]| <= s} holds typical_p of the mass; each over what
// the filters before it kept.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <queue>
#include <vector>

namespace {

constexpr int kCols = 6;  // params columns: temperature, top_k, top_p, min_p, typical_p, u
constexpr float kMinExp = -87.0f;  // e^z below this is 0 here (float32 underflow: no mass)
constexpr int kBlock = 64;  // the draw sums the kept mass in blocks of this many tokens
// top-p's bracket (top_p_bracket)
constexpr float kTopZ = 8.3177662f;  // ln 4096: tokens with at least 1/4096 of the top one's mass are exact
constexpr int64_t kTopCap = 4096;  // a row with more such tokens estimates them all
constexpr int kStride = 32;  // the rest is estimated from every kStride-th token
constexpr int kBins = 512;
constexpr double kSigmas = 4.0;  // the bracket's margin, in standard errors of the estimate

struct Scratch {
  std::vector<float> z, e;
  std::vector<double> hist;  // level 1: four interleaved histograms of 2048 buckets, then their sum (4096)
  std::vector<int32_t> cand;
  std::vector<uint32_t> candk;  // the candidates' keys, packed as cand is
  std::vector<int64_t> cand2;
  std::vector<float> topz, sz, se, zsorted;  // top_p_bracket's exact and sampled tokens' z, the samples' e
  std::vector<double> bins;
  std::vector<double> blk;  // scale_exp_bracket: each kBlock-token block's mass above the bracket
  std::vector<float> xc;  // a narrowed row (narrow_row): its logits and token ids
  std::vector<int32_t> ids;
  void fit(int64_t V) {
    if (static_cast<int64_t>(z.size()) < V + 8) {
      z.resize(V + 8);
      e.resize(V + 8);
      cand.resize(V + 8);
      candk.resize(V + 8);
      xc.resize(V + 8);
      ids.resize(V + 8);
    }
    hist.resize(4096 + 4 * 2048);
    topz.resize(kTopCap + 16);  // (row_max_top's tail may add up to 7 past kTopCap + 8)
    sz.resize(V / kStride + 16);
    se.resize(V / kStride + kTopCap + 32);
    bins.resize(2 * kBins);
    blk.resize(V / kBlock + 2);
  }
  double* level1() { return hist.data() + 4096; }
};

// e^z for one float as the vector passes make it, so that a token's e does not depend on where in a row
// (or in a narrowed row) it lies
inline float exp1(float z) { return _mm256_cvtss_f32(gpt2kit::vexp(_mm256_set1_ps(z))); }

inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// The max of a row of logits (values above FLT_MAX count as FLT_MAX; NaN never wins) and the first index
// holding it, eight logits at a time: each lane keeps its own first maximum, and of the lanes that hold the
// row's max, the lowest index wins.
struct RunningMax {
  __m256 m = _mm256_set1_ps(-INFINITY);
  __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), idx = at;
  // takes the next eight logits, x[0..8); returns them as counted (clamped to FLT_MAX; a NaN stays NaN)
  __m256 add(const float* x) {
    const __m256 v = _mm256_min_ps(_mm256_set1_ps(FLT_MAX), _mm256_loadu_ps(x));
    const __m256 gt = _mm256_cmp_ps(v, m, _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, v, gt);
    at = _mm256_blendv_epi8(at, idx, _mm256_castps_si256(gt));
    idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
    return v;
  }
  // the max over the lanes (-inf when none was added), *first the lowest index holding it
  float lanes(int64_t* first) const {
    float lane[8];
    int32_t where[8];
    _mm256_storeu_ps(lane, m);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(where), at);
    float best = -INFINITY;
    *first = 0;
    for (int q = 0; q < 8; ++q)
      if (lane[q] > best || (lane[q] == best && where[q] < *first)) {
        best = lane[q];
        *first = where[q];
      }
    return best;
  }
};

inline float row_max(const float* x, int64_t V, int64_t* arg) {
  RunningMax rm;
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) rm.add(x + i);
  int64_t first;
  float best = rm.lanes(&first);
  for (; i < V; ++i)
    if (std::min(x[i], FLT_MAX) > best) {
      best = std::min(x[i], FLT_MAX);
      first = i;
    }
  *arg = first;
  return best;
}

// the k-th largest of x (0 < k < V), counting repeated values: a min-heap of the k largest seen so far;
// eight values at a time are compared with its smallest first, so that most of the row costs one compare.
float kth_largest(const float* x, int64_t V, int64_t k) {
  if (k > 4096) {
    std::vector<float> c(x, x + V);
    std::nth_element(c.begin(), c.begin() + (k - 1), c.end(), std::greater<float>());
    return c[k - 1];
  }
  std::priority_queue<float, std::vector<float>, std::greater<float>> heap;
  int64_t i = 0;
  for (; i < k; ++i) heap.push(x[i]);
  float low = heap.top();
  for (; i + 8 <= V; i += 8) {
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(low), _CMP_GT_OQ));
    while (mask) {
      int j = __builtin_ctz(mask);
      mask &= mask - 1;
      if (x[i + j] > low) {
        heap.pop();
        heap.push(x[i + j]);
        low = heap.top();
      }
    }
  }
  for (; i < V; ++i)
    if (x[i] > low) {
      heap.pop();
      heap.push(x[i]);
      low = heap.top();
    }
  return low;
}

// Among the tokens with e > 0, in the order (key ascending, id descending), the first at which the running
// mass (its own e included) reaches `target`: found = false when none does (the mass falls short by
// rounding). A radix selection: a histogram of the keys' top 12 bits finds the bucket where the mass
// crosses, a second over the next 12 bits of that bucket's tokens narrows it, and the few tokens left are
// sorted and walked.
struct Cut {
  bool found = false;
  uint32_t key = 0;
  int64_t id = 0;
  double mass = 0;  // the running mass at the cut: what the tokens up to it hold
};

// keys that order floats >= 0 as their bits do (the sign bit cleared: -0 is 0, and a NaN, which has no
// mass, stays inside the histograms)
inline uint32_t nonneg_key(float f) { return bits(f) & 0x7FFFFFFFu; }

// min(v, FLT_MAX) as _mm256_min_ps(v, FLT_MAX) takes it (a NaN gives FLT_MAX), so that a token's z is the
// same float whether it is made eight at a time or alone
inline float clamp_max(float v) { return v < FLT_MAX ? v : FLT_MAX; }

// z = (x - m) / T, -inf where x < kth (top-k), from the logits as needed: top-p's passes read the logits again
// rather than a stored z, so that a row's working set (logits, e) stays in a core's L2
struct Scaled {
  const float* x;
  float m, inv_t, kth;
  float operator()(int64_t i) const { return x[i] < kth ? -INFINITY : (clamp_max(x[i]) - m) * inv_t; }
  __m256 of(__m256 xv) const {  // z of eight logits
    const __m256 zv = _mm256_mul_ps(_mm256_sub_ps(_mm256_min_ps(xv, _mm256_set1_ps(FLT_MAX)), _mm256_set1_ps(m)),
                                    _mm256_set1_ps(inv_t));
    return _mm256_blendv_ps(zv, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(xv, _mm256_set1_ps(kth), _CMP_LT_OQ));
  }
  __m256 vec(int64_t i) const { return of(_mm256_loadu_ps(x + i)); }
};

// the keys the cuts order tokens by, >= 0: value(i) as a float, vec(i) eight of them, key[i] as an integer.
// Top-p: -z (most likely first).
struct TopPKey {
  Scaled z;
  float value(int64_t i) const { return -z(i); }
  __m256 vec(int64_t i) const { return _mm256_sub_ps(_mm256_setzero_ps(), z.vec(i)); }
  uint32_t operator[](int64_t i) const { return nonneg_key(value(i)); }
};

// typical-p: |mean - z|, from a stored z
struct TypicalKey {
  const float* z;
  float mean;
  float value(int64_t i) const { return std::fabs(mean - z[i]); }
  __m256 vec(int64_t i) const {
    return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(_mm256_set1_ps(mean), _mm256_loadu_ps(z + i)));
  }
  uint32_t operator[](int64_t i) const { return nonneg_key(value(i)); }
};

// level 1 of find_cut for keys not known while e was made (typical-p's): histograms of e by the keys' top 12
// bits (keys >= 0 as floats: at most 0x7F8 buckets), four interleaved so that neighbouring tokens in one
// bucket, common in flat distributions, do not wait on each other's adds; token i goes to histogram i % 4
// (the last V % 4 tokens to the first)
template <class Key>
void level1_hist(const Key& key, const float* e, int64_t V, double* h4) {
  std::fill(h4, h4 + 4 * 2048, 0.0);
  int64_t i0 = 0;
  for (; i0 + 4 <= V; i0 += 4)
    for (int q = 0; q < 4; ++q) h4[q * 2048 + (key[i0 + q] >> 20)] += e[i0 + q];  // e = 0 adds nothing
  for (; i0 < V; ++i0) h4[key[i0] >> 20] += e[i0];
}

// for each 8-bit mask, the positions of its set bits, first to last: left-packs a vector's selected lanes
struct PackTable {
  uint64_t lanes[256];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      uint64_t v = 0;
      for (int j = 0, n = 0; j < 8; ++j)
        if (m >> j & 1) v |= static_cast<uint64_t>(j) << (8 * n++);
      lanes[m] = v;
    }
  }
};
const PackTable kPack;

// stores the lanes of v that mask selects at p, packed to the front in order (all eight lanes are written:
// p needs room for eight); returns how many were selected. No branch on the mask: where lanes are selected
// at random, one would mispredict.
inline __m256i pack_perm(int mask) {
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(kPack.lanes[mask])));
}

inline int store_packed(float* p, __m256 v, int mask) {
  _mm256_storeu_ps(p, _mm256_permutevar8x32_ps(v, pack_perm(mask)));
  return __builtin_popcount(mask);
}

template <class Int>  // int32_t or uint32_t lanes
inline int store_packed(Int* p, __m256i v, int mask) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permutevar8x32_epi32(v, pack_perm(mask)));
  return __builtin_popcount(mask);
}

template <class Key>
Cut cut_in_bucket(const Key& key, const float* e, const int32_t* cand, const uint32_t* candk, int64_t n, double acc,
                  double target, Scratch& s);

// find_cut with s.level1() already holding level 1's histograms
template <class Key>
Cut find_cut(const Key& key, const float* e, int64_t V, double target, Scratch& s) {
  Cut cut;
  double* h = s.hist.data();
  const double* h4 = s.level1();
  for (int b = 0; b < 2048; ++b) h[b] = (h4[b] + h4[2048 + b]) + (h4[4096 + b] + h4[6144 + b]);
  double acc = 0;
  int b1 = 0;
  for (; b1 < 2048; ++b1) {
    if (acc + h[b1] >= target) break;
    acc += h[b1];
  }
  if (b1 == 2048) return cut;
  // the bucket's tokens, ids ascending, eight at a time and without a branch per token (a token lands in
  // it at random: a branch would mispredict): the selected lanes' ids are packed to the front and stored
  int32_t* cand = s.cand.data();
  uint32_t* candk = s.candk.data();
  int64_t n = 0;
  {
    const __m256i magn = _mm256_set1_epi32(0x7FFFFFFF), want = _mm256_set1_epi32(b1);
    const __m256 zero = _mm256_setzero_ps();
    __m256i ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i step = _mm256_set1_epi32(8);
    int64_t i = 0;
    for (; i + 8 <= V; i += 8, ids = _mm256_add_epi32(ids, step)) {
      const __m256i k = _mm256_and_si256(_mm256_castps_si256(key.vec(i)), magn);
      const __m256 in = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_srli_epi32(k, 20), want)),
                                      _mm256_cmp_ps(_mm256_loadu_ps(e + i), zero, _CMP_GT_OQ));
      const int mask = _mm256_movemask_ps(in);
      store_packed(cand + n, ids, mask);
      n += store_packed(candk + n, k, mask);
    }
    for (; i < V; ++i) {
      cand[n] = static_cast<int32_t>(i);
      candk[n] = key[i];
      n += (e[i] > 0) & ((candk[n] >> 20) == static_cast<uint32_t>(b1));
    }
  }
  return cut_in_bucket(key, e, cand, candk, n, acc, target, s);
}

// level 2 of find_cut and the walk: the cut among the n tokens cand (ids ascending, keys candk) of one level-1
// bucket, before which the tokens hold `acc`
template <class Key>
Cut cut_in_bucket(const Key& key, const float* e, const int32_t* cand, const uint32_t* candk, int64_t n, double acc,
                  double target, Scratch& s) {
  Cut cut;
  double* h = s.hist.data();
  std::fill(h, h + 4096, 0.0);
  for (int64_t j = 0; j < n; ++j) h[(candk[j] >> 8) & 0xFFF] += e[cand[j]];
  int b2 = 0;
  for (; b2 < 4096; ++b2) {
    if (acc + h[b2] >= target) break;
    acc += h[b2];
  }
  if (b2 == 4096) {  // rounding: the sums by bucket crossed where these do not; the bucket's last token
    b2 = 4095;
    while (b2 > 0 && h[b2] == 0) --b2;
    // its tokens' mass is already in acc: undo it, so the walk below ends on the bucket's last token
    acc -= h[b2];
  }
  s.cand2.clear();
  for (int64_t j = n - 1; j >= 0; --j)  // ids descending
    if (((candk[j] >> 8) & 0xFFF) == static_cast<uint32_t>(b2)) s.cand2.push_back(cand[j]);
  std::stable_sort(s.cand2.begin(), s.cand2.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
  for (int64_t i : s.cand2) {
    acc += e[i];
    cut.key = key[i];
    cut.id = i;
    if (acc >= target) break;
  }
  cut.found = !s.cand2.empty();
  cut.mass = acc;
  return cut;
}

// sum of e[0..n) in double, eight floats at a time (two chains of four doubles: a single running double
// would wait on each add's latency)
inline double sum_f64(const float* e, int64_t n) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(e + i);
    a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  double t[4];
  _mm256_storeu_pd(t, _mm256_add_pd(a0, a1));
  double s = (t[0] + t[1]) + (t[2] + t[3]);
  for (; i < n; ++i) s += e[i];
  return s;
}

// e[j] = 0 where key.value(j) > cut, or == cut and j < id (top-p's ties: higher ids first); returns the
// new sum.
template <class Key>
double drop_above(float* e, const Key& key, int64_t V, float cut, int64_t id) {
  const __m256 vcut = _mm256_set1_ps(cut);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = key.vec(i);
    const __m256 ev = _mm256_loadu_ps(e + i);
    _mm256_storeu_ps(e + i, _mm256_andnot_ps(_mm256_cmp_ps(v, vcut, _CMP_GT_OQ), ev));
    if (i < id) {  // ties with the cut below its id go too
      int tie = _mm256_movemask_ps(_mm256_cmp_ps(v, vcut, _CMP_EQ_OQ));
      while (tie) {
        const int j = __builtin_ctz(tie);
        tie &= tie - 1;
        if (i + j < id) e[i + j] = 0;
      }
    }
  }
  for (; i < V; ++i) {
    const float v = key.value(i);
    if (v > cut || (v == cut && i < id)) e[i] = 0;
  }
  return sum_f64(e, V);
}

inline float key_value(uint32_t k) {
  float f;
  std::memcpy(&f, &k, 4);
  return f;
}

// e = e^z (0 below kMinExp; with kFloor, 0 below `floor` too: min-p straight after temperature, in the same
// pass) and their sum, eight at a time, in sum_f64's order; with kStoreZ, z too (typical-p's mean and keys).
// With kHist, also top-p's level-1 histograms of e by the key -z (find_cut's, filled as level1_hist would),
// so that top-p needs no pass of its own to find the bucket where its mass crosses.
template <bool kHist, bool kStoreZ, bool kFloor = false>
double scale_exp(const Scaled& scaled, int64_t V, float* z, float* e, double* h4, float floor = 0) {
  const Scaled sc = scaled;  // (a local copy: stores to e cannot change it, so it is not reloaded per block)
  if (kHist) std::fill(h4, h4 + 4 * 2048, 0.0);
  const __m256 vlow = _mm256_set1_ps(kMinExp), vfloor = _mm256_set1_ps(floor);
  const __m256i magn = _mm256_set1_epi32(0x7FFFFFFF);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 zv = sc.vec(i);
    const __m256 live = _mm256_cmp_ps(zv, vlow, _CMP_GE_OQ);
    __m256 ev = _mm256_and_ps(gpt2kit::vexp(zv), live);
    if (kFloor) ev = _mm256_and_ps(ev, _mm256_cmp_ps(ev, vfloor, _CMP_GE_OQ));
    if (kStoreZ) _mm256_storeu_ps(z + i, zv);
    _mm256_storeu_ps(e + i, ev);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(ev)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(ev, 1));
    acc0 = _mm256_add_pd(acc0, lo);
    acc1 = _mm256_add_pd(acc1, hi);
    if (kHist) {  // key -z >= 0: the bits of |z| (z <= 0)
      alignas(32) uint32_t k[8];
      alignas(32) double d[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(k),
                         _mm256_srli_epi32(_mm256_and_si256(_mm256_castps_si256(zv), magn), 20));
      _mm256_store_pd(d, lo);
      _mm256_store_pd(d + 4, hi);
      for (int q = 0; q < 8; ++q) h4[(q & 3) * 2048 + k[q]] += d[q];
    }
  }
  double sum4[4];
  _mm256_storeu_pd(sum4, _mm256_add_pd(acc0, acc1));
  double S = (sum4[0] + sum4[1]) + (sum4[2] + sum4[3]);
  for (const int64_t whole = V - V % 4; i < V; ++i) {
    const float zi = sc(i);
    if (kStoreZ) z[i] = zi;
    e[i] = zi >= kMinExp ? exp1(zi) : 0.0f;
    if (kFloor && e[i] < floor) e[i] = 0;
    S += e[i];
    if (kHist) h4[(i < whole ? (i & 3) * 2048 : 0) + (nonneg_key(-zi) >> 20)] += e[i];
  }
  return S;
}

// ---- top-p by a bracket: most rows find their cut without a histogram of every token ----------------------
//
// Before e is made, the mass curve (mass above z, against z) is estimated: exactly for the likeliest tokens
// (those with z >= -kTopZ, each at least e^-kTopZ of the most likely one's mass, or fewer where those are
// too many), from every kStride-th token for the rest.
// From it comes a bracket [lo, hi] of z that holds top-p's crossing with a margin of kSigmas standard errors
// of the estimate. The exp pass then sums the mass above hi and packs the tokens inside the bracket, and the
// cut is found among those few. When the bracket misses (the mass above hi already reaches the target, or
// the mass down to lo does not), the row takes find_cut's way; either way the cut is exact.

struct Bracket {
  bool ok = false;
  float lo = 0, hi = 0;
};

// row_max, and in the same pass the x of every token within `margin` of its lane's running max (into s.topz,
// *nt of them; more than kTopCap: *nt > kTopCap and the rest go unrecorded), a superset of the tokens within
// margin of the row's max
float row_max_top(const float* x, int64_t V, int64_t* arg, float margin, Scratch& s, int64_t* nt_out) {
  float* top = s.topz.data();
  int64_t nt = 0;
  const __m256 vmargin = _mm256_set1_ps(margin);
  RunningMax rm;
  __m256 thr = rm.m;
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = rm.add(x + i);
    const __m256 m = rm.m;
    if (nt <= kTopCap) {
      if ((i & 511) == 0) {  // every 512 tokens, the threshold from the max of all lanes so far
        __m256 h = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
        h = _mm256_max_ps(h, _mm256_permute_ps(h, 0x4E));
        h = _mm256_max_ps(h, _mm256_permute_ps(h, 0xB1));
        thr = _mm256_sub_ps(h, vmargin);
      }
      const int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_max_ps(thr, _mm256_sub_ps(m, vmargin)), _CMP_GE_OQ));
      nt += store_packed(top + nt, v, mask);
    }
  }
  int64_t first;
  float best = rm.lanes(&first);
  for (; i < V; ++i) {
    const float v = std::min(x[i], FLT_MAX);
    if (v > best) {
      best = v;
      first = i;
    }
    if (nt <= kTopCap) top[nt++] = v;  // (a few tokens: kept whatever their value; top_p_bracket filters)
  }
  *arg = first;
  *nt_out = nt;
  return best;
}

Bracket top_p_bracket(const Scaled& sc, int64_t V, double P, Scratch& s, int64_t nt) {
  Bracket out;
  // the sample: every kStride-th token, eight at a time
  float* sz = s.sz.data();
  float* se = s.se.data();
  int64_t ns = 0;
  {
    const __m256i lanes = _mm256_setr_epi32(0, kStride, 2 * kStride, 3 * kStride, 4 * kStride, 5 * kStride,
                                            6 * kStride, 7 * kStride);
    int64_t i = 0;
    for (; i + 7 * kStride < V; i += 8 * kStride) {
      const __m256 zv = sc.of(_mm256_i32gather_ps(sc.x + i, lanes, 4));
      _mm256_storeu_ps(sz + ns, zv);
      _mm256_storeu_ps(se + ns, gpt2kit::vexp(zv));
      ns += 8;
    }
    for (; i < V; i += kStride, ++ns) {
      sz[ns] = sc(i);
      se[ns] = exp1(std::max(sz[ns], kMinExp));
    }
  }
  // the exact part: the tokens with z >= ztop, from those row_max_top kept (s.topz: their x, nt of them).
  // Where more than kTopCap lie above -kTopZ and the sample finds the mass uneven (a wide bulk, as some of a
  // trained model's rows have; not a flat row, which the sample alone estimates well), ztop rises to where
  // the sample puts about half of kTopCap, and the row is read again for them.
  float* topz = s.topz.data();
  float ztop = -kTopZ;
  double s1 = 0, s2 = 0;  // the sample's mass and sum of squares: s1^2 / s2 is its effective size
  for (int64_t j = 0; j < ns; ++j) {
    s1 += se[j];
    s2 += static_cast<double>(se[j]) * se[j];
  }
  if (nt > kTopCap && s1 * s1 < 0.25 * ns * s2) {
    std::vector<float>& z = s.zsorted;
    z.assign(sz, sz + ns);
    const int64_t q = std::min<int64_t>(ns - 1, kTopCap / kStride / 2);
    std::nth_element(z.begin(), z.begin() + q, z.end(), std::greater<float>());
    ztop = std::max(ztop, z[q]);
    nt = 0;
    const __m256 floor = _mm256_set1_ps(ztop);
    int64_t i = 0;
    for (; i + 8 <= V && nt <= kTopCap; i += 8) {
      const __m256 xv = _mm256_loadu_ps(sc.x + i);
      nt += store_packed(topz + nt, xv, _mm256_movemask_ps(_mm256_cmp_ps(sc.vec(i), floor, _CMP_GE_OQ)));
    }
    for (; i < V && nt <= kTopCap; ++i)
      if (sc(i) >= ztop) topz[nt++] = sc.x[i];
  }
  if (nt <= kTopCap) {
    int64_t kept = 0;
    for (int64_t j = 0; j < nt; ++j) {
      const float xj = topz[j];
      const float zj = xj < sc.kth ? -INFINITY : (clamp_max(xj) - sc.m) * sc.inv_t;
      if (zj >= ztop) topz[kept++] = zj;
    }
    nt = kept;
  }
  const bool exact = nt <= kTopCap;  // else every token is estimated
  // the curve by bins of z over [zmin, 0]: mass (exact + estimated) and the estimate's variance
  float zmin = 0;
  for (int64_t j = 0; j < ns; ++j)
    if (sz[j] >= kMinExp) zmin = std::min(zmin, sz[j]);
  if (exact)
    for (int64_t j = 0; j < nt; ++j) zmin = std::min(zmin, topz[j]);
  if (!(zmin < 0)) return out;  // every token ties with the most likely one
  double* mass = s.bins.data();
  double* var = mass + kBins;
  std::fill(mass, mass + 2 * kBins, 0.0);
  const float scale = kBins / -zmin;
  auto bin = [&](float z) { return std::min(kBins - 1, static_cast<int>((z - zmin) * scale)); };
  const double w = kStride, wv = kStride * (kStride - 1.0);  // Horvitz-Thompson: each sample stands for kStride
  for (int64_t j = 0; j < ns; ++j) {
    if (!(sz[j] >= zmin) || (exact && sz[j] >= ztop)) continue;  // no mass, or counted exactly
    const int b = bin(sz[j]);
    mass[b] += w * se[j];
    var[b] += wv * static_cast<double>(se[j]) * se[j];
  }
  if (exact) {
    float* tope = s.se.data() + ns;  // (after the samples' e)
    for (int64_t j = 0; j < nt; j += 8) _mm256_storeu_ps(tope + j, gpt2kit::vexp(_mm256_loadu_ps(topz + j)));
    for (int64_t j = 0; j < nt; ++j) mass[bin(topz[j])] += tope[j];
  }
  double total = 0, vtotal = 0;
  for (int b = 0; b < kBins; ++b) {
    total += mass[b];
    vtotal += var[b];
  }
  // from the top bin down: d = (mass at or above the bin's low edge) - P * total, and its standard error
  double above = 0, vabove = 0;
  int hi = kBins, lo = -1;  // hi: the lowest bin still surely short of the target; lo: the first surely past
  for (int b = kBins - 1; b >= 0; --b) {
    above += mass[b];
    vabove += var[b];
    const double d = above - P * total;
    const double v = kSigmas * kSigmas * ((1 - P) * (1 - P) * vabove + P * P * (vtotal - vabove));
    if (d * d > v) {  // |d| > kSigmas standard errors
      if (d < 0) {
        hi = b;
      } else {
        lo = b;
        break;
      }
    }
  }
  if (lo < 0) return out;
  out.ok = true;
  out.lo = zmin + lo / scale;
  out.hi = hi == kBins ? 0.0f : zmin + hi / scale;  // hi == kBins: nothing is surely kept but the bracket
  return out;
}

// adds a float vector's eight lanes to two double accumulators
inline void add_f64(__m256d& a0, __m256d& a1, __m256 v) {
  a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

inline double hsum(__m256d a0, __m256d a1) {
  double t[4];
  _mm256_storeu_pd(t, _mm256_add_pd(a0, a1));
  return (t[0] + t[1]) + (t[2] + t[3]);
}

// scale_exp for a bracket: e, and its sum (returned); the mass with z > hi (*sure; by block of kBlock tokens
// in s.blk, for the draw) and, packed as find_cut packs its candidates, the ids of the tokens with
// lo <= z <= hi and e > 0 (s.cand, *n; their keys -z in s.candk). The sum is summed as scale_exp sums it.
double scale_exp_bracket(const Scaled& scaled, int64_t V, float* e, const Bracket& br, double* sure, Scratch& s,
                         int64_t* n_out) {
  const Scaled sc = scaled;  // (a local copy: stores to e cannot change it, so it is not reloaded per block)
  const __m256 vlow = _mm256_set1_ps(kMinExp);
  const __m256 vlo = _mm256_set1_ps(br.lo), vhi = _mm256_set1_ps(br.hi), zero = _mm256_setzero_ps();
  const __m256i step = _mm256_set1_epi32(8), magn = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int32_t* cand = s.cand.data();
  uint32_t* candk = s.candk.data();
  int64_t n = 0;
  __m256d acc0 = _mm256_setzero_pd(), acc1 = acc0;
  double* blk = s.blk.data();
  double up = 0;
  const int64_t whole = V - V % 8;
  int64_t i = 0;
  alignas(32) float zb[64];
  while (i < whole) {
    // e for a block of 64 tokens (their z kept in zb), then the block's bracket: two loops, for the
    // second's short steps overlap the first's long exp chains, where one loop would wait on them
    const int64_t i0 = i, end = std::min(whole, i + 64);
    for (; i < end; i += 8) {
      const __m256 zv = sc.vec(i);
      const __m256 ev = _mm256_and_ps(gpt2kit::vexp(zv), _mm256_cmp_ps(zv, vlow, _CMP_GE_OQ));
      _mm256_store_ps(zb + (i - i0), zv);
      _mm256_storeu_ps(e + i, ev);
      add_f64(acc0, acc1, ev);
    }
    __m256d up0 = _mm256_setzero_pd(), up1 = up0;
    for (int64_t j = i0; j < end; j += 8, ids = _mm256_add_epi32(ids, step)) {
      const __m256 zv = _mm256_load_ps(zb + (j - i0)), ev = _mm256_loadu_ps(e + j);
      add_f64(up0, up1, _mm256_and_ps(ev, _mm256_cmp_ps(zv, vhi, _CMP_GT_OQ)));
      const __m256 in = _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(zv, vlo, _CMP_GE_OQ),
                                                    _mm256_cmp_ps(zv, vhi, _CMP_LE_OQ)),
                                      _mm256_cmp_ps(ev, zero, _CMP_GT_OQ));
      const int mask = _mm256_movemask_ps(in);
      const __m256i k = _mm256_and_si256(_mm256_castps_si256(zv), magn);  // key -z: the bits of |z| (z <= 0)
      store_packed(cand + n, ids, mask);
      n += store_packed(candk + n, k, mask);
    }
    blk[i0 / kBlock] = hsum(up0, up1);
    up += blk[i0 / kBlock];
  }
  if (whole % kBlock == 0) blk[whole / kBlock] = 0;  // (the tail's block, when it starts one)
  double S = hsum(acc0, acc1);
  for (; i < V; ++i) {
    const float zi = sc(i);
    e[i] = zi >= kMinExp ? exp1(zi) : 0.0f;
    S += e[i];
    if (zi > br.hi) {
      up += e[i];
      blk[i / kBlock] += e[i];
    }
    if (zi >= br.lo && zi <= br.hi && e[i] > 0) {
      cand[n] = static_cast<int32_t>(i);
      candk[n++] = nonneg_key(-zi);
    }
  }
  *sure = up;
  *n_out = n;
  return S;
}

// the cut among a bracket's n tokens (see top_p_bracket), before which the tokens hold `sure`: found = false
// when the bracket missed it. One histogram over the span of their keys (a flat row's bracket is narrow, and
// find_cut's level 1 would put all of it in one bucket), then the bucket where the mass crosses is sorted.
Cut cut_in_bracket(const TopPKey& key, const float* e, double sure, int64_t n, double target, Scratch& s) {
  Cut cut;
  if (!(sure < target) || n == 0) return cut;
  const int32_t* cand = s.cand.data();
  const uint32_t* candk = s.candk.data();
  uint32_t kmin = UINT32_MAX, kmax = 0;
  for (int64_t j = 0; j < n; ++j) {
    kmin = std::min(kmin, candk[j]);
    kmax = std::max(kmax, candk[j]);
  }
  int nb = 64;  // buckets: about two candidates each, 64 to 4096
  while (nb < 4096 && nb < n / 2) nb *= 2;
  int shift = 0;
  while (((kmax - kmin) >> shift) >= static_cast<uint32_t>(nb)) ++shift;
  double* h = s.hist.data();
  std::fill(h, h + nb, 0.0);
  for (int64_t j = 0; j < n; ++j) h[(candk[j] - kmin) >> shift] += e[cand[j]];
  double acc = sure;
  int b = 0;
  for (; b < nb; ++b) {
    if (acc + h[b] >= target) break;
    acc += h[b];
  }
  if (b == nb) return cut;
  s.cand2.clear();
  for (int64_t j = n - 1; j >= 0; --j)  // ids descending
    if (((candk[j] - kmin) >> shift) == static_cast<uint32_t>(b)) s.cand2.push_back(cand[j]);
  std::stable_sort(s.cand2.begin(), s.cand2.end(), [&](int64_t a, int64_t c) { return key[a] < key[c]; });
  for (int64_t i : s.cand2) {
    acc += e[i];
    cut.key = key[i];
    cut.id = i;
    if (acc >= target) break;
  }
  cut.found = true;  // (the bucket's sum crossed where its walk did not, by rounding: its last token)
  cut.mass = acc;
  return cut;
}

// The draw: inverse CDF in vocabulary order, the first kept token whose running mass exceeds u * total, where
// total (the kept mass) is known already. Blocks of kBlock tokens are summed only up to the one where the
// running mass passes the target, then that block is walked token by token. Kept says which tokens count:
// sum(j, end) is the kept mass of a block (summed as sum_f64 sums), at(i) whether token i is kept.
template <class Kept>
int64_t draw_lazy(const float* e, int64_t V, double u, double total, const Kept& kept) {
  const double target = u * total;
  double acc = 0;
  int64_t last = -1;  // the last block holding kept mass
  for (int64_t j = 0; j < V; j += kBlock) {
    const int64_t end = std::min(V, j + kBlock);
    const double sum = kept.sum(j, end);
    if (sum > 0) last = j;
    if (acc + sum > target) {
      for (int64_t i = j; i < end; ++i)
        if (e[i] > 0 && kept.at(i)) {
          acc += e[i];
          if (acc > target) return i;
        }
      break;  // the block's sum passed the target where its running sum did not (rounding): its last token
    }
    acc += sum;
  }
  if (last < 0) return -1;
  for (int64_t i = std::min(V, last + kBlock) - 1; i >= last; --i)
    if (e[i] > 0 && kept.at(i)) return i;  // u * total rounded up to the total: the last kept token
  return -1;
}

// every token with e > 0 is kept
struct AllKept {
  const float* e;
  double sum(int64_t j, int64_t end) const { return sum_f64(e + j, end - j); }
  bool at(int64_t) const { return true; }
};

// top-p's kept tokens without a drop pass: key below the cut, or at it with an id >= the cut's (top-p's ties:
// higher ids first)
struct TopPKept {
  const float* e;
  TopPKey key;
  float cut;
  int64_t id;
  double sum(int64_t j, int64_t end) const {  // (dropped: z below -cut, or at it with an id below the cut's)
    const __m256 zc = _mm256_set1_ps(-cut);
    const __m256i vid = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(id, INT32_MAX)));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256d a0 = _mm256_setzero_pd(), a1 = a0;
    int64_t i = j;
    for (; i + 8 <= end; i += 8) {
      const __m256 z = key.z.vec(i);
      const __m256i ids = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(i)), lane);
      const __m256 drop = _mm256_or_ps(
          _mm256_cmp_ps(z, zc, _CMP_LT_OQ),
          _mm256_and_ps(_mm256_cmp_ps(z, zc, _CMP_EQ_OQ), _mm256_castsi256_ps(_mm256_cmpgt_epi32(vid, ids))));
      add_f64(a0, a1, _mm256_andnot_ps(drop, _mm256_loadu_ps(e + i)));
    }
    double sum = hsum(a0, a1);
    for (; i < end; ++i)
      if (at(i)) sum += e[i];
    return sum;
  }
  bool at(int64_t i) const {
    const float v = key.value(i);
    return !(v > cut || (v == cut && i < id));
  }
};

// top-p's kept tokens when its cut came from a bracket: a block's kept mass is its mass above the bracket
// (s.blk) and that of its kept candidates (ids ascending: taken in turn, as draw_lazy asks for the blocks in
// order), so the draw reads neither the logits nor e but in the block holding its token
struct BracketKept {
  const double* blk;
  const int32_t* cand;
  const uint32_t* candk;
  const float* e;
  int64_t n;
  uint32_t cut;  // the cut's key and id: a candidate is kept at a key below it, or at it with an id >= its
  int64_t id;
  TopPKept tok;
  mutable int64_t next = 0;  // the first candidate not yet taken
  double sum(int64_t j, int64_t end) const {
    double sum = blk[j / kBlock];
    for (; next < n && cand[next] < end; ++next) {  // (a select, not a branch: about half are kept)
      const bool kept = candk[next] < cut || (candk[next] == cut && cand[next] >= id);
      sum += kept ? static_cast<double>(e[cand[next]]) : 0.0;
    }
    return sum;
  }
  bool at(int64_t i) const { return tok.at(i); }
};

// what filter_row leaves for the draw: e holds the kept tokens' e^z (0 elsewhere) and `total` their sum; or,
// with top_p set, e holds every token's and the kept ones are those TopPKept keeps (the drop is left to the
// draw, which reads only as far as it needs)
struct Kept {
  double total = 0;  // < 0: a greedy row
  bool top_p = false;
  TopPKey key{Scaled{nullptr, 0, 0, 0}};
  float cut = 0;
  int64_t id = 0;
  int64_t n = 0;  // > 0: the cut came from a bracket of n candidates (s.cand, s.candk, s.blk; BracketKept)
};

// One row's filters: fills s.e (e^z of the kept tokens, 0 for the rest; s.z: z, for typical-p). *arg is the
// row's argmax (with max_known, a row that is not top-p's comes with its max and *arg found). Top-p, when no
// filter follows it and `lazy`, leaves its drop to the draw (see Kept).
Kept filter_row(const float* x, int64_t V, const double* p, Scratch& s, int64_t* arg, bool lazy,
                const float* max_known = nullptr) {
  const double T = p[0], P = p[2], MP = p[3], TP = p[4];
  const int64_t K = static_cast<int64_t>(p[1]);
  Kept out;
  const bool bracketed = P < 1 && TP == 1 && T > 0;  // top-p alone: by a bracket (top_p_bracket)
  int64_t nt = 0;
  const float m = bracketed ? row_max_top(x, V, arg, static_cast<float>(std::min(kTopZ * T, 1e30)), s, &nt)
                  : max_known ? *max_known  // (with *arg: the caller found them)
                              : row_max(x, V, arg);
  if (T == 0) {
    out.total = -1;
    return out;
  }
  const float inv_t = static_cast<float>(std::min(1.0 / T, static_cast<double>(FLT_MAX)));
  const float kth = (K > 0 && K < V) ? kth_largest(x, V, K) : -INFINITY;
  float* z = s.z.data();
  float* e = s.e.data();
  const Scaled sc{x, m, inv_t, kth};
  double* h4 = s.level1();
  Bracket bracket;
  const TopPKey key{sc};
  Cut c;
  double S;
  const bool br_ok = bracketed && (bracket = top_p_bracket(sc, V, P, s, nt)).ok;
  int64_t n = 0;
  if (br_ok) {
    double sure;
    S = scale_exp_bracket(sc, V, e, bracket, &sure, s, &n);
    if (S > 0 && !(c = cut_in_bracket(key, e, sure, n, P * S, s)).found) {  // missed: find_cut's way
      n = 0;
      level1_hist(key, e, V, h4);
      c = find_cut(key, e, V, P * S, s);
    }
  } else if (P < 1) {
    S = TP < 1 ? scale_exp<true, true>(sc, V, z, e, h4) : scale_exp<true, false>(sc, V, z, e, h4);
    if (S > 0) c = find_cut(key, e, V, P * S, s);
  } else if (MP > 0) {  // min-p straight after temperature: dropped in the exp pass
    const float mp = static_cast<float>(MP);
    S = TP < 1 ? scale_exp<false, true, true>(sc, V, z, e, h4, mp) : scale_exp<false, false, true>(sc, V, z, e, h4, mp);
  } else {
    S = TP < 1 ? scale_exp<false, true>(sc, V, z, e, h4) : scale_exp<false, false>(sc, V, z, e, h4);
  }
  if (P < 1 && S > 0) {
    if (c.found && lazy && MP == 0 && TP == 1) {
      out.total = c.mass;
      out.top_p = true;
      out.key = key;
      out.cut = key_value(c.key);
      out.id = c.id;
      out.n = n;
      return out;
    }
    if (c.found) S = drop_above(e, key, V, key_value(c.key), c.id);
  }
  if (MP > 0 && P < 1) {  // (min-p after top-p, over what its cut kept; without top-p, scale_exp dropped them)
    const float mp = static_cast<float>(MP);
    for (int64_t j = 0; j < V; ++j) e[j] = e[j] < mp ? 0.0f : e[j];
    S = sum_f64(e, V);
  }
  if (TP < 1 && S > 0) {
    double ez[4] = {0, 0, 0, 0};  // four chains, as in sum_f64
    int64_t j = 0;
    for (; j + 4 <= V; j += 4)
      for (int q = 0; q < 4; ++q)
        if (e[j + q] > 0) ez[q] += static_cast<double>(e[j + q]) * z[j + q];
    for (; j < V; ++j)
      if (e[j] > 0) ez[0] += static_cast<double>(e[j]) * z[j];
    const float mean = static_cast<float>(((ez[0] + ez[1]) + (ez[2] + ez[3])) / S);  // -log p - H = E[z] - z
    const TypicalKey key{z, mean};
    level1_hist(key, e, V, h4);
    const Cut c = find_cut(key, e, V, TP * S, s);
    if (c.found) S = drop_above(e, key, V, key_value(c.key), 0);  // ties at the cut all stay
  }
  out.total = S;
  return out;
}

// ---- narrowing: top-k and min-p bound the kept set before any sum ------------------------------------------
//
// Top-k (k at most an eighth of the row), and min-p when no top-p precedes it (top-p counts its mass over every
// token top-k keeps, min-p's drops included), keep only tokens known from the logits and the row's max. Such a
// row is first narrowed to the tokens they may keep, ids ascending, and the filters and the draw run on that
// short row: for top-k 40, exp of 40 tokens instead of 50,257. A token's e^z is the same float either way
// (the short row has the same max), the filters see the same tokens in the same order, and only the order in
// which the draw's double sums add them differs.

bool narrows(const double* p, int64_t V) {
  const double T = p[0], P = p[2], MP = p[3];
  const int64_t K = static_cast<int64_t>(p[1]);
  return T > 0 && ((K > 0 && K <= V / 8) || (MP > 0 && P >= 1));
}

// keeps the first n tokens of xc and id where keep(i) holds, in order -> how many (keep may read xc[i])
template <class Keep>
int64_t compact(float* xc, int32_t* id, int64_t n, Keep keep) {
  int64_t j = 0;
  for (int64_t i = 0; i < n; ++i)
    if (keep(i)) {
      xc[j] = xc[i];
      id[j++] = id[i];
    }
  return j;
}

// the K-th largest of x (0 < K < V, counting repeated values; NaN never counts) with, in s.xc and s.ids (ids
// ascending), every token at or above it; returns how many. One pass packs the tokens at or above a threshold
// into a buffer; whenever the buffer holds `cap`, the threshold rises to its K-th largest and the buffer keeps
// only those at or above it (so a heap's per-token work is not needed, and K in the thousands costs little more
// than K = 40).
float top_k_narrow(const float* x, int64_t V, int64_t K, Scratch& s, int64_t* n_out) {
  float* xc = s.xc.data();
  int32_t* id = s.ids.data();
  std::vector<float>& tmp = s.zsorted;
  int64_t cap = std::max<int64_t>(2 * K, 1024), n = 0;
  float thr = -INFINITY;
  auto select = [&]() {  // thr = the K-th largest in the buffer, and the buffer only what reaches it
    tmp.assign(xc, xc + n);
    std::nth_element(tmp.begin(), tmp.begin() + (K - 1), tmp.end(), std::greater<float>());
    thr = tmp[K - 1];
    n = compact(xc, id, n, [&](int64_t i) { return xc[i] >= thr; });
  };
  const __m256i step = _mm256_set1_epi32(8);
  __m256i ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8, ids = _mm256_add_epi32(ids, step)) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(xv, _mm256_set1_ps(thr), _CMP_GE_OQ));
    if (mask == 0) continue;  // most blocks, once the threshold has risen: a branch that predicts well
    store_packed(xc + n, xv, mask);
    n += store_packed(id + n, ids, mask);
    if (n >= cap) {
      select();
      if (2 * n > cap) cap = 2 * n;  // many ties at the threshold: a bigger buffer, not a select per block
    }
  }
  for (; i < V; ++i)
    if (x[i] >= thr) {
      xc[n] = x[i];
      id[n++] = static_cast<int32_t>(i);
    }
  if (n > K) {
    select();
  } else if (n < K) {
    thr = -INFINITY;  // fewer than K tokens that are not NaN: all of them
  } else {
    thr = *std::min_element(xc, xc + n);
  }
  *n_out = n;
  return thr;
}

// the tokens a row narrows to (see narrows): their logits into s.xc and ids into s.ids; returns how many (0:
// the row is better filtered whole, when *m_out and *arg_out may hold its max and argmax, else NaN).
// min-p's test here is on z with a margin below ln(min_p) (the exact one, e < min_p, runs on the short row).
int64_t narrow_row(const float* x, int64_t V, const double* p, Scratch& s, float* m_out, int64_t* arg_out) {
  const double T = p[0], P = p[2], MP = p[3];
  const int64_t K = static_cast<int64_t>(p[1]);
  const bool minp = MP > 0 && P >= 1;
  const float inv_t = static_cast<float>(std::min(1.0 / T, static_cast<double>(FLT_MAX)));
  const float zfloor = minp ? static_cast<float>(std::log(MP)) - 1e-3f : -INFINITY;
  float* xc = s.xc.data();
  int32_t* id = s.ids.data();
  int64_t n = 0, arg = 0;
  if (K > 0 && K < V) {
    top_k_narrow(x, V, K, s, &n);
    if (minp) {  // the row's max is among the tokens top-k keeps
      const Scaled sc{xc, row_max(xc, n, &arg), inv_t, -INFINITY};
      n = compact(xc, id, n, [&](int64_t i) { return sc(i) >= zfloor; });
    }
    return n;
  }
  // min-p alone; not worth it where every 32nd token says that more than a quarter of the row would stay
  // (a flat row, as random weights give): 0, and the row is filtered whole
  *m_out = row_max(x, V, arg_out);  // (kept for that whole row's filters)
  const Scaled sc{x, *m_out, inv_t, -INFINITY};
  int64_t hits = 0;
  for (int64_t j = 0; j < V; j += kStride) hits += sc(j) >= zfloor;
  if (4 * hits * kStride > V) return 0;
  const __m256 vfloor = _mm256_set1_ps(zfloor);
  const __m256i step = _mm256_set1_epi32(8);
  __m256i ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8, ids = _mm256_add_epi32(ids, step)) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(sc.vec(i), vfloor, _CMP_GE_OQ));
    store_packed(xc + n, _mm256_loadu_ps(x + i), mask);
    n += store_packed(id + n, ids, mask);
  }
  for (; i < V; ++i)
    if (sc(i) >= zfloor) {
      xc[n] = x[i];
      id[n++] = static_cast<int32_t>(i);
    }
  return n;
}

// filter_row on a row as sample_rows and filter_rows take it, narrowed first where narrows() says so and
// narrow_row finds it worth it. *ids and *n: the narrowed row's token ids and length (nullptr and V when the
// row was filtered whole); s.e and *arg index that row.
Kept filter_any(const float* x, int64_t V, const double* p, Scratch& s, int64_t* arg, bool lazy,
                const int32_t** ids, int64_t* n) {
  *ids = nullptr;
  *n = V;
  float m = NAN;
  if (narrows(p, V)) {
    *n = narrow_row(x, V, p, s, &m, arg);
    if (*n > 0) {
      *ids = s.ids.data();
      double q[kCols];
      std::copy(p, p + kCols, q);
      q[1] = 0;  // (top-k is done)
      return filter_row(s.xc.data(), *n, q, s, arg, lazy);
    }
    *n = V;
  }
  return filter_row(x, V, p, s, arg, lazy, std::isnan(m) ? nullptr : &m);
}

// the row's token, drawn with u from what filter_row kept; -1 when nothing has mass
int64_t draw_row(const float* e, int64_t V, double u, const Kept& k, const Scratch& s) {
  if (!(k.total > 0)) return -1;
  if (!k.top_p) return draw_lazy(e, V, u, k.total, AllKept{e});
  const TopPKept tok{e, k.key, k.cut, k.id};
  if (k.n == 0) return draw_lazy(e, V, u, k.total, tok);
  return draw_lazy(e, V, u, k.total,
                   BracketKept{s.blk.data(), s.cand.data(), s.candk.data(), e, k.n, bits(k.cut), k.id, tok});
}

void check_inputs(const torch::Tensor& logits, const torch::Tensor& params) {
  gpt2kit::check_f32(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits must be (B, V)");
  TORCH_CHECK(logits.size(1) < INT32_MAX, "the vocabulary must have fewer than 2^31 - 1 tokens");  // int32 ids
  TORCH_CHECK(params.scalar_type() == at::kDouble && params.is_contiguous() && params.device().is_cpu() &&
                  params.dim() == 2 && params.size(0) == logits.size(0) && params.size(1) == kCols,
              "params must be a contiguous float64 CPU tensor (B, 6)");
}

// tokens (B,) int64 from logits (B, V) and params (B, 6): temperature (0: argmax), top_k, top_p, min_p,
// typical_p, u in [0, 1)
torch::Tensor sample_rows(const torch::Tensor& logits, const torch::Tensor& params) {
  check_inputs(logits, params);
  const int64_t B = logits.size(0), V = logits.size(1);
  torch::Tensor out = torch::empty({B}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  const double* p = params.data_ptr<double>();
  int64_t* tok = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
    thread_local Scratch s;
    s.fit(V);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t arg = 0, n = 0;
      const int32_t* ids = nullptr;
      const Kept k = filter_any(x + r * V, V, p + r * kCols, s, &arg, true, &ids, &n);
      const int64_t t = draw_row(s.e.data(), n, p[r * kCols + 5], k, s);
      tok[r] = ids == nullptr ? (t >= 0 ? t : arg) : ids[t >= 0 ? t : arg];  // t < 0: greedy, or nothing
      // left with mass (all logits -inf): the argmax (a narrowed row holds the row's first maximum)
    }
  });
  return out;
}

// each row's argmax (B,) int64: its first maximum, values above FLT_MAX counting as FLT_MAX and NaN never
// winning, as sample_rows' greedy rows pick (PyTorch's argmax, a pass of its own, is ~15x slower at batch 32)
torch::Tensor argmax_rows(const torch::Tensor& logits) {
  gpt2kit::check_f32(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must be (B, V), V > 0");
  TORCH_CHECK(logits.size(1) < INT32_MAX, "the vocabulary must have fewer than 2^31 - 1 tokens");  // int32 ids
  const int64_t B = logits.size(0), V = logits.size(1);
  torch::Tensor out = torch::empty({B}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* tok = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_max(x + r * V, V, tok + r);
  });
  return out;
}

// what sample_rows keeps: e^z (B, V) of each kept token relative to the row's most likely one, 0 elsewhere
torch::Tensor filter_rows(const torch::Tensor& logits, const torch::Tensor& params) {
  check_inputs(logits, params);
  const int64_t B = logits.size(0), V = logits.size(1);
  torch::Tensor out = torch::zeros({B, V}, logits.options());
  const float* x = logits.data_ptr<float>();
  const double* p = params.data_ptr<double>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
    thread_local Scratch s;
    s.fit(V);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t arg = 0, n = 0;
      const int32_t* ids = nullptr;
      if (filter_any(x + r * V, V, p + r * kCols, s, &arg, false, &ids, &n).total < 0)
        o[r * V + arg] = 1;
      else if (ids == nullptr)
        std::copy(s.e.begin(), s.e.begin() + V, o + r * V);
      else
        for (int64_t j = 0; j < n; ++j) o[r * V + ids[j]] = s.e[j];
    }
  });
  return out;
}

}  // namespace

void register_sampling_kernels(pybind11::module& m) {
  m.def("sample_rows", &sample_rows, "one token per row of logits (B, V) with per-row params (B, 6)");
  m.def("argmax_rows", &argmax_rows, "each row's first maximum of logits (B, V), as sample_rows' greedy rows");
  m.def("filter_rows", &filter_rows, "the kept tokens' e^z (B, V) that sample_rows draws from");
}
