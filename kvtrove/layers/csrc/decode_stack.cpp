// A whole decode step of a Llama-family decoder in one call: embedding, every layer (norms, projections,
// RoPE + KV write, paged attention, a SiLU MLP or a sparse one with quantized experts) and the final
// norm, running the same kernels and ATen ops in the same order as the modules do (so the numbers are
// identical), without ~10 Python module calls per layer. float32 or bf16, whatever the tensors hold.
// At 135M parameters a decode step's Python work costs as much as a third of its kernels.
// Built once per model by `engine/fused_decode.py` from the modules' own tensors; decode steps of few
// tokens only (the kernels' range); everything else runs the modules.
#include <torch/csrc/utils/pybind.h>
#include <torch/types.h>

#include <optional>
#include <tuple>
#include <vector>

#include "expert_bank.h"
#include "ops.h"

namespace {

// A linear layer of n outputs by its kernel's packed weights: float32 / bf16 panels (float_linear.cpp),
// int8 or uint8 (int4) ones (quant_linear.cpp).
struct Linear {
  torch::Tensor w;
  c10::optional<torch::Tensor> bias;
  int64_t n;

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) return ::linear(x, w, n, bias);  // ours
    auto y = w.scalar_type() == at::kChar ? q8_linear(x, w, n) : q4_linear(x, w, n);
    if (bias) y.add_(*bias);
    return y;
  }
};

using LinearSpec = std::tuple<torch::Tensor, c10::optional<torch::Tensor>, int64_t>;

Linear make_linear(const LinearSpec& s) {
  const auto& [w, bias, n] = s;
  const auto t = w.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kChar || t == at::kByte,
              "decode_stack: a linear layer's packed weights are float32, bfloat16, int8 or uint8 (int4), not ", t);
  return Linear{w, bias, n};
}

// A sparse MLP (Mixtral, Qwen2/3-MoE; models/moe.py SparseMoE): softmax router, top-k (renormalized or
// not), the chosen quantized experts through their ExpertBank, and Qwen2-MoE's gated shared expert. The
// same ATen ops and kernels as the module, in its order, on all the step's tokens at once.
struct Moe {
  Linear router;
  int64_t top_k;
  bool norm_topk;
  const ExpertBank* bank;  // owned by the model's QuantizedExperts module, which outlives the stack
  c10::optional<Linear> shared_gate_up, shared_down, shared_gate;

  torch::Tensor operator()(const torch::Tensor& h) const {
    auto [weights, chosen] = at::topk(at::softmax(router(h), -1), top_k, -1);
    if (norm_topk) weights = weights / weights.sum(-1, true);
    const int64_t T = h.size(0);
    std::vector<torch::Tensor> rows;
    for (int64_t t = 0; t < T; ++t) {
      const auto c = chosen[t].contiguous();
      const int64_t* p = c.data_ptr<int64_t>();
      rows.push_back(bank->forward(h.narrow(0, t, 1), std::vector<int64_t>(p, p + top_k), weights[t]));
    }
    auto out = T == 1 ? rows[0] : at::cat(rows, 0);
    if (shared_gate_up) out = out + logistic((*shared_gate)(h)) * (*shared_down)(silu_mul((*shared_gate_up)(h)));
    return out;
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm;
  c10::optional<torch::Tensor> q_norm, k_norm;  // Qwen3: RMSNorm over each q / k head
  Linear qkv, o;
  c10::optional<Linear> gate_up, down;  // a dense MLP, or
  c10::optional<Moe> moe;              // a sparse one
  torch::Tensor k_cache, v_cache;  // [K, S, D]
  int64_t H, K, D, window;
  double scale;
};

}  // namespace

class DecodeStack {
 public:
  DecodeStack(torch::Tensor embed, torch::Tensor cos, torch::Tensor sin, torch::Tensor final_norm, double eps)
      : embed_(std::move(embed)), cos_(std::move(cos)), sin_(std::move(sin)), final_norm_(std::move(final_norm)),
        eps_(eps) {}

  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, c10::optional<torch::Tensor> q_norm,
                 c10::optional<torch::Tensor> k_norm, const LinearSpec& qkv, const LinearSpec& o,
                 const c10::optional<LinearSpec>& gate_up, const c10::optional<LinearSpec>& down,
                 torch::Tensor k_cache, torch::Tensor v_cache, int64_t num_heads, double scale, int64_t window) {
    TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(), "decode_stack: k/v caches [K, S, D]");
    TORCH_CHECK(gate_up.has_value() == down.has_value(), "decode_stack: a dense MLP has gate_up and down");
    Layer l{std::move(input_norm), std::move(post_norm), std::move(q_norm), std::move(k_norm), make_linear(qkv),
            make_linear(o), c10::nullopt, c10::nullopt, c10::nullopt, k_cache, v_cache, num_heads,
            k_cache.size(0), k_cache.size(2), window, scale};
    if (gate_up) {
      l.gate_up = make_linear(*gate_up);
      l.down = make_linear(*down);
    }
    layers_.push_back(std::move(l));
  }

  // The last added layer's MLP is sparse: a float router, top-k, the experts' bank, and optionally a shared
  // expert (gate/up, down) with its one-output gate.
  void set_moe(const LinearSpec& router, int64_t top_k, bool norm_topk, const ExpertBank& bank,
               const c10::optional<LinearSpec>& shared_gate_up, const c10::optional<LinearSpec>& shared_down,
               const c10::optional<LinearSpec>& shared_gate) {
    TORCH_CHECK(!layers_.empty() && !layers_.back().gate_up, "decode_stack: set_moe follows a layer without an MLP");
    TORCH_CHECK(shared_gate_up.has_value() == shared_down.has_value() &&
                    shared_gate_up.has_value() == shared_gate.has_value(),
                "decode_stack: a shared expert has gate/up, down and its gate");
    Moe m{make_linear(router), top_k, norm_topk, &bank, c10::nullopt, c10::nullopt, c10::nullopt};
    if (shared_gate_up) {
      m.shared_gate_up = make_linear(*shared_gate_up);
      m.shared_down = make_linear(*shared_down);
      m.shared_gate = make_linear(*shared_gate);
    }
    layers_.back().moe = std::move(m);
  }

  // ids, positions, slot_mapping [T]; slots [T, L], lens [T]: one decoding sequence per token. -> [T, E]
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& positions, const torch::Tensor& slot_mapping,
                        const torch::Tensor& slots, const torch::Tensor& lens) const {
    const auto cos = cos_.index_select(0, positions), sin = sin_.index_select(0, positions);
    torch::Tensor x = embed_.index_select(0, ids), residual;
    const int64_t T = x.size(0);
    for (const auto& l : layers_) {
      torch::Tensor h;
      if (!residual.defined()) {
        residual = x;
        h = add_rms_norm(x, c10::nullopt, l.input_norm, eps_);
      } else {
        h = add_rms_norm(x, residual, l.input_norm, eps_);
      }
      auto qkv = l.qkv(h);
      if (l.q_norm) {
        auto heads = qkv.view({T, l.H + 2 * l.K, l.D});
        auto q = add_rms_norm(heads.narrow(1, 0, l.H).contiguous(), c10::nullopt, *l.q_norm, eps_);
        auto k = add_rms_norm(heads.narrow(1, l.H, l.K).contiguous(), c10::nullopt, *l.k_norm, eps_);
        qkv = torch::cat({q, k, heads.narrow(1, l.H + l.K, l.K)}, 1).view({T, -1});
      }
      auto k_cache = l.k_cache, v_cache = l.v_cache;
      rope_store(qkv, cos, sin, slot_mapping, k_cache, v_cache, l.H);
      auto q = qkv.view({T, l.H + 2 * l.K, l.D}).narrow(1, 0, l.H);
      auto attn = paged_decode(q, k_cache, v_cache, slots, lens, l.scale, l.window).flatten(1);
      h = add_rms_norm(l.o(attn), residual, l.post_norm, eps_);
      TORCH_CHECK(l.gate_up || l.moe, "decode_stack: a layer without an MLP");
      x = l.moe ? (*l.moe)(h) : (*l.down)(silu_mul((*l.gate_up)(h)));
    }
    return add_rms_norm(x, residual, final_norm_, eps_);
  }

 private:
  torch::Tensor embed_, cos_, sin_, final_norm_;
  double eps_;
  std::vector<Layer> layers_;
};

void bind_decode_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<DecodeStack>(m, "DecodeStack", py::module_local())  // local: builds of other checkouts may load too
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_moe", &DecodeStack::set_moe)
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>(),
           "a decode step: ids, positions, slot_mapping [T], context slots [T, L], lens [T] -> hidden [T, E]");
}
