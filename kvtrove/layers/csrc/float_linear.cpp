// y = x W^T (+ b) with float32 or bfloat16 weights [N, K], one arithmetic for every step, one token or
// thousands: each output is one chain of fused multiply-adds over k, starting from zero, then + bias.
// - float32 weights: y[m, n] = fma(x[m, K-1], w[n, K-1], ... fma(x[m, 0], w[n, 0], 0)), k in increasing
//   order (bfloat16 activations widened, which is exact);
// - bfloat16 weights with float32 x: the same chain over the widened weights, K padded to even with a zero;
// - bfloat16 x with bfloat16 w: the products are exact in float32, and the chain takes k in pairs, the odd
//   one first (k = 1, 0, 3, 2, ...), with denormals flushed to zero: AVX-512 BF16's vdpbf16ps defines
//   exactly this, so machines with it run one instruction per pair and the others emulate it bit for bit
//   (tests/test_invariance.py compares the builds).
// The order is per output, so it does not depend on the vector width, the tile shape, the thread count or
// on which tokens share a call: a token's outputs are the same bits decoded alone, batched, or in a
// prefill chunk of any size, with AVX-512, AVX2 or no SIMD.
//
// The weights come packed once at load (`layers/linear.py` pack_weight) into panels of 16 rows, the layout
// the kernel reads: float32 [P, K, 16] (panel p, column k, lane i = w[16 p + i, k]); bfloat16
// [P, ceil(K / 2), 32], i.e. one 32-bit word per lane and pair of columns (w[16 p + i, 2 j] in its low
// half, 2 j + 1 in its high half); rows past N are zero. Lanes run over a panel's 16 rows, each holding
// one output's chain, so per column one contiguous load per panel and one broadcast per token feed
// tokens x panels independent multiply-adds, and every panel is one sequential stream from memory.
// Prefill runs blocks of tokens (kept in L2) over slices of a few panels' columns (kept in L1); a decode
// step's one or two tokens run more panels at once, to keep enough chains in flight. Threads own equal
// shares of the panels.
#include <torch/types.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>

#include "ops.h"
#include "vec.h"

#if defined(KVT_AVX512) && defined(__AVX512BF16__)
#define KVT_BF16 1
#endif

namespace {

using kvt::V16;

// How a column of weights meets the activations.
enum class Mode {
  Floats,        // float32 weights, float32 x
  Pairs,         // bfloat16 pairs with bfloat16 x pairs, vdpbf16ps (KVT_BF16 builds)
  PairsOddFirst, // the same emulated: x widened, each pair's odd column first
  PairsInOrder,  // bfloat16 pairs with float32 x, in column order
};
constexpr bool paired(Mode m) { return m != Mode::Floats; }

// Tile shapes: tokens x panels accumulators, with registers left for the weights and a broadcast
// (emulated pairs hold two weight vectors per panel). A decode tile runs more panels.
#if defined(KVT_AVX512)
constexpr int kPanels = 2;
constexpr int tokens(Mode m) { return m == Mode::Floats || m == Mode::Pairs ? 14 : 12; }
constexpr int decode_panels(Mode m, int) { return m == Mode::Floats || m == Mode::Pairs ? 8 : 4; }
#elif defined(KVT_AVX2)
constexpr int kPanels = 1;
constexpr int tokens(Mode m) { return m == Mode::Floats ? 6 : 5; }
constexpr int decode_panels(Mode m, int mt) { return mt == 1 && m == Mode::Floats ? 4 : 2; }
#else
constexpr int kPanels = 1;
constexpr int tokens(Mode) { return 4; }
constexpr int decode_panels(Mode, int) { return 2; }
#endif
constexpr int kDecodeTokens = 2;   // steps of at most this many tokens run the decode tile
constexpr int64_t L1_SLICE = 24576;  // bytes of a prefill tile's weight slice (L1)
constexpr int64_t XBLOCK = 524288;   // bytes of a token block's activations (L2)

template <Mode M>
using Word = std::conditional_t<paired(M), uint32_t, float>;  // one lane of a packed column
template <Mode M>
using XElem = std::conditional_t<M == Mode::Pairs, uint32_t, float>;
template <Mode M>
constexpr int64_t x_per_column = M == Mode::PairsOddFirst || M == Mode::PairsInOrder ? 2 : 1;

// acc[m][16 p] (+)= the chains of columns [0, cols) of panels w + p * ps for MR tokens x + m * ldx.
// Not inlined: inside the caller the compiler spilled the AVX2 build's accumulators.
template <Mode M, int MR, int P>
__attribute__((noinline)) void tile(const Word<M>* w, int64_t ps, const XElem<M>* x, int64_t ldx, int64_t cols,
                                    float* acc, int64_t lda, bool first) {
  constexpr int64_t XS = x_per_column<M>;
  V16 a[MR][P];
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p) a[m][p] = first ? kvt::zero16() : kvt::load16(acc + m * lda + 16 * p);
  for (int64_t j = 0; j < cols; ++j) {
    if constexpr (M == Mode::Floats) {
      V16 wv[P];
      for (int p = 0; p < P; ++p) wv[p] = kvt::load16(w + p * ps + 16 * j);
      for (int m = 0; m < MR; ++m) {
        const V16 xb = kvt::set16(x[m * ldx + j]);
        for (int p = 0; p < P; ++p) a[m][p] = kvt::fma16(xb, wv[p], a[m][p]);
      }
#ifdef KVT_BF16
    } else if constexpr (M == Mode::Pairs) {
      __m512bh wv[P];
      for (int p = 0; p < P; ++p) wv[p] = (__m512bh)_mm512_loadu_si512(w + p * ps + 16 * j);
      for (int m = 0; m < MR; ++m) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * ldx + j]));
        for (int p = 0; p < P; ++p) a[m][p].v = _mm512_dpbf16_ps(a[m][p].v, wv[p], xb);
      }
#endif
    } else {
      V16 lo[P], hi[P];
      for (int p = 0; p < P; ++p) kvt::pairs16(w + p * ps + 16 * j, lo[p], hi[p]);
      for (int m = 0; m < MR; ++m) {
        const V16 x0 = kvt::set16(x[m * ldx + XS * j]), x1 = kvt::set16(x[m * ldx + XS * j + 1]);
        for (int p = 0; p < P; ++p) {
          if constexpr (M == Mode::PairsOddFirst) {
            a[m][p] = kvt::fma16(x0, lo[p], kvt::fma16(x1, hi[p], a[m][p]));
          } else {
            a[m][p] = kvt::fma16(x1, hi[p], kvt::fma16(x0, lo[p], a[m][p]));
          }
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < P; ++p) kvt::store16(acc + m * lda + 16 * p, a[m][p]);
}

// tile<M, mt, np> for run-time mt <= MR tokens and np <= P panels.
template <Mode M, int MR, int P>
void tile_n(int mt, int np, const Word<M>* w, int64_t ps, const XElem<M>* x, int64_t ldx, int64_t cols, float* acc,
            int64_t lda, bool first) {
  if constexpr (MR > 1) {
    if (mt < MR) return tile_n<M, MR - 1, P>(mt, np, w, ps, x, ldx, cols, acc, lda, first);
  }
  if constexpr (P > 1) {
    if (np < P) return tile_n<M, MR, P - 1>(mt, np, w, ps, x, ldx, cols, acc, lda, first);
  }
  tile<M, MR, P>(w, ps, x, ldx, cols, acc, lda, first);
}

// Denormals flushed to zero (inputs and results) on this thread while it lives: vdpbf16ps's rule, for the
// code that emulates it (and the bias add after it, on every build alike).
struct FlushDenormals {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// y [Mt, N] of O (+ bias) from the activations x (rows of ldx elements) and the packed weights w
// (panels of `cols` columns).
template <Mode M, typename O>
void run(const Word<M>* w, int64_t cols, const XElem<M>* x, int64_t ldx, int64_t Mt, int64_t N, O* y,
         const float* bias) {
  constexpr int64_t XS = x_per_column<M>;
  constexpr int MR = tokens(M);
  const int64_t panels = (N + 15) / 16, ps = 16 * cols;
  const bool decode = Mt <= kDecodeTokens;
  const int64_t wide = decode ? (Mt == 1 ? decode_panels(M, 1) : decode_panels(M, 2)) : kPanels;  // panels per tile
  // prefill: columns in slices that stay in L1, tokens in blocks that stay in L2
  const int64_t most = decode ? cols : std::max<int64_t>(16, L1_SLICE / (64 * wide) / 16 * 16);
  const int64_t slices = (cols + most - 1) / most, slice = std::max<int64_t>(1, (cols + slices - 1) / slices);
  const int64_t tiles_per_block = std::max<int64_t>(1, XBLOCK / (MR * ldx * static_cast<int64_t>(sizeof(XElem<M>))));
  const int64_t tiles = (Mt + MR - 1) / MR, blocks = (tiles + tiles_per_block - 1) / tiles_per_block;
  const int64_t block = decode ? Mt : (tiles + blocks - 1) / blocks * MR;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::optional<FlushDenormals> mode;
    if (M == Mode::Pairs || M == Mode::PairsOddFirst) mode.emplace();
    const int64_t lda = 16 * wide;
    kvt::Floats acc(std::min(block, Mt) * lda);
    for (int64_t m0 = 0; m0 < Mt; m0 += block) {
      const int64_t m1 = std::min(Mt, m0 + block);
      for (int64_t p = p0; p < p1; p += wide) {
        const int np = static_cast<int>(std::min(wide, p1 - p));
        for (int64_t c0 = 0; c0 < cols; c0 += slice) {
          const int64_t cc = std::min(cols, c0 + slice) - c0;
          for (int64_t m = m0; m < m1; m += MR) {
            const int mt = static_cast<int>(std::min<int64_t>(MR, m1 - m));
            const Word<M>* wp = w + p * ps + 16 * c0;
            const XElem<M>* xp = x + m * ldx + XS * c0;
            float* ap = acc.data() + (m - m0) * lda;
            if (decode) {
              tile_n<M, kDecodeTokens, decode_panels(M, 1)>(mt, np, wp, ps, xp, ldx, cc, ap, lda, c0 == 0);
            } else {
              tile_n<M, MR, kPanels>(mt, np, wp, ps, xp, ldx, cc, ap, lda, c0 == 0);
            }
          }
        }
        if (cols == 0) std::fill(acc.begin(), acc.end(), 0.f);
        const int64_t n0 = 16 * p, nr = std::min<int64_t>(16 * np, N - n0);
        for (int64_t m = m0; m < m1; ++m) {
          const float* am = acc.data() + (m - m0) * lda;
          O* out = y + m * N + n0;
          int64_t r = 0;
          for (; r + 8 <= nr; r += 8) {
            const kvt::V8 v = kvt::load8(am + r);
            kvt::store8(out + r, bias != nullptr ? kvt::add8(v, kvt::load8(bias + n0 + r)) : v);
          }
          for (; r < nr; ++r) out[r] = static_cast<O>(bias != nullptr ? am[r] + bias[n0 + r] : am[r]);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "linear: float32 or bfloat16 x [M, K] expected, got ", x.sizes(), " ", x.scalar_type());
  const int64_t K = x.size(1), K2 = (K + 1) / 2;
  const bool floats = w.scalar_type() == at::kFloat;
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && (floats || w.scalar_type() == at::kBFloat16) &&
                  w.size(2) == (floats ? 16 : 32) && w.size(1) == (floats ? K : K2) && n > 16 * (w.size(0) - 1) &&
                  n <= 16 * w.size(0),
              "linear: weights packed for [", n, ", ", K, "] expected (layers/linear.py pack_weight), got ", w.sizes(),
              " ", w.scalar_type());
  TORCH_CHECK(!bias || bias->numel() == n, "linear: bias [", n, "] expected");
  const auto b = bias ? bias->to(at::kFloat).contiguous() : torch::Tensor();
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  const int64_t M = x.size(0);
  auto y = torch::empty({M, n}, x.options());  // the activations' type
  if (M == 0) return y;
  const bool bf16_out = x.scalar_type() == at::kBFloat16;
  auto out = [&](auto f) { bf16_out ? f(y.data_ptr<c10::BFloat16>()) : f(y.data_ptr<float>()); };
  if (floats) {
    const auto xf = x.to(at::kFloat).contiguous();
    out([&](auto* yp) { run<Mode::Floats>(w.data_ptr<float>(), K, xf.data_ptr<float>(), K, M, n, yp, bp); });
    return y;
  }
  const auto* wp = reinterpret_cast<const uint32_t*>(w.data_ptr<c10::BFloat16>());
  if (!bf16_out) {
    const auto xf = at::constant_pad_nd(x, {0, 2 * K2 - K}).contiguous();
    run<Mode::PairsInOrder>(wp, K2, xf.data_ptr<float>(), 2 * K2, M, n, y.data_ptr<float>(), bp);
    return y;
  }
  auto* yp = y.data_ptr<c10::BFloat16>();
#ifdef KVT_BF16
  const auto xp = at::constant_pad_nd(x, {0, 2 * K2 - K}).contiguous();
  run<Mode::Pairs>(wp, K2, reinterpret_cast<const uint32_t*>(xp.data_ptr<c10::BFloat16>()), K2, M, n, yp, bp);
#else
  const auto xf = at::constant_pad_nd(x.to(at::kFloat), {0, 2 * K2 - K}).contiguous();
  run<Mode::PairsOddFirst>(wp, K2, xf.data_ptr<float>(), 2 * K2, M, n, yp, bp);
#endif
  return y;
}
