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
// prefill_attention: q [n, H, D] (float32) of the last n positions of a context of L keys and values
// (float32 or bfloat16): k [L, K, D] and v [L, K, Dv], or with `slots` [L] the rows slots[t] of k [S, K, D]
// and v [S, K, Dv] (the paged cache seen slot-major, read in place: no gathered copy). -> [n, H, Dv]
// float32. With `positions` [n] (ascending, each < L) the new tokens sit at those positions instead
// (a blended step's scattered selection): token i sees keys up to positions[i].
// MLA passes its latent cache as the keys and a view of its first Dv numbers as the values.
#include <torch/types.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace {

using kvt::V16;
using kvt::V8;

constexpr int64_t BK = 64;  // keys per block
constexpr int64_t BQ = 64;  // prefill: tokens per work item

// Rows per pass: the score pass keeps rows x 8 keys accumulators (8 lanes each), the value pass rows x
// kChunks x 16 lanes; both read each key / value row once for all their rows. The numbers of a row never
// depend on which rows share its pass.
#ifdef KVT_AVX512
constexpr int kScoreRows = 6, kValueRows = 4, kChunks = 4;  // 32 zmm registers
#elif defined(KVT_AVX2)
constexpr int kScoreRows = 1, kValueRows = 2, kChunks = 2;
#else
constexpr int kScoreRows = 1, kValueRows = 1, kChunks = 1;
#endif

// s_r[j] = q_r . k_j for keys j < n and RT rows (kvt::dot's order: lane i sums d = i mod 8 with fused
// multiply-adds in increasing d, then tree8); eight keys at a time when D % 8 == 0.
#ifdef KVT_AVX2
// The eight keys' lanes -> their scores: lane c of the result is tree8 of a[c]'s lanes.
inline __m256 tree8x8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

template <int RT, typename T>
void score_pass8(const float* const* q, const T* const* kp, int64_t j, int64_t n, int64_t D, float* const* s) {
#ifdef KVT_AVX2
  if (D % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      __m256 a[RT][8];
      for (int r = 0; r < RT; ++r)
        for (int c = 0; c < 8; ++c) a[r][c] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        __m256 qv[RT];
        for (int r = 0; r < RT; ++r) qv[r] = _mm256_loadu_ps(q[r] + d);
        for (int c = 0; c < 8; ++c) {
          const __m256 kv = kvt::load8(kp[j + c] + d).v;
          for (int r = 0; r < RT; ++r) a[r][c] = _mm256_fmadd_ps(kv, qv[r], a[r][c]);
        }
      }
      for (int r = 0; r < RT; ++r) _mm256_storeu_ps(s[r] + j, tree8x8(a[r]));
    }
  }
#endif
  for (; j < n; ++j)
    for (int r = 0; r < RT; ++r) s[r][j] = kvt::dot(kp[j], q[r], D);
}

#ifdef KVT_AVX512
// Rows in pairs, one zmm per pair and key: lanes 0-7 are the 8-lane pass of the pair's first row, lanes
// 8-15 of its second (the key's 8 numbers in both halves): the same operations at twice the width.
template <int P, typename T>
void score_pairs(const float* const* q, const T* const* kp, int64_t n, int64_t D, float* const* s) {
  int64_t j = 0;
  if (D % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      __m512 a[P][8];
      for (int p = 0; p < P; ++p)
        for (int c = 0; c < 8; ++c) a[p][c] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        __m512 qv[P];
        for (int p = 0; p < P; ++p)
          qv[p] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(q[2 * p] + d)), _mm256_loadu_ps(q[2 * p + 1] + d), 1);
        for (int c = 0; c < 8; ++c) {
          const __m512 kv = _mm512_broadcast_f32x8(kvt::load8(kp[j + c] + d).v);
          for (int p = 0; p < P; ++p) a[p][c] = _mm512_fmadd_ps(kv, qv[p], a[p][c]);
        }
      }
      for (int p = 0; p < P; ++p) {
        __m256 lo[8], hi[8];
        for (int c = 0; c < 8; ++c) {
          lo[c] = _mm512_castps512_ps256(a[p][c]);
          hi[c] = _mm512_extractf32x8_ps(a[p][c], 1);
        }
        _mm256_storeu_ps(s[2 * p] + j, tree8x8(lo));
        _mm256_storeu_ps(s[2 * p + 1] + j, tree8x8(hi));
      }
    }
  }
  for (; j < n; ++j)
    for (int r = 0; r < 2 * P; ++r) s[r][j] = kvt::dot(kp[j], q[r], D);
}
#endif

template <int RT, typename T>
void score_pass(const float* const* q, const T* const* kp, int64_t n, int64_t D, float* const* s) {
#ifdef KVT_AVX512
  if constexpr (RT > 1) {
    score_pairs<RT / 2>(q, kp, n, D, s);
    if constexpr (RT % 2 == 1) score_pass8<1>(q + RT - 1, kp, 0, n, D, s + RT - 1);
    return;
  }
#endif
  score_pass8<RT>(q, kp, 0, n, D, s);
}

// o_r[d, d + 16C) = sum_{j < n} p_r[j] v_j[d ..] for RT rows, fused multiply-adds in increasing j.
template <int RT, int C, typename T>
inline void value_pass(const float* const* p, int64_t n, const T* const* vp, int64_t d, float* const* o) {
  V16 a[RT][C];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = kvt::zero16();
  for (int64_t j = 0; j < n; ++j) {
    V16 v[C];
    for (int c = 0; c < C; ++c) v[c] = kvt::load16(vp[j] + d + 16 * c);
    for (int r = 0; r < RT; ++r) {
      const V16 pj = kvt::set16(p[r][j]);
      for (int c = 0; c < C; ++c) a[r][c] = kvt::fma16(pj, v[c], a[r][c]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < C; ++c) kvt::store16(o[r] + d + 16 * c, a[r][c]);
}

// o_r = sum_{j < n} p_r[j] v_j (Dv numbers) for RT rows. Lanes are independent, so the width of a pass
// never changes a number: the scalar tail runs the same fused multiply-adds.
template <int RT, typename T>
void values(const float* const* p, int64_t n, const T* const* vp, int64_t Dv, float* const* o) {
  int64_t d = 0;
  for (; d + 16 * kChunks <= Dv; d += 16 * kChunks) value_pass<RT, kChunks>(p, n, vp, d, o);
  for (; d + 16 <= Dv; d += 16) value_pass<RT, 1>(p, n, vp, d, o);
  for (; d < Dv; ++d)
    for (int r = 0; r < RT; ++r) {
      float a = 0.f;
      for (int64_t j = 0; j < n; ++j) a = std::fma(p[r][j], kvt::to_f(vp[j][d]), a);
      o[r][d] = a;
    }
}

// Runs f(std::integral_constant<int, RT>, first row) over `rows` rows in passes of at most R rows.
template <int R, class F>
inline void in_passes(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) f(std::integral_constant<int, R>{}, r);
  if constexpr (R > 1) {
    if (r < rows) in_passes<R - 1>(rows - r, [&](auto rt, int64_t i) { f(rt, r + i); });
  }
}

// One row's weights over a block from its scores s[0, BK) and allowed keys [c0, c1) (c0 < c1): max m,
// p[j] = exp(s_j - m) inside [c0, c1) and exactly 0 elsewhere (scores outside become -inf; s is scratch),
// and their sum l (8 lanes in increasing j, then tree8).
inline void weights(float* s, int64_t c0, int64_t c1, float* p, float& m_out, float& l_out) {
  V8 mv = kvt::set8(-INFINITY);
  for (int64_t c = 0; c < BK; c += 8) {
    const V8 v = kvt::outside8(kvt::load8(s + c), c, c0, c1, -INFINITY);
    kvt::store8(s + c, v);
    mv = kvt::max8(mv, v);
  }
  const float m = kvt::hmax8(mv);
  const V8 neg = kvt::set8(-m);
  V8 l = kvt::zero8();
  for (int64_t c = 0; c < BK; c += 8) {
    const V8 e = kvt::exp8(kvt::add8(kvt::load8(s + c), neg));
    kvt::store8(p + c, e);
    l = kvt::add8(l, e);
  }
  m_out = m;
  l_out = kvt::tree8(l);
}

// One row's result over one block (o: Dv floats owned by the caller).
struct Partial {
  float m, l;
  float* o;
};

// Partials of `rows` rows over one block of n keys: row r has the pre-scaled query q[r], allowed keys
// [c0[r], c1[r]) (c0 < c1 <= n) and writes part[r] (its o included). Keys past a row's c1 enter its
// weighted sum with weight exactly 0, which leaves the sum's bits unchanged. s, p: rows x BK scratch.
template <typename T>
void block_partials(const float* const* q, int64_t rows, const int64_t* c0, const int64_t* c1, const T* const* kp,
                    const T* const* vp, int64_t n, int64_t D, int64_t Dv, float* s, float* p, Partial* part) {
  std::vector<float*> sr(rows), pr(rows), orow(rows);
  for (int64_t r = 0; r < rows; ++r) {
    sr[r] = s + r * BK;
    pr[r] = p + r * BK;
    orow[r] = part[r].o;
  }
  in_passes<kScoreRows>(rows, [&](auto rt, int64_t r) {
    constexpr int RT = decltype(rt)::value;
    int64_t hi = 0;
    for (int i = 0; i < RT; ++i) hi = std::max(hi, c1[r + i]);
    score_pass<RT>(q + r, kp, hi, D, sr.data() + r);
  });
  for (int64_t r = 0; r < rows; ++r) weights(sr[r], c0[r], c1[r], pr[r], part[r].m, part[r].l);
  in_passes<kValueRows>(rows, [&](auto rt, int64_t r) {
    constexpr int RT = decltype(rt)::value;
    int64_t hi = 0;
    for (int i = 0; i < RT; ++i) hi = std::max(hi, c1[r + i]);
    values<RT>(pr.data() + r, hi, vp, Dv, orow.data() + r);
  });
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
    std::vector<float> qs(G * D), s(G * BK), p(G * BK);
    std::vector<const T*> kp(BK), vp(BK);
    std::vector<const float*> qr(G);
    std::vector<int64_t> lo_r(G), hi_r(G);
    std::vector<Partial> pt(G);
    for (int64_t g = 0; g < G; ++g) qr[g] = qs.data() + g * D;
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
        lo_r[g] = c0;
        hi_r[g] = cnt;
        pt[g].o = part_o.data() + (idx * G + g) * Dv;
      }
      block_partials(qr.data(), G, lo_r.data(), hi_r.data(), kp.data(), vp.data(), cnt, D, Dv, s.data(), p.data(),
                     pt.data());
      for (int64_t g = 0; g < G; ++g) {
        part_m[idx * G + g] = pt[g].m;
        part_l[idx * G + g] = pt[g].l;
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

template <typename T>
struct Views {
  const float* q;
  const T *k, *v;
  const int64_t* slots;  // key position t lies in row slots[t] of k and v (nullptr: row t)
  const int64_t* positions;  // new token t is at positions[t] (nullptr: at L - n + t)
  int64_t qs_t, qs_h, ks_t, ks_h, vs_t, vs_h;  // strides (elements) over tokens (rows) and heads
  int64_t n, L, H, K, D, Dv, window;  // D: the query / key width, Dv: the value width
  float scale;
  int64_t row(int64_t t) const { return slots != nullptr ? slots[t] : t; }
  int64_t pos(int64_t t) const { return positions != nullptr ? positions[t] : L - n + t; }
};

// The query rows of KV head h and new tokens [t0, t1), each token with its G query heads (row r =
// (t - t0) * G + g): pre-scaled queries, each row's allowed keys [lo, hi), and the running merge of its
// blocks so far (m, l, o; `started` once a block had an allowed key).
struct Rows {
  int64_t h, count;
  std::vector<float> q, o, m, l;
  std::vector<int64_t> lo, hi;
  std::vector<char> started;
  template <typename T>
  Rows(const Views<T>& a, int64_t h_, int64_t t0, int64_t t1) : h(h_), count((t1 - t0) * (a.H / a.K)) {
    const int64_t G = a.H / a.K;
    q.resize(count * a.D);
    o.resize(count * a.Dv);
    m.resize(count);
    l.resize(count);
    lo.resize(count);
    hi.resize(count);
    started.assign(count, 0);
    for (int64_t r = 0; r < count; ++r) {
      const int64_t t = t0 + r / G, g = r % G, pos = a.pos(t);
      const float* src = a.q + t * a.qs_t + (h * G + g) * a.qs_h;
      for (int64_t d = 0; d < a.D; ++d) q[r * a.D + d] = src[d] * a.scale;
      hi[r] = pos + 1;
      lo[r] = a.window > 0 ? std::max<int64_t>(0, pos - a.window + 1) : 0;
    }
  }
  int64_t first_block() const { return lo[0] / BK; }  // rows are in position order
  int64_t end_block() const { return (hi[count - 1] + BK - 1) / BK; }
};

// Per-thread scratch of `block_of`.
template <typename T>
struct BlockScratch {
  std::vector<const T*> kp, vp;
  std::vector<const float*> qr;
  std::vector<int64_t> c0, c1;
  std::vector<float> s, p;
  explicit BlockScratch(int64_t rows) : kp(BK), vp(BK), qr(rows), c0(rows), c1(rows), s(rows * BK), p(rows * BK) {}
};

// The partials over key block c of the rows that have an allowed key in it: their indices go to
// `active`, their partials to part[i] (o at ob + i * Dv); returns how many.
template <typename T>
int64_t block_of(const Views<T>& a, const Rows& rw, int64_t c, BlockScratch<T>& sc, float* ob, Partial* part,
                 int64_t* active) {
  const int64_t kb = c * BK, n = std::min(BK, a.L - kb);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t row = a.row(kb + j);
    sc.kp[j] = a.k + row * a.ks_t + rw.h * a.ks_h;
    sc.vp[j] = a.v + row * a.vs_t + rw.h * a.vs_h;
  }
  int64_t na = 0;
  for (int64_t r = 0; r < rw.count; ++r) {
    const int64_t b0 = std::max<int64_t>(rw.lo[r] - kb, 0), b1 = std::min<int64_t>(rw.hi[r] - kb, n);
    if (b0 >= b1) continue;
    active[na] = r;
    sc.c0[na] = b0;
    sc.c1[na] = b1;
    sc.qr[na] = rw.q.data() + r * a.D;
    part[na].o = ob + na * a.Dv;
    ++na;
  }
  block_partials(sc.qr.data(), na, sc.c0.data(), sc.c1.data(), sc.kp.data(), sc.vp.data(), n, a.D, a.Dv, sc.s.data(),
                 sc.p.data(), part);
  return na;
}

// Row r's running state merged with the next block's partial b.
inline void merge_into(Rows& rw, int64_t r, const Partial& b, int64_t Dv) {
  Partial st{rw.m[r], rw.l[r], rw.o.data() + r * Dv};
  merge(st, b, Dv, !rw.started[r]);
  rw.started[r] = 1;
  rw.m[r] = st.m;
  rw.l[r] = st.l;
}

template <typename T>
void finish_rows(const Views<T>& a, Rows& rw, int64_t t0, float* out) {
  const int64_t G = a.H / a.K;
  for (int64_t r = 0; r < rw.count; ++r) {
    const int64_t t = t0 + r / G, g = r % G;
    finish(Partial{rw.m[r], rw.l[r], rw.o.data() + r * a.Dv}, a.Dv,
           out + (t * a.H + rw.h * G + g) * a.Dv);
  }
}

// One work item: KV head h, new tokens [t0, t1); its key blocks in order, each merged as it comes.
template <typename T>
void attend_block(const Views<T>& a, int64_t h, int64_t t0, int64_t t1, float* out) {
  Rows rw(a, h, t0, t1);
  BlockScratch<T> sc(rw.count);
  std::vector<float> ob(rw.count * a.Dv);
  std::vector<Partial> part(rw.count);
  std::vector<int64_t> active(rw.count);
  for (int64_t c = rw.first_block(); c < rw.end_block(); ++c) {
    const int64_t na = block_of(a, rw, c, sc, ob.data(), part.data(), active.data());
    for (int64_t i = 0; i < na; ++i) merge_into(rw, active[i], part[i], a.Dv);
  }
  finish_rows(a, rw, t0, out);
}

constexpr int64_t MIN_TQ = 4;  // tokens per work item at least (rows enough for the passes)

template <typename T>
void prefill_kernel(const Views<T>& a, float* o) {
  // Items (KV head, token block), costliest first (later blocks see more keys), handed out one at a time:
  // static splits would give one thread all the long rows. Few new tokens (a prefix hit's last block, a
  // chat turn) come in smaller blocks, so that every thread has work; a row's numbers never depend on
  // which rows share its item.
  const int64_t threads = at::get_num_threads(), wanted = (2 * threads + a.K - 1) / a.K;
  const int64_t tq = std::min(BQ, std::max(MIN_TQ, (a.n + wanted - 1) / wanted));
  const int64_t blocks = (a.n + tq - 1) / tq, items = a.K * blocks;
  std::vector<int64_t> order(items);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return x % blocks > y % blocks; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(items, threads), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < items; i = next++) {
      const int64_t h = order[i] / blocks, b = order[i] % blocks;
      attend_block(a, h, b * tq, std::min(a.n, (b + 1) * tq), o);
    }
  });
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
                                int64_t window, const c10::optional<torch::Tensor>& slots,
                                const c10::optional<torch::Tensor>& positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k.size(0) == v.size(0) && k.size(1) == v.size(1),
              "prefill_attention: q [n, H, D], k [L, K, D] and v [L, K, Dv] expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "prefill_attention: float32 queries expected");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "prefill_attention: float32 or bfloat16 keys and values (of one dtype) expected");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "prefill_attention: head dim contiguous");
  const int64_t rows = k.size(0);
  torch::Tensor sl;
  if (slots.has_value()) {
    sl = slots->contiguous();
    TORCH_CHECK(sl.dim() == 1 && sl.scalar_type() == at::kLong, "prefill_attention: slots [L] int64 expected");
    const int64_t* p = sl.data_ptr<int64_t>();
    TORCH_CHECK(std::all_of(p, p + sl.size(0), [&](int64_t s) { return s >= 0 && s < rows; }),
                "prefill_attention: a slot outside the ", rows, " rows of k and v");
  }
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), L = slots.has_value() ? sl.size(0) : rows;
  const int64_t K = k.size(1), Dv = v.size(2);
  TORCH_CHECK(k.size(2) == D && H % K == 0 && n <= L && n > 0, "prefill_attention: shapes do not match");
  torch::Tensor ps;
  if (positions.has_value()) {
    ps = positions->contiguous();
    TORCH_CHECK(ps.dim() == 1 && ps.scalar_type() == at::kLong && ps.size(0) == n,
                "prefill_attention: positions [n] int64 expected");
    const int64_t* p = ps.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < L && (i == 0 || p[i] > p[i - 1]),
                  "prefill_attention: positions must ascend within the context of ", L);
  }
  auto out = torch::empty({n, H, Dv}, q.options());
  const int64_t* sp = slots.has_value() ? sl.data_ptr<int64_t>() : nullptr;
  const int64_t* pp = positions.has_value() ? ps.data_ptr<int64_t>() : nullptr;
  if (k.scalar_type() == at::kFloat) {
    prefill_kernel(Views<float>{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), sp, pp, q.stride(0),
                                q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), n, L, H, K, D, Dv,
                                window, static_cast<float>(scale)},
                   out.data_ptr<float>());
  } else {
    using BF = c10::BFloat16;
    prefill_kernel(Views<BF>{q.data_ptr<float>(), k.data_ptr<BF>(), v.data_ptr<BF>(), sp, pp, q.stride(0), q.stride(1),
                             k.stride(0), k.stride(1), v.stride(0), v.stride(1), n, L, H, K, D, Dv, window,
                             static_cast<float>(scale)},
                   out.data_ptr<float>());
  }
  return out;
}
