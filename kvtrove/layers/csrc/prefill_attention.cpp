// Causal attention of a prefill's new tokens over their context, float32, one call per sequence.
// q [n, H, D]; k, v [L, K, D] (any row and head strides, D contiguous); the new tokens are positions
// L - n .. L - 1, and with window > 0 a token sees only the last `window` positions. Returns [n, H, D].
// PyTorch's CPU flash attention reaches ~35 GFLOP/s on SmolLM2's shapes (D = 64, 3 query heads per KV
// head); here each work item is one KV head and a block of 64 tokens with all the query heads sharing
// that KV head (so each key and value row is read once for all of them), the two products run on
// register-tiled AVX2 micro-kernels, and a row's keys are its contiguous allowed range (causal and
// window cuts), so nothing is masked with infinities (the build uses -ffast-math). Softmax is online
// over blocks of 64 keys (flash attention's recurrence), so memory stays constant in the context length.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t BQ = 64;  // tokens per work item (each with its G query heads)
constexpr int64_t BK = 64;  // keys per block of the online softmax
constexpr int RT = 6;       // rows per micro-kernel tile: 6 x 16 floats, 12 accumulators (with 4, latency-bound)

// s[r][c] = sum_d qc[r][d] * kt[d][c] for rows [0, R) of a tile, columns [c0, c0 + 16): kt is the key
// block transposed ([D][BK]), so each step broadcasts one query value against 16 keys.
template <int R>
inline void qk_tile(const float* qc, int64_t D, const float* kt, int64_t c0, float* s) {
#ifdef KVT_AVX2
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * BK + c0), k1 = _mm256_loadu_ps(kt + d * BK + c0 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_broadcast_ss(qc + r * D + d);
      acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(s + r * BK + c0, acc[r][0]);
    _mm256_storeu_ps(s + r * BK + c0 + 8, acc[r][1]);
  }
#else
  for (int r = 0; r < R; ++r)
    for (int64_t c = c0; c < c0 + 16; ++c) {
      float a = 0.f;
      for (int64_t d = 0; d < D; ++d) a += qc[r * D + d] * kt[d * BK + c];
      s[r * BK + c] = a;
    }
#endif
}

// o[r][d0 .. d0 + 8 * C) += sum_j p[r][j] * v_j[d0 ..] over the block's keys j in [0, n).
template <int R, int C>
inline void pv_tile(const float* p, const float* const* vrows, int64_t n, int64_t d0, float* o, int64_t D) {
#ifdef KVT_AVX2
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_loadu_ps(o + r * D + d0 + 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    __m256 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = _mm256_loadu_ps(vrows[j] + d0 + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 pv = _mm256_broadcast_ss(p + r * BK + j);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(pv, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(o + r * D + d0 + 8 * c, acc[r][c]);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = d0; d < d0 + 8 * C; ++d) o[r * D + d] += p[r * BK + j] * vrows[j][d];
#endif
}

template <int C>
void pv_rows(const float* p, const float* const* vrows, int64_t n, float* o, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; r += RT) {
    const float* pr = p + r * BK;
    float* orow = o + r * D;
    for (int64_t d0 = 0; d0 < D; d0 += 8 * C) {
      switch (std::min<int64_t>(RT, rows - r)) {
        case 1: pv_tile<1, C>(pr, vrows, n, d0, orow, D); break;
        case 2: pv_tile<2, C>(pr, vrows, n, d0, orow, D); break;
        case 3: pv_tile<3, C>(pr, vrows, n, d0, orow, D); break;
        case 4: pv_tile<4, C>(pr, vrows, n, d0, orow, D); break;
        case 5: pv_tile<5, C>(pr, vrows, n, d0, orow, D); break;
        default: pv_tile<RT, C>(pr, vrows, n, d0, orow, D); break;
      }
    }
  }
}

void qk_rows(const float* qc, int64_t rows, int64_t D, const float* kt, int64_t cols, float* s) {
  for (int64_t r = 0; r < rows; r += RT) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      switch (std::min<int64_t>(RT, rows - r)) {
        case 1: qk_tile<1>(qc + r * D, D, kt, c0, s + r * BK); break;
        case 2: qk_tile<2>(qc + r * D, D, kt, c0, s + r * BK); break;
        case 3: qk_tile<3>(qc + r * D, D, kt, c0, s + r * BK); break;
        case 4: qk_tile<4>(qc + r * D, D, kt, c0, s + r * BK); break;
        case 5: qk_tile<5>(qc + r * D, D, kt, c0, s + r * BK); break;
        default: qk_tile<RT>(qc + r * D, D, kt, c0, s + r * BK); break;
      }
    }
  }
}

struct Views {
  const float *q, *k, *v;
  int64_t qs_t, qs_h, ks_t, ks_h, vs_t, vs_h;  // strides (elements) over tokens and heads
  int64_t n, L, H, K, D, window;
  float scale;
};

// One work item: KV head h, new tokens [t0, t1), each with its G query heads (rows r = (t - t0) * G + g).
void attend_block(const Views& a, int64_t h, int64_t t0, int64_t t1, float* out) {
  const int64_t G = a.H / a.K, D = a.D, rows = (t1 - t0) * G, offset = a.L - a.n;
  std::vector<float> qc(rows * D), o(rows * D, 0.f), s(rows * BK), kt(D * BK), m(rows), l(rows, 0.f);
  std::vector<int64_t> lo(rows), hi(rows);  // each row's allowed keys [lo, hi)
  std::vector<const float*> vrows(BK);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / G, g = r % G, pos = offset + t;
    const float* src = a.q + t * a.qs_t + (h * G + g) * a.qs_h;
    for (int64_t d = 0; d < D; ++d) qc[r * D + d] = src[d] * a.scale;
    hi[r] = pos + 1;
    lo[r] = a.window > 0 ? std::max<int64_t>(0, pos - a.window + 1) : 0;
    m[r] = -std::numeric_limits<float>::max();
  }
  const int64_t first = lo[0], last = hi[rows - 1];  // rows are in position order
  const int64_t C = D % 16 == 0 ? 2 : 1;
  for (int64_t kb = first; kb < last; kb += BK) {
    const int64_t n = std::min(BK, last - kb);
    for (int64_t j = 0; j < BK; ++j) {  // the block transposed; columns past n are zeros
      const float* kr = j < n ? a.k + (kb + j) * a.ks_t + h * a.ks_h : nullptr;
      for (int64_t d = 0; d < D; ++d) kt[d * BK + j] = kr ? kr[d] : 0.f;
      vrows[j] = j < n ? a.v + (kb + j) * a.vs_t + h * a.vs_h : nullptr;
    }
    qk_rows(qc.data(), rows, D, kt.data(), (n + 15) / 16 * 16, s.data());
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s.data() + r * BK;
      const int64_t c0 = std::max<int64_t>(lo[r] - kb, 0), c1 = std::min<int64_t>(hi[r] - kb, n);
      if (c0 >= c1) {  // no allowed key here: the row keeps its state
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      float mx = m[r];
      for (int64_t c = c0; c < c1; ++c) mx = std::max(mx, sr[c]);
      const float corr = std::exp(m[r] - mx);
      float sum = 0.f;
      for (int64_t c = 0; c < c0; ++c) sr[c] = 0.f;
      for (int64_t c = c0; c < c1; ++c) sum += (sr[c] = std::exp(sr[c] - mx));
      for (int64_t c = c1; c < n; ++c) sr[c] = 0.f;
      l[r] = l[r] * corr + sum;
      m[r] = mx;
      if (corr != 1.f)
        for (int64_t d = 0; d < D; ++d) o[r * D + d] *= corr;
    }
    if (C == 2) {
      pv_rows<2>(s.data(), vrows.data(), n, o.data(), rows, D);
    } else {
      pv_rows<1>(s.data(), vrows.data(), n, o.data(), rows, D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / G, g = r % G;
    const float inv = 1.f / l[r];
    float* dst = out + (t * a.H + h * G + g) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = o[r * D + d] * inv;
  }
}

}  // namespace

torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                                int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes(),
              "prefill_attention: q [n, H, D], k and v [L, K, D] expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "prefill_attention: float32 tensors expected");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "prefill_attention: head dim contiguous");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), L = k.size(0), K = k.size(1);
  TORCH_CHECK(k.size(2) == D && H % K == 0 && n <= L && n > 0, "prefill_attention: shapes do not match");
  TORCH_CHECK(D % 8 == 0, "prefill_attention: head dim must be a multiple of 8");
  const Views a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), q.stride(0), q.stride(1),
                k.stride(0), k.stride(1), v.stride(0), v.stride(1), n, L, H, K, D, window,
                static_cast<float>(scale)};
  auto out = torch::empty({n, H, D}, q.options());
  float* o = out.data_ptr<float>();
  // Items (KV head, token block), costliest first (later blocks see more keys), handed out one at a time:
  // static splits would give one thread all the long rows.
  const int64_t blocks = (n + BQ - 1) / BQ, items = K * blocks;
  std::vector<int64_t> order(items);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return x % blocks > y % blocks; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(items, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < items; i = next++) {
      const int64_t h = order[i] / blocks, b = order[i] % blocks;
      attend_block(a, h, b * BQ, std::min(n, (b + 1) * BQ), o);
    }
  });
  return out;
}
