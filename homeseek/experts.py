"""Tiered FP4 expert store: GPU slot pool, pinned host cache, memory-mapped disk.

Per decode token V4-Flash reads 43 x 6 routed experts of 13,369,344 bytes; only ~1,000 of the
11,008 fit beside the dense weights in 24 GB, so where an expert lives decides the speed. Each
expert is one *record*, packed exactly as the checkpoint stores it (FP4 + E8M0, never BF16), in
the layout the FP4 kernel reads (kernels/fp4_experts.py `pool_shapes`), the four tensors back to
back in one row of bytes (`packed_pool_views`), so a record moves between tiers in one copy:

    w13_q [2I, D/2]  w1 rows then w3 rows      w13_s [2I, D/32]  their E8M0 scales
    w2_q  [D, I/2]                             w2_s  [D, I/32]

Tiers: the slot pool (one preallocated buffer of S records on the engine's device; on CPU the
slots are host tensors), a host cache of H records (pinned when CUDA is present), and the disk
(zero-copy memory maps of the shards). A miss copies disk -> host -> slot; host -> slot copies run
on a dedicated CUDA stream and the compute stream waits only on the events of the slots it uses.

Eviction is pluggable (`Policy`): LRU, or LRFU - a decayed access count that weighs frequency
against recency (Lee et al., 2001) - with a per-layer floor so no layer loses all its slots.
`tools/routing_sim.py` replays recorded routing traces through both to choose the decay.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm import tqdm

from homeseek.checkpoint import Checkpoint, QWeight, layer_prefix
from homeseek.config import ConfigError, ModelConfig
from homeseek.kernels.fp4_experts import packed_pool_views, slot_bytes

Key = tuple[int, int]  # (layer, expert)


# Names of the store's marked ranges start with this (profiles tell them from kernels by it).
MARKER_PREFIX = "hs::"


def marker(name: str) -> contextlib.AbstractContextManager:
    """A named host range for a profiler (tools/prefill_profile.py), only while one records:
    entering a `record_function` costs ~8 us even when none does, and the scheduler marks one
    range in every decode layer."""
    if torch._C._autograd._profiler_enabled():
        return record_function(name)
    return contextlib.nullcontext()


# Threads reading missed records from the tier below the host cache. One thread copies ~5-15
# GB/s, and a decode layer usually misses one record of the tier below at a time, so each record
# is read in pieces of READ_PIECE bytes spread over all the threads.
READER_THREADS = 8
# Slot map updates are staged in a ring of STAGE_RING pinned buffers of at least STAGE_ROWS
# entries (twice the slots: an update's removals and new entries).
STAGE_RING = 8
STAGE_ROWS = 512
READ_PIECE = 1 << 20
# Pinned host records set aside from the host cache for the reads of a scan (a prefill chunk
# asks for nearly every expert of every layer): such records are read into this ring and copied
# from there, not admitted to the cache. Admitted, a scan larger than the cache evicts, in
# least-recently-used order, exactly the records the next scan asks for first: after one prompt
# the cache hit nothing and every prefill read the whole model from the tier below.
SCAN_RING = 192


def record_bytes(cfg: ModelConfig) -> int:
    return slot_bytes(cfg.hidden_size, cfg.moe_intermediate_size)


def distinct_experts(ids: np.ndarray, n_experts: int) -> list[int]:
    """The distinct expert ids in `ids` (any shape, each in [0, n_experts)), sorted, through a
    mask by expert id: 24K ids in ~0.05 ms against ~0.5 ms through a Python set."""
    used = np.zeros(n_experts, dtype=bool)
    used[ids] = True
    return np.flatnonzero(used).tolist()


# A record to copy into a slot: a packed row of a RecordBuffer ([record_bytes] uint8, one copy),
# or the four tensors by name (a record read in place from the disk tier: one copy each).
Source = torch.Tensor | dict[str, torch.Tensor]


# Pinned host buffers are allocated in pieces of at most this many bytes: torch's pinned
# allocator rounds every allocation up to a power of two, so one buffer for the whole host tier
# (~99 GB at 24 GiB on a 128 GiB host) asked for 128 GiB and failed, and four per-tensor buffers
# pinned ~3 GB more than they held; pieces of whole records within 1 GiB waste under 1 %.
PIN_PIECE = 1 << 30


_TYPESTR = {torch.int64: "<i8", torch.int32: "<i4", torch.float32: "<f4", torch.uint8: "|u1"}


class _CudaArray:
    """`__cuda_array_interface__` of a pinned host tensor's memory (keeps the tensor alive)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.owner = t
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "typestr": _TYPESTR[t.dtype],
            "data": (t.data_ptr(), False),
            "version": 2,
            "strides": None,
        }


def device_view(t: torch.Tensor, device: torch.device | str = "cuda") -> torch.Tensor:
    """A CUDA tensor over the memory of the contiguous pinned host tensor t, without a copy:
    a kernel that reads it reads the host's memory over the bus (CUDA maps pinned memory
    into the device's address space). For the few bytes a kernel needs from the host between
    the GPU's work: in prefill a pinned -> device copy of a few KB on the compute stream ran
    only after the ~70 ms of expert records queued on the copy stream before it (why is not
    pinned down: tools/copy_queue_probe.py did not reproduce it alone); a kernel's reads of
    pinned memory involve no copy engine (tools/PERF_NOTES.md, session 18)."""
    if not (t.is_pinned() and t.is_contiguous()):
        raise ValueError("device_view needs a contiguous pinned host tensor")
    with torch.cuda.device(device):
        return torch.as_tensor(_CudaArray(t), device=device)


@dataclass
class _Stage:
    """One pinned staging buffer of `ExpertStore._staged`: its device copy (or view) and an
    event after the last kernels that read it."""

    host: torch.Tensor
    dev: torch.Tensor | None = None
    view: torch.Tensor | None = None
    read: torch.cuda.Event | None = None


class PinnedRing:
    """Pinned host buffers reused in turn for the small copies the host queues between the
    GPU's work (a prefill chunk's expert ids, a wave's slot table), so the steady state creates
    no page-locked memory. Creating it is, by CUDA's rules, an implicit synchronization: the
    commands queued after it, on any stream, do not run beside those queued before it (the
    compute stream then waits for the expert records queued on the copy stream), and torch's
    pinned allocator creates a block whenever the blocks it holds are still in flight.

    `take(nbytes)` hands out the next buffer (grown when too small: created once more), after
    waiting for the copy that last used it (`used` records that on the copy's stream; with
    more buffers than uses in flight the wait has long passed). `pin`: page-locked (CUDA);
    else plain memory (tests of the rotation)."""

    def __init__(self, n: int, pin: bool = True) -> None:
        if n < 1:
            raise ValueError(f"PinnedRing: {n} buffers, at least 1")
        self.n, self.pin = n, pin
        self._bufs: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._i = -1
        self.created = 0  # buffers created, growth included (what the steady state avoids)

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of nbytes, free to write (its last copy has run)."""
        i = self._i = (self._i + 1) % self.n
        new = i == len(self._bufs)  # the ring has not come round to a buffer here yet
        buf, ev = (None, None) if new else self._bufs[i]
        if ev is not None:
            ev.synchronize()
        if buf is None or buf.numel() < nbytes:
            # a power of two, at least 4 KiB: a chunk a little longer reuses it
            size = max(4096, 1 << (max(nbytes, 1) - 1).bit_length())
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self.created += 1
        if new:
            self._bufs.append((buf, None))
        else:
            self._bufs[i] = (buf, None)
        return buf[:nbytes]

    def at_least(self, n: int) -> None:
        """Hand out at least n buffers in turn from the next `take` on (more uses in flight
        at once than before; the buffers there are kept)."""
        self.n = max(self.n, n)

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """`take` as a tensor of shape and dtype."""
        n = math.prod(shape) * dtype.itemsize
        return self.take(n).view(dtype).view(*shape)

    def used(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """The buffer last taken is read by a copy just queued on `stream` (None: a copy that
        has run): the next `take` of it waits for this event. -> the event (None off CUDA)."""
        if stream is None:
            return None
        assert self._i >= 0, "PinnedRing.used before any take"
        ev = torch.cuda.Event()
        ev.record(stream)
        buf, _ = self._bufs[self._i]
        self._bufs[self._i] = (buf, ev)
        return ev


class RecordBuffer:
    """S records, packed: each record's four tensors back to back in one row of record_bytes
    uint8 (kernels/fp4_experts.py `packed_pool_views`), so a record moves between two buffers in
    one copy (four copies a record were four copy calls and queue entries, and the two small
    scale tensors moved at a fraction of the link's rate). A device buffer (the GPU pool) is one
    [S, record_bytes] tensor and `t` are the four [S, ...] views the kernels read; a pinned one
    (the host cache) is allocated in pieces of whole records (PIN_PIECE)."""

    def __init__(
        self, cfg: ModelConfig, n: int, device: str, pin: bool = False, piece: int | None = None
    ) -> None:
        """`piece`: records per piece (default: one piece, pinned ones within PIN_PIECE)."""
        self.n = n
        rb = record_bytes(cfg)
        self.per = max(1, piece or (PIN_PIECE // rb if pin else n))
        self.pieces = [
            torch.empty(
                (min(self.per, n - i), rb), dtype=torch.uint8, device=device, pin_memory=pin
            )
            for i in range(0, n, self.per)
        ]
        # each piece's four [records, ...] views, built once
        self._views = [
            packed_pool_views(p, cfg.hidden_size, cfg.moe_intermediate_size) for p in self.pieces
        ]
        self._t = self._views[0] if len(self.pieces) == 1 else None
        # Each slot's packed row, made on first use: indexing a piece costs ~1 us of host time,
        # and a decode layer's copies ask for a host row and a pool row per miss.
        self._rows: list[torch.Tensor | None] = [None] * n

    @property
    def t(self) -> dict[str, torch.Tensor]:
        """The four [S, ...] tensors (a buffer in one piece: the GPU pool)."""
        if self._t is None:
            raise ValueError("a RecordBuffer in several pieces has no [S, ...] views")
        return self._t

    def copy_in(self, slot: int, src: Source, non_blocking: bool = False) -> None:
        if isinstance(src, torch.Tensor):
            self.row(slot).copy_(src, non_blocking=non_blocking)
            return
        for k, t in self.view(slot).items():
            t.copy_(src[k], non_blocking=non_blocking)

    def row(self, slot: int) -> torch.Tensor:
        """The packed record in `slot` ([record_bytes] uint8, a view)."""
        row = self._rows[slot]
        if row is None:
            row = self._rows[slot] = self.pieces[slot // self.per][slot % self.per]
        return row

    def view(self, slot: int) -> dict[str, torch.Tensor]:
        """The record in `slot` as its four tensors (views)."""
        i = slot % self.per
        return {k: t[i] for k, t in self._views[slot // self.per].items()}


# --- eviction policies ---------------------------------------------------------------------------
# Built once: `np.iinfo(...)` costs ~1 us a call, and LRU's victim search runs once per miss.
_INT64_MAX = int(np.iinfo(np.int64).max)


class Policy:
    """Chooses which resident entry to evict. Entries are indexed by slot number."""

    name = "base"

    def __init__(self, n_slots: int) -> None:
        self.n = n_slots

    def on_access(self, slot: int, now: int) -> None:
        raise NotImplementedError

    def on_fill(self, slot: int, now: int) -> None:
        self.on_access(slot, now)

    def victim(self, candidates: np.ndarray, now: int) -> int:
        """Index into `candidates` (slot numbers) of the entry to evict."""
        raise NotImplementedError

    def victim_of(self, ok: np.ndarray, now: int) -> int:
        """The slot to evict among those where the boolean mask `ok` holds (one at least)."""
        cand = np.flatnonzero(ok)
        return int(cand[self.victim(cand, now)])

    def eviction_order(self, ok: np.ndarray, now: int, first: int | None = None) -> np.ndarray:
        """The slots where `ok` holds, in the order `victim_of` would evict them one after the
        other if nothing else changed (scores only decay between them, all alike); with
        `first`, at least the first `first` of that order (a policy may return them all)."""
        raise NotImplementedError


class LRUPolicy(Policy):
    name = "lru"

    def __init__(self, n_slots: int) -> None:
        super().__init__(n_slots)
        self.last = np.full(n_slots, -1, dtype=np.int64)

    def on_access(self, slot: int, now: int) -> None:
        self.last[slot] = now

    def victim(self, candidates: np.ndarray, now: int) -> int:
        return int(np.argmin(self.last[candidates]))

    def victim_of(self, ok: np.ndarray, now: int) -> int:
        # The least recent of all slots is nearly always a candidate (the protected ones were
        # just used), and then it is the answer: one pass over `last` instead of a masked copy
        # and a pass (the host cache's ~7,000 slots, once per record read from below).
        i = int(np.argmin(self.last))
        if ok[i]:
            return i
        return int(np.argmin(np.where(ok, self.last, _INT64_MAX)))

    def eviction_order(self, ok: np.ndarray, now: int, first: int | None = None) -> np.ndarray:
        cand = np.flatnonzero(ok)
        return cand[np.argsort(self.last[cand], kind="stable")]


# `LRFUPolicy.eviction_order` sets its bound at the (BOUND_SLACK x first)-th lowest rank: a
# decode layer evicts ~3 entries, so it holds for ~(BOUND_SLACK - 1) x first / 3 calls.
BOUND_SLACK = 4


class LRFUPolicy(Policy):
    """Combined recency and frequency: each entry's CRF = Σ over its accesses of 2^(-(now-t)/h).

    h (half-life, in accesses of the whole store) near 0 behaves like LRU, very large like LFU.
    The victim has the smallest CRF at `now`; ties go to the least recently used.
    """

    name = "lrfu"

    def __init__(self, n_slots: int, half_life: float = 2000.0) -> None:
        super().__init__(n_slots)
        self.h = float(half_life)
        self.crf = np.zeros(n_slots, dtype=np.float64)
        self.last = np.full(n_slots, -1, dtype=np.int64)
        # A rank at or above the `first` lowest candidates' of recent `eviction_order` calls
        # (a hint only: each call checks that it still holds enough of them)
        self._bound = -math.inf

    def on_access(self, slot: int, now: int) -> None:
        # Scalar math on Python floats: this runs for every expert lookup of a decode token
        # (258 of them), where numpy's scalar operations cost microseconds each (`item`
        # reads the Python number without a numpy scalar in between).
        crf, lst = self.crf, self.last
        crf[slot] = crf.item(slot) * 2.0 ** ((lst.item(slot) - now) / self.h) + 1.0
        lst[slot] = now

    def on_fill(self, slot: int, now: int) -> None:
        self.crf[slot] = 1.0
        self.last[slot] = now

    def _rank(self, idx: np.ndarray | slice) -> np.ndarray:
        """log2 of the CRF at any fixed time, up to a constant: log2(crf) + last / h. It orders
        entries as the CRF does at every `now`, without the decay's underflow (an old entry's
        CRF reaches 0.0 while its rank still compares), so one ranking serves a whole batch."""
        with np.errstate(divide="ignore"):
            return np.log2(self.crf[idx]) + self.last[idx] / self.h

    def victim(self, candidates: np.ndarray, now: int) -> int:
        score = self._rank(candidates)
        best = np.flatnonzero(score == score.min())
        return int(best[np.argmin(self.last[candidates][best])])

    def victim_of(self, ok: np.ndarray, now: int) -> int:
        # The same scores as `victim`, over every slot at once: no gathers of the candidates.
        # It runs once per miss on the decode path's host side, so it is kept to whole-array ops.
        score = np.where(ok, self._rank(slice(None)), np.inf)
        best = np.flatnonzero(score == score.min())
        if best.size == 1:
            return int(best[0])
        return int(best[np.argmin(self.last[best])])

    def eviction_order(self, ok: np.ndarray, now: int, first: int | None = None) -> np.ndarray:
        # `nonzero` of the 1-D masks directly: `np.flatnonzero` wraps it in ~1 us of Python
        cand = ok.nonzero()[0]
        score = self._rank(cand)
        if first is not None and 0 < first < cand.size:
            # Only the `first` lowest (ties at the cut kept whole, so the order is exact),
            # selected among the candidates at or below `_bound` when at least `first` are:
            # the cut is then the same, and the selection runs over ~4 x first candidates
            # instead of all (~10 us of a decode layer's ~1,000). A rank only rises (when its
            # entry is used) and the lowest are the ones evicted, so a bound holds for dozens
            # of calls; when it no longer does, a selection over all sets the next one.
            low = (score <= self._bound).nonzero()[0]
            if low.size < first:
                j = min(BOUND_SLACK * first, cand.size) - 1
                self._bound = float(np.partition(score, (first - 1, j))[j])
                low = (score <= self._bound).nonzero()[0]
            low_score = score[low]
            cut = np.partition(low_score, first - 1)[first - 1]
            keep = low[low_score <= cut]  # every candidate at or below the cut, in slot order
            cand, score = cand[keep], score[keep]
        return cand[np.lexsort((self.last[cand], score))]  # by score, ties: least recent first


def make_policy(name: str, n_slots: int, lookups_per_token: int = 100) -> Policy:
    """ "lru", "lrfu" (half-life of 20 decode tokens' worth of lookups) or "lrfu:<half-life>".

    The 20-token default won on the full-size synthetic trace (tools/PERF_NOTES.md): long
    enough to remember which experts a layer keeps using, short enough to follow topic shifts.
    """
    if name == "lru":
        return LRUPolicy(n_slots)
    if name.startswith("lrfu"):
        _, _, h = name.partition(":")
        return LRFUPolicy(n_slots, float(h) if h else 20.0 * lookups_per_token)
    raise ConfigError(f"unknown eviction policy {name!r} (lru, lrfu, lrfu:<half-life>)")


# --- residency -----------------------------------------------------------------------------------
_FULL = (
    "expert store: every slot is in use by the current step; the pool needs more slots than "
    "experts touched at once (raise gpu_mem_gb)"
)


class Residency:
    """(layer, expert) <-> slot for one tier, with eviction; no data, only bookkeeping.

    `protected` slots (the ones the current layer is about to use) are never evicted. A per-layer
    floor keeps each layer at least `floor` resident entries once it has them.
    """

    def __init__(self, n_slots: int, n_layers: int, policy: Policy, floor: int = 0) -> None:
        self.n = n_slots
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * n_slots
        self.layer_of = np.full(n_slots, -1, dtype=np.int64)
        self.per_layer = np.zeros(n_layers, dtype=np.int64)
        self.pinned = np.zeros(n_slots, dtype=bool)  # hot set: never evicted (see `pin`)
        self.n_pinned = 0
        self.protected = np.zeros(n_slots, dtype=bool)
        self.policy = policy
        self.floor = floor
        self.free = list(range(n_slots - 1, -1, -1))
        self.clock = 0
        self.evictions = 0

    def pin(self, slot: int) -> None:
        """Never evict this slot's entry."""
        if not self.pinned[slot]:
            self.pinned[slot] = True
            self.n_pinned += 1

    def lookup(self, key: Key) -> int | None:
        s = self.slot_of.get(key)
        if s is not None:
            self.clock += 1
            self.policy.on_access(s, self.clock)
        return s

    def admit(self, key: Key) -> tuple[int, Key | None]:
        """A slot for a missing key (evicting if needed) -> (slot, evicted key or None)."""
        self.clock += 1
        evicted = None
        if self.free:
            s = self.free.pop()
        else:
            free_ok = ~(self.pinned | self.protected)
            ok = free_ok
            if self.floor:
                ok = free_ok & (self.per_layer[np.maximum(self.layer_of, 0)] > self.floor)
                ok |= (self.layer_of == key[0]) & free_ok
                if not ok.any():
                    ok = free_ok
            if not ok.any():
                raise RuntimeError(_FULL)
            s = self.policy.victim_of(ok, self.clock)
            evicted = self._evict(s)
        self._fill(s, key)
        return s, evicted

    def admit_many(self, keys: Sequence[Key]) -> list[tuple[int, Key | None]]:
        """`admit` of each key in turn, each new entry protected before the next is admitted,
        with the eviction candidates ranked once for the batch (a decode layer's misses: one
        pass over the slots instead of one per miss) -> [(slot, evicted key or None)]."""
        free, protected = self.free, self.protected
        n_free = len(free)
        ok: np.ndarray | None = None  # the eviction candidates, once known at the first eviction
        n_ok = 0
        if len(keys) > n_free:  # else every key takes a free slot: no candidates to count
            # All or nothing: fail before changing anything when the batch cannot fit (each
            # entry admitted is protected, so every eviction needs a slot neither pinned nor
            # protected). With no free slot to take (and protect) first, these are also the
            # first eviction's candidates: one pass over the slots serves both.
            ok = ~(self.pinned | protected)
            n_ok = int(np.count_nonzero(ok))
            if len(keys) - n_free > n_ok:
                raise RuntimeError(_FULL)
            if n_free:
                ok = None
        out: list[tuple[int, Key | None]] = []
        order: list[int] | None = None
        whole = False  # whether `order` ranks every candidate, or only the lowest
        taken: set[int] = set()
        for key in keys:
            self.clock += 1
            if free:
                s, evicted = free.pop(), None
            else:
                if order is None:  # ranked at the first eviction; later ones only skip
                    if ok is None:
                        ok = ~(self.pinned | protected)
                        n_ok = int(np.count_nonzero(ok))
                    # Enough of the ranking for this batch and the floor's skips, mostly
                    order = self.policy.eviction_order(ok, self.clock, 4 * len(keys) + 16).tolist()
                    whole = len(order) == n_ok
                else:
                    ok = None  # entries admitted since are protected now
                s = self._next_victim(order, taken, key[0])
                if s is None and not whole:  # the floor skipped all the ranked ones
                    ok = ~(self.pinned | protected) if ok is None else ok
                    order, whole = self.policy.eviction_order(ok, self.clock).tolist(), True
                    s = self._next_victim(order, taken, key[0])
                if s is None:
                    s = next((c for c in order if c not in taken), None)
                if s is None:
                    raise RuntimeError(_FULL)
                taken.add(s)
                evicted = self._evict(s)
            self._fill(s, key)
            protected[s] = True
            out.append((s, evicted))
        return out

    def _next_victim(self, order: list[int], taken: set[int], layer: int) -> int | None:
        """The first slot of `order` not yet taken whose layer keeps its floor (or is `layer`):
        what `admit` would choose, unless no candidate keeps the floor (None)."""
        floor, layer_of, per_layer = self.floor, self.layer_of, self.per_layer
        for s in order:
            if s in taken:
                continue
            if not floor:
                return s
            owner = layer_of.item(s)
            if owner == layer or per_layer.item(max(owner, 0)) > floor:
                return s
        return None

    def drop(self, s: int) -> None:
        """Forget slot s's entry (its data never arrived): the slot is free again."""
        key = self.key_of[s]
        if key is None:
            return
        del self.slot_of[key]
        self.key_of[s] = None
        self.layer_of[s] = -1
        self.per_layer[key[0]] -= 1
        self.protected[s] = False
        self.free.append(s)

    def _evict(self, s: int) -> Key:
        evicted = self.key_of[s]
        del self.slot_of[evicted]
        self.per_layer[evicted[0]] -= 1
        self.evictions += 1
        return evicted

    def _fill(self, s: int, key: Key) -> None:
        self.slot_of[key] = s
        self.key_of[s] = key
        self.layer_of[s] = key[0]
        self.per_layer[key[0]] += 1
        self.policy.on_fill(s, self.clock)


def simulate(
    trace: Iterable[tuple[int, Sequence[int]]],
    n_slots: int,
    n_layers: int,
    policy: str,
    floor: int = 0,
    lookups_per_token: int = 100,
) -> dict[str, float]:
    """Replay (layer, expert ids of one step) through one tier of `n_slots`; hit rate etc."""
    res = Residency(n_slots, n_layers, make_policy(policy, n_slots, lookups_per_token), floor)
    hits = lookups = 0
    for layer, experts in trace:
        res.protected[:] = False
        for e in experts:
            lookups += 1
            s = res.lookup((layer, int(e)))
            if s is None:
                s, _ = res.admit((layer, int(e)))
            else:
                hits += 1
            res.protected[s] = True
    return {"hit_rate": hits / max(lookups, 1), "lookups": lookups, "hits": hits}


# --- the store -----------------------------------------------------------------------------------
class Timeline:
    """When each layer's expert loads happened in a prefill (tools/prefill_profile.py --layers):
    host spans of the main thread ("ids": waiting for a layer's expert ids; "join": waiting for
    its load to be queued), of the background thread ("queue": queueing a layer's copies, "read
    ahead": reading its records of the tier below early), the moment a load was submitted
    ("submit"), the copy stream's span of each load ("copies", from CUDA events) and the
    compute stream's span of each chunk's A, each layer's experts and each chunk's B ("gpu A",
    "gpu E", "gpu B": from events recorded around their launches), all on one clock: seconds
    since the timeline started."""

    def __init__(self, copy_stream: torch.cuda.Stream) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, int, float, float]] = []  # (what, layer, start, end)
        self._copies: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._gpu: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = []
        torch.cuda.synchronize()
        # A reference event on the copy stream, and the host time it completed (within a
        # synchronize's latency): device times are placed on the host clock through it.
        self._ref = torch.cuda.Event(enable_timing=True)
        self._ref.record(copy_stream)
        self._ref.synchronize()
        self.t0 = time.perf_counter()

    def span(self, what: str, layer: int, start: float, end: float) -> None:
        with self.lock:
            self.spans.append((what, layer, start - self.t0, end - self.t0))

    def copies(self, layer: int, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        with self.lock:
            self._copies.append((layer, start, end))

    @contextlib.contextmanager
    def gpu(self, what: str, layer: int) -> Iterator[None]:
        """Time the work queued on the current stream inside the block ("gpu <what>")."""
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        yield
        b.record()
        with self.lock:
            self._gpu.append((f"gpu {what}", layer, a, b))

    def rows(self) -> list[tuple[str, int, float, float]]:
        """Every span, copies included, ordered by start (synchronizes)."""
        torch.cuda.synchronize()
        with self.lock:
            out = list(self.spans)
            spans = [("copies", layer, a, b) for layer, a, b in self._copies] + self._gpu
            for what, layer, a, b in spans:
                t = (self._ref.elapsed_time(a) / 1e3, self._ref.elapsed_time(b) / 1e3)
                out.append((what, layer, *t))
        return sorted(out, key=lambda r: r[2])


@dataclass
class Counters:
    """Expert traffic. lookups = gpu_hits + host_hits + disk_loads + cpu_lane (each lookup ends
    in one)."""

    lookups: int = 0
    gpu_hits: int = 0  # already in the slot pool
    host_hits: int = 0  # copied host -> slot
    disk_loads: int = 0  # read from disk -> host -> slot
    cpu_lane: int = 0  # computed on the CPU where it lies (homeseek/cpu_lane.py), not copied
    bytes_h2d: int = 0  # bytes copied into slots
    bytes_disk: int = 0
    copy_s: float = 0.0  # host time spent issuing/doing copies
    disk_s: float = 0.0  # host time spent waiting for records read from the disk tier
    evictions: int = 0
    # Where a scan's background thread (`_load_behind`, `read_ahead`) spends its time: seconds
    # it ran jobs, of which it queued copies (a copy call blocks once the stream's queue is
    # full) and read records of the tier below for scans; and seconds any thread waited for
    # a host slot's last copy to leave before writing the slot again (`_await_host_slot`) or
    # a load waited for its layer's reads ahead (not counted as busy).
    bg_busy_s: float = 0.0
    bg_issue_s: float = 0.0
    scan_read_s: float = 0.0
    await_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.gpu_hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict[str, float]:
        d = {
            k: getattr(self, k)
            for k in ("lookups", "gpu_hits", "host_hits", "disk_loads", "cpu_lane")
        }
        d.update(bytes_h2d=self.bytes_h2d, bytes_disk=self.bytes_disk, copy_s=self.copy_s)
        d.update(disk_s=self.disk_s)
        d.update(bg_busy_s=self.bg_busy_s, bg_issue_s=self.bg_issue_s)
        d.update(scan_read_s=self.scan_read_s, await_s=self.await_s)
        d.update(evictions=self.evictions, hit_rate=self.hit_rate)
        return d


class ExpertStore:
    """Makes routed experts resident in the slot pool and hands out slot ids / weight views."""

    def __init__(
        self,
        ckpt: Checkpoint,
        cfg: ModelConfig,
        layers: Sequence[int],
        device: str,
        n_slots: int,
        n_host: int,
        policy: str = "lrfu",
        floor: int = 1,
        progress: bool = False,
    ) -> None:
        self.ckpt, self.cfg, self.layers, self.device = ckpt, cfg, list(layers), device
        n_total = len(self.layers) * cfg.n_routed_experts
        self.n_slots = min(n_slots, n_total)
        if self.n_slots < cfg.num_experts_per_tok:
            raise ConfigError(
                f"expert pool of {self.n_slots} slots is smaller than num_experts_per_tok="
                f"{cfg.num_experts_per_tok}: raise gpu_mem_gb"
            )
        cuda = str(device).startswith("cuda")
        self.pool = RecordBuffer(cfg, self.n_slots, device)
        self.record_bytes = record_bytes(cfg)
        n_layers = max(self.layers) + 1 if self.layers else 1
        per_token = len(self.layers) * cfg.num_experts_per_tok
        self._gpu_args = (self.n_slots, n_layers, policy, per_token, floor)
        self.gpu = self._new_gpu_residency()
        # Host tier: only useful when the slots are on another device. Its pinned buffer is
        # allocated by the background filler (pinning tens of GB takes a while); until then
        # misses read the disk tier directly.
        n_host = min(n_host, n_total) if cuda else 0
        # The scan ring comes out of the host budget, and only where the cache cannot hold
        # every expert (otherwise a scan never reads below it).
        self.n_stage = min(SCAN_RING, n_host // 4) if n_host < n_total else 0
        self.n_host = n_host - self.n_stage  # host-cache records (the ring follows them)
        # The ring in two halves, by layer parity: a layer's reads ahead and its load's own reads
        # go to its half, so the reads ahead of layer L + 1 (their own thread) run while layer
        # L's load queues its copies out of the other half. Each half's next slot, in turn.
        self._ring_next = [0, 0]
        # Records of the tier below already read into the ring ahead of their layer's request
        # (`read_ahead`): key -> ring slot, and the key each ring slot holds that way. A half is
        # written by one thread at a time (a layer's reads ahead start once the load that last
        # copied out of its half has queued its copies; its load queues its host-cache hits,
        # then waits for them). Seconds the current background job waited for them.
        self._ahead: dict[Key, int] = {}
        self._ring_key: dict[int, Key] = {}
        self._ahead_waited = 0.0
        # False: a scan's load waits for its reads ahead before it queues anything, as before
        # session 15 (tools/prefill_profile.py --load-order measures the two in one process).
        self.hits_first = True
        self._ahead_thread: ThreadPoolExecutor | None = None  # runs `_ahead_job`s in order
        self._ahead_last: Future | None = None
        # The last load and the last reads ahead submitted for each half: a half's reads ahead
        # wait for the loads submitted before them, its loads for the reads ahead submitted
        # before them (all of them: a chunk's load on demand may come after the reads ahead
        # of a later layer of the same parity).
        self._half_load: list[Future | None] = [None, None]
        self._half_ahead: list[Future | None] = [None, None]
        self.ahead_used = 0  # records copied from the ring as read ahead
        self.host: RecordBuffer | None = None
        self.hostres = (
            Residency(self.n_host, n_layers, make_policy(policy, self.n_host, per_token), 0)
            if self.n_host
            else None
        )
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.ready: dict[int, torch.cuda.Event] = {}  # slot -> copy-finished event
        # slot -> an event after the last kernels queued that read it (`used`): a copy into the
        # slot waits for that alone, not for all the compute queued before it (which holds the
        # current layer's experts, and, in decode, the next layer's prefetch would wait behind)
        self.last_use: dict[int, torch.cuda.Event] = {}
        # host-cache slot -> an event after the last copy from it into a slot: the copy is
        # asynchronous, and prefetched copies are not waited for before the next layer's misses
        # take host-cache slots, so reading a record into one waits for that event first
        self._host_copy: dict[int, torch.cuda.Event] = {}
        self.counters = Counters()
        self.lock = threading.Lock()  # the background host filler shares the host tier
        self._filler: threading.Thread | None = None
        self.host_fill_error: str | None = None  # why the host cache could not be pinned
        self.progress = progress
        self.tid2eid: dict[int, torch.Tensor] = {}  # hash layers: token id -> experts (CPU)
        # (start, end) CUDA events around each batch of slot copies, recorded on the copy stream
        # while `time_copies` is set (benchmarks: the copy lane's busy time, hence its GB/s).
        self.time_copies = False
        self.prefetched: set[Key] = set()  # hash-layer keys looked up ahead of their layer
        self.copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        # The stream the experts are used on, looked up once per step (`begin_step`): asking
        # torch for the current stream costs ~10 us of host time, several times per layer.
        self.compute: torch.cuda.Stream | None = None
        self._reader_pool: ThreadPoolExecutor | None = None  # reads of the tier below
        # A scan's loads run on one background thread (`_load_behind`): slot -> its job.
        self._behind: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._last: Future | None = None  # the last job submitted to that thread
        # A parallel copy of (dst, src) pairs (the CPU kernel library's thread pool, where it
        # builds: kernels/cpu_experts.py); records of the tier below are read with it instead
        # of the reader threads, whose torch copies reached ~4.5 GB/s on the lent host.
        self.copier: Callable[[list[tuple[torch.Tensor, torch.Tensor]]], None] | None = None
        # The slot map: (layer, expert) -> slot on the device, -1 where not resident, for the
        # decode step's graphs to look experts up without the host. An entry is published
        # (written on the compute stream) only once the compute stream waits for its slot's
        # copy, and unpublished before its slot is refilled; `_mapped` mirrors what is
        # published, `_unmap` / `_newmap` hold what is still to publish.
        self.slot_map = torch.full(
            (n_layers, cfg.n_routed_experts), -1, dtype=torch.int32, device=device
        )
        self._mapped = np.full((n_layers, cfg.n_routed_experts), -1, dtype=np.int32)
        self._unmap: set[Key] = set()
        self._newmap: dict[int, Key] = {}  # slot -> key filled into it, not yet published
        # Pinned staging rows for `_publish` ([2, n]: flat map index, then slot), reused in turn
        # once the kernels that read them (or their copy) have run: pinning new ones per update
        # cost ~50 us each.
        self._stage: list[_Stage] = []
        self._stage_last: int | None = None  # the entry staged last, until its readers are queued
        # Small host -> device updates (slot-map rows, slot tables) are read in place by the
        # kernels that use them (`device_view`) instead of copied first: a copy on the compute
        # stream was served after the copy stream's expert records (tools/PERF_NOTES.md,
        # session 18). False: pinned -> device copies (the slot map's updates and prefill's
        # slot tables as before; decode's slot tables an int64 copy and a cast), to measure.
        self.zero_copy = cuda
        self._copy_waited: torch.cuda.Event | None = None  # the copy stream's last wait
        self.timeline: Timeline | None = None  # a prefill's per-layer timeline, when traced
        self._stage_i = 0

    def _new_gpu_residency(self) -> Residency:
        n, n_layers, policy, per_token, floor = self._gpu_args
        return Residency(n, n_layers, make_policy(policy, n, per_token), floor)

    def reset_gpu(self) -> None:
        """Forget what the slot pool holds (benchmarks: every routing mode starts cold)."""
        self.join_loads()
        if self.copy_stream is not None:
            torch.cuda.synchronize(self.device)
        self.gpu = self._new_gpu_residency()
        self.ready.clear()
        self.last_use.clear()
        self.prefetched.clear()
        self._copy_waited = None
        self.slot_map.fill_(-1)
        self._mapped.fill(-1)
        self._unmap.clear()
        self._newmap.clear()

    # -- sources ----------------------------------------------------------------------------------
    def _disk_parts(self, key: Key) -> dict[str, list[torch.Tensor]]:
        """Zero-copy views of one expert's stored tensors (read on touch), per record tensor
        the parts that fill its rows in order (w13: w1's rows, then w3's)."""
        pre = f"{layer_prefix(self.cfg, key[0])}ffn.experts.{key[1]}."
        g, u8 = self.ckpt.get_mapped, torch.uint8
        return {
            "w13_q": [g(pre + "w1.weight").view(u8), g(pre + "w3.weight").view(u8)],
            "w13_s": [g(pre + "w1.scale").view(u8), g(pre + "w3.scale").view(u8)],
            "w2_q": [g(pre + "w2.weight").view(u8)],
            "w2_s": [g(pre + "w2.scale").view(u8)],
        }

    def _disk_record(self, key: Key) -> dict[str, torch.Tensor]:
        """One expert's record from the disk tier (w13 concatenated: a copy)."""
        return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in self._disk_parts(key).items()}

    def _host_hit(self, key: Key) -> tuple[torch.Tensor, int] | None:
        """key's record in the host cache -> (its packed row, its host slot), protected until the
        layer's next request (its copy to the GPU is still to come); None when not there."""
        with self.lock:
            s = self.hostres.lookup(key) if self.host is not None else None
            if s is None:
                return None
            self.counters.host_hits += 1
            self.hostres.protected[s] = True
            return self.host.row(s), s

    def _below_source(
        self, key: Key, scan: bool
    ) -> tuple[dict[str, torch.Tensor], bool, int | None]:
        """Where a record missed by the host cache is copied from -> (its tensors, whether they
        still need to be read from the disk tier first, its host slot or None).

        The record gets a host-cache slot to be read into (protected like a hit; a copy from
        the entry it evicts that may still be reading is waited for first), or, in a scan, the
        next slot of the scan ring (not admitted: see SCAN_RING), or, with no host tier (CPU, or
        not pinned yet), is read in place from the disk tier."""
        with self.lock:
            self.counters.disk_loads += 1
            self.counters.bytes_disk += self.record_bytes
            if self.host is None:
                t0 = time.perf_counter()
                rec = self._disk_record(key)
                self.counters.disk_s += time.perf_counter() - t0
                return rec, False, None
            if scan and self.n_stage:
                s = self._next_ring_slot(key[0] % 2)
            else:
                s, _ = self.hostres.admit(key)
                self.hostres.protected[s] = True
        self._await_host_slot(s)
        return self.host.view(s), True, s

    def _await_host_slot(self, s: int) -> None:
        """Wait for the last copy out of host slot s (asynchronous, and maybe still reading)
        before the slot is written again."""
        pending = self._host_copy.pop(s, None)
        if pending is not None:
            t0 = time.perf_counter()
            pending.synchronize()
            with self.lock:
                self.counters.await_s += time.perf_counter() - t0

    def _ring_half(self, half: int) -> tuple[int, int]:
        """(first slot, slots) of half 0 or 1 of the scan ring (a ring of one: all of it)."""
        n = self.n_stage // 2
        return (self.n_host + half * n, n) if n else (self.n_host, self.n_stage)

    def _next_ring_slot(self, half: int) -> int:
        """The next slot of a half of the scan ring (in turn); a record read ahead into it is
        forgotten. The caller waits for the last copy out of it (`_host_copy`)."""
        first, n = self._ring_half(half)
        s = first + self._ring_next[half] % n
        self._ring_next[half] = (self._ring_next[half] + 1) % n
        old = self._ring_key.pop(s, None)
        if old is not None:
            self._ahead.pop(old, None)
        return s

    def in_place(self, key: Key) -> tuple[dict[str, list[torch.Tensor]], bool]:
        """key's record where it lies, for the CPU lane to read without copying -> (per record
        tensor its row parts, as `_disk_parts`; whether it lies below the host cache). A
        host-cache record is protected until the next `begin_layer`. Counts one lookup."""
        with self.lock:
            self.counters.lookups += 1
            self.counters.cpu_lane += 1
            s = self.hostres.lookup(key) if self.host is not None else None
            if s is not None:
                self.hostres.protected[s] = True
                return {k: [t] for k, t in self.host.view(s).items()}, False
        return self._disk_parts(key), True

    def below_host(self, key: Key) -> bool:
        """Whether a miss of key would be read from the tier below the host cache."""
        with self.lock:
            return self.host is None or key not in self.hostres.slot_of

    def host_cached(self, layer: int, experts: Iterable[int]) -> list[int]:
        """Those of `experts` (of `layer`) whose misses would not be read from the tier below
        (`below_host`), in order; the lock is taken once, not once an expert."""
        with self.lock:
            if self.host is None:
                return []
            held = self.hostres.slot_of
            return [e for e in experts if (layer, e) in held]

    def _fill(self, dst: dict[str, torch.Tensor], key: Key) -> None:
        """Read key's record from the disk tier into dst (a host-cache slot), on this thread."""
        for piece in self._pieces(dst, key, 0):
            piece()

    def _pairs(
        self, dst: dict[str, torch.Tensor], key: Key
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(rows of dst, the stored tensor that fills them) for key's record (w13: w1's rows,
        then w3's)."""
        out = []
        for k, parts in self._disk_parts(key).items():
            row = 0
            for part in parts:
                out.append((dst[k][row : row + part.shape[0]], part))
                row += part.shape[0]
        return out

    def _pieces(
        self, dst: dict[str, torch.Tensor], key: Key, rows: int
    ) -> list[Callable[[], torch.Tensor]]:
        """The copies that read key's record into dst, as callables of about `rows` rows of a
        record tensor each (0: one per stored tensor). torch copies release the GIL, so the
        reader threads run them at once."""
        out = []
        for d, part in self._pairs(dst, key):
            n = part.shape[0]
            step = rows or n
            for a in range(0, n, step):
                out.append(lambda d=d[a : a + step], p=part[a : a + step]: d.copy_(p))
        return out

    def _read_parallel(
        self, reads: list[tuple[int, Key, dict[str, torch.Tensor]]]
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Start reading these records into their host slots, each in pieces over the reader
        threads; yields (slot, host record) in order as each record is complete."""
        if self.copier is not None:  # one record at a time, each over all of the pool
            for s, key, src in reads:
                self.copier(self._pairs(src, key))
                yield s, src
            return
        row_bytes = max(1, self.cfg.hidden_size // 2)
        rows = max(1, READ_PIECE // row_bytes)
        pool = self._readers()
        jobs = [[pool.submit(f) for f in self._pieces(src, key, rows)] for _, key, src in reads]
        try:
            for (s, _, src), fs in zip(reads, jobs, strict=True):
                for f in fs:
                    f.result()
                yield s, src
        finally:  # a failure (or a caller that stops) leaves no piece writing into a record
            futures_wait([f for fs in jobs for f in fs])

    # -- residency --------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """A step starts: note the stream its experts will be used on."""
        if self.copy_stream is not None:
            self.compute = torch.cuda.current_stream(self.device)

    def _compute(self) -> torch.cuda.Stream:
        return self.compute if self.compute is not None else torch.cuda.current_stream(self.device)

    def begin_layer(self) -> None:
        """Start a new residency request: nothing is protected from eviction any more."""
        self.gpu.protected.fill(False)
        if self.hostres is not None:
            with self.lock:
                self.hostres.protected.fill(False)

    def hold_layer(self, layer: int) -> None:
        """Protect every resident expert of `layer` until the next `begin_layer` (a prefetch
        then takes other slots): a step's later chunks still use them."""
        gpu = self.gpu
        for e in range(self.cfg.n_routed_experts):
            s = gpu.slot_of.get((layer, e))
            if s is not None:
                gpu.protected[s] = True

    def ensure_resident(
        self, layer: int, experts: Sequence[int], then_wait: bool = False, scan: bool = False
    ) -> list[int]:
        """Slots holding `experts` of `layer`, copying misses in; protects them until the next
        `begin_layer`. On CUDA the copies are queued on the copy stream: call `wait` before use.
        `then_wait`: the caller calls `wait` before anything reads the slot map again, which
        then also takes the evicted entries out (one map update instead of two). `scan`: the
        request is part of a scan (a prefill chunk's layer): misses of the host cache go
        through the scan ring instead of into the cache."""
        t0 = time.perf_counter()
        gpu, counters, prefetched = self.gpu, self.counters, self.prefetched
        lookup, protected = gpu.lookup, gpu.protected
        # Hits first, all protected before any miss is admitted: a miss must not evict an
        # entry the same request is about to use (nor one decode's B is reading now).
        keys = [(layer, int(e)) for e in experts]
        slots: list[int] = []
        missed: list[int] = []  # indices into keys
        looked = hits = 0  # added to the counters once, after the loop
        for i, key in enumerate(keys):
            s = lookup(key)
            if key in prefetched:
                prefetched.discard(key)  # if evicted since it was prefetched: counted again
                if s is not None:  # counted when its prefetch looked
                    protected[s] = True
                    slots.append(s)
                    continue
            looked += 1
            if s is None:
                missed.append(i)
                slots.append(-1)
                continue
            hits += 1
            protected[s] = True
            slots.append(s)
        counters.lookups += looked
        counters.gpu_hits += hits
        if not missed:  # all hits: nothing to admit, copy or publish
            counters.copy_s += time.perf_counter() - t0
            return slots
        if self._pending or (self._last is not None and not scan):
            # Background loads (a scan's) still to finish: one whose slot may be evicted now
            # first (its copy then precedes the refill's on the copy stream, and a failure
            # forgets the old key, not the new); for a request that is not a scan, all, reads
            # ahead too (its reads may evict a host-cache record such a load still copies
            # from, and would share the copier with that thread's).
            if not scan:
                self.join_loads()
            else:
                # Loads still running are the next layer's: keep them (protected for this
                # request) where the others leave room for the misses, else join them first.
                pend = [s for s in self._pending if not protected[s]]
                room = self.free_slots() - len(pend)
                if len(missed) <= room:
                    protected[pend] = True
                else:
                    self._join(pend)
        misses = []
        admitted = gpu.admit_many([keys[i] for i in missed])
        mapped, unmap, newmap = self._mapped, self._unmap, self._newmap
        evictions = 0
        for i, (s, evicted) in zip(missed, admitted, strict=True):
            key = keys[i]
            if evicted is not None:
                evictions += 1
                if mapped.item(evicted) >= 0:
                    unmap.add(evicted)
            newmap[s] = key  # replaces an unpublished fill of the same slot
            misses.append((s, key))
            slots[i] = s
        counters.evictions += evictions
        if not then_wait:  # evicted entries leave the map before anything reads it again
            self._publish({})
        try:
            self._load(misses, scan)
        except BaseException:
            self._publish({})  # the `wait` that would have will not come
            raise
        counters.copy_s += time.perf_counter() - t0
        return slots

    def _load(self, misses: list[tuple[int, Key]], scan: bool = False) -> None:
        """Copy missed records into their slots: host-cache hits first (their copies run while
        the rest is read), then the records of the tier below, read in pieces by all the reader
        threads, each copied as soon as it is read. `scan`: those go through the scan ring, a
        ring's worth at a time (a ring slot is reused once the copy out of it has run). On CUDA
        a scan loads in the background (`_load_behind`)."""
        if scan and self.copy_stream is not None and self.host is not None:
            self._load_behind(misses)
            return
        timed = self.time_copies and self.copy_stream is not None
        if timed:  # before the copies (which wait only for their slots' last use, as untimed)
            start = self._copy_event()
        copied: set[int] = set()  # slots whose copy is queued (or done, on CPU)
        # The copies are queued on the copy stream: entered once for the batch (entering a
        # stream context costs ~20 us of host time, per copy it was a tenth of a decode layer's).
        on_copy = torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else None
        try:
            with (
                on_copy if on_copy is not None else contextlib.nullcontext(),
                contextlib.closing(self._sources(misses, scan)) as sources,
            ):
                for s, src, h in sources:
                    self._copy_to_slot(s, src, h)
                    copied.add(s)
        except BaseException:
            # What never arrived must not be found later: its slot holds no data for it.
            for s, _ in misses:
                if s not in copied:
                    self._newmap.pop(s, None)
                    self.gpu.drop(s)
            raise
        self.counters.bytes_h2d += len(misses) * self.record_bytes
        if timed:
            self.copy_events.append((start, self._copy_event()))

    def _sources(
        self, misses: list[tuple[int, Key]], scan: bool, ahead: Future | None = None
    ) -> Iterator[tuple[int, Source, int | None]]:
        """(slot, the record to copy into it, its host slot or None) for each miss, in copy
        order: host-cache hits (their copies run while the rest is read), a scan's records read
        ahead, then the records of the tier below as each is read, by all the reader threads
        (a scan's through the ring, a ring's worth at a time: a ring slot is reused once the
        copy out of it has run). `ahead`: the reads ahead into the layer's ring half, waited
        for after the hits and before anything else (the layer's records among them are then
        copied from the ring, not read again; none of them is still being written). The caller
        copies each before asking for the next; a cache slot that was to be read into and
        whose record was not copied is forgotten when the generator ends early (an error, or
        the caller's)."""
        rest = []
        for s, key in misses:
            hit = self._host_hit(key)
            if hit is not None:
                yield s, *hit
            else:
                rest.append((s, key))
        if not rest:  # all in the host cache (most decode layers): nothing to read
            return
        if ahead is not None:
            # The hits' copies are queued by now: the copy stream has work while the reads
            # ahead finish (waited for first, they left it idle whenever they ran late).
            t0 = time.perf_counter()
            futures_wait([ahead])  # its errors are its own (`_ahead_job`)
            waited = time.perf_counter() - t0
            self._ahead_waited += waited
            with self.lock:
                self.counters.await_s += waited
        below = []
        for s, key in rest:
            h = self._ahead.pop(key, None) if scan else None
            if h is None:
                below.append((s, key))
                continue
            self._ring_key.pop(h, None)  # read ahead: counted (and copied) now
            self.ahead_used += 1
            with self.lock:
                self.counters.disk_loads += 1
                self.counters.bytes_disk += self.record_bytes
            yield s, self.host.row(h), h
        host_slot: dict[int, int | None] = {}
        done: set[int] = set()  # slots the caller has copied into
        # a scan reads a ring half's worth at a time (the half of the layer: all misses are one
        # layer's), reusing a slot once the copy out of it has run
        group = self._ring_half(0)[1] if scan and self.n_stage else max(len(below), 1)
        try:
            for g in range(0, len(below), group):
                reads = []
                for s, key in below[g : g + group]:
                    src, unread, h = self._below_source(key, scan)
                    host_slot[s] = h
                    if unread:
                        reads.append((s, key, src))
                    else:
                        yield s, src, h
                        done.add(s)
                if reads:
                    with marker("hs::read"), contextlib.closing(self._read_parallel(reads)) as it:
                        while True:  # timed while reading, not while the caller copies
                            t0 = time.perf_counter()
                            s = next(it, None)
                            dt = time.perf_counter() - t0
                            with self.lock:
                                self.counters.disk_s += dt
                                if scan:
                                    self.counters.scan_read_s += dt
                            if s is None:
                                break
                            yield s[0], self.host.row(host_slot[s[0]]), host_slot[s[0]]
                            done.add(s[0])
        except BaseException:
            with self.lock:  # a cache slot read into (the ring is not the cache) holds nothing
                for s, h in host_slot.items():
                    if s not in done and h is not None and h < self.n_host:
                        self.hostres.drop(h)
            raise

    def _readers(self) -> ThreadPoolExecutor:
        if self._reader_pool is None:
            n = max(1, min(READER_THREADS, os.cpu_count() or 1))
            self._reader_pool = ThreadPoolExecutor(n, thread_name_prefix="homeseek-read")
        return self._reader_pool

    def _copy_event(self) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.copy_stream)
        return ev

    def copy_busy_s(self) -> float:
        """Seconds the copy lane spent on the timed batches (synchronizes), then forgets them."""
        self.join_loads()
        if not self.copy_events:
            return 0.0
        torch.cuda.synchronize(self.device)
        total = sum(a.elapsed_time(b) for a, b in self.copy_events) / 1000
        self.copy_events.clear()
        return total

    def used(self, slots: Iterable[int]) -> None:
        """The kernels reading these slots are queued on the compute stream: a later copy into
        one of them waits for an event recorded now (`_copy_to_slot`)."""
        if self.copy_stream is None:
            return
        slots = list(slots)
        if not slots:
            return
        ev = torch.cuda.Event()
        ev.record(self._compute())
        for s in slots:
            self.last_use[s] = ev

    def _copy_to_slot(self, s: int, src: Source, host_slot: int | None = None) -> None:
        """Queue the copy of src (the record in host slot `host_slot`, if there) into s.
        CUDA: called with the copy stream current (`_load`)."""
        if self.copy_stream is None:
            self.pool.copy_in(s, src)
            return
        # The slot may still be read by kernels queued before this eviction: order the copy
        # after the last of them (the scheduler's waves register their slots with `used`), not
        # after everything queued since. Decode's B reads slots of its layer's experts that
        # were resident: hits of that layer's request, protected before any of its misses is
        # admitted (`ensure_resident`), so never the slot a copy of that request fills.
        self.ready[s] = self._queue_copy(s, src, host_slot, self.last_use.pop(s, None))

    def _queue_copy(
        self,
        s: int,
        src: Source,
        host_slot: int | None,
        after: torch.cuda.Event | None,
    ) -> torch.cuda.Event:
        """Queue src's copy into slot s on the copy stream (current), after the event `after`
        -> the event of its end (also noted for the host slot it reads, if any)."""
        # Waiting again for the event the copy stream waited for last is a no-op that costs a
        # queue entry (a scan's records mostly wait for one event, the layer that last used
        # their slots): once the stream waited, all later work on it comes after that event.
        if after is not None and after is not self._copy_waited:
            self.copy_stream.wait_event(after)
            self._copy_waited = after
        # A host record is pinned (asking torch costs ~40 us a tensor); a record read in place
        # from the disk tier is not, and is copied synchronously.
        self.pool.copy_in(s, src, non_blocking=host_slot is not None)
        ev = torch.cuda.Event()
        ev.record(self.copy_stream)
        if host_slot is not None:
            self._host_copy[host_slot] = ev
        return ev

    # -- a scan's loads, behind the host's back ---------------------------------------------------
    def _load_behind(self, misses: list[tuple[int, Key]]) -> None:
        """A scan's misses (their slots admitted): copy host-cache hits and read the records
        of the tier below through the scan ring on a background thread, which queues every
        copy itself, so the host goes on queueing the current layer's kernels meanwhile (read
        in line, the next layer's reads and the current layer's kernels ran one after the
        other). `wait` (or a later load that takes one of these slots) joins it."""
        # The copies into these slots wait for their last use (the events noted now, on this
        # thread, which owns `last_use`).
        after = {s: self.last_use.pop(s, None) for s, _ in misses}
        half = misses[0][1][0] % 2
        ahead = self._half_ahead[half]  # the ring half's reads ahead, its layer's among them
        job = self._submit(self._behind_job, misses, after, self.time_copies, ahead)
        self._half_load[half] = job
        if self.timeline is not None and misses:
            now = time.perf_counter()
            self.timeline.span("submit", misses[0][1][0], now, now)
        for s, _ in misses:
            self._pending[s] = job
        self.counters.bytes_h2d += len(misses) * self.record_bytes

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn on the background thread, after what was submitted before."""
        if self._behind is None:
            self._behind = ThreadPoolExecutor(1, thread_name_prefix="homeseek-scan")
        self._last = self._behind.submit(fn, *args)
        return self._last

    def _behind_job(
        self,
        misses: list[tuple[int, Key]],
        after: dict[int, torch.cuda.Event | None],
        timed: bool,
        ahead: Future | None = None,
    ) -> tuple[dict[int, torch.cuda.Event], BaseException | None]:
        """(background thread) -> (slot -> the end of its copy, for the slots whose copy is
        queued; the error that stopped the rest, or None). `ahead`: the last reads ahead into
        the same half of the ring, waited for once the host-cache hits are queued
        (`_sources`)."""
        ready: dict[int, torch.cuda.Event] = {}
        if ahead is not None and not self.hits_first:  # as before session 15
            futures_wait([ahead])
            ahead = None
        t_job, issue = time.perf_counter(), 0.0
        self._ahead_waited = 0.0
        tl = self.timeline  # read once: the main thread may set it meanwhile
        try:
            with (
                marker("hs::copier"),
                torch.cuda.stream(self.copy_stream),
                contextlib.closing(self._sources(misses, True, ahead)) as sources,
            ):
                start = None
                for s, src, h in sources:
                    t0 = time.perf_counter()
                    if start is None and (timed or tl is not None):
                        # at the first copy, not before the job's lookups and reads; reads
                        # between this job's copies still count as its copy time
                        start = self._copy_event()
                    ready[s] = self._queue_copy(s, src, h, after[s])
                    issue += time.perf_counter() - t0
                if start is not None:
                    end = self._copy_event()
                    if timed:
                        with self.lock:
                            self.copy_events.append((start, end))
                    if tl is not None:
                        layer = misses[0][1][0]
                        tl.copies(layer, start, end)
                        tl.span("queue", layer, t_job, time.perf_counter())
        except BaseException as e:
            return ready, e
        finally:
            with self.lock:
                self.counters.bg_busy_s += time.perf_counter() - t_job - self._ahead_waited
                self.counters.bg_issue_s += issue
        return ready, None

    def read_ahead(self, layer: int, experts: Iterable[int] | None = None) -> None:
        """Scan: read `layer`'s records of the tier below (of `experts`, default all) into its
        half of the scan ring now, on a thread of its own, once the load that last copied out
        of that half has queued its copies (the layer before is then still loading, out of the
        other half): that layer's own load then only copies them, and the reads of a scan run
        while the previous layer's records are copied instead of after. Counted when used; a
        failed read here is left to that load to repeat (and report)."""
        if self.copy_stream is None or self.host is None or self.n_stage < 2:
            return
        wanted = range(self.cfg.n_routed_experts) if experts is None else experts
        keys = [(layer, e) for e in wanted if (layer, e) not in self.gpu.slot_of]
        if self._ahead_thread is None:
            self._ahead_thread = ThreadPoolExecutor(1, thread_name_prefix="homeseek-ahead")
        half = layer % 2
        job = self._ahead_thread.submit(self._ahead_job, layer, keys, self._half_load[half])
        self._half_ahead[half] = self._ahead_last = job

    def _ahead_job(self, layer: int, keys: list[Key], after: Future | None) -> None:
        """(read-ahead thread) `read_ahead`'s reads, once the load `after` has queued its
        copies out of the same half of the ring. Never raises: what it failed to read, that
        layer's load reads (and reports)."""
        if after is not None:
            futures_wait([after])  # its errors are its own (`_join`)
        with contextlib.suppress(Exception):
            self._read_ahead_now(layer, keys)

    def _read_ahead_now(self, layer: int, keys: list[Key]) -> None:
        """Read the keys (of `layer`) missing from the host cache into the next slots of the
        layer's half of the ring (at most the half), each once the last copy out of its slot
        ran."""
        t_job, tl = time.perf_counter(), self.timeline
        half = layer % 2
        with self.lock:
            below = [k for k in keys if k not in self.hostres.slot_of and k not in self._ahead]
        reads = []
        for key in below[: self._ring_half(half)[1]]:
            h = self._next_ring_slot(half)
            self._await_host_slot(h)
            reads.append((h, key, self.host.view(h)))
        key_of = {h: key for h, key, _ in reads}
        t0 = time.perf_counter()
        try:
            with marker("hs::read"):
                for h, _ in self._read_parallel(reads):
                    self._ahead[key_of[h]] = h
                    self._ring_key[h] = key_of[h]
        except Exception:  # the layer's own load reads it again, and reports
            pass
        t1 = time.perf_counter()
        with self.lock:
            self.counters.disk_s += t1 - t0
            self.counters.scan_read_s += t1 - t0
            self.counters.bg_busy_s += t1 - t_job
        if tl is not None and keys:
            tl.span("read ahead", layer, t_job, t1)

    def _join(self, slots: Iterable[int]) -> None:
        """Wait for the background loads that fill any of these slots; their copies' events
        join `ready`. A load that failed forgets the slots it did not fill, then raises."""
        jobs = {id(j): j for s in slots if (j := self._pending.get(s)) is not None}
        error = None
        for job in jobs.values():
            ready, exc = job.result()
            mine = [s for s, j in self._pending.items() if j is job]
            for s in mine:
                del self._pending[s]
            self.ready.update(ready)
            if exc is not None:
                for s in mine:
                    if s not in ready:
                        self._newmap.pop(s, None)
                        self.gpu.drop(s)
                error = error or exc
        if error is not None:
            raise error

    def join_loads(self) -> None:
        """Wait for everything on the background threads (loads: see `_join`; reads ahead)."""
        if self._ahead_last is not None:
            futures_wait([self._ahead_last])  # in order: all reads ahead before it are done
            self._ahead_last = None
        if self._last is not None:
            self._last.result()  # the thread runs in order: all before it are done too
            self._last = None
        if self._pending:
            self._join(list(self._pending))

    def wait(self, slots: Iterable[int]) -> None:
        """Make the compute stream wait for the copies into these slots (and nothing else);
        their map entries are published after that wait."""
        slots = list(slots)
        if self._pending:
            t0 = time.perf_counter()
            try:
                with marker("hs::join"):
                    self._join(slots)
            except BaseException:
                self._publish({})  # the evicted entries leave the map all the same
                raise
            key = self.gpu.key_of[slots[0]] if self.timeline is not None and slots else None
            if key is not None:
                self.timeline.span("join", key[0], t0, time.perf_counter())
        if self.copy_stream is not None and self.ready:  # else every slot asked for was a hit
            cur = self._compute()
            for s in slots:
                ev = self.ready.pop(s, None)
                if ev is not None:
                    cur.wait_event(ev)
        if self._newmap or self._unmap:
            self._publish({self._newmap.pop(s): s for s in slots if s in self._newmap})

    def published(self, layer: int) -> np.ndarray:
        """[n_experts] bool: which of the layer's experts the device slot map holds now."""
        return self._mapped[layer] >= 0

    def layer_on_device(self, layer: int) -> bool:
        """Every expert of `layer` is in the device slot map, and no update of the map is
        pending (an eviction not yet unpublished would leave a stale entry there)."""
        return not self._unmap and not self._newmap and bool((self._mapped[layer] >= 0).all())

    def _publish(self, new: dict[Key, int]) -> None:
        """Write the pending removals and `new` entries into the device slot map, in order on
        the compute stream (one scatter, of rows staged in pinned memory: read in place, or
        copied first without `zero_copy`)."""
        unmap = self._unmap
        if not unmap and not new:
            return
        upd = dict.fromkeys(unmap, -1)
        upd.update(new)
        unmap.clear()
        mapped = self._mapped
        E = mapped.shape[1]
        flat: list[int] = []
        for key, v in upd.items():
            mapped[key] = v
            flat.append(key[0] * E + key[1])
        if self.copy_stream is None:  # the map is on the host: its rows as they are, no staging
            index = torch.from_numpy(np.array(flat, dtype=np.int64))
            slots = torch.from_numpy(np.array(list(upd.values()), dtype=np.int32))
        else:
            both = self._staged([flat, list(upd.values())])
            index, slots = both[0], both[1].to(torch.int32)
        try:
            self.slot_map.view(-1).index_copy_(0, index, slots)
        finally:  # the staging buffer is reused only after what was queued to read it
            self._staged_read()

    def _staged(self, rows: list[list[int]]) -> torch.Tensor:
        """(CUDA; `_publish` builds the CPU map's rows itself) rows [2][n] as an int64 tensor on
        the device, through a pinned staging buffer (a ring of them, each reused once the
        kernels that read it have run: the caller calls `_staged_read` once they are queued),
        so nothing waits for the host. With `zero_copy` the device tensor is a view of the
        pinned buffer, read in place."""
        n = len(rows[0])
        # An update holds at most every slot twice (its removal and its new entry): sized so,
        # no update needs a pinned buffer of its own (`PinnedRing` says why that matters).
        width = max(STAGE_ROWS, 2 * self.n_slots)
        if n > width:  # not reached (see above); kept as the safe way
            return (
                torch.tensor(rows, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
            )
        if len(self._stage) < STAGE_RING:
            host = torch.empty(2 * width, dtype=torch.long, pin_memory=True)
            self._stage.append(_Stage(host))
        i = self._stage_i = (self._stage_i + 1) % len(self._stage)
        st = self._stage[i]
        if st.read is not None:
            st.read.synchronize()  # its previous readers (STAGE_RING updates ago) have long run
        host = st.host
        # Both rows in the buffers' first 2n elements: a contiguous copy. (Slices [:, :n] of a
        # [2, width] buffer were not: torch then copies the source into pageable memory first,
        # and a copy from pageable memory waits for the stream's queued kernels before it
        # returns, a host stall behind the GPU at every slot-map update.)
        src = host[: 2 * n].view(2, n)
        src.numpy()[...] = rows
        self._stage_last = i
        if self.zero_copy:
            if st.view is None:
                st.view = device_view(host, self.device)
            return st.view[: 2 * n].view(2, n)
        if st.dev is None:
            st.dev = torch.empty(2 * width, dtype=torch.long, device=self.device)
        # The device rows are reused in stream order: their next copy follows this scatter.
        out = st.dev[: 2 * n].view(2, n)
        out.copy_(src, non_blocking=True)
        return out

    def _staged_read(self) -> None:
        """The kernels that read the rows `_staged` returned last are queued: the staging
        buffer is written again only once they have run."""
        i, self._stage_last = self._stage_last, None
        if i is None:
            return
        st = self._stage[i]
        st.read = st.read or torch.cuda.Event()
        st.read.record(self._compute())

    def prefetch_hash_layers(self, ids: Sequence[int], scan: bool = False) -> None:
        """Hash-routed layers' experts follow from the token ids alone: start their copies at
        step start so they overlap the first layers' attention (skipped when they would crowd
        out more than half the pool)."""
        wanted = {layer: self.hash_experts(layer, ids) for layer in self.tid2eid}
        if sum(len(v) for v in wanted.values()) > self.n_slots // 2:
            return
        self.begin_layer()
        self.prefetched.clear()
        for layer, experts in wanted.items():
            self.prefetch(layer, experts, scan)
        self.begin_layer()

    def hash_experts(self, layer: int, ids: Sequence[int] | np.ndarray) -> list[int]:
        """The experts a hash-routed layer uses for these token ids (sorted)."""
        table = self.tid2eid[layer].numpy()
        return distinct_experts(table[np.asarray(ids, dtype=np.int64)], self.cfg.n_routed_experts)

    def prefetch(self, layer: int, experts: Sequence[int], scan: bool = False) -> None:
        """Look `experts` of `layer` up ahead of their layer and start copying the missing
        ones: counted now, so the layer's own request does not count them again."""
        self.ensure_resident(layer, experts, scan=scan)
        self.prefetched.update((layer, e) for e in experts)

    def check_holds_all(self, remedy: str = "a larger GPU budget, or fewer layers") -> None:
        """ConfigError, with the numbers and `remedy`, when the slot pool cannot hold every
        expert of every layer (`load_all`)."""
        E = self.cfg.n_routed_experts
        need = len(self.layers) * E
        if self.n_slots < need:
            raise ConfigError(
                f"every expert resident needs {need} GPU slots ({len(self.layers)} layers x "
                f"{E}); this budget gives {self.n_slots}: {remedy}"
            )

    def load_all(self) -> None:
        """Copy every expert of every layer into the slot pool and wait for the copies: the
        all-resident case (benchmarks on a budget that holds the whole model). A pool with
        fewer slots than experts cannot, and says so before copying anything."""
        self.check_holds_all()
        E = self.cfg.n_routed_experts
        for layer in tqdm(self.layers, desc="experts to the GPU", unit="layer", leave=False):
            self.begin_layer()
            self.wait(self.ensure_resident(layer, range(E), then_wait=True))
        self.begin_layer()
        if self.copy_stream is not None:
            torch.cuda.synchronize(self.device)

    def free_slots(self) -> int:
        """Slots neither pinned nor protected: what a prefetch may fill now."""
        gpu = self.gpu
        return self.n_slots - gpu.n_pinned - int(np.count_nonzero(gpu.protected))

    def weights(self, slot: int) -> tuple[QWeight, QWeight, QWeight]:
        """(w1, w3, w2) of the record in `slot`, as views (reference path)."""
        v = self.pool.view(slot)
        inter = self.cfg.moe_intermediate_size
        return (
            QWeight(v["w13_q"][:inter], v["w13_s"][:inter], "fp4"),
            QWeight(v["w13_q"][inter:], v["w13_s"][inter:], "fp4"),
            QWeight(v["w2_q"], v["w2_s"], "fp4"),
        )

    def pin_hot(self, keys: Sequence[Key]) -> int:
        """Load a hot set and never evict it (at most half the pool). Returns how many."""
        keys = list(keys)[: self.n_slots // 2]
        for key in keys:
            (s,) = self.ensure_resident(key[0], [key[1]])
            self.gpu.pin(s)
        self.begin_layer()
        return len(keys)

    # -- background host fill ---------------------------------------------------------------------
    def start_host_fill(self, order: Sequence[Key] | None = None) -> None:
        """Pin the host cache and copy experts disk -> host in a background thread until full.

        The default order takes each expert id across all layers before the next id, so every
        layer keeps the same share of its records in the cache. Layer by layer (the order
        before), a cache of two thirds of the model held the first two thirds of the layers
        and none of the rest: a prefill then read every record of the last layers from the
        tier below, ~3x a layer's copy time each, while the first layers read nothing, and a
        decode token's reads all fell in its last layers. Spread, each layer's reads fit in
        its half of the scan ring and run beside the previous layer's copies."""
        if not self.n_host or self._filler is not None:
            return
        keys = (
            list(order)
            if order is not None
            else [(layer, e) for e in range(self.cfg.n_routed_experts) for layer in self.layers]
        )
        keys = keys[: self.n_host]

        def fill() -> None:
            n = self.n_host + self.n_stage
            try:
                host = RecordBuffer(self.cfg, n, "cpu", pin=True)
            except Exception as e:  # an OOM (torch raises several kinds), or any other failure
                # The pieces pinned before the failure went back to torch's pinned cache, which
                # keeps them locked: give them to the OS, whose page cache now serves every miss.
                empty = getattr(torch.accelerator, "empty_host_cache", None)
                if empty is not None and torch.cuda.is_available():
                    empty()
                # The engine still runs, every miss read from the tier below: say so, loudly.
                self._fill_failed(
                    f"pinning the host expert cache ({n} records, "
                    f"{n * self.record_bytes / 2**30:.1f} GiB) failed: {e}; every miss is read "
                    "from the tier below (slower): lower host_mem_gb / --host-mem-gb"
                )
                return
            with self.lock:
                self.host = host
            for key in tqdm(keys, desc="pinning experts", unit="exp", disable=not self.progress):
                with self.lock:
                    if not self.hostres.free:  # full: never evict what a miss may be reading
                        return
                    if self.hostres.slot_of.get(key) is None:
                        s, _ = self.hostres.admit(key)
                        try:
                            self._fill(self.host.view(s), key)
                        except Exception as e:  # a bad shard: its slot must not be found
                            self.hostres.drop(s)
                            self._fill_failed(
                                f"filling the host expert cache stopped at {key} after "
                                f"{len(self.hostres.slot_of)} records: {e}; the rest are read "
                                "from the tier below when missed"
                            )
                            return

        self._filler = threading.Thread(target=fill, name="homeseek-host-fill", daemon=True)
        self._filler.start()

    def _fill_failed(self, why: str) -> None:
        """(fill thread) The host cache stops filling: warn now, raise at `join_host_fill`."""
        self.host_fill_error = why
        warnings.warn(why, RuntimeWarning, stacklevel=2)

    def join_host_fill(self) -> None:
        """Wait for the host cache to be pinned and filled; a failure to pin it (the engine goes
        on without it) raises here."""
        if self._filler is not None:
            self._filler.join()
        if self.host_fill_error is not None:
            raise ConfigError(self.host_fill_error)
