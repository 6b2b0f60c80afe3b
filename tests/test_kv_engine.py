"""The KV store under the engine, on the real default model: outputs, restarts, bad bytes, failing disks,
two processes, capacity."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtrove import LLM, SamplingParams
from kvtrove.kv import ledger
from kvtrove.kv.format import ChunkHeader, encode
from kvtrove.kv.keys import chain_keys
from kvtrove.kv.tiers.disk import SUFFIX, DiskTier
from tests.helpers import assert_all_blocks_free

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
BS = 16
DOC = (
    "The lighthouse keeper kept a log of every ship that passed the rocky point, the weather of each day, "
    "and the colour of the sea at dawn. "
)
PROMPTS = [DOC * 4 + "Summarise the log in one line.", DOC * 4 + "What did the keeper record?", DOC * 2 + "Why?"]


def engine(smollm_path, disk: Path | None, host_gb: float = 0.5, **kw) -> LLM:
    """A small device pool (so blocks of earlier prompts are soon reused and the store must serve them)."""
    kv = dict(kv_disk_dir=str(disk), kv_disk_gb=kw.pop("kv_disk_gb", 0.5)) if disk else dict(kv_disk_gb=0)
    return LLM(model=smollm_path, num_blocks=kw.pop("num_blocks", 96), kv_host_gb=host_gb, **kv, **kw)


def forget_device(llm: LLM) -> None:
    llm.engine.flush_kv()
    llm.engine.pool.reset_cache()


def full_blocks(out) -> int:
    return (out.prompt_tokens - 1) // BS * BS


@pytest.fixture(scope="module")
def reference(smollm_path):
    llm = LLM(model=smollm_path, enable_prefix_caching=False, num_blocks=96)
    assert llm.engine.store is None
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize(
    "tiers",
    [
        dict(host_gb=0.5, disk=False),
        dict(host_gb=0, disk=True),
        dict(host_gb=0.5, disk=True, eviction="cost"),
        dict(host_gb=0.003, disk=True, eviction="host=cost,disk=lru"),  # a host tier of ~4 chunks
        dict(host_gb=0.5, disk=True, kv_write_policy="write_through"),
        dict(host_gb=0.003, disk=True, kv_write_policy="write_through_selective"),
    ],
    ids=["host", "disk", "host+disk-cost", "tiny-host+disk", "write-through", "selective"],
)
def test_greedy_output_equals_caching_off(smollm_path, reference, tmp_path, tiers):
    disk = tmp_path / "kv" if tiers.pop("disk") else None
    llm = engine(smollm_path, disk, tiers.pop("host_gb"), **tiers)
    for round in range(3):  # cold, then served by the store (the device pool is reset in between)
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == reference, f"round {round}"
        if round:
            assert all(o.cached_tokens == full_blocks(o) for o in outs)
            stored = sum(n for t, n in outs[0].cached_tokens_by_tier.items() if t != "device")
            assert stored > 0
        forget_device(llm)
    assert_all_blocks_free(llm)
    llm.close()


def test_restart_serves_a_long_prompt_from_disk(smollm_path, reference, tmp_path):
    disk = tmp_path / "kv"
    with engine(smollm_path, disk) as first:
        cold = first.generate(PROMPTS[0], GREEDY)[0]
        assert cold.cached_tokens == 0
    with engine(smollm_path, disk) as second:  # a new process would see the same directory
        warm = second.generate(PROMPTS[0], GREEDY)[0]
        assert warm.token_ids == reference[0]
        assert warm.cached_tokens_by_tier["disk"] == full_blocks(warm) > 100
        assert warm.cached_tokens_by_tier["host"] == 0
    totals = ledger.read(disk)  # both engines' counters were recorded next to the chunks
    assert totals["disk"]["tokens_saved"] == full_blocks(warm)

    def cache_cli(action: str) -> str:
        cmd = [sys.executable, "-m", "kvtrove.cli", "cache", action, "--kv-disk-dir", str(disk)]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    out = cache_cli("stats")
    assert "chunks" in out and "tokens_saved" in out
    out = cache_cli("clear")
    assert "removed" in out and not list(disk.rglob("*" + SUFFIX)) and ledger.read(disk) == {}


def _files(llm: LLM, out) -> list[Path]:
    """The disk files of the prompt's full blocks, in order."""
    req_keys = chain_keys(llm.engine.fingerprint, out.prompt_token_ids, BS)[: full_blocks(out) // BS]
    disk = next(t for t in llm.engine.store.tiers if isinstance(t, DiskTier))
    return [disk._path(k) for k in req_keys]


def _corrupt(paths: list[Path], fingerprint: bytes) -> str:
    data = bytearray(paths[3].read_bytes())
    data[len(data) // 2] ^= 0x40
    paths[3].write_bytes(bytes(data))
    return "checksum", 1


def _truncate(paths: list[Path], fingerprint: bytes) -> str:
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) - 1000])
    return "checksum", 1  # the digest no longer covers what is there


def _swap(paths: list[Path], fingerprint: bytes) -> str:
    a, b = paths[3].read_bytes(), paths[4].read_bytes()
    paths[3].write_bytes(b)
    paths[4].write_bytes(a)
    return "key", 2


def _foreign(paths: list[Path], fingerprint: bytes) -> str:
    import torch

    key = bytes.fromhex(paths[3].stem)
    kv = torch.zeros(30, 2, 3, BS, 64, dtype=torch.bfloat16)
    header = ChunkHeader(key, b"\0" * 16, fingerprint, "bfloat16", tuple(kv.shape), tuple(range(BS)))
    paths[3].write_bytes(encode(header, kv))  # a valid chunk of this model, but in another dtype
    return "foreign", 1


def _other_model(paths: list[Path], fingerprint: bytes) -> str:
    import torch

    key = bytes.fromhex(paths[3].stem)
    kv = torch.zeros(30, 2, 3, BS, 64)
    header = ChunkHeader(key, b"\0" * 16, b"\x01" * 16, "float32", tuple(kv.shape), tuple(range(BS)))
    paths[3].write_bytes(encode(header, kv))
    return "foreign", 1


def _wrong_shape(paths: list[Path], fingerprint: bytes) -> str:
    import torch

    key = bytes.fromhex(paths[3].stem)
    kv = torch.zeros(30, 1, 3, BS, 128)  # this model's key, fingerprint and dtype; not its block layout
    header = ChunkHeader(key, b"\0" * 16, fingerprint, "float32", tuple(kv.shape), tuple(range(BS)))
    paths[3].write_bytes(encode(header, kv))
    return "shape", 1


@pytest.mark.parametrize("fault", [_corrupt, _truncate, _swap, _foreign, _other_model, _wrong_shape])
def test_bad_chunks_on_disk_are_dropped_counted_and_recomputed(smollm_path, reference, tmp_path, fault):
    llm = engine(smollm_path, tmp_path / "kv", host_gb=0)  # disk only: every hit is read from the files
    first = llm.generate(PROMPTS[0], GREEDY)[0]
    forget_device(llm)
    paths = _files(llm, first)
    assert all(p.exists() for p in paths)
    reason, damaged = fault(paths, llm.engine.fingerprint)
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    assert out.token_ids == reference[0]
    assert out.cached_tokens_by_tier["disk"] == 3 * BS  # the run ends at the bad chunk
    assert llm.engine.store.rejected == {reason: 1}
    assert llm.cache_stats()["disk"]["rejected"] == 1
    for _ in range(damaged):  # each damaged file is found when a run reaches it; recomputed blocks are stored again
        forget_device(llm)
        again = llm.generate(PROMPTS[0], GREEDY)[0]
        assert again.token_ids == reference[0]
    assert again.cached_tokens_by_tier["disk"] == full_blocks(again)
    assert llm.engine.store.rejected == {reason: damaged}
    llm.close()


class FailingDisk:
    """Makes every write to disk tiers fail with `err` while active."""

    def __init__(self, monkeypatch, err: int):
        self.active = True
        orig = DiskTier._write

        def write(tier, *args):
            if self.active:
                raise OSError(err, os.strerror(err))
            return orig(tier, *args)

        monkeypatch.setattr(DiskTier, "_write", write)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_failing_disk_warns_and_no_request_fails(smollm_path, reference, tmp_path, monkeypatch, caplog, err):
    llm = engine(smollm_path, tmp_path / "kv", host_gb=0)
    disk = llm.engine.store.tiers[0]
    disk.breaker.cooldown_s = 0.2
    fault = FailingDisk(monkeypatch, err)
    with caplog.at_level(logging.WARNING, logger="kvtrove"):
        for _ in range(2):
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
            forget_device(llm)
    warnings = [r for r in caplog.records if "disk tier" in r.getMessage()]
    assert len(warnings) >= 1 and os.strerror(err) in warnings[0].getMessage()
    assert disk.stats().entries == 0
    fault.active = False  # the disk recovers: after the cool-down the tier writes again
    time.sleep(0.3)
    llm.generate(PROMPTS[0], GREEDY)
    forget_device(llm)
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    assert out.token_ids == reference[0] and out.cached_tokens_by_tier["disk"] == full_blocks(out)
    llm.close()


def test_disk_directory_removed_under_a_running_engine(smollm_path, reference, tmp_path, caplog):
    import shutil

    root = tmp_path / "kv"
    llm = engine(smollm_path, root, host_gb=0)
    llm.engine.store.tiers[0].breaker.cooldown_s = 0.2
    llm.generate(PROMPTS, GREEDY)
    forget_device(llm)
    shutil.rmtree(root)
    with caplog.at_level(logging.WARNING, logger="kvtrove"):
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
        forget_device(llm)
        time.sleep(0.3)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
        forget_device(llm)
    assert root.is_dir()  # recreated
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    assert out.token_ids == reference[0] and out.cached_tokens_by_tier["disk"] == full_blocks(out)
    llm.close()


WORKER = """
import json, sys
from kvtrove import LLM, SamplingParams
prompts, disk = json.loads(sys.argv[1]), sys.argv[2]
llm = LLM(num_blocks=96, kv_host_gb=0, kv_disk_dir=disk, kv_disk_gb=0.5)
p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
outs = []
for round in range(3):
    for prompt in prompts:
        outs.append(llm.generate(prompt, p)[0].token_ids)
    llm.engine.flush_kv()
    llm.engine.pool.reset_cache()
llm.close()
print(json.dumps(outs))
"""


def test_two_processes_share_one_disk_directory(smollm_path, reference, tmp_path):
    disk = tmp_path / "kv"
    env = dict(os.environ, KVTROVE_MODEL=smollm_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(order), str(disk)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for order in (PROMPTS, PROMPTS[::-1])
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "Traceback" not in err and "bad KV chunk" not in err
    a, b = (json.loads(out) for out, _ in results)
    assert a == reference * 3
    assert b == reference[::-1] * 3
    assert not [f for f in disk.rglob("*") if f.name.endswith(".tmp")]  # no partial files left
    assert ledger.read(disk)["disk"]["tokens_saved"] > 0


def test_capacity_limits_hold_under_a_larger_workload(smollm_path, tmp_path):
    host_bytes, disk_bytes = 6 * 2**20, 12 * 2**20  # ~8 and ~17 chunks of 737 KB
    llm = engine(smollm_path, tmp_path / "kv", host_gb=host_bytes / 2**30, kv_disk_gb=disk_bytes / 2**30)
    params = SamplingParams(temperature=0, max_tokens=1)
    for i in range(12):  # ~12 x 12 chunks: about 100 MB of KV, 8x the disk tier
        llm.generate(f"Note {i}: " + DOC * 3, params)
        llm.engine.flush_kv()
        st = llm.cache_stats()
        assert st["host"]["bytes"] <= host_bytes and st["disk"]["bytes"] <= disk_bytes
    st = llm.cache_stats()
    assert st["host"]["evictions"] > 0 and st["disk"]["evictions"] > 0
    on_disk = sum(f.stat().st_size for f in (tmp_path / "kv").rglob("*" + SUFFIX))
    assert on_disk == st["disk"]["bytes"] <= disk_bytes
    llm.close()


def test_queued_request_prefetches_from_disk(smollm_path, reference, tmp_path):
    disk = tmp_path / "kv"
    with engine(smollm_path, disk) as first:
        first.generate(PROMPTS[0], GREEDY)
    llm = engine(smollm_path, disk)
    eng = llm.engine
    rid = eng.add_request(PROMPTS[0], GREEDY)
    req = eng.groups[rid][0]
    assert req.prefetch is not None
    req.prefetch.result(timeout=60)
    host = eng.store.tiers[0]
    assert host.stats().entries == (req.num_tokens - 1) // BS > 5  # copied up before the request was scheduled
    done = None
    while eng.has_unfinished():
        for out in eng.step():
            done = out if out.finished else done
    assert done.token_ids == reference[0] and done.cached_tokens_by_tier["disk"] == full_blocks(done)
    llm.close()


def test_break_even_recomputes_when_loading_is_slower(smollm_path, reference, tmp_path):
    llm = engine(smollm_path, tmp_path / "kv", host_gb=0)
    llm.generate(PROMPTS[0], GREEDY)
    forget_device(llm)
    be = llm.engine.break_even
    be.bandwidth["disk"] = 1e3  # a disk that delivers ~1 token per minute
    be.prefill_rate = 1e3
    be._probed["disk"] = float("inf")
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    assert out.token_ids == reference[0] and out.cached_tokens == 0
    assert llm.engine.store.skipped["disk"] >= 1
    llm.close()


def test_store_options_are_validated():
    from kvtrove.config import CacheConfig

    with pytest.raises(ValueError, match="eviction"):
        CacheConfig(eviction="fifo")
    with pytest.raises(ValueError, match="eviction"):
        CacheConfig(eviction="host=cost,gpu=lru")
    with pytest.raises(ValueError, match="kv_host_gb"):
        CacheConfig(kv_host_gb=-1)
    with pytest.raises(ValueError, match="kv_write_policy must be one of"):
        CacheConfig(kv_write_policy="write_around")
    c = CacheConfig(eviction="host=cost, disk=lru")
    assert c.eviction_for("host") == "cost" and c.eviction_for("disk") == "lru"


def _chunks(disk: Path) -> int:
    return len(list(disk.rglob("*" + SUFFIX)))


def test_write_back_writes_nothing_until_the_pool_evicts(smollm_path, reference, tmp_path):
    disk = tmp_path / "kv"
    llm = engine(smollm_path, disk, num_blocks=256)  # the three prompts fit the device pool
    outs = llm.generate(PROMPTS, GREEDY)
    llm.engine.store.flush()
    st = llm.cache_stats()
    assert st["host"]["entries"] == 0 and _chunks(disk) == 0  # the store did no work
    assert [o.token_ids for o in outs] == reference
    held = len(llm.engine.pool.cached)
    llm.close()  # a clean close writes what the device holds, through to disk
    assert _chunks(disk) == held > 5
    with engine(smollm_path, disk, num_blocks=256) as again:
        warm = again.generate(PROMPTS[0], GREEDY)[0]
        assert warm.token_ids == reference[0] and warm.cached_tokens_by_tier["disk"] == full_blocks(warm)


def test_write_back_moves_evicted_blocks_to_host_then_disk_when_idle(smollm_path, tmp_path):
    disk = tmp_path / "kv"
    llm = engine(smollm_path, disk, num_blocks=12)  # each prompt evicts the one before it
    notes = [f"Note {i}: " + DOC * 3 for i in range(3)]
    llm.generate(notes, GREEDY)
    llm.engine.store.flush()  # evicted blocks went to the host tier; the idle engine copied them to disk
    host = llm.engine.store.tiers[0]
    assert host.stats().entries > 0
    assert _chunks(disk) == host.stats().entries
    llm.close()


def test_write_through_stores_every_block_at_once(smollm_path, tmp_path):
    disk = tmp_path / "kv"
    llm = engine(smollm_path, disk, num_blocks=256, kv_write_policy="write_through")
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    llm.engine.store.flush()
    computed = out.prompt_tokens + len(out.outputs[0].token_ids) - 1  # the last token's KV is not computed
    assert llm.cache_stats()["host"]["entries"] == _chunks(disk) == computed // BS
    llm.close()


def test_selective_write_through_stores_what_is_reused(smollm_path, tmp_path):
    disk = tmp_path / "kv"
    llm = engine(smollm_path, disk, num_blocks=256, kv_write_policy="write_through_selective")
    llm.generate(PROMPTS[2], GREEDY)
    llm.engine.store.flush()
    assert _chunks(disk) == 0  # computed once: not yet worth a write
    again = llm.generate(PROMPTS[2] + " Because.", GREEDY)[0]  # reuses the first prompt's blocks
    llm.engine.store.flush()
    assert again.cached_tokens_by_tier["device"] > 0
    assert _chunks(disk) == again.cached_tokens_by_tier["device"] // BS
    llm.close()


KILLED = """
import itertools, sys
from kvtrove import LLM, SamplingParams
doc, disk, policy = sys.argv[1:4]
llm = LLM(num_blocks=48, kv_host_gb=0.003, kv_disk_dir=disk, kv_disk_gb=0.5, kv_write_policy=policy)
p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
for i in itertools.count():
    llm.generate(f"Entry {i}: " + doc * 3, p)
"""


@pytest.mark.parametrize("policy", ["write_back", "write_through", "write_through_selective"])
def test_sigkill_during_writes_leaves_no_torn_chunk(smollm_path, tmp_path, policy):
    import signal

    import torch

    from kvtrove.kv.format import decode

    disk = tmp_path / "kv"
    env = dict(os.environ, KVTROVE_MODEL=smollm_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, DOC, str(disk), policy],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        deadline = time.monotonic() + 300
        while _chunks(disk) < 24:  # writes are under way
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the engine wrote too few chunks"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    files = list(disk.rglob("*" + SUFFIX))
    first = "Entry 0: " + DOC * 3
    with engine(smollm_path, disk, num_blocks=96, host_gb=0) as restarted:
        fp = restarted.engine.fingerprint
        for f in files:  # every chunk whole: its checksum, key and layout verify
            decode(f.read_bytes(), bytes.fromhex(f.stem), fp, torch.float32, restarted.engine.runner.block_shape(
                restarted.engine.model, BS), checksum=True)
        got = restarted.generate(first, GREEDY)[0]
        assert got.cached_tokens_by_tier["disk"] > 0  # the killed engine's blocks serve the restart
    with engine(smollm_path, None, num_blocks=96, host_gb=0, enable_prefix_caching=False) as cold:
        assert got.token_ids == cold.generate(first, GREEDY)[0].token_ids


def test_stored_prefix_waits_for_room_instead_of_being_recomputed(smollm_path, reference, tmp_path):
    """With the pool too full to load a queued request's stored prefix, the request waits for the
    running one to free blocks and then loads it; it does not start recomputing it in the room a
    small prefill chunk would fit in."""
    llm = engine(smollm_path, None, num_blocks=40, max_num_batched_tokens=32)
    eng = llm.engine
    llm.generate(PROMPTS[0], GREEDY)
    forget_device(llm)  # PROMPTS[0]'s blocks now live in the host tier only
    need = -(-(len(eng.tokenize(PROMPTS[0])) + GREEDY.max_tokens) // BS)
    hog_blocks = eng.pool.num_blocks - need + 3  # leaves room for a 32-token chunk, not for the load
    hog = eng.tokenize("Another log. " + DOC * 20)[: (hog_blocks - 1) * BS]
    hog_req = eng.groups[eng.add_request({"prompt_token_ids": hog}, GREEDY)][0]
    while hog_req.num_computed_tokens < len(hog):
        eng.step()  # the hog is decoding, its blocks held
    rid = eng.add_request(PROMPTS[0], GREEDY)
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    out = done[rid]
    assert out.token_ids == reference[0]
    assert out.cached_tokens_by_tier["host"] == full_blocks(out)  # all of it loaded, none recomputed
    assert_all_blocks_free(llm)
    llm.close()
