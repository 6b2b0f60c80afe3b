"""Lifetime counters of the store, kept next to the disk tier so `kvtrove cache stats` can show them.

`<disk dir>/stats.json` maps tier -> counter -> total over every engine that used the directory.
Engines add their counts when they close, under an exclusive file lock (engines share the folder);
an unreadable file starts the totals afresh instead of failing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
NAME = "stats.json"
COUNTERS = ("hits", "misses", "evictions", "rejected", "bytes_read", "bytes_written", "tokens_saved")


def read(directory: str | os.PathLike) -> dict[str, dict[str, int]]:
    try:
        data = json.loads((Path(directory) / NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(tier): {c: int(v) for c, v in counts.items() if c in COUNTERS and isinstance(v, int)}
        for tier, counts in data.items()
        if isinstance(counts, dict)
    }


def add(directory: str | os.PathLike, stats: dict[str, dict[str, int]]) -> None:
    """Add this engine's counters (per tier) to the directory's totals; a failure only logs."""
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".stats.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            totals = read(root)
            for tier, counts in stats.items():
                t = totals.setdefault(tier, {})
                for c in COUNTERS:
                    t[c] = t.get(c, 0) + int(counts.get(c, 0))
            tmp = root / f".{NAME}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(totals, indent=1, sort_keys=True))
            os.replace(tmp, root / NAME)
    except OSError as e:
        log.warning("could not record KV store counters in %s: %s", root, e)


def clear(directory: str | os.PathLike) -> None:
    for name in (NAME, ".stats.lock"):
        (Path(directory) / name).unlink(missing_ok=True)
