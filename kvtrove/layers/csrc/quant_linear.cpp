// y = x W^T for quantized weights, every step, one token or thousands, in one arithmetic: each output is
// the fixed-order dot product of vec.h's V16 (lane l sums k = l mod 16 with fused multiply-adds in
// increasing k, then tree16) of the token's float32 activations with the weight row expanded to float32,
// exactly as stored. So a token's outputs are the same bits whether it is decoded alone, batched with
// others, or computed in a prefill chunk of any size, on any number of threads, with AVX-512, AVX2 or no
// SIMD at all. (Float weights: float_linear.cpp.)
//
// Weight formats:
// - int8 [N, K] with a float32 scale per 32 along K: w = q * scale (GGUF Q8_0's blocks as they are);
// - int4 [N, K/2] uint8 with a float32 scale and min per 32: w = q * scale + min rounded once (a fused
//   multiply-add; for GGUF's Q4_0 / Q4_1 / Q4_K blocks q * scale is exact, so this is the gguf package's
//   dequantization bit for bit), byte j of a group holding weight j (low nibble) and weight j + 16 (high).
//
// Work: rows in groups of R, tokens in blocks that stay in L2; a row group's weights are expanded to
// float32 (interleaved per 16 along K) into a small buffer per slice of K and reused by every token of
// the block, and the tokens are interleaved likewise once per call, so the micro-kernel reads two
// sequential streams: prefill runs at arithmetic speed and decode at the weights' read speed. Items (row
// group, token block) are independent; which thread runs one never changes its numbers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace {

using kvt::V16;

constexpr int64_t G = 32;               // quantization group along K
constexpr int64_t SCRATCH = 16384 / 4;  // floats of expanded weights per row group and K slice (L1)
constexpr int64_t XBLOCK = 524288 / 4;  // floats of activations per token block (L2)

// A weight format: `load(n, k, out)` writes w[n, k .. k + 16 * kChunks) as float32 into kChunks vectors
// (k a multiple of 16 * kChunks), `at(n, k)` one weight of the K % 16 tail, the same value (int4 has no
// tail: K is a multiple of 32); `at_bytes(n, k)` where w[n, k] is stored, to prefetch (rows stream from
// DRAM at ~11 GB/s without it, ~20-25 with it).
struct Int8W {
  const int8_t* q;
  const float* scales;
  int64_t K, groups;  // groups = ceil(K / 32): the last one may be short
  static constexpr int kChunks = 1;
  const void* at_bytes(int64_t n, int64_t k) const { return q + n * K + k; }
  void load(int64_t n, int64_t k, V16* out) const {
    out[0] = kvt::mul16(kvt::int8x16(q + n * K + k), kvt::set16(scales[n * groups + k / G]));
  }
  float at(int64_t n, int64_t k) const { return static_cast<float>(q[n * K + k]) * scales[n * groups + k / G]; }
};

struct Int4W {
  const uint8_t* q;
  const float *scales, *mins;
  int64_t K;
  static constexpr int kChunks = 2;  // a group at a time: one load of its 16 bytes, one scale and min
  const void* at_bytes(int64_t n, int64_t k) const { return q + n * (K / 2) + k / 2; }
  void load(int64_t n, int64_t k, V16* out) const {  // weights 0-15 of a group are the low nibbles, 16-31 the high
    const int64_t g = n * (K / G) + k / G;
    const uint8_t* b = q + n * (K / 2) + k / 2;
    const V16 s = kvt::set16(scales[g]), m = kvt::set16(mins[g]);
    out[0] = kvt::fma16(kvt::nibbles16(b, false), s, m);  // q * scale + min, one rounding
    out[1] = kvt::fma16(kvt::nibbles16(b, true), s, m);
  }
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
        lanes[k % 16] = std::fma(x[(m0 + i / R) * K + k], w.at(n0 + std::min<int64_t>(i % R, nr - 1), k), lanes[k % 16]);
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

// One token, rows [n0, n0 + R): the weights expanded in registers (decode streams them once).
template <int R, class W>
inline void tile1(const W& w, const int64_t* rows, const float* x, int64_t steps, float* acc) {
  V16 a[R];
  for (int r = 0; r < R; ++r) a[r] = kvt::zero16();
  constexpr int C = W::kChunks;
  for (int64_t i = 0; i < steps; i += C) {
    V16 xv[C];
    for (int c = 0; c < C; ++c) {
      xv[c] = kvt::load16(x + 16 * (i + c));
      kvt::in_register(xv[c]);
    }
    for (int r = 0; r < R; ++r) {
      kvt::prefetch(w.at_bytes(rows[r] + R, 16 * i));  // the next row group's weights, ahead of DRAM
      V16 wv[C];
      w.load(rows[r], 16 * i, wv);
      for (int c = 0; c < C; ++c) a[r] = kvt::fma16(xv[c], wv[c], a[r]);
    }
  }
  for (int r = 0; r < R; ++r) kvt::store16(acc + r * 16, a[r]);
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
    int64_t rows[R];
    for (int r = 0; r < R; ++r) rows[r] = n0 + std::min<int64_t>(r, nr - 1);
    tile1<R>(w, rows, x + m0 * K, K16 / 16, acc.data());
    return finish<R>(w, x, m0, m1, K, n0, nr, y, N, bias, acc);
  }
  scratch.resize(R * slice);
  if (K16 == 0) std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t k0 = 0; k0 < K16; k0 += slice) {
    const int64_t k1 = std::min(K16, k0 + slice), steps = (k1 - k0) / 16;
    for (int64_t i = 0; i < steps; i += W::kChunks)  // rows past nr repeat the last one (results dropped)
      for (int r = 0; r < R; ++r) {
        kvt::prefetch(w.at_bytes(n0 + R + r, k0 + 16 * i));  // the next row group's
        V16 wv[W::kChunks];
        w.load(n0 + std::min<int64_t>(r, nr - 1), k0 + 16 * i, wv);
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

template <class W>
void dispatch_m(const W& w, const float* x, int64_t M, int64_t K, int64_t N, float* y, const float* bias) {
  if (M == 1) return run<kDecodeRows, 1>(w, x, M, K, N, y, bias);
  run<kRows, kTokens>(w, x, M, K, N, y, bias);
}

torch::Tensor as_float(const torch::Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); }

void check_x(const torch::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, name, ": x [M, ", K, "] expected, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name, ": float32 or bfloat16 x");
}

// int8 [N, K] and float32 scales [N, ceil(K/32)]; int4 [N, K/2] and scales, mins [N, K/32].
Int8W int8_weight(const torch::Tensor& qw, const torch::Tensor& scales, const char* name) {
  TORCH_CHECK(qw.scalar_type() == at::kChar && qw.is_contiguous() && qw.dim() == 2, name,
              ": int8 weights [N, K] expected");
  const int64_t N = qw.size(0), K = qw.size(1), groups = (K + G - 1) / G;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * groups, name,
              ": float32 scales [N, ceil(K/32)] expected");
  return {qw.data_ptr<int8_t>(), scales.data_ptr<float>(), K, groups};
}

Int4W int4_weight(const torch::Tensor& qw, const torch::Tensor& scales, const torch::Tensor& mins, const char* name) {
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.dim() == 2 && qw.size(1) % (G / 2) == 0,
              name, ": uint8 weights [N, K/2] with K a multiple of 32 expected");
  const int64_t N = qw.size(0), K = qw.size(1) * 2;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && mins.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.numel() == N * (K / G) && mins.numel() == N * (K / G),
              name, ": float32 scales and mins [N, K/32] expected");
  return {qw.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>(), K};
}

template <class W>
torch::Tensor apply(const W& w, const torch::Tensor& x, int64_t N, const float* bias) {
  const auto xf = as_float(x);
  const int64_t M = xf.size(0), K = xf.size(1);
  auto y = torch::empty({M, N}, xf.options());
  if (M > 0) dispatch_m(w, xf.data_ptr<float>(), M, K, N, y.data_ptr<float>(), bias);
  return y;
}

}  // namespace

torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& scales) {
  const auto w = int8_weight(qw, scales, "q8_linear");
  check_x(x, w.K, "q8_linear");
  return apply(w, x, qw.size(0), nullptr);
}

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& scales,
                        const torch::Tensor& mins) {
  const auto w = int4_weight(qw, scales, mins, "q4_linear");
  check_x(x, w.K, "q4_linear");
  return apply(w, x, qw.size(0), nullptr);
}

// y[e] = x[e] W_e^T: one weight per input row (a decode token's chosen experts), all rows of all weights
// in one parallel region; each row's numbers are those of q4_linear / q8_linear on that input row alone.
// weights[e]: {qweight, scales, mins} (int4) or {qweight, scales} (int8), all of one kind and shape.
torch::Tensor q_linear_grouped(const torch::Tensor& x, const std::vector<std::vector<torch::Tensor>>& weights) {
  const int64_t E = x.size(0);
  TORCH_CHECK(x.dim() == 2 && static_cast<int64_t>(weights.size()) == E && E > 0,
              "q_linear_grouped: x [E, K] and one weight per row of x");
  const bool int4 = weights[0].size() == 3;
  std::vector<Int8W> w8;
  std::vector<Int4W> w4;
  for (const auto& w : weights) {
    TORCH_CHECK(w.size() == weights[0].size() && (w.size() == 2 || w.size() == 3) && w[0].sizes() == weights[0][0].sizes(),
                "q_linear_grouped: weights of one kind and shape");
    if (int4) {
      w4.push_back(int4_weight(w[0], w[1], w[2], "q_linear_grouped"));
    } else {
      w8.push_back(int8_weight(w[0], w[1], "q_linear_grouped"));
    }
  }
  const int64_t N = weights[0][0].size(0), K = int4 ? w4[0].K : w8[0].K;
  check_x(x, K, "q_linear_grouped");
  const auto xf = as_float(x);
  auto y = torch::empty({E, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int R = kDecodeRows;
  const int64_t groups = (N + R - 1) / R;
  at::parallel_for(0, E * groups, 1, [&](int64_t i0, int64_t i1) {
    kvt::Floats scratch, acc;
    for (int64_t i = i0; i < i1; ++i) {  // one token: its activations are already in packed order
      const int64_t e = i / groups, n0 = i % groups * R, nr = std::min<int64_t>(R, N - n0);
      const float* xe = xp + e * K;
      if (int4) {
        row_group<R, 1>(w4[e], xe, xe, 0, 1, K, n0, nr, yp + e * N, N, nullptr, scratch, acc);
      } else {
        row_group<R, 1>(w8[e], xe, xe, 0, 1, K, n0, nr, yp + e * N, N, nullptr, scratch, acc);
      }
    }
  });
  return y;
}
