"""A pool of fixed-size KV blocks with reference counts and a content-addressed prefix cache."""

from __future__ import annotations

from collections.abc import Callable, Iterable


class Block:
    __slots__ = ("block_id", "key", "next", "prev", "ref_cnt", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.key: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.prev: Block | None = None
        self.next: Block | None = None


class FreeBlockQueue:
    """Blocks with ref_cnt == 0, least recently used at the front; O(1) append, pop and remove.

    A doubly linked list threaded through the blocks themselves.
    """

    def __init__(self, blocks: list[Block]):
        self.head, self.tail = Block(-1), Block(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.size = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self.size

    def append(self, b: Block) -> None:
        last = self.tail.prev
        last.next, b.prev, b.next, self.tail.prev = b, last, self.tail, b
        self.size += 1

    def remove(self, b: Block) -> None:
        b.prev.next, b.next.prev = b.next, b.prev
        b.prev = b.next = None
        self.size -= 1

    def popleft(self) -> Block:
        b = self.head.next
        if b is self.tail:
            raise RuntimeError("no free KV block")
        self.remove(b)
        return b


class BlockPool:
    """Invariant: a block is in the free queue iff its ref_cnt is 0; a block with a key is findable by it
    until it is handed out again (free cached blocks are evicted LRU-first)."""

    def __init__(self, num_blocks: int, enable_caching: bool):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.on_evict: Callable[[list[tuple[int, bytes]]], None] | None = None
        """Told (block id, key) of cached blocks `allocate` is about to hand out again, while their KV is
        still intact (the KV manager writes them back to the store)."""

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def lookup(self, key: bytes, token_ids: tuple[int, ...]) -> Block | None:
        b = self.cached.get(key)
        if b is None or b.token_ids != token_ids:  # token ids guard against hash collisions
            return None
        return b

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on cached blocks being reused."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free.remove(b)
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[Block]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free)} free")
        out, evicted = [], []
        for _ in range(n):
            b = self.free.popleft()
            if b.key is not None:
                evicted.append((b.block_id, b.key))
                del self.cached[b.key]
                b.key = b.token_ids = None
            b.ref_cnt = 1
            out.append(b)
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)
        return out

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block; give blocks in eviction order (tail of a chain first)."""
        for b in blocks:
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self.free.append(b)

    def register(self, block: Block, key: bytes, token_ids: tuple[int, ...]) -> bool:
        """Make a full block findable by its key (first writer wins; a duplicate stays private)."""
        if not self.enable_caching or block.key is not None or key in self.cached:
            return False
        block.key, block.token_ids = key, token_ids
        self.cached[key] = block
        return True

    def reset_cache(self) -> None:
        for b in self.cached.values():
            b.key = b.token_ids = None
        self.cached.clear()
