"""The store's tier policy on real tiers: longest run across tiers, verification, promotion, demotion."""

from __future__ import annotations

import threading

import torch

from kvtrove.kv.format import ChunkHeader, encode
from kvtrove.kv.store import KVStore
from kvtrove.kv.tiers.disk import DiskTier
from kvtrove.kv.tiers.host import HostTier

FP = b"\x07" * 16
SHAPE = (2, 2, 1, 4, 8)  # layers, k/v, KV heads, tokens, head dim


def chunk(i: int, dtype=torch.float32, fingerprint=FP):
    kv = torch.full(SHAPE, float(i)).to(dtype)
    header = ChunkHeader(
        key=bytes([i]) * 16,
        parent=bytes([i - 1]) * 16 if i else FP,
        fingerprint=fingerprint,
        dtype=str(dtype).removeprefix("torch."),
        shape=SHAPE,
        token_ids=tuple(range(4 * i, 4 * i + 4)),
    )
    return header, kv


def store(tmp_path, host_bytes=10**6):
    return KVStore([HostTier(host_bytes), DiskTier(tmp_path, 10**6)], FP, torch.float32)


def keys(n: int) -> list[bytes]:
    return [bytes([i]) * 16 for i in range(n)]


def test_save_then_load_in_order(tmp_path):
    s = store(tmp_path)
    s.save([(*chunk(i), float(i)) for i in range(5)])
    s.flush()
    got = s.load(keys(7))
    assert [int(c.kv[0, 0, 0, 0, 0]) for c in got] == [0, 1, 2, 3, 4]
    assert {c.tier for c in got} == {"host"}
    assert s.load([bytes([9]) * 16] + keys(3)) == []  # a run starts at the first key
    assert len(s.load(keys(3))) == 3
    s.close()


def test_writes_go_through_and_host_evictions_move_down(tmp_path):
    sizes = [len(encode(*chunk(i))) for i in range(6)]
    assert 2 * max(sizes) < 3 * min(sizes)
    s = store(tmp_path, host_bytes=2 * max(sizes))  # the host holds two chunks
    s.save([(*chunk(i), 0.0) for i in range(6)])
    s.flush()
    st = s.stats()
    assert st["host"]["entries"] == 2 and st["host"]["evictions"] == 4
    assert st["disk"]["entries"] == 6  # written through
    got = s.load(keys(6))
    assert [c.tier for c in got] == ["disk"] * 6
    s.flush()
    assert s.tiers[0].exists(keys(6)[4:]) == [True, True]  # the disk hits were copied up into the host tier
    # a chunk only the host holds is not lost when the host evicts it: it moves down to disk
    host, disk = s.tiers
    header, kv = chunk(7)
    host.put([(header.key, encode(header, kv), 0.0)])
    host.put([(h.key, encode(h, v), 0.0) for h, v in (chunk(8), chunk(9))])
    s.flush()
    assert host.exists([header.key]) == [False] and disk.exists([header.key]) == [True]
    assert s.stats()["disk"]["tokens_saved"] == 6 * SHAPE[3]
    s.close()


def test_host_only_writes_reach_disk_by_eviction_or_sync_down(tmp_path):
    sizes = [len(encode(*chunk(i))) for i in range(8)]
    s = store(tmp_path, host_bytes=3 * max(sizes))  # the host holds three chunks
    s.save([(*chunk(i), 0.0) for i in range(8)], first_tier_only=True)
    s.flush()
    host, disk = s.tiers
    assert disk.exists(keys(8)) == [True] * 5 + [False] * 3  # the host's evictions moved down, nothing else
    assert len(s._down) == 3  # what the host evicted is no longer waiting for sync_down
    s.sync_down(lambda: False)  # not idle: nothing moves
    s.flush()
    assert disk.exists(keys(8))[5:] == [False] * 3
    s.sync_down()
    s.flush()
    assert disk.exists(keys(8)) == [True] * 8 and host.exists(keys(8))[5:] == [True] * 3 and not s._down
    assert len(s.load(keys(8))) == 8
    s.close()


def test_prefetch_copies_disk_hits_into_host(tmp_path):
    s = KVStore([HostTier(10**6), DiskTier(tmp_path, 10**6)], FP, torch.float32)
    s.tiers[1].put([(h.key, encode(h, kv), 0.0) for h, kv in (chunk(i) for i in range(4))])
    assert s.tiers[0].exists(keys(4)) == [False] * 4
    s.prefetch(keys(4)).result()
    assert s.tiers[0].exists(keys(4)) == [True] * 4
    # served from the host copy, reported as the disk hit it is
    assert [c.tier for c in s.load(keys(4))] == ["disk"] * 4
    assert s.stats()["host"]["hits"] == 4 and s.stats()["disk"]["tokens_saved"] == 4 * SHAPE[3]
    assert [c.tier for c in s.load(keys(4))] == ["host"] * 4
    s.close()


def test_break_even_skips_a_tier_slower_than_recomputing(tmp_path):
    from kvtrove.kv.breakeven import BreakEven

    be = BreakEven(bytes_per_token=1000)
    s = KVStore([DiskTier(tmp_path, 10**6)], FP, torch.float32, be)
    s.save([(*chunk(i), 0.0) for i in range(3)])
    s.flush()
    assert len(s.load(keys(3))) == 3  # nothing measured yet: loading is assumed to win
    be.bandwidth["disk"] = 10e6  # 10,000 tokens/s from disk
    be.prefill_rate = 50_000.0  # recomputing is faster
    be._probed["disk"] = float("inf")
    assert s.load(keys(3)) == [] and s.skipped["disk"] == 1
    be.prefill_rate = 500.0
    assert len(s.load(keys(3))) == 3
    s.close()


def test_bad_chunks_are_dropped_counted_and_end_the_run(tmp_path):
    s = KVStore([DiskTier(tmp_path, 10**6)], FP, torch.float32)
    good = [chunk(i) for i in range(4)]
    s.save([(h, kv, 0.0) for h, kv in good])
    s.flush()
    disk = s.tiers[0]
    path = disk._path(keys(4)[2])
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))  # corrupt chunk 2
    got = s.load(keys(4))
    assert len(got) == 2 and s.rejected["checksum"] == 1
    assert not path.exists() and disk.stats().rejected == 1
    # a chunk from another model under a valid key
    foreign_header, kv = chunk(2, fingerprint=b"\x08" * 16)
    disk.put([(foreign_header.key, encode(foreign_header, kv), 0.0)])
    assert len(s.load(keys(4))) == 2 and s.rejected["foreign"] == 1
    # a chunk swapped under another key
    disk.put([(keys(4)[2], encode(*chunk(3)), 0.0)])
    assert len(s.load(keys(4))) == 2 and s.rejected["key"] == 1
    s.close()


def test_write_backlog_is_bounded(tmp_path):
    s = KVStore([HostTier(10**6)], FP, torch.float32, max_backlog_bytes=3 * chunk(0)[1].nbytes)
    gate = threading.Event()
    s._jobs.put(gate.wait)  # the writer is stuck behind a slow write
    for i in range(5):
        s.save([(*chunk(i), 0.0)])
    assert s.dropped_writes == 2  # three fit the backlog; the rest are dropped, not queued
    gate.set()
    s.flush()
    assert s.stats()["host"]["entries"] == 3 and s._backlog.bytes == 0
    s.close()


def test_chunks_queued_for_writing_are_found_and_loaded_meanwhile(tmp_path):
    s = store(tmp_path)
    s.save([(*chunk(0), 0.0)])
    s.flush()  # chunk 0 in the tiers
    gate = threading.Event()
    s._jobs.put(gate.wait)  # the writer is stuck behind a slow write
    s.save([(*chunk(i), 0.0) for i in (1, 2)], first_tier_only=True)
    assert s.find(keys(4)) == [(s.tiers[0], 1), (s._queued, 2)]
    assert s.prefetch(keys(3)).result(timeout=10) == [None] * 3  # nothing to copy up
    sunk = []
    got = s.load(keys(4), sink=lambda i, c: sunk.append(i))
    assert [int(c.kv[0, 0, 0, 0, 0]) for c in got] == [0, 1, 2] and sunk == [0, 1, 2]
    assert [c.tier for c in got] == ["host"] * 3 and s.stats()["host"]["tokens_saved"] == 12
    assert s.stats()["host"]["entries"] == 1  # 1 and 2 came from the queue, not yet written
    gate.set()
    s.flush()
    assert s.stats()["host"]["entries"] == 3 and s._queued.prefix_hits(keys(3)) == 0  # written: queue empty
    assert len(s.load(keys(4))) == 3
    s.close()


def test_chunks_written_between_find_and_load_are_read_from_their_tier(tmp_path):
    """A chunk the writer stores after `find` saw it queued is read from the tier it went to, not lost."""
    s = store(tmp_path)
    gate = threading.Event()
    s._jobs.put(gate.wait)
    s.save([(*chunk(i), 0.0) for i in range(3)], first_tier_only=True)
    runs = s.find(keys(3))
    assert runs == [(s._queued, 3)]
    gate.set()
    s.flush()  # written meanwhile: the queue is empty
    got = s.load(keys(3), runs=runs)
    assert [int(c.kv[0, 0, 0, 0, 0]) for c in got] == [0, 1, 2] and [c.tier for c in got] == ["host"] * 3
    s.close()
