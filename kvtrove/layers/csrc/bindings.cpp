// The Python module of kvtrove's CPU kernels: one extension, built once per machine and torch version.
#include <torch/csrc/utils/pybind.h>  // pybind11 with torch's type casters, without torch/extension.h's
#include <torch/types.h>              // whole C++ frontend (a third of the build time)

#include "ops.h"

void bind_decode_stack(pybind11::module& m);
void bind_expert_bank(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "single-token attention over the paged KV cache");
  m.def("prefill_attention", &prefill_attention, "causal attention of a prefill's new tokens over their context",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("scale"), pybind11::arg("window"),
        pybind11::arg("slots") = pybind11::none(), pybind11::arg("positions") = pybind11::none());
  m.def("linear", &linear, "linear layer: y = x W^T (+ b), one arithmetic for any number of tokens");
  m.def("add_rms_norm", &add_rms_norm, "RMSNorm, after adding x into the residual in place when one is given");
  m.def("rope_store", &rope_store, "RoPE on q/k heads in place, then k/v into the paged cache");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("sigmoid", &logistic, "1 / (1 + exp(-x)), the same bits wherever x sits in the tensor");
  m.def("q4_linear", &q4_linear, "y = x W^T, W 4-bit per group of 32 (q * scale + min), packed panels for n outputs");
  m.def("q8_linear", &q8_linear, "y = x W^T, W 8-bit with a scale per 32 (q * scale), packed panels for n outputs");
  m.def("q_linear_grouped", &q_linear_grouped, "y[e] = x[e] W_e^T, one int4 or int8 weight (packed, n outputs) per row of x");
  bind_decode_stack(m);
  bind_expert_bank(m);
}
