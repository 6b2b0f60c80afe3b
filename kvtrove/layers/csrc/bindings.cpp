// The Python module of kvtrove's CPU kernels: one extension, built once per machine and torch version.
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                           torch::Tensor lens, double scale, int64_t window);
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias);
torch::Tensor add_rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                           const torch::Tensor& weight, double eps);
void rope_store(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& slots,
                torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t num_heads);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& scales,
                        const torch::Tensor& mins);
torch::Tensor q4_dequantize(const torch::Tensor& qw, const torch::Tensor& scales, const torch::Tensor& mins);
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& scales);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "single-token attention over the paged KV cache");
  m.def("linear", &linear, "few-token linear layer: y = x W^T (+ b)");
  m.def("add_rms_norm", &add_rms_norm, "RMSNorm, after adding x into the residual in place when one is given");
  m.def("rope_store", &rope_store, "RoPE on q/k heads in place, then k/v into the paged cache");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("q4_linear", &q4_linear, "y = x W^T, W 4-bit per group of 32 (q * scale + min)");
  m.def("q4_dequantize", &q4_dequantize, "the float32 weight [N, K] of a 4-bit one");
  m.def("q8_linear", &q8_linear, "y = x W^T, W 8-bit per output row (q * scale)");
}
