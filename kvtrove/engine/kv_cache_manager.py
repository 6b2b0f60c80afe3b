"""The scheduler's narrow view of the block pool: find cached prefixes, grow block tables, free them."""

from __future__ import annotations

from kvtrove.engine.block_pool import Block, BlockPool
from kvtrove.engine.request import Request
from kvtrove.kv.keys import block_key


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, fingerprint: bytes):
        self.pool = pool
        self.block_size = block_size
        self.fingerprint = fingerprint

    def _extend_keys(self, req: Request, num_tokens: int) -> None:
        bs = self.block_size
        for i in range(len(req.block_keys), num_tokens // bs):
            parent = req.block_keys[-1] if req.block_keys else self.fingerprint
            req.block_keys.append(block_key(parent, req.all_token_ids[i * bs : (i + 1) * bs]))

    def cached_prefix(self, req: Request) -> list[Block]:
        """Cached blocks of the longest prefix, leaving at least the last token to compute."""
        if not self.pool.enable_caching:
            return []
        bs = self.block_size
        self._extend_keys(req, req.num_tokens)
        hits = []
        for i in range((req.num_tokens - 1) // bs):
            b = self.pool.lookup(req.block_keys[i], tuple(req.all_token_ids[i * bs : (i + 1) * bs]))
            if b is None:
                break
            hits.append(b)
        return hits

    def blocks_needed(self, req: Request, num_new_tokens: int, cached: list[Block] = ()) -> int:
        have = len(req.blocks) + len(cached)
        need = -(-(req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens) // self.block_size)
        # reusing a free cached block also takes it off the free queue
        return max(0, need - have) + sum(1 for b in cached if b.ref_cnt == 0)

    def allocate(self, req: Request, num_new_tokens: int, cached: list[Block] = ()) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens (after `cached`); False if the pool is short."""
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
        """Make every block filled by computed tokens findable for later requests."""
        if not self.pool.enable_caching:
            return
        bs = self.block_size
        full = req.num_computed_tokens // bs
        self._extend_keys(req, full * bs)
        for i in range(full):
            b = req.blocks[i]
            if b.key is None:
                self.pool.register(b, req.block_keys[i], tuple(req.all_token_ids[i * bs : (i + 1) * bs]))

    def free(self, req: Request) -> None:
        self.pool.release(reversed(req.blocks))
        req.blocks = []
