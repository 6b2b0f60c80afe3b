// A MoE layer's quantized experts for a decode token: its k chosen experts' gate/up projections in one
// grouped call, SiLU * up, their down projections in a second, and the weighted sum, instead of ~5
// Python calls and two parallel regions per expert (k = 8 for Qwen3-MoE: ~40 calls per layer). Each
// expert's numbers are the ones the per-expert modules compute (same kernels, same row arithmetic), and
// the sum runs in the same order. Built once per layer by `layers/quant.py` (QuantizedExperts); the
// one-call decode step (`decode_stack.cpp`) holds the same object.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "ops.h"

class ExpertBank {
 public:
  // The bank's shape: gate/up (fused) of n13 outputs and down of n2, the same for every expert.
  ExpertBank(int64_t n13, int64_t n2) : n13_(n13), n2_(n2) {}

  // One expert: the packed panels (layers/quant.py) of its gate/up and of its down projection.
  void add(torch::Tensor w13, torch::Tensor w2) {
    TORCH_CHECK(w13.scalar_type() == w2.scalar_type() && (w13.scalar_type() == at::kByte || w13.scalar_type() == at::kChar),
                "ExpertBank: int4 (uint8) or int8 panels of one kind");
    w13_.push_back(std::move(w13));
    w2_.push_back(std::move(w2));
  }

  // x [1, E]; chosen: the token's experts; weights [k] float32, in the order of `chosen`. -> [1, E]
  torch::Tensor forward(const torch::Tensor& x, const std::vector<int64_t>& chosen, const torch::Tensor& weights) const {
    const int64_t k = static_cast<int64_t>(chosen.size());
    TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && k > 0 && weights.numel() == k, "ExpertBank: one token, k weights");
    std::vector<torch::Tensor> up, down;
    for (const int64_t e : chosen) {
      TORCH_CHECK(e >= 0 && e < static_cast<int64_t>(w13_.size()), "ExpertBank: expert ", e, " out of range");
      up.push_back(w13_[e]);
      down.push_back(w2_[e]);
    }
    const auto y = q_linear_grouped(silu_mul(q_linear_grouped(x.expand({k, x.size(1)}).contiguous(), up, n13_)), down, n2_);
    // summed by ascending expert id, as the grouped path sums a batch's tokens (models/moe.py), so a
    // token's numbers do not depend on the tokens decoded with it
    std::vector<int64_t> order(k);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return chosen[a] < chosen[b]; });
    auto out = y.narrow(0, order[0], 1) * weights[order[0]];
    for (int64_t j = 1; j < k; ++j) out.add_(y.narrow(0, order[j], 1) * weights[order[j]]);
    return out;
  }

 private:
  int64_t n13_, n2_;
  std::vector<torch::Tensor> w13_, w2_;
};
