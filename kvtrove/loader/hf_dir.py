"""Hugging Face checkpoint directories: config.json + *.safetensors + tokenizer files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm


def open_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weight files")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot read {path / 'config.json'}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load the tokenizer from {path} (tokenizer.json / tokenizer_config.json): {e}") from e
    return hf_config, tokenizer, _tensors(files, dtype), files, {}


def _tensors(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for f in tqdm(files, desc="loading weights", unit="file", disable=None, leave=False):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = st.get_tensor(name)
                yield name, t.to(dtype) if t.is_floating_point() else t
