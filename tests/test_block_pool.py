"""Block pool invariants: LRU order of free blocks, reference counts, collision guard."""

from __future__ import annotations

from kvtrove.engine.block_pool import BlockPool
from kvtrove.kv.keys import block_key, chain_keys


def test_lru_evicts_least_recently_freed_first():
    pool = BlockPool(4, enable_caching=True)
    a = pool.allocate(2)
    for i, b in enumerate(a):
        pool.register(b, bytes([i]) * 16, (i,))
    pool.release(reversed(a))  # tail first: a[1] is evicted before a[0]
    assert pool.num_free_blocks == 4
    fresh = pool.allocate(3)  # the two never-used blocks, then a[1]
    assert a[1] in fresh and a[0] not in fresh
    assert pool.lookup(bytes([0]) * 16, (0,)) is a[0]
    assert pool.lookup(bytes([1]) * 16, (1,)) is None


def test_touch_and_release_refcounts():
    pool = BlockPool(2, enable_caching=True)
    (b,) = pool.allocate(1)
    pool.register(b, b"k" * 16, (1, 2))
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.release([b])
    assert pool.num_free_blocks == 1
    pool.release([b])
    assert pool.num_free_blocks == 2 and pool.lookup(b"k" * 16, (1, 2)) is b
    pool.touch([b])
    assert pool.num_free_blocks == 1 and b.ref_cnt == 1


def test_lookup_compares_tokens():
    pool = BlockPool(1, enable_caching=True)
    (b,) = pool.allocate(1)
    pool.register(b, b"k" * 16, (1, 2))
    assert pool.lookup(b"k" * 16, (1, 3)) is None


def test_chained_keys_depend_on_the_whole_prefix():
    fp = b"model"
    a = chain_keys(fp, [1, 2, 3, 4, 5], 2)
    b = chain_keys(fp, [9, 2, 3, 4], 2)
    assert len(a) == 2 and len(b) == 2
    assert a[1] != b[1]
    assert a[0] == block_key(fp, [1, 2])
    assert chain_keys(b"other model", [1, 2], 2)[0] != a[0]
