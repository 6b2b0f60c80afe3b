// Single-token attention read straight from the paged KV cache: no gathered copy of the context.
// q [B, H, D]; k_cache, v_cache [K, S, D] (head-major slots); slots [B, L] int64; lens [B] int64.
// Returns [B, H, D] in the cache dtype. Scores, softmax and the weighted sum run in float32. Built with
// -ffast-math; nothing here produces or reads inf/NaN.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

// scores[g * L + t] = scale * q_g . k_t for t in [first, n). With AVX2 and D % 8 == 0, eight keys at a
// time: eight independent FMA chains, then one transpose-reduce instead of eight horizontal sums.
template <typename T>
static void qk_scores(const float* qb, const T* kc, const int64_t* slot, int64_t first, int64_t n, int64_t G,
                      int64_t D, int64_t L, float scale, float* scores) {
  int64_t t = first;
#ifdef KVT_AVX2
  if (D % 8 == 0) {
    const __m256 sv = _mm256_set1_ps(scale);
    for (; t + 8 <= n; t += 8) {
      const T* kp[8];
      for (int j = 0; j < 8; ++j) kp[j] = kc + slot[t + j] * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qb + g * D;
        __m256 a[8];
        for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qg + d);
          for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(kvt::load8(kp[j] + d), qv, a[j]);
        }
        const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
        _mm256_storeu_ps(scores + g * L + t, _mm256_mul_ps(sum, sv));
      }
    }
  }
#endif
  for (; t < n; ++t) {
    const T* kp = kc + slot[t] * D;
    for (int64_t g = 0; g < G; ++g) scores[g * L + t] = kvt::dot(kp, qb + g * D, D) * scale;
  }
}

constexpr int64_t CHUNK = 128;  // context positions per work item

// Work items are (sequence, KV head, chunk of CHUNK positions): one sequence's few KV heads alone would
// leave cores idle (SmolLM2: 3 heads on 2 cores). Each item leaves its scores' max, the sum of their
// exponentials and its unnormalized G x D output; a second pass merges a head's chunks in order, so
// the result does not depend on the number of threads.
template <typename T>
static void decode_kernel(const float* q, const T* kc, const T* vc, const int64_t* slots, const int64_t* lens,
                          T* out, int64_t B, int64_t H, int64_t K, int64_t S, int64_t D, int64_t L, float scale,
                          int64_t window) {
  const int64_t G = H / K;  // query heads sharing one KV head: each K/V row is read once for all of them
  const int64_t chunks = (L + CHUNK - 1) / CHUNK, items = B * K * chunks;
  std::vector<float> part_m(items * G), part_l(items * G), part_o(items * G * D);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * CHUNK);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (K * chunks), h = idx / chunks % K, c = idx % chunks, n = lens[b];
      const int64_t first = window > 0 && n > window ? n - window : 0;
      const int64_t t0 = std::max(first, c * CHUNK), t1 = std::min(n, (c + 1) * CHUNK), cnt = t1 - t0;
      float* pm = part_m.data() + idx * G;
      float* pl = part_l.data() + idx * G;
      float* po = part_o.data() + idx * G * D;
      std::fill(po, po + G * D, 0.f);
      if (cnt <= 0) {  // outside the context or the window: weight zero in the merge
        std::fill(pm, pm + G, -std::numeric_limits<float>::max());
        std::fill(pl, pl + G, 0.f);
        continue;
      }
      const float* qb = q + (b * H + h * G) * D;
      qk_scores(qb, kc + h * S * D, slots + b * L + t0, 0, cnt, G, D, CHUNK, scale, scores.data());
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * CHUNK;
        float mx = sg[0];  // no infinities anywhere: the build uses -ffast-math
        for (int64_t t = 1; t < cnt; ++t) mx = std::max(mx, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < cnt; ++t) sum += (sg[t] = std::exp(sg[t] - mx));
        pm[g] = mx;
        pl[g] = sum;
      }
      for (int64_t t = 0; t < cnt; ++t) {
        const T* vp = vc + (h * S + slots[b * L + t0 + t]) * D;
        for (int64_t g = 0; g < G; ++g) kvt::axpy(scores[g * CHUNK + t], vp, po + g * D, D);
      }
    }
  });
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t g = 0; g < G; ++g) {
        float mx = -std::numeric_limits<float>::max();
        for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, part_m[(bh * chunks + c) * G + g]);
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t i = (bh * chunks + c) * G + g;
          const float w = std::exp(part_m[i] - mx);
          sum += w * part_l[i];
          kvt::axpy(w, part_o.data() + i * D, acc.data(), D);
        }
        T* ob = out + (bh * G + g) * D;  // bh = b * K + h: query heads h * G .. of sequence b
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < D; ++d) ob[d] = static_cast<T>(acc[d] * inv);
      }
    }
  });
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                           torch::Tensor lens, double scale, int64_t window) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  auto qf = q.to(torch::kFloat32).contiguous();
  auto sl = slots.contiguous();
  auto ln = lens.contiguous();
  const int64_t B = qf.size(0), H = qf.size(1), D = qf.size(2);
  const int64_t K = k_cache.size(0), S = k_cache.size(1), L = sl.size(1);
  auto out = torch::empty({B, H, D}, k_cache.options());
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 || k_cache.scalar_type() == torch::kBFloat16,
              "KV cache must be float32 or bfloat16");
  const bool f32 = k_cache.scalar_type() == torch::kFloat32;
  if (f32) {
    decode_kernel<float>(qf.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                         sl.data_ptr<int64_t>(), ln.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, S, D, L,
                         static_cast<float>(scale), window);
  } else {
    decode_kernel<c10::BFloat16>(qf.data_ptr<float>(), k_cache.data_ptr<c10::BFloat16>(),
                                 v_cache.data_ptr<c10::BFloat16>(), sl.data_ptr<int64_t>(), ln.data_ptr<int64_t>(),
                                 out.data_ptr<c10::BFloat16>(), B, H, K, S, D, L, static_cast<float>(scale),
                                 window);
  }
  return out;
}
