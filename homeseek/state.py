"""Per-sequence decode state, preallocated at max size (docs/architecture.md §4).

Per layer: the window ring of the last W keys (K = V, one shared head), and for compressed layers
the compressor's partial block, the CSA overlap half of the previous block, and the compressed
cache; CSA layers also hold the indexer's compressor and its key cache. Everything is allocated
once for `max_context` tokens; `reset()` makes it a fresh sequence without allocating.

Legend: W window, Dh head dim, DI indexer head dim, m compress ratio, C = max_context // m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from homeseek.config import CSA, HCA, ModelConfig, RuntimeConfig


@dataclass
class CompressorState:
    """One compressor (main or indexer) of one layer."""

    ratio: int  # m
    overlap: bool  # CSA: entries pool the A half of the previous block with the B half of this one
    buf_kv: torch.Tensor  # [m, c*d] fp32: projections of the current partial block
    buf_gate: torch.Tensor  # [m, c*d] fp32: gate logits (+ ape) of the current partial block
    prev_kv: torch.Tensor  # [m, d] fp32: A half of the last complete block (CSA only)
    prev_gate: torch.Tensor  # [m, d] fp32
    cache: torch.Tensor  # [C, d] activation dtype: compressed entries, entry j at row j

    def reset(self) -> None:
        # kappa = 0, zeta = -inf: an empty slot gets softmax weight 0 (docs/architecture.md §4).
        self.buf_kv.zero_()
        self.buf_gate.fill_(float("-inf"))
        self.prev_kv.zero_()
        self.prev_gate.fill_(float("-inf"))


@dataclass
class LayerState:
    window: torch.Tensor  # [W, Dh]: key of position p at row p % W
    comp: CompressorState | None  # CSA / HCA main compressor
    index_comp: CompressorState | None  # CSA indexer compressor (keys for top-k)

    def reset(self) -> None:
        self.window.zero_()
        for c in (self.comp, self.index_comp):
            if c is not None:
                c.reset()


def _compressor(
    ratio: int, overlap: bool, d: int, capacity: int, dtype: torch.dtype, device: str
) -> CompressorState:
    c = 2 if overlap else 1
    f32 = dict(dtype=torch.float32, device=device)
    return CompressorState(
        ratio=ratio,
        overlap=overlap,
        buf_kv=torch.zeros(ratio, c * d, **f32),
        buf_gate=torch.zeros(ratio, c * d, **f32),
        prev_kv=torch.zeros(ratio, d, **f32),
        prev_gate=torch.zeros(ratio, d, **f32),
        cache=torch.zeros(max(capacity // ratio, 1), d, dtype=dtype, device=device),
    )


class SessionState:
    """All decode state of one sequence; the session owns it, the model reads and writes it."""

    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, layers: list[int]) -> None:
        self.max_context = rt.max_context
        self.layers: dict[int, LayerState] = {}
        for i in layers:
            kind, m = cfg.attn_kind(i), cfg.compress_ratios[i]
            comp = index_comp = None
            if kind in (CSA, HCA):
                comp = _compressor(
                    m, kind == CSA, cfg.head_dim, rt.max_context, rt.dtype, rt.device
                )
            if kind == CSA:
                index_comp = _compressor(
                    m, True, cfg.index_head_dim, rt.max_context, rt.dtype, rt.device
                )
            window = torch.zeros(cfg.sliding_window, cfg.head_dim, dtype=rt.dtype, device=rt.device)
            self.layers[i] = LayerState(window, comp, index_comp)
        self.pos = 0  # tokens already in the state
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        for s in self.layers.values():
            s.reset()

    def nbytes(self) -> int:
        total = 0
        for s in self.layers.values():
            total += s.window.nbytes
            for c in (s.comp, s.index_comp):
                if c is not None:
                    for t in (c.buf_kv, c.buf_gate, c.prev_kv, c.prev_gate, c.cache):
                        total += t.nbytes
        return total
