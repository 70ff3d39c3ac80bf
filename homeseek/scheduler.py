"""Between segments: which experts a layer uses, and making them resident (docs/runtime.md).

The scheduler is the only code that runs between segment A and the routed experts of a layer.
It reads the layer's expert ids (the one host sync per layer), asks the expert store to make them
resident (hits: slot ids; misses: copies on the store's copy stream) and builds the slot table
the FP4 experts kernel reads. It knows nothing of the model's math.

A routing override replaces the ids the model chose, for benchmarks: `UniformRouting` draws each
token's experts uniformly at random per layer (the pessimistic case for the cache, close to what
the real model's cache sees), `TraceRouting` replays a recorded trace. The model's routing
weights are kept, so the same kernels run on other experts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from homeseek.config import ConfigError, ModelConfig
from homeseek.experts import ExpertStore, PinnedRing, device_view, distinct_experts, marker

if TYPE_CHECKING:
    from homeseek.cpu_lane import CpuLane

# Prefill loads the next layer's experts early when tokens x experts per token is at least this
# many times the experts of a layer: each expert then misses the chunk with probability
# e^-4 < 2 %, so nearly every copy started early is one the layer needs.
PREFETCH_COVERAGE = 4
# Buffers of the slot-table ring (`Scheduler.slot_table`): a wave's table is read (in place, or
# by its copy) once its experts' copies are waited for, so the one this many waves back has
# long been read.
TABLE_RING = 8


class RoutingOverride:
    """Replaces a layer's expert ids sel [T, K] (CPU int64) for the tokens of one step."""

    name = "base"

    def begin_step(self, token_ids: Sequence[int]) -> None:
        """A new step of len(token_ids) tokens starts."""

    def select(self, layer: int, sel: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """`offset`: the first row's token in the step (a step's chunks pass a layer in turn)."""
        raise NotImplementedError


class UniformRouting(RoutingOverride):
    """Each token's K experts drawn uniformly (without replacement) per layer, seeded."""

    name = "uniform"

    def __init__(self, n_experts: int, k: int, seed: int = 0) -> None:
        self.n, self.k = n_experts, k
        self.rng = np.random.default_rng(seed)

    def select(self, layer: int, sel: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = sel.shape[0]
        draw = np.argsort(self.rng.random((T, self.n)), axis=1)[:, : self.k]  # [T, K]
        return torch.from_numpy(draw.astype(np.int64))


class TraceRouting(RoutingOverride):
    """Replays a recorded trace (`homeseek.profile.save_trace`): token t of the run gets the
    trace's token t mod len(trace) at every layer."""

    name = "trace"

    def __init__(self, path: str | Path, cfg: ModelConfig) -> None:
        from homeseek.profile import load_trace

        steps = load_trace(path)
        L, K = cfg.num_hidden_layers, cfg.num_experts_per_tok
        if not steps or len(steps) % L or any(len(e) != K for _, e in steps[:L]):
            raise ConfigError(
                f"{path}: a routing trace for this model needs {L} steps of {K} experts per "
                f"token; got {len(steps)} steps"
            )
        self.table = np.array([e for _, e in steps], dtype=np.int64).reshape(-1, L, K)
        if self.table.max() >= cfg.n_routed_experts:
            raise ConfigError(f"{path}: expert id {self.table.max()} >= {cfg.n_routed_experts}")
        self.cursor = 0  # trace token of the current step's first token
        self.T = 0

    def begin_step(self, token_ids: Sequence[int]) -> None:
        self.cursor += self.T
        self.T = len(token_ids)

    def select(self, layer: int, sel: torch.Tensor, offset: int = 0) -> torch.Tensor:
        rows = (self.cursor + offset + np.arange(sel.shape[0])) % self.table.shape[0]
        return torch.from_numpy(self.table[rows, layer])


def make_routing(spec: str, cfg: ModelConfig, seed: int = 0) -> RoutingOverride | None:
    """'model' (no override), 'uniform', or 'trace:PATH'."""
    if spec == "model":
        return None
    if spec == "uniform":
        return UniformRouting(cfg.n_routed_experts, cfg.num_experts_per_tok, seed)
    if spec.startswith("trace:"):
        return TraceRouting(spec.removeprefix("trace:"), cfg)
    raise ConfigError(f"unknown routing {spec!r}: model, uniform or trace:PATH")


@dataclass
class PredictionCounters:
    """Decode's next-layer expert prediction: accuracy and what wrong guesses cost."""

    layers: int = 0
    predicted: int = 0  # experts predicted
    correct: int = 0  # of them, chosen by the layer
    copied: int = 0  # copies started for predicted experts not resident
    copied_used: int = 0  # of those, chosen by the layer

    def as_dict(self, record_bytes: int) -> dict[str, float]:
        return {
            "prediction_accuracy": self.correct / self.predicted if self.predicted else 0.0,
            "prefetch_copies": float(self.copied),
            "prefetch_used": float(self.copied_used),
            "prefetch_wasted_bytes": float((self.copied - self.copied_used) * record_bytes),
        }


class Scheduler:
    """Owns the routing override, the trace recorder and the host time spent between
    segments; the expert store owns residency."""

    def __init__(self, store: ExpertStore, cfg: ModelConfig) -> None:
        self.store, self.cfg = store, cfg
        self.routing: RoutingOverride | None = None
        self.trace: list[tuple[int, torch.Tensor]] | None = None  # (layer, sel [T, K]) when set
        self.host_s = 0.0  # host seconds spent in `layer` (reading ids + residency bookkeeping)
        # Prefill chunks this long (tokens x experts per token >= PREFETCH_COVERAGE x the
        # layer's experts: nearly every expert is used) load the following layer's experts
        # while this layer computes (`prefetch_next`); False turns it off (tests).
        self.prefetch = True
        # Prefill's small host->device and device->host copies (a wave's slot table here, a
        # chunk's ids in the runner) go through pinned rings (`PinnedRing`: no page-locked
        # allocation, an implicit synchronization of every stream, in the steady state); False:
        # through torch's pinned allocator, as before session 16 (prefill_profile --pinned).
        self.pinned_rings = True
        self._table_ring = PinnedRing(TABLE_RING, pin=store.copy_stream is not None)
        self.prefetched_experts = 0  # experts loaded ahead of their layer (counted by prefill)
        # Decode's next-layer prediction (`prefetch_predicted`): experts predicted, how many of
        # them the layer then chose, copies started for them, and how many of those it used.
        self.predicted = PredictionCounters()
        self._prediction: tuple[int, set[int], set[int]] | None = None  # layer, ids, copied
        # The CPU lane (homeseek/cpu_lane.py; the engine sets it): a decode layer's misses
        # split between copies and the CPU. `cpu_job` is the current layer's CPU work.
        self.lane: CpuLane | None = None
        self.cpu_job: Future[torch.Tensor] | None = None
        # The current step's token ids (`begin_step`), the experts its hash layers use (by
        # layer, as asked for), and the layers whose reads ahead it has started.
        self._step_ids = np.zeros(0, dtype=np.int64)
        self._step_hash: dict[int, list[int]] = {}
        self._read_ahead: set[int] = set()

    def begin_step(self, token_ids: Sequence[int], prefetch_hash: bool = True) -> None:
        """Hash-routed layers' experts follow from the token ids: start their copies now
        (`prefetch_hash=False`: the caller calls `prefetch_hash` itself, once the step's first
        kernels are queued)."""
        self.store.begin_step()
        # a scan's hash layers' experts follow from the step's ids (`prefetch_next`)
        self._step_ids = np.asarray(token_ids, dtype=np.int64)
        self._step_hash.clear()
        self._read_ahead.clear()
        if self.routing is not None:
            self.routing.begin_step(token_ids)
        elif prefetch_hash:
            self.prefetch_hash(token_ids)

    def prefetch_hash(self, token_ids: Sequence[int]) -> None:
        """Start copying the hash-routed layers' experts of these tokens."""
        if self.routing is None:  # an override routes hash layers too: the table would be wrong
            self.store.prefetch_hash_layers(token_ids, scan=self.is_scan(len(token_ids)))

    def layer(
        self,
        layer: int,
        sel: torch.Tensor,
        following: int | None = None,
        lane_input: tuple[torch.Tensor, torch.Tensor] | None = None,
        offset: int = 0,
        more: bool = False,
        ready: torch.cuda.Event | None = None,
    ) -> Iterator[tuple[torch.Tensor, dict[int, int], bool]]:
        """Make the experts of sel [T, K] resident, a wave at a time (one wave unless a chunk
        touches more experts than the pool holds; each expert still loads once per chunk).
        Yields (the ids used [T, K] on the CPU, expert -> slot of this wave, whether it is the
        last wave) once the compute stream waits for the wave's copies. The wave's experts must
        be queued before the next wave is asked for: its copies may evict this wave's slots.
        `following`: the layer after this one; a long chunk starts loading its experts before
        this layer's experts run (`prefetch_next`). `lane_input`: one token's (expert input
        [1, D], routing weights [1, K]) on the host: with the CPU lane set, some misses are
        computed there (`cpu_job`, started before the copies; its experts are left out of the
        waves' slots). `offset`: where sel's tokens start in the step (a routing override's
        rows, when the step's chunks pass each layer in turn). `more`: later chunks of the
        step use this layer too, so the next layer's prefetch leaves all of its experts
        resident (it evicted the ones this chunk did not use, and the next chunk loaded them
        again, behind the next layer's copies). `ready`: sel is a host tensor the GPU is
        copying into, complete at this event."""
        t0 = time.perf_counter()
        store = self.store
        with marker("hs::ids"):
            if ready is not None:  # sel is a pinned host copy still arriving: wait for it
                ready.synchronize()
            sel = sel.cpu()  # the one host sync of the layer (with `ready`: a no-op)
        if store.timeline is not None:
            store.timeline.span("ids", layer, t0, time.perf_counter())
        if self.routing is not None:
            sel = self.routing.select(layer, sel, offset)
        if self.trace is not None:  # kept past the step: not the pinned ring's buffer
            self.trace.append((layer, sel.clone()))
        experts = self.experts_of(sel)
        self._score_prediction(layer, experts)
        store.begin_layer()
        self.cpu_job = None
        if self.lane is not None and lane_input is not None and sel.shape[0] == 1:
            experts = self._split(layer, sel, experts, lane_input)
            if not experts:  # all on the CPU: one empty wave still runs the layer's kernel
                self.host_s += time.perf_counter() - t0
                yield sel, {}, True
                return
        wave = max(store.n_slots - store.gpu.n_pinned, 1)
        scan = self.is_scan(sel.shape[0])
        for i in range(0, len(experts), wave):
            batch = experts[i : i + wave]
            if i:
                store.begin_layer()
            try:
                slots = store.ensure_resident(layer, batch, then_wait=True, scan=scan)
                slot_of = dict(zip(batch, slots, strict=True))
            except BaseException:
                # The CPU lane may still read host records whose protection ends with this
                # layer: let it finish before the error leaves the layer.
                job, self.cpu_job = self.cpu_job, None
                if job is not None:
                    job.exception()
                raise
            store.wait(slot_of.values())
            last = i + wave >= len(experts)
            self.host_s += time.perf_counter() - t0
            try:
                yield sel, slot_of, last
            finally:  # the caller has queued the wave's kernels (or given up on the layer)
                store.used(slot_of.values())
            t0 = time.perf_counter()
            # The next layer's copies, and the reads from below they need, start once this
            # layer's kernels are queued: the GPU computes while the host reads.
            if last and following is not None and self.prefetch:
                if more:
                    store.hold_layer(layer)
                self.prefetch_next(following, sel.shape[0])
        self.host_s += time.perf_counter() - t0

    def device_routed(self, layer: int) -> bool:
        """Whether `layer`'s expert kernel may take its slots from the device slot map, ahead
        of the host's ids: the model's own routing (an override draws the ids on the host)
        and every expert of the layer published there, with no change to the map pending."""
        return self.routing is None and self.store.layer_on_device(layer)

    def _split(
        self,
        layer: int,
        sel: torch.Tensor,
        experts: list[int],
        lane_input: tuple[torch.Tensor, torch.Tensor],
    ) -> list[int]:
        """One token's experts: start the CPU lane on the misses it takes -> the experts left
        for the GPU (hits and the misses to copy)."""
        lane, store = self.lane, self.store
        assert lane is not None
        missing = [e for e in experts if (layer, e) not in store.gpu.slot_of]
        if not missing:
            return experts
        below = {e: store.below_host((layer, e)) for e in missing}
        cpu = lane.split([(e, below[e]) for e in missing])
        copy = [e for e in missing if e not in cpu]
        lane.note_copies(sum(not below[e] for e in copy), sum(below[e] for e in copy))
        lane.counters.copied += len(copy)
        if not cpu:
            return experts
        x, w = lane_input
        row = sel[0].tolist()
        cols = [row.index(e) for e in cpu]  # one token: each expert once
        records = [store.in_place((layer, e))[0] for e in cpu]
        self.cpu_job = lane.submit(x, w[:, cols], records)
        taken = set(cpu)
        return [e for e in experts if e not in taken]

    def prefetch_predicted(self, layer: int, experts: Sequence[int]) -> None:
        """Decode: start copying the experts predicted for `layer` (the next one) that are not
        resident, behind the current layer's own copies, into slots neither pinned nor in use.
        A wrong guess costs its copy and the entry it evicted (`predicted` counts both)."""
        store = self.store
        if self.routing is not None:  # an override draws the ids after the router
            return
        want = set(experts)
        # In the prediction's order (the router's best first): they go first when room is
        # short. Records below the host cache are left to the layer itself: reading one takes
        # the host ~0.5 ms, longer than the next layer's A it would overlap, so the host would
        # reach that layer's ids late (and the CPU lane can compute them where they lie). With
        # no host cache (or before it is filled) that is every record: no prediction copies.
        # (Reading them on the scan thread instead was measured slower: docs/runtime.md.)
        resident = store.gpu.slot_of
        missing = [e for e in dict.fromkeys(experts) if (layer, e) not in resident]
        if missing:
            missing = store.host_cached(layer, missing)[: max(0, store.free_slots())]
        self._prediction = (layer, want, set(missing))
        if not missing:
            return
        if self.lane is not None:
            self.lane.note_copies(len(missing), 0)
        store.prefetch(layer, missing)

    def _score_prediction(self, layer: int, experts: list[int]) -> None:
        """The layer's actual experts against what was predicted for it."""
        pred, self._prediction = self._prediction, None
        if pred is None or pred[0] != layer:
            return
        _, want, copied = pred
        chosen = set(experts)
        c = self.predicted
        c.layers += 1
        c.predicted += len(want)
        c.correct += len(want & chosen)
        c.copied += len(copied)
        c.copied_used += len(copied & chosen)
        for e in copied - chosen:  # never looked up by the layer: not counted in advance
            self.store.prefetched.discard((layer, e))

    def prefetch_next(self, layer: int, tokens: int) -> None:
        """Expert-major prefill: a chunk of `tokens` uses nearly all of the next layer's experts,
        so queue the copies of those not resident now, while this layer's experts compute, as
        far as the slots that are neither pinned nor in use by this layer allow. Queued before
        this layer's expert kernels, the copies wait only for the last use of the slots they fill
        (`ExpertStore.used`) and run beside those kernels; the
        next layer's own request then finds them resident and counts each lookup once."""
        store, cfg = self.store, self.cfg
        if not self.is_scan(tokens):
            return
        missing = [e for e in self._scan_experts(layer) if (layer, e) not in store.gpu.slot_of]
        if missing:
            if store.free_slots() < len(missing):
                return  # a pool this tight loads the layer's experts on demand
            store.prefetch(layer, missing, scan=True)
            self.prefetched_experts += len(missing)
        # The reads of the layer after run meanwhile (once a step: a group's later chunks find
        # this layer loaded; and also when it was, by the step start's copies of hash layers).
        after = layer + 1
        if after < cfg.num_hidden_layers and after not in self._read_ahead:
            self._read_ahead.add(after)
            store.read_ahead(after, self._scan_experts(after))

    def _scan_experts(self, layer: int) -> Sequence[int]:
        """The experts a scan of this step uses at `layer`: all of them, but at a hash layer
        those of the step's token ids (the step start copies them only while all hash layers'
        fit in half the pool, never for a long chunk's). A routing override (the bench's)
        draws a hash layer's ids too, not from the table: all of them, a superset of what it
        uses (uniform routing at a scan's length uses them all)."""
        hashed = self.cfg.is_hash_layer(layer) and layer in self.store.tid2eid
        if not hashed or self.routing is not None:
            return range(self.cfg.n_routed_experts)
        if layer not in self._step_hash:
            self._step_hash[layer] = self.store.hash_experts(layer, self._step_ids)
        return self._step_hash[layer]

    def is_scan(self, tokens: int) -> bool:
        """Whether a step of `tokens` tokens is a scan: it uses nearly every expert of each
        layer (a long prefill chunk), so it prefetches whole layers (`prefetch_next`) and its
        reads of the tier below do not enter the host cache (`ExpertStore.ensure_resident`)."""
        cfg = self.cfg
        return tokens * cfg.num_experts_per_tok >= PREFETCH_COVERAGE * cfg.n_routed_experts

    def experts_of(self, sel: torch.Tensor) -> list[int]:
        """The distinct experts of sel [T, K] (on the CPU), sorted."""
        ids = sel.numpy().ravel()
        if ids.size <= 64:  # decode and verify: a set of a few ids is cheaper than numpy's
            return sorted(set(ids.tolist()))
        return distinct_experts(ids, self.cfg.n_routed_experts)

    def slot_rows(self, sel: torch.Tensor, slot_of: dict[int, int]) -> np.ndarray:
        """[T, K] int32 slots of sel's experts (on the CPU; -1: not in this wave), through a
        table indexed by expert id: a 4K-token chunk's 24K lookups one by one in Python took
        ~5 ms of host time a layer, between its ids and its expert kernel's launch."""
        lut = np.full(self.cfg.n_routed_experts, -1, dtype=np.int32)
        n = len(slot_of)
        if n:
            experts = np.fromiter(slot_of.keys(), np.int64, n)
            lut[experts] = np.fromiter(slot_of.values(), np.int32, n)
        ids = sel.numpy()
        out = lut[ids]
        out[ids < 0] = -1  # no expert (an id of -1 would index the last one)
        return out

    def slot_table(
        self, sel: torch.Tensor, slot_of: dict[int, int], device: torch.device
    ) -> torch.Tensor:
        """[T, K] int32 slots of sel's experts on `device` (-1: not in this wave). On CUDA
        through pinned host memory: a copy from pageable memory is staged by the driver, which
        may first wait for the stream (the queued kernels), and the scan thread's expert copies
        (`ExpertStore._load_behind`) wait with it (docs/runtime.md). With the store's
        `zero_copy`, a cast kernel reads the rows in place (`device_view`); without it, or
        without the pinned rings (`pinned_rings = False`, torch's pinned allocator as before
        session 16), a pinned -> device copy."""
        rows = self.slot_rows(sel, slot_of)
        if device.type != "cuda":
            return torch.from_numpy(rows).to(device)
        if not self.pinned_rings:  # a block of torch's pinned allocator, as before session 16
            return torch.from_numpy(rows).pin_memory().to(device, non_blocking=True)
        zero_copy = self.store.zero_copy
        # int64 when read in place: the cast to int32 is then the kernel that reads it
        host = self._table_ring.tensor(rows.shape, torch.int64 if zero_copy else torch.int32)
        host.numpy()[...] = rows
        if zero_copy:
            out = device_view(host, device).to(torch.int32)
        else:
            out = host.to(device, non_blocking=True)
        self._table_ring.used(torch.cuda.current_stream(device))
        return out
