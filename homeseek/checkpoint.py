"""The official checkpoint on disk: name table, per-tensor formats, validation, lazy reads.

A checkpoint directory holds `config.json`, `model.safetensors.index.json` (or one
`model.safetensors`) and the shards. Tensor names are the reference module paths
(`layers.{i}.attn.wq_a.weight`, ...). The format of each tensor is decided by its dtype, never by
its name: bf16/fp32 plain, FP8 e4m3 with a `.scale` (E8M0 or fp32, 128x128 blocks), FP4 packed
in int8 with an E8M0 `.scale` per 32 inputs.

Shards are memory-mapped; nothing reads the whole checkpoint into RAM.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from homeseek.config import CSA, HCA, ModelConfig, ceil_div
from homeseek.quant import dequant_fp4, dequant_fp8, scale_to_float

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype strings -> torch dtypes and element sizes.
ST_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
}
ST_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "U8": 1}
ST_SIZES.update({"I32": 4, "I64": 8})


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or contradicts config.json; says which."""


# --- the name table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One logical tensor of the official layout.

    kind: "bf16" | "fp32" | "i64" (plain), "fp8" (e4m3 weight + block `.scale`),
    "fp4" (packed E2M1 weight + per-32 E8M0 `.scale`). shape is the logical shape;
    `fields` names the config fields that determine it (for error messages).
    """

    kind: str
    shape: tuple[int, ...]
    fields: str


def layer_table(cfg: ModelConfig, layer: int, prefix: str) -> dict[str, TensorSpec]:
    """Tensors of one block (main layer `layers.{i}.` or MTP `mtp.{k}.`), logical shapes."""
    D, H, Dh, I = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.moe_intermediate_size
    mix = (2 + cfg.hc_mult) * cfg.hc_mult
    t: dict[str, TensorSpec] = {}

    def add(name: str, kind: str, shape: tuple[int, ...], fields: str) -> None:
        t[prefix + name] = TensorSpec(kind, shape, fields)

    add("attn_norm.weight", "bf16", (D,), "hidden_size")
    add("ffn_norm.weight", "bf16", (D,), "hidden_size")
    for s in ("attn", "ffn"):
        add(f"hc_{s}_fn", "fp32", (mix, cfg.hc_mult * D), "hc_mult, hidden_size")
        add(f"hc_{s}_base", "fp32", (mix,), "hc_mult")
        add(f"hc_{s}_scale", "fp32", (3,), "-")
    add("attn.attn_sink", "fp32", (H,), "num_attention_heads")
    add("attn.wq_a.weight", "fp8", (cfg.q_lora_rank, D), "q_lora_rank, hidden_size")
    add("attn.q_norm.weight", "bf16", (cfg.q_lora_rank,), "q_lora_rank")
    add("attn.wq_b.weight", "fp8", (H * Dh, cfg.q_lora_rank), "num_attention_heads*head_dim")
    add("attn.wkv.weight", "fp8", (Dh, D), "head_dim, hidden_size")
    add("attn.kv_norm.weight", "bf16", (Dh,), "head_dim")
    og = cfg.o_groups * cfg.o_lora_rank
    add("attn.wo_a.weight", "fp8", (og, H * Dh // cfg.o_groups), "o_groups*o_lora_rank")
    add("attn.wo_b.weight", "fp8", (D, og), "hidden_size, o_groups*o_lora_rank")
    kind = cfg.attn_kind(layer)
    m = cfg.compress_ratios[layer]
    if kind in (CSA, HCA):
        c = 2 if kind == CSA else 1  # CSA compressors overlap: [A half | B half]
        add("attn.compressor.wkv.weight", "bf16", (c * Dh, D), "head_dim, hidden_size")
        add("attn.compressor.wgate.weight", "bf16", (c * Dh, D), "head_dim, hidden_size")
        add("attn.compressor.ape", "fp32", (m, c * Dh), "compress_ratios, head_dim")
        add("attn.compressor.norm.weight", "bf16", (Dh,), "head_dim")
    if kind == CSA:
        HI, DI = cfg.index_n_heads, cfg.index_head_dim
        add("attn.indexer.wq_b.weight", "fp8", (HI * DI, cfg.q_lora_rank), "index_n_heads")
        add("attn.indexer.weights_proj.weight", "bf16", (HI, D), "index_n_heads, hidden_size")
        add("attn.indexer.compressor.wkv.weight", "bf16", (2 * DI, D), "index_head_dim")
        add("attn.indexer.compressor.wgate.weight", "bf16", (2 * DI, D), "index_head_dim")
        add("attn.indexer.compressor.ape", "fp32", (m, 2 * DI), "index_head_dim")
        add("attn.indexer.compressor.norm.weight", "bf16", (DI,), "index_head_dim")
    E = cfg.n_routed_experts
    add("ffn.gate.weight", "bf16", (E, D), "n_routed_experts, hidden_size")
    if cfg.is_hash_layer(layer):
        add("ffn.gate.tid2eid", "i64", (cfg.vocab_size, cfg.num_experts_per_tok), "vocab_size")
    else:
        add("ffn.gate.bias", "fp32", (E,), "n_routed_experts")
    Is = I * cfg.n_shared_experts
    add("ffn.shared_experts.w1.weight", "fp8", (Is, D), "moe_intermediate_size")
    add("ffn.shared_experts.w3.weight", "fp8", (Is, D), "moe_intermediate_size")
    add("ffn.shared_experts.w2.weight", "fp8", (D, Is), "moe_intermediate_size")
    for e in range(E):
        add(f"ffn.experts.{e}.w1.weight", "fp4", (I, D), "moe_intermediate_size, hidden_size")
        add(f"ffn.experts.{e}.w3.weight", "fp4", (I, D), "moe_intermediate_size, hidden_size")
        add(f"ffn.experts.{e}.w2.weight", "fp4", (D, I), "hidden_size, moe_intermediate_size")
    if layer >= cfg.num_hidden_layers:  # MTP-only tensors (docs/architecture.md §2.2)
        add("e_proj.weight", "fp8", (D, D), "hidden_size")
        add("h_proj.weight", "fp8", (D, D), "hidden_size")
        for n in ("enorm", "hnorm", "norm"):
            add(f"{n}.weight", "bf16", (D,), "hidden_size")
        add("hc_head_fn", "fp32", (cfg.hc_mult, cfg.hc_mult * D), "hc_mult, hidden_size")
        add("hc_head_base", "fp32", (cfg.hc_mult,), "hc_mult")
        add("hc_head_scale", "fp32", (1,), "-")
    return t


def top_table(cfg: ModelConfig) -> dict[str, TensorSpec]:
    D, V = cfg.hidden_size, cfg.vocab_size
    return {
        "embed.weight": TensorSpec("bf16", (V, D), "vocab_size, hidden_size"),
        "head.weight": TensorSpec("bf16", (V, D), "vocab_size, hidden_size"),
        "norm.weight": TensorSpec("bf16", (D,), "hidden_size"),
        "hc_head_fn": TensorSpec("fp32", (cfg.hc_mult, cfg.hc_mult * D), "hc_mult, hidden_size"),
        "hc_head_base": TensorSpec("fp32", (cfg.hc_mult,), "hc_mult"),
        "hc_head_scale": TensorSpec("fp32", (1,), "-"),
    }


def layer_prefix(cfg: ModelConfig, layer: int) -> str:
    if layer < cfg.num_hidden_layers:
        return f"layers.{layer}."
    return f"mtp.{layer - cfg.num_hidden_layers}."


def tensor_table(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every logical tensor of the official checkpoint for `cfg`, in file order."""
    t = top_table(cfg)
    for layer in range(cfg.num_layers_total):
        t.update(layer_table(cfg, layer, layer_prefix(cfg, layer)))
    return t


def stored_shapes(name: str, spec: TensorSpec, cfg: ModelConfig) -> dict[str, tuple]:
    """The stored tensors of one logical tensor: name -> (shape, allowed dtypes)."""
    if spec.kind == "fp8":
        n, k = spec.shape
        bn, bk = cfg.weight_block_size
        scale = name.removesuffix(".weight") + ".scale"
        return {
            name: (spec.shape, ("F8_E4M3",)),
            scale: ((ceil_div(n, bn), ceil_div(k, bk)), ("F8_E8M0", "U8", "F32")),
        }
    if spec.kind == "fp4":
        n, k = spec.shape
        scale = name.removesuffix(".weight") + ".scale"
        return {name: ((n, k // 2), ("I8", "U8")), scale: ((n, k // 32), ("F8_E8M0", "U8"))}
    allowed = {"bf16": ("BF16", "F32", "F16"), "fp32": ("F32", "BF16"), "i64": ("I64", "I32")}
    return {name: (spec.shape, allowed[spec.kind])}


# --- weights as stored ---------------------------------------------------------------------------
@dataclass
class QWeight:
    """One linear's weight as it lives in memory.

    fmt "plain": `weight` is bf16/fp32 [N, K]. fmt "fp8": `weight` e4m3 [N, K], `scale` float32
    block scales. fmt "fp4": `weight` packed uint8 [N, K/2], `scale` raw E8M0 bytes [N, K/32].
    """

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    fmt: str = "plain"
    block: int = 128

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.weight.shape
        return (n, k * 2) if self.fmt == "fp4" else (n, k)

    def dequant(self) -> torch.Tensor:
        """float32 [N, K]."""
        if self.fmt == "fp8":
            return dequant_fp8(self.weight, self.scale, self.block)
        if self.fmt == "fp4":
            return dequant_fp4(self.weight, self.scale)
        return self.weight.float()

    def to(self, device: torch.device | str) -> QWeight:
        s = None if self.scale is None else self.scale.to(device)
        return QWeight(self.weight.to(device), s, self.fmt, self.block)


def as_qweight(
    w: torch.Tensor, scale: torch.Tensor | None, name: str, block: int, where: object = ""
) -> QWeight:
    """Stored weight (+ `.scale`) -> QWeight, the format decided by dtype alone."""
    if w.dtype == torch.float8_e4m3fn:
        if scale is None:
            raise CheckpointError(f"{where}: FP8 {name} has no .scale")
        return QWeight(w, scale_to_float(scale), "fp8", block)
    if w.dtype in (torch.int8, torch.uint8):
        if scale is None:
            raise CheckpointError(f"{where}: FP4 {name} has no .scale")
        return QWeight(w.view(torch.uint8), scale.view(torch.uint8), "fp4")
    return QWeight(w)


# --- reading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file
    nbytes: int = 0


def read_safetensors_header(path: Path) -> dict[str, _Entry]:
    """Parse one shard's header and check the file holds every byte it announces."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated header ({n} bytes announced)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    out: dict[str, _Entry] = {}
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        end_max = max(end_max, end)
        shape = tuple(info["shape"])
        n_el = 1
        for d in shape:
            n_el *= d
        elt = ST_SIZES.get(info["dtype"])
        if elt is not None and end - start != n_el * elt:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes for {shape}")
        out[name] = _Entry(path, info["dtype"], shape, 8 + n + start, end - start)
    if 8 + n + end_max > size:
        raise CheckpointError(
            f"{path}: truncated: header announces {8 + n + end_max} bytes, file has {size}"
        )
    return out


def verify(path: str | Path) -> list[str]:
    """Every problem a downloaded checkpoint directory has, as sentences (empty: complete).

    Lists every missing or truncated shard (not just the first), then checks the tensors against
    config.json.
    """
    path = Path(path)
    problems: list[str] = []
    if not (path / "config.json").exists():
        return [f"{path}: config.json missing"]
    index = path / INDEX_NAME
    if not index.exists():
        return [f"{path}: {INDEX_NAME} missing"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        return [f"{index}: not a safetensors index ({e})"]
    for f in sorted(set(weight_map.values())):
        try:
            read_safetensors_header(path / f)
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        return problems
    try:
        Checkpoint(path).validate()
    except (CheckpointError, ValueError) as e:
        problems.append(str(e))
    return problems


class Checkpoint:
    """An official checkpoint directory, validated against its config.json, read lazily."""

    def __init__(self, path: str | Path, cfg: ModelConfig | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self.cfg = cfg if cfg is not None else ModelConfig.from_file(self.path / "config.json")
        self.entries = self._read_index()
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    def _read_index(self) -> dict[str, _Entry]:
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        elif (self.path / SINGLE_NAME).exists():
            weight_map = None
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        missing = [f for f in files if not (self.path / f).exists()]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(
                f"{self.path}: shard(s) missing: {', '.join(missing[:3])}{more}; "
                "re-run `homeseek download` to fetch them"
            )
        entries: dict[str, _Entry] = {}
        for f in files:
            entries.update(read_safetensors_header(self.path / f))
        if weight_map:
            for name, f in weight_map.items():
                e = entries.get(name)
                if e is None or e.file.name != f:
                    raise CheckpointError(
                        f"{self.path / f}: tensor {name} listed in index, not found"
                    )
        return entries

    def validate(self) -> None:
        """Every tensor config.json implies is present with the right shape and dtype."""
        table = tensor_table(self.cfg)
        for name, spec in table.items():
            for sname, (shape, dtypes) in stored_shapes(name, spec, self.cfg).items():
                e = self.entries.get(sname)
                if e is None:
                    raise CheckpointError(
                        f"{self.path}: tensor {sname} missing from the checkpoint "
                        f"(config.json implies it; fields: {spec.fields})"
                    )
                if tuple(e.shape) != tuple(shape):
                    raise CheckpointError(
                        f"{e.file}: tensor {sname} has shape {list(e.shape)}, config.json implies "
                        f"{list(shape)} (fields: {spec.fields})"
                    )
                if e.dtype not in dtypes:
                    raise CheckpointError(
                        f"{e.file}: tensor {sname} has dtype {e.dtype}, expected one of {dtypes}"
                    )

    def has(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        """One stored tensor (CPU, memory-mapped read)."""
        e = self.entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: tensor {name} not in the checkpoint")
        h = self._handles.get(e.file)
        if h is None:
            h = safe_open(str(e.file), framework="pt", device="cpu")
            self._handles[e.file] = h
        try:
            return h.get_tensor(name)
        except Exception as ex:  # noqa: BLE001 - re-raised with the file and tensor named
            raise CheckpointError(f"{e.file}: cannot read tensor {name}: {ex}") from ex

    def get_mapped(self, name: str) -> torch.Tensor:
        """A zero-copy CPU view of one stored tensor over a read-only memory map of its shard.

        Nothing is read until the bytes are touched; the OS page cache is the disk tier's only
        buffer. The view must not be written to.
        """
        e = self.entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: tensor {name} not in the checkpoint")
        mm = self._maps.get(e.file)
        if mm is None:
            with open(e.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[e.file] = mm
        with warnings.catch_warnings():  # read-only buffer: torch warns, we never write to it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=e.nbytes, offset=e.offset)
        return raw.view(ST_DTYPES[e.dtype]).view(e.shape)

    def get_weight(self, name: str) -> QWeight:
        """A linear weight in its stored format, decided by dtype (docs/architecture.md §2.3)."""
        scale_name = name.removesuffix(".weight") + ".scale"
        w = self.get(name)
        scale = self.get(scale_name) if self.has(scale_name) else None
        return as_qweight(w, scale, name, self.cfg.weight_block_size[0], self.entries[name].file)

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()
