"""Mixture-of-experts decoders on the Llama-family body: Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE.

Only the MLP changes: a router picks `top_k` experts per token, and tokens are grouped per expert so
each chosen expert runs one matmul pair per step over all its tokens (not one per token). Experts are
stacked ([E, 2I, E_h] gate+up, [E, E_h, I] down) and loaded from the checkpoints' per-expert tensors
(HF names: `experts.<e>.w1/w3/w2` for Mixtral, `experts.<e>.gate_proj/up_proj/down_proj` for Qwen).

Legend: T = tokens, E_h = hidden size, I = expert intermediate size, X = experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtrove.layers.linear import pack_weight
from kvtrove.models.llama import LlamaForCausalLM, LlamaMLP

# checkpoint leaf name -> (stacked parameter, row block): gate and up share w13, down is w2
EXPERT_LEAVES = {
    "w1": ("w13", 0),
    "w3": ("w13", 1),
    "w2": ("w2", 0),
    "gate_proj": ("w13", 0),
    "up_proj": ("w13", 1),
    "down_proj": ("w2", 0),
}


class Experts(nn.Module):
    """`num_experts` SiLU-gated MLPs, stacked."""

    def __init__(self, num_experts: int, hidden: int, inter: int, top_k: int, leaves: tuple[str, str, str]):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)
        self.inter, self.hidden = inter, hidden
        self.packed = None
        """(w13, w2) in the linear kernel's layout, once `pack_for_kernels` ran (the float stacks are then gone)."""
        self.leaves = leaves
        """The checkpoint's names for gate, up and down."""

    def active_params(self) -> int:
        """Weights one token runs through (its `top_k` experts), for the recompute cost."""
        return 3 * self.inter * self.hidden * self.top_k

    def load_expert(self, expert: int, leaf: str, tensor: torch.Tensor) -> None:
        target, block = EXPERT_LEAVES[leaf]
        dest = getattr(self, target)[expert]
        if target == "w13":
            dest = dest[block * self.inter : (block + 1) * self.inter]
        if tensor.shape != dest.shape:
            raise ValueError(f"expert {expert} {leaf} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor)

    kernels = None  # kvtrove's C++ CPU kernels, bound by `use_cpu_kernels`

    def pack_for_kernels(self) -> None:
        self.packed = pack_weight(self.w13), pack_weight(self.w2)
        del self.w13, self.w2

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:  # one arithmetic for any number of tokens (csrc/float_linear.cpp)
            k, (w13, w2) = self.kernels, self.packed
            return k.linear(k.silu_mul(k.linear(x, w13[e], 2 * self.inter, None)), w2[e], self.hidden, None)
        gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return run_grouped(self.expert, self.num_experts, x, weights, chosen)


def run_grouped(expert, num_experts: int, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor):
    """sum_j weights[t, j] * expert(chosen[t, j], x[t]) for every token t, one `expert(e, rows)` call per
    chosen expert. x [T, E_h]; weights, chosen [T, k]. A token's experts are summed by ascending expert id
    however many tokens run together, so its numbers do not depend on the batch."""
    if x.shape[0] == 1:  # one token (decode): no grouping to do
        out = None
        for e, w in sorted(zip(chosen[0].tolist(), weights[0].unbind()), key=lambda ew: ew[0]):
            y = expert(e, x) * w.to(x.dtype)
            out = y if out is None else out.add_(y)
        return out
    k = chosen.shape[1]
    flat = chosen.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token_of = order // k
    w_sorted = weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        rows = token_of[start : start + n]
        y = expert(e, x[rows])
        out.index_add_(0, rows, y * w_sorted[start : start + n].to(y.dtype))
        start += n
    return out


class SparseMoE(nn.Module):
    kernels = None  # kvtrove's C++ CPU kernels, bound by `use_cpu_kernels`

    def __init__(self, cfg):
        super().__init__()
        mixtral = cfg.model_type == "mixtral"
        self.num_experts = cfg.num_local_experts if mixtral else cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk = True if mixtral else bool(getattr(cfg, "norm_topk_prob", False))
        inter = cfg.intermediate_size if mixtral else cfg.moe_intermediate_size
        self.gate = nn.Linear(cfg.hidden_size, self.num_experts, bias=False)
        leaves = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        self.experts = Experts(self.num_experts, cfg.hidden_size, inter, self.top_k, leaves)
        shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
        self.shared_expert = LlamaMLP(cfg, shared) if shared else None
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, weights.to(x.dtype), chosen)
        if self.shared_expert is not None:
            gate = self.shared_expert_gate(x)
            k = self.kernels
            out = out + (torch.sigmoid(gate) if k is None else k.sigmoid(gate)) * self.shared_expert(x)
        return out


def is_sparse(cfg, layer: int) -> bool:
    if cfg.model_type == "mixtral":
        return True
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return layer not in (getattr(cfg, "mlp_only_layers", None) or []) and (layer + 1) % step == 0


class MoEForCausalLM(LlamaForCausalLM):
    renames = {".block_sparse_moe.": ".mlp."}

    @staticmethod
    def make_mlp(cfg, layer: int) -> nn.Module:
        return SparseMoE(cfg) if is_sparse(cfg, layer) else LlamaMLP(cfg)
