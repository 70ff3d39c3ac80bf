"""Where a prefill's time goes: wall time, GPU kernel time, H2D copy time and the host's ops.

Builds the engine as `homeseek bench` does (full-size synthetic V4-Flash on CUDA, the process
capped at --gpu-mem-gb), warms the kernels up, then for each prompt length runs one timed prefill
per combination of --copy-stores, --group-order, --load-order, --pinned, --switch-interval
and --host-reads values (in turn, one JSON line each: wall seconds, H2D bytes, the scan
threads' counters, the allocators' events), then, up to --profile-upto tokens, one under
torch.profiler with the first combination (the union of kernel intervals, i.e. GPU busy, the
union of H2D copy intervals, their overlap, the top kernels and the top host ops by own time,
a timeline window; one JSON line).

    python tools/prefill_profile.py --gpu-mem-gb 24 --prompts 256,4096
    python tools/prefill_profile.py --prompts 4096,16384 --copy-stores streaming,cached \
        --group-order a-first,chunks --profile-upto 0    # each combination in turn, one process
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from homeseek.bench import SCAN_THREAD as BG
from homeseek.bench import (
    allocator_counters,
    allocator_delta,
    annotation,
    build_engine,
    cap_process,
)
from homeseek.config import RuntimeConfig
from homeseek.experts import ExpertStore, Timeline
from homeseek.runner import SWITCH_INTERVAL


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in spans)


def _overlap(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    i = j = 0
    tot = 0.0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        tot += max(0.0, b - a)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return tot


def _cover(spans: list[tuple[float, float]], a: float, b: float) -> float:
    """Fraction of [a, b) the (merged) spans cover."""
    return sum(max(0.0, min(y, b) - max(x, a)) for x, y in spans) / (b - a)


# Host ranges the engine marks (torch.profiler.record_function): the main thread waiting for a
# layer's expert ids and for the background loads, the background thread's loads and the reads
# of the tier below (ranges of threads the profiler does not follow stay empty).
MARKS = ("hs::ids", "hs::join", "hs::copier", "hs::read")


def _timeline(kern, h2d, marks: dict[str, list], frac: tuple[float, float], step: float) -> None:
    """Print, per `step` seconds of a window of the run (fractions of its span), how much of it
    the GPU computed, the H2D copies ran and each marked host range was open (tenths, 0-9; '+'
    full)."""
    spans = kern + h2d
    t0, t1 = min(a for a, _ in spans), max(b for _, b in spans)
    a, b = t0 + frac[0] * (t1 - t0), t0 + frac[1] * (t1 - t0)
    print(f"\n== timeline {a - t0:.3f}-{b - t0:.3f} s, {step * 1e3:.0f} ms a row (tenths busy)")
    print("     t(s)  gpu h2d " + " ".join(m.removeprefix("hs::")[:8].rjust(8) for m in MARKS))
    x = a
    while x < b:
        cells = [_cover(kern, x, x + step), _cover(h2d, x, x + step)]
        cells += [_cover(marks.get(m, []), x, x + step) for m in MARKS]
        txt = ["+" if c >= 0.95 else str(int(c * 10)) for c in cells]
        print(f"  {x - t0:7.3f}  {txt[0]:>3} {txt[1]:>3} " + " ".join(t.rjust(8) for t in txt[2:]))
        x += step


def _layers(rows: list[tuple[str, int, float, float]], show: int) -> dict[str, float]:
    """Print the first `show` rows of a prefill's layer timeline (experts.Timeline) and where
    the copy stream stood idle between two loads -> the summary (seconds)."""
    print(f"\n== layer timeline (first {show} of {len(rows)} spans; ms since the prompt started)")
    for what, layer, a, b in rows[:show]:
        print(f"  {a * 1e3:9.1f} {b * 1e3:9.1f}  {what:<10} layer {layer}")
    copies = [r for r in rows if r[0] == "copies"]
    by_kind = {}  # (what, layer) -> the spans of that kind for that layer, in order
    for r in rows:
        by_kind.setdefault((r[0], r[1]), []).append(r)
    gaps = {"submitted late": 0.0, "queued late": 0.0, "queued, started late": 0.0}
    for prev, nxt in zip(copies, copies[1:], strict=False):
        gap = nxt[2] - prev[3]
        if gap <= 0:
            continue
        # the load of nxt's layer submitted / queued last before its copies started
        sub = [r for r in by_kind.get(("submit", nxt[1]), []) if r[2] <= nxt[2]]
        que = [r for r in by_kind.get(("queue", nxt[1]), []) if r[2] <= nxt[2]]
        if sub and sub[-1][2] > prev[3]:
            gaps["submitted late"] += gap
        elif que and que[-1][2] > prev[3]:
            gaps["queued late"] += gap
        else:
            gaps["queued, started late"] += gap
    busy = _length(_union([(a, b) for _, _, a, b in copies]))
    out = {"copy_busy_s": round(busy, 3), "copy_spans": len(copies)}
    out.update(
        {
            f"copy_idle_{k.replace(' ', '_').replace(',', '')}_s": round(v, 3)
            for k, v in gaps.items()
        }
    )
    print(
        "  copy stream between loads idle: " + ", ".join(f"{k} {v:.3f} s" for k, v in gaps.items())
    )
    return out


def _values(*allowed: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of some of `allowed`."""

    def parse(text: str) -> list[str]:
        out = text.split(",")
        if not set(out) <= set(allowed):
            raise argparse.ArgumentTypeError(f"takes a comma list of {', '.join(allowed)}")
        return out

    return parse


def _switch(ap: argparse.ArgumentParser, flag: str, values: tuple[str, str], what: str) -> None:
    """An A/B switch: a comma list of `values` (default the first, the engine's)."""
    ap.add_argument(
        flag, default=values[0], type=_values(*values),
        help=f"{what}; a comma list: each timed prompt runs once per value, in turn",
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default="flash")
    ap.add_argument("--gpu-mem-gb", type=float, default=24.0)
    ap.add_argument("--prompts", default="256,4096")
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--prefill-group", type=int, default=None, help="layer by layer in groups")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--expert-alias", type=int, default=64, help="0: every expert its own")
    ap.add_argument(
        "--model-layers", type=int, default=None,
        help="build only the preset's first N layers (a model the GPU holds whole)",
    )  # fmt: skip
    ap.add_argument(
        "--resident", action="store_true",
        help="every expert copied into the GPU pool before each prompt (not timed): the "
        "all-resident prefill",
    )  # fmt: skip
    ap.add_argument("--profile-upto", type=int, default=4096, help="profile prompts this long")
    ap.add_argument(
        "--layers", type=int, default=0,
        help="trace the timed runs' per-layer loads and print this many spans (0: no trace)",
    )  # fmt: skip
    ap.add_argument(
        "--timeline", default="0.45,0.52",
        help="window of each profiled prompt to print as a timeline (fractions of its span; "
        "'' for none)",
    )  # fmt: skip
    ap.add_argument("--timeline-step-ms", type=float, default=5.0)
    ap.add_argument(
        "--host-fill", default="spread", choices=("spread", "layers"),
        help="the host cache's fill order: the engine's (expert ids across the layers), or "
        "layer by layer as before session 14 (to measure the two on one machine)",
    )  # fmt: skip
    # A/B switches: each timed prompt runs once per value given, in turn (the first: the engine's)
    _switch(
        ap,
        "--copy-stores",
        ("streaming", "cached"),
        "the stores of the reads of the tier below: streaming (the engine's) or cached",
    )
    _switch(
        ap,
        "--load-order",
        ("hits-first", "reads-first"),
        "a scan's background load: hits-first (the engine's: the host-cache hits' copies "
        "queued before waiting for the layer's reads ahead) or reads-first",
    )
    _switch(
        ap,
        "--group-order",
        ("a-first", "chunks"),
        "a layer-by-layer group's order: a-first (the engine's: every chunk's A of a "
        "layer, then the chunks' experts) or chunks (chunk after chunk)",
    )
    _switch(
        ap,
        "--pinned",
        ("rings", "torch"),
        "prefill's small host<->device copies (chunk ids, slot tables): rings (the "
        "engine's: reused pinned buffers) or torch (a block of torch's pinned allocator "
        "each; slot-map updates keep their ring, sized for any update since session 16)",
    )
    _switch(
        ap,
        "--switch-interval",
        ("lowered", "python"),
        "the GIL's switch interval while a prefill step runs: lowered (the engine's, "
        "runner.SWITCH_INTERVAL) or python (Python's own, 5 ms by default)",
    )
    _switch(
        ap,
        "--host-reads",
        ("zero-copy", "copies"),
        "how the compute stream's kernels get the few bytes the host writes between them "
        "(slot-map updates, slot tables): zero-copy (the engine's: read in place from pinned "
        "memory) or copies (pinned -> device copies first, as before session 18); with "
        "--pinned torch the slot tables are copies either way",
    )
    args = ap.parse_args()
    stores, orders, loads, pins = args.copy_stores, args.group_order, args.load_order, args.pinned
    intervals, reads = args.switch_interval, args.host_reads
    if args.host_fill == "layers":
        fill = ExpertStore.start_host_fill

        def layer_by_layer(store: ExpertStore, order=None) -> None:  # noqa: ANN001
            E = store.cfg.n_routed_experts
            fill(store, order or [(layer, e) for layer in store.layers for e in range(E)])

        ExpertStore.start_host_fill = layer_by_layer
    prompts = [int(x) for x in args.prompts.split(",")]
    cap_process(args.device, args.gpu_mem_gb)
    rt = RuntimeConfig.build(
        device=args.device, dtype=torch.bfloat16, gpu_mem_gb=args.gpu_mem_gb,
        max_context=max(prompts) + 64, prefill_chunk=args.prefill_chunk, cpu_lane="off",
        prefill_group=args.prefill_group,
    )  # fmt: skip
    t0 = time.perf_counter()
    eng = build_engine(
        rt, None, args.synthetic, expert_alias=args.expert_alias or None, layers=args.model_layers
    )
    copier = getattr(eng.experts.copier, "__self__", None)  # the CPU kernel library's copy
    store = eng.experts
    if args.resident:  # refused now (the pool too small) rather than after the warm-up
        store.load_all()
    print(f"build {time.perf_counter() - t0:.1f} s; chunk {eng.rt.prefill_chunk}; "
          f"slots {store.n_slots} ({store.gpu.n_pinned} pinned)", flush=True)  # fmt: skip
    sess = eng.session()
    g = torch.Generator().manual_seed(0)
    sess.forward(torch.randint(0, eng.cfg.vocab_size, (64,), generator=g).tolist(), last_only=True)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    variants = [
        (st, order, load, pin, gil, zc)
        for st in stores
        for order in orders
        for load in loads
        for pin in pins
        for gil in intervals
        for zc in reads
    ]
    for n in prompts:
        ids = torch.randint(0, eng.cfg.vocab_size, (n,), generator=g).tolist()
        runs = [("timed", v) for v in variants]
        if n <= args.profile_upto:
            runs.append(("profiled", variants[0]))
        for run, (st, order, load, pin, gil, zc) in runs:
            if copier is not None:
                copier.stream_copies = st == "streaming"
            eng.runner.a_first = order == "a-first"
            store.hits_first = load == "hits-first"
            eng.scheduler.pinned_rings = pin == "rings"
            eng.runner.switch_interval = SWITCH_INTERVAL if gil == "lowered" else None
            store.zero_copy = zc == "zero-copy" and cuda
            res: dict[str, float | int | str] = {"tokens": n, "gpu_mem_gb": args.gpu_mem_gb}
            res["host_fill"] = args.host_fill
            res["copy_stores"] = st if copier is not None else "torch readers"
            res["group_order"] = order
            res["load_order"] = load
            res["pinned"] = pin
            res["switch_interval"] = gil
            res["host_reads"] = "zero-copy" if store.zero_copy else "copies"
            res["run"] = run
            sess.reset()
            eng.experts.reset_gpu()
            if args.resident:
                eng.experts.load_all()
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            c = eng.experts.counters
            c0, hh0, dl0 = c.bytes_h2d, c.host_hits, c.disk_loads
            bg0 = {k: getattr(c, k) for k in BG}
            h0 = eng.scheduler.host_s
            t0 = time.perf_counter()
            if run == "timed":
                tl = Timeline(eng.experts.copy_stream) if args.layers and cuda else None
                eng.experts.timeline = tl
                alloc0 = allocator_counters(cuda)
                t0 = time.perf_counter()
                try:
                    int(sess.forward(ids, last_only=True)[0].argmax())
                finally:
                    eng.experts.timeline = None
                wall = time.perf_counter() - t0
                if tl is not None:
                    res.update(_layers(tl.rows(), args.layers))
                res.update(
                    wall_s=round(wall, 3), tok_s=round(n / wall, 1),
                    h2d_GB=round((c.bytes_h2d - c0) / 1e9, 2), host_hits=c.host_hits - hh0,
                    below_host_reads=c.disk_loads - dl0,
                    scheduler_host_s=round(eng.scheduler.host_s - h0, 3),
                    **{k: round(getattr(c, k) - bg0[k], 3) for k in BG},
                    peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0,
                    allocator=allocator_delta(alloc0, cuda),
                )  # fmt: skip
                print(json.dumps(res), flush=True)
                continue
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                int(sess.forward(ids, last_only=True)[0].argmax())
                sync()
            res["profiled_wall_s"] = round(time.perf_counter() - t0, 3)
            kern, h2d = [], []
            marks: dict[str, list[tuple[float, float]]] = {}
            by_kernel: dict[str, list[float]] = {}
            for ev in prof.events():
                if ev.device_type == DeviceType.CUDA and annotation(ev):
                    continue  # the device-side twin of a marked host range: not a kernel
                if ev.device_type != DeviceType.CUDA:
                    if ev.name in MARKS:
                        span = (ev.time_range.start / 1e6, ev.time_range.end / 1e6)
                        marks.setdefault(ev.name, []).append(span)
                    continue
                span = (ev.time_range.start / 1e6, ev.time_range.end / 1e6)
                if ev.name.startswith(("Memcpy HtoD", "memcpy", "Memcpy")):
                    if "HtoD" in ev.name:
                        h2d.append(span)
                    continue
                if ev.name.startswith(("Memset", "memset")):
                    continue
                kern.append(span)
                a = by_kernel.setdefault(ev.name[:90], [0, 0.0])
                a[0] += 1
                a[1] += span[1] - span[0]
            ku, hu = _union(kern), _union(h2d)
            if args.timeline and ku:
                frac = tuple(float(v) for v in args.timeline.split(","))
                marks = {k: _union(v) for k, v in marks.items()}
                _timeline(ku, hu, marks, frac, args.timeline_step_ms / 1e3)
            res.update(
                kernels=len(kern), gpu_busy_s=round(_length(ku), 3),
                h2d_busy_s=round(_length(hu), 3), h2d_kernel_overlap_s=round(_overlap(ku, hu), 3),
            )  # fmt: skip
            print(f"\n== {n} tokens: top kernels (launches, s)")
            for name, (c, t) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[: args.top]:
                print(f"{t:9.4f} s {int(c):7d}  {name}")
            print(f"\n== {n} tokens: top host ops by own CPU time")
            print(
                prof.key_averages().table(
                    sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60
                )
            )
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
