"""The store's tier policy on real tiers: longest run across tiers, verification, promotion, demotion."""

from __future__ import annotations

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


def test_evicted_chunks_move_down_and_come_back_up(tmp_path):
    sizes = [len(encode(*chunk(i))) for i in range(6)]
    assert 2 * max(sizes) < 3 * min(sizes)
    s = store(tmp_path, host_bytes=2 * max(sizes))  # the host holds two chunks
    s.save([(*chunk(i), 0.0) for i in range(6)])
    s.flush()
    st = s.stats()
    assert st["host"]["entries"] == 2 and st["host"]["evictions"] == 4
    assert st["disk"]["entries"] == 4  # nothing lost: evicted chunks went to disk
    got = s.load(keys(6))
    assert [c.tier for c in got] == ["disk"] * 4 + ["host"] * 2
    s.flush()
    assert s.stats()["host"]["hits"] >= 2
    assert s.tiers[0].exists([keys(6)[3]]) == [True]  # the disk hits were copied up into the host tier
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
