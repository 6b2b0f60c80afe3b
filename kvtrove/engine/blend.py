"""Blending (CacheBlend): a prompt's known text reuses stored KV at any position, with a small recompute.

Segment entries. Every prompt of a blending request leaves its KV in the store as position-independent
windows of `block size` tokens (`kv.keys.segment_key`: the window's tokens alone, not what preceded
them), with the position they were computed at in the chunk header. The KV is the one computed in
context, as the prompt first ran: it costs no extra prefill, and a window found later in another
context is what the selective recompute corrects anyway. Windows start at each explicit segment's first
token (`{"segments": [...]}`, chat messages) or, without segments, at the prompt's block boundaries. A
blended request stores only windows it computed at every layer, never ones it loaded.

Finding. After the exact prefix, the window at every offset of the rest of the prompt is looked up (one
batched existence query per tier); a hit is taken and the scan jumps past it, so a passage pasted at any
offset, with its edges tokenized differently, is found from its first whole window. Runs shorter than
`MIN_RUN` windows are dropped (their text is too short to be the same passage), and the token ids in
each loaded chunk's header are compared before use.

Assembly. Hits are loaded into the request's own blocks at their new positions, the keys' RoPE part
rotated by the position difference in float32 (`RotaryEmbedding.rerotate`).

The step. The whole rest of the prompt runs in one step. Layers up to `check_layer` run over every token
after the exact prefix, writing fresh KV over the loaded one; there, each loaded token's fresh K/V is
compared with what was loaded, and the layers after it run only the tokens not covered by a hit, the
first `head_tokens` of each run of hits (the text before a run is not what its KV was computed after),
the `ratio` of the other covered tokens whose KV deviates most, and the last token, attending over the
blended cache (one attention call: the kernel takes the selection's positions). Ratio 1 is exactly a
prefill; ratio 0 with no head tokens is plain reuse (nothing recomputed at any layer for covered
tokens; head tokens alone are selected at layer 0).

Blended KV is never exact: its blocks are never registered or stored under exact-prefix keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kvtrove.layers.attention import AttentionMetadata, PrefillSeq

MIN_RUN = 2
"""Fewest consecutive windows (of block size tokens) that count as a found passage."""
WORTH_BELOW = 0.9
"""Blend only when the blended step's work is below this share of a plain prefill's."""


@dataclass(frozen=True)
class BlendOptions:
    ratio: float
    check_layer: int
    head_tokens: int = 0
    """The first tokens of each run of loaded KV, recomputed at every layer."""


def window_keys(fingerprint: bytes, token_ids: Sequence[int], start: int, end: int, width: int) -> list[bytes]:
    """Segment keys of the windows token_ids[s : s + width] for s in [start, end - width] (see
    `kv.keys.segment_key`, which this computes without one array per window)."""
    raw = np.asarray(token_ids, dtype="<i4").tobytes()
    head = b"segment" + fingerprint
    step = 4 * width
    return [xxhash.xxh3_128_digest(head + raw[4 * s : 4 * s + step]) for s in range(start, end - width + 1)]


def pick_windows(present: Sequence[bool], start: int, end: int, width: int) -> list[int]:
    """Start positions of non-overlapping hit windows in [start, end), scanning left to right (a hit is
    taken and the scan jumps past it), keeping runs of at least MIN_RUN adjacent windows."""
    picked, run = [], []
    s = start
    while s + width <= end:
        if present[s - start]:
            if run and run[-1] + width != s:
                picked.extend(run if len(run) >= MIN_RUN else [])
                run = []
            run.append(s)
            s += width
        else:
            s += 1
    picked.extend(run if len(run) >= MIN_RUN else [])
    return picked


def count_runs(starts: Sequence[int], width: int) -> int:
    """Runs of adjacent windows among ascending window starts."""
    return sum(1 for i, s in enumerate(starts) if i == 0 or starts[i - 1] + width != s)


def compute_fraction(options: BlendOptions, num_layers: int, num_tokens: int, starts: Sequence[int], width: int) -> float:
    """Share of a plain prefill's work a blended step of `num_tokens` does whose windows at `starts` (of
    `width` tokens) were found (linear layers; attention scales alike)."""
    covered = len(starts) * width
    full = min(options.check_layer + 1, num_layers) / num_layers if options.ratio > 0 else 0.0
    heads = min(covered, options.head_tokens * count_runs(starts, width))
    rest = (num_tokens - covered + heads + options.ratio * (covered - heads) + 1) / num_tokens
    return full + (1 - full) * min(1.0, rest)


@dataclass
class BlendPlan:
    """A blending request between admission and its step: which of its positions hold loaded KV."""

    options: BlendOptions
    start: int
    """First position of the step (after the exact prefix)."""
    covered: torch.Tensor
    """[n] positions whose KV was loaded, ascending."""
    loaded_check: torch.Tensor | None
    """[parts, heads, n, dim] the loaded KV of the check layer, to measure deviation against."""


class BlendStep:
    """The model-side half of a blended step, carried in `AttentionMetadata.blend`."""

    def __init__(
        self,
        plan: BlendPlan,
        end: int,
        context_slots: torch.Tensor,
        check_cache: torch.Tensor,
        first: PrefillSeq,
        mask: Callable[[torch.Tensor, int], torch.Tensor] | None,
    ):
        """`first`: the step's attention input over every token; `mask(positions, L)`: what tokens at
        `positions` see of a context of L (None: the kernels derive it from the positions)."""
        self.plan, self.end, self.context_slots = plan, end, context_slots
        self.check_cache = check_cache  # [parts, heads, slots, dim] of the check layer
        self.first, self.mask = first, mask
        ratio = plan.options.ratio
        self.select_at = plan.options.check_layer + 1 if ratio > 0 else 0  # (heads alone need no check layer)
        self.selected: torch.Tensor | None = None
        """[m] positions that ran through every layer (set by `select`)."""

    def choose(self) -> torch.Tensor:
        """Positions to recompute after the check layer: uncovered ones, the first `head_tokens` of each run
        of covered ones, the `ratio` of the other covered ones whose KV deviates most, and the last."""
        plan, covered = self.plan, self.plan.covered
        keep = torch.ones(self.end - plan.start, dtype=torch.bool)
        keep[covered - plan.start] = False
        # where a run starts, the text before it is not the text its KV was computed after
        first = torch.ones(len(covered), dtype=torch.bool)
        first[1:] = covered[1:] != covered[:-1] + 1
        run_start = torch.cummax(torch.where(first, torch.arange(len(covered)), 0), 0).values
        head = torch.arange(len(covered)) - run_start < plan.options.head_tokens
        keep[covered[head] - plan.start] = True
        rest = torch.nonzero(~head)[:, 0]
        n = len(rest)
        k = min(n, int(np.ceil(plan.options.ratio * n)))
        if 0 < k:
            if k < n:
                fresh = self.check_cache.index_select(2, self.context_slots[covered[rest]]).float()
                dev = (fresh - plan.loaded_check[:, :, rest].float()).square().sum((0, 1, 3))  # [n]
                top = rest[dev.topk(k).indices]
            else:
                top = rest
            keep[covered[top] - plan.start] = True
        keep[-1] = True
        return torch.nonzero(keep)[:, 0] + plan.start

    def select(self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin):
        """The hidden rows, cos/sin and attention metadata of the selected tokens only."""
        sel = self.choose()
        self.selected = sel
        start = self.plan.start
        if len(sel) == self.end - start:  # every token: the step goes on unchanged
            return x, residual, cos_sin, self._meta(sel, self.first)
        rows = sel - start
        # one attention call for the scattered selection, at their positions
        mask = None if self.mask is None else self.mask(sel, self.end)
        prefill = PrefillSeq(0, len(sel), self.context_slots[: self.end], mask, positions=sel)
        cos, sin = cos_sin
        return (
            x.index_select(0, rows),
            None if residual is None else residual.index_select(0, rows),
            (cos.index_select(0, rows), sin.index_select(0, rows)),
            self._meta(sel, prefill),
        )

    def _meta(self, sel: torch.Tensor, prefill: PrefillSeq) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.context_slots[sel],
            num_decodes=0,
            decode_slots=None,
            decode_lens=None,
            decode_mask=None,
            prefills=[prefill],
        )
