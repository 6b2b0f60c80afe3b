"""MoE decode on the CPU against its memory-bandwidth bound. Run: `python -m bench.moe`.

MoE layers shaped like Qwen3-30B-A3B's (hidden 2048, 128 experts of 768, 8 per token, normalised
top-k), random weights, experts int4 (groups of 32) or int8: one token at a time through `--layers`
of them, each token with its own random hidden state (so routing, and the experts read, vary as in
decode). The bound is the bytes a token reads (its 8 experts per layer + the router) over the
DRAM read bandwidth measured right before each round (this shared box drifts by ~20% within minutes);
the figure is the median round. The router runs the engine's CPU linear kernel, as in the engine.
Attention and the dense parts are not in this figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from bench.core import hardware, read_bandwidth
from kvtrove.layers.kernels import cpu_kernels
from kvtrove.layers.linear import use_cpu_kernels
from kvtrove.layers.quant import QuantizedExperts
from kvtrove.models.moe import SparseMoE


def layer(cfg, scheme: str, group: int) -> SparseMoE:
    moe = SparseMoE(cfg)
    moe.gate.weight.data.normal_(0, 0.02)
    moe.experts.w13.data.normal_(0, 0.02)
    moe.experts.w2.data.normal_(0, 0.02)
    if scheme != "float":
        moe.experts = QuantizedExperts(moe.experts, scheme, group, cpu_kernels())  # frees the float experts
    use_cpu_kernels(moe, cpu_kernels())  # the router's linear layer, as the engine runs it
    return moe.eval()


def expert_bytes(moe: SparseMoE) -> int:
    """Bytes of one expert (gate + up + down, with scales)."""
    e = moe.experts
    if isinstance(e, QuantizedExperts):
        return sum(t.nbytes for m in (e.w13[0], e.w2[0]) for t in m.buffers())
    return e.packed[0][0].nbytes + e.packed[1][0].nbytes  # float: packed for the linear kernel


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--schemes", default="int4,int8")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = SimpleNamespace(
        model_type="qwen3_moe",
        hidden_size=2048,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        shared_expert_intermediate_size=0,
    )
    print(f"kvtrove MoE decode benchmark on {hardware()}")
    print(f"{args.layers} MoE layers shaped like Qwen3-30B-A3B (2048 hidden, 128 x 768 experts, top-8)")
    for scheme in args.schemes.split(","):
        layers = [layer(cfg, scheme, 32) for _ in range(args.layers)]
        per_token = args.layers * (cfg.num_experts_per_tok * expert_bytes(layers[0]) + layers[0].gate.weight.nbytes)
        total = sum(t.nbytes for m in layers for t in m.state_dict().values())
        xs = torch.randn(args.tokens + 10, 1, cfg.hidden_size) * 0.5
        for x in xs[:10]:  # warm-up
            for m in layers:
                x = m(x)
        fractions = []
        for r in range(args.rounds):
            bw = read_bandwidth()
            t0 = time.perf_counter()
            for x in xs[10:]:
                for m in layers:
                    x = x + m(x)
            dt = (time.perf_counter() - t0) / args.tokens
            bound = per_token / (bw * 1e9)
            fractions.append(bound / dt)
            print(
                f"  {scheme} round {r + 1}: {1 / dt:7.1f} tokens/s ({dt * 1e3:.2f} ms per token); DRAM read "
                f"{bw:.1f} GB/s (torch.sum) -> bound {1 / bound:7.1f} tokens/s; {bound / dt:.0%} of the bound",
                flush=True,
            )
        print(
            f"  {scheme}: reads {per_token / 1e6:.1f} MB per token of {total / 1e9:.2f} GB; median "
            f"{statistics.median(fractions):.0%} of the bound (target >= 50%)",
            flush=True,
        )
        del layers


if __name__ == "__main__":
    main()
