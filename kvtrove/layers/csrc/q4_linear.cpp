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

// Where activation j of group g goes in xq. With AVX2, groups are handled in pairs (one 32-byte load
// covers two groups' weights: low nibbles = weights 0-15 of both, high nibbles = 16-31 of both), so a
// pair's 64 activations are stored to match: [g 0-15 | g+1 0-15 | g 16-31 | g+1 16-31]; an unpaired
// last group stays in order.
inline int64_t slot(int64_t g, int64_t groups, int j) {
#ifdef KVT_AVX2
  if (groups % 2 == 0 || g + 1 < groups) {
    const int64_t base = (g & ~int64_t(1)) * G;
    return base + (g & 1) * 16 + (j < 16 ? j : 32 + (j - 16));
  }
#endif
  return g * G + j;
}

// Per token and group: int8 activations, their scale, the sum of the original values, and 8 times the
// sum of the rounding errors.
void quantize_x(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* xsum, float* r8) {
  const int64_t groups = K / G;
  at::parallel_for(0, M * groups, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* v = x + i * G;
      const int64_t m = i / groups, g = i % groups;
      float amax = 0.f, s = 0.f;
      for (int j = 0; j < G; ++j) {
        amax = std::max(amax, std::fabs(v[j]));
        s += v[j];
      }
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int32_t qs = 0;
      for (int j = 0; j < G; ++j) {
        const auto q = static_cast<int8_t>(std::nearbyint(v[j] * inv));
        xq[m * K + slot(g, groups, j)] = q;
        qs += q;
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
inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
// A group's q . xq as 8 partial int32 sums, in float.
inline __m256 gdot(__m256i q, const int8_t* xq) {
  const __m256i p16 = _mm256_maddubs_epi16(q, load32(xq));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
// Two groups' q . xq (xq in pair order): lanes 0-3 partial sums of group g, lanes 4-7 of g + 1.
inline __m256 pdot(const uint8_t* q, const int8_t* xq) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
  const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load32(xq)), _mm256_maddubs_epi16(hi, load32(xq + 32)));
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
    __m256 acc[MB], acc2[MB];  // two FMA chains in flight
    for (int m = 0; m < mb; ++m) acc[m] = acc2[m] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) {
      for (int m = 0; m < mb; ++m) {
        const int64_t i = (m0 + m) * groups + g;
        const int8_t* xm = xq + i * G;
        const __m256 s0 = _mm256_set_m128(_mm_set1_ps(sc[g + 1] * dx[i + 1]), _mm_set1_ps(sc[g] * dx[i]));
        const __m256 s1 = _mm256_set_m128(_mm_set1_ps(sc[g + 3] * dx[i + 3]), _mm_set1_ps(sc[g + 2] * dx[i + 2]));
        acc[m] = _mm256_fmadd_ps(s0, pdot(q + g * (G / 2), xm), acc[m]);
        acc2[m] = _mm256_fmadd_ps(s1, pdot(q + (g + 2) * (G / 2), xm + 2 * G), acc2[m]);
      }
    }
    for (; g + 2 <= groups; g += 2) {
      for (int m = 0; m < mb; ++m) {
        const int64_t i = (m0 + m) * groups + g;
        const __m256 s0 = _mm256_set_m128(_mm_set1_ps(sc[g + 1] * dx[i + 1]), _mm_set1_ps(sc[g] * dx[i]));
        acc[m] = _mm256_fmadd_ps(s0, pdot(q + g * (G / 2), xq + i * G), acc[m]);
      }
    }
    if (g < groups) {
      const __m256i q0 = unpack(q + g * (G / 2));
      for (int m = 0; m < mb; ++m) {
        const int64_t i = (m0 + m) * groups + g;
        acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(sc[g] * dx[i]), gdot(q0, xq + i * G), acc[m]);
      }
    }
    for (int m = 0; m < mb; ++m) {
      const int64_t i = (m0 + m) * groups;
      y[(m0 + m) * N + n] = kvt::hsum(_mm256_add_ps(acc[m], acc2[m])) + kvt::dot(mn, xsum + i, groups) +
                            kvt::dot(sc, r8 + i, groups);
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
