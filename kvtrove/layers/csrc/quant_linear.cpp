// Weight-only quantized linear layers for few tokens (decode), y = x W^T:
// - q4_linear: 4-bit weights, w = q * scale + min per group of 32 along K, q in 0..15;
// - q8_linear: 8-bit weights, w = q * scale per output row, q in -127..127.
// PyTorch's CPU int4 kernel (_weight_int4pack_mm_for_cpu) is compute-bound on AVX2 machines (4.6-6.4
// GB/s of weights on one row, measured here against ~19 GB/s of DRAM), so decode cannot reach the
// memory bound with it. Here the activations are rounded once per call to int16 per group of 32
// (scale dx = max|x| / 32767: a relative error ~1e-5, so a token's numbers match the float GEMM that
// prefill uses, computed alone or in a batch, cached or not), and a group's sum of q * xq is an integer
// dot product (madd: 16-bit weights times 16-bit activations, summed in int32):
//   y = sum_g scale_g * dx_g * (q . xq)_g + min_g * (sum of x over g)     (int4)
//   y = scale * sum_g dx_g * (q . xq)_g                                    (int8)
// PyTorch's int8 kernel (_weight_int8pack_mm) is fast only with bf16 activations and returns bf16, which
// rounds an output head's logits to 8 bits of mantissa (and the rounding differs with the batch size).
// Layout: int4 qw [N, K/2] uint8, 16 bytes per group, byte j holding q[j] (low nibble) and q[j + 16] (high).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t G = 32;
constexpr int MB = 4;  // tokens per pass over a row: each group's weights are unpacked once for MB tokens

// f(std::integral_constant<int, mb>) for 1 <= mb <= MB: a tile's token count as a compile-time constant,
// so its accumulators live in registers (with a run-time count they lived on the stack, and the kernels
// streamed 10 GB/s of weights instead of 25).
template <typename F>
inline void with_mb(int mb, F&& f) {
  switch (mb) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, MB>{});
  }
}

// Where activation j of group g goes in xq for the int4 kernel. With AVX2, groups are handled in pairs:
// one 32-byte load holds two groups' weights, whose nibbles widen to 16 bits in-lane as
// [g 0-7 | g+1 0-7], [g 8-15 | g+1 8-15], [g 16-23 | g+1 16-23], [g 24-31 | g+1 24-31], so a pair's 64
// activations are stored in that order; an unpaired last group (and the int8 kernel) keep plain order.
inline int64_t slot(int64_t g, int64_t groups, int j, bool paired) {
#ifdef KVT_AVX2
  if (paired && (groups % 2 == 0 || g + 1 < groups)) return (g & ~int64_t(1)) * G + (j / 8) * 16 + (g & 1) * 8 + j % 8;
#endif
  return g * G + j;
}

// How a group of 32 activations is rounded: q_j = nearbyint(v_j * inv), worth q_j * d (d = max|v| / 32767).
struct GroupScale {
  float d, inv, sum;
  explicit GroupScale(const float* v) {
    float amax = 0.f, s = 0.f;
    for (int j = 0; j < G; ++j) {
      amax = std::max(amax, std::fabs(v[j]));
      s += v[j];
    }
    d = amax / 32767.f;
    inv = d > 0.f ? 1.f / d : 0.f;
    sum = s;
  }
};

// Per token and group: int16 activations, their scale and the sum of the original values.
void quantize_x(const float* x, int64_t M, int64_t K, int16_t* xq, float* dx, float* xsum, bool paired) {
  const int64_t groups = K / G;
  at::parallel_for(0, M * groups, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* v = x + i * G;
      const GroupScale gs(v);
      const int64_t m = i / groups, g = i % groups;
      for (int j = 0; j < G; ++j) xq[m * K + slot(g, groups, j, paired)] = static_cast<int16_t>(std::nearbyint(v[j] * gs.inv));
      dx[i] = gs.d;
      xsum[i] = gs.sum;
    }
  });
}

#ifdef KVT_AVX2
inline __m256i load16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
// A group's weights as 16-bit lanes: low nibbles (weights 0-15) and high nibbles (16-31).
inline void unpack(const uint8_t* q, __m256i& lo, __m256i& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, m4));
  hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), m4));
}
// Two groups' q . xq (xq in pair order): lanes 0-3 partial sums of group g, lanes 4-7 of g + 1, in float.
inline __m256 pdot(const uint8_t* q, const int16_t* xq) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i m4 = _mm256_set1_epi8(0x0F), z = _mm256_setzero_si256();
  const __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
  const __m256i s0 = _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, z), load16(xq));
  const __m256i s1 = _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, z), load16(xq + 16));
  const __m256i s2 = _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, z), load16(xq + 32));
  const __m256i s3 = _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, z), load16(xq + 48));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3)));
}
// q . xq of one group as 8 partial int32 sums, in float.
inline __m256 gdot(__m256i lo, __m256i hi, const int16_t* xq) {
  const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo, load16(xq)), _mm256_madd_epi16(hi, load16(xq + 16)));
  return _mm256_cvtepi32_ps(p);
}
#endif

// Rows [n0, n1) for tokens [m0, m0 + mb).
template <int mb>
void rows(const uint8_t* qw, const float* scales, const float* mins, const int16_t* xq, const float* dx,
          const float* xsum, float* y, int64_t n0, int64_t n1, int64_t m0, int64_t K, int64_t N) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = qw + n * (K / 2);
    const float* sc = scales + n * groups;
    const float* mn = mins + n * groups;
#ifdef KVT_AVX2
    __m256 acc[mb], acc2[mb];  // two FMA chains in flight
    for (int m = 0; m < mb; ++m) acc[m] = acc2[m] = _mm256_setzero_ps();
    int64_t g = 0;
    // Eight groups' scale products sc * dx in one multiply, each pair's two spread over its lanes by a
    // permute (one scalar multiply and broadcast per group cost as much as a third of the kernel).
    const __m256i p0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), p1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    const __m256i p2 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), p3 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
    for (; g + 8 <= groups; g += 8) {
      const __m256 sc8 = _mm256_loadu_ps(sc + g);
      for (int m = 0; m < mb; ++m) {
        const int64_t i = (m0 + m) * groups + g;
        const int16_t* xm = xq + i * G;
        const __m256 s = _mm256_mul_ps(sc8, _mm256_loadu_ps(dx + i));
        acc[m] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, p0), pdot(q + g * (G / 2), xm), acc[m]);
        acc2[m] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, p1), pdot(q + (g + 2) * (G / 2), xm + 2 * G), acc2[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, p2), pdot(q + (g + 4) * (G / 2), xm + 4 * G), acc[m]);
        acc2[m] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, p3), pdot(q + (g + 6) * (G / 2), xm + 6 * G), acc2[m]);
      }
    }
    for (; g + 4 <= groups; g += 4) {
      for (int m = 0; m < mb; ++m) {
        const int64_t i = (m0 + m) * groups + g;
        const int16_t* xm = xq + i * G;
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
      __m256i lo0, hi0;
      unpack(q + g * (G / 2), lo0, hi0);
      for (int m = 0; m < mb; ++m) {
        const int64_t i = (m0 + m) * groups + g;
        acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(sc[g] * dx[i]), gdot(lo0, hi0, xq + i * G), acc[m]);
      }
    }
    for (int m = 0; m < mb; ++m) {
      const int64_t i = (m0 + m) * groups;
      y[(m0 + m) * N + n] = kvt::hsum(_mm256_add_ps(acc[m], acc2[m])) + kvt::dot(mn, xsum + i, groups);
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
        s += sc[g] * dx[i] * static_cast<float>(d) + mn[g] * xsum[i];
      }
      y[(m0 + m) * N + n] = s;
    }
#endif
  }
}

// int8: rows [n0, n1) for tokens [m0, m0 + mb).
template <int mb>
void rows8(const int8_t* qw, const float* scales, const int16_t* xq, const float* dx, float* y, int64_t n0,
           int64_t n1, int64_t m0, int64_t K, int64_t N) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = qw + n * K;
#ifdef KVT_AVX2
    __m256 acc[mb], acc2[mb];
    for (int m = 0; m < mb; ++m) acc[m] = acc2[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * G)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * G + 16)));
      for (int m = 0; m < mb; ++m) {
        const int64_t i = (m0 + m) * groups + g;
        const int16_t* xm = xq + i * G;
        const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(w0, load16(xm)));
        const __m256 e = _mm256_cvtepi32_ps(_mm256_madd_epi16(w1, load16(xm + 16)));
        acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(dx[i]), d, acc[m]);
        acc2[m] = _mm256_fmadd_ps(_mm256_set1_ps(dx[i]), e, acc2[m]);
      }
    }
    for (int m = 0; m < mb; ++m) y[(m0 + m) * N + n] = scales[n] * kvt::hsum(_mm256_add_ps(acc[m], acc2[m]));
#else
    for (int m = 0; m < mb; ++m) {
      float s = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = (m0 + m) * groups + g;
        int32_t d = 0;
        for (int j = 0; j < G; ++j) d += q[g * G + j] * xq[i * G + j];
        s += dx[i] * static_cast<float>(d);
      }
      y[(m0 + m) * N + n] = scales[n] * s;
    }
#endif
  }
}

}  // namespace

namespace {

// x [M, K] rounded once per call: int16 activations, their scales and the groups' exact sums.
struct Rounded {
  std::vector<int16_t> xq;
  std::vector<float> dx, xsum;
  Rounded(const torch::Tensor& xc, bool paired)
      : xq(xc.numel()), dx(xc.numel() / G), xsum(xc.numel() / G) {
    quantize_x(xc.data_ptr<float>(), xc.size(0), xc.size(1), xq.data(), dx.data(), xsum.data(), paired);
  }
};

// The shared frame of both kernels: x rounded once, then `tile(xq, dx, xsum, y, n0, n1, m0, mb)` over
// output rows [n0, n1) (in parallel) for tiles of up to MB tokens.
template <typename Tile>
torch::Tensor run_rows(const torch::Tensor& xc, int64_t N, bool paired, Tile tile) {
  const int64_t M = xc.size(0);
  const Rounded r(xc, paired);
  auto y = torch::empty({M, N}, xc.options());
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      tile(r.xq.data(), r.dx.data(), r.xsum.data(), out, n0, n1, m0, static_cast<int>(std::min<int64_t>(MB, M - m0)));
    }
  });
  return y;
}

torch::Tensor checked_x(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, name, ": float32 x [M, K] expected");
  TORCH_CHECK(x.size(1) % G == 0, name, ": K must be a multiple of 32");
  return x.contiguous();
}

}  // namespace

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& scales,
                        const torch::Tensor& mins) {
  const auto xc = checked_x(x, "q4_linear");
  const int64_t K = xc.size(1), N = qw.size(0);
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.dim() == 2 && qw.size(1) == K / 2,
              "q4_linear: uint8 weights [N, K/2] expected");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && mins.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.numel() == N * (K / G) && mins.numel() == N * (K / G),
              "q4_linear: float32 scales and mins [N, K/32] expected");
  const uint8_t* q = qw.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  const float* mn = mins.data_ptr<float>();
  return run_rows(xc, N, true, [&](const int16_t* xq, const float* dx, const float* xsum, float* y, int64_t n0,
                                  int64_t n1, int64_t m0, int mb) {
    with_mb(mb, [&](auto c) { rows<c()>(q, sc, mn, xq, dx, xsum, y, n0, n1, m0, K, N); });
  });
}

torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& scales) {
  const auto xc = checked_x(x, "q8_linear");
  const int64_t K = xc.size(1), N = qw.size(0);
  TORCH_CHECK(qw.scalar_type() == at::kChar && qw.is_contiguous() && qw.dim() == 2 && qw.size(1) == K,
              "q8_linear: int8 weights [N, K] expected");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
              "q8_linear: float32 scales [N] expected");
  const int8_t* q = qw.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  return run_rows(xc, N, false, [&](const int16_t* xq, const float* dx, const float*, float* y, int64_t n0,
                                   int64_t n1, int64_t m0, int mb) {
    with_mb(mb, [&](auto c) { rows8<c()>(q, sc, xq, dx, y, n0, n1, m0, K, N); });
  });
}

// x [M, K] as the kernels see it, for the float GEMM of a prefill: {rounded [M, K] (each activation's
// int16 value times its group's scale, the very numbers the kernels multiply), lost [M, K/32] (the sum of
// a group's activations minus the sum of its rounded ones: the int4 kernel applies a group's min to the
// exact sum)}. One pass; torch ops took ten.
std::vector<torch::Tensor> round_activations(const torch::Tensor& x) {
  const auto xc = checked_x(x, "round_activations");
  const int64_t M = xc.size(0), K = xc.size(1), groups = K / G;
  auto rounded = torch::empty_like(xc);
  auto lost = torch::empty({M, groups}, xc.options());
  const float* in = xc.data_ptr<float>();
  float* r = rounded.data_ptr<float>();
  float* l = lost.data_ptr<float>();
  at::parallel_for(0, M * groups, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* v = in + i * G;
      const GroupScale gs(v);
      float kept = 0.f;
      for (int j = 0; j < G; ++j) {
        r[i * G + j] = std::nearbyint(v[j] * gs.inv) * gs.d;
        kept += r[i * G + j];
      }
      l[i] = gs.sum - kept;
    }
  });
  return {rounded, lost};
}

// One group's 32 weights, q * scale + min rounded after the product and after the sum (no FMA), as the
// gguf package computes Q4_0 / Q4_1 / Q4_K weights: a repacked file's weights come out bit for bit.
__attribute__((optimize("fp-contract=off"))) static void dequantize_group(const uint8_t* b, float s, float m,
                                                                          float* o) {
  for (int j = 0; j < G / 2; ++j) {
    o[j] = static_cast<float>(b[j] & 0x0F) * s + m;
    o[j + G / 2] = static_cast<float>(b[j] >> 4) * s + m;
  }
}

// The float weight [N, K] of a 4-bit one, in one pass (prefill runs a float GEMM on it).
torch::Tensor q4_dequantize(const torch::Tensor& qw, const torch::Tensor& scales, const torch::Tensor& mins) {
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.dim() == 2,
              "q4_dequantize: uint8 weights [N, K/2] expected");
  const int64_t N = qw.size(0), K = qw.size(1) * 2, groups = K / G;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && mins.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.numel() == N * groups && mins.numel() == N * groups,
              "q4_dequantize: float32 scales and mins [N, K/32] expected");
  auto w = torch::empty({N, K}, scales.options());
  const uint8_t* q = qw.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  const float* mn = mins.data_ptr<float>();
  float* out = w.data_ptr<float>();
  at::parallel_for(0, N * groups, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dequantize_group(q + i * (G / 2), sc[i], mn[i], out + i * G);
  });
  return w;
}

// y[e] = x[e] W_e^T: one weight per input row (a decode token's chosen experts: its hidden state for
// every gate/up, each expert's activation for its down projection). All rows of all weights are split
// across the threads in one parallel region instead of one per weight; each row's numbers are those
// of q4_linear / q8_linear on that input row alone. weights[e]: {qweight, scales, mins} (int4) or
// {qweight, scales} (int8), all of one kind and shape.
torch::Tensor q_linear_grouped(const torch::Tensor& x, const std::vector<std::vector<torch::Tensor>>& weights) {
  const auto xc = checked_x(x, "q_linear_grouped");
  const int64_t E = xc.size(0), K = xc.size(1);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == E && E > 0, "q_linear_grouped: one weight per row of x");
  const bool int4 = weights[0].size() == 3;
  const int64_t N = weights[0][0].size(0);
  for (const auto& w : weights) {
    TORCH_CHECK(w.size() == (int4 ? 3u : 2u) && w[0].dim() == 2 && w[0].size(0) == N && w[0].is_contiguous() &&
                    w[0].size(1) == (int4 ? K / 2 : K) && w[0].scalar_type() == (int4 ? at::kByte : at::kChar),
                "q_linear_grouped: weights of one kind and shape [N, K/2] uint8 (int4) or [N, K] int8");
    for (size_t t = 1; t < w.size(); ++t) {
      TORCH_CHECK(w[t].scalar_type() == at::kFloat && w[t].is_contiguous() &&
                      w[t].numel() == (int4 ? N * (K / G) : N),
                  "q_linear_grouped: float32 scales (and mins) of the weight's shape");
    }
  }
  const Rounded xr(xc, int4);
  auto y = torch::empty({E, N}, xc.options());
  float* out = y.data_ptr<float>();
  at::parallel_for(0, E * N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1;) {  // output row r is row r % N of weight r / N, against input row r / N
      const int64_t e = r / N, n0 = r % N, n1 = std::min(N, n0 + (r1 - r));
      const auto& w = weights[e];
      if (int4) {
        rows<1>(w[0].data_ptr<uint8_t>(), w[1].data_ptr<float>(), w[2].data_ptr<float>(), xr.xq.data(),
                xr.dx.data(), xr.xsum.data(), out, n0, n1, e, K, N);
      } else {
        rows8<1>(w[0].data_ptr<int8_t>(), w[1].data_ptr<float>(), xr.xq.data(), xr.dx.data(), out, n0, n1, e, K, N);
      }
      r += n1 - n0;
    }
  });
  return y;
}
