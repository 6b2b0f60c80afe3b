"""Our C++ CPU kernels, compiled on first use with torch's JIT extension builder (cached per machine).

What PyTorch lacks (measured), or computes in an order that depends on the batch shape: linear layers
(float32, bf16, int8, int4) with one fixed summation order for any number of tokens, float ones at GEMM
speed in prefill and quantized ones streaming decode weights at the machine's read bandwidth (torch's
CPU GEMV paths reach about half of it; its int4 kernel is compute-bound on AVX2, its int8 one rounds
activations and outputs to bf16); attention over the paged KV
cache for decode and prefill with the same key blocks and merge order; the elementwise chains between
matmuls fused into one pass each (norm + residual, RoPE + KV write, SiLU * up, sigmoid), which at decode
time cost as much as the matmuls when run as ~30 small ops; and a whole decode step of a Llama-family
model chaining those kernels in one call. Every reduction has one order, defined independently of the
vector width (`csrc/vec.h`), so a token's numbers are the same bits in any step, on any thread count and
with AVX-512, AVX2 or no SIMD. When no compiler is available the callers fall back to torch ops (close,
not batch-invariant).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

import xxhash

from kvtrove.config import kernel_isa

log = logging.getLogger(__name__)
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [
    _CSRC / name
    for name in (
        "bindings.cpp",
        "attention.cpp",
        "float_linear.cpp",
        "quant_linear.cpp",
        "fused.cpp",
        "decode_stack.cpp",
        "expert_bank.cpp",
    )
]
_HEADERS = [_CSRC / "vec.h", _CSRC / "ops.h", _CSRC / "expert_bank.h"]


@functools.cache
def cpu_kernels():
    """The compiled module (functions listed in csrc/bindings.cpp), or None when it cannot be built.

    `KVTROVE_KERNEL_ISA=avx512` / `avx2` / `scalar` builds them without AVX-512 BF16 / without AVX-512 /
    without SIMD (the paths of older machines): the same bits, slower; the tests use them to check that every path agrees."""
    isa = kernel_isa()
    try:
        import torch
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the `ninja` wheel's binary, when its venv is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

        # the build targets this CPU (-march=native) and this torch: its name carries both
        cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        flags = next((ln for ln in cpu.splitlines() if ln.startswith(("flags", "Features"))), "")
        # and this checkout: torch rebuilds when the source paths change, so checkouts would take turns
        sources = "".join(p.read_text() for p in _SOURCES + _HEADERS)
        text = isa + flags + torch.__version__ + str(_SOURCES[0].parent) + sources
        name = f"kvtrove_cpu_kernels_{xxhash.xxh3_64_hexdigest(text.encode())[:12]}"
        _clear_stale_lock(name)
        return load(
            name=name,
            sources=[str(p) for p in _SOURCES],
            # OpenMP: at::parallel_for runs on torch's thread pool only when the extension is built with it.
            # No -ffast-math and no automatic FMA contraction: every operation rounds as written (vec.h)
            extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
            + {"native": [], "avx512": ["-mno-avx512bf16"], "avx2": ["-DKVT_NO_AVX512"], "scalar": ["-DKVT_SCALAR"]}[isa],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, an odd platform: the torch path still works
        log.warning("kvtrove's C++ CPU kernels are unavailable (%s); using torch ops", e)
        return None


STALE_LOCK_S = 600


def _clear_stale_lock(name: str) -> None:
    """torch's build lock outlives a build that was killed, and later loads wait on it forever; no
    build takes anywhere near STALE_LOCK_S, so an older lock is a leftover."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing a stale build lock %s (a build was interrupted)", lock)
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
