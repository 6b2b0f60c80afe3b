"""Storage tiers on their own: eviction order, capacity, restart, atomic files, failing directories."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import stat

import pytest

from kvtrove.kv.eviction import Eviction
from kvtrove.kv.tiers.disk import DiskTier
from kvtrove.kv.tiers.host import HostTier


def k(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_lru_and_cost_orders():
    lru = Eviction("lru")
    for i in range(3):
        lru.add(k(i), 10)
    lru.touch(k(0))
    assert lru.victim() == k(1)
    cost = Eviction("cost")
    cost.add(k(0), 10, cost=5.0)  # deep chunk: expensive to recompute
    cost.add(k(1), 10, cost=1.0)
    cost.add(k(2), 10, cost=1.0)
    assert cost.victim() == k(1)  # cheapest per byte, least recently used among equals
    cost.touch(k(1))
    assert cost.victim() == k(2)
    cost.remove(k(2))
    assert cost.victim() == k(1)
    with pytest.raises(ValueError, match="eviction policy"):
        Eviction("fifo")


@pytest.mark.parametrize("policy", ["lru", "cost"])
def test_host_tier_capacity_and_eviction(policy):
    evicted = []
    tier = HostTier(1000, policy, on_evict=lambda key, value, cost: evicted.append(key))
    for i in range(50):
        tier.put([(k(i), bytes([i]) * 100, float(i))])
        assert tier.stats().bytes <= 1000
    s = tier.stats()
    assert s.entries == 10 and s.evictions == 40 and len(evicted) == 40
    assert tier.get([k(49), k(0)]) == [bytes([49]) * 100, None]
    tier.put([(k(99), b"x" * 2000, 0.0)])  # larger than the tier: skipped
    assert tier.exists([k(99)]) == [False]
    assert tier.prefix_hits([k(48), k(49), k(0), k(47)]) == 2
    tier.delete([k(49)], rejected=True)
    assert tier.stats().rejected == 1 and tier.exists([k(49)]) == [False]


def test_disk_tier_round_trip_capacity_and_restart(tmp_path):
    tier = DiskTier(tmp_path, 1000)
    for i in range(30):
        tier.put([(k(i), bytes([i]) * 100, 0.0)])
    s = tier.stats()
    assert s.bytes <= 1000 and s.entries == 10 and s.evictions == 20
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*.kvc"))
    assert on_disk == s.bytes
    assert not list(tmp_path.rglob("*.tmp"))
    assert tier.get([k(29), k(0)]) == [bytes([29]) * 100, None]
    tier.get([k(20)])  # most recently used from now on
    # a new engine on the same directory finds every chunk, in LRU order by file time
    again = DiskTier(tmp_path, 1000)
    assert again.stats().entries == 10
    assert again.get([k(25)]) == [bytes([25]) * 100]
    again.put([(k(100), b"z" * 100, 0.0)])
    assert again.stats().bytes <= 1000
    again.clear()
    assert again.stats().entries == 0 and not list(tmp_path.rglob("*.kvc"))


def _writer(root: str, seed: int, q) -> None:
    try:
        tier = DiskTier(root, 10**7)
        for r in range(200):
            i = (r * 7 + seed) % 40
            tier.put([(k(i), bytes([i]) * 5000, 0.0)])
            got = tier.get([k((i + 3) % 40)])[0]
            assert got is None or got == bytes([(i + 3) % 40]) * 5000, "torn or wrong read"
        q.put("ok")
    except Exception as e:  # reported to the parent
        q.put(repr(e))


def test_disk_tier_shared_by_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, q)) for s in (0, 1)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert results == ["ok", "ok"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert all(f.stat().st_size == 5000 for f in tmp_path.rglob("*.kvc"))


def test_disk_tier_read_only_directory(tmp_path, caplog, monkeypatch):
    tier = DiskTier(tmp_path, 10**6, cooldown_s=0.0)
    if os.geteuid() != 0:
        tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    else:  # root ignores permissions: fail the way a read-only directory does
        import kvtrove.kv.tiers.disk as disk

        def denied(*_, **__):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(disk, "open", denied, raising=False)
    try:
        with caplog.at_level(logging.WARNING):
            tier.put([(k(1), b"x" * 10, 0.0)])
        assert "Permission denied" in caplog.text
        assert tier.get([k(1)]) == [None]
    finally:
        tmp_path.chmod(stat.S_IRWXU)


def test_disk_tier_directory_removed_then_recovers(tmp_path, caplog):
    root = tmp_path / "kv"
    tier = DiskTier(root, 10**6, cooldown_s=0.0)
    tier.put([(k(1), b"a" * 10, 0.0)])
    for f in root.rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted(root.rglob("*"), reverse=True):
        d.rmdir()
    root.rmdir()
    assert tier.get([k(1)]) == [None]  # gone: a miss, not an error
    tier.put([(k(2), b"b" * 10, 0.0)])  # the directory is recreated
    assert tier.get([k(2)]) == [b"b" * 10]


def test_disk_tier_full_disk_is_a_warning(tmp_path, caplog, monkeypatch):
    tier = DiskTier(tmp_path, 10**6, cooldown_s=60.0)

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with caplog.at_level(logging.WARNING):
        tier.put([(k(1), b"x" * 10, 0.0)])
        tier.put([(k(2), b"x" * 10, 0.0)])  # off for the cool-down: no second attempt, no raise
    assert caplog.text.count("No space left") == 1
    assert tier.get([k(1)]) == [None] and not list(tmp_path.rglob("*.tmp"))
