"""Where benchmarks write their figures: bench/results/<name>.json, with the time of the run."""

from __future__ import annotations

import json
import time
from pathlib import Path

DIR = Path(__file__).with_name("results")


def save(name: str, figures: dict) -> Path:
    DIR.mkdir(exist_ok=True)
    path = DIR / f"{name}.json"
    path.write_text(json.dumps({"run": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}, indent=2) + "\n")
    print(f"figures written to {path}")
    return path
