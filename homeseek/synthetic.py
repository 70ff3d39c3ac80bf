"""Random checkpoints of any size in exactly the official on-disk layout.

`write_checkpoint(out_dir, config, seed=0)` writes config.json, sharded safetensors files with the
official tensor names, dtypes and shapes (FP8 e4m3 + E8M0 block scales, FP4 packed int8 + E8M0
per-32 scales, int64 `tid2eid`, fp32 sinks/ape/bias/mHC parameters), the index json, and a real
byte-level BPE tokenizer. Values are scaled so activations stay healthy through every layer, and
the paths a zero init would hide (sinks, ape, router bias, tid2eid) get random values.

Each tensor draws from its own generator seeded by (seed, name), so the bytes of a tensor do not
depend on sharding or on which other tensors exist. Full-size (`flash`) checkpoints are written
one shard at a time and never held in memory whole.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from homeseek.checkpoint import (
    INDEX_NAME,
    ST_SIZES,
    QWeight,
    TensorSpec,
    as_qweight,
    stored_shapes,
    tensor_table,
)
from homeseek.config import ModelConfig
from homeseek.quant import FP4_TABLE, quant_fp8_blocks

# Bumped whenever the values written for a given (config, seed) change, so cached built-in
# models are rebuilt.
WRITER_VERSION = 2  # 2: the tiny tokenizer learned from data/corpus_en.txt
_FP4_RMS = math.sqrt(sum(v * v for v in FP4_TABLE) / len(FP4_TABLE))  # ~2.93 for uniform codes


def _gen(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def _normal(shape: tuple[int, ...], std: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=g.device) * std


def _fp4_random(shape: tuple[int, int], std: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform random E2M1 codes with per-32 power-of-two scales around `std` (exact by design)."""
    n, k = shape
    dev = g.device
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.int32, device=dev)
    packed = packed.to(torch.uint8)
    base = round(math.log2(std / _FP4_RMS))
    jitter = torch.randint(-1, 2, (n, k // 32), generator=g, device=dev)
    scale = (127 + base + jitter).clamp(1, 254).to(torch.uint8)
    return {"weight": packed.view(torch.int8), "scale": scale.view(torch.float8_e8m0fnu)}


def make_tensor(
    name: str, spec: TensorSpec, cfg: ModelConfig, seed: int, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The stored tensors (name -> tensor) for one logical tensor of the table.

    Values depend on (seed, name, device): a CUDA generator draws other numbers than the CPU one.
    """
    g = _gen(seed, name, device)
    leaf = name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1]
    if spec.kind == "fp8":
        n, k = spec.shape
        q, s = quant_fp8_blocks(_normal(spec.shape, k**-0.5, g), cfg.weight_block_size[0])
        return {name: q, name.removesuffix(".weight") + ".scale": s.view(torch.float8_e8m0fnu)}
    if spec.kind == "fp4":
        n, k = spec.shape
        t = _fp4_random((n, k), k**-0.5, g)
        return {name: t["weight"], name.removesuffix(".weight") + ".scale": t["scale"]}
    if spec.kind == "i64":  # tid2eid: K distinct experts per token id
        v, k = spec.shape
        ids = torch.rand((v, cfg.n_routed_experts), generator=g, device=g.device)
        ids = ids.argsort(dim=-1)[:, :k]
        return {name: ids.to(torch.int64).contiguous()}
    shape = spec.shape
    if leaf in ("attn_norm", "ffn_norm", "q_norm", "kv_norm", "norm", "enorm", "hnorm"):
        val = 1.0 + _normal(shape, 0.1, g)
    elif leaf in ("embed",):
        val = _normal(shape, 1.0, g)
    elif leaf in ("head", "wkv", "wgate", "weights_proj", "gate") or leaf.endswith("proj"):
        val = _normal(shape, shape[-1] ** -0.5, g)
    elif leaf.endswith("_fn"):  # mHC projections: mixing logits ~ N(0, 1) on unit-RMS input
        val = _normal(shape, shape[-1] ** -0.5, g)
    elif leaf.endswith("_base"):
        val = _normal(shape, 0.5, g)
    elif leaf.endswith("_scale"):
        val = 0.5 + torch.rand(shape, generator=g, device=g.device)
    elif leaf in ("attn_sink", "ape"):
        val = _normal(shape, 1.0 if leaf == "attn_sink" else 0.5, g)
    elif leaf == "bias":  # router selection bias
        val = _normal(shape, 0.3, g)
    else:
        raise ValueError(f"synthetic: no value rule for {name}")
    dtype = torch.bfloat16 if spec.kind == "bf16" else torch.float32
    return {name: val.to(dtype).contiguous()}


def _stored_bytes(name: str, spec: TensorSpec, cfg: ModelConfig) -> int:
    total = 0
    for shape, dtypes in stored_shapes(name, spec, cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n * ST_SIZES[dtypes[0]]
    return total


def write_checkpoint(
    out_dir: str | Path,
    config: ModelConfig,
    seed: int = 0,
    shard_bytes: int = 1 << 30,
    tokenizer: bool = True,
    progress: bool = False,
) -> Path:
    """Write a random checkpoint of `config` in the official layout; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = tensor_table(config)
    # Plan shards first so file names can carry the shard count, as the official ones do.
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in table.items():
        b = _stored_bytes(name, spec, config)
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += b
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=len(table), desc="writing tensors", unit="t", disable=not progress)
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            tensors.update(make_tensor(name, table[name], config, seed))
            bar.update(1)
        for k, t in tensors.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    gen_cfg = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    gen_cfg.update({"do_sample": True, "temperature": 1.0, "top_p": 1.0})
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    if tokenizer:
        _write_tokenizer(out)
    return out


def _write_tokenizer(out: Path) -> None:
    """The synthetic byte-level BPE tokenizer (official special-token ids)."""
    try:
        from homeseek.tokenizer import write_tokenizer_files
    except ImportError:  # tokenizer module not available: ids-only checkpoint
        return
    write_tokenizer_files(out)


class SyntheticSource:
    """The tensors `write_checkpoint` would write, generated in memory on demand (no disk).

    For full-size benchmarks: V4-Flash's ~150 GB does not fit a disk or a host, so routed experts
    can be aliased onto `expert_alias` distinct records (expert (l, e) reads record
    (l·E + e) mod expert_alias), which keeps the routing real (router weights are dense and
    unaliased) while the expert bytes stay few. Quacks like `Checkpoint` for the engine.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        seed: int = 0,
        device: str | torch.device = "cpu",
        expert_alias: int | None = None,
    ) -> None:
        self.cfg, self.seed, self.device = cfg, seed, device
        # The records are layer 0's experts: at most that many (a tiny preset has fewer
        # experts a layer than the bench's default alias count)
        self.alias = min(expert_alias, cfg.n_routed_experts) if expert_alias else expert_alias
        self.path = None
        self.table = tensor_table(cfg)
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None
        self._records: dict[str, torch.Tensor] = {}

    def validate(self) -> None:
        """Generated from the table itself: consistent by construction."""

    def has(self, name: str) -> bool:
        base = name.removesuffix(".scale") + ".weight" if name.endswith(".scale") else name
        return base in self.table

    def _stored(self, name: str) -> dict[str, torch.Tensor]:
        base = name.removesuffix(".scale") + ".weight" if name.endswith(".scale") else name
        if self._last is None or self._last[0] != base:  # weight then scale: make once
            self._last = (
                base,
                make_tensor(base, self.table[base], self.cfg, self.seed, self.device),
            )
        return self._last[1]

    def get(self, name: str) -> torch.Tensor:
        return self._stored(name)[name]

    def get_weight(self, name: str) -> QWeight:
        t = self._stored(name)
        scale = t.get(name.removesuffix(".weight") + ".scale")
        return as_qweight(t[name], scale, name, self.cfg.weight_block_size[0], "synthetic")

    def get_mapped(self, name: str) -> torch.Tensor:
        """Expert tensors (possibly aliased) live in host memory; others as `get`, on the CPU."""
        if ".experts." not in name or not self.alias:
            return self.get(name).cpu()
        pre, rest = name.split(".ffn.experts.")
        e, leaf = rest.split(".", 1)
        layer = int(pre.split(".")[1]) if pre.startswith("layers.") else self.cfg.num_hidden_layers
        a = (layer * self.cfg.n_routed_experts + int(e)) % self.alias
        src = f"layers.0.ffn.experts.{a}.{leaf}"
        if src not in self._records:
            self._records[src] = self.get(src).cpu()
        return self._records[src]
