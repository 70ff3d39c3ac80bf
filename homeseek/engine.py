"""Load a checkpoint, own the weights, run sessions (chunked prefill and decode).

`Engine` owns the dense weights, the expert store and the RoPE tables; `Session` owns one
sequence's decode state. One step runs, per layer, segment A, the routed experts (made resident by
the expert store between the segments), then segment B (design.md §4).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from homeseek import model as M
from homeseek.checkpoint import Checkpoint, QWeight, layer_prefix, layer_table, top_table
from homeseek.config import PRESETS, ConfigError, ModelConfig, RuntimeConfig, default_cache_dir
from homeseek.experts import ResidentExperts
from homeseek.state import SessionState


class ContextError(ValueError):
    """A sequence would grow past the preallocated context."""


# --- built-in models -----------------------------------------------------------------------------
TINY_SEED = 0


def preset_dir(name: str, seed: int = TINY_SEED) -> Path:
    """Directory of a built-in synthetic model; the name changes whenever its content would."""
    from homeseek.synthetic import WRITER_VERSION

    cfg = PRESETS[name]()
    key = json.dumps([cfg.to_dict(), seed, WRITER_VERSION], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return default_cache_dir() / "models" / f"{name}-{digest}"


def ensure_preset(name: str, seed: int = TINY_SEED) -> Path:
    """Create a built-in model on first use (offline; written atomically) and return its path."""
    from homeseek.synthetic import write_checkpoint

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if name != "tiny":
        raise ConfigError(
            f"preset {name!r} is full size: write it explicitly with `homeseek synth {name} DIR`"
        )
    final = preset_dir(name, seed)
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        write_checkpoint(tmp, PRESETS[name](), seed=seed)
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").exists():  # nobody else won the race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(path_or_preset: str | os.PathLike) -> Path:
    p = Path(path_or_preset)
    if p.is_dir():
        return p
    if str(path_or_preset) in PRESETS:
        return ensure_preset(str(path_or_preset))
    raise ConfigError(
        f"{path_or_preset}: not a checkpoint directory nor a preset ({', '.join(sorted(PRESETS))})"
    )


# --- weights -------------------------------------------------------------------------------------
def _load_block(ckpt: Checkpoint, cfg: ModelConfig, layer: int, device: str) -> M.LayerWeights:
    """Dense weights of one block, keyed by local name: linears as QWeight, the rest as tensors."""
    pre = layer_prefix(cfg, layer)
    lw: M.LayerWeights = {}
    for name, spec in layer_table(cfg, layer, pre).items():
        if ".experts." in name:
            continue  # routed experts belong to the expert store
        local = name[len(pre) :]
        if local.endswith(".weight") and len(spec.shape) == 2:
            lw[local.removesuffix(".weight")] = ckpt.get_weight(name).to(device)
        elif local.endswith(".weight"):  # norm weights: fp32 as the reference holds them
            lw[local.removesuffix(".weight")] = ckpt.get(name).float().to(device)
        elif spec.kind == "i64":
            lw[local] = ckpt.get(name).long().to(device)
        else:
            lw[local] = ckpt.get(name).float().to(device)
    return lw


class Engine:
    """A loaded model. Build with `homeseek.load`."""

    def __init__(self, path: Path, rt: RuntimeConfig, progress: bool = False) -> None:
        self.path = path
        self.rt = rt
        self.ckpt = Checkpoint(path)
        self.ckpt.validate()
        self.cfg = cfg = self.ckpt.cfg
        if rt.max_context > cfg.max_position_embeddings:
            raise ConfigError(
                f"max_context={rt.max_context} exceeds the model's max_position_embeddings="
                f"{cfg.max_position_embeddings}"
            )
        self.ctx = M.Ctx(cfg, rt.dtype, rt.quant_sim)
        dev = rt.device
        self.top = {
            "embed": self.ckpt.get("embed.weight").to(dev),
            "head": self.ckpt.get("head.weight").to(dev),
            "norm": self.ckpt.get("norm.weight").float().to(dev),
        }
        for k in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
            self.top[k] = self.ckpt.get(k).float().to(dev)
        self.layers = list(range(cfg.num_hidden_layers))
        self.weights = [
            _load_block(self.ckpt, cfg, i, dev)
            for i in tqdm(self.layers, desc="loading layers", disable=not progress)
        ]
        self.experts = ResidentExperts(self.ckpt, cfg, self.layers, dev, progress)
        self.rope = M.RopeTables(cfg, rt.max_context, dev)
        self.tokenizer = _load_tokenizer(path)
        if top_table(cfg).keys() - self.ckpt.entries.keys():  # validate() guarantees this
            raise AssertionError("checkpoint validation missed a top-level tensor")

    def session(self) -> Session:
        return Session(self)

    # One step over T tokens of one sequence; returns the final streams [T, N, D].
    def _step(self, ids: torch.Tensor, state: SessionState) -> torch.Tensor:
        pos = torch.arange(state.pos, state.pos + ids.shape[0], device=ids.device)
        X = M.embed(ids, self.top["embed"], self.ctx)
        for layer in self.layers:
            p = M.segment_a(
                X, ids, pos, self.weights[layer], state.layers[layer], layer, self.rope, self.ctx
            )
            routed = M.routed_experts(p.u, p.sel, p.weights, layer, self.experts.get, self.ctx)
            X = M.segment_b(p, routed)
        state.pos += ids.shape[0]
        return X


class Session:
    """One sequence: preallocated decode state plus the position reached."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.state = SessionState(engine.cfg, engine.rt, engine.layers)

    @property
    def pos(self) -> int:
        return self.state.pos

    def reset(self) -> None:
        self.state.reset()

    def forward(self, token_ids: Sequence[int] | torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Feed any number of tokens at the current position -> float32 logits [T, vocab].

        Long inputs run in chunks of `prefill_chunk`; `last_only` returns just [1, vocab].
        """
        eng = self.engine
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).to(eng.rt.device)
        T = ids.shape[0]
        if T == 0:
            raise ValueError("forward() needs at least one token id")
        V = eng.cfg.vocab_size
        bad = (ids < 0) | (ids >= V)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"token id {int(ids[i])} at index {i} is outside [0, {V})")
        if self.state.pos + T > eng.rt.max_context:
            raise ContextError(
                f"sequence would reach {self.state.pos + T} tokens (at {self.state.pos}, +{T}); "
                f"max_context is {eng.rt.max_context}: raise max_context or shorten the prompt"
            )
        outs = []
        chunk = eng.rt.prefill_chunk
        with torch.inference_mode():
            for a in range(0, T, chunk):
                X = eng._step(ids[a : a + chunk], self.state)
                if last_only and a + chunk < T:
                    continue
                if last_only:
                    X = X[-1:]
                outs.append(M.head_logits(X, eng.top, eng.ctx))
        return torch.cat(outs)

    def decode(self, token_id: int) -> torch.Tensor:
        """One token -> float32 logits [vocab]."""
        return self.forward([int(token_id)])[0]


def _load_tokenizer(path: Path) -> object | None:
    try:
        from homeseek.tokenizer import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_dir(path)


def load(
    path_or_preset: str | os.PathLike = "tiny",
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    gpu_mem_gb: float | None = None,
    host_mem_gb: float | None = None,
    max_context: int | None = 32768,
    quant_sim: bool = True,
    graphs: bool | None = None,
    mtp: int = 0,
    progress: bool = False,
) -> Engine:
    """Load a checkpoint directory or a preset ("tiny") -> Engine (design.md §5)."""
    rt = RuntimeConfig.build(
        device=device,
        dtype=dtype,
        gpu_mem_gb=gpu_mem_gb,
        host_mem_gb=host_mem_gb,
        max_context=max_context,
        quant_sim=quant_sim,
        graphs=graphs,
        mtp=mtp,
    )
    return Engine(resolve_model(path_or_preset), rt, progress=progress)


__all__ = ["Engine", "Session", "load", "ContextError", "QWeight"]
