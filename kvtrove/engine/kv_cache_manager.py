"""The scheduler's view of KV: find a request's reusable prefix (device blocks, then the store), grow
its block table, free it, and write the full blocks it computed to the store when the write policy
says (`config.WRITE_POLICIES`): at once (write_through), when the device pool evicts them or at
`flush` (write_back), or also when a later request reuses them (write_through_selective)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvtrove.engine import blend
from kvtrove.engine.block_pool import Block, BlockPool
from kvtrove.engine.request import Request
from kvtrove.kv.format import ChunkHeader
from kvtrove.kv.keys import block_key, segment_key
from kvtrove.kv.store import KVStore, LoadedChunk

NO_PARENT = b"\0" * 16
"""The parent key of a segment window (it names its own tokens only)."""


class DeviceBlocks(Protocol):
    num_layers: int

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of blocks' KV: [layers, 2, KV heads, len(block_ids), block size, head dim]."""

    def write_block(self, block_id: int, kv: torch.Tensor) -> None:
        """Copy [layers, 2, KV heads, block size, head dim] into a block."""

    def read_positions(self, req: Request, positions: torch.Tensor) -> torch.Tensor:
        """A copy of the KV of a request's positions: [layers, parts, heads, len(positions), dim]."""

    def place(self, req: Request, positions: torch.Tensor, kv: torch.Tensor, computed_at: torch.Tensor) -> torch.Tensor:
        """Write stored KV (a copy, rotated in place) computed at positions `computed_at` into a request's
        `positions`, its keys re-rotated."""


@dataclass
class RecomputeCost:
    """FLOPs to recompute tokens: `per_token` for the layers' matmuls plus `per_context_token` for each
    earlier token attended to (so a block deep in a prompt costs more than one near its start)."""

    per_token: float
    per_context_token: float

    def of_block(self, start: int, size: int) -> float:
        return size * (self.per_token + self.per_context_token * (start + size / 2))


class KVCacheManager:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        fingerprint: bytes,
        store: KVStore | None = None,
        device: DeviceBlocks | None = None,
        cost: RecomputeCost | None = None,
        write_policy: str = "write_back",
    ):
        """`device` moves KV between the store and the device cache (needed with a store)."""
        self.pool = pool
        self.block_size = block_size
        self.fingerprint = fingerprint
        self.store = store if pool.enable_caching else None
        self.read_blocks = device.read_blocks if device is not None else None
        self.write_block = device.write_block if device is not None else None
        self.device = device
        self.num_layers = device.num_layers if device is not None else 0
        self.cost = cost or RecomputeCost(1.0, 0.0)
        self.tier_names = [t.name for t in self.store.tiers] if self.store is not None else []
        self.write_policy = write_policy
        self._unsaved: dict[int, tuple[bytes, bytes, int, tuple[int, ...]]] = {}
        """Device blocks computed here and not yet in the store, by block id: (key, parent key, index in
        its sequence, token ids). A block handed out again under another key is no longer it."""
        if self.store is not None and self.read_blocks is not None:
            pool.on_evict = self._write_back

    def _extend_keys(self, req: Request, num_tokens: int) -> None:
        bs = self.block_size
        for i in range(len(req.block_keys), num_tokens // bs):
            parent = req.block_keys[-1] if req.block_keys else req.cache_root
            req.block_keys.append(block_key(parent, req.all_token_ids[i * bs : (i + 1) * bs]))

    def _block_tokens(self, req: Request, i: int) -> tuple[int, ...]:
        return tuple(req.all_token_ids[i * self.block_size : (i + 1) * self.block_size])

    def _reusable_keys(self, req: Request) -> list[bytes]:
        """Keys of the blocks that may be reused: all full blocks but the one holding the last token."""
        self._extend_keys(req, req.num_tokens)
        return req.block_keys[: (req.num_tokens - 1) // self.block_size]

    # ---- lookup ---------------------------------------------------------------------------------------

    def cached_prefix(self, req: Request) -> list[Block]:
        """Device blocks of the longest cached prefix, leaving at least the last token to compute."""
        if not self.pool.enable_caching:
            return []
        hits = []
        for i, key in enumerate(self._reusable_keys(req)):
            b = self.pool.lookup(key, self._block_tokens(req, i))
            if b is None:
                break
            hits.append(b)
        if self.write_policy == "write_through_selective" and self._unsaved:  # reused: worth keeping
            self._save([b.block_id for b in hits], to_all=True)
        return hits

    def load_stored(
        self, req: Request, cached: list[Block], max_new_tokens: int
    ) -> tuple[list[Block], list[str]] | None:
        """Load the store's chunks that continue the device prefix `cached` into fresh blocks, register
        them like computed blocks and return them (free and cached, ready for `allocate`) with the tier
        each came from. None (nothing loaded) when the store has some but the pool could not hold them
        and the request's next `max_new_tokens` now: the caller waits for room rather than recompute."""
        if self.store is None:
            return [], []
        keys = self._reusable_keys(req)[len(cached) :]
        runs = self.store.find(keys) if keys else []
        n = sum(count for _, count in runs)
        if not n:
            return [], []
        rest = req.num_tokens - req.num_computed_tokens - (len(cached) + n) * self.block_size
        if self.blocks_needed(req, min(rest, max_new_tokens), cached, n) > self.pool.num_free_blocks:
            return None
        self.pool.touch(cached)  # keep the device prefix out of the allocation below
        blocks = self.pool.allocate(n)
        self.pool.release(reversed(cached))

        def copy_in(i: int, chunk: LoadedChunk) -> None:
            self.write_block(blocks[i].block_id, chunk.kv)

        chunks = self.store.load(keys[:n], sink=copy_in, runs=runs)
        first = len(cached)
        good = 0
        for j, c in enumerate(chunks):  # the token ids guard against hash collisions
            if c.header.token_ids != self._block_tokens(req, first + j):
                break
            self.pool.register(blocks[j], keys[j], c.header.token_ids)
            good += 1
        self.pool.release(reversed(blocks))
        return blocks[:good], [c.tier for c in chunks[:good]]

    # ---- blending (engine.blend) -----------------------------------------------------------------------

    def find_segments(self, req: Request, start: int) -> list[int]:
        """Start positions of stored segment windows in `req`'s prompt from `start` on (the last token is
        always computed); [] when there is no store."""
        if self.store is None or self.device is None:
            return []
        end = req.num_tokens - 1
        if end - start < blend.MIN_RUN * self.block_size:
            return []
        keys = blend.window_keys(req.cache_root, req.all_token_ids, start, end, self.block_size)
        starts = blend.pick_windows(self.store.present(keys), start, end, self.block_size)
        work = blend.compute_fraction(req.blend, self.num_layers, end + 1 - start, starts, self.block_size)
        if work >= blend.WORTH_BELOW:
            return []  # too little found to beat a prefill
        return starts

    def assemble(self, req: Request, starts: list[int], options: blend.BlendOptions) -> int:
        """Load the windows at `starts` into `req`'s blocks (allocated to the prompt's end) at their
        positions, and set up its blended step; the number of tokens loaded (0: nothing to blend, the
        request prefills as usual)."""
        bs = self.block_size
        want = [segment_key(req.cache_root, req.all_token_ids[s : s + bs]) for s in starts]
        found: list[tuple[int, LoadedChunk]] = []

        def keep(i: int, chunk: LoadedChunk) -> None:
            h = chunk.header
            if h.token_ids == tuple(req.all_token_ids[starts[i] : starts[i] + bs]) and h.position is not None:
                found.append((starts[i], chunk))  # else a hash collision or a chunk without its position

        self.store.load(want, sink=keep, count=False)  # blended tokens are counted by the step
        if len(found) < blend.MIN_RUN:
            return 0
        covered = torch.cat([torch.arange(s, s + bs) for s, _ in found])
        computed_at = torch.cat([torch.arange(c.header.position, c.header.position + bs) for _, c in found])
        kv = self.device.place(req, covered, torch.cat([c.kv for _, c in found], 3), computed_at)
        req.exact_until = req.num_computed_tokens
        check = min(options.check_layer, kv.shape[0] - 1)
        loaded_check = kv[check].clone() if options.ratio > 0 else None
        req.blend_plan = blend.BlendPlan(options, req.num_computed_tokens, covered, loaded_check)
        req.blend_covered = covered
        return len(covered)

    def _save_segments(self, req: Request) -> None:
        """Queue the prompt's segment windows that the store lacks (from each explicit segment's start,
        else from the prompt's; never over loaded KV of a blended prefill)."""
        if self.store is None or self.device is None:
            return
        bs = self.block_size
        covered = set(req.blend_covered.tolist()) if req.blend_covered is not None else set()
        starts = set()
        for a, b in req.segments or [(0, len(req.prompt_token_ids))]:
            starts.update(s for s in range(a, b - bs + 1, bs) if covered.isdisjoint(range(s, s + bs)))
        starts = sorted(starts)
        if not starts:
            return
        keys = {s: segment_key(req.cache_root, req.all_token_ids[s : s + bs]) for s in starts}
        todo = [s for s, present in zip(starts, self.store.present(list(keys.values()))) if not present]
        if not todo:
            return
        kv = self.device.read_positions(req, torch.cat([torch.arange(s, s + bs) for s in todo]))
        dtype = str(kv.dtype).removeprefix("torch.")
        chunks = []
        for j, s in enumerate(todo):
            part = kv[:, :, :, j * bs : (j + 1) * bs]
            header = ChunkHeader(
                key=keys[s],
                parent=NO_PARENT,
                fingerprint=self.fingerprint,
                dtype=dtype,
                shape=tuple(part.shape),
                token_ids=tuple(req.all_token_ids[s : s + bs]),
                position=s,
            )
            chunks.append((header, part, self.cost.of_block(s, bs)))
        self.store.save(chunks, first_tier_only=self.write_policy != "write_through")

    def prefetch(self, req: Request) -> None:
        """Start moving the stored part of a queued request's prefix into the fastest tier."""
        if self.store is not None:
            req.prefetch = self.store.prefetch(self._reusable_keys(req)[len(self.cached_prefix(req)) :])

    # ---- blocks ---------------------------------------------------------------------------------------

    def blocks_needed(self, req: Request, num_new_tokens: int, cached: list[Block] = (), num_loaded: int = 0) -> int:
        have = len(req.blocks) + len(cached)
        reused = (len(cached) + num_loaded) * self.block_size
        need = -(-(req.num_computed_tokens + reused + num_new_tokens) // self.block_size)
        # reusing a free cached block also takes it off the free queue
        return max(0, need - have) + sum(1 for b in cached if b.ref_cnt == 0)

    def allocate(self, req: Request, num_new_tokens: int, cached: list[Block] = ()) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens after the cached blocks `cached`; False (and
        no change) if the pool is short."""
        if self.blocks_needed(req, num_new_tokens, cached) > self.pool.num_free_blocks:
            return False
        if cached:
            self.pool.touch(cached)
            req.blocks.extend(cached)
            req.num_computed_tokens += len(cached) * self.block_size
        need = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - len(req.blocks)
        if need > 0:
            req.blocks.extend(self.pool.allocate(need))
        return True

    def register_full_blocks(self, req: Request) -> None:
        """Make every block filled by computed tokens findable for later requests; the ones this request
        computed itself go to the store now (write_through) or wait for `_write_back` / `flush`."""
        if not self.pool.enable_caching:
            return
        if req.blend is not None and not req.segments_saved and req.num_computed_tokens >= len(req.prompt_token_ids):
            req.segments_saved = True
            self._save_segments(req)
        exact = req.num_computed_tokens if req.exact_until is None else min(req.num_computed_tokens, req.exact_until)
        full = exact // self.block_size
        self._extend_keys(req, full * self.block_size)
        new = []
        for i in range(full):
            b = req.blocks[i]
            if b.key is None and self.pool.register(b, req.block_keys[i], self._block_tokens(req, i)):
                new.append(i)
        if self.store is None or self.read_blocks is None:
            return
        for i in new:
            if i >= req.num_reused_blocks:
                parent = req.block_keys[i - 1] if i else req.cache_root
                self._unsaved[req.blocks[i].block_id] = (req.block_keys[i], parent, i, self._block_tokens(req, i))
        if self.write_policy == "write_through":
            self._save([req.blocks[i].block_id for i in new], to_all=True)

    def free(self, req: Request) -> None:
        self.pool.release(reversed(req.blocks))
        req.blocks = []

    def flush(self) -> None:
        """Write every block the device cache holds and the store lacks (clean close, interpreter exit),
        and wait until the store has written everything queued."""
        if self.store is None:
            return
        live = [bid for bid, (key, *_) in self._unsaved.items() if self.pool.blocks[bid].key == key]
        self._save(live, to_all=True)
        self._unsaved.clear()
        self.store.flush()

    def _write_back(self, evicted: list[tuple[int, bytes]]) -> None:
        """The pool is about to reuse these cached blocks: their KV goes to the store's fastest tier first."""
        self._save([bid for bid, key in evicted if self._unsaved.get(bid, (None,))[0] == key], to_all=False)

    def _save(self, block_ids: list[int], to_all: bool) -> None:
        """Queue the unsaved ones of `block_ids` for the store (copied now: the pool may reuse them)."""
        todo = [(bid, self._unsaved.pop(bid)) for bid in block_ids if bid in self._unsaved]
        if not todo:
            return
        kv = self.read_blocks([bid for bid, _ in todo])
        dtype = str(kv.dtype).removeprefix("torch.")
        chunks = []
        for j, (_, (key, parent, i, token_ids)) in enumerate(todo):
            part = kv[:, :, :, j]
            header = ChunkHeader(
                key=key,
                parent=parent,
                fingerprint=self.fingerprint,
                dtype=dtype,
                shape=tuple(part.shape),
                token_ids=token_ids,
                position=i * self.block_size,
            )
            chunks.append((header, part, self.cost.of_block(i * self.block_size, self.block_size)))
        self.store.save(chunks, first_tier_only=not to_all)
