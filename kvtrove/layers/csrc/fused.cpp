// The elementwise work between a decoder layer's matmuls, each fused into one pass. At decode time a
// layer's matmuls take tens of microseconds, and a chain of ~30 small torch ops around them costs as
// much again; these three kernels replace that chain. Math in float32, rounding to the tensor dtype
// where Hugging Face's Llama rounds (so float32 results equal the torch path up to summation order).
#include <torch/types.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec.h"

namespace {

using kvt::to_f;

template <typename T>
inline float round_to(float v) {  // the value as stored in T, back in float32
  return static_cast<float>(static_cast<T>(v));
}

// residual += x (when given), then out = weight * to_T(r * rsqrt(mean(r^2) + eps)); r is the residual.
template <typename T>
void add_rms_norm_kernel(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t E, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> h(E);
    for (int64_t r = r0; r < r1; ++r) {
      T* res = residual + r * E;
      for (int64_t e = 0; e < E; ++e) {
        float v = to_f(res[e]);
        if (x != nullptr) {
          v = round_to<T>(v + to_f(x[r * E + e]));
          res[e] = static_cast<T>(v);
        }
        h[e] = v;
      }
      const float ss = kvt::dot(h.data(), h.data(), E);  // the fixed order (vec.h)
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(E) + eps);
      T* o = out + r * E;
      for (int64_t e = 0; e < E; ++e) o[e] = static_cast<T>(to_f(weight[e]) * round_to<T>(h[e] * inv));
    }
  });
}

// In place on qkv [T, (H + 2K) * D]: rotate the H query and K key heads (rotate-half RoPE; `sin` has the
// sign of the first half folded in; cos/sin [T, D] are each token's rows), then copy each token's rotated keys and its values into the cache.
template <typename T>
void rope_store_kernel(T* qkv, const T* cos, const T* sin, const int64_t* slots, T* k_cache,
                       T* v_cache, int64_t tokens, int64_t H, int64_t K, int64_t D, int64_t S) {
  const int64_t half = D / 2, width = (H + 2 * K) * D;
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> tmp(D);
    for (int64_t t = t0; t < t1; ++t) {
      const T* c = cos + t * D;
      const T* s = sin + t * D;
      T* row = qkv + t * width;
      for (int64_t h = 0; h < H + K; ++h) {
        T* x = row + h * D;
        for (int64_t d = 0; d < D; ++d) tmp[d] = to_f(x[d]);
        for (int64_t d = 0; d < D; ++d) {
          const float rolled = tmp[d < half ? d + half : d - half];
          x[d] = static_cast<T>(tmp[d] * to_f(c[d]) + rolled * to_f(s[d]));
        }
      }
      const int64_t slot = slots[t];
      for (int64_t h = 0; h < K; ++h) {
        std::copy_n(row + (H + h) * D, D, k_cache + (h * S + slot) * D);
        std::copy_n(row + (H + K + h) * D, D, v_cache + (h * S + slot) * D);
      }
    }
  });
}

// out [T, I] = silu(gate) * up with gate_up [T, 2I] = [gate | up].
template <typename T>
void silu_mul_kernel(const T* gu, T* out, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * 2 * I;
      const T* u = g + I;
      T* o = out + r * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {  // exp8 and exp1 give the same bits: the tail may take either
        const kvt::V8 gv = kvt::load8(g + i);
        const kvt::V8 e = kvt::exp8(kvt::mul8(gv, kvt::set8(-1.f)));
        const kvt::V8 s = kvt::round8<T>(kvt::div8(gv, kvt::add8(kvt::set8(1.f), e)));
        kvt::store8(o + i, kvt::mul8(s, kvt::load8(u + i)));
      }
      for (; i < I; ++i) {
        const float gv = to_f(g[i]);
        o[i] = static_cast<T>(round_to<T>(gv / (1.f + kvt::exp1(-gv))) * to_f(u[i]));
      }
    }
  });
}

// out = 1 / (1 + exp(-x)), the same bits at any position of any tensor (torch's differs between its
// vector body and its scalar tail, so a token's value would depend on how many tokens share the call).
template <typename T>
void sigmoid_kernel(const T* x, T* out, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = static_cast<T>(1.f / (1.f + kvt::exp1(-to_f(x[i]))));
  });
}

template <typename F>
void dispatch(at::ScalarType dtype, const char* what, F&& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else if (dtype == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    TORCH_CHECK(false, what, ": float32 or bfloat16 expected");
  }
}

}  // namespace

torch::Tensor add_rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                           const torch::Tensor& weight, double eps) {
  // No residual: out = norm(x). With one: residual += x in place, out = norm(residual).
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "add_rms_norm: contiguous x and weight of one dtype expected");
  const int64_t E = x.size(-1), rows = x.numel() / E;
  TORCH_CHECK(weight.numel() == E, "add_rms_norm: weight of size ", E, " expected");
  auto out = torch::empty_like(x);
  dispatch(x.scalar_type(), "add_rms_norm", [&](auto v) {
    using T = decltype(v);
    if (residual) {
      TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() &&
                      residual->scalar_type() == x.scalar_type(),
                  "add_rms_norm: residual must match x");
      add_rms_norm_kernel<T>(x.data_ptr<T>(), residual->data_ptr<T>(), weight.data_ptr<T>(), out.data_ptr<T>(), rows,
                             E, static_cast<float>(eps));
    } else {
      add_rms_norm_kernel<T>(nullptr, const_cast<T*>(x.data_ptr<T>()), weight.data_ptr<T>(), out.data_ptr<T>(), rows,
                             E, static_cast<float>(eps));
    }
  });
  return out;
}

void rope_store(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& slots, torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t num_heads) {
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "rope_store: contiguous tensors expected");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "rope_store: int64 slots expected");
  const int64_t K = k_cache.size(0), S = k_cache.size(1), D = k_cache.size(2), T = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (num_heads + 2 * K) * D && D % 2 == 0,
              "rope_store: qkv [T, (H + 2K) * D] expected");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == T && cos.size(1) == D, "rope_store: cos/sin [T, D] expected");
  TORCH_CHECK(slots.numel() == T, "rope_store: one slot per token");
  auto sl = slots.contiguous();
  dispatch(qkv.scalar_type(), "rope_store", [&](auto v) {
    using T_ = decltype(v);
    TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && k_cache.scalar_type() == qkv.scalar_type(),
                "rope_store: one dtype expected");
    rope_store_kernel<T_>(qkv.data_ptr<T_>(), cos.data_ptr<T_>(), sin.data_ptr<T_>(), sl.data_ptr<int64_t>(), k_cache.data_ptr<T_>(), v_cache.data_ptr<T_>(), T, num_heads, K, D,
                          S);
  });
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "silu_mul: contiguous [T, 2I] expected");
  const int64_t rows = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({rows, I}, gate_up.options());
  dispatch(gate_up.scalar_type(), "silu_mul", [&](auto v) {
    using T = decltype(v);
    silu_mul_kernel<T>(gate_up.data_ptr<T>(), out.data_ptr<T>(), rows, I);
  });
  return out;
}

torch::Tensor logistic(const torch::Tensor& x) {
  const auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  dispatch(xc.scalar_type(), "sigmoid", [&](auto v) {
    using T = decltype(v);
    sigmoid_kernel<T>(xc.data_ptr<T>(), out.data_ptr<T>(), xc.numel());
  });
  return out;
}
