// Attention for decode and prefill in one arithmetic, so a token's output does not depend on whether it
// is decoded or prefilled, in which chunk, next to which other sequences, or on how many threads.
//
// Keys are taken in blocks of BK at absolute positions [BK * b, BK * b + BK). For one query row and one
// block, `Partial` holds the block's max score m, the sum l of exp(score - m) and the unnormalized output
// o = sum_j exp(s_j - m) v_j, computed in one fixed order (vec.h: scores are dot products of the
// pre-scaled query with each key; l sums the block's 64 weights as 8 lanes + tree8; o accumulates keys in
// increasing position). A row's blocks are merged left to right (`merge`), and the output is o / l.
// Decode computes a row's blocks in parallel and merges them in order afterwards; prefill merges each block
// as it goes: the same operations on the same numbers. Keys outside a row's causal window get weight
// exactly 0 (adding 0 * v leaves a sum unchanged, bit for bit).
//
// paged_decode: q [B, H, D]; k_cache [K, S, D] (head-major slots), v_cache [K, S, Dv] (any slot stride);
// slots [B, L]; lens [B]. -> [B, H, Dv]
// prefill_attention: q [n, H, D] of the last n positions of a context k [L, K, D], v [L, K, Dv] (float32).
// MLA passes its latent cache as the keys and a view of its first Dv numbers as the values.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace {

using kvt::V8;

constexpr int64_t BK = 64;  // keys per block
constexpr int64_t BQ = 64;  // prefill: tokens per work item

// s[j] = q . k_j for the block's keys j < n (kvt::dot's order); eight keys at a time when D % 8 == 0.
template <typename T>
void scores(const float* q, const T* const* kp, int64_t n, int64_t D, float* s) {
  int64_t j = 0;
#ifdef KVT_AVX2
  if (D % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      __m256 a[8];
      for (int c = 0; c < 8; ++c) a[c] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(kvt::load8(kp[j + c] + d).v, qv, a[c]);
      }
      // lane c: ((a_c0 + a_c1) + (a_c2 + a_c3)) + ((a_c4 + a_c5) + (a_c6 + a_c7)), which is tree8
      const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
      _mm256_storeu_ps(s + j, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
    }
  }
#endif
  for (; j < n; ++j) s[j] = kvt::dot(kp[j], q, D);
}

// One row's result over one block (o: D floats owned by the caller).
struct Partial {
  float m, l;
  float* o;
};

// Scores s[0, n) of one row against a block, the row's allowed keys [c0, c1) (c0 < c1): m, l and o (D
// floats: the value width). p (BK floats) is scratch.
template <typename T>
void partial(const float* s, int64_t n, int64_t c0, int64_t c1, const T* const* vp, int64_t D, float* p,
             Partial& out) {
  float m = s[c0];
  for (int64_t j = c0 + 1; j < c1; ++j) m = std::max(m, s[j]);
  const V8 neg = kvt::set8(-m);
  for (int64_t c = 0; c < BK; c += 8) {
    if (c < n) {
      float v[8];
      for (int i = 0; i < 8; ++i) v[i] = c + i < n ? s[c + i] : 0.f;
      kvt::store8(p + c, kvt::exp8(kvt::add8(kvt::load8(v), neg)));
    }
    for (int64_t j = c; j < c + 8; ++j)
      if (j < c0 || j >= c1) p[j] = 0.f;
  }
  V8 l = kvt::zero8();
  for (int64_t c = 0; c < BK; c += 8) l = kvt::add8(l, kvt::load8(p + c));
  out.m = m;
  out.l = kvt::tree8(l);
  float* o = out.o;
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {  // four vectors of the output per pass over the keys
    V8 a0 = kvt::zero8(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < n; ++j) {
      const V8 pj = kvt::set8(p[j]);
      a0 = kvt::fma8(pj, kvt::load8(vp[j] + d), a0);
      a1 = kvt::fma8(pj, kvt::load8(vp[j] + d + 8), a1);
      a2 = kvt::fma8(pj, kvt::load8(vp[j] + d + 16), a2);
      a3 = kvt::fma8(pj, kvt::load8(vp[j] + d + 24), a3);
    }
    kvt::store8(o + d, a0);
    kvt::store8(o + d + 8, a1);
    kvt::store8(o + d + 16, a2);
    kvt::store8(o + d + 24, a3);
  }
  for (; d + 8 <= D; d += 8) {
    V8 a = kvt::zero8();
    for (int64_t j = 0; j < n; ++j) a = kvt::fma8(kvt::set8(p[j]), kvt::load8(vp[j] + d), a);
    kvt::store8(o + d, a);
  }
  for (; d < D; ++d) {
    float a = 0.f;
    for (int64_t j = 0; j < n; ++j) a = std::fma(p[j], kvt::to_f(vp[j][d]), a);
    o[d] = a;
  }
}

// state <- state merged with the next block's partial b (state.m, l, o hold the blocks so far).
inline void merge(Partial& st, const Partial& b, int64_t D, bool first) {
  if (first) {
    st.m = b.m;
    st.l = b.l;
    std::copy_n(b.o, D, st.o);
    return;
  }
  const float mn = std::max(st.m, b.m), x = kvt::exp1(st.m - mn), y = kvt::exp1(b.m - mn);
  st.m = mn;
  st.l = st.l * x + b.l * y;
  const V8 xv = kvt::set8(x), yv = kvt::set8(y);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) kvt::store8(st.o + d, kvt::add8(kvt::mul8(kvt::load8(st.o + d), xv), kvt::mul8(kvt::load8(b.o + d), yv)));
  for (; d < D; ++d) st.o[d] = st.o[d] * x + b.o[d] * y;
}

template <typename O>
inline void finish(const Partial& st, int64_t D, O* out) {
  int64_t d = 0;
  if constexpr (std::is_same_v<O, float>) {
    const V8 lv = kvt::set8(st.l);
    for (; d + 8 <= D; d += 8) kvt::store8(out + d, kvt::div8(kvt::load8(st.o + d), lv));
  }
  for (; d < D; ++d) out[d] = static_cast<O>(st.o[d] / st.l);
}

// Values are rows of Dv numbers at vc + h * vs_h + slot * vs_s: their own cache, or (MLA) the first Dv
// numbers of each key row.
template <typename T>
void decode_kernel(const float* q, const T* kc, const T* vc, const int64_t* slots, const int64_t* lens, T* out,
                   int64_t B, int64_t H, int64_t K, int64_t S, int64_t D, int64_t L, float scale, int64_t window,
                   int64_t Dv, int64_t vs_h, int64_t vs_s) {
  const int64_t G = H / K;  // query heads sharing one KV head: each K/V row is read once for all of them
  const int64_t blocks = (L + BK - 1) / BK, items = B * K * blocks;
  std::vector<float> part_m(items * G), part_l(items * G), part_o(items * G * Dv);
  std::vector<char> used(items, 0);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(G * D), s(BK), p(BK);
    std::vector<const T*> kp(BK), vp(BK);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (K * blocks), h = idx / blocks % K, c = idx % blocks, n = lens[b];
      const int64_t lo = window > 0 && n > window ? n - window : 0, kb = c * BK;
      const int64_t cnt = std::min(n - kb, BK), c0 = std::max<int64_t>(lo - kb, 0);
      if (cnt <= 0 || c0 >= cnt) continue;  // outside the context or the window
      used[idx] = 1;
      for (int64_t j = 0; j < cnt; ++j) {
        kp[j] = kc + (h * S + slots[b * L + kb + j]) * D;
        vp[j] = vc + h * vs_h + slots[b * L + kb + j] * vs_s;
      }
      for (int64_t i = 0; i < G * D; ++i) qs[i] = q[(b * H + h * G) * D + i] * scale;
      for (int64_t g = 0; g < G; ++g) {
        scores(qs.data() + g * D, kp.data(), cnt, D, s.data());
        Partial pt{0.f, 0.f, part_o.data() + (idx * G + g) * Dv};
        partial(s.data(), cnt, c0, cnt, vp.data(), Dv, p.data(), pt);
        part_m[idx * G + g] = pt.m;
        part_l[idx * G + g] = pt.l;
      }
    }
  });
  at::parallel_for(0, B * K * G, 64, [&](int64_t begin, int64_t end) {  // small: one thread unless many rows
    std::vector<float> acc(Dv);
    for (int64_t bhg = begin; bhg < end; ++bhg) {
      const int64_t bh = bhg / G, g = bhg % G;  // bh = b * K + h: query heads h * G .. of sequence b
      Partial st{0.f, 0.f, acc.data()};
      bool first = true;
      for (int64_t c = 0; c < blocks; ++c) {
        const int64_t idx = bh * blocks + c, i = idx * G + g;
        if (!used[idx]) continue;
        merge(st, Partial{part_m[i], part_l[i], part_o.data() + i * Dv}, Dv, first);
        first = false;
      }
      finish(st, Dv, out + bhg * Dv);
    }
  });
}

struct Views {
  const float *q, *k, *v;
  int64_t qs_t, qs_h, ks_t, ks_h, vs_t, vs_h;  // strides (elements) over tokens and heads
  int64_t n, L, H, K, D, Dv, window;  // D: the query / key width, Dv: the value width
  float scale;
};

// One work item: KV head h, new tokens [t0, t1), each with its G query heads (rows r = (t - t0) * G + g).
void attend_block(const Views& a, int64_t h, int64_t t0, int64_t t1, float* out) {
  const int64_t G = a.H / a.K, D = a.D, Dv = a.Dv, rows = (t1 - t0) * G, offset = a.L - a.n;
  std::vector<float> qs(rows * D), o(rows * Dv), ob(Dv), s(BK), p(BK), m(rows), l(rows);
  std::vector<int64_t> lo(rows), hi(rows);  // each row's allowed keys [lo, hi)
  std::vector<char> started(rows, 0);
  std::vector<const float*> kp(BK), vp(BK);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / G, g = r % G, pos = offset + t;
    const float* src = a.q + t * a.qs_t + (h * G + g) * a.qs_h;
    for (int64_t d = 0; d < D; ++d) qs[r * D + d] = src[d] * a.scale;
    hi[r] = pos + 1;
    lo[r] = a.window > 0 ? std::max<int64_t>(0, pos - a.window + 1) : 0;
  }
  const int64_t first = lo[0] / BK * BK, last = hi[rows - 1];  // rows are in position order
  for (int64_t kb = first; kb < last; kb += BK) {
    const int64_t n = std::min(BK, a.L - kb);
    for (int64_t j = 0; j < n; ++j) {
      kp[j] = a.k + (kb + j) * a.ks_t + h * a.ks_h;
      vp[j] = a.v + (kb + j) * a.vs_t + h * a.vs_h;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t c0 = std::max<int64_t>(lo[r] - kb, 0), c1 = std::min<int64_t>(hi[r] - kb, n);
      if (c0 >= c1) continue;  // no allowed key in this block
      scores(qs.data() + r * D, kp.data(), c1, D, s.data());
      Partial b{0.f, 0.f, ob.data()};
      partial(s.data(), c1, c0, c1, vp.data(), Dv, p.data(), b);
      Partial st{m[r], l[r], o.data() + r * Dv};
      merge(st, b, Dv, !started[r]);
      started[r] = 1;
      m[r] = st.m;
      l[r] = st.l;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / G, g = r % G;
    finish(Partial{m[r], l[r], o.data() + r * Dv}, Dv, out + (t * a.H + h * G + g) * Dv);
  }
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                           torch::Tensor lens, double scale, int64_t window) {
  TORCH_CHECK(k_cache.is_contiguous() && k_cache.dim() == 3 && v_cache.dim() == 3 && v_cache.stride(2) == 1,
              "paged_decode: a contiguous key cache [K, S, D] and values [K, S, Dv] with Dv contiguous");
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_decode: values of the key cache's heads, slots and dtype");
  auto qf = q.to(torch::kFloat32).contiguous();
  auto sl = slots.contiguous();
  auto ln = lens.contiguous();
  const int64_t B = qf.size(0), H = qf.size(1), D = qf.size(2);
  const int64_t K = k_cache.size(0), S = k_cache.size(1), L = sl.size(1), Dv = v_cache.size(2);
  TORCH_CHECK(k_cache.size(2) == D && H % K == 0, "paged_decode: q [B, H, D] of the cache's width expected");
  auto out = torch::empty({B, H, Dv}, k_cache.options());
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 || k_cache.scalar_type() == torch::kBFloat16,
              "KV cache must be float32 or bfloat16");
  const int64_t vh = v_cache.stride(0), vs = v_cache.stride(1);
  if (k_cache.scalar_type() == torch::kFloat32) {
    decode_kernel<float>(qf.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                         sl.data_ptr<int64_t>(), ln.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, S, D, L,
                         static_cast<float>(scale), window, Dv, vh, vs);
  } else {
    using BF = c10::BFloat16;
    decode_kernel<BF>(qf.data_ptr<float>(), k_cache.data_ptr<BF>(), v_cache.data_ptr<BF>(), sl.data_ptr<int64_t>(),
                      ln.data_ptr<int64_t>(), out.data_ptr<BF>(), B, H, K, S, D, L, static_cast<float>(scale), window,
                      Dv, vh, vs);
  }
  return out;
}

torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                                int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k.size(0) == v.size(0) && k.size(1) == v.size(1),
              "prefill_attention: q [n, H, D], k [L, K, D] and v [L, K, Dv] expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "prefill_attention: float32 tensors expected");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "prefill_attention: head dim contiguous");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), L = k.size(0), K = k.size(1), Dv = v.size(2);
  TORCH_CHECK(k.size(2) == D && H % K == 0 && n <= L && n > 0, "prefill_attention: shapes do not match");
  const Views a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), q.stride(0), q.stride(1),
                k.stride(0), k.stride(1), v.stride(0), v.stride(1), n, L, H, K, D, Dv, window,
                static_cast<float>(scale)};
  auto out = torch::empty({n, H, Dv}, q.options());
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
