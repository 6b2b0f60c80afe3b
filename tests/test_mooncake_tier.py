"""Mooncake Store as the KV pool: a real `mooncake_master` (and the standalone store, `mooncake_client`)
on loopback ports, started by the tests; the tier alone, a pool that is down or loses a member, and two
engines in separate processes on the real default model. Skipped where Mooncake does not install."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtrove import LLM, SamplingParams
from kvtrove.kv.tiers.mooncake import MooncakeTier, import_store, install_hint
from kvtrove.kv.tiers.remote import open_remote
from tests.helpers import assert_all_blocks_free
from tests.pools import check_tier_contract, free_port

try:
    import_store()
    UNUSABLE = ""
except ImportError as e:
    UNUSABLE = str(e)
needs_mooncake = pytest.mark.skipif(bool(UNUSABLE), reason=f"Mooncake Store is not usable here: {UNUSABLE}")

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
BS = 16
DOC = (
    "The cartographer drew each island twice: once as the sailors described it and once as it really was, "
    "with the reefs, the currents and the safe harbours marked in red ink. "
)
PROMPT = DOC * 18 + "Which map should a captain trust?"
FP = b"\x01" * 16


class Mooncake:
    """`mooncake_master` on free loopback ports, and optionally a standalone store holding the pool's memory."""

    def __init__(self, workdir: Path):
        import mooncake

        self.bin = Path(mooncake.__file__).parent
        self.workdir = workdir
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []

    def url(self, **query: int) -> str:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"mooncake://127.0.0.1:{self.port}" + (f"?{q}" if q else "")

    def _spawn(self, name: str, args: list[str], port: int) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen([str(self.bin / name), *args], stdout=log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                self.procs.append(proc)
                return proc
            except OSError:
                time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"{name} did not listen on port {port}: {log.read_text()[-2000:]}")

    def start(self) -> Mooncake:
        args = [f"--rpc_port={self.port}", "--rpc_address=127.0.0.1"]
        args += [f"--metrics_port={free_port()}", "--metrics_host=127.0.0.1"]
        self.master = self._spawn("mooncake_master", args, self.port)
        return self

    def start_store(self, mb: int) -> None:
        """The standalone store: memory that stays in the pool when engines stop."""
        port = free_port()
        args = [f"--global_segment_size={mb}MB", f"--master_server_address=127.0.0.1:{self.port}"]
        args += ["--metadata_server=P2PHANDSHAKE", "--protocol=tcp", "--host=127.0.0.1", f"--port={port}"]
        self._spawn("mooncake_client", args, port)

    def kill(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()


@pytest.fixture
def pool(tmp_path):
    server = Mooncake(tmp_path)
    try:
        server.start()
    except RuntimeError as e:
        pytest.skip(f"mooncake_master cannot start here: {e}")
    yield server
    server.kill()


def full_blocks(out) -> int:
    return (out.prompt_tokens - 1) // BS * BS


# ---- without a pool ---------------------------------------------------------------------------------


def test_import_errors_name_what_to_install():
    assert "mooncake-transfer-engine-non-cuda" in install_hint(ModuleNotFoundError("No module named 'mooncake'"))
    cuda = ImportError("libcuda.so.1: cannot open shared object file: No such file or directory")
    assert "non-cuda" in install_hint(cuda) and "NVIDIA driver" in install_hint(cuda)
    verbs = ImportError("libibverbs.so.1: cannot open shared object file: No such file or directory")
    assert "apt-get install libibverbs1" in install_hint(verbs)


@needs_mooncake
def test_bad_parameters_are_refused():
    for url, match in [
        ("mooncake://127.0.0.1:1?segment_mb=8", "segment_mb"),
        ("mooncake://127.0.0.1:1?buffer_mb=x", "buffer_mb"),
        ("mooncake://127.0.0.1:1?size=1", "unknown"),
    ]:
        with pytest.raises(ValueError, match=match):
            open_remote(url, "kvtrove", FP, 1.0, 1.0)


@needs_mooncake
def test_pool_down_reads_miss_within_the_timeout_and_the_breaker_opens(caplog):
    tier = open_remote(f"mooncake://127.0.0.1:{free_port()}", "kvtrove", FP, timeout_s=0.5, cooldown_s=60.0)
    assert isinstance(tier, MooncakeTier)  # made without reaching the master
    keys = [bytes([i]) * 16 for i in range(4)]
    with caplog.at_level(logging.WARNING):
        t0 = time.monotonic()
        assert tier.get(keys) == [None] * 4
        assert time.monotonic() - t0 < 1.5
        t0 = time.monotonic()
        assert tier.exists(keys) == [False] * 4 and list(tier.stream(keys)) == [None] * 4
        tier.put([(keys[0], b"x" * 100, 0.0)])
        tier.delete(keys[:1])
        assert time.monotonic() - t0 < 0.05  # skipped while the breaker is open
    assert tier.breaker.is_open and tier.stats().errors == 1
    assert sum("failed at get" in r.message for r in caplog.records) == 1
    t0 = time.monotonic()
    tier.close()
    assert time.monotonic() - t0 < 6


# ---- the tier on a real pool ------------------------------------------------------------------------


@needs_mooncake
def test_tier_round_trip_namespacing_and_no_overwrite(pool):
    tier = open_remote(pool.url(segment_mb=64), "team-a", FP, timeout_s=5.0, cooldown_s=1.0)
    keys = check_tier_contract(tier)
    full = f"team-a:{FP.hex()}:{keys[0].hex()}"
    assert tier.client.is_exist(full) == 1
    other = open_remote(pool.url(segment_mb=0), "team-b", FP, timeout_s=5.0, cooldown_s=1.0)
    assert other.get(keys[:1]) == [None] and other.exists(keys[:1]) == [False]  # another namespace
    tier.delete(keys[:1], rejected=True)  # just read, so leased: the delete must still remove it
    assert tier.exists(keys[:2]) == [False, True] and tier.client.is_exist(full) == 0
    tier.put([(keys[4], b"", 0.0), (keys[3], b"y" * (tier.max_call_bytes + 1), 0.0)])  # never stored
    assert tier.exists(keys[3:]) == [False, False]
    many = [(bytes([i, 9]) * 8, bytes([i]) * (3 << 20), 0.0) for i in range(12)]  # 36 MB: several calls
    tier.put(many)
    assert tier.get([k for k, _, _ in many]) == [v for _, v, _ in many]
    st = tier.stats()
    assert st.rejected == 1 and st.errors == 0 and st.bytes_written == 6000 + 36 * 2**20
    other.close()
    tier.close()


HOLDER = """
import sys
from kvtrove.kv.tiers.remote import open_remote
tier = open_remote(sys.argv[1], "kvtrove", bytes.fromhex(sys.argv[2]), 30.0, 1.0)  # generous: a loaded box
keys = [bytes([i]) * 16 for i in range(8)]
tier.put([(k, k * 4096, 0.0) for k in keys])
assert tier.stats().errors == 0, tier.stats()
print("ready", flush=True)
sys.stdin.readline()
"""


@needs_mooncake
def test_values_live_in_a_members_segment_and_go_with_it(pool, tmp_path):
    log = (tmp_path / "holder.err").open("w+")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, pool.url(segment_mb=32), FP.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        if holder.stdout.readline().strip() != "ready":
            log.seek(0)
            pytest.fail(f"the holder process did not get ready:\n{log.read()[-3000:]}")
        reader = open_remote(pool.url(segment_mb=0), "kvtrove", FP, timeout_s=5.0, cooldown_s=60.0)
        keys = [bytes([i]) * 16 for i in range(8)]
        assert reader.get(keys) == [k * 4096 for k in keys]  # over TCP from the holder's segment
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        t0 = time.monotonic()
        assert reader.get(keys) == [None] * 8  # listed by the master until it notices, but unreadable
        assert time.monotonic() - t0 < 5.0
        assert not reader.breaker.is_open  # one lost member is not a pool failure
        reader.close()
    finally:
        holder.kill()
        log.close()


@needs_mooncake
def test_master_killed_then_back(pool):
    tier = open_remote(pool.url(segment_mb=32), "kvtrove", FP, timeout_s=1.0, cooldown_s=0.5)
    keys = [bytes([i]) * 16 for i in range(4)]
    tier.put([(k, k * 100, 0.0) for k in keys])
    assert tier.get(keys) == [k * 100 for k in keys]
    pool.kill()
    t0 = time.monotonic()
    assert tier.get(keys) == [None] * 4
    assert time.monotonic() - t0 < 2.0 and tier.breaker.is_open
    pool.start()  # same port, empty: the client joins it again
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.6)
        tier.put([(k, k * 100, 0.0) for k in keys])
        if tier.get(keys) == [k * 100 for k in keys]:
            break
    else:
        raise AssertionError(f"the pool did not come back: {tier.stats()}")
    assert not tier.breaker.is_open
    tier.close()


# ---- engines sharing the pool -------------------------------------------------------------------------

ENGINE_A = """
import json, sys
from kvtrove import LLM, SamplingParams
with LLM(model=sys.argv[1], num_blocks=128, kv_host_gb=0, kv_disk_gb=0, kv_remote=sys.argv[2],
         kv_remote_timeout_s=5) as llm:
    out = llm.generate(sys.argv[3], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    errors = llm.cache_stats()["mooncake"]["errors"]
print(json.dumps([out.token_ids, out.text, out.cached_tokens, errors]))
"""


@needs_mooncake
def test_engine_b_serves_what_engine_a_computed(smollm_path, pool):
    pool.start_store(256)  # the pool's memory outlives engine A, which lends none (segment_mb=0)
    url = pool.url(segment_mb=0)
    cmd = [sys.executable, "-c", ENGINE_A, smollm_path, url, PROMPT]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    ids, text, cached, errors = json.loads(done.stdout.splitlines()[-1])
    assert cached == 0 and errors == 0
    with LLM(
        model=smollm_path, num_blocks=128, kv_host_gb=0.5, kv_disk_gb=0, kv_remote=url, kv_remote_timeout_s=5
    ) as b:
        out = b.generate(PROMPT, GREEDY)[0]
        assert out.prompt_tokens >= 600
        assert out.token_ids == ids and out.text == text
        assert out.cached_tokens_by_tier["mooncake"] == full_blocks(out)
        assert out.cached_tokens_by_tier["host"] == 0
        stats = b.cache_stats()["mooncake"]
        assert stats["tokens_saved"] == full_blocks(out) and stats["errors"] == 0
        assert_all_blocks_free(b)
