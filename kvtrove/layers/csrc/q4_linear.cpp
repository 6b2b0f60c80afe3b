// y = x W^T with 4-bit weights: w = q * scale + min per group of 32 along K, q in 0..15.
// PyTorch's CPU int4 kernel (_weight_int4pack_mm_for_cpu) is compute-bound on AVX2 machines (4.6-6.4
// GB/s of weights on one row, measured here against ~19 GB/s of DRAM), so decode cannot reach the
// memory bound with it. Here the activations are quantized once per call to int8 per group of 32
// (scale dx = max|x| / 127, as llama.cpp's q8 activations), so a group's sum of q * xq is an integer
// dot product (maddubs: unsigned 4-bit weights times signed 8-bit activations), and
//   y = sum_g scale_g * (dx_g * (q . xq)_g + 8 * r_g) + min_g * (sum of x over g),
// where r_g = sum of x - dx_g * sum of xq over g puts back the mean rounding error of the activations
// as if the weights were centred (q - 8): with unsigned q that error would be weighted by q ~ 7.5.
// Layout: qw [N, K/2] uint8, 16 bytes per group, byte j holding q[j] (low nibble) and q[j + 16] (high).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t G = 32;
constexpr int MB = 4;  // tokens per pass over a row: each group's weights are unpacked once for MB tokens

// Per token and group: int8 activations, their scale, the sum of the original values, and 8 times the
// sum of the rounding errors.
void quantize_x(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* xsum, float* r8) {
  const int64_t groups = K / G;
  at::parallel_for(0, M * groups, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* v = x + i * G;
      float amax = 0.f, s = 0.f;
      for (int j = 0; j < G; ++j) {
        amax = std::max(amax, std::fabs(v[j]));
        s += v[j];
      }
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int32_t qs = 0;
      for (int j = 0; j < G; ++j) {
        xq[i * G + j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
        qs += xq[i * G + j];
      }
      dx[i] = d;
      xsum[i] = s;
      r8[i] = 8.f * (s - d * static_cast<float>(qs));
    }
  });
}

#ifdef KVT_AVX2
// The 32 weights of a group as unsigned bytes, in order.
inline __m256i unpack(const uint8_t* q) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
}
// The group's q . xq as 8 partial int32 sums, in float.
inline __m256 gdot(__m256i q, const int8_t* xq) {
  const __m256i p16 = _mm256_maddubs_epi16(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
#endif

// Rows [n0, n1) for tokens [m0, m0 + mb).
void rows(const uint8_t* qw, const float* scales, const float* mins, const int8_t* xq, const float* dx,
          const float* xsum, const float* r8, float* y, int64_t n0, int64_t n1, int64_t m0, int mb, int64_t K, int64_t N) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = qw + n * (K / 2);
    const float* sc = scales + n * groups;
    const float* mn = mins + n * groups;
#ifdef KVT_AVX2
    __m256 acc[MB];
    for (int m = 0; m < mb; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256i qv = unpack(q + g * (G / 2));
      for (int m = 0; m < mb; ++m) {
        const int64_t i = (m0 + m) * groups + g;
        acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(sc[g] * dx[i]), gdot(qv, xq + i * G), acc[m]);
      }
    }
    for (int m = 0; m < mb; ++m) {
      const int64_t i = (m0 + m) * groups;
      y[(m0 + m) * N + n] = kvt::hsum(acc[m]) + kvt::dot(mn, xsum + i, groups) + kvt::dot(sc, r8 + i, groups);
    }
#else
    for (int m = 0; m < mb; ++m) {
      float s = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = (m0 + m) * groups + g;
        int32_t d = 0;
        for (int j = 0; j < G / 2; ++j) {
          const uint8_t b = q[g * (G / 2) + j];
          d += (b & 0x0F) * xq[i * G + j] + (b >> 4) * xq[i * G + j + G / 2];
        }
        s += sc[g] * (dx[i] * static_cast<float>(d) + r8[i]) + mn[g] * xsum[i];
      }
      y[(m0 + m) * N + n] = s;
    }
#endif
  }
}

}  // namespace

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& scales,
                        const torch::Tensor& mins) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "q4_linear: float32 x [M, K] expected");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  TORCH_CHECK(K % G == 0, "q4_linear: K must be a multiple of 32");
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.dim() == 2 && qw.size(1) == K / 2,
              "q4_linear: uint8 weights [N, K/2] expected");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && mins.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.numel() == N * (K / G) && mins.numel() == N * (K / G),
              "q4_linear: float32 scales and mins [N, K/32] expected");
  const auto xc = x.contiguous();
  const int64_t groups = K / G;
  std::vector<int8_t> xq(M * K);
  std::vector<float> dx(M * groups), xsum(M * groups), r8(M * groups);
  quantize_x(xc.data_ptr<float>(), M, K, xq.data(), dx.data(), xsum.data(), r8.data());
  auto y = torch::empty({M, N}, xc.options());
  const uint8_t* q = qw.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  const float* mn = mins.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
      rows(q, sc, mn, xq.data(), dx.data(), xsum.data(), r8.data(), out, n0, n1, m0, mb, K, N);
    }
  });
  return y;
}
