// The kernels every translation unit may call: one declaration each (definitions in their own files).
#pragma once

#include <torch/types.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                           torch::Tensor lens, double scale, int64_t window);
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                                int64_t window, const c10::optional<torch::Tensor>& slots,
                                const c10::optional<torch::Tensor>& positions);
// w: weights packed by layers/linear.py pack_weight for n outputs
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n, const c10::optional<torch::Tensor>& bias);
torch::Tensor add_rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                           const torch::Tensor& weight, double eps);
void rope_store(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& slots,
                torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t num_heads);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor logistic(const torch::Tensor& x);  // sigmoid, the same bits wherever x sits
// packed: panels by layers/quant.py pack_int4 / pack_int8 for n outputs
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n);
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n);
torch::Tensor q_linear_grouped(const torch::Tensor& x, const std::vector<torch::Tensor>& weights, int64_t n);
