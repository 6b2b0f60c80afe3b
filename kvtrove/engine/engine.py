"""The step loop: admit requests, schedule, run, sample, detokenize, finish."""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import time
import weakref

import torch
import xxhash

from kvtrove.config import CacheConfig, EngineConfig
from kvtrove.engine.blend import BlendOptions
from kvtrove.engine.block_pool import BlockPool
from kvtrove.engine.detokenizer import Detokenizer
from kvtrove.engine.kv_cache_manager import KVCacheManager, RecomputeCost
from kvtrove.engine.request import Request
from kvtrove.engine.runner import ModelRunner
from kvtrove.engine.scheduler import Scheduler
from kvtrove.kv import ledger
from kvtrove.kv.breakeven import BreakEven
from kvtrove.kv.keys import salted_root
from kvtrove.kv.store import KVStore
from kvtrove.kv.tiers.base import Tier
from kvtrove.kv.tiers.disk import DiskTier
from kvtrove.kv.tiers.host import HostTier
from kvtrove.kv.tiers.remote import open_remote
from kvtrove.layers.kernels import cpu_kernels
from kvtrove.layers.linear import use_cpu_kernels
from kvtrove.loader import load_checkpoint
from kvtrove.models.registry import build_model
from kvtrove.outputs import CompletionOutput, RequestOutput
from kvtrove.placement import plan as placement
from kvtrove.placement.rules import load_rules
from kvtrove.sampling_params import SamplingParams

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIN_PREFILL_SAMPLE = 64
"""Steps with fewer prefill tokens say little about prefill speed."""


def build_store(
    cc: CacheConfig, fingerprint: bytes, dtype: torch.dtype, shape: tuple[int, ...], break_even: BreakEven
) -> KVStore | None:
    """The store's tiers from the config, fastest first; None when prefix caching is off or no tier is on."""
    if not cc.enable_prefix_caching:
        return None
    tiers: list[Tier] = []
    if cc.kv_host_gb > 0:
        tiers.append(HostTier(int(cc.kv_host_gb * 2**30), cc.eviction_for("host")))
    if cc.kv_disk_gb > 0:
        tiers.append(DiskTier(cc.kv_disk_dir, int(cc.kv_disk_gb * 2**30), cc.eviction_for("disk")))
    if cc.kv_remote:
        tiers.append(
            open_remote(
                cc.kv_remote, cc.kv_remote_namespace, fingerprint, cc.kv_remote_timeout_s, cc.kv_remote_cooldown_s
            )
        )
    if not tiers:
        return None
    return KVStore(tiers, fingerprint, dtype, break_even, shape=shape)


def text_spans(text: str, parts: list[str], offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) token ranges of each of `parts` (in order) inside `text`, whose tokens span `offsets`
    characters; a token that straddles a part's edge is outside it, a part the text lacks is skipped."""
    spans, cursor, t = [], 0, 0
    for part in parts:
        at = text.find(part, cursor) if part else -1
        if at < 0:
            continue
        end = at + len(part)
        cursor = end
        while t < len(offsets) and offsets[t][0] < at:
            t += 1
        first = t
        while t < len(offsets) and offsets[t][1] <= end:
            t += 1
        if t > first:
            spans.append((first, t))
    return spans


def _close_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None:
        engine.close()


def recompute_cost(model: torch.nn.Module) -> RecomputeCost:
    """Prefill FLOPs per token: 2 per weight of the decoder layers' linear layers (of MoE experts, those a
    token runs through), and each attention layer's `context_flops` for each earlier token attended to."""
    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() == 2
        and not isinstance(m, torch.nn.Embedding)
        and "lm_head" not in name
    )
    linear += sum(m.active_params() for m in model.modules() if hasattr(m, "active_params"))  # MoE experts
    return RecomputeCost(2.0 * linear, float(sum(a.context_flops for a in model.attention_layers)))


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        dtype = DTYPES[config.model.dtype]
        ckpt = load_checkpoint(config.model.model, dtype)
        self.hf_config = ckpt.hf_config
        self.tokenizer = ckpt.tokenizer
        self.eos_token_ids = ckpt.eos_token_ids
        self.fingerprint = ckpt.fingerprint
        context = getattr(ckpt.hf_config, "max_position_embeddings", None) or 4096
        if config.model.max_model_len and config.model.max_model_len > context:
            raise ValueError(
                f"max_model_len {config.model.max_model_len} exceeds this model's context of {context} "
                "tokens (max_position_embeddings)"
            )
        self.max_model_len = config.model.max_model_len or context
        kernels = cpu_kernels() if config.model.cpu_kernels else None
        self.model = build_model(ckpt.hf_config, ckpt.weights, self.max_model_len, dtype)
        cost = recompute_cost(self.model)  # FLOPs: the same quantized or not
        mc = config.model
        rules = load_rules(mc.placement) if mc.placement else None
        stored = placement.stored_quantized(self.model, ckpt.quantized)
        self.placement = placement.plan(self.model, rules, mc.quantize, mc.quantize_group_size, stored)
        placement.apply(self.model, self.placement, mc.quantize_group_size, kernels, stored)
        use_cpu_kernels(self.model, kernels)  # the float weights packed for the kernels: their final form
        quantized = placement.fingerprint(self.placement, mc.quantize_group_size)
        if quantized:  # other weights, other KV: never share stored KV with the float model
            self.fingerprint = xxhash.xxh3_128_digest(self.fingerprint + b"|quantized|" + quantized)
        cc = config.cache
        block_shape = ModelRunner.block_shape(self.model, cc.block_size)
        per_block = math.prod(block_shape) * dtype.itemsize
        num_blocks = cc.num_blocks or max(1, int(cc.kv_cache_gb * 2**30) // per_block)
        self.runner = ModelRunner(self.model, num_blocks, cc.block_size, ckpt.hf_config.vocab_size)
        self.pool = BlockPool(num_blocks, cc.enable_prefix_caching)
        self.break_even = BreakEven(per_block // cc.block_size)
        self.store = build_store(cc, self.fingerprint, dtype, block_shape, self.break_even)
        kv = KVCacheManager(self.pool, cc.block_size, self.fingerprint, self.store, self.runner, cost, cc.kv_write_policy)
        self.scheduler = Scheduler(config.scheduler, kv)
        if cc.kv_blend:  # the engine's defaults must be usable by every request
            self._blend_options(SamplingParams(kv_blend=True))
        self._closed = False
        if self.store is not None:  # interpreter exit closes an engine still open: its blocks reach the store
            atexit.register(_close_at_exit, weakref.ref(self))
        self.groups: dict[str, list[Request]] = {}
        self._ids = itertools.count()
        log.info(
            "engine ready: %d KV blocks of %d tokens (%.2f GiB)",
            num_blocks,
            cc.block_size,
            num_blocks * per_block / 2**30,
        )

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.config.cache.block_size

    # ---- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str | dict) -> list[int]:
        return self.tokenize_segments(prompt)[0]

    def tokenize_segments(self, prompt: str | dict) -> tuple[list[int], list[tuple[int, int]] | None]:
        """The prompt's token ids and, for `{"segments": [...]}`, each segment's [start, end) token range
        (each string segment tokenized on its own, after the tokenizer's leading special tokens)."""
        if isinstance(prompt, dict) and "segments" in prompt:
            segs = prompt["segments"]
            if not isinstance(segs, (list, tuple)) or not segs:
                raise ValueError("segments must be a non-empty list of strings or token-id lists")
            ids = self.tokenizer.encode("", add_special_tokens=True)
            spans = []
            for i, seg in enumerate(segs):
                if isinstance(seg, str):
                    part = self.tokenizer.encode(seg, add_special_tokens=False)
                elif isinstance(seg, (list, tuple)) and all(type(t) is int for t in seg):
                    part = self._checked_ids(list(seg), f"segment {i}")
                else:
                    raise ValueError(f"segment {i} must be a string or a list of token ids, got {type(seg).__name__}")
                if not part:
                    raise ValueError(f"segment {i} is empty (0 tokens)")
                spans.append((len(ids), len(ids) + len(part)))
                ids += part
            return ids, spans
        ids = self._tokenize(prompt)
        spans = prompt.get("spans") if isinstance(prompt, dict) else None
        if spans is None:
            return ids, None
        if not isinstance(spans, (list, tuple)) or not all(
            isinstance(sp, (list, tuple))
            and len(sp) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in sp)
            and 0 <= sp[0] < sp[1] <= len(ids)
            for sp in spans
        ):
            raise ValueError(f"spans must be [start, end) token ranges within the prompt's {len(ids)} tokens")
        return ids, [(int(a), int(b)) for a, b in spans]

    def _checked_ids(self, ids: list[int], what: str) -> list[int]:
        vocab = self.hf_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return ids

    def _tokenize(self, prompt: str | dict) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give at least one character or token")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise ValueError("prompt_token_ids must be a list of ints")
            return self._checked_ids(list(ids), "prompt_token_ids")
        raise ValueError(
            f"a prompt is a string, {{'prompt_token_ids': [...]}} or {{'segments': [...]}}, got {type(prompt).__name__}"
        )

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> dict:
        """The model's chat template applied to `messages`, as token ids, with each message's content (each
        text part of a content-part list) marked as a segment of the prompt (`spans`, for blending).
        A message's content is a string or a list of {"type": "text", "text": ...} parts."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        plain, parts = [], []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                texts = [p["text"] for p in content]
            elif isinstance(content, str):
                texts = [content]
            else:
                texts = None
            if texts is None or not isinstance(m.get("role"), str):
                raise ValueError(
                    "each message needs a string 'role' and a string 'content' (or a list of "
                    f"{{'type': 'text', 'text': ...}} parts), got {m!r}"
                )
            plain.append({**m, "content": "".join(texts)})
            parts += texts
        tok = self.tokenizer
        if tok.chat_template is None:
            raise ValueError("this model has no chat template; use a plain prompt")
        try:
            text = tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # the template's own checks (role order, unknown roles) raise jinja errors
            raise ValueError(f"the chat template refused these messages: {e}") from None
        if not tok.is_fast:
            return {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return {"prompt_token_ids": enc["input_ids"], "spans": text_spans(text, parts, enc["offset_mapping"])}

    def add_request(self, prompt: str | dict, params: SamplingParams, request_id: str | None = None) -> str:
        """Validate and queue a prompt; raises ValueError (and changes nothing) for bad input."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        ids, segments = self.tokenize_segments(prompt)
        # prompt logprobs are exact: such a request computes its whole prompt and never blends
        blend = self._blend_options(params) if params.prompt_logprobs is None else None
        if not ids:
            raise ValueError("prompt is empty: it has 0 tokens")
        limit = min(self.max_model_len, self.capacity_tokens)
        if len(ids) >= limit:
            raise ValueError(
                f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens"
                + (
                    f" and the KV cache holds {self.capacity_tokens}"
                    if self.capacity_tokens < self.max_model_len
                    else ""
                )
                + " (the prompt must leave room for at least one generated token)"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the limit of {limit} "
                f"tokens; lower max_tokens to at most {limit - len(ids)}"
            )
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        root = salted_root(self.fingerprint, params.cache_salt)
        group = []
        for i in range(params.n):
            detok = Detokenizer(self.tokenizer, ids, params.stop_strings, params.skip_special_tokens)
            seed = None if params.seed is None else params.seed + i
            group.append(Request(request_id, i, ids, params, max_tokens, detok, seed, root, segments, blend))
        self.groups[request_id] = group
        if not group[0].needs_prompt_rows:
            self.scheduler.kv.prefetch(group[0])
        for r in group:
            self.scheduler.add(r)
        return request_id

    def _blend_options(self, params: SamplingParams) -> BlendOptions | None:
        """The request's blending options (its own, else the engine's); None when it does not blend."""
        cc = self.config.cache
        if not (cc.kv_blend if params.kv_blend is None else params.kv_blend):
            return None
        if self.store is None:
            raise ValueError(
                "kv_blend needs the KV store: enable_prefix_caching on and kv_host_gb, kv_disk_gb or kv_remote set"
            )
        ratio = cc.kv_blend_ratio if params.kv_blend_ratio is None else params.kv_blend_ratio
        layer = cc.kv_blend_check_layer if params.kv_blend_check_layer is None else params.kv_blend_check_layer
        if layer >= self.runner.num_layers - 1:
            raise ValueError(
                f"kv_blend_check_layer {layer} leaves no layer after it: this model's layers are "
                f"0-{self.runner.num_layers - 1}, so at most {self.runner.num_layers - 2}"
            )
        head = cc.kv_blend_head_tokens if params.kv_blend_head_tokens is None else params.kv_blend_head_tokens
        return BlendOptions(float(ratio), int(layer), int(head))

    def abort_request(self, request_id: str) -> None:
        for r in self.groups.pop(request_id, []):
            if not r.finished:
                self.scheduler.finish(r, "abort")
        self._sync_if_idle()

    def _sync_if_idle(self) -> None:
        """With nothing left to run, the store copies its host-only chunks down until work arrives."""
        if self.store is not None and not self.scheduler.has_work():
            scheduler = self.scheduler
            self.store.sync_down(lambda: not scheduler.has_work())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Per tier (device first): entries, bytes, hits, misses, evictions, bytes moved, tokens saved; and
        under "blend", the blended prefills run and the prompt tokens they reused / recomputed."""
        out = {"device": {"entries": len(self.pool.cached), "blocks": self.pool.num_blocks}}
        if self.store is not None:
            out.update(self.store.stats())
        out["blend"] = dict(self.runner.blend_totals)
        return out

    def flush_kv(self) -> None:
        """Write every KV block the device cache holds and the store lacks, and wait for the writes."""
        self.scheduler.kv.flush()

    def close(self) -> None:
        """Write every block the device cache holds and the store lacks to every tier (and the host
        tier's chunks to the tiers below), stop the store's threads, and add this engine's store
        counters to the disk tier's lifetime totals (`kvtrove cache stats`). Interpreter exit does the
        same for an engine still open."""
        if self.store is None or self._closed:
            return
        self._closed = True
        self.scheduler.kv.flush()
        self.store.sync_down()
        self.store.close()
        if any(isinstance(t, DiskTier) for t in self.store.tiers):
            ledger.add(self.config.cache.kv_disk_dir, self.store.stats())

    # ---- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling + model step; outputs for every request group that changed."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        t0 = time.perf_counter()
        blended = any(r.blend_plan is not None for r in batch.requests)
        sampled, result = self.runner.execute(batch)
        prefill = sum(n for n in batch.num_new_tokens if n > 1)
        if prefill >= MIN_PREFILL_SAMPLE and not blended:  # teaches the store how fast recomputing is
            self.break_even.observe_prefill(sum(batch.num_new_tokens), time.perf_counter() - t0)
        for r, n in zip(batch.requests, batch.num_new_tokens):
            r.num_computed_tokens += n
            self.scheduler.kv.register_full_blocks(r)
        changed = {r.request_id for r in sampled}
        for i, r in enumerate(sampled):
            self._append(r, result.token_ids[i], None if result.logprobs is None else result.logprobs[i])
        self._sync_if_idle()
        return [self._output(rid) for rid in changed if rid in self.groups]

    def _append(self, r: Request, token: int, logprobs: dict[int, float] | None) -> None:
        p = r.params
        r.append_token(token)
        if r.logprobs is not None and logprobs is not None:
            top = dict(itertools.islice(logprobs.items(), p.logprobs))
            top[token] = logprobs[token]
            r.logprobs.append(top)
        if (
            (token in self.eos_token_ids and not p.ignore_eos)
            or (p.stop_token_ids and token in p.stop_token_ids)
            or r.detokenizer.add(token)
        ):
            self.scheduler.finish(r, "stop")
        elif len(r.output_token_ids) >= r.max_tokens or r.num_tokens >= self.max_model_len:
            self.scheduler.finish(r, "length")

    def _output(self, request_id: str) -> RequestOutput:
        group = self.groups[request_id]
        outs = []
        for r in group:
            new_ids = r.output_token_ids[r.sent_tokens :]
            r.sent_tokens = len(r.output_token_ids)
            outs.append(
                CompletionOutput(
                    index=r.index,
                    text=r.detokenizer.text,
                    token_ids=list(r.output_token_ids),
                    finish_reason=r.finish_reason,
                    logprobs=r.logprobs,
                    delta_text=r.detokenizer.delta(r.finished),
                    delta_token_ids=new_ids,
                )
            )
        first = group[0]
        finished = all(r.finished for r in group)
        if finished:
            del self.groups[request_id]
        firsts = [r.first_token_time for r in group if r.first_token_time is not None]
        return RequestOutput(
            request_id=request_id,
            prompt_token_ids=first.prompt_token_ids,
            outputs=outs,
            finished=finished,
            prompt_tokens=len(first.prompt_token_ids),
            cached_tokens=sum(first.cached_by_tier.values()) if first.cached_by_tier else 0,
            cached_tokens_by_tier=dict(first.cached_by_tier or {}),
            blended_tokens=first.blend_counts[0] if first.blend_counts else 0,
            blend_recomputed_tokens=first.blend_counts[1] if first.blend_counts else 0,
            ttft_s=min(firsts) - first.arrival_time if firsts else None,
            prompt_logprobs=None if first.needs_prompt_rows else first.prompt_logprobs,
        )
