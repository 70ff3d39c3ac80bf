"""Capture and replay of many small CUDA graphs that share one memory pool.

Why: a batch-1 decode step is ~90 short segments (per layer: attention + router, then the routed
experts; then the head). Each segment is dozens of kernels of a few microseconds of GPU work, so
the host's per-launch cost (several microseconds through PyTorch) dominates. A CUDA graph launches
a whole segment with one cudaGraphLaunch. The host still runs between segments (the scheduler
reads a layer's expert ids and writes the slot table), so this module captures many small graphs
rather than one graph per step.

The contract a captured function `fn()` must keep (CUDA stream-capture semantics: during capture
the work is recorded, not run, and a replay re-runs the recorded kernels on the recorded
addresses):

- Everything it reads or writes across replays is a static buffer: allocated once, outside the
  graph, and updated in place (`buf.copy_(new)`, kernels' `out=`). Rebinding a name to a new
  tensor is invisible to the graph; `debug=True` catches that for the declared `inputs`.
- No host sync and no host memory traffic inside: no `.item()`, `.tolist()`, `int(t)`,
  `torch.nonzero`, `print(t)`, no copy from pageable host memory, no pinned allocation. Positions
  and counts are read from device tensors; shapes are fixed per graph (one graph per shape key).
- `capture()` runs `fn` eagerly `warmup` times first, so its in-place writes to static buffers
  happen for real; capture before those buffers hold live state, or restore them afterwards.

Memory: all graphs of an engine share one private pool (`torch.cuda.graph_pool_handle()`), which
is what makes ~90 graphs affordable: a capture reuses the blocks earlier captures freed. The price
is an ordering rule (PyTorch's, for shared pools): tensors a graph allocates inside its capture
(e.g. a returned output) may live on memory an earlier-captured graph uses as scratch, so they
are valid only until a graph captured earlier replays again. Replay in capture order, on one
stream, never two graphs of one pool concurrently; keep state that must survive a step (caches,
the residual stream) in caller-allocated buffers.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

__all__ = [
    "CaptureError",
    "GraphCounters",
    "GraphPool",
    "GraphedStep",
    "MemoryDelta",
    "StaleInputError",
    "StaticGraph",
    "StaticInputs",
    "format_capture_error",
    "graphs_available",
    "measure_graph_pool_bytes",
    "measure_memory",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

CAPTURE_ERROR_MODES = ("global", "thread_local", "relaxed")

CAPTURE_FIX = (
    "read positions/counts from device tensors, preallocate outputs and pass out=, "
    "no .item()/.tolist() inside a segment"
)

CAPTURE_CAUSES = (
    "a host sync: .item(), .tolist(), int(t) / float(t) / bool(t), `if t:`, torch.nonzero or "
    "boolean-mask indexing, print(t), torch.cuda.synchronize()",
    "a CPU->GPU copy from pageable host memory (torch.tensor(list, device='cuda'), "
    "t.to('cuda') / buf.copy_(cpu_t) of an unpinned CPU tensor)",
    "an allocation of pinned host memory (t.pin_memory(), torch.empty(..., pin_memory=True))",
    "a shape or a Python branch that depends on tensor values",
    "first use of something that initialises lazily (a Triton autotune/compile, a cuBLAS "
    "handle) with warmup=0",
)

# (substrings of the underlying error, what it most likely means). Matched case-insensitively.
_LIKELY: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("not permitted when stream is capturing", "capturenotpermitted", "captureunsupported"),
        "a call that is illegal while a stream captures (a host sync, a pageable copy or a "
        "pinned allocation) ran inside the captured function",
    ),
    (
        ("previous error during capture", "captureinvalidated"),
        "an earlier call inside the captured function broke the capture; fix the first one",
    ),
    (
        ("unjoined",),
        "a side stream forked inside the captured function was not joined back "
        "(current_stream().wait_stream(side)) before the capture ended",
    ),
    (
        ("implicit",),
        "work went to the legacy default stream while capturing; launch on the current stream",
    ),
    (
        ("isolation",),
        "the captured stream waited on an event recorded outside the capture",
    ),
)


def format_capture_error(name: str, cause: BaseException | str) -> str:
    """The text of a CaptureError: which graph, what CUDA said, the usual causes and the fix."""
    what = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
    what = what.strip() or "(no message)"
    lines = [f"CUDA-graph capture of {name!r} failed: {what}"]
    low = what.lower()
    for needles, meaning in _LIKELY:
        if any(n in low for n in needles):
            lines.append(f"Likely: {meaning}.")
            break
    lines.append(
        "A captured segment is recorded, not run, so it must not wait for the GPU or touch host "
        "memory. The usual causes:"
    )
    lines += [f"  - {c}" for c in CAPTURE_CAUSES]
    lines.append(f"Fix: {CAPTURE_FIX}; do host work between replays, not inside the segment.")
    lines.append(
        "The capture was ended and the stream and pool left usable: run this segment eagerly "
        "(GraphedStep does that) or fix it and capture again."
    )
    return "\n".join(lines)


class CaptureError(RuntimeError):
    """A capture failed. `name` is the graph's name (its dispatcher key), `cause` the error
    raised inside the capture (also chained as __cause__)."""

    def __init__(self, name: str, cause: BaseException | str) -> None:
        super().__init__(format_capture_error(name, cause))
        self.name = name
        self.cause = cause


class StaleInputError(RuntimeError):
    """A declared graph input no longer is the buffer the graph was captured on."""


def graphs_available(device: torch.device | str | int | None = None) -> bool:
    """True when CUDA graphs can be used for `device` (default: the current CUDA device)."""
    if not torch.cuda.is_available():
        return False
    if device is None or isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


# --- input signatures (debug mode) ---------------------------------------------------------------


def _signature(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype, t.stride(), t.device)


_SIG_FIELDS = ("data pointer", "shape", "dtype", "stride", "device")


class StaticInputs:
    """The declared inputs of one graph and what they looked like at capture.

    Keeps the caller's mapping itself (not a copy), so a caller that rebinds an entry
    (`inputs["x"] = new_tensor`) instead of copying into it is seen by `verify()`. A tensor whose
    storage was swapped in place (`t.set_(...)`, `t.data = ...`, `t.resize_(...)`) is seen too:
    its data pointer, shape or stride moved.
    """

    def __init__(self, graph_name: str, inputs: Mapping[str, torch.Tensor] | None) -> None:
        self.graph_name = graph_name
        self.inputs: Mapping[str, torch.Tensor] = inputs if inputs is not None else {}
        self.captured: dict[str, tuple] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def record(self) -> None:
        """Remember every input's data pointer, shape, dtype, stride and device, and keep the
        tensors alive: the graph reads their addresses, and a buffer the caller dropped would
        otherwise go back to the allocator and be handed to another tensor."""
        for name, t in self.inputs.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"graph {self.graph_name!r}: input {name!r} is not a tensor")
        self.tensors = dict(self.inputs)
        self.captured = {name: _signature(t) for name, t in self.tensors.items()}

    def verify(self) -> None:
        """Raise StaleInputError naming the first input that differs from capture time."""
        for name, then in self.captured.items():
            t = self.inputs.get(name)
            if t is None:
                raise StaleInputError(
                    f"graph {self.graph_name!r}: declared input {name!r} is gone from the inputs "
                    "mapping; the graph still reads the buffer it was captured on."
                )
            now = _signature(t)
            if now != then:
                diff = ", ".join(
                    f"{field} {a} -> {b}"
                    for field, a, b in zip(_SIG_FIELDS, then, now, strict=True)
                    if a != b
                )
                raise StaleInputError(
                    f"graph {self.graph_name!r}: input {name!r} is not the captured buffer "
                    f"({diff}). A replay reads the captured address, so new data must be "
                    f"copied into the captured buffer (buf.copy_(new)), not bound to the name."
                )
        extra = set(self.inputs) - set(self.captured)
        if extra:
            raise StaleInputError(
                f"graph {self.graph_name!r}: inputs {sorted(extra)} were added after capture; "
                "the graph cannot read them."
            )


# --- memory measurement --------------------------------------------------------------------------


@dataclass
class MemoryDelta:
    """Growth of the CUDA caching allocator over a region, in bytes.

    `reserved_bytes` (memory_reserved: segments cudaMalloc'd from the driver) is what a graph pool
    costs the memory plan; `allocated_bytes` is what live tensors hold at the end."""

    device: torch.device
    reserved_bytes: int = 0
    allocated_bytes: int = 0
    peak_allocated_bytes: int = 0


@contextmanager
def measure_memory(device: torch.device | str | int | None = None) -> Iterator[MemoryDelta]:
    """`with measure_memory(dev) as m: ...` then m.reserved_bytes etc.

    Synchronizes the device at both ends so pending frees are settled, and resets the device's
    peak-memory statistic. Other threads that allocate on the device meanwhile (a copy thread)
    are counted too: measure when they idle."""
    dev = _cuda_device(device)
    torch.cuda.synchronize(dev)
    r0, a0 = torch.cuda.memory_reserved(dev), torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    delta = MemoryDelta(dev)
    try:
        yield delta
    finally:
        torch.cuda.synchronize(dev)
        delta.reserved_bytes = torch.cuda.memory_reserved(dev) - r0
        delta.allocated_bytes = torch.cuda.memory_allocated(dev) - a0
        delta.peak_allocated_bytes = torch.cuda.max_memory_allocated(dev) - a0


def _cuda_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# --- the allocator's pool bookkeeping ------------------------------------------------------------
# A capture registers its pool with the caching allocator (capture_begin: "allocations of this
# capture go to the pool", and one reference on the pool); capture_end undoes the first and the
# graph's destruction the second. When the capture was invalidated, torch's capture_end raises
# before undoing the registration, and while any registration is open the allocator stops
# recycling memory that was used on other streams (record_stream: the expert store's copies). So a
# failed capture ends the registration here. These private bindings have these names since torch
# 2.8; where one is missing the cleanup is skipped (the pool then leaks, the process still works).


def _torch_c(*names: str) -> Callable[..., Any] | None:
    for n in names:
        f = getattr(torch._C, n, None)
        if f is not None:
            return f
    return None


def _pool_end_allocate(dev: int, handle: tuple[int, int]) -> bool:
    """End an open capture registration of the pool. False when none was open."""
    f = _torch_c("_cuda_endAllocateToPool")
    if f is None:
        return False
    try:
        f(dev, handle)
        return True
    except RuntimeError:  # "not currently recording to mempool_id": capture_end got there first
        return False


def _pool_incref(dev: int, handle: tuple[int, int]) -> bool:
    begin = _torch_c("_cuda_beginAllocateCurrentThreadToPool", "_cuda_beginAllocateToPool")
    if begin is None or _torch_c("_cuda_endAllocateToPool", "_cuda_releasePool") is None:
        return False
    begin(dev, handle)  # creates the pool (use count 1) and routes this thread's allocations...
    _pool_end_allocate(dev, handle)  # ...which stops at once; the reference stays
    return True


def _pool_release(dev: int, handle: tuple[int, int]) -> None:
    f = _torch_c("_cuda_releasePool")
    if f is not None:
        f(dev, handle)


# --- counters ------------------------------------------------------------------------------------


@dataclass
class GraphCounters:
    """What the graphs of one pool did; the engine reports these in its stats."""

    captured: int = 0
    capture_failures: int = 0
    capture_s: float = 0.0  # capture + instantiation, all graphs
    warmup_s: float = 0.0  # the eager warm-up runs before each capture
    replays: int = 0
    eager_fallbacks: int = 0  # dispatcher calls that ran the eager function

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


# --- the pool ------------------------------------------------------------------------------------


class GraphPool:
    """One memory pool, one side capture stream and the counters for all graphs of an engine.

    `capture_error_mode` is CUDA's stream-capture mode. "thread_local" (default) makes illegal
    calls of the capturing thread fail the capture but lets other threads work: the expert store's
    host-fill thread allocates pinned memory, which "global" mode would make fail *in that thread*
    while a capture is under way. `debug` and `record_events` are the defaults for this pool's
    graphs.
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        *,
        capture_error_mode: str = "thread_local",
        debug: bool = False,
        record_events: bool = False,
    ) -> None:
        if not graphs_available(device):
            raise ValueError(f"CUDA graphs need CUDA; device {device!r} has none")
        if capture_error_mode not in CAPTURE_ERROR_MODES:
            raise ValueError(f"capture_error_mode must be one of {CAPTURE_ERROR_MODES}")
        self.device = _cuda_device(device)
        self.capture_error_mode = capture_error_mode
        self.debug = debug
        self.record_events = record_events
        self.counters = GraphCounters()
        self.graphs: list[StaticGraph] = []  # in capture order
        # Graphs must be captured on a non-default stream; replays may go to any stream.
        self.stream = torch.cuda.Stream(device=self.device)
        self._lock = threading.Lock()  # one capture at a time: the pool registration is per capture
        self._bytes = 0
        self._free_events: list[torch.cuda.Event] = []
        self.handles: list[tuple[int, int]] = []  # every pool this object captured into
        self._finalizers: list[weakref.finalize] = []
        self._new_pool()

    def _new_pool(self) -> None:
        """Start capturing into a fresh allocator pool. Hold a reference on it for this object's
        life, so that a failed first capture (which drops its reference) cannot leave the pool
        dead for the next capture."""
        self.handle: tuple[int, int] = torch.cuda.graph_pool_handle()
        self.handles.append(self.handle)
        idx = self.device.index
        self._finalizer = None
        if _pool_incref(idx, self.handle):
            self._finalizer = weakref.finalize(self, _pool_release, idx, self.handle)
            self._finalizers.append(self._finalizer)

    def _abandon_capture(self) -> None:
        """After a failed capture: end its allocator registration if torch left it open, and
        drop the reference it took on the pool. The reference is only dropped while this object
        holds its own (else a failed first capture would leave a dead pool that the next capture
        trips over); without one it leaks and the pool's memory stays until the process ends."""
        idx = self.device.index
        if (
            _pool_end_allocate(idx, self.handle)
            and self._finalizer is not None
            and self._finalizer.alive
        ):
            _pool_release(idx, self.handle)
        # Measured on torch 2.11 (H200): after an invalidated capture the allocator still calls
        # the pool "already recording" even once its registration is ended, so a later capture
        # into it fails. Later graphs go to a fresh pool; earlier ones keep theirs.
        self._new_pool()

    # Construction of graphs.
    def graph(
        self,
        fn: Callable[[], T],
        *,
        name: str,
        inputs: Mapping[str, torch.Tensor] | None = None,
        debug: bool | None = None,
        record_events: bool | None = None,
    ) -> StaticGraph[T]:
        """A StaticGraph of this pool, not yet captured."""
        return StaticGraph(
            fn, self, name=name, inputs=inputs, debug=debug, record_events=record_events
        )

    def capture(
        self,
        fn: Callable[[], T],
        *,
        name: str,
        inputs: Mapping[str, torch.Tensor] | None = None,
        warmup: int = 2,
        debug: bool | None = None,
        record_events: bool | None = None,
    ) -> StaticGraph[T]:
        """Build and capture a graph; raises CaptureError (pool still usable) when it fails."""
        g = self.graph(fn, name=name, inputs=inputs, debug=debug, record_events=record_events)
        g.capture(warmup=warmup)
        return g

    # Memory.
    def pool_bytes(self) -> int:
        """Device memory the pool's captures took: the sum, over captures, of the growth of
        torch.cuda.memory_reserved() from just before capture_begin to just after capture_end
        (warm-up allocations are not in it: they go to the ordinary pool)."""
        return self._bytes

    def pool_bytes_exact(self) -> int:
        """The pool's segments as the allocator lists them now (torch.cuda.memory_snapshot):
        exact even while other threads allocate, but slow (walks every segment); for reports."""
        total = 0
        for seg in torch.cuda.memory_snapshot():
            if seg.get("device") not in (None, self.device.index):
                continue
            if tuple(seg.get("segment_pool_id", ())) in {tuple(h) for h in self.handles}:
                total += int(seg["total_size"])
        return total

    # Timing.
    def _event_pair(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        ev = self._free_events
        if len(ev) >= 2:
            return ev.pop(), ev.pop()
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def drain_times_ms(self) -> dict[str, list[float]]:
        """Per graph (by name), the GPU milliseconds of each replay since the last drain, for
        graphs with record_events. Waits for those replays to finish."""
        out: dict[str, list[float]] = {}
        for g in self.graphs:
            if g.pending_events:
                out[g.name] = g.drain_times_ms()
        return out

    def close(self) -> None:
        """Drop every graph of the pool and this object's reference on it; after the last graph
        object is gone, torch.cuda.empty_cache() returns the pool's memory to the driver. The
        pool's graphs (also those a GraphedStep holds) cannot replay afterwards."""
        for g in self.graphs:
            g.reset()
        self.graphs.clear()
        self._free_events.clear()
        for fin in self._finalizers:
            fin()


# --- one graph -----------------------------------------------------------------------------------


class StaticGraph(Generic[T]):
    """One captured segment: `fn()` over static buffers, replayed as one graph launch.

    `replay()` returns what `fn()` returned at capture (the same objects every time; tensors in
    it were allocated in the pool, see the module docstring for how long they stay valid).
    `inputs` names the static buffers fn reads; with `debug` every replay verifies they are still
    the captured buffers. With `record_events` each replay is bracketed by CUDA events
    (`drain_times_ms()` after the work finished); off, a replay costs one flag test more than
    torch's own `CUDAGraph.replay()`.
    """

    def __init__(
        self,
        fn: Callable[[], T],
        pool: GraphPool,
        *,
        name: str,
        inputs: Mapping[str, torch.Tensor] | None = None,
        debug: bool | None = None,
        record_events: bool | None = None,
    ) -> None:
        self.fn = fn
        self.pool = pool
        self.name = name
        self.inputs = StaticInputs(name, inputs)
        self.debug = pool.debug if debug is None else debug
        self.record_events = pool.record_events if record_events is None else record_events
        self.capture_s = 0.0
        self.warmup_s = 0.0
        self.pool_bytes = 0
        self.replays = 0
        self.pending_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: Any = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def capture(self, warmup: int = 2) -> None:
        """Warm up `fn` eagerly `warmup` times on the side stream, then capture it into the pool.

        Warm-up does the first-use work that may not happen during a capture: Triton autotuning
        and compilation (they launch and time kernels and sync), cuBLAS handle and workspace
        creation for the capture stream, lazy loading of CUDA modules. Raises CaptureError when
        the capture fails; the capture is then ended, and the stream and pool stay usable.
        """
        if self._graph is not None:
            raise RuntimeError(f"graph {self.name!r} is already captured")
        pool, dev = self.pool, self.pool.device
        for key, t in self.inputs.inputs.items():
            if isinstance(t, torch.Tensor) and t.device != dev:
                raise ValueError(
                    f"graph {self.name!r}: input {key!r} is on {t.device}, the pool on {dev}"
                )
        with pool._lock, torch.cuda.device(dev):
            caller = torch.cuda.current_stream(dev)
            side = pool.stream
            t0 = time.perf_counter()
            side.wait_stream(caller)  # the warm-up sees the caller's writes to the inputs
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.fn()
            caller.wait_stream(side)
            # Settle everything so the reserved-memory figure below is the capture's alone.
            torch.cuda.synchronize(dev)
            self.warmup_s = time.perf_counter() - t0
            self.inputs.record()

            reserved0 = torch.cuda.memory_reserved(dev)
            t0 = time.perf_counter()
            graph, out, err = self._capture_on(side)
            self.capture_s = time.perf_counter() - t0
            self.pool_bytes = torch.cuda.memory_reserved(dev) - reserved0
            pool._bytes += self.pool_bytes
            pool.counters.warmup_s += self.warmup_s
            pool.counters.capture_s += self.capture_s
            if err is not None:
                pool.counters.capture_failures += 1
                raise CaptureError(self.name, err) from err
            self._graph, self._out = graph, out
            pool.counters.captured += 1
            pool.graphs.append(self)

    def _capture_on(
        self, side: torch.cuda.Stream
    ) -> tuple[torch.cuda.CUDAGraph | None, Any, BaseException | None]:
        """Run fn under capture. Never leaves the stream capturing or the pool registered."""
        pool = self.pool
        graph = torch.cuda.CUDAGraph()
        out: Any = None
        err: BaseException | None = None
        with torch.cuda.stream(side):
            try:
                graph.capture_begin(pool=pool.handle, capture_error_mode=pool.capture_error_mode)
            except Exception as e:  # noqa: BLE001 - reported as CaptureError
                pool._abandon_capture()
                return None, None, e
            try:
                out = self.fn()
            except BaseException as e:  # noqa: BLE001 - the capture must end in every case
                err = e
        # capture_end on the capture stream even if fn left another stream current.
        with torch.cuda.stream(side):
            try:
                graph.capture_end()
            except Exception as e:  # noqa: BLE001
                err = err if err is not None else e
                # torch raised before ending the allocator registration of this capture (it
                # does when CUDA reports the capture invalidated).
                pool._abandon_capture()
            still = torch.cuda.is_current_stream_capturing()
        if still:  # not expected: CUDA ends a capture even when it reports it invalid
            err = RuntimeError(f"{err}; the capture stream is STILL capturing, CUDA is unusable")
        if err is not None:
            if not isinstance(err, Exception):  # KeyboardInterrupt and friends: not ours
                raise err
            try:
                torch.cuda.synchronize(pool.device)
            except Exception as e:  # noqa: BLE001
                err = RuntimeError(f"{err}; afterwards the device reports: {e}")
            return None, None, err
        return graph, out, None

    def check_inputs(self) -> None:
        """Raise StaleInputError if a declared input is no longer the captured buffer."""
        self.inputs.verify()

    def replay(self) -> T:
        """Launch the graph on the current stream; return the captured outputs."""
        graph = self._graph
        if graph is None:
            raise RuntimeError(f"graph {self.name!r} replayed without a successful capture")
        if self.debug:
            self.inputs.verify()
        if self.record_events:
            start, end = self.pool._event_pair()
            start.record()
            graph.replay()
            end.record()
            self.pending_events.append((start, end))
        else:
            graph.replay()
        self.replays += 1
        self.pool.counters.replays += 1
        return self._out

    def drain_times_ms(self) -> list[float]:
        """GPU milliseconds of each replay recorded since the last drain (needs record_events);
        waits for those replays to finish and recycles their events."""
        times = []
        for start, end in self.pending_events:
            end.synchronize()
            times.append(start.elapsed_time(end))
            self.pool._free_events += (start, end)
        self.pending_events.clear()
        return times

    def reset(self) -> None:
        """Drop the captured graph and its outputs (their memory returns to the pool)."""
        self._graph = None
        self._out = None
        self.pending_events.clear()


# --- the dispatcher ------------------------------------------------------------------------------


def _key_name(key: Hashable) -> str:
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


class GraphedStep:
    """Key -> captured graph, else the eager function.

    The runner registers one function per key (e.g. ("A", layer, T)), captures what it can, and
    calls `step(key)`: a replay when a graph exists for the key and the dispatcher is enabled,
    otherwise the same function eagerly, so the graph path equals the eager path by
    construction. Without a pool (CPU, or no CUDA) and with `enabled=False` everything runs
    eagerly; keys whose capture failed (non-strict) run eagerly too. Every eager call is counted
    (`counters.eager_fallbacks`, per key in `fallbacks`).
    """

    def __init__(self, pool: GraphPool | None, *, enabled: bool = True) -> None:
        self.pool = pool
        self.enabled = enabled
        self.counters = pool.counters if pool is not None else GraphCounters()
        self.fns: dict[Hashable, Callable[[], Any]] = {}
        self.inputs: dict[Hashable, Mapping[str, torch.Tensor] | None] = {}
        self.graphs: dict[Hashable, StaticGraph] = {}
        self.failures: dict[Hashable, CaptureError] = {}
        self.fallbacks: dict[Hashable, int] = {}

    def register(
        self,
        key: Hashable,
        fn: Callable[[], Any],
        *,
        inputs: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """The eager function of `key` (also what gets captured), and its declared inputs."""
        self.fns[key] = fn
        self.inputs[key] = inputs

    def capture(
        self,
        key: Hashable,
        *,
        warmup: int = 2,
        strict: bool = False,
        debug: bool | None = None,
        record_events: bool | None = None,
    ) -> bool:
        """Capture the registered function of `key`. Returns whether `key` now replays.

        Does nothing (False) without a pool or when disabled. A CaptureError is raised when
        `strict`, else logged and kept in `failures` (the key then runs eagerly)."""
        if self.pool is None or not self.enabled:
            return False
        if key in self.graphs:
            return True
        try:
            self.graphs[key] = self.pool.capture(
                self.fns[key],
                name=_key_name(key),
                inputs=self.inputs.get(key),
                warmup=warmup,
                debug=debug,
                record_events=record_events,
            )
        except CaptureError as e:
            self.failures[key] = e
            if strict:
                raise
            log.warning("%s\n(key %r runs eagerly)", e, key)
            return False
        return True

    def capture_all(self, *, warmup: int = 2, strict: bool = False) -> list[Hashable]:
        """Capture every registered key, in registration order (= replay order, see the module
        docstring). Returns the keys that will run eagerly."""
        return [k for k in list(self.fns) if not self.capture(k, warmup=warmup, strict=strict)]

    def can_run(self, key: Hashable) -> bool:
        """Whether `step(key)` would replay a graph."""
        return self.enabled and key in self.graphs

    def step(self, key: Hashable, eager: Callable[[], Any] | None = None) -> Any:
        """Replay `key`'s graph, or run `eager` (default: the registered function) eagerly."""
        if self.enabled:
            g = self.graphs.get(key)
            if g is not None:
                return g.replay()
        fn = eager if eager is not None else self.fns.get(key)
        if fn is None:
            raise KeyError(f"no function registered for {key!r} and no eager function given")
        self.counters.eager_fallbacks += 1
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1
        return fn()

    __call__ = step

    def drain_times_ms(self) -> dict[Hashable, list[float]]:
        """Per key, GPU ms of each replay since the last drain (graphs with record_events)."""
        return {k: g.drain_times_ms() for k, g in self.graphs.items() if g.pending_events}


# --- memory plan ---------------------------------------------------------------------------------


def measure_graph_pool_bytes(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str | int | None = None,
    warmup: int = 2,
    capture_error_mode: str = "thread_local",
) -> int:
    """Bytes a pool holding captures of `fns` (in this order) takes, measured by capturing them
    into a throwaway pool that is freed again (torch.cuda.empty_cache() at the end).

    For the memory plan: capture the segments of one layer (or all) at the shapes the engine will
    use and size the graph budget from the answer. The warm-up runs execute the functions, with
    their writes to static buffers. Raises CaptureError like GraphPool.capture.
    """
    pool = GraphPool(device, capture_error_mode=capture_error_mode)
    try:
        for name, fn in fns.items():
            pool.capture(fn, name=name, warmup=warmup)
        return pool.pool_bytes()
    finally:
        pool.close()
        del pool
        torch.cuda.empty_cache()
