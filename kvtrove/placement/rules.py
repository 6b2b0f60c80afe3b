"""Placement rules: which device and which implementation each module of a model gets.

A rule file is YAML, a list of rules under `rules:` (or a bare list); the first rule that matches a
module wins:

    rules:
      - match: 'mlp\\.experts$'        # a regex searched in the module path (model.layers.3.mlp.experts)
        device: cpu
        impl: int4
      - class: DeepseekAttention      # the module's class, or the class of a module that holds it
        device: cuda:0
      - match: '.*'
        device: cuda:0

`device`: cpu, cuda or cuda:N. `impl`: auto (the `--quantize` scheme; float without one), float, int8
or int4; quantized forms apply to weight matrices (linear layers, experts) and other modules stay
float. Every rule of a user file must match at least one module. Without rules of its own a model gets
its architecture's built-in set (`BUILTIN`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

IMPLS = ("auto", "float", "int8", "int4")
KEYS = {"match", "class", "device", "impl"}
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Rule:
    device: str = "cpu"
    impl: str = "auto"
    match: str | None = None
    """Regex searched in the module path."""
    cls: str | None = None
    """Class name of the module or of any module that holds it."""
    where: str = "built-in"
    """Where the rule was written, for messages."""

    def matches(self, path: str, classes: tuple[str, ...]) -> bool:
        if self.match is not None and not re.search(self.match, path):
            return False
        return self.cls is None or self.cls in classes

    def describe(self) -> str:
        what = " ".join(f"{k}={v!r}" for k, v in (("match", self.match), ("class", self.cls)) if v is not None)
        return f"{self.where} ({what} -> {self.device}, {self.impl})"


def parse_rules(data, where: str) -> list[Rule]:
    """Rules from parsed YAML; ValueError naming the rule for anything malformed."""
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where}: expected a non-empty list of rules (under `rules:`), got {type(data).__name__}")
    rules = []
    for i, item in enumerate(data, 1):
        at = f"{where} rule {i}"
        if not isinstance(item, dict):
            raise ValueError(f"{at}: a rule is a mapping with match/class, device and impl, got {item!r}")
        unknown = set(item) - KEYS
        if unknown:
            raise ValueError(f"{at}: unknown key(s) {sorted(unknown)}; a rule has {sorted(KEYS)}")
        match, cls = item.get("match"), item.get("class")
        if match is None and cls is None:
            raise ValueError(f"{at}: give `match` (a regex over module paths) or `class` (a module class name)")
        if match is not None:
            try:
                re.compile(str(match))
            except re.error as e:
                raise ValueError(f"{at}: match {match!r} is not a valid regex ({e})") from None
        device = str(item.get("device", "cpu"))
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"{at}: unknown device {device!r}; use cpu, cuda or cuda:N")
        impl = str(item.get("impl", "auto"))
        if impl not in IMPLS:
            raise ValueError(f"{at}: unknown implementation {impl!r}; one of {IMPLS}")
        rules.append(Rule(device, impl, None if match is None else str(match), cls and str(cls), at))
    return rules


def load_rules(path: str | Path) -> list[Rule]:
    import yaml

    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"cannot read the placement file {p}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"the placement file {p} is not valid YAML: {e}") from None
    return parse_rules(data, p.name)


_EVERYTHING_ON_GPU = [Rule("cuda:0", match=".*", where="built-in: all on the GPU")]
_EXPERTS_ON_CPU = [
    Rule("cpu", match=r"\.experts$", where="built-in: routed experts on the CPU"),
    Rule("cuda:0", match=".*", where="built-in: attention, dense and shared experts on the GPU"),
]
BUILTIN = {
    "LlamaForCausalLM": _EVERYTHING_ON_GPU,
    "MoEForCausalLM": _EXPERTS_ON_CPU,
    "DeepseekForCausalLM": _EXPERTS_ON_CPU,
}
"""Model class -> its rules when no file is given. Without a GPU they resolve to the CPU."""
