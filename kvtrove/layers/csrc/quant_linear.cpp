// y = x W^T for quantized weights, every step, one token or thousands, in one arithmetic: each output is
// the fixed-order dot product of vec.h's V16 (lane l sums k = l mod 16 with fused multiply-adds in
// increasing k, then tree16) of the token's float32 activations with the weight row expanded to float32,
// exactly as stored. So a token's outputs are the same bits whether it is decoded alone, batched with
// others, or computed in a prefill chunk of any size, on any number of threads, with AVX-512, AVX2 or no
// SIMD at all. (Float weights: float_linear.cpp.)
//
// Weight formats, both packed once at load (layers/quant.py pack_int8 / pack_int4) into panels of 8 rows:
// per panel and group of 32 along K one block holding the 8 rows' values and then their float32 scales
// (and mins), so a row group's weights are one sequential stream and a decode step's rows sit at fixed
// offsets of one pointer. Rows past N are zero (their outputs are dropped).
// - int8: a block is 8 x 32 int8 then 8 scales (288 bytes); w = q * scale (GGUF Q8_0's blocks as they
//   are); K is padded with zeros to whole groups, and a K % 16 tail is summed one by one (`at`);
// - int4: a block is 8 x 16 bytes, then 8 scales, then 8 mins (192 bytes); w = q * scale + min rounded once
//   (a fused multiply-add; for GGUF's Q4_0 / Q4_1 / Q4_K blocks q * scale is exact, so this is the gguf
//   package's dequantization bit for bit), byte j of a row's 16 holding weight j (low nibble) and weight
//   j + 16 (high); K is a multiple of 32.
//
// Work: rows in groups of R, tokens in blocks that stay in L2; a row group's weights are expanded to
// float32 (interleaved per 16 along K) into a small buffer per slice of K and reused by every token of
// the block, and the tokens are interleaved likewise once per call, so the micro-kernel reads two
// sequential streams: prefill runs at arithmetic speed and decode at the weights' read speed. A decode
// batch (up to kFewTokens tokens) skips the buffer: each group's weights are expanded in registers once
// for a few tokens at a time (run_few). Items (row group, token block) are independent; which thread runs
// one never changes its numbers.
#include <torch/types.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace {

using kvt::V16;

constexpr int64_t G = 32;               // quantization group along K
constexpr int64_t PANEL = 8;            // rows per panel of the packed layout
constexpr int64_t SCRATCH = 16384 / 4;  // floats of expanded weights per row group and K slice (L1)
constexpr int64_t XBLOCK = 524288 / 4;  // floats of activations per token block (L2)
constexpr int64_t AHEAD = 1024;         // bytes a decode step prefetches ahead of the block it reads

inline float f32_at(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// A weight format over its packed panels. `block(n, g)`: the block of row n's panel for group g;
// `load(n, k, out)` writes w[n, k .. k + 16 * kChunks) as float32 into kChunks vectors (k a multiple of
// 16 * kChunks); `at(n, k)` one weight of the K % 16 tail, the same value (int4 has no tail);
// `group(b, r, out)`: row r's 32 weights of block b (`half`: its first 16, for int8's last short group).
struct Int8W {
  const uint8_t* p;
  int64_t K, groups;  // groups = ceil(K / 32)
  static constexpr int kChunks = 1;
  static constexpr int64_t kBlock = PANEL * G + PANEL * 4;
  const uint8_t* block(int64_t n, int64_t g) const { return p + ((n / PANEL) * groups + g) * kBlock; }
  static void group(const uint8_t* b, int r, V16* out, bool half = false) {
    const auto* q = reinterpret_cast<const int8_t*>(b + G * r);
    const V16 s = kvt::set16(f32_at(b + PANEL * G + 4 * r));
    out[0] = kvt::mul16(kvt::int8x16(q), s);
    if (!half) out[1] = kvt::mul16(kvt::int8x16(q + 16), s);
  }
  void load(int64_t n, int64_t k, V16* out) const {
    const uint8_t* b = block(n, k / G);
    const int r = static_cast<int>(n % PANEL);
    out[0] = kvt::mul16(kvt::int8x16(reinterpret_cast<const int8_t*>(b + G * r + k % G)),
                        kvt::set16(f32_at(b + PANEL * G + 4 * r)));
  }
  float at(int64_t n, int64_t k) const {
    const uint8_t* b = block(n, k / G);
    const int r = static_cast<int>(n % PANEL);
    return static_cast<float>(static_cast<int8_t>(b[G * r + k % G])) * f32_at(b + PANEL * G + 4 * r);
  }
};

struct Int4W {
  const uint8_t* p;
  int64_t K, groups;  // groups = K / 32
  static constexpr int kChunks = 2;  // a group at a time: one load of its 16 bytes, one scale and min
  static constexpr int64_t kBlock = PANEL * G / 2 + PANEL * 8;
  const uint8_t* block(int64_t n, int64_t g) const { return p + ((n / PANEL) * groups + g) * kBlock; }
  static void group(const uint8_t* b, int r, V16* out, bool = false) {  // low nibbles: 0-15, high: 16-31
    const uint8_t* q = b + 16 * r;
    const V16 s = kvt::set16(f32_at(b + PANEL * 16 + 4 * r)), m = kvt::set16(f32_at(b + PANEL * 20 + 4 * r));
    out[0] = kvt::fma16(kvt::nibbles16(q, false), s, m);  // q * scale + min, one rounding
    out[1] = kvt::fma16(kvt::nibbles16(q, true), s, m);
  }
  void load(int64_t n, int64_t k, V16* out) const { group(block(n, k / G), static_cast<int>(n % PANEL), out); }
  float at(int64_t, int64_t) const { return 0.f; }
};

// acc[m][r] (16 lanes each) += w_r[16i .. 16i + 16) * x_m[16i ..] for i < steps. w: the R rows interleaved
// per 16 ([steps][R][16]); x: the MB tokens interleaved likewise ([steps][MB][16]): two sequential streams.
template <int R, int MB>
inline void tile(const float* w, const float* x, int64_t steps, float* acc, bool first) {
  V16 a[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) a[m][r] = first ? kvt::zero16() : kvt::load16(acc + (m * R + r) * 16);
  for (int64_t i = 0; i < steps; ++i) {
    V16 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = kvt::load16(w + (i * R + r) * 16);
    for (int m = 0; m < MB; ++m) {
      V16 xv = kvt::load16(x + (i * MB + m) * 16);
      kvt::in_register(xv);
      for (int r = 0; r < R; ++r) a[m][r] = kvt::fma16(xv, wv[r], a[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) kvt::store16(acc + (m * R + r) * 16, a[m][r]);
}

// x [M, K] float32 -> xp: tiles of MB tokens (the last one shorter), each [K16 / 16][tokens][16].
void pack_x(const float* x, int64_t M, int64_t K, int64_t MB, float* xp) {
  const int64_t K16 = K / 16 * 16;
  at::parallel_for(0, (M + MB - 1) / MB, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t * MB, mt = std::min(MB, M - m0);
      float* dst = xp + m0 * K16;
      for (int64_t i = 0; i < K16 / 16; ++i)
        for (int64_t m = 0; m < mt; ++m) std::copy_n(x + (m0 + m) * K + i * 16, 16, dst + (i * mt + m) * 16);
    }
  });
}

template <int R, int MB>
inline void tile_n(int mt, const float* w, const float* x, int64_t steps, float* acc, bool first) {
  if constexpr (MB > 1) {
    if (mt < MB) return tile_n<R, MB - 1>(mt, w, x, steps, acc, first);
  }
  tile<R, MB>(w, x, steps, acc, first);
}

// y[m, n0 + r] = tree16(acc[m - m0][r]) (+ bias) for tokens [m0, m1), rows r < nr, after the K % 16 tail.
template <int R, class W>
void finish(const W& w, const float* x, int64_t m0, int64_t m1, int64_t K, int64_t n0, int64_t nr, float* y,
            int64_t N, const float* bias, kvt::Floats& acc) {
  const int64_t count = (m1 - m0) * R, K16 = K / 16 * 16;
  if (K16 < K)
    for (int64_t i = 0; i < count; ++i)
      for (int64_t k = K16; k < K; ++k) {
        float* lanes = acc.data() + i * 16;
        lanes[k % 16] = std::fma(x[(m0 + i / R) * K + k], w.at(n0 + i % R, k), lanes[k % 16]);
      }
  acc.resize((count + 7) / 8 * 8 * 16, 0.f);  // whole groups of eight
  float sums[8 * R];  // R tokens' rows at a time
  for (int64_t m = m0; m < m1; m += 8) {
    const int64_t mt = std::min<int64_t>(8, m1 - m);
    for (int64_t i = 0; i < mt * R; i += 8) kvt::tree16x8(acc.data() + ((m - m0) * R + i) * 16, sums + i);
    for (int64_t t = 0; t < mt; ++t)
      for (int64_t r = 0; r < nr; ++r) {
        const float v = sums[t * R + r];
        y[(m + t) * N + n0 + r] = bias != nullptr ? v + bias[n0 + r] : v;
      }
  }
}

// One token, rows [n0, n0 + R) of one panel: the weights expanded in registers, block after block of
// the panel (decode streams them once); `steps` 16-wide steps along K.
template <int R, class W>
inline void tile1(const W& w, int64_t n0, const float* x, int64_t steps, float* acc) {
  static_assert(PANEL % R == 0, "a row group lies within one panel");
  V16 a[R];
  for (int r = 0; r < R; ++r) a[r] = kvt::zero16();
  const uint8_t* b = w.block(n0, 0);
  const int r0 = static_cast<int>(n0 % PANEL);
  int64_t i = 0;
  for (; i + 2 <= steps; i += 2, b += W::kBlock) {
    for (int64_t ahead = 0; ahead < W::kBlock; ahead += 64) kvt::prefetch(b + AHEAD + ahead);
    V16 xv[2] = {kvt::load16(x + 16 * i), kvt::load16(x + 16 * i + 16)};
    kvt::in_register(xv[0]);
    kvt::in_register(xv[1]);
    for (int r = 0; r < R; ++r) {
      V16 wv[2];
      W::group(b, r0 + r, wv);
      a[r] = kvt::fma16(xv[0], wv[0], a[r]);
      a[r] = kvt::fma16(xv[1], wv[1], a[r]);
    }
  }
  if (i < steps) {  // int8's last group of 16
    const V16 xv = kvt::load16(x + 16 * i);
    for (int r = 0; r < R; ++r) {
      V16 wv[2];
      W::group(b, r0 + r, wv, true);
      a[r] = kvt::fma16(xv, wv[0], a[r]);
    }
  }
  for (int r = 0; r < R; ++r) kvt::store16(acc + r * 16, a[r]);
}

// MT tokens (rows of x, K apart), rows [n0, n0 + R) of one panel: each group's weights expanded in
// registers once for all MT tokens (for a few tokens the expansion costs more than their arithmetic,
// and a row group's blocks stay in L1 for the next tokens); tile1's operations for each token.
template <int R, int MT, class W>
inline void tile_few(const W& w, int64_t n0, const float* x, int64_t K, int64_t steps, float* acc) {
  static_assert(PANEL % R == 0, "a row group lies within one panel");
  V16 a[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) a[m][r] = kvt::zero16();
  const uint8_t* b = w.block(n0, 0);
  const int r0 = static_cast<int>(n0 % PANEL);
  int64_t i = 0;
  for (; i + 2 <= steps; i += 2, b += W::kBlock) {
    for (int64_t ahead = 0; ahead < W::kBlock; ahead += 64) kvt::prefetch(b + AHEAD + ahead);
    for (int r = 0; r < R; ++r) {
      V16 wv[2];
      W::group(b, r0 + r, wv);
      for (int m = 0; m < MT; ++m) {
        a[m][r] = kvt::fma16(kvt::load16(x + m * K + 16 * i), wv[0], a[m][r]);
        a[m][r] = kvt::fma16(kvt::load16(x + m * K + 16 * i + 16), wv[1], a[m][r]);
      }
    }
  }
  if (i < steps) {  // int8's last group of 16
    for (int r = 0; r < R; ++r) {
      V16 wv[2];
      W::group(b, r0 + r, wv, true);
      for (int m = 0; m < MT; ++m) a[m][r] = kvt::fma16(kvt::load16(x + m * K + 16 * i), wv[0], a[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) kvt::store16(acc + (m * R + r) * 16, a[m][r]);
}

template <int R, int MB, class W>
inline void tile_few_n(int mt, const W& w, int64_t n0, const float* x, int64_t K, int64_t steps, float* acc) {
  if constexpr (MB > 1) {
    if (mt < MB) return tile_few_n<R, MB - 1>(mt, w, n0, x, K, steps, acc);
  }
  tile_few<R, MB>(w, n0, x, K, steps, acc);
}

// A few tokens of x [M, K] times the rows of w -> y [M, N]: each thread owns a contiguous range of row
// groups and runs each over the tokens, MB at a time (no packed copy of x).
template <int R, int MB, class W>
void run_few(const W& w, const float* x, int64_t M, int64_t K, int64_t N, float* y, const float* bias) {
  const int64_t groups = (N + R - 1) / R, steps = K / 16;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    kvt::Floats acc;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * R, nr = std::min<int64_t>(R, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mt = std::min<int64_t>(MB, M - m0);
        acc.resize(mt * R * 16);
        tile_few_n<R, MB>(static_cast<int>(mt), w, n0, x + m0 * K, K, steps, acc.data());
        finish<R>(w, x, m0, m0 + mt, K, n0, nr, y, N, bias, acc);
      }
    }
  });
}

// Rows [n0, n0 + nr) (nr <= R) for tokens [m0, m1) (whole tiles of MB but the last); x: the original
// activations [M, K] (for the K % 16 tail), xp: packed by pack_x; y [M, N] float32.
template <int R, int MB, class W>
void row_group(const W& w, const float* x, const float* xp, int64_t m0, int64_t m1, int64_t K, int64_t n0,
               int64_t nr, float* y, int64_t N, const float* bias, kvt::Floats& scratch,
               kvt::Floats& acc) {
  // K in equal slices (multiples of 32) small enough that a slice of the row group and of a token tile
  // stay in L1 together
  const int64_t K16 = K / 16 * 16, most = std::max<int64_t>(G, SCRATCH / R / G * G);
  const int64_t slices = std::max<int64_t>(1, (K16 + most - 1) / most);
  const int64_t slice = ((K16 + slices - 1) / slices + G - 1) / G * G;
  acc.resize((m1 - m0) * R * 16);
  if (MB == 1 && m1 - m0 == 1) {  // decode
    tile1<R>(w, n0, x + m0 * K, K16 / 16, acc.data());
    return finish<R>(w, x, m0, m1, K, n0, nr, y, N, bias, acc);
  }
  scratch.resize(R * slice);
  if (K16 == 0) std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t k0 = 0; k0 < K16; k0 += slice) {
    const int64_t k1 = std::min(K16, k0 + slice), steps = (k1 - k0) / 16;
    for (int64_t i = 0; i < steps; i += W::kChunks)  // the panel's rows past N are zero (results dropped)
      for (int r = 0; r < R; ++r) {
        kvt::prefetch(w.block(n0 + PANEL, (k0 + 16 * i) / G));  // the next panel's
        V16 wv[W::kChunks];
        w.load(n0 + r, k0 + 16 * i, wv);
        for (int c = 0; c < W::kChunks; ++c) kvt::store16(scratch.data() + ((i + c) * R + r) * 16, wv[c]);
      }
    for (int64_t m = m0; m < m1; m += MB) {
      const int64_t mt = std::min<int64_t>(MB, m1 - m);
      tile_n<R, MB>(static_cast<int>(mt), scratch.data(), xp + m * K16 + k0 * mt, steps, acc.data() + (m - m0) * R * 16,
                    k0 == 0);
    }
  }
  finish<R>(w, x, m0, m1, K, n0, nr, y, N, bias, acc);
}

// Tokens of x [M, K] (float32, contiguous) times the rows of w -> y [M, N] float32. Each thread owns a
// contiguous range of row groups (equal shares) and runs it over every token block in turn, so its
// block of activations stays in its L2 while its rows stream; blocks are of equal size (whole tiles).
template <int R, int MB, class W>
void run(const W& w, const float* x, int64_t M, int64_t K, int64_t N, float* y, const float* bias) {
  kvt::Floats xp(M * (K / 16 * 16));
  pack_x(x, M, K, MB, xp.data());
  const int64_t most = std::max<int64_t>(MB, std::min<int64_t>(256, XBLOCK / std::max<int64_t>(K, 1)));
  const int64_t blocks = (M + most - 1) / most, tiles = (M + MB - 1) / MB;
  const int64_t block = (tiles + blocks - 1) / blocks * MB, groups = (N + R - 1) / R;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    kvt::Floats scratch, acc;
    for (int64_t m0 = 0; m0 < M; m0 += block)
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t n0 = g * R;
        row_group<R, MB>(w, x, xp.data(), m0, std::min(M, m0 + block), K, n0, std::min<int64_t>(R, N - n0), y, N,
                         bias, scratch, acc);
      }
  });
}

// Tile shapes (rows x tokens) with enough independent accumulators to hide the FMA latency; decode
// (one token) takes more rows at a time. The shape never changes the numbers.
#if defined(KVT_AVX512)
constexpr int kDecodeRows = 8, kRows = 4, kTokens = 6;  // 32 zmm registers
#elif defined(KVT_AVX2)
constexpr int kDecodeRows = 4, kRows = 2, kTokens = 3;  // 16 ymm registers, two per accumulator
#else
constexpr int kDecodeRows = 4, kRows = 2, kTokens = 2;
#endif

constexpr int64_t kFewTokens = 16;  // up to this many tokens (a decode batch): run_few

template <class W>
void dispatch_m(const W& w, const float* x, int64_t M, int64_t K, int64_t N, float* y, const float* bias) {
  if (M == 1) return run<kDecodeRows, 1>(w, x, M, K, N, y, bias);
  if (M <= kFewTokens) return run_few<kRows, kTokens>(w, x, M, K, N, y, bias);
  run<kRows, kTokens>(w, x, M, K, N, y, bias);
}

torch::Tensor as_float(const torch::Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); }

void check_x(const torch::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, name, ": x [M, ", K, "] expected, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name, ": float32 or bfloat16 x");
}

// Panels packed by layers/quant.py for n outputs and k inputs: int8 [ceil(n/8), ceil(k/32), 288] int8,
// int4 [ceil(n/8), k/32, 192] uint8.
template <class W>
W packed_weight(const torch::Tensor& w, int64_t n, int64_t k, const char* name) {
  constexpr bool int4 = std::is_same_v<W, Int4W>;
  TORCH_CHECK(w.scalar_type() == (int4 ? at::kByte : at::kChar) && w.is_contiguous() && w.dim() == 3 &&
                  w.size(2) == W::kBlock,
              name, ": ", int4 ? "uint8" : "int8", " panels [P, groups, ", W::kBlock, "] expected (layers/quant.py ",
              int4 ? "pack_int4" : "pack_int8", "), got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(n > 0 && w.size(0) == (n + PANEL - 1) / PANEL, name, ": ", w.size(0), " panels cannot hold ", n, " outputs");
  TORCH_CHECK(int4 ? k % G == 0 && w.size(1) == k / G : w.size(1) == (k + G - 1) / G, name, ": ", w.size(1),
              " groups do not fit ", k, " inputs", int4 ? " (int4: a multiple of 32)" : "");
  return {reinterpret_cast<const uint8_t*>(w.data_ptr()), k, w.size(1)};
}

template <class W>
torch::Tensor apply(const torch::Tensor& x, const torch::Tensor& packed, int64_t n, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, ": x [M, K] expected, got ", x.sizes());
  const auto w = packed_weight<W>(packed, n, x.size(1), name);
  check_x(x, w.K, name);
  const auto xf = as_float(x);
  const int64_t M = xf.size(0);
  auto y = torch::empty({M, n}, xf.options());
  if (M > 0) dispatch_m(w, xf.data_ptr<float>(), M, w.K, n, y.data_ptr<float>(), nullptr);
  return y;
}

}  // namespace

torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n) {
  return apply<Int8W>(x, packed, n, "q8_linear");
}

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n) {
  return apply<Int4W>(x, packed, n, "q4_linear");
}

// y[e] = x[e] W_e^T: one weight per input row (a decode token's chosen experts), all rows of all weights
// in one parallel region; each row's numbers are those of q4_linear / q8_linear on that input row alone.
// weights[e]: panels of n outputs, all int4 or all int8, of one shape.
torch::Tensor q_linear_grouped(const torch::Tensor& x, const std::vector<torch::Tensor>& weights, int64_t n) {
  const int64_t E = x.size(0);
  TORCH_CHECK(x.dim() == 2 && static_cast<int64_t>(weights.size()) == E && E > 0,
              "q_linear_grouped: x [E, K] and one weight per row of x");
  const bool int4 = weights[0].scalar_type() == at::kByte;
  const int64_t K = x.size(1);
  std::vector<Int8W> w8;
  std::vector<Int4W> w4;
  for (const auto& w : weights) {
    TORCH_CHECK(w.sizes() == weights[0].sizes() && w.scalar_type() == weights[0].scalar_type(),
                "q_linear_grouped: weights of one kind and shape");
    if (int4) {
      w4.push_back(packed_weight<Int4W>(w, n, K, "q_linear_grouped"));
    } else {
      w8.push_back(packed_weight<Int8W>(w, n, K, "q_linear_grouped"));
    }
  }
  check_x(x, K, "q_linear_grouped");
  const auto xf = as_float(x);
  auto y = torch::empty({E, n}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int R = kDecodeRows;
  const int64_t groups = (n + R - 1) / R;
  at::parallel_for(0, E * groups, 1, [&](int64_t i0, int64_t i1) {
    kvt::Floats scratch, acc;
    for (int64_t i = i0; i < i1; ++i) {  // one token: its activations are already in packed order
      const int64_t e = i / groups, n0 = i % groups * R, nr = std::min<int64_t>(R, n - n0);
      const float* xe = xp + e * K;
      if (int4) {
        row_group<R, 1>(w4[e], xe, xe, 0, 1, K, n0, nr, yp + e * n, n, nullptr, scratch, acc);
      } else {
        row_group<R, 1>(w8[e], xe, xe, 0, 1, K, n0, nr, yp + e * n, n, nullptr, scratch, acc);
      }
    }
  });
  return y;
}
