"""Model and runtime configuration.

Two frozen dataclasses, built at the edge and passed explicitly:

* `ModelConfig` describes the network (from the checkpoint's `config.json`, or a preset).
* `RuntimeConfig` describes how this process runs it (device, dtype, budgets, quant simulation).

This module is the only reader of `HOMESEEK_*` environment variables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Attention kinds by compress ratio (docs/architecture.md §1.2). As in the reference, ratio 4 means
# CSA (overlapping compressor + indexer) and any other non-zero ratio means HCA (128 on V4-Flash;
# tiny configs use smaller HCA ratios so short tests cross block boundaries).
SWA, CSA, HCA = "swa", "csa", "hca"
CSA_RATIO = 4


def attn_kind_of_ratio(ratio: int) -> str:
    return SWA if ratio == 0 else CSA if ratio == CSA_RATIO else HCA


class ConfigError(ValueError):
    """config.json (or a preset) is inconsistent; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V4 architecture, defaulting to V4-Flash (docs/architecture.md §1.1)."""

    vocab_size: int = 129280
    hidden_size: int = 4096  # D
    num_hidden_layers: int = 43
    num_nextn_predict_layers: int = 1  # MTP blocks
    num_attention_heads: int = 64  # H
    head_dim: int = 512  # Dh: [nope 448 | rope 64]
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128  # W
    # One entry per main layer plus one per MTP layer (0 = SWA, 4 = CSA, 128 = HCA).
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    rope_theta: float = 10000.0  # SWA layers, no YaRN
    compress_rope_theta: float = 160000.0  # compressed layers, with YaRN
    rope_factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128  # [nope 64 | rope 64]
    index_topk: int = 512
    n_routed_experts: int = 256  # E
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6  # K
    moe_intermediate_size: int = 2048  # I
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    # Weight formats as shipped: FP8 e4m3 linears with 128x128 UE8M0 block scales, FP4 experts.
    weight_block_size: tuple[int, int] = (128, 128)
    expert_dtype: str = "fp4"

    def __post_init__(self) -> None:
        n = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) != n:
            raise ConfigError(
                f"compress_ratios has {len(self.compress_ratios)} entries; expected "
                f"num_hidden_layers + num_nextn_predict_layers = {n}"
            )
        for i, r in enumerate(self.compress_ratios):
            if r < 0:
                raise ConfigError(f"compress_ratios[{i}] = {r}; must be 0 (SWA), 4 (CSA) or > 0")
        for i in range(self.num_hidden_layers, n):
            if self.compress_ratios[i] != 0:
                raise ConfigError(
                    f"compress_ratios[{i}] (an MTP block) must be 0, got {self.compress_ratios[i]}"
                )
        if self.head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise ConfigError("qk_rope_head_dim must fit in head_dim")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ConfigError("num_attention_heads * head_dim must divide into o_groups")
        if self.scoring_func != "sqrtsoftplus":
            raise ConfigError(f"scoring_func={self.scoring_func!r}: only sqrtsoftplus is supported")
        if self.expert_dtype != "fp4":
            raise ConfigError(f"expert_dtype={self.expert_dtype!r}: only fp4 experts are supported")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok exceeds n_routed_experts")
        if self.hidden_size % 32 or self.moe_intermediate_size % 32:
            raise ConfigError("hidden_size and moe_intermediate_size must be multiples of 32 (FP4)")

    # --- derived --------------------------------------------------------------------------
    @property
    def num_layers_total(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def attn_kind(self, layer: int) -> str:
        return attn_kind_of_ratio(self.compress_ratios[layer])

    def is_hash_layer(self, layer: int) -> bool:
        # MTP blocks (layer >= num_hidden_layers) always use the learned router with bias.
        return layer < min(self.num_hash_layers, self.num_hidden_layers)

    # --- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from an official (HF-style) config.json dict; unknown keys are ignored."""
        kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k in names:
                kw[k] = tuple(v) if isinstance(v, list) else v
        rs = d.get("rope_scaling") or {}
        if rs:
            if rs.get("type", rs.get("rope_type")) not in (None, "yarn"):
                raise ConfigError(f"{source}: rope_scaling.type must be yarn, got {rs}")
            kw["rope_factor"] = float(rs.get("factor", cls.rope_factor))
            kw["original_max_position_embeddings"] = int(
                rs.get("original_max_position_embeddings", cls.original_max_position_embeddings)
            )
            kw["beta_fast"] = float(rs.get("beta_fast", cls.beta_fast))
            kw["beta_slow"] = float(rs.get("beta_slow", cls.beta_slow))
        qc = d.get("quantization_config") or {}
        if "weight_block_size" in qc:
            kw["weight_block_size"] = tuple(qc["weight_block_size"])
        if "expert_dtype" in qc and "expert_dtype" not in d:
            kw["expert_dtype"] = qc["expert_dtype"]
        if isinstance(kw.get("eos_token_id"), (list, tuple)):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: missing (a checkpoint directory needs config.json)"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The official config.json layout (HF-style keys), round-trips through from_dict."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
        }
        skip = {
            "rope_factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "weight_block_size",
        }
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        d["num_key_value_heads"] = 1
        d["hidden_act"] = "silu"
        d["tie_word_embeddings"] = False
        d["norm_topk_prob"] = True
        d["topk_method"] = "noaux_tc"
        d["torch_dtype"] = "bfloat16"
        d["rope_scaling"] = {
            "type": "yarn",
            "factor": self.rope_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        d["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "weight_block_size": list(self.weight_block_size),
            "activation_scheme": "dynamic",
        }
        return d


def flash_config() -> ModelConfig:
    """The real DeepSeek-V4-Flash dimensions."""
    return ModelConfig()


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small model that keeps every structural feature of V4-Flash.

    All three attention kinds, hash layers, an MTP block, CSA top-k that binds (more
    compressed entries than `index_topk` after ~40 tokens), HCA blocks and window wraps within
    a few hundred tokens. The real value is in the comment beside each field.
    """
    base = dict(
        vocab_size=129280,  # 129280 (kept: the tokenizer's special ids live near the top)
        hidden_size=64,  # 4096
        num_hidden_layers=5,  # 43: SWA, SWA, CSA, HCA, CSA
        num_nextn_predict_layers=1,  # 1
        num_attention_heads=4,  # 64
        head_dim=32,  # 512
        qk_rope_head_dim=16,  # 64
        q_lora_rank=32,  # 1024
        o_groups=2,  # 8
        o_lora_rank=16,  # 1024
        sliding_window=16,  # 128
        compress_ratios=(0, 0, 4, 16, 4, 0),  # (0, 0, 4, 128, ..., 4, 0); HCA ratio 128 -> 16
        # 65536 / 16 / 1048576: keeps max = original x factor; rope pairs 0-1 keep their
        # frequency, 2-5 blend, 6-7 are divided, as on V4-Flash (0-15 / 16-24 / 25-31)
        original_max_position_embeddings=16384,
        rope_factor=4.0,
        max_position_embeddings=65536,
        index_n_heads=16,  # 64 (>= 16 avoids ReLU ties in top-k; docs/engine.md §4)
        index_head_dim=32,  # 128
        index_topk=8,  # 512
        n_routed_experts=8,  # 256
        num_experts_per_tok=2,  # 6
        moe_intermediate_size=32,  # 2048
        num_hash_layers=2,  # 3
        weight_block_size=(128, 128),  # (128, 128): edges use ceil-sized scale grids
    )
    base.update(overrides)
    return ModelConfig(**base)


PRESETS = {"tiny": tiny_config, "flash": flash_config}


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"HOMESEEK_{name}", default)


def server_api_key() -> str | None:
    """HOMESEEK_API_KEY: the server's key when `--api-key` is not given (a flag shows in `ps`,
    the environment does not). Empty counts as unset."""
    return _env("API_KEY") or None


def env_int(name: str, default: int | None, minimum: int = 1) -> int | None:
    """HOMESEEK_<name> as a whole number >= minimum; unset or empty gives `default`.

    A bad value is a ConfigError that names the variable, not int()'s "invalid literal".
    """
    raw = _env(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(
            f"HOMESEEK_{name}={raw!r} is not a whole number; set it to one "
            f"(e.g. {default if default is not None else minimum}) "
            "or unset it"
        ) from None
    if value < minimum:
        raise ConfigError(f"HOMESEEK_{name}={value} must be >= {minimum}; raise it or unset it")
    return value


# Prefill chunk without a GPU budget to derive one from (CPU engines: host memory is not planned).
DEFAULT_PREFILL_CHUNK = 2048


# The most tokens prefilled layer by layer on CUDA when no group is given
# (`RuntimeConfig.prefill_group`; the plan derives the group: plan.derive_group). At 24 GiB a
# 16K-token prompt took 24.5 s chunk by chunk (the model copied once per 4K chunk) and 15.4 s
# layer by layer (tools/PERF_NOTES.md, session 11), for 384 MiB of the budget (the other
# chunks' streams) taken from the expert pool; 578 MiB since session 15, which also holds the
# other chunks' pending A (4.9-5.3 s). CPU engines copy nothing: chunk by chunk.
DEFAULT_PREFILL_GROUP = 16384


def prefill_group_default(device: str) -> int | None:
    """HOMESEEK_PREFILL_GROUP if set; else None on CUDA (the memory plan derives the group) and
    0 (chunk by chunk) elsewhere."""
    return env_int("PREFILL_GROUP", None if device.startswith("cuda") else 0, minimum=0)


def prefill_chunk_env() -> int | None:
    """HOMESEEK_PREFILL_CHUNK as a whole number >= 1; None when unset or empty (the chunk is
    then derived from the GPU budget, homeseek.plan)."""
    raw = _env("PREFILL_CHUNK")
    if raw is None or not raw.strip():
        return None
    return env_int("PREFILL_CHUNK", DEFAULT_PREFILL_CHUNK)


def default_cache_dir() -> Path:
    """Where built-in models (`tiny`) are created on first use."""
    env = _env("CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "homeseek"


@dataclass(frozen=True)
class RuntimeConfig:
    """How this process runs the model. Built once at load and passed explicitly."""

    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16  # activation dtype
    # emulate the reference's FP8/FP4 activation rounding (docs/architecture.md §2.5)
    quant_sim: bool = True
    max_context: int = 32768  # tokens of decode state preallocated per session
    # Tokens per forward chunk during prefill. None: derived from the GPU budget by the memory
    # plan (homeseek.plan.derive_chunk; DEFAULT_PREFILL_CHUNK without a budget); the engine
    # keeps the resolved value in its own RuntimeConfig.
    prefill_chunk: int | None = None
    # Tokens of a prompt prefilled layer by layer (`Runner.steps`): the group's chunks each pass
    # a layer before the next layer starts, so an expert moves over PCIe once per group instead
    # of once per chunk, for the GPU memory of the other chunks' streams and pending A (the plan
    # reserves it). 0 (or no more than a chunk): chunk by chunk. None on CUDA: derived by the
    # memory plan (plan.derive_group, at most DEFAULT_PREFILL_GROUP); build() fills it from
    # HOMESEEK_PREFILL_GROUP, else leaves None on CUDA and 0 elsewhere.
    prefill_group: int | None = None
    gpu_mem_gb: float | None = None
    host_mem_gb: float | None = None
    graphs: bool = False  # CUDA graphs for the decode step (CUDA only; build() turns it on there)
    max_sessions: int = 1  # sessions whose decode state is preallocated (live at once)
    # > 0: load the MTP block and decode speculatively with this many drafts per step
    # (homeseek/speculative.py); Session.mtp_logits needs it
    mtp: int = 0
    expert_slots: int | None = None  # slot-pool size; None: derived from gpu_mem_gb
    eviction: str = "lrfu"  # expert-pool eviction policy: lru | lrfu[:half-life]
    hot_profile: str | None = None  # routing profile whose top experts stay pinned in the pool
    kernels: bool = True  # Triton kernels on CUDA; False runs the torch twins there too
    # A decode layer's missed experts partly computed on the CPU (homeseek/cpu_lane.py):
    # "auto" where the CPU kernel builds here, "on" (an error where it cannot), "off".
    cpu_lane: str = "auto"
    cpu_threads: int | None = None  # the CPU lane's threads; None: the cores but two
    # Start copying the next layer's experts early: in decode those its router predicts from
    # this layer's input, in prefill all of them for chunks that use nearly all
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.max_context < 1:
            raise ConfigError(f"max_context must be >= 1, got {self.max_context}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.prefill_group is not None and self.prefill_group < 0:
            raise ConfigError(
                f"prefill_group must be >= 0 (0: chunk by chunk), got {self.prefill_group}"
            )
        if self.graphs and not str(self.device).startswith("cuda"):
            raise ConfigError(f"graphs=True needs a CUDA device, got device={self.device!r}")
        if self.max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if not 0 <= self.mtp <= 3:
            raise ConfigError(f"mtp must be 0 (off) to 3 drafts, got {self.mtp}")
        if self.cpu_lane not in ("on", "off", "auto"):
            raise ConfigError(f"cpu_lane must be on, off or auto, got {self.cpu_lane!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")

    @classmethod
    def build(cls, **kw: Any) -> RuntimeConfig:
        """Fill unset fields from HOMESEEK_* environment variables, then validate."""
        if kw.get("max_context") is None:
            kw["max_context"] = env_int("MAX_CONTEXT", 32768)
        if kw.get("prefill_chunk") is None:  # still None when unset: derived at load
            kw["prefill_chunk"] = prefill_chunk_env()
        if kw.get("prefill_group") is None:
            kw["prefill_group"] = prefill_group_default(str(kw.get("device", "cpu")))
        if kw.get("graphs") is None:  # on by default where they exist
            kw["graphs"] = str(kw.get("device", "cpu")).startswith("cuda")
        return cls(**kw)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def yarn_inv_freq(cfg: ModelConfig, compressed: bool) -> torch.Tensor:
    """Per-pair RoPE frequencies [d_r/2]: plain for SWA, YaRN-blended otherwise
    (docs/architecture.md §3.3)."""
    dr = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    # float32 throughout, as the reference computes its tables.
    inv = 1.0 / (base ** (torch.arange(0, dr, 2, dtype=torch.int64).float() / dr))
    if not compressed:
        return inv

    def corr(n: float) -> float:
        return (
            dr
            * math.log(cfg.original_max_position_embeddings / (n * 2 * math.pi))
            / (2 * math.log(base))
        )

    lo = max(math.floor(corr(cfg.beta_fast)), 0)
    hi = min(math.ceil(corr(cfg.beta_slow)), dr - 1)
    if lo == hi:
        hi += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dr // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    # ramp 0 keeps a frequency, 1 divides it by the factor: theta(1 - r) + theta / f * r
    return inv / cfg.rope_factor * ramp + inv * (1 - ramp)
