// The arithmetic every kernel shares, defined so that its bits do not depend on the machine.
//
// A V8 is eight float32 lanes: one AVX2 register where the build targets AVX2 + FMA (-march=native; an
// AVX-512 machine runs the same 256-bit code), eight scalars elsewhere. Every operation is one IEEE
// operation per lane (add, mul, fused multiply-add, max, round-to-nearest, int <-> float), and the build
// has no -ffast-math and no automatic FMA contraction, so the scalar and the vector forms give the same
// bits. Reductions have one fixed order, independent of the vector width and of how many tokens or
// threads share a call:
// - a dot product over n elements accumulates lane l = sum of elements i = l (mod 8), in increasing i,
//   with fused multiply-adds, and ends with `tree8`: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7));
// - exp is `exp8` / `exp1`: one polynomial, the same operations in both forms.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && !defined(KVT_SCALAR)
#include <immintrin.h>
#define KVT_AVX2 1
#endif

namespace kvt {

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

// The lanes' fixed reduction tree.
inline float tree8(const float* a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

#ifdef KVT_AVX2
struct V8 {
  __m256 v;
};
inline V8 zero8() { return {_mm256_setzero_ps()}; }
inline V8 set8(float a) { return {_mm256_set1_ps(a)}; }
inline V8 load8(const float* p) { return {_mm256_loadu_ps(p)}; }
inline V8 load8(const c10::BFloat16* p) {  // bf16 is the high half of a float32
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))};
}
inline void store8(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
inline V8 fma8(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c, one rounding
inline V8 add8(V8 a, V8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V8 mul8(V8 a, V8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V8 div8(V8 a, V8 b) { return {_mm256_div_ps(a.v, b.v)}; }
inline V8 max8(V8 a, V8 b) { return {_mm256_max_ps(a.v, b.v)}; }
// Lanes whose index base + i lies outside [lo, hi) set to fill.
inline V8 outside8(V8 a, int64_t base, int64_t lo, int64_t hi, float fill) {
  const __m256i i = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(base)));
  const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(static_cast<int>(lo) - 1)),
                                      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), i));
  return {_mm256_blendv_ps(_mm256_set1_ps(fill), a.v, _mm256_castsi256_ps(in))};
}
// q * s (+ m): eight int8 weights, or eight 4-bit ones (the low nibbles of 8 bytes, or the high ones)
inline V8 int8x8(const int8_t* q) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))))};
}
inline V8 nibbles8(const uint8_t* q, bool high) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  b = high ? _mm256_srli_epi32(b, 4) : _mm256_and_si256(b, _mm256_set1_epi32(0x0F));
  return {_mm256_cvtepi32_ps(b)};
}
inline float tree8(V8 a) {
  alignas(32) float t[8];
  _mm256_store_ps(t, a.v);
  return tree8(t);
}
// exp per lane (see exp1): Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial, scaling by 2^n
inline V8 exp8(V8 x) {
  const __m256 hi = _mm256_set1_ps(88.0f), lo = _mm256_set1_ps(-87.0f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x.v, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x.v, lo, _CMP_LT_OQ));
  return {_mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x.v, hi, _CMP_GT_OQ))};
}
#else
struct V8 {
  float v[8];
};
inline V8 zero8() { return V8{}; }
inline V8 set8(float a) {
  V8 r;
  for (float& x : r.v) x = a;
  return r;
}
template <typename T>
inline V8 load8(const T* p) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = to_f(p[i]);
  return r;
}
inline void store8(float* p, V8 a) { std::memcpy(p, a.v, sizeof a.v); }
inline V8 fma8(V8 a, V8 b, V8 c) {
  for (int i = 0; i < 8; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline V8 add8(V8 a, V8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}
inline V8 mul8(V8 a, V8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
  return a;
}
inline V8 div8(V8 a, V8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] /= b.v[i];
  return a;
}
inline V8 max8(V8 a, V8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] = std::max(a.v[i], b.v[i]);
  return a;
}
inline V8 outside8(V8 a, int64_t base, int64_t lo, int64_t hi, float fill) {
  for (int i = 0; i < 8; ++i)
    if (base + i < lo || base + i >= hi) a.v[i] = fill;
  return a;
}
inline V8 int8x8(const int8_t* q) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(q[i]);
  return r;
}
inline V8 nibbles8(const uint8_t* q, bool high) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(high ? q[i] >> 4 : q[i] & 0x0F);
  return r;
}
inline float tree8(V8 a) { return tree8(a.v); }
#endif

// float32 -> bfloat16 eight at a time: round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's conversion;
// torch's own vector conversion may use an instruction that flushes denormals, so it is not used).
#ifdef KVT_AVX2
inline void store8(c10::BFloat16* p, V8 a) {
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#else
inline void store8(c10::BFloat16* p, V8 a) {
  for (int i = 0; i < 8; ++i) p[i] = c10::BFloat16(a.v[i]);
}
#endif

// The values as T stores them, back in float32 (bfloat16: rounded as store8 rounds).
template <typename T>
inline V8 round8(V8 a) {
  if constexpr (std::is_same_v<T, float>) {
    return a;
  } else {
    T t[8];
    store8(t, a);
    return load8(t);
  }
}

// The largest lane (exact: any order gives the same value).
inline float hmax8(V8 a) {
  float t[8];
  store8(t, a);
  float m = t[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, t[i]);
  return m;
}

// A hint to fetch the cache line holding p (no effect on any result; a no-op without SIMD).
inline void prefetch(const void* p) {
#ifdef KVT_AVX2
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}

// exp(x) for one float, the same operations as one lane of exp8 (so both give the same bits).
inline float exp1(float x) {
  if (x < -87.0f) return 0.f;
  if (x > 88.0f) return INFINITY;
  const float n = std::nearbyint(x * 1.44269504f);
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r);
  p = p + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#ifndef KVT_AVX2
inline V8 exp8(V8 x) {
  for (float& v : x.v) v = exp1(v);
  return x;
}
#endif

// V16: sixteen float32 lanes, for the linear layers' dot products (lane l sums k = l mod 16; `tree16`
// folds lanes l and l + 8 together, then tree8). One AVX-512 register, two AVX2 ones, or 16 scalars: the
// same bits on each.
#if defined(__AVX512F__) && defined(KVT_AVX2) && !defined(KVT_NO_AVX512)
#define KVT_AVX512 1
struct V16 {
  __m512 v;
};
inline V16 zero16() { return {_mm512_setzero_ps()}; }
inline V16 set16(float a) { return {_mm512_set1_ps(a)}; }
inline V16 load16(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V16 load16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))};
}
inline void store16(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline V16 fma16(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V16 mul16(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 int8x16(const int8_t* q) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))))};
}
inline V16 nibbles16(const uint8_t* q, bool high) {  // the low (or high) nibbles of 16 bytes
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  b = high ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(0x0F));
  return {_mm512_cvtepi32_ps(b)};
}
// The two bfloat16 halves of 16 32-bit words as float32 (exact): lo = the low halves, hi = the high ones.
inline void pairs16(const uint32_t* p, V16& lo, V16& hi) {
  const __m512i v = _mm512_loadu_si512(p);
  lo.v = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  hi.v = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// Keeps a value in a register: without it the compiler re-reads a tile's activation vector from memory
// for every row it multiplies (a load per FMA, and the loads, not the FMAs, bound the kernel).
inline void in_register(V16& a) { asm("" : "+v"(a.v)); }
#else
struct V16 {
  V8 lo, hi;
};
inline V16 zero16() { return {zero8(), zero8()}; }
inline V16 set16(float a) { return {set8(a), set8(a)}; }
template <typename T>
inline V16 load16(const T* p) {
  return {load8(p), load8(p + 8)};
}
inline void store16(float* p, V16 a) {
  store8(p, a.lo);
  store8(p + 8, a.hi);
}
inline V16 fma16(V16 a, V16 b, V16 c) { return {fma8(a.lo, b.lo, c.lo), fma8(a.hi, b.hi, c.hi)}; }
inline V16 mul16(V16 a, V16 b) { return {mul8(a.lo, b.lo), mul8(a.hi, b.hi)}; }
inline V16 int8x16(const int8_t* q) { return {int8x8(q), int8x8(q + 8)}; }
inline V16 nibbles16(const uint8_t* q, bool high) { return {nibbles8(q, high), nibbles8(q + 8, high)}; }
#ifdef KVT_AVX2
inline void pairs16(const uint32_t* p, V16& lo, V16& hi) {
  for (int h = 0; h < 2; ++h) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8 * h));
    (h ? lo.hi : lo.lo).v = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    (h ? hi.hi : hi.lo).v = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}
inline void in_register(V16& a) { asm("" : "+x"(a.lo.v), "+x"(a.hi.v)); }
#else
inline void pairs16(const uint32_t* p, V16& lo, V16& hi) {
  for (int i = 0; i < 16; ++i) {
    const uint32_t l = p[i] << 16, u = p[i] & 0xFFFF0000u;
    std::memcpy((i < 8 ? lo.lo : lo.hi).v + i % 8, &l, 4);
    std::memcpy((i < 8 ? hi.lo : hi.hi).v + i % 8, &u, 4);
  }
}
inline void in_register(V16&) {}
#endif
#endif

// The fold of 16 lanes: lanes l and l + 8 added, then tree8.
inline float tree16(const float* a) {
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = a[i] + a[i + 8];
  return tree8(t);
}

// out[j] = tree16(lanes + 16 j) for j < 8: eight reductions at once (in vector code, lanes l and l + 8
// are added as vectors, then a transposing tree of horizontal adds gives each output the tree8 order).
inline void tree16x8(const float* lanes, float* out) {
#ifdef KVT_AVX2
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_add_ps(_mm256_loadu_ps(lanes + 16 * j), _mm256_loadu_ps(lanes + 16 * j + 8));
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  for (int j = 0; j < 8; ++j) out[j] = tree16(lanes + 16 * j);
#endif
}

// sum_i a[i] * b[i] in the fixed order: lanes over i mod 8, then tree8.
template <typename T>
inline float dot(const T* a, const float* b, int64_t n) {
  V8 acc = zero8();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = fma8(load8(a + i), load8(b + i), acc);
  if (i == n) return tree8(acc);
  float lanes[8];
  store8(lanes, acc);
  for (; i < n; ++i) lanes[i % 8] = std::fma(to_f(a[i]), b[i], lanes[i % 8]);
  return tree8(lanes);
}

// Scratch buffers on cache-line boundaries: a 64-byte load that straddles two lines costs two L1 accesses,
// which halves a kernel's speed when its operands stream from L2 (malloc aligns to 16 bytes only).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
using Floats = std::vector<float, Aligned64<float>>;

}  // namespace kvt
