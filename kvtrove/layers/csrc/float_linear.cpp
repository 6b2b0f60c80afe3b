// y = x W^T (+ b) with float32 or bfloat16 weights [N, K], one arithmetic for every step, one token or
// thousands: each output is one chain of fused multiply-adds over k, starting from zero, then + bias.
// - float32 x (or float32 weights): y[m, n] = fma(x[m, K-1], w[n, K-1], ... fma(x[m, 0], w[n, 0], 0)),
//   k in increasing order (bfloat16 weights or activations widened, which is exact);
// - bfloat16 x with bfloat16 w: the products are exact in float32, and the chain takes k in pairs, the odd
//   one first (k = 1, 0, 3, 2, ...), with denormals flushed to zero: AVX-512 BF16's vdpbf16ps defines
//   exactly this, so machines with it run one instruction per pair and the others emulate it bit for bit
//   (tests/test_invariance.py compares the builds).
// The order is per output, so it does not depend on the vector width, the tile shape, the thread count or
// on which tokens share a call: a token's outputs are the same bits decoded alone, batched, or in a
// prefill chunk of any size, with AVX-512, AVX2 or no SIMD.
//
// Work (the classic GEMM layout): lanes run over 16 weight rows (a panel), each holding one output's
// chain. A group of panels and a slice of K is transposed into a small buffer that stays in L1 while
// every token of a block (that stays in L2) runs over it: per k, one load per panel and one broadcast per
// token feed tokens x panels independent multiply-adds. One or two tokens (decode) on AVX-512 skip the
// buffer: each 16 x 16 block is transposed in registers and used at once, four panels in flight. Threads
// own equal shares of the groups.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "ops.h"
#include "vec.h"

#if defined(KVT_AVX512) && defined(__AVX512BF16__)
#define KVT_BF16 1
#endif

namespace {

using kvt::V16;

// Tile shapes: tokens x panels accumulators, with registers left for the weights and a broadcast.
#if defined(KVT_AVX512)
constexpr int kPanels = 2, kTokens = 14;  // 28 of 32 zmm
#elif defined(KVT_AVX2)
constexpr int kPanels = 1, kTokens = 6;  // 12 of 16 ymm
#else
constexpr int kPanels = 1, kTokens = 4;
#endif
constexpr int64_t NR = 16 * kPanels;      // rows per group
constexpr int64_t SCRATCH = 24576 / 4;   // 4-byte elements of a group's transposed slice (L1)
constexpr int64_t XBLOCK = 524288;       // bytes of a token block's activations (L2)
constexpr int kDirectGroups = 2;         // groups a few tokens run at once (AVX-512's direct path)

// acc[m][16 P] += sum over k < kk of x[m * ldx + k] * w[k][16 P], one FMA chain per lane (MR tokens).
// Not inlined: inside the caller the compiler spilled the AVX2 build's accumulators (40 -> 92 GFLOP/s
// per core once apart).
template <int MR>
__attribute__((noinline)) void tile(const float* w, const float* x, int64_t ldx, int64_t kk, float* acc, bool first) {
  constexpr int P = kPanels;
  V16 a[MR][P];
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p) a[m][p] = first ? kvt::zero16() : kvt::load16(acc + m * NR + 16 * p);
  for (int64_t k = 0; k < kk; ++k) {
    V16 wv[P];
    for (int p = 0; p < P; ++p) wv[p] = kvt::load16(w + k * NR + 16 * p);
    for (int m = 0; m < MR; ++m) {
      const V16 xb = kvt::set16(x[m * ldx + k]);
      for (int p = 0; p < P; ++p) a[m][p] = kvt::fma16(xb, wv[p], a[m][p]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p) kvt::store16(acc + m * NR + 16 * p, a[m][p]);
}

#ifdef KVT_BF16
// The same for bfloat16 pairs: w[j][16 P] and x hold pairs (k = 2j, 2j + 1) as 32-bit words.
template <int MR>
inline void tile(const uint32_t* w, const uint32_t* x, int64_t ldx, int64_t kk, float* acc, bool first) {
  constexpr int P = kPanels;
  __m512 a[MR][P];
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p) a[m][p] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * NR + 16 * p);
  for (int64_t j = 0; j < kk; ++j) {
    __m512bh wv[P];
    for (int p = 0; p < P; ++p) wv[p] = (__m512bh)_mm512_load_si512(w + j * NR + 16 * p);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * ldx + j]));
      for (int p = 0; p < P; ++p) a[m][p] = _mm512_dpbf16_ps(a[m][p], wv[p], xb);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(acc + m * NR + 16 * p, a[m][p]);
}
#endif

template <int MR, typename E>
inline void tile_n(int mt, const E* w, const E* x, int64_t ldx, int64_t kk, float* acc, bool first) {
  if constexpr (MR > 1) {
    if (mt < MR) return tile_n<MR - 1>(mt, w, x, ldx, kk, acc, first);
  }
  tile<MR>(w, x, ldx, kk, acc, first);
}

#ifdef KVT_AVX512
// r[i][j] -> r[j][i] for a 16 x 16 block of 32-bit elements (moves bits only).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // r[4g + c], 128-bit lane l: rows 4g .. 4g + 3 of column 4l + c
    r[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xDD);
  }
}
#endif

// Weights w [N, K] of T (float or bfloat16) as float32 chains: out[(k - k0) ^ swap][r] = w[n0 + r, k] for
// the group's rows r < NR and k in [k0, k1) (zero past N or K); kSwap = 1 exchanges the two of each pair.
template <typename T, int kSwap>
struct FloatChains {
  const T* w;
  int64_t N, K;
  static constexpr int swap = kSwap;
  using E = float;

#ifdef KVT_AVX512
  int64_t whole(int64_t L) const { return std::min(L, K) / 16 * 16; }  // what `block` serves
  // r[j] = w[r0 .. r0 + 16, k + j] (rows r0 .. r0 + 15 exist, k + 16 <= K)
  void block(int64_t r0, int64_t k, __m512 r[16]) const {
    for (int i = 0; i < 16; ++i) {
      r[i] = kvt::load16(w + (r0 + i) * K + k).v;
      _mm_prefetch(reinterpret_cast<const char*>(w + (r0 + 2 * NR + i) * K + k), _MM_HINT_T0);  // ahead of DRAM
    }
    transpose16(r);
  }
  static __m512 step(__m512 a, __m512 wv, float x) { return _mm512_fmadd_ps(_mm512_set1_ps(x), wv, a); }
#endif

  void pack(int64_t n0, int64_t k0, int64_t k1, float* out) const {
    for (int64_t p = 0; p < kPanels; ++p) {
      const int64_t r0 = n0 + 16 * p;
      int64_t k = k0;
#ifdef KVT_AVX512
      if (r0 + 16 <= N)
        for (; k + 16 <= std::min(k1, K); k += 16) {
          __m512 r[16];
          block(r0, k, r);
          for (int j = 0; j < 16; ++j) _mm512_store_ps(out + ((k - k0 + j) ^ swap) * NR + 16 * p, r[j]);
        }
#endif
      for (; k < k1; ++k)
        for (int64_t i = 0; i < 16; ++i)
          out[((k - k0) ^ swap) * NR + 16 * p + i] = r0 + i < N && k < K ? kvt::to_f(w[(r0 + i) * K + k]) : 0.f;
    }
  }
};

#ifdef KVT_BF16
// bfloat16 weights as pairs: out[j - j0][r] = the 32-bit word of w[n0 + r, 2j] (low half) and 2j + 1.
struct PairChains {
  const c10::BFloat16* w;
  int64_t N, K;
  using E = uint32_t;
  static constexpr int swap = 0;

  int64_t whole(int64_t) const { return K / 2 / 16 * 16; }
  void block(int64_t r0, int64_t j, __m512 r[16]) const {  // r[c] = pair j + c of rows r0 .. r0 + 15
    for (int i = 0; i < 16; ++i) {
      r[i] = _mm512_loadu_ps(reinterpret_cast<const float*>(w + (r0 + i) * K + 2 * j));
      _mm_prefetch(reinterpret_cast<const char*>(w + (r0 + 2 * NR + i) * K + 2 * j), _MM_HINT_T0);
    }
    transpose16(r);
  }
  static __m512 step(__m512 a, __m512 wv, uint32_t x) {
    return _mm512_dpbf16_ps(a, (__m512bh)wv, (__m512bh)_mm512_set1_epi32(static_cast<int>(x)));
  }

  void pack(int64_t n0, int64_t j0, int64_t j1, uint32_t* out) const {
    for (int64_t p = 0; p < kPanels; ++p) {
      const int64_t r0 = n0 + 16 * p;
      int64_t j = j0;
      if (r0 + 16 <= N)
        for (; j + 16 <= j1 && 2 * (j + 16) <= K; j += 16) {
          __m512 r[16];
          block(r0, j, r);
          for (int c = 0; c < 16; ++c) _mm512_store_ps(reinterpret_cast<float*>(out + (j - j0 + c) * NR + 16 * p), r[c]);
        }
      for (; j < j1; ++j)
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t n = r0 + i;
          const uint32_t lo = n < N && 2 * j < K ? w[n * K + 2 * j].x : 0;
          const uint32_t hi = n < N && 2 * j + 1 < K ? w[n * K + 2 * j + 1].x : 0;
          out[(j - j0) * NR + 16 * p + i] = lo | hi << 16;
        }
    }
  }
};
#endif

#ifdef KVT_AVX512
// A few tokens over G whole groups (rows n0 .. n0 + G NR) and k < L16: each 16 x 16 block of weights
// transposed in registers and used at once (decode: no buffer between the weights' read and their use);
// 2 G panels side by side keep enough chains in flight to hide the FMA latency. Group h's accumulators
// at acc + h * stride.
constexpr int kDirectTokens = 2;
template <int MT, int G, class C>
void direct(const C& c, const typename C::E* x, int64_t ldx, int64_t L16, int64_t n0, float* acc, int64_t stride) {
  constexpr int DP = kPanels * G;
  __m512 a[MT][DP];
  for (int m = 0; m < MT; ++m)
    for (int p = 0; p < DP; ++p) a[m][p] = _mm512_setzero_ps();
  for (int64_t k = 0; k < L16; k += 16)
    for (int p = 0; p < DP; ++p) {
      __m512 r[16];
      c.block(n0 + 16 * p, k, r);
      for (int q = 0; q < 16; ++q)
        for (int m = 0; m < MT; ++m) a[m][p] = C::step(a[m][p], r[q ^ C::swap], x[m * ldx + k + q]);
    }
  for (int m = 0; m < MT; ++m)
    for (int p = 0; p < DP; ++p) _mm512_storeu_ps(acc + p / kPanels * stride + m * NR + 16 * (p % kPanels), a[m][p]);
}

template <int MT, class C>
void direct_g(int G, const C& c, const typename C::E* x, int64_t ldx, int64_t L16, int64_t n0, float* acc,
              int64_t stride) {
  if (G == 2) return direct<MT, 2>(c, x, ldx, L16, n0, acc, stride);
  direct<MT, 1>(c, x, ldx, L16, n0, acc, stride);
}
#endif

// Denormals flushed to zero (inputs and results) on this thread while it lives: vdpbf16ps's rule, for the
// code that emulates it (and the bias add after it, on every build alike).
struct FlushDenormals {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// y [M, N] of O (+ bias) from the activations x (rows of ldx elements of C::E, L of them used) and the
// weights packed by `chains`.
template <class C, typename O>
void run(const C& chains, const typename C::E* x, int64_t ldx, int64_t M, int64_t L, int64_t N, O* y,
         const float* bias, bool flush) {
  using E = typename C::E;
  const int64_t most_k = std::max<int64_t>(16, SCRATCH / NR / 16 * 16);
  const int64_t slices = std::max<int64_t>(1, (L + most_k - 1) / most_k);
  const int64_t slice = ((L + slices - 1) / slices + 15) / 16 * 16;
  const int64_t tiles_per_block = std::max<int64_t>(1, XBLOCK / (kTokens * ldx * static_cast<int64_t>(sizeof(E))));
  const int64_t tiles = (M + kTokens - 1) / kTokens, blocks = (tiles + tiles_per_block - 1) / tiles_per_block;
  const int64_t block = (tiles + blocks - 1) / blocks * kTokens, groups = (N + NR - 1) / NR;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::optional<FlushDenormals> mode;
    if (flush) mode.emplace();
    std::vector<E, kvt::Aligned64<E>> packed(slice * NR);
    const int64_t stride = std::min(block, M) * NR;  // a group's accumulators
    kvt::Floats acc(stride * kDirectGroups);
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      const int64_t m1 = std::min(M, m0 + block);
      // group g's chains from k = done on (acc a), then + bias, rounded once to the output's type
      auto finish = [&](int64_t g, int64_t done, float* a) {
        const int64_t n0 = g * NR;
        for (int64_t k0 = done; k0 < L; k0 += slice) {
          const int64_t kk = std::min(L, k0 + slice) - k0;
          chains.pack(n0, k0, k0 + kk, packed.data());
          for (int64_t m = m0; m < m1; m += kTokens)
            tile_n<kTokens>(static_cast<int>(std::min<int64_t>(kTokens, m1 - m)), packed.data(), x + m * ldx + k0, ldx,
                            kk, a + (m - m0) * NR, k0 == 0);
        }
        if (L == 0) std::fill(a, a + stride, 0.f);
        const int64_t nr = std::min(NR, N - n0);
        for (int64_t m = m0; m < m1; ++m) {
          const float* am = a + (m - m0) * NR;
          O* out = y + m * N + n0;
          int64_t r = 0;
          for (; r + 8 <= nr; r += 8) {
            const kvt::V8 v = kvt::load8(am + r);
            kvt::store8(out + r, bias != nullptr ? kvt::add8(v, kvt::load8(bias + n0 + r)) : v);
          }
          for (; r < nr; ++r) out[r] = static_cast<O>(bias != nullptr ? am[r] + bias[n0 + r] : am[r]);
        }
      };
      for (int64_t g = g0; g < g1;) {
        int64_t G = 1, done = 0;
#ifdef KVT_AVX512
        if (m1 - m0 <= kDirectTokens && (g + 1) * NR <= N && chains.whole(L) > 0) {
          done = chains.whole(L);
          G = g + 1 < g1 && (g + 2) * NR <= N ? 2 : 1;
          if (m1 - m0 == 1) {
            direct_g<1>(static_cast<int>(G), chains, x + m0 * ldx, ldx, done, g * NR, acc.data(), stride);
          } else {
            direct_g<2>(static_cast<int>(G), chains, x + m0 * ldx, ldx, done, g * NR, acc.data(), stride);
          }
        }
#endif
        for (int64_t h = 0; h < G; ++h) finish(g + h, done, acc.data() + h * stride);
        g += G;
      }
    }
  });
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "linear: contiguous float32/bfloat16 weight [N, K] expected");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "linear: x [M, ", K, "] expected, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "linear: float32 or bfloat16 x");
  TORCH_CHECK(!bias || bias->numel() == N, "linear: bias [N] expected");
  const auto b = bias ? bias->to(at::kFloat).contiguous() : torch::Tensor();
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());  // the activations' type
  if (M == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    const auto xf = x.contiguous();
    float* yp = y.data_ptr<float>();
    if (w.scalar_type() == at::kFloat) {
      run(FloatChains<float, 0>{w.data_ptr<float>(), N, K}, xf.data_ptr<float>(), K, M, K, N, yp, bp, false);
    } else {
      run(FloatChains<c10::BFloat16, 0>{w.data_ptr<c10::BFloat16>(), N, K}, xf.data_ptr<float>(), K, M, K, N, yp, bp,
          false);
    }
    return y;
  }
  auto* yp = y.data_ptr<c10::BFloat16>();
  if (w.scalar_type() == at::kFloat) {
    const auto xf = x.to(at::kFloat).contiguous();
    run(FloatChains<float, 0>{w.data_ptr<float>(), N, K}, xf.data_ptr<float>(), K, M, K, N, yp, bp, false);
    return y;
  }
  const int64_t K2 = (K + 1) / 2 * 2;  // whole pairs: an odd K's last pair ends in a zero
#ifdef KVT_BF16
  const auto xp = K2 == K ? x.contiguous() : at::constant_pad_nd(x, {0, 1}).contiguous();
  run(PairChains{w.data_ptr<c10::BFloat16>(), N, K}, reinterpret_cast<const uint32_t*>(xp.data_ptr<c10::BFloat16>()),
      K2 / 2, M, K2 / 2, N, yp, bp, true);
#else  // the pairs' order as one float32 chain: x widened with each pair's two exchanged, the weights too
  const auto xs = at::constant_pad_nd(x.to(at::kFloat), {0, K2 - K}).view({M, K2 / 2, 2}).flip(-1).contiguous();
  run(FloatChains<c10::BFloat16, 1>{w.data_ptr<c10::BFloat16>(), N, K}, xs.data_ptr<float>(), K2, M, K2, N, yp, bp,
      true);
#endif
  return y;
}
