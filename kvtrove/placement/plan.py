"""Resolve placement rules against a model: each weight-holding module gets a device and an implementation;
then install them (quantized layers swapped in after loading, so model files stay free of it).

Units are the modules that hold weights: linear layers (fused ones included), a MoE layer's stacked
experts, and the rest (norms, embeddings, routers), which always stay float. MoE routers and MLA's
`kv_b_proj` (its weight is absorbed into attention, never called as a layer) are not quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import xxhash
from torch import nn

from kvtrove.layers.quant import (
    Int4Linear,
    Int8Linear,
    QuantizedExperts,
    int4_parts,
    int8_parts,
    quantized_bytes,
)
from kvtrove.loader.gguf_repack import INT8_EXACT, REPACKABLE, repack, repack_int8
from kvtrove.models.registry import apply_renames, param_target
from kvtrove.placement.rules import BUILTIN, Rule

log = logging.getLogger(__name__)

FLOAT_ONLY = ("gate", "shared_expert_gate", "kv_b_proj")
"""Linear layers kept float whatever the rules say: routers (small; their choice is discrete) and MLA's
kv_b_proj."""
INT8_ONLY = ("lm_head",)
"""Under `auto`, int4 becomes int8 here: the output head makes every token's logits, the most sensitive."""
DEFAULT = Rule("cpu", "auto", where="default (no rule matched)")


@dataclass
class Placed:
    path: str
    cls: str
    kind: str
    """linear, experts or other"""
    wanted: str
    """The device the rule names."""
    device: str
    """The device it runs on."""
    impl: str
    nbytes: int
    rule: str


def units(model: nn.Module) -> list[tuple[str, nn.Module, str, tuple[str, ...]]]:
    """(path, module, kind, classes of it and every module holding it) for each weight-holding module."""
    modules = dict(model.named_modules())
    out = []
    for path, m in modules.items():
        if isinstance(m, nn.Linear):
            kind = "linear"
        elif hasattr(m, "load_expert") or isinstance(m, QuantizedExperts):
            kind = "experts"
        elif any(p is not None for p in (*m._parameters.values(), *m._buffers.values())):
            kind = "other"
        else:
            continue
        parts = path.split(".") if path else []
        classes = tuple(type(modules[".".join(parts[:i])]).__name__ for i in range(len(parts) + 1))
        out.append((path, m, kind, classes))
    return out


def _float_bytes(m: nn.Module, seen: set[int]) -> int:
    tensors = [*m._parameters.values(), *m._buffers.values()]
    n = 0
    for t in tensors:
        key = None if t is None else id(t) if t.is_meta else t.data_ptr()
        if key is None or key in seen:
            continue  # tied weights count once
        seen.add(key)
        n += t.numel() * t.element_size()
    return n


def _matrices(m: nn.Module, kind: str) -> list[tuple[int, int]]:
    """(out, in) of each weight matrix the implementation applies to."""
    if kind == "experts":
        e, two_i, h = m.w13.shape
        return [(two_i, h)] * e + [(h, two_i // 2)] * e
    return [tuple(m.weight.shape)]


def stored_quantized(model: nn.Module, quantized: dict) -> dict[tuple[str, int | None], tuple]:
    """A checkpoint's quantized weight matrices (HF name -> (GGUF rows, type)) by where they load:
    (module path, shard of a fused projection or None). A tied output head shares the embedding's."""
    out = {}
    for name, value in quantized.items():
        path, param, shard = param_target(model, apply_renames(model, name))
        if param == "weight":
            out[path, shard] = value
    if getattr(model, "tied", False) and ("model.embed_tokens", None) in out:
        out["lm_head", None] = out["model.embed_tokens", None]
    return out


def _shards(m: nn.Module) -> list[tuple[int | None, int, int]]:
    """(shard, first row, end row) of a linear layer's weight: one per projection of a fused layer."""
    offsets = getattr(m, "offsets", None)
    if offsets is None:
        return [(None, 0, m.weight.shape[0])]
    return [(i, offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)]


def _auto(path: str, m: nn.Module, kind: str, stored: dict) -> str:
    """`--quantize auto`: run a weight the file stores in 4 bits as int4 and one stored as Q8_0 as int8 (their
    exact blocks, repacked), one stored in another quantized type as int8; float otherwise."""
    if kind != "linear":
        return "float"
    found = [stored.get((path, shard)) for shard, _, _ in _shards(m)]
    if all(f is not None and f[1] in REPACKABLE for f in found):
        return "int4"
    return "int8" if all(f is not None for f in found) else "float"


def _impl(path: str, m: nn.Module, kind: str, rule: Rule, scheme: str, group: int, stored: dict) -> str:
    leaf = path.rpartition(".")[2]
    if kind == "other" or (kind == "linear" and leaf in FLOAT_ONLY):
        return "float"
    if rule.impl == "auto" and scheme == "auto":
        return _auto(path, m, kind, stored)
    impl = {"none": "float"}.get(scheme, scheme) if rule.impl == "auto" else rule.impl
    if impl == "int4":
        if any(k % group for _, k in _matrices(m, kind)):
            return "int8"  # the input does not split into groups
        if rule.impl == "auto" and leaf in INT8_ONLY:
            return "int8"
    return impl


def _device(wanted: str, user: bool, warned: list[bool]) -> str:
    if wanted == "cpu":
        return "cpu"
    if not warned[0]:
        warned[0] = True
        why = "no CUDA device here" if not torch.cuda.is_available() else "kvtrove runs models on the CPU only so far"
        msg = "placement: rules naming %s run on the CPU (%s); outputs are the same"
        (log.warning if user else log.info)(msg, wanted, why)
    return "cpu"


def plan(
    model: nn.Module, rules: list[Rule] | None, scheme: str = "none", group: int = 32, stored: dict | None = None
) -> list[Placed]:
    """Where each unit of `model` goes. `rules`: a user's (every rule must match some module), or None for
    the model's built-in set. `scheme`: the `--quantize` choice that `impl: auto` means (auto, none, int8,
    int4). `stored`: the checkpoint's quantized weights (`stored_quantized`)."""
    stored = stored or {}
    user = rules is not None
    rules = rules if user else BUILTIN.get(type(model).__name__, BUILTIN["LlamaForCausalLM"])
    found = units(model)
    if user:
        for r in rules:
            if not any(r.matches(path, classes) for path, _, _, classes in found):
                examples = ", ".join(p for p, _, k, _ in found if k != "other")
                raise ValueError(
                    f"placement {r.describe()} matches no module of {type(model).__name__}; "
                    f"module paths look like: {examples[:300]}..."
                )
    warned = [False]
    out = []
    seen: set[int] = set()
    for path, m, kind, classes in found:
        rule = next((r for r in rules if r.matches(path, classes)), DEFAULT)
        impl = _impl(path, m, kind, rule, scheme, group, stored)
        if impl == "float":
            nbytes = _float_bytes(m, seen)
        else:
            nbytes = sum(quantized_bytes(n, k, impl) for n, k in _matrices(m, kind))
        device = _device(rule.device, user, warned)
        out.append(Placed(path, classes[-1], kind, rule.device, device, impl, nbytes, rule.describe()))
    return out


def apply(model: nn.Module, placed: list[Placed], group: int = 32, kernels=None, stored: dict | None = None) -> None:
    """Swap in each unit's implementation (modules already on their device: the CPU). A quantized layer takes
    the checkpoint's own blocks where `stored` has them in its exact form (int4: Q4_0 / Q4_1 / Q4_K; int8:
    Q8_0), and quantizes the float rows elsewhere."""
    stored = stored or {}
    for p in placed:
        if p.impl == "float":
            continue
        parent_path, _, name = p.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        child = getattr(parent, name)
        if p.kind == "experts":
            setattr(parent, name, QuantizedExperts(child, p.impl, group, kernels))
        elif p.impl in ("int4", "int8"):  # a linear layer
            exact, from_file = (REPACKABLE, repack) if p.impl == "int4" else (INT8_EXACT, repack_int8)
            parts = []
            for shard, lo, hi in _shards(child):
                blocks = stored.get((p.path, shard))
                if blocks is not None and blocks[1] in exact:
                    parts.append(from_file(*blocks))
                else:
                    rows = child.weight.detach()[lo:hi]
                    parts.append(int4_parts(rows, group) if p.impl == "int4" else int8_parts(rows))
            joined = tuple(torch.cat(t) for t in zip(*parts))
            if p.impl == "int4":
                layer = Int4Linear(None, child.bias, group, kernels, parts=joined)
            else:
                layer = Int8Linear(None, child.bias, kernels, parts=joined)
            setattr(parent, name, layer)
        else:
            raise ValueError(f"unknown implementation {p.impl!r} for {p.path}")


def fingerprint(placed: list[Placed], group: int) -> bytes:
    """What about the placement changes the numbers (the quantized units and how): b"" when all is float."""
    quantized_units = [f"{p.path}={p.impl}" for p in placed if p.impl != "float"]
    if not quantized_units:
        return b""
    return xxhash.xxh3_128_digest((f"group={group}|" + "|".join(quantized_units)).encode())


def describe(placed: list[Placed]) -> str:
    """A table: each unit's device, implementation and bytes, then the totals per device and implementation."""
    width = max(len(p.path) for p in placed)
    lines = [f"{'module':<{width}}  {'class':<18} {'device':<16} {'impl':<6} {'MiB':>9}"]
    totals: dict[tuple[str, str], int] = {}
    for p in placed:
        dev = p.device if p.wanted == p.device else f"{p.wanted}->{p.device}"
        lines.append(f"{p.path:<{width}}  {p.cls:<18} {dev:<16} {p.impl:<6} {p.nbytes / 2**20:>9.2f}")
        totals[dev, p.impl] = totals.get((dev, p.impl), 0) + p.nbytes
    lines.append("")
    for (dev, impl), n in sorted(totals.items()):
        lines.append(f"total on {dev}, {impl}: {n / 2**20:.1f} MiB")
    lines.append(f"total: {sum(totals.values()) / 2**20:.1f} MiB")
    return "\n".join(lines)
