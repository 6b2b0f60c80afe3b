"""GGUF files: tensors dequantized with the `gguf` package, config and tokenizer from the metadata.

Parsing GGUF metadata with `gguf` takes seconds (tens of thousands of vocabulary strings), so the
first open converts config, tokenizer and the tensor directory to HF-style files in the cache dir;
later opens read those and memory-map the tensors straight from the GGUF file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
import xxhash
from tqdm import tqdm

from kvtrove.config import cache_dir

# GGUF architecture -> whether q/k rows were permuted for GGML's interleaved RoPE.
SUPPORTED = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}
FORMAT = 1  # bump when the converted layout changes
log = logging.getLogger(__name__)

_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoTokenizer

    conv = converted(path)
    meta = json.loads((conv / "tensors.json").read_text())
    hf_config = AutoConfig.from_pretrained(conv)
    tokenizer = AutoTokenizer.from_pretrained(conv)
    quantized: dict = {}
    return hf_config, tokenizer, _tensors(path, meta, hf_config, dtype, quantized), [path], quantized


def quantized_types(path: Path) -> dict[str, gguf.GGMLQuantizationType]:
    """HF name -> GGUF type of each weight matrix the file stores quantized, from its converted metadata
    (no tensor is read)."""
    meta = json.loads((converted(path) / "tensors.json").read_text())
    out = {}
    for t in meta["tensors"]:
        name, qtype = gguf_to_hf_name(t["name"]), gguf.GGMLQuantizationType(t["type"])
        if (
            name
            and len(t["shape"]) == 2
            and qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        ):
            out[name] = qtype
    return out


def converted(path: Path) -> Path:
    """The folder with the HF config, tokenizer and tensor map made from this GGUF's metadata; made once
    per file (keyed by path, size and time) in the cache dir and reused."""
    st = path.stat()
    key = xxhash.xxh3_64_hexdigest(f"{FORMAT}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    out = cache_dir() / "gguf" / key
    if (out / "tensors.json").exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    except OSError as e:  # an unwritable cache: convert into a throwaway folder, every time
        log.warning("cannot write the model cache %s (%s); converting %s without caching", out.parent, e, path.name)
        out = Path(tempfile.mkdtemp(prefix="kvtrove-gguf-"))
        _convert(path, out)
        return out
    try:
        _convert(path, tmp)
        with contextlib.suppress(OSError):  # another process converted it first
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch not in SUPPORTED:
        raise ValueError(f"{path.name}: GGUF architecture {arch!r} is not supported; supported: {sorted(SUPPORTED)}")
    checked = set()
    tensors = []
    for t in reader.tensors:
        if t.tensor_type not in checked:
            try:
                gguf.quants.dequantize(t.data[:1], t.tensor_type)
            except NotImplementedError:
                raise ValueError(
                    f"{path.name}: tensor {t.name} has GGUF type {t.tensor_type.name}, which cannot be "
                    "dequantized; use a file with another quantization (F32, F16, Q8_0, Q4_K, ...)"
                ) from None
            checked.add(t.tensor_type)
        tensors.append(
            {
                "name": t.name,
                "type": int(t.tensor_type),
                "offset": int(t.data_offset),
                "dtype": t.data.dtype.str,
                "shape": list(t.data.shape),
            }
        )
    with tqdm(total=2, desc=f"converting {path.name} (once)", unit="step", disable=None) as bar:
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
        bar.update()
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
        bar.update()
    (out / "tensors.json").write_text(json.dumps({"architecture": arch, "tensors": tensors}))


def gguf_to_hf_name(name: str) -> str | None:
    m = _BLOCK.match(name)
    if m:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER[part]}.{kind}" if part in _LAYER else None
    base, _, kind = name.rpartition(".")
    return f"{_GLOBAL[base]}.{kind}" if base in _GLOBAL else None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate-half halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(path: Path, meta: dict, cfg, dtype: torch.dtype, quantized: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float tensor) for every tensor; each weight matrix stored quantized is also put in
    `quantized` as HF name -> (its GGUF rows [n, bytes per row], GGUF type), rows in HF order."""
    permuted = SUPPORTED[meta["architecture"]]
    data = np.memmap(path, mode="r")
    for t in tqdm(meta["tensors"], desc=f"loading {path.name}", unit="tensor", disable=None, leave=False):
        name = gguf_to_hf_name(t["name"])
        if name is None:
            continue
        dt = np.dtype(t["dtype"])
        n = int(np.prod(t["shape"])) * dt.itemsize
        raw = data[t["offset"] : t["offset"] + n].view(dt).reshape(t["shape"])
        qtype = gguf.GGMLQuantizationType(t["type"])
        w = gguf.quants.dequantize(raw, qtype)
        heads = None
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = cfg.num_attention_heads
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = cfg.num_key_value_heads
        if heads:
            w = _unpermute(w, heads)
        if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) and raw.ndim == 2:
            quantized[name] = (_unpermute(raw, heads) if heads else raw, qtype)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)
