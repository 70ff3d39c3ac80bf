"""The CPU lane: some of a decode layer's missed experts computed on the CPU (docs/runtime.md).

Under a small GPU budget a decode token misses most routed experts, and copying a 13.4 MB record
over PCIe (~25-55 GB/s) is the floor of a copy-only design. The host holds every expert already
and reads its RAM faster than that, so computing a missed expert for one token where it lies
(kernels/cpu_experts.c: FP4 x activations, multi-threaded) costs one read of its record and no
copy. Per layer the scheduler splits the misses between the two lanes so that both finish at
about the same time (`CpuLane.split`), from their measured rates and the copies already queued;
the CPU's sum joins the GPU's through one small copy before the layer's expert graph.

The lane's sum enters the GPU kernel as part of its fp32 shared-expert input, so a layer's
output is still rounded once; an expert computed on the CPU differs from the GPU's only in the
order of its fp32 sums (tests: the same greedy tokens with the lane on and off).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from homeseek.config import ConfigError, ModelConfig, default_cache_dir
from homeseek.experts import device_view
from homeseek.kernels import cpu_experts
from homeseek.kernels.handoff import MAX_POLLS, MIN_POLL_S

# The CPU kernel library is built once per machine into homeseek's cache (HOMESEEK_CACHE_DIR).
cpu_experts.cache_root = default_cache_dir

LANE_MODES = ("off", "on", "auto")
# Smoothing of the measured seconds per CPU expert (an exponential moving average).
EMA = 0.2
# Until measured: a read of the tier below the host cache (pageable RAM or the disk's page
# cache, read in pieces by the store's reader threads), bytes per second.
READ_RATE = 10e9
# GPU clock cycles of the spin kernel in front of each timed copy of `measure_h2d` (~5 ms).
SPIN_CYCLES = 10_000_000


def default_threads() -> int:
    """CPU threads for the lane: the cores this process may use but two (the decode loop and
    the copy issue)."""
    return max(1, cpu_experts.usable_cores() - 2)


def lane_status(mode: str, device: str) -> tuple[bool, str]:
    """Whether the lane runs for `--cpu-lane mode` on `device`, and why (for stats and doctor).
    'on' where it cannot run is a ConfigError that says why."""
    if mode not in LANE_MODES:
        raise ConfigError(f"cpu_lane must be one of {', '.join(LANE_MODES)}, got {mode!r}")
    if mode == "off":
        return False, "off"
    if not str(device).startswith("cuda"):
        if mode == "on":
            raise ConfigError(
                "cpu_lane='on' needs a CUDA device: on the CPU every expert is computed there "
                "anyway; use --cpu-lane off (or auto)"
            )
        return False, "not used on a CPU engine (every expert is computed there)"
    ok, why = cpu_experts.available()
    if not ok and mode == "on":
        raise ConfigError(f"cpu_lane='on': the CPU expert kernel cannot run here: {why}")
    return ok, "on" if ok else f"off ({why})"


@dataclass
class LaneCounters:
    experts: int = 0  # experts computed on the CPU
    calls: int = 0  # layers that sent any
    busy_s: float = 0.0  # wall seconds of the lane's calls
    copied: int = 0  # misses of layers that used the split, sent to the copy lane

    def as_dict(self) -> dict[str, float]:
        return {
            "cpu_lane_experts": float(self.experts),
            "cpu_lane_calls": float(self.calls),
            "cpu_lane_busy_s": self.busy_s,
            "cpu_lane_ms_per_expert": 1e3 * self.busy_s / self.experts if self.experts else 0.0,
        }


class CpuLane:
    """Owns the CPU expert kernel, one worker thread that calls it (the call releases the GIL),
    the lane's result buffers and the rates the split is decided from."""

    def __init__(
        self,
        cfg: ModelConfig,
        device: str,
        record_bytes: int,
        act_dtype: torch.dtype,
        act_quant: bool,
        threads: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.act_dtype, self.act_quant = act_dtype, act_quant
        self.kernel = cpu_experts.CpuExperts(threads=threads or default_threads())
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="homeseek-cpu-lane")
        self.record_bytes = record_bytes
        # Two pinned result rows, alternating: a layer's row may still be copying to the GPU
        # while the next layer's call writes the other.
        pin = torch.cuda.is_available()
        self.out = [
            torch.zeros(1, cfg.hidden_size, dtype=torch.float32, pin_memory=pin) for _ in range(2)
        ]
        self.out_ready: list[torch.cuda.Event | None] = [None, None]
        self.i = 0
        # The GPU hand-off (`handoff`, homeseek/kernels/handoff.py): each result row's flag,
        # set to the job's sequence number once its sum is written, and device views of both.
        self.flag = torch.zeros(2, dtype=torch.int32, pin_memory=pin)
        self._flag_np = self.flag.numpy()
        self.seq = 0  # of the job submitted last
        # Set when a job ended later after its submission than a GPU hand-off's wait is sure to
        # last (its kernel may have given up and passed NaN on): `Runner` raises then.
        self.handoff_late = False
        self._views = (
            [(device_view(self.flag[j : j + 1], device), device_view(o, device)) for j, o in
             enumerate(self.out)]
            if pin and str(device).startswith("cuda") else None
        )  # fmt: skip
        self.h2d_rate = measure_h2d(device, record_bytes)  # bytes/s of one record's copy
        self.read_rate = READ_RATE
        self.t_cpu: float | None = None  # seconds per expert on the lane (measured)
        self.copy_free_at = 0.0  # perf_counter time the copy lane is expected to be idle
        # Tests and experiments: send this share of every layer's misses to the CPU instead of
        # splitting by the measured rates (None: by the rates).
        self.fixed_share: float | None = None
        self.counters = LaneCounters()
        self._lock = threading.Lock()

    @property
    def threads(self) -> int:
        return self.kernel.threads

    # -- the split ---------------------------------------------------------------------------------
    def copy_cost(self, below: bool) -> float:
        """Seconds a miss adds to the copy lane (a read of the tier below first, if there)."""
        t = self.record_bytes / self.h2d_rate
        return t + self.record_bytes / self.read_rate if below else t

    def split(self, misses: Sequence[tuple[int, bool]]) -> list[int]:
        """misses: (expert, lies below the host cache) -> the experts to compute on the CPU,
        chosen so that the two lanes finish together: move the dearest copies to the CPU while
        that lowers the later of the two finish times."""
        order = sorted(misses, key=lambda m: -self.copy_cost(m[1]))
        if self.fixed_share is not None:
            return [e for e, _ in order[: round(self.fixed_share * len(order))]]
        t_cpu = self.t_cpu if self.t_cpu is not None else self.copy_cost(False)
        backlog = max(0.0, self.copy_free_at - time.perf_counter())
        copy_t = backlog + sum(self.copy_cost(b) for _, b in order)
        cpu_t, cpu = 0.0, []
        for e, below in order:
            c = self.copy_cost(below)
            if max(cpu_t + t_cpu, copy_t - c) >= max(cpu_t, copy_t):
                break
            cpu.append(e)
            cpu_t += t_cpu
            copy_t -= c
        return cpu

    def note_copies(self, n_host: int, n_below: int) -> None:
        """n misses went to the copy lane: it is busy that much longer."""
        now = time.perf_counter()
        cost = n_host * self.copy_cost(False) + n_below * self.copy_cost(True)
        self.copy_free_at = max(now, self.copy_free_at) + cost

    # -- the work ----------------------------------------------------------------------------------
    def submit(
        self,
        x: torch.Tensor,
        route_w: torch.Tensor,
        records: list[dict[str, list[torch.Tensor]]],
    ) -> Future[torch.Tensor]:
        """Start sum_j expert_j(x) * route_w[:, j] on the worker -> a future of the pinned fp32
        result [T, D] (valid until the call after next). x [T, D] and route_w [T, n] must stay
        unchanged until the future is done."""
        i = self.i = 1 - self.i
        out = self.out[i][: x.shape[0]]
        ev = self.out_ready[i]
        if ev is not None:  # the copy of this buffer two layers ago has left
            ev.synchronize()
        limit, aq, adt = self.cfg.swiglu_limit, self.act_quant, self.act_dtype
        seq = self.seq = self.seq % (2**31 - 1) + 1  # never 0, the flags' first value
        flag = self._flag_np
        t_submit = time.perf_counter()

        def call() -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                self.kernel.run(x, route_w, records, limit, aq, adt, out=out)
            finally:  # also when it failed: a GPU hand-off waiting for it goes on
                flag[i] = seq
                if time.perf_counter() - t_submit > MAX_POLLS * MIN_POLL_S:
                    self.handoff_late = True
            dt = time.perf_counter() - t0
            with self._lock:
                per = dt / len(records)
                self.t_cpu = per if self.t_cpu is None else (1 - EMA) * self.t_cpu + EMA * per
                self.counters.experts += len(records)
                self.counters.calls += 1
                self.counters.busy_s += dt
            return out

        return self.worker.submit(call)

    def handoff(self) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The job submitted last, for a hand-off on the GPU (`ops.await_copy`): (device view of
        its flag [1] int32, the value the flag takes once its sum is written, device view of
        that sum [1, D] fp32). Call `sent` once the kernel that reads them is queued."""
        if self._views is None:
            raise RuntimeError("the GPU hand-off needs the lane's pinned buffers (CUDA)")
        flag, out = self._views[self.i]
        return flag, self.seq, out

    def sent(self, stream: torch.cuda.Stream | None) -> None:
        """The current result's copy to the GPU is queued on `stream`."""
        if stream is None:
            return
        ev = self.out_ready[self.i] or torch.cuda.Event()
        ev.record(stream)
        self.out_ready[self.i] = ev

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        self.kernel.close()


def measure_h2d(device: str, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a pinned host -> device copy of one record (the copy lane's rate):
    the fastest of `repeats` copies, each timed on the device behind a short spin kernel.

    Events time the device's timeline from start to end, so a host thread stalled between
    queueing them counts its stall as copy time. Another thread allocating pinned memory stalls
    it (each allocation holds the driver): measured while the engine pinned its host tier, an
    H200 read 0.011-0.029 GB/s and the lane took every miss. The engine measures before that
    starts; the spin holds the stream until the host has queued the copy (short stalls), and
    the fastest repeat drops a stall that outlasted it."""
    if not str(device).startswith("cuda"):
        return float("inf")
    with torch.cuda.device(device):  # the spin, the events and the copy on one device's stream
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=True)  # first touch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(repeats):
            torch.cuda._sleep(SPIN_CYCLES)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / max(best, 1e-6)


def measure_read_bandwidth(nbytes: int = 1 << 30, threads: int | None = None) -> float:
    """Bytes per second this host reads RAM with the lane's thread count (a sum over a buffer
    larger than the caches): the rate the lane's kernel is measured against."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        buf.sum()  # first touch
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            buf.sum()
        return reps * buf.numel() * 4 / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
