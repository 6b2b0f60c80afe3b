"""Open a model path (GGUF file or HF directory) as config + weights + tokenizer + fingerprint."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from kvtrove.loader import gguf_file, hf_dir


@dataclass
class Checkpoint:
    hf_config: object
    """A transformers PretrainedConfig."""
    tokenizer: object
    """A transformers tokenizer with its chat template."""
    weights: Iterator[tuple[str, torch.Tensor]]
    """(HF parameter name, tensor) pairs, already in the working dtype."""
    fingerprint: bytes
    """Identity of the weights and their dtype: KV is reusable only under the same fingerprint."""
    eos_token_ids: list[int]
    quantized: dict
    """HF name -> (GGUF rows, GGUF type) of each weight matrix the file stores quantized; filled as
    `weights` is read. Empty for float checkpoints."""


def load_checkpoint(path: str, dtype: torch.dtype) -> Checkpoint:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(
            f"model path {str(p)!r} does not exist; give a .gguf file or a Hugging Face checkpoint directory"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if p.is_file():
            if p.suffix != ".gguf":
                raise ValueError(f"{p} is a file but not a .gguf file; give a .gguf file or a checkpoint directory")
            hf_config, tokenizer, weights, files, quantized = gguf_file.open_gguf(p, dtype)
        else:
            hf_config, tokenizer, weights, files, quantized = hf_dir.open_hf_dir(p, dtype)
    return Checkpoint(
        hf_config=hf_config,
        tokenizer=tokenizer,
        weights=weights,
        fingerprint=fingerprint(hf_config, dtype, files),
        eos_token_ids=eos_ids(hf_config, tokenizer, p),
        quantized=quantized,
    )


def load_config(path: str):
    """Only the HF config of a model path: a .gguf file, or a directory with config.json (weights not
    needed), e.g. to plan a model's placement before downloading it."""
    from transformers import AutoConfig

    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return AutoConfig.from_pretrained(gguf_file.converted(p))
    if not (p / "config.json").exists():
        raise ValueError(f"{str(p)!r} is neither a .gguf file nor a directory with a config.json")
    try:
        return AutoConfig.from_pretrained(p, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"cannot read {p / 'config.json'}: {e}") from e


NOT_CONTENT = ("_name_or_path", "transformers_version")
"""Config fields that say where a model was loaded from or by what, not what it computes."""


def fingerprint(hf_config, dtype: torch.dtype, files: list[Path]) -> bytes:
    """xxh3-128 over the architecture, the dtype and the bytes of every weight file: content only, so a
    model moved, reinstalled or re-converted elsewhere keeps its stored KV."""
    h = xxhash.xxh3_128()
    arch = {k: v for k, v in hf_config.to_dict().items() if k not in NOT_CONTENT}
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    for f in sorted(files):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.digest()


def eos_ids(hf_config, tokenizer, path: Path) -> list[int]:
    ids: list[int] = []
    candidates = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    gen = path / "generation_config.json" if path.is_dir() else None
    if gen is not None and gen.exists():
        candidates.append(json.loads(gen.read_text()).get("eos_token_id"))
    for c in candidates:
        for i in c if isinstance(c, list) else [c]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids
