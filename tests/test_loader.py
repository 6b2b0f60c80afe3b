"""Loading: HF directories, GGUF files, and clear errors for what cannot be loaded."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from kvtrove import LLM, SamplingParams


def test_missing_path():
    with pytest.raises(ValueError, match="does not exist"):
        LLM(model="/nonexistent/model.gguf")


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a .gguf file"):
        LLM(model=str(f))
    g = tmp_path / "broken.gguf"
    g.write_bytes(b"GGUF garbage")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        LLM(model=str(g))


def test_unknown_architecture(tiny_model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture .*FancyNewForCausalLM"):
        LLM(model=str(d))


def test_directory_without_weights(tiny_model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(model=str(d))
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        LLM(model=str(d))


def _write_gguf(path, arch: str, ttype: gguf.GGMLQuantizationType, raw: np.ndarray, shape) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_q.weight", raw, raw_shape=shape, raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_type_that_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTROVE_CACHE_DIR", str(tmp_path / "cache"))
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    f = tmp_path / "q8k.gguf"
    _write_gguf(f, "llama", gguf.GGMLQuantizationType.Q8_K, np.zeros((4, size), dtype=np.uint8), (4, size))
    with pytest.raises(ValueError, match="GGUF type Q8_K, which cannot be dequantized"):
        LLM(model=str(f))


def test_gguf_unknown_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTROVE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "other.gguf"
    _write_gguf(f, "rwkv6", gguf.GGMLQuantizationType.F32, np.zeros((4, 4), dtype=np.float32), None)
    with pytest.raises(ValueError, match="GGUF architecture 'rwkv6' is not supported"):
        LLM(model=str(f))


def test_hf_directory_loads_tokenizer_and_generates(tiny_model):
    llm = LLM(model=str(tiny_model("qwen3")), num_blocks=32)
    out = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and isinstance(out.text, str)
    assert llm.get_tokenizer().chat_template is not None


def test_gguf_tokenizer_matches_hf(smollm, smollm_path):
    from pathlib import Path

    from transformers import AutoTokenizer

    p = Path(smollm_path)
    ref = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    ours = smollm.get_tokenizer()
    msgs = [{"role": "user", "content": "Hi! Ça va? 東京 🚀"}]
    for text in ["Hello world", "  leading spaces\nand\ttabs", "Ça va? 東京 🚀"]:
        assert ours.encode(text) == ref.encode(text)
    assert ours.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)


def test_unwritable_cache_still_loads(smollm_path, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("KVTROVE_CACHE_DIR", str(blocker / "cache"))
    llm = LLM(model=smollm_path, num_blocks=16)
    assert len(llm.generate("Hi", SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids) == 2


def test_fingerprint_follows_content_not_location(tiny_model, smollm_path, tmp_path, monkeypatch):
    import torch

    from kvtrove.loader import load_checkpoint

    src = tiny_model("llama")
    moved = tmp_path / "elsewhere"
    shutil.copytree(src, moved)
    fp = load_checkpoint(str(src), torch.float32).fingerprint
    assert load_checkpoint(str(moved), torch.float32).fingerprint == fp  # stored KV survives a move
    assert load_checkpoint(str(src), torch.bfloat16).fingerprint != fp  # but not a dtype change
    cfg = json.loads((moved / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (moved / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(str(moved), torch.float32).fingerprint != fp
    # a GGUF converted again into another cache folder (a reinstall) keeps its fingerprint
    g = load_checkpoint(smollm_path, torch.float32).fingerprint
    monkeypatch.setenv("KVTROVE_CACHE_DIR", str(tmp_path / "other-cache"))
    assert load_checkpoint(smollm_path, torch.float32).fingerprint == g


def test_deepseek_v3_checkpoint_with_its_mtp_layer_loads(tiny_model, tmp_path):
    """V3 checkpoints keep the multi-token-prediction module as one more layer; it is not used for decoding."""
    import torch
    from safetensors.torch import save_file

    src = tiny_model("deepseek-v3")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    save_file({"model.layers.2.eh_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "mtp.safetensors"))
    llm = LLM(model=str(tmp_path), num_blocks=8, kv_host_gb=0, kv_disk_gb=0)
    assert len(llm.engine.model.model.layers) == 2
    save_file({"model.layers.1.self_attn.extra.weight": torch.zeros(4, 4)}, str(tmp_path / "mtp.safetensors"))
    with pytest.raises(ValueError, match="has no place"):
        LLM(model=str(tmp_path), num_blocks=8, kv_host_gb=0, kv_disk_gb=0)
