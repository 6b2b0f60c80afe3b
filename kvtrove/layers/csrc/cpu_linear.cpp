// y = x W^T (+ b) for the few-token steps of decoding: x [M, K] float32/bfloat16, W [N, K] float32/bfloat16.
// Decoding reads every weight once per step, so this is a memory-streaming problem: each thread walks a
// contiguous range of rows once, and all M tokens are computed while a row is in L1. PyTorch's CPU
// paths stream ~9 GB/s here (measured on AVX2 machines: F.linear, oneDNN); this reaches the machine's
// read bandwidth. Products and sums in float32; the output is rounded to x's dtype.
//
// bfloat16 weights are widened 16 at a time with two unpacks against zero (a bf16 is the high half of
// a float32), which yields them in the order 0-3, 8-11 | 4-7, 12-15; x is permuted the same way once
// per call, so the dot products pair up and cost one shuffle per 8 weights instead of two.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "vec.h"

namespace {

using kvt::to_f;

// x as float32, in the order a 16-weight step consumes it (identity for float32 weights); the K % 16
// tail stays in place.
template <typename W, typename X>
void order_x(const X* x, float* xo, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const X* src = x + m * K;
    float* dst = xo + m * K;
    int64_t k = 0;
    if constexpr (std::is_same_v<W, c10::BFloat16>) {
      for (; k + 16 <= K; k += 16) {
        for (int j = 0; j < 4; ++j) {
          dst[k + j] = to_f(src[k + j]);
          dst[k + 4 + j] = to_f(src[k + 8 + j]);
          dst[k + 8 + j] = to_f(src[k + 4 + j]);
          dst[k + 12 + j] = to_f(src[k + 12 + j]);
        }
      }
    }
    for (; k < K; ++k) dst[k] = to_f(src[k]);
  }
}

// The output element: bias added, rounded to the output dtype.
template <typename O, typename W>
inline void store(O* y, float s, const W* bias, int64_t n) {
  *y = static_cast<O>(bias != nullptr ? s + to_f(bias[n]) : s);
}

#ifdef KVT_AVX2
// acc += w[k:k+16] . x[k:k+16] (x in step order)
inline __m256 step(const float* w, const float* x, __m256 acc) {
  acc = _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(x), acc);
  return _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), _mm256_loadu_ps(x + 8), acc);
}
inline void widen(const c10::BFloat16* w, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i z = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
}
inline __m256 step(const c10::BFloat16* w, const float* x, __m256 acc) {
  __m256 lo, hi;
  widen(w, lo, hi);
  acc = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x), acc);
  return _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + 8), acc);
}

// One token: four independent accumulators keep the FMA pipes busy while the row streams in.
template <typename W>
float dot(const W* w, const float* x, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    a0 = step(w + k, x + k, a0);
    a1 = step(w + k + 16, x + k + 16, a1);
    a2 = step(w + k + 32, x + k + 32, a2);
    a3 = step(w + k + 48, x + k + 48, a3);
  }
  for (; k + 16 <= K; k += 16) a0 = step(w + k, x + k, a0);
  float s = kvt::hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) s += to_f(w[k]) * x[k];
  return s;
}

// R rows x MB tokens: each weight vector loaded once feeds MB FMAs.
template <typename W, typename O, int R, int MB>
void tile(const W* w, const float* x, O* y, const W* bias, int64_t n0, int64_t K, int64_t N) {
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 lo[R], hi[R];  // R rows' 16 weights, widened once; each x vector is loaded once for all R rows
    for (int r = 0; r < R; ++r) {
      if constexpr (std::is_same_v<W, float>) {
        lo[r] = _mm256_loadu_ps(w + r * K + k);
        hi[r] = _mm256_loadu_ps(w + r * K + k + 8);
      } else {
        widen(w + r * K + k, lo[r], hi[r]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(lo[r], xv, acc[r][m]);
    }
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k + 8);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(hi[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float s = kvt::hsum(acc[r][m]);
      for (int64_t j = k; j < K; ++j) s += to_f(w[r * K + j]) * x[m * K + j];
      store(y + m * N + r, s, bias, n0 + r);
    }
}
#else
template <typename W>
float dot(const W* w, const float* x, int64_t K) {
  // x is in step order: walk w the same way
  float s = 0.f;
  int64_t k = 0;
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    static constexpr int kOrder[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
    for (; k + 16 <= K; k += 16)
      for (int j = 0; j < 16; ++j) s += to_f(w[k + kOrder[j]]) * x[k + j];
  }
  for (; k < K; ++k) s += to_f(w[k]) * x[k];
  return s;
}

template <typename W, typename O, int R, int MB>
void tile(const W* w, const float* x, O* y, const W* bias, int64_t n0, int64_t K, int64_t N) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) store(y + m * N + r, dot(w + r * K, x + m * K, K), bias, n0 + r);
}
#endif

template <typename W, typename O, int R>
void tokens(const W* w, const float* x, O* y, const W* bias, int64_t n0, int64_t M, int64_t K, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<W, O, R, 4>(w, x + m * K, y + m * N, bias, n0, K, N);
  switch (M - m) {
    case 3: tile<W, O, R, 3>(w, x + m * K, y + m * N, bias, n0, K, N); break;
    case 2: tile<W, O, R, 2>(w, x + m * K, y + m * N, bias, n0, K, N); break;
    case 1: tile<W, O, R, 1>(w, x + m * K, y + m * N, bias, n0, K, N); break;
    default: break;
  }
}

// x [M, K] (any float type), w [N, K], bias [N] or null -> y [M, N] in O.
template <typename W, typename X, typename O>
void run(const W* w, const X* x, O* y, const W* bias, int64_t M, int64_t K, int64_t N) {
  std::vector<float> xo(M * K);
  order_x<W>(x, xo.data(), M, K);
  const float* xs = xo.data();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (M == 1) {
      for (int64_t n = n0; n < n1; ++n) store(y + n, dot(w + n * K, xs, K), bias, n);
      return;
    }
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) tokens<W, O, 2>(w + n * K, xs, y + n, bias, n, M, K, N);
    if (n < n1) tokens<W, O, 1>(w + n * K, xs, y + n, bias, n, M, K, N);
  });
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear: x [M, K] and w [N, K] expected");
  TORCH_CHECK(w.is_contiguous() && x.scalar_type() == w.scalar_type() &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "linear: contiguous float32/bfloat16 weight of x's dtype expected");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == w.scalar_type() && bias->numel() == w.size(0)),
              "linear: bias [N] of the weight's dtype expected");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, xc.options());
  if (w.scalar_type() == at::kFloat) {
    run(w.data_ptr<float>(), xc.data_ptr<float>(), y.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, M,
        K, N);
  } else {
    using B = c10::BFloat16;
    run(w.data_ptr<B>(), xc.data_ptr<B>(), y.data_ptr<B>(), bias ? bias->data_ptr<B>() : nullptr, M, K, N);
  }
  return y;
}
