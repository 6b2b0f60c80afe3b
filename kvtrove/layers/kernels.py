"""Our C++ CPU kernels, compiled on first use with torch's JIT extension builder (cached per machine).

Only what PyTorch lacks lives here: single-token attention read straight from the paged KV cache
(the torch path gathers a copy of every context first). When no compiler is available the callers
fall back to torch ops with the same results.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("csrc") / "paged_decode.cpp"


@functools.cache
def paged_decode():
    """The compiled module (with `paged_decode(q, k_cache, v_cache, slots, lens, scale, window)`), or None."""
    try:
        import torch
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the `ninja` wheel's binary, when its venv is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

        # the build targets this CPU (-march=native) and this torch: its name carries both
        cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        flags = next((ln for ln in cpu.splitlines() if ln.startswith(("flags", "Features"))), "")
        tag = xxhash.xxh3_64_hexdigest((flags + torch.__version__ + _SRC.read_text()).encode())[:12]
        return load(
            name=f"kvtrove_paged_decode_{tag}",
            sources=[str(_SRC)],
            extra_cflags=["-O3", "-march=native", "-ffast-math"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, an odd platform: the torch path still works
        log.warning("C++ paged decode kernel unavailable (%s); using torch ops", e)
        return None
