"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

Legend: T = tokens in the step, B = decoding sequences, L = context length, V = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtrove.engine import fused_decode
from kvtrove.engine.blend import BlendPlan, BlendStep
from kvtrove.engine.request import Request
from kvtrove.engine.scheduler import ScheduledBatch
from kvtrove.layers.attention import AttentionMetadata, PrefillSeq
from kvtrove.layers.sampler import SampleResult, SamplingBatch, sample

PROMPT_ROWS = 256
"""Prompt rows turned into logits at once for prompt logprobs (a [256, vocab] float32 block at most)."""


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, vocab_size: int):
        self.model = model
        self.block_size = block_size
        self.vocab_size = vocab_size
        layers = model.attention_layers
        self.num_layers = len(layers)
        self.blend_totals = dict.fromkeys(("requests", "tokens_blended", "tokens_recomputed"), 0)
        """Blended prefills run, prompt tokens they reused and found-but-recomputed (`cache_stats`)."""
        self.sliding_window: int | None = layers[0].sliding_window
        dtype = next(model.parameters()).dtype
        parts, heads, dim = cache_layout(model)
        # [layers, parts (k/v, or one for a latent), cache heads, slots, dim]
        self.kv_cache = torch.zeros(len(layers), parts, heads, num_blocks * block_size, dim, dtype=dtype)
        for i, layer in enumerate(layers):
            layer.kv_cache = self.kv_cache[i]
        # the same memory by block: [layers, parts, heads, blocks, block size, dim]
        self.kv_blocks = self.kv_cache.view(len(layers), parts, heads, num_blocks, block_size, dim)
        self.fused_decode = fused_decode.build(model)
        """Decode steps in one C++ call, for the models it covers (None: the modules run every step)."""

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the KV of `block_ids`: [layers, parts, heads, len(block_ids), block size, dim]."""
        return self.kv_blocks.index_select(3, torch.tensor(block_ids))

    def write_block(self, block_id: int, kv: torch.Tensor) -> None:
        """Copy [layers, parts, heads, block size, dim] into a block."""
        self.kv_blocks[:, :, :, block_id].copy_(kv)

    def read_positions(self, req: Request, positions: torch.Tensor) -> torch.Tensor:
        """A copy of the KV of `req`'s `positions`: [layers, parts, heads, len(positions), dim]."""
        return self.kv_cache.index_select(3, self._slots(req, int(positions.max()) + 1)[positions])

    def place(self, req: Request, positions: torch.Tensor, kv: torch.Tensor, computed_at: torch.Tensor) -> torch.Tensor:
        """Write stored KV [layers, parts, heads, n, dim] (a copy: its keys are rotated in place), computed
        at positions `computed_at` [n], into `req`'s `positions` [n], its keys' RoPE part rotated by the
        difference; returns what was written."""
        delta = positions - computed_at
        if delta.any():
            rope = self.model.attention_layers[0].rope_dims
            kv[:, 0, :, :, rope] = self.model.model.rotary.rerotate(kv[:, 0, :, :, rope], delta).to(kv.dtype)
        slots = self._slots(req, int(positions.max()) + 1)[positions]
        self.kv_cache.index_copy_(3, slots, kv)
        return kv

    @staticmethod
    def block_shape(model: torch.nn.Module, block_size: int) -> tuple[int, ...]:
        """The shape of one block's KV (and of a stored chunk): [layers, parts, heads, block size, dim]."""
        parts, heads, dim = cache_layout(model)
        return (len(model.attention_layers), parts, heads, block_size, dim)

    def _slots(self, req: Request, end: int) -> torch.Tensor:
        """KV slots of positions 0..end-1 of `req`."""
        pos = torch.arange(end)
        table = torch.tensor([b.block_id for b in req.blocks])
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _mask(self, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
        k_pos = torch.arange(k_len)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.sliding_window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - self.sliding_window
        return allowed

    def prefill_seq(self, offset: int, start: int, n: int, ctx_slots: torch.Tensor) -> PrefillSeq:
        """Attention inputs for `n` new tokens at positions start.. whose context has slots `ctx_slots`."""
        window_cut = self.sliding_window is not None and start + n > self.sliding_window
        return PrefillSeq(
            start=offset,
            length=n,
            context_slots=ctx_slots if start else None,
            mask=self._mask(torch.arange(start, start + n), start + n) if start or window_cut else None,
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Request], SampleResult | None]:
        """Run one step; samples for the requests whose known tokens are all computed after it."""
        blended = [i for i, r in enumerate(batch.requests) if r.blend_plan is not None]
        order = sorted(
            (i for i in range(len(batch)) if i not in blended), key=lambda i: batch.num_new_tokens[i] != 1
        )  # decodes first
        reqs = [batch.requests[i] for i in order]
        nums = [batch.num_new_tokens[i] for i in order]
        rows = [self._blend(batch.requests[i], batch.num_new_tokens[i]) for i in blended]
        if not reqs:
            return self._sample([batch.requests[i] for i in blended], torch.cat(rows))
        ids, positions, slot_mapping, sample_rows, prefills, decode_ctx = [], [], [], [], [], []
        prompt_rows = []  # (request, first row, first position, rows) of prefills whose prompt logprobs are due
        offset = 0
        for r, n in zip(reqs, nums):
            start = r.num_computed_tokens
            if r.needs_prompt_rows:
                prompt_rows.append((r, offset, start, n))
            ids.extend(r.all_token_ids[start : start + n])
            positions.append(torch.arange(start, start + n))
            ctx = self._slots(r, start + n)
            slot_mapping.append(ctx[start:])
            if n == 1:
                decode_ctx.append(ctx)
            else:
                prefills.append(self.prefill_seq(offset, start, n, ctx))
            if start + n == r.num_tokens:
                sample_rows.append(offset + n - 1)
            offset += n
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_mapping),
            num_decodes=len(decode_ctx),
            decode_slots=None,
            decode_lens=None,
            decode_mask=None,
            prefills=prefills,
        )
        if decode_ctx:
            lens = [len(c) for c in decode_ctx]
            width = max(lens)
            meta.decode_slots = torch.stack([F.pad(c, (0, width - len(c))) for c in decode_ctx])
            meta.decode_lens = torch.tensor(lens)
            if min(lens) != width or (self.sliding_window is not None and width > self.sliding_window):
                meta.decode_mask = ~self._mask(meta.decode_lens - 1, width)
        run = self.fused_decode if self.fused_decode and self.fused_decode.covers(meta) else self.model
        hidden = run(torch.tensor(ids), torch.cat(positions), meta)
        for r, row, start, n in prompt_rows:
            self._prompt_logprobs(r, hidden[row : row + n], start)
        sampled = [r for r, n in zip(reqs, nums) if r.num_computed_tokens + n == r.num_tokens]
        sampled += [batch.requests[i] for i in blended]
        return self._sample(sampled, torch.cat([hidden[torch.tensor(sample_rows, dtype=torch.long)], *rows]))

    def _sample(self, reqs: list[Request], hidden: torch.Tensor) -> tuple[list[Request], SampleResult | None]:
        if not reqs:
            return [], None
        return reqs, sample(self.model.compute_logits(hidden), self._sampling_batch(reqs))

    def _prompt_logprobs(self, req: Request, hidden: torch.Tensor, start: int) -> None:
        """Append the logprobs of the prompt tokens that the rows `hidden` (positions start..) predict and
        `req` lacks (a recompute after preemption skips those it has), PROMPT_ROWS rows of logits at a time."""
        k = req.params.prompt_logprobs
        prompt = req.prompt_token_ids
        first = len(req.prompt_logprobs) - 1  # the position whose next token is the first one lacking
        end = min(start + len(hidden), len(prompt) - 1)  # the last prompt row predicts a generated token
        for a in range(max(start, first), end, PROMPT_ROWS):
            b = min(end, a + PROMPT_ROWS)
            lp = self.model.compute_logits(hidden[a - start : b - start]).float().log_softmax(-1)
            targets = prompt[a + 1 : b + 1]
            chosen = lp.gather(-1, torch.tensor(targets)[:, None])[:, 0].tolist()
            top = lp.topk(k, -1) if k else None
            for i, t in enumerate(targets):
                d = dict(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else {}
                d[t] = chosen[i]
                req.prompt_logprobs.append(d)

    def _blend(self, req: Request, n: int) -> torch.Tensor:
        """Run a blended prefill (the rest of `req`'s prompt, `engine.blend`) alone; its last token's hidden
        row [1, E]. Counts what was recomputed on the request."""
        plan: BlendPlan = req.blend_plan
        req.blend_plan = None
        start, end = req.num_computed_tokens, req.num_computed_tokens + n
        ctx = self._slots(req, end)
        layers = self.model.attention_layers
        check = min(plan.options.check_layer, len(layers) - 1)
        if layers[0].kernels is not None:  # the kernel derives what each token sees from positions: no masks
            first = PrefillSeq(0, n, ctx if start else None, None)
            mask = None
        else:
            first, mask = self.prefill_seq(0, start, n, ctx), self._mask
        step = BlendStep(plan, end, ctx, layers[check].kv_cache, first, mask)
        meta = AttentionMetadata(
            slot_mapping=ctx[start:],
            num_decodes=0,
            decode_slots=None,
            decode_lens=None,
            decode_mask=None,
            prefills=[first],
            blend=step,
        )
        hidden = self.model(torch.tensor(req.all_token_ids[start:end]), torch.arange(start, end), meta)
        reused = 0 if step.selected is None else n - len(step.selected)  # every token not selected was loaded
        req.blend_counts = (reused, len(plan.covered) - reused)
        self.blend_totals["requests"] += 1
        self.blend_totals["tokens_blended"] += reused
        self.blend_totals["tokens_recomputed"] += len(plan.covered) - reused
        return hidden[-1:]

    def _sampling_batch(self, reqs: list[Request]) -> SamplingBatch:
        ps = [r.params for r in reqs]

        def col(name: str, off, dtype=torch.float32):
            vals = [getattr(p, name) for p in ps]
            return None if all(v == off for v in vals) else torch.tensor(vals, dtype=dtype)

        rep = col("repetition_penalty", 1.0)
        pres, freq = col("presence_penalty", 0.0), col("frequency_penalty", 0.0)
        seen = counts = None
        if rep is not None:
            seen = torch.zeros(len(reqs), self.vocab_size, dtype=torch.bool)
            for i, r in enumerate(reqs):
                seen[i, torch.tensor(r.all_token_ids)] = True
        if pres is not None or freq is not None:
            counts = torch.zeros(len(reqs), self.vocab_size)
            for i, r in enumerate(reqs):
                if r.output_token_ids:
                    counts[i].index_add_(0, torch.tensor(r.output_token_ids), torch.ones(len(r.output_token_ids)))
            pres = pres if pres is not None else torch.zeros(len(reqs))
            freq = freq if freq is not None else torch.zeros(len(reqs))
        nlp = [p.logprobs for p in ps if p.logprobs is not None]
        return SamplingBatch(
            temperature=torch.tensor([p.temperature for p in ps], dtype=torch.float32),
            top_k=col("top_k", 0, torch.long),
            top_p=col("top_p", 1.0),
            min_p=col("min_p", 0.0),
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
            seen_mask=seen,
            output_counts=counts,
            generators=[r.generator for r in reqs],
            num_logprobs=max(nlp) if nlp else None,
        )


def cache_layout(model: torch.nn.Module) -> tuple[int, int, int]:
    """What every attention layer caches per token: (parts, heads, dim) - (2, KV heads, head dim) for k and
    v, (1, 1, latent + rope dim) for DeepSeek's compressed latent."""
    layouts = {a.cache_layout for a in model.attention_layers}
    if len(layouts) != 1:
        raise ValueError(f"attention layers cache different layouts {sorted(layouts)}; one is supported")
    return layouts.pop()
