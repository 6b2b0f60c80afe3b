"""Placement rules: parsing and its errors, first match wins, GPU rules on a CPU-only machine, quantized
units, `kvtrove placement show`, and MoE models under a user's rules still matching HF transformers."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from kvtrove import LLM
from kvtrove.layers.quant import Int4Linear, Int8Linear, QuantizedExperts
from kvtrove.placement.rules import load_rules

EXPERTS_CPU_REST_GPU = """
rules:
  - match: 'mlp\\.experts$'
    device: cpu
    impl: float
  - match: '.*'
    device: cuda:0
"""


def write(tmp_path, text: str, name: str = "rules.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "text,message",
    [
        ("rules:\n  - match: '.*'\n    device: tpu\n", "unknown device 'tpu'"),
        ("rules:\n  - match: '.*'\n    device: cuda:x\n", "unknown device"),
        ("rules:\n  - match: '.*'\n    impl: int3\n", "unknown implementation 'int3'"),
        ("rules:\n  - device: cpu\n", "give `match`"),
        ("rules:\n  - match: '(('\n", "not a valid regex"),
        ("rules:\n  - match: '.*'\n    devcie: cpu\n", "unknown key"),
        ("rules: []\n", "non-empty list"),
        ("rules:\n  - [cpu]\n", "a rule is a mapping"),
        ("rules: [\n", "not valid YAML"),
    ],
)
def test_bad_placement_files_are_refused_with_the_reason(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as e:
        LLM(model="unused.gguf", placement=path)
    assert "rules.yaml" in str(e.value)


def test_missing_placement_file():
    with pytest.raises(ValueError, match="cannot read the placement file"):
        load_rules("/nonexistent/rules.yaml")


def test_a_rule_that_matches_nothing_is_an_error(tiny_model, tmp_path):
    path = write(tmp_path, "rules:\n  - match: 'experts'\n    impl: int8\n  - class: NoSuchLayer\n    device: cpu\n")
    with pytest.raises(ValueError, match="rule 1 .* matches no module of LlamaForCausalLM"):
        LLM(model=str(tiny_model("llama")), placement=path, num_blocks=8)


def test_first_match_wins_and_quantizes_only_what_it_names(tiny_model, tmp_path):
    path = write(
        tmp_path,
        "rules:\n"
        "  - match: 'layers\\.1\\.mlp\\.experts$'\n    impl: int8\n"
        "  - match: 'experts$'\n    impl: int4\n"
        "  - class: LlamaAttention\n    impl: int8\n"
        "  - match: '.*'\n    impl: auto\n",
    )
    llm = LLM(model=str(tiny_model("qwen3-moe")), placement=path, num_blocks=16, kv_host_gb=0, kv_disk_gb=0)
    layers = llm.engine.model.model.layers
    assert isinstance(layers[0].mlp.experts, QuantizedExperts) and isinstance(layers[0].mlp.experts.w2[0], Int4Linear)
    assert isinstance(layers[1].mlp.experts.w2[0], Int8Linear)  # the earlier, narrower rule won
    assert isinstance(layers[0].self_attn.qkv_proj, Int8Linear)
    assert not isinstance(layers[0].mlp.gate, Int8Linear | Int4Linear)  # routers stay float
    assert not isinstance(llm.engine.model.lm_head, Int8Linear | Int4Linear)  # auto without --quantize: float
    float_llm = LLM(model=str(tiny_model("qwen3-moe")), num_blocks=16, kv_host_gb=0, kv_disk_gb=0)
    assert llm.engine.fingerprint != float_llm.engine.fingerprint  # other numbers, other stored KV
    by_path = {p.path: p for p in llm.engine.placement}
    assert by_path["model.layers.1.mlp.experts"].impl == "int8"
    assert by_path["model.layers.1.mlp.experts"].nbytes < by_path["model.layers.0.mlp.experts"].nbytes * 2


def test_gpu_rules_fall_back_to_the_cpu_with_one_warning(tiny_model, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only fallback")
    path = write(tmp_path, EXPERTS_CPU_REST_GPU)
    with caplog.at_level(logging.WARNING, logger="kvtrove.placement.plan"):
        llm = LLM(model=str(tiny_model("mixtral")), placement=path, num_blocks=16, kv_host_gb=0, kv_disk_gb=0)
    warnings = [r for r in caplog.records if "run on the CPU" in r.getMessage()]
    assert len(warnings) == 1 and "cuda:0" in warnings[0].getMessage()
    assert {(p.wanted, p.device) for p in llm.engine.placement} == {("cpu", "cpu"), ("cuda:0", "cpu")}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvtrove.placement.plan"):
        LLM(model=str(tiny_model("mixtral")), num_blocks=16, kv_host_gb=0, kv_disk_gb=0)  # built-in rules: quiet
    assert not [r for r in caplog.records if "run on the CPU" in r.getMessage()]


def test_placement_show_needs_only_a_config(tmp_path):
    import transformers

    cfg = transformers.DeepseekV3Config(
        hidden_size=256, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, moe_intermediate_size=64
    )
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.save_pretrained(tmp_path)  # no weights
    cmd = [sys.executable, "-m", "kvtrove.cli", "placement", "show", str(tmp_path), "--quantize", "int4"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("model.", "lm_head"))}
    assert rows["model.layers.1.mlp.experts"][2:4] == ["cpu", "int4"]  # routed experts: the CPU in the built-in rules
    assert rows["model.layers.1.self_attn.kv_b_proj"][3] == "float"
    assert rows["lm_head"][3] == "int8"
    experts_mib = float(rows["model.layers.1.mlp.experts"][4])
    assert experts_mib == pytest.approx(16 * 3 * 64 * 256 * 0.75 / 2**20, abs=0.005)
    assert "total:" in out
    bad = subprocess.run(cmd[:-2] + ["--placement", "/nonexistent.yaml"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot read the placement file" in bad.stderr
