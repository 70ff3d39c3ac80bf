"""Per-sequence decode state, preallocated at max size (docs/architecture.md §4).

Per layer: the window ring of the last W keys (K = V, one shared head), and for compressed layers
the compressor's partial block, the CSA overlap half of the previous block, and the compressed
cache; CSA layers also hold the indexer's compressor and its key cache. Everything is allocated
once for `max_context` tokens; `reset()` makes it a fresh sequence without allocating.

The tensors of S sequences live in one `StateArena`, stacked on a leading slot dimension, and a
`SessionState` is a set of views of one slot. The eager step reads the views; the captured decode
step reads the stacked tensors and picks the slot with a device-side slot id, so one set of CUDA
graphs serves every session (docs/runtime.md). Per layer the window ring and the main compressed
cache are one buffer, `keys` [S, W + C, Dh]: the sparse attention gathers window rows and
compressed rows from the same tensor without a per-token concatenation.

Legend: S slots, W window, Dh head dim, DI indexer head dim, m compress ratio,
C = ceil(max_context / m).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from homeseek.config import CSA, HCA, ModelConfig, RuntimeConfig


@dataclass
class CompressorState:
    """One compressor (main or indexer) of one layer and one sequence (views of the arena)."""

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


@dataclass
class ArenaCompressor:
    """One compressor of one layer, all slots: [S, ...] versions of CompressorState's buffers."""

    ratio: int
    overlap: bool
    buf_kv: torch.Tensor  # [S, m, c*d] fp32
    buf_gate: torch.Tensor  # [S, m, c*d] fp32
    prev_kv: torch.Tensor  # [S, m, d] fp32
    prev_gate: torch.Tensor  # [S, m, d] fp32
    cache: torch.Tensor  # [S, C, d]: a view of the layer's `keys` (main) or its own (indexer)

    @property
    def capacity(self) -> int:
        return self.cache.shape[1]

    def view(self, s: int) -> CompressorState:
        return CompressorState(
            self.ratio, self.overlap, self.buf_kv[s], self.buf_gate[s], self.prev_kv[s],
            self.prev_gate[s], self.cache[s],
        )  # fmt: skip


@dataclass
class ArenaLayer:
    """One layer's state for all slots."""

    keys: torch.Tensor  # [S, W + C, Dh]: window ring rows 0..W-1, then the compressed entries
    window: int  # W
    comp: ArenaCompressor | None
    index_comp: ArenaCompressor | None

    def view(self, s: int) -> LayerState:
        return LayerState(
            self.keys[s, : self.window],
            self.comp.view(s) if self.comp is not None else None,
            self.index_comp.view(s) if self.index_comp is not None else None,
        )


def _compressor(
    ratio: int, overlap: bool, d: int, cache: torch.Tensor, slots: int, device: str
) -> ArenaCompressor:
    c = 2 if overlap else 1
    f32 = dict(dtype=torch.float32, device=device)
    return ArenaCompressor(
        ratio=ratio,
        overlap=overlap,
        buf_kv=torch.zeros(slots, ratio, c * d, **f32),
        buf_gate=torch.zeros(slots, ratio, c * d, **f32),
        prev_kv=torch.zeros(slots, ratio, d, **f32),
        prev_gate=torch.zeros(slots, ratio, d, **f32),
        cache=cache,
    )


class NoFreeSlotError(RuntimeError):
    """Every slot of the arena holds a live session."""


class StateArena:
    """Decode state for `slots` sequences, allocated once; hands out slots to sessions."""

    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, layers: list[int], slots: int) -> None:
        self.slots = slots
        self.max_context = rt.max_context
        W, Dh, dev = cfg.sliding_window, cfg.head_dim, rt.device
        self.layers: dict[int, ArenaLayer] = {}
        for i in layers:
            kind, m = cfg.attn_kind(i), cfg.compress_ratios[i]
            # ceil: the decode step also writes the entry of the block in progress
            n_c = -(-rt.max_context // m) if kind in (CSA, HCA) else 0
            keys = torch.zeros(slots, W + n_c, Dh, dtype=rt.dtype, device=dev)
            comp = index_comp = None
            if kind in (CSA, HCA):
                comp = _compressor(m, kind == CSA, Dh, keys[:, W:], slots, dev)
            if kind == CSA:
                DI = cfg.index_head_dim
                icache = torch.zeros(slots, n_c, DI, dtype=rt.dtype, device=dev)
                index_comp = _compressor(m, True, DI, icache, slots, dev)
            self.layers[i] = ArenaLayer(keys, W, comp, index_comp)
        self._free = list(range(slots))
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise NoFreeSlotError(
                    f"all {self.slots} session slots hold live sessions: close one "
                    f"(Session.close()) or load with max_sessions={self.slots + 1}"
                )
            return self._free.pop(0)

    def release(self, slot: int) -> None:
        with self._lock:
            if slot not in self._free:
                self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        total = 0
        for a in self.layers.values():
            total += a.keys.nbytes
            for c in (a.comp, a.index_comp):
                if c is not None:
                    for t in (c.buf_kv, c.buf_gate, c.prev_kv, c.prev_gate):
                        total += t.nbytes
            if a.index_comp is not None:
                total += a.index_comp.cache.nbytes
        return total


class SessionState:
    """All decode state of one sequence: slot `slot` of an arena (its own one-slot arena when
    none is given). The session owns it, the model reads and writes it."""

    def __init__(
        self,
        cfg: ModelConfig,
        rt: RuntimeConfig,
        layers: list[int],
        arena: StateArena | None = None,
    ) -> None:
        self.arena = arena if arena is not None else StateArena(cfg, rt, layers, 1)
        self.slot = self.arena.acquire()
        self.max_context = rt.max_context
        self.layers: dict[int, LayerState] = {
            i: a.view(self.slot) for i, a in self.arena.layers.items()
        }
        self.pos = 0  # tokens already in the state
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        for s in self.layers.values():
            s.reset()

    def save(self) -> list[torch.Tensor]:
        """Copies of what a prefill chunk changes and a retry of it would read: the window rings
        and the compressors' partial blocks and overlap halves (small; the compressed caches are
        only ever written at rows a retry rewrites, and read up to the position reached)."""
        return [t.clone() for t in self._chunk_state()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self._chunk_state(), saved, strict=True):
            t.copy_(s)

    def undo_positions(self, saved: list[torch.Tensor], start: int, keep: int, end: int) -> bool:
        """Undo positions keep..end-1 in place, where `saved` (`save`) was taken at position
        `start` <= keep and start..end-1 were consumed since: their window rows and compressor
        partial-block rows come back from `saved`, and the overlap halves too when one of them
        completed a block. Needs start..end-1 to fall on distinct rows of every ring (no longer
        than the window or any ratio; then at most one block completes among them): returns
        False, changing nothing, when they do not. The compressed entries they wrote need no
        undo: an entry is masked until its block completes, and rewritten when it does."""
        parts = self._chunk_parts()
        if keep >= end:
            return True
        if not start <= keep or end - start > min(ring for _, ring, _ in parts):
            return False
        undo = range(keep, end)
        rows: dict[int, torch.Tensor] = {}  # ring -> the undone positions' rows
        for (t, ring, per_block), old in zip(parts, saved, strict=True):
            if per_block:  # moves when a block completes
                if any(q % ring == ring - 1 for q in undo):
                    t.copy_(old)
                continue
            if ring not in rows:
                rows[ring] = torch.tensor([q % ring for q in undo], device=t.device)
            t.index_copy_(0, rows[ring], old.index_select(0, rows[ring]))
        return True

    def _chunk_parts(self) -> list[tuple[torch.Tensor, int, bool]]:
        """What a chunk changes and `save` copies, in order: (tensor, the rows of its ring,
        whether it changes only when a block completes: the overlap halves)."""
        out = []
        for s in self.layers.values():
            out.append((s.window, s.window.shape[0], False))
            for c in (s.comp, s.index_comp):
                if c is not None:
                    out += [(c.buf_kv, c.ratio, False), (c.buf_gate, c.ratio, False)]
                    out += [(c.prev_kv, c.ratio, True), (c.prev_gate, c.ratio, True)]
        return out

    def _chunk_state(self) -> list[torch.Tensor]:
        return [t for t, _, _ in self._chunk_parts()]

    def release(self) -> None:
        """Give the slot back to the arena (the views must not be used afterwards)."""
        self.arena.release(self.slot)

    def nbytes(self) -> int:
        return self.arena.nbytes() // self.arena.slots
