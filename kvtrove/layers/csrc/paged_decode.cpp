// Single-token attention read straight from the paged KV cache: no gathered copy of the context.
// q [B, H, D]; k_cache, v_cache [K, S, D] (head-major slots); slots [B, L] int64; lens [B] int64.
// Returns [B, H, D] in the cache dtype. Scores, softmax and the weighted sum run in float32. Built with
// -ffast-math; nothing here produces or reads inf/NaN.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec.h"

template <typename T>
static void decode_kernel(const float* q, const T* kc, const T* vc, const int64_t* slots, const int64_t* lens,
                          T* out, int64_t B, int64_t H, int64_t K, int64_t S, int64_t D, int64_t L, float scale,
                          int64_t window) {
  const int64_t G = H / K;  // query heads sharing one KV head: each K/V row is read once for all of them
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * L);
    std::vector<float> acc(G * D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / K, h = idx % K, n = lens[b];
      const int64_t first = window > 0 && n > window ? n - window : 0;
      const float* qb = q + (b * H + h * G) * D;
      for (int64_t t = first; t < n; ++t) {
        const T* kp = kc + (h * S + slots[b * L + t]) * D;
        for (int64_t g = 0; g < G; ++g) scores[g * L + t] = kvt::dot(kp, qb + g * D, D) * scale;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float mx = sg[first];  // no infinities anywhere: the build uses -ffast-math
        for (int64_t t = first + 1; t < n; ++t) mx = std::max(mx, sg[t]);
        float sum = 0.f;
        for (int64_t t = first; t < n; ++t) sum += (sg[t] = std::exp(sg[t] - mx));
        const float inv = 1.f / sum;
        for (int64_t t = first; t < n; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < n; ++t) {
        const T* vp = vc + (h * S + slots[b * L + t]) * D;
        for (int64_t g = 0; g < G; ++g) kvt::axpy(scores[g * L + t], vp, acc.data() + g * D, D);
      }
      T* ob = out + (b * H + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) ob[i] = static_cast<T>(acc[i]);
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
