// Small vector helpers shared by the CPU kernels: float32 math over float32 or bfloat16 storage.
// AVX2 + FMA where the build targets it (-march=native); plain loops, which compilers vectorize, elsewhere.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVT_AVX2 1
#endif

namespace kvt {

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

#ifdef KVT_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the high half of a float32
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// sum_i a[i] * b[i]
template <typename T>
inline float dot(const T* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef KVT_AVX2
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(load8(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), s0);
  s = hsum(_mm256_add_ps(s0, s1));
#endif
  for (; i < n; ++i) s += to_f(a[i]) * b[i];
  return s;
}

// y[i] += a * x[i]
template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef KVT_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * to_f(x[i]);
}

}  // namespace kvt
