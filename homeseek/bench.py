"""`homeseek bench`: the whole model's speed, against ceilings measured in the same run.

Builds the model (a checkpoint, or the full V4-Flash dimensions with random weights in memory),
caps the process at the GPU budget the way a 24 GB card would, measures the ceilings of this
machine (pinned host->device copies of expert records, HBM read, bf16 matmul), then per routing
mode runs prompts (TTFT, prefill tok/s) and decode (tok/s, median ms/token, at a short and a long
position) with the expert traffic and the split of a token's time between GPU work and host
time. Prints a table and ends with one JSON line.

Ceiling of a decode token = its H2D bytes / H2D bandwidth + the bytes it reads from HBM (dense
weights, head, the experts it uses) / HBM read bandwidth: what the hardware needs if nothing else
costs time and copies do not overlap compute. Prefill adds the matmul floor: H2D time +
max(HBM time, FLOPs / bf16 matmul rate).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from homeseek import plan
from homeseek.config import PRESETS, ConfigError, ModelConfig, RuntimeConfig
from homeseek.experts import MARKER_PREFIX, record_bytes

GiB = plan.GiB
# Warm-up prefills (the grouped prefill kernels; short prompts take the decode kernels at M <= 16,
# compiled per token count), then 3 decode steps. Excluded from every figure.
WARMUP_PROMPT = 64
# Untimed tokens before the decode after the longest prompt, at most (as many as the shortest
# prompt, whose decode row it is compared with, put through the pool first)
LONG_DECODE_WARM = 16


@dataclass(frozen=True)
class BenchConfig:
    """What one `homeseek bench` run measures."""

    model: str | None = None  # checkpoint dir or preset on disk; None: `synthetic`
    synthetic: str | None = "flash"  # preset built in memory with random weights
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    gpu_mem_gb: float | None = 24.0  # engine budget and process cap (CUDA)
    host_mem_gb: float | None = None  # pinned host budget (None: the default rule)
    expert_alias: int | None = 64  # synthetic: distinct host expert records
    routings: tuple[str, ...] = ("model",)  # model | uniform | trace:PATH
    prompts: tuple[int, ...] = (8, 512, 4096, 16384)
    decode_tokens: int = 64
    long_decode_tokens: int = 16  # decode after the longest prompt (after LONG_DECODE_WARM)
    profile_tokens: int = 2  # decode tokens run under the profiler (kernels, GPU busy)
    seed: int = 0
    graphs: bool | None = None  # CUDA graphs for decode (None: on for CUDA)
    context: int | None = None  # max_context of the engine (None: what the work needs)
    # Speculative decoding with this many drafts: after the plain short-position decode, the
    # same tokens again with the MTP block's drafts, then with forced drafts kept at these rates
    # (random weights make the MTP block's own acceptance ~0, so those rows show the payoff).
    mtp: int = 0
    mtp_forced: tuple[float, ...] = (0.5, 0.7, 0.9)
    # The CPU lane's modes to decode with (homeseek/cpu_lane.py), one engine: "off" rows are
    # the copy-only decode the lane (with the next-layer prefetch) is measured against.
    cpu_lanes: tuple[str, ...] = ("auto",)
    cpu_threads: int | None = None
    # The next-layer prefetch's settings to decode with. One setting: the "off" lane rows are
    # the copy-only baseline without it; several: every lane mode with each, and the baseline
    # is the row with neither.
    prefetch: tuple[bool, ...] = (True,)
    prefill_group: int | None = None  # tokens prefilled layer by layer (None: the engine's default)
    # Synthetic: only the preset's first `layers` main layers (None: all). A model that fits the
    # device whole where the full one does not (V4-Flash's experts and dense weights are 156 GB):
    # its rows measure every expert resident, and the whole model's per-token times are about
    # (the preset's layers / `layers`) times theirs.
    layers: int | None = None
    # Every expert copied into the GPU pool before each routing mode's rows (and again after
    # each reset to a cold pool): the all-resident rows. Needs a budget whose pool holds them.
    resident: bool = False

    @property
    def layers_of_preset(self) -> int | None:
        """With `layers`: the synthetic preset's own number of main layers."""
        if self.layers is None or self.synthetic is None:
            return None
        return PRESETS[self.synthetic]().num_hidden_layers

    def __post_init__(self) -> None:
        if (self.model is None) == (self.synthetic is None):
            raise ConfigError("bench: give exactly one of a model or a synthetic preset")
        if self.synthetic is not None and self.synthetic not in PRESETS:
            raise ConfigError(f"--synthetic {self.synthetic!r}: choose one of {sorted(PRESETS)}")
        if not self.prompts or min(self.prompts) < 1:
            raise ConfigError(f"--prompts must be positive token counts, got {self.prompts}")
        if self.decode_tokens < 2 or self.long_decode_tokens < 0 or self.profile_tokens < 0:
            raise ConfigError("--decode-tokens must be >= 2; the other counts >= 0")
        if not 0 <= self.mtp <= 3:
            raise ConfigError(f"--mtp must be 0 to 3 drafts, got {self.mtp}")
        pf = self.prefetch
        if not isinstance(pf, tuple) or not pf or any(not isinstance(p, bool) for p in pf):
            raise ConfigError(f"--prefetch: one or more of on/off, got {self.prefetch!r}")
        if any(not 0 <= r <= 1 for r in self.mtp_forced):
            raise ConfigError(f"forced acceptance rates must be in [0, 1], got {self.mtp_forced}")
        if self.layers is not None:
            if self.synthetic is None:
                raise ConfigError("--layers cuts a synthetic preset: not with --model")
            full = self.layers_of_preset
            if not 1 <= self.layers <= full:
                raise ConfigError(
                    f"--layers must be 1..{full} for {self.synthetic}, got {self.layers}"
                )
        if self.expert_alias is not None and self.expert_alias < 1:
            raise ConfigError(f"--expert-alias must be >= 1, got {self.expert_alias}")
        if not self.cpu_lanes or any(m not in ("auto", "on", "off") for m in self.cpu_lanes):
            raise ConfigError(f"--cpu-lane: comma-separated auto, on, off; got {self.cpu_lanes}")
        for r in self.routings:
            if r not in ("model", "uniform") and not r.startswith("trace:"):
                raise ConfigError(f"--routing {r!r}: model, uniform (or --routing-trace FILE)")
            if r.startswith("trace:") and not Path(r.removeprefix("trace:")).is_file():
                raise ConfigError(f"--routing-trace {r.removeprefix('trace:')}: no such file")

    @property
    def max_context(self) -> int:
        longest = max(*self.prompts, WARMUP_PROMPT)
        long = LONG_DECODE_WARM + self.long_decode_tokens if self.long_decode_tokens else 0
        need = longest + max(self.decode_tokens, long) + 16
        if self.context is not None:
            if self.context < need:
                raise ConfigError(f"--max-context {self.context}: the work needs {need} tokens")
            return self.context
        return need


# --- ceilings ------------------------------------------------------------------------------------
def cuda_ms(fn: Callable[[], Any], reps: int = 5) -> float:
    """Median ms of fn() on the current stream, after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _wall_ms(fn: Callable[[], Any], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_ceilings(cfg: ModelConfig, device: str) -> dict[str, float]:
    """This machine's ceilings, measured now: GB/s of pinned host->device copies of expert-sized
    records (the copy lane's path), GB/s of an HBM (CPU: RAM) read, bf16 matmul TFLOP/s."""
    rec = record_bytes(cfg)
    if str(device).startswith("cuda"):
        n = max(1, min(64, (1 << 30) // rec))  # ~1 GiB of records
        src = torch.empty((n, rec), dtype=torch.uint8, pin_memory=True)
        src.random_(0, 256)
        dst = torch.empty((n, rec), dtype=torch.uint8, device=device)

        def copy() -> None:
            for i in range(n):
                dst[i].copy_(src[i], non_blocking=True)

        h2d_ms = cuda_ms(copy)
        del src, dst
        big = torch.randn(1 << 29, dtype=torch.bfloat16, device=device)  # 1 GiB
        read_ms = cuda_ms(lambda: torch.sum(big, dtype=torch.float32))
        del big
        m = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
        mm_ms = cuda_ms(lambda: m @ m)
        del m
        torch.cuda.empty_cache()
        return {
            "h2d_GBps": round(n * rec / (h2d_ms * 1e-3) / 1e9, 2),
            "hbm_read_GBps": round((1 << 30) / (read_ms * 1e-3) / 1e9, 1),
            "matmul_TFLOPs": round(2 * 8192**3 / (mm_ms * 1e-3) / 1e12, 1),
        }
    big = torch.randn(1 << 26, dtype=torch.float32)  # 256 MiB of RAM
    read_ms = _wall_ms(lambda: torch.sum(big))
    m = torch.randn(1024, 1024, dtype=torch.float32)
    mm_ms = _wall_ms(lambda: m @ m)
    return {
        "h2d_GBps": 0.0,  # the CPU engine copies nothing: its experts are where it computes
        "hbm_read_GBps": round(big.nbytes / (read_ms * 1e-3) / 1e9, 1),
        "matmul_TFLOPs": round(2 * 1024**3 / (mm_ms * 1e-3) / 1e12, 3),
    }


def dense_read_bytes(cfg: ModelConfig) -> int:
    """Bytes of non-expert weights one token reads from GPU memory: every dense weight and the
    head, but one row of the embedding."""
    embed = cfg.vocab_size * cfg.hidden_size * 2
    return plan.dense_bytes(cfg) - embed + cfg.hidden_size * 2


def active_params(cfg: ModelConfig) -> int:
    """Multiply-accumulates per token in the linears: dense linears, head, K routed experts and
    the shared expert per layer (attention scores are left out: the floor stays a floor)."""
    from homeseek.checkpoint import tensor_table

    total = 0
    for name, spec in tensor_table(cfg).items():
        if ".experts." in name or name.startswith("mtp.") or name == "embed.weight":
            continue
        if name.endswith(".weight") and len(spec.shape) == 2:
            total += spec.shape[0] * spec.shape[1]
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total + cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert


# --- one measurement ----------------------------------------------------------------------------
@dataclass
class Row:
    """One measured piece of work (a prefill, or a decode run) under one routing mode."""

    routing: str
    work: str  # "prefill" | "decode"
    tokens: int  # prompt tokens, or decode tokens timed
    position: int  # sequence position the work starts at
    seconds: float = 0.0
    tok_s: float = 0.0
    ttft_s: float | None = None
    ms_per_token_median: float | None = None
    expert_lookups_per_token: float = 0.0
    gpu_hit_rate: float = 0.0
    host_hits_per_token: float = 0.0
    disk_reads_per_token: float = 0.0
    h2d_bytes_per_token: float = 0.0
    h2d_GBps: float | None = None  # achieved: bytes / copy-lane busy time
    disk_GBps: float | None = None
    hbm_bytes_per_token: float = 0.0
    ceiling_ms_per_token: float = 0.0
    pct_of_ceiling: float = 0.0
    peak_gpu_gib: float | None = None
    peak_reserved_gib: float | None = None  # the caching allocator's, allocated or kept
    kernels_per_token: float | None = None
    gpu_busy_ms_per_token: float | None = None
    host_ms_per_token: float | None = None
    gpu_busy_pct: float | None = None  # GPU busy time / wall time of a token
    h2d_plus_gpu_ms: float | None = None  # H2D time of the misses + GPU busy time, per token
    pct_of_h2d_plus_gpu: float | None = None
    # the profiled token's largest kernels: (name, launches per token, ms per token)
    top_kernels: list[tuple[str, float, float]] | None = None
    # speculative decoding rows: "mtp" (the MTP block drafts) or "forced NN%" (test drafts)
    drafts: str | None = None
    mtp_acceptance: float | None = None
    mtp_tokens_per_step: float | None = None
    # decode rows: the CPU lane's mode ("off": copy-only) and the experts it computed per token
    cpu_lane: str | None = None
    cpu_experts_per_token: float | None = None
    prefetch: bool | None = None  # decode rows: the next-layer prefetch on
    # decode's next-layer prediction: share of predicted experts the layer chose, and the
    # bytes per token copied for predicted experts it did not choose
    prediction_accuracy: float | None = None
    prefetch_wasted_MB_per_token: float | None = None
    # prefill rows: where the scan's background thread spent its seconds (experts.Counters:
    # bg_busy_s, of which bg_issue_s queueing copies and scan_read_s reading; await_s waiting
    # for a host slot's copy to leave) and the host's main thread in the scheduler (scheduler_s:
    # reading each layer's ids, which waits for the GPU, and joining the loads)
    scan_thread_s: dict[str, float] | None = None
    # the allocators' events during the row (`allocator_counters`): each retry or sync drains
    # every stream
    allocator: dict[str, int] | None = None
    error: str | None = None


# The CUDA caching allocator's counters, per phase: a cudaMalloc at the budget's edge frees the
# cached blocks and retries, and the free synchronizes every stream (the compute stream then waits
# for the copies queued on the copy stream); so does, by CUDA's rules, a pinned host allocation
# (torch's host allocator grows when the blocks it has are still in flight).
ALLOCATOR = {
    "alloc_retries": "num_alloc_retries",
    "alloc_syncs": "num_sync_all_streams",
    "device_allocs": "num_device_alloc",
    "device_frees": "num_device_free",
}


def allocator_counters(cuda: bool) -> dict[str, int]:
    """The allocators' event counters now (empty off CUDA): ALLOCATOR's, and pinned host blocks
    created (`host_pinned_allocs`, where this torch reports them)."""
    if not cuda:
        return {}
    st = torch.cuda.memory_stats()
    out = {k: int(st.get(v, 0)) for k, v in ALLOCATOR.items()}
    host = getattr(torch.cuda, "host_memory_stats", None)
    if host is not None:
        with contextlib.suppress(Exception):  # a torch without the host allocator's stats
            out["host_pinned_allocs"] = int(host().get("num_host_alloc", 0))
    return out


def allocator_delta(before: dict[str, int], cuda: bool) -> dict[str, int] | None:
    """allocator_counters since `before` (None off CUDA)."""
    if not cuda:
        return None
    now = allocator_counters(cuda)
    return {k: v - before.get(k, 0) for k, v in now.items()}


def device_events(
    fn: Callable[[], Any], cuda: bool, copies: bool = False
) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of what fn runs, in start order, from torch.profiler. CUDA: the
    device's kernels (memcpy/memset too with `copies`), not the marked host ranges; CPU: the
    top-level aten ops (the CPU engine's "kernels")."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings():  # one profiling cycle: its "clears events" warning is moot
        warnings.simplefilter("ignore", UserWarning)
        with profile(activities=acts) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
    evs = []
    for ev in prof.events():
        if cuda:
            # a host range marked with record_function (experts.marker) also appears as a
            # device-side "user annotation" spanning the kernels under it: not a kernel
            if ev.device_type != DeviceType.CUDA or annotation(ev):
                continue
            if not copies and ev.name.startswith(("Memcpy", "Memset", "memcpy", "memset")):
                continue
        else:
            if not ev.name.startswith("aten::") or ev.cpu_parent is not None:
                continue
        evs.append((ev.time_range.start, ev.time_range.end, ev.name))
    return sorted(evs)


def _gpu_profile(
    fn: Callable[[], Any], cuda: bool, top: int = 12
) -> tuple[int, float, list[tuple[str, int, float]]]:
    """(kernels launched, ms the device was busy, the `top` kernel names by total time as
    (name, launches, ms)) while fn runs (device_events without copies).

    CUDA: busy time is the union of the kernels' intervals over all streams. CPU: the top-level
    aten ops and their summed time, so the host share is what Python spends between them."""
    spans = []
    by_name: dict[str, list[float]] = {}
    for start, end, name in device_events(fn, cuda):
        spans.append((start, end))
        agg = by_name.setdefault(name[:80], [0, 0.0])
        agg[0] += 1
        agg[1] += (end - start) / 1000
    spans.sort()
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # union of intervals (us)
        if a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return len(spans), busy / 1000, [(n, int(c), round(t, 3)) for n, (c, t) in ranked]


# The expert store's counters of a scan's background thread (prefill rows' scan_thread_s).
SCAN_THREAD = ("bg_busy_s", "bg_issue_s", "scan_read_s", "await_s")


def annotation(ev: Any) -> bool:
    """Whether a profiler event is a marked range (experts.marker), not a kernel."""
    return bool(getattr(ev, "is_user_annotation", False)) or ev.name.startswith(MARKER_PREFIX)


def cap_process(device: str, gpu_mem_gb: float | None) -> float | None:
    """Cap this process at the GPU budget: an overrun then fails as on a card of that size.
    Returns the memory fraction set (None: CPU, or no budget)."""
    if not str(device).startswith("cuda") or gpu_mem_gb is None:
        return None
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    frac = min(1.0, gpu_mem_gb * GiB / total)
    torch.cuda.set_per_process_memory_fraction(frac, index)
    return frac


def synthetic_config(name: str, layers: int | None = None) -> ModelConfig:
    """A preset's config, cut to its first `layers` main layers (its MTP block kept)."""
    cfg = PRESETS[name]()
    if layers is None or layers == cfg.num_hidden_layers:
        return cfg
    n = cfg.num_hidden_layers
    ratios = cfg.compress_ratios[:layers] + cfg.compress_ratios[n:]
    return replace(cfg, num_hidden_layers=layers, compress_ratios=ratios)


def build_engine(
    rt: RuntimeConfig,
    model: str | None,
    synthetic: str | None,
    seed: int = 0,
    expert_alias: int | None = None,
    layers: int | None = None,
):  # noqa: ANN201 - homeseek.engine.Engine (imported late)
    """The engine of a measurement: a checkpoint (`model`), or a preset built in memory with
    random weights (`synthetic`, its first `layers` layers, experts aliased onto `expert_alias`
    host records); the host tier filled as far as it will get before anything is timed."""
    from homeseek.engine import Engine, resolve_model
    from homeseek.synthetic import SyntheticSource

    if synthetic is not None:
        src = SyntheticSource(
            synthetic_config(synthetic, layers), seed=seed, device=rt.device,
            expert_alias=expert_alias,
        )  # fmt: skip
    else:
        src = resolve_model(model)
    eng = Engine(src, rt, progress=True)
    eng.experts.join_host_fill()
    return eng


class Bench:
    """One process: the ceilings, the engine, then every routing mode's work."""

    def __init__(self, bc: BenchConfig, out: Callable[[str], None] = print) -> None:
        self.bc, self.out = bc, out
        self.cuda = str(bc.device).startswith("cuda")
        self.rows: list[Row] = []

    # -- setup -----------------------------------------------------------------------------------
    def _engine(self):  # noqa: ANN202 - homeseek.engine.Engine (imported late)
        bc = self.bc
        lanes = set(bc.cpu_lanes)
        lane = "on" if "on" in lanes else ("auto" if lanes - {"off"} else "off")
        rt = RuntimeConfig.build(
            device=bc.device,
            dtype=bc.dtype,
            gpu_mem_gb=bc.gpu_mem_gb,
            host_mem_gb=bc.host_mem_gb,
            max_context=bc.max_context,
            graphs=bc.graphs,
            mtp=bc.mtp,
            # One engine serves every lane mode asked for: built with the lane when any row
            # wants it ("on" if any row insists), the "off" rows unset it while they run.
            cpu_lane=lane,
            cpu_threads=bc.cpu_threads,
            prefetch=any(bc.prefetch),
            prefill_group=bc.prefill_group,
        )
        return build_engine(rt, bc.model, bc.synthetic, bc.seed, bc.expert_alias, bc.layers)

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        bc = self.bc
        frac = cap_process(bc.device, bc.gpu_mem_gb)
        t0 = time.perf_counter()
        if bc.synthetic is not None:
            cfg0 = synthetic_config(bc.synthetic, bc.layers)
        else:
            from homeseek.engine import resolve_model

            cfg0 = ModelConfig.from_file(resolve_model(bc.model) / "config.json")
        self.ceil = measure_ceilings(cfg0, bc.device)
        eng = self._engine()
        t_build = time.perf_counter() - t0
        self.eng, self.cfg = eng, eng.cfg
        # (label, the lane or None) per lane mode asked for: "off" unsets the engine's lane
        # while its rows run; "on"/"auto" use it, labelled "off" where it could not start.
        lane = eng.scheduler.lane
        labels = ["off" if m == "off" or lane is None else "on" for m in bc.cpu_lanes]
        # "off" first: the copy-only row is printed before the rows put against it
        labels = sorted(dict.fromkeys(labels), key=lambda m: m != "off")
        self.lanes = [(m, None if m == "off" else lane) for m in labels]
        # Each decode mode: (lane label, the lane or None, prefetch on). One prefetch setting
        # and "off" asked for: that row is the copy-only baseline, without the next-layer
        # prefetch either (a lane that could not start is labelled "off" too: its rows keep the
        # prefetch). Prefetch off first: the baseline row is printed before the rows put
        # against it.
        pf = tuple(sorted(set(bc.prefetch)))
        copy_only = len(pf) == 1 and "off" in bc.cpu_lanes
        self.modes = [
            (m, ln, p and not (copy_only and m == "off")) for m, ln in self.lanes for p in pf
        ]
        store = eng.experts
        n_total = len(eng.layers) * eng.cfg.n_routed_experts
        filled = store.n_host - (len(store.hostres.free) if store.hostres else 0)
        self.setup = {
            "build_s": round(t_build, 1),
            "process_mem_fraction": frac,
            "experts_total": n_total,
            "gpu_slots": store.n_slots,
            "gpu_share": store.n_slots / n_total,
            "host_records": filled,
            "host_share": filled / n_total,
            "below_host_share": max(0.0, 1 - (store.n_slots + filled) / n_total),
            "record_bytes": record_bytes(eng.cfg),
            "dense_read_bytes": dense_read_bytes(eng.cfg),
            "active_params": active_params(eng.cfg),
        }
        if bc.resident:  # refused before the warm-up's minutes, not after
            cut = " or cut --layers" if bc.synthetic is not None else ""
            store.check_holds_all(f"--resident: raise --gpu-mem-gb{cut}")
        self._print_header()
        t0 = time.perf_counter()
        self._warmup()
        self.setup["warmup_s"] = round(time.perf_counter() - t0, 1)
        self.out(f"warm-up {self.setup['warmup_s']:.1f} s (compiling and first passes; untimed)")
        for routing in bc.routings:
            self._run_routing(routing)
        return self._report()

    def _warmup(self) -> None:
        """Compile the kernels for prefill and decode; excluded from every figure."""
        sess = self.eng.session()
        ids = self._ids(WARMUP_PROMPT + 3, -1)
        sess.forward(ids[:WARMUP_PROMPT], last_only=True)
        for t in ids[WARMUP_PROMPT:]:
            sess.decode(t)
        full = self.eng.rt.prefill_chunk
        chunk = min(max(self.bc.prompts), full)
        # Each prompt length shorter than a chunk once: in a fresh process the first prompt of
        # a new size took 0.75-1.1 s more on the H200 and later ones of that size nothing
        # (session 16; consistent with Triton compiling the prefill kernels per size class,
        # whose on-disk cache then serves later processes), which is no prompt's steady cost.
        # Then one full chunk of the longest prompt: its first pass at that many rows compiles
        # and probes the prefill kernels for the shape (~1.6 s of a 4K prompt's TTFT, session
        # 11).
        # (A prompt longer than a chunk ends with a shorter one: its length is warmed too.)
        lengths = {n % full if n > full else n for n in self.bc.prompts} | {chunk}
        lengths -= {0, WARMUP_PROMPT}  # nothing, and the pass above
        warm = [ids[:n] if n < WARMUP_PROMPT else self._ids(n, -3) for n in sorted(lengths)]
        for prompt in warm:  # the full chunk last
            sess.reset()
            try:
                sess.forward(prompt, last_only=True)
            except torch.OutOfMemoryError:  # the prompts' own rows will say so
                self._sync()
                torch.cuda.empty_cache()
        self._sync()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _snap(self) -> tuple[Any, float]:
        import dataclasses

        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.eng.experts.copy_busy_s()  # drop what an earlier phase recorded
        self._pred0 = dataclasses.replace(self.eng.scheduler.predicted)
        self._alloc0 = allocator_counters(self.cuda)
        return dataclasses.replace(self.eng.experts.counters), time.perf_counter()

    def _fill(self, row: Row, c0: Any, n_tok: int, h2d_busy: float) -> None:
        """Expert traffic of the phase since c0, per token, and its ceiling."""
        row.allocator = allocator_delta(self._alloc0, self.cuda)
        c = self.eng.experts.counters
        rec = self.setup["record_bytes"]
        lookups = c.lookups - c0.lookups
        row.expert_lookups_per_token = lookups / n_tok
        row.gpu_hit_rate = (c.gpu_hits - c0.gpu_hits) / max(lookups, 1)
        row.host_hits_per_token = (c.host_hits - c0.host_hits) / n_tok
        row.disk_reads_per_token = (c.disk_loads - c0.disk_loads) / n_tok
        if row.cpu_lane is not None:
            row.cpu_experts_per_token = (c.cpu_lane - c0.cpu_lane) / n_tok
        p, p0 = self.eng.scheduler.predicted, self._pred0
        if p.predicted > p0.predicted:
            row.prediction_accuracy = (p.correct - p0.correct) / (p.predicted - p0.predicted)
            wasted = (p.copied - p0.copied) - (p.copied_used - p0.copied_used)
            row.prefetch_wasted_MB_per_token = wasted * rec / n_tok / 1e6
        h2d = c.bytes_h2d - c0.bytes_h2d
        row.h2d_bytes_per_token = h2d / n_tok
        row.h2d_GBps = round(h2d / h2d_busy / 1e9, 2) if h2d_busy > 0 and h2d else None
        disk_s = c.disk_s - c0.disk_s
        disk = c.bytes_disk - c0.bytes_disk
        row.disk_GBps = round(disk / disk_s / 1e9, 2) if disk_s > 0 and disk else None
        if self.cuda:
            row.peak_gpu_gib = round(torch.cuda.max_memory_allocated() / GiB, 2)
            row.peak_reserved_gib = round(torch.cuda.max_memory_reserved() / GiB, 2)
        chunks = -(-row.tokens // self.eng.rt.prefill_chunk) if row.work == "prefill" else n_tok
        hbm = chunks * self.setup["dense_read_bytes"] + lookups * rec
        row.hbm_bytes_per_token = hbm / n_tok
        ce = self.ceil
        h2d_s = h2d / (ce["h2d_GBps"] * 1e9) if ce["h2d_GBps"] else 0.0
        hbm_s = hbm / (ce["hbm_read_GBps"] * 1e9)
        if row.work == "prefill":
            flop_s = 2 * self.setup["active_params"] * row.tokens / (ce["matmul_TFLOPs"] * 1e12)
            hbm_s = max(hbm_s, flop_s)
        row.ceiling_ms_per_token = (h2d_s + hbm_s) / n_tok * 1000

    def _fresh_pool(self) -> None:
        """Forget the slot pool; with `resident`, copy every expert back into it."""
        self.eng.experts.reset_gpu()
        if self.bc.resident:
            self.eng.experts.load_all()

    def _ids(self, n: int, salt: int) -> list[int]:
        g = torch.Generator().manual_seed(self.bc.seed * 7919 + salt)
        return torch.randint(0, self.cfg.vocab_size, (n,), generator=g).tolist()

    def _run_routing(self, routing: str) -> None:
        from homeseek.scheduler import make_routing

        bc, eng = self.bc, self.eng
        self._fresh_pool()  # every mode starts with a cold (or an all-resident) slot pool
        eng.scheduler.routing = make_routing(routing, eng.cfg, seed=bc.seed)
        eng.experts.time_copies = True
        sess = eng.session()
        prompts = sorted(set(bc.prompts))
        try:
            for i, n in enumerate(tqdm(prompts, desc=f"bench {routing}", unit="prompt")):
                sess.reset()
                if self._prefill(routing, sess, n).error is not None:
                    continue
                if i == 0:  # decode at a short position, profiled, once per lane mode
                    several = len(self.modes) > 1
                    snap = sess.snapshot() if bc.mtp or several else None
                    for j, (mode, lane, pf) in enumerate(self.modes):
                        if j:  # the same tokens from the same state
                            sess.rollback(snap)
                        if several or bc.mtp:  # and every row from a cold pool
                            self._fresh_pool()
                        eng.scheduler.lane = lane
                        eng.scheduler.prefetch = pf
                        self._decode(
                            routing, sess, bc.decode_tokens, profile=True, lane=mode, prefetch=pf
                        )
                    # the prompts' prefetch (a scan's next layer) as the engine was built
                    eng.scheduler.prefetch = any(bc.prefetch)
                    if bc.mtp:
                        self._decode_mtp(routing, sess, snap)
                elif i == len(prompts) - 1 and bc.long_decode_tokens:  # after the longest
                    # in the mode the short-position rows ended with
                    mode, lane, pf = self.modes[-1]
                    eng.scheduler.lane, eng.scheduler.prefetch = lane, pf
                    # The pool as the short-position row found it, so that the two rows differ
                    # by the position alone (#13: position 16K within 10 % of 512): a long
                    # prompt leaves the pool holding its last layers' experts (hit rate ~14 % at
                    # 16K, session 19). So a cold pool, then as many untimed tokens as the short
                    # row's prompt put through it (one when the short rows each started cold),
                    # the first capturing the new bucket's graphs.
                    self._fresh_pool()
                    cold = len(self.modes) > 1 or bc.mtp
                    self._decode(
                        routing,
                        sess,
                        bc.long_decode_tokens,
                        profile=False,
                        lane=mode,
                        prefetch=pf,
                        warm=1 if cold else min(prompts[0], LONG_DECODE_WARM),
                    )
        finally:
            eng.experts.time_copies = False
            eng.scheduler.routing = None
            eng.scheduler.lane = self.lanes[-1][1]
            eng.scheduler.prefetch = any(bc.prefetch)

    def _prefill(self, routing: str, sess: Any, n: int) -> Row:
        row = Row(routing, "prefill", n, sess.pos)
        ids = self._ids(n, n)
        c0, t0 = self._snap()
        h0 = self.eng.scheduler.host_s
        try:
            logits = sess.forward(ids, last_only=True)
            int(logits[0].argmax())  # the first token reaches the host: TTFT
        except torch.OutOfMemoryError as e:
            row.error = _oom(e)
            self._sync()
            torch.cuda.empty_cache()
            self._add(row)
            return row
        dt = time.perf_counter() - t0
        row.seconds = dt
        row.ttft_s = dt
        row.tok_s = n / dt
        self._fill(row, c0, n, self.eng.experts.copy_busy_s())
        row.pct_of_ceiling = 100 * row.ceiling_ms_per_token * n / (dt * 1000)
        c = self.eng.experts.counters
        row.scan_thread_s = {k: getattr(c, k) - getattr(c0, k) for k in SCAN_THREAD}
        row.scan_thread_s["scheduler_s"] = self.eng.scheduler.host_s - h0
        self._add(row)
        return row

    def _decode(
        self,
        routing: str,
        sess: Any,
        n: int,
        profile: bool,
        lane: str | None = None,
        warm: int = 0,
        prefetch: bool | None = None,
    ) -> Row:
        """n decode tokens from the session's position, timed, after `warm` untimed ones (the
        first token at a new position bucket captures that bucket's graphs: seconds, which would
        otherwise count as decode time)."""
        tok = self._ids(1, sess.pos)[0]
        times = []
        self.plain_tokens: list[int] = []  # what the forced drafts of the MTP rows propose
        try:
            for _ in range(warm):
                tok = int(sess.decode(tok).argmax())
        except torch.OutOfMemoryError as e:
            row = Row(
                routing, "decode", n, sess.pos, cpu_lane=lane, prefetch=prefetch, error=_oom(e)
            )
            self._add(row)
            return row
        row = Row(routing, "decode", n, sess.pos, cpu_lane=lane, prefetch=prefetch)
        c0, t_all = self._snap()
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                tok = int(sess.decode(tok).argmax())  # sampling's one read per token
                times.append(time.perf_counter() - t0)
                self.plain_tokens.append(tok)
        except torch.OutOfMemoryError as e:
            row.error = _oom(e)
            self._add(row)
            return row
        row.seconds = time.perf_counter() - t_all
        row.tok_s = n / row.seconds
        med = statistics.median(times)
        row.ms_per_token_median = med * 1000
        self._fill(row, c0, n, self.eng.experts.copy_busy_s())
        row.pct_of_ceiling = 100 * row.ceiling_ms_per_token / row.ms_per_token_median
        if profile and self.bc.profile_tokens:
            k = self.bc.profile_tokens

            def steps() -> None:
                nonlocal tok
                for _ in range(k):
                    tok = int(sess.decode(tok).argmax())

            kernels, busy, top = _gpu_profile(steps, self.cuda)
            row.top_kernels = [(n, c / k, t / k) for n, c, t in top]
            row.kernels_per_token = kernels / k
            row.gpu_busy_ms_per_token = busy / k
            row.host_ms_per_token = max(0.0, row.ms_per_token_median - busy / k)
            row.gpu_busy_pct = 100 * busy / k / row.ms_per_token_median
            # The issue's yardstick for a capped card: the misses' H2D time at the measured
            # bandwidth plus the GPU time of the token's kernels (what an all-resident run costs).
            bw = self.ceil["h2d_GBps"]
            h2d_ms = row.h2d_bytes_per_token / (bw * 1e9) * 1000 if bw else 0.0
            row.h2d_plus_gpu_ms = h2d_ms + busy / k
            row.pct_of_h2d_plus_gpu = 100 * row.h2d_plus_gpu_ms / row.ms_per_token_median
        self._add(row)
        return row

    def _decode_mtp(self, routing: str, sess: Any, snap: tuple) -> None:
        """As many tokens as the plain decode, from the same state and a cold pool as it,
        speculatively: with the MTP block's drafts, then with each draft kept at each rate of
        bc.mtp_forced whatever the model says (`speculative.ForcedAcceptance`: the speed at that
        acceptance; random weights accept few of the block's drafts, and their near-tied logits
        make the verify step disagree with any known continuation)."""
        from homeseek import speculative
        from homeseek.sampling import Sampler, SamplingParams

        bc, n = self.bc, len(self.plain_tokens)
        rates: list[float | None] = [None, *bc.mtp_forced]  # None: the MTP block's drafts
        for rate in rates:
            sess.rollback(snap)
            self._fresh_pool()  # from a cold pool, as the plain row
            if rate is None:
                label, source = "mtp", speculative.MtpDrafts()
            else:
                label = f"forced {100 * rate:.0f}%"
                source = speculative.ForcedAcceptance(rate, self.cfg.vocab_size, bc.seed)
            row = Row(routing, "decode", n, sess.pos, drafts=label)
            sampler = Sampler(SamplingParams(temperature=0), self.bc.device)
            tok = self._ids(1, sess.pos)[0]
            produced = drafted = accepted = steps = 0
            c0, t0 = self._snap()
            try:
                while produced < n:
                    st = speculative.step(sess, tok, min(bc.mtp, n - produced), sampler, source)
                    produced += len(st.tokens)
                    drafted, accepted, steps = (
                        drafted + st.drafted,
                        accepted + st.accepted,
                        steps + 1,
                    )
                    tok = st.tokens[-1]
            except torch.OutOfMemoryError as e:
                row.error = _oom(e)
                self._add(row)
                continue
            row.seconds = time.perf_counter() - t0
            row.tokens = produced
            row.tok_s = produced / row.seconds
            self._fill(row, c0, produced, self.eng.experts.copy_busy_s())
            row.pct_of_ceiling = 100 * row.ceiling_ms_per_token * produced / (row.seconds * 1000)
            row.mtp_acceptance = accepted / drafted if drafted else 0.0
            row.mtp_tokens_per_step = produced / steps if steps else 0.0
            self._add(row)

    # -- output ----------------------------------------------------------------------------------
    def _print_header(self) -> None:
        bc, s, ce = self.bc, self.setup, self.ceil
        dev = torch.cuda.get_device_name(torch.device(bc.device)) if self.cuda else _cpu_name()
        what = f"synthetic {bc.synthetic} (random weights, built in memory)"
        if bc.model is not None:
            what = str(bc.model)
        self.out(f"homeseek bench - {dev}; torch {torch.__version__}; commit {_commit()}")
        self.out(
            f"model: {what}; {self.cfg.num_hidden_layers} layers, {s['experts_total']} routed "
            f"experts of {s['record_bytes'] / 2**20:.2f} MiB; built in {s['build_s']:.0f} s"
        )
        full = bc.layers_of_preset
        if full is not None:
            self.out(
                f"only the first {bc.layers} of the preset's {full} layers: the whole model's "
                f"per-token times are about {full / bc.layers:.3f}x these rows'"
            )
        if bc.resident:
            self.out(
                "every expert resident: copied into the GPU pool before each mode's rows "
                "(their H2D is 0; the rows measure the GPU and the host only)"
            )
        if bc.synthetic is not None and bc.expert_alias:
            self.out(
                f"experts aliased onto {min(bc.expert_alias, self.cfg.n_routed_experts)} host "
                "records (routing stays real; every copy still moves a full record)"
            )
        if not self.cuda:
            gpu = "none (CPU engine)"
        else:
            gpu = f"{bc.gpu_mem_gb:.1f} GiB (process capped)" if bc.gpu_mem_gb else "all free"
        self.out(
            f"budget: GPU {gpu}; slot pool {s['gpu_slots']} experts ({s['gpu_share']:.1%}); "
            f"pinned host tier {s['host_records']} ({s['host_share']:.1%}); "
            f"{s['below_host_share']:.1%} only in the tier below"
        )
        self.out(
            f"ceilings (measured now): H2D {ce['h2d_GBps']:.1f} GB/s (pinned expert records), "
            f"{'HBM' if self.cuda else 'RAM'} read {ce['hbm_read_GBps']:.0f} GB/s, "
            f"matmul {ce['matmul_TFLOPs']:.3g} TFLOP/s"
        )
        rt = self.eng.rt
        group = f", layer by layer in groups of {rt.prefill_group}" if rt.prefill_group else ""
        self.out(
            f"mode: decode {'as CUDA graphs' if rt.graphs else 'eager'}, prefill eager in "
            f"{rt.prefill_chunk}-token chunks{group}; max_context {rt.max_context}; each "
            "chunk length the prompts need prefilled once before the rows (kernel compilation "
            "not timed)"
        )
        self.out(
            f"{'routing':<8} {'work':<22} {'tok/s':>8} {'ms/tok':>8} {'TTFT s':>7} "
            f"{'hit%':>5} {'H2D MB/t':>9} {'H2D GB/s':>8} {'ceil ms/t':>9} {'%ceil':>6} "
            f"{'peak GiB':>8}"
        )

    def _add(self, row: Row) -> None:
        self.rows.append(row)
        work = f"{row.work} {row.tokens}" + (f" @{row.position}" if row.work == "decode" else "")
        if row.drafts:
            work += f" {row.drafts}"
        if row.cpu_lane is not None and len(self.modes) > 1:
            work += " cpu" if row.cpu_lane == "on" else " copy"
            work += "+pf" if row.prefetch and len({m[2] for m in self.modes}) > 1 else ""
        if row.error:
            self.out(f"{row.routing:<8} {work:<22} {row.error}")
            return

        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        ms = row.ms_per_token_median
        self.out(
            f"{row.routing:<8} {work:<22} {row.tok_s:>8.2f} {f(ms, '8.1f'):>8} "
            f"{f(row.ttft_s, '7.2f'):>7} {100 * row.gpu_hit_rate:>5.1f} "
            f"{row.h2d_bytes_per_token / 1e6:>9.1f} {f(row.h2d_GBps, '8.1f'):>8} "
            f"{row.ceiling_ms_per_token:>9.2f} {row.pct_of_ceiling:>6.1f} "
            f"{f(row.peak_gpu_gib, '8.2f'):>8}"
        )
        if row.kernels_per_token is not None:
            self.out(
                f"{'':<8} {'':<22} per token: {row.kernels_per_token:.0f} kernels, "
                f"{'GPU' if self.cuda else 'op'} busy {row.gpu_busy_ms_per_token:.1f} ms, "
                f"host {row.host_ms_per_token:.1f} ms (GPU busy {row.gpu_busy_pct:.0f}% of the "
                f"token; H2D + GPU {row.h2d_plus_gpu_ms:.1f} ms = "
                f"{row.pct_of_h2d_plus_gpu:.0f}% of it); {row.expert_lookups_per_token:.0f} "
                f"expert lookups ({row.host_hits_per_token:.1f} from pinned host, "
                f"{row.disk_reads_per_token:.1f} from below)"
            )
            for name, n, ms in (row.top_kernels or [])[:8]:
                self.out(f"{'':<8} {'':<22}   {ms:6.2f} ms {n:6.0f}x  {name[:60]}")
        al = row.allocator
        drains = ("alloc_retries", "alloc_syncs", "host_pinned_allocs")
        if al and any(al.get(k) for k in drains):
            self.out(
                f"{'':<8} {'':<22} allocators: {al.get('alloc_retries', 0)} cudaMalloc retries, "
                f"{al.get('alloc_syncs', 0)} syncs of all streams, {al.get('device_allocs', 0)} "
                f"device allocations, {al.get('host_pinned_allocs', '?')} pinned host blocks"
            )
        bg = row.scan_thread_s
        if bg and bg["bg_busy_s"] > 0:
            self.out(
                f"{'':<8} {'':<22} scan thread: busy {bg['bg_busy_s']:.2f} s (queueing copies "
                f"{bg['bg_issue_s']:.2f} s, reading {bg['scan_read_s']:.2f} s); host slot waits "
                f"{bg['await_s']:.2f} s; main thread in the scheduler {bg['scheduler_s']:.2f} s"
            )
        if row.cpu_lane == "on" or (row.prefetch and row.work == "decode"):
            base = self._copy_only(row)
            vs = f"{row.tok_s / base.tok_s:.2f}x the copy-only decode" if base else ""
            if row.cpu_lane == "on":
                lane = f"CPU lane: {row.cpu_experts_per_token:.1f} experts per token"
                vs = f"{lane}; {vs}" if vs else lane
            if vs:
                self.out(f"{'':<8} {'':<22} {vs}")
        if row.prediction_accuracy is not None and row.work == "decode":
            self.out(
                f"{'':<8} {'':<22} next-layer prediction: {100 * row.prediction_accuracy:.0f}% "
                f"of predicted experts chosen; {row.prefetch_wasted_MB_per_token:.1f} MB/token "
                "copied for wrong guesses"
            )
        if row.mtp_acceptance is not None:
            self.out(
                f"{'':<8} {'':<22} drafts kept {100 * row.mtp_acceptance:.0f}%, "
                f"{row.mtp_tokens_per_step:.2f} tokens per verify step"
            )

    def _copy_only(self, row: Row) -> Row | None:
        """The copy-only decode row (lane and prefetch off, no error) of a decode row's routing
        and position."""
        want = ("off", False, row.routing, row.position, None)
        for r in self.rows:
            if (r.cpu_lane, r.prefetch, r.routing, r.position, r.error) == want:
                return r
        return None

    def _report(self) -> dict[str, Any]:
        bc = self.bc
        res = {
            "bench": "homeseek",
            "device": torch.cuda.get_device_name(torch.device(bc.device))
            if self.cuda
            else _cpu_name(),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "commit": _commit(),
            "python": platform.python_version(),
            "model": bc.model or f"synthetic:{bc.synthetic}",
            "expert_alias": bc.expert_alias if bc.synthetic else None,
            "layers_of_preset": bc.layers_of_preset,
            "resident": bc.resident,
            "gpu_mem_gb": bc.gpu_mem_gb,
            "host_mem_gb": bc.host_mem_gb,
            "max_context": bc.max_context,
            "modes": ["graphs" if self.eng.rt.graphs else "eager"],
            "graphs": self.eng.runner.graph_stats(),
            "ceilings": self.ceil,
            "cpu_lane": self.eng.lane_status,
            **self.setup,
            "rows": [asdict(r) for r in self.rows],
        }
        lane = self.eng.scheduler.lane
        if lane is not None:
            counters = lane.counters.as_dict()
            res["cpu_lane_counters"] = counters
            res["cpu_lane_h2d_GBps"] = lane.h2d_rate / 1e9
            # The lane's kernel in decode against this host's RAM read rate with its threads,
            # measured now (after the rows: nothing else runs)
            from homeseek.cpu_lane import measure_read_bandwidth

            read = measure_read_bandwidth(1 << 30, lane.threads) / 1e9
            res["host_read_GBps"] = read
            per = counters["cpu_lane_ms_per_expert"] / 1e3
            if per > 0:
                res["cpu_lane_GBps"] = self.setup["record_bytes"] / per / 1e9
                self.out(
                    f"CPU lane kernel in decode: {res['cpu_lane_GBps']:.1f} GB/s per expert "
                    f"against this host's RAM read {read:.0f} GB/s with {lane.threads} threads "
                    f"({100 * res['cpu_lane_GBps'] / read:.0f} %)"
                )
        res["prefetch"] = self.eng.scheduler.predicted.as_dict(self.setup["record_bytes"])
        # over the copy-only row: keyed by routing for the lane with the prefetch (#18's
        # yardstick), by routing and mode for the other modes asked for
        speedup = {}
        for on in self.rows:
            if (
                on.work != "decode"
                or on.error
                or on.drafts
                or (on.cpu_lane, on.prefetch)
                in (
                    ("off", False),
                    (None, None),
                )
            ):
                continue
            off = self._copy_only(on)
            if off is not None:
                key = on.routing
                if not (on.cpu_lane == "on" and on.prefetch):
                    key += f" lane {on.cpu_lane} prefetch {'on' if on.prefetch else 'off'}"
                speedup.setdefault(key, on.tok_s / off.tok_s)
        if speedup:
            res["cpu_lane_speedup"] = speedup
        # #13's check: decode after the longest prompt against decode at the short position, in
        # the same lane mode (median ms per token, long / short)
        ratio = {}
        for r in self.rows:
            if r.work != "decode" or r.drafts or r.error or r.ms_per_token_median is None:
                continue
            short = next(
                (
                    q
                    for q in self.rows
                    if q.work == "decode"
                    and q.routing == r.routing
                    and q.cpu_lane == r.cpu_lane
                    and q.prefetch == r.prefetch
                    and not q.drafts
                    and not q.error
                    and q.position < r.position
                ),
                None,
            )
            if short is not None and short.ms_per_token_median:
                ratio[f"{r.routing}@{r.position}"] = (
                    r.ms_per_token_median / short.ms_per_token_median
                )
        if ratio:
            res["long_position_ratio"] = ratio
        self.out(json.dumps(_rounded(res)))
        return res


def _oom(e: BaseException) -> str:
    """The allocator's message without its advice: what it tried, and against what limit."""
    msg = str(e).splitlines()[0]
    tried = msg.split(". GPU")[0].removeprefix("CUDA out of memory. ")
    allowed = re.search(r"([\d.]+ \w+) allowed", msg)
    return f"out of GPU memory ({tried}" + (f"; {allowed[1]} allowed)" if allowed else ")")


def _rounded(o: Any) -> Any:
    """Floats to 4 significant decimals for the JSON line (the table has the readable ones)."""
    if isinstance(o, float):
        return float(f"{o:.4g}") if abs(o) < 1e4 else round(o, 1)
    if isinstance(o, dict):
        return {k: _rounded(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_rounded(v) for v in o]
    return o


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _commit() -> str:
    """The checkout's commit ("-dirty" when the tree differs from it), and a digest of the
    engine's own source files, which names the code that ran even in a copied tree."""
    here = Path(__file__).resolve().parent
    src = sorted(here.glob("*.py")) + sorted(here.glob("kernels/*.py"))
    src += sorted(here.glob("graphs/*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in src)).hexdigest()[:10]
    try:
        r = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
        rev = r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    return f"{rev or 'unknown'} src:{digest}"


def main(bc: BenchConfig) -> int:
    Bench(bc, out=tqdm.write).run()  # lines above the progress bars, never through them
    sys.stdout.flush()
    return 0
