"""`homeseek profile --decode`: where a decode token's time goes, per layer and per graph.

The runner reports each launched segment (a graph replay, or the same function run eagerly) and
each layer's scheduler work to a `DecodeRecorder`. On CUDA every segment is bracketed by CUDA
events on the compute stream and the expert store times its copies on the copy stream, so a
token's timeline is exact on the device: each segment's GPU time, the idle gap before it (the GPU
waiting for the host: launch, the layer's id read-back, the scheduler, copies), and how much of
the copies ran while compute did. On CPU the same report comes from host clocks.

Output: a table (slowest layers first), one JSON line, optionally a Chrome/Perfetto trace
(`--trace`, chrome://tracing or ui.perfetto.dev) and a stacked-bar chart (`--plot`, needs
matplotlib).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Segment:
    """One launched segment of one token; times in ms from the token's start."""

    name: str  # embed | A | E | B | H
    layer: int  # -1 for embed and head
    start: float = 0.0
    end: float = 0.0
    gap: float = 0.0  # idle time of the compute stream before it (since the previous segment)


@dataclass
class LayerStats:
    """One layer of one token (host side of the step between A and B)."""

    sched_ms: float = 0.0  # host time in the scheduler (read ids, residency, slot table)
    copy_ms: float = 0.0  # the copy stream's busy time for this layer's misses
    overlap_ms: float = 0.0  # of it, while the compute stream ran a segment
    misses: int = 0
    h2d_bytes: int = 0
    copies: list[tuple[float, float]] = field(default_factory=list)  # (start, end) ms


@dataclass
class TokenProfile:
    wall_ms: float
    segments: list[Segment]
    layers: dict[int, LayerStats]
    host_spans: list[tuple[str, int, float, float]]  # (what, layer, start, end) host ms


class DecodeRecorder:
    """Receives the runner's segments and scheduler spans for each decode token."""

    def __init__(self, cuda: bool, scheduler: Any) -> None:
        self.cuda = cuda
        self.scheduler = scheduler  # its host time; its store's counters and timed copy events
        self.store = scheduler.store
        self.tokens: list[TokenProfile] = []
        self._events: list[tuple[Segment, Any, Any]] = []

    # -- called by the runner --------------------------------------------------------------------
    def begin_token(self) -> None:
        self._t0 = time.perf_counter()
        self._segments: list[Segment] = []
        self._events = []
        self._layers: dict[int, LayerStats] = {}
        self._host: list[tuple[str, int, float, float]] = []
        if self.cuda:
            self.store.copy_events.clear()
            self._stream = torch.cuda.current_stream()  # once: each lookup costs host time
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record(self._stream)

    def _ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1000

    @contextlib.contextmanager
    def segment(self, key: Hashable, layer: int) -> Iterator[None]:
        name = key[0] if isinstance(key, tuple) else str(key)
        seg = Segment(str(name), layer)
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(self._stream)
            yield
            b.record(self._stream)
            self._events.append((seg, a, b))
        else:
            seg.start = self._ms()
            yield
            seg.end = self._ms()
        self._segments.append(seg)

    @contextlib.contextmanager
    def layer(self, layer: int) -> Iterator[None]:
        """Around the host's part of a layer between A and B (id read-back, the scheduler, the
        experts' launches)."""
        c0 = _counts(self.store)
        n_ev = len(self.store.copy_events) if self.cuda else 0
        sched0 = self.scheduler.host_s
        start = self._ms()
        yield
        st = self._layers.setdefault(layer, LayerStats())
        st.sched_ms += (self.scheduler.host_s - sched0) * 1000
        self._host.append(("between A and B", layer, start, self._ms()))
        c1 = _counts(self.store)
        st.misses += c1[0] - c0[0]
        st.h2d_bytes += c1[1] - c0[1]
        if self.cuda:
            st.copies += [(self._ref, a, b) for a, b in self.store.copy_events[n_ev:]]  # type: ignore[misc]

    def end_token(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for seg, a, b in self._events:
                seg.start, seg.end = self._ref.elapsed_time(a), self._ref.elapsed_time(b)
            for st in self._layers.values():
                st.copies = [(r.elapsed_time(a), r.elapsed_time(b)) for r, a, b in st.copies]
            self.store.copy_events.clear()
        prev = 0.0
        busy = sorted((s.start, s.end) for s in self._segments)
        for seg in sorted(self._segments, key=lambda s: s.start):
            seg.gap = max(0.0, seg.start - prev)
            prev = max(prev, seg.end)
        for st in self._layers.values():
            st.copy_ms = sum(b - a for a, b in st.copies)
            st.overlap_ms = sum(_overlap(a, b, busy) for a, b in st.copies)
        self.tokens.append(TokenProfile(self._ms(), self._segments, self._layers, self._host))


def _counts(store: Any) -> tuple[int, int]:
    c = store.counters
    return c.lookups - c.gpu_hits, c.bytes_h2d


def _overlap(a: float, b: float, busy: list[tuple[float, float]]) -> float:
    """Length of [a, b] covered by the (sorted) busy intervals."""
    total = 0.0
    for s, e in busy:
        lo, hi = max(a, s), min(b, e)
        if hi > lo:
            total += hi - lo
    return total


# --- the report ----------------------------------------------------------------------------------
def summarize(tokens: list[TokenProfile], kinds: list[str]) -> dict[str, Any]:
    """Per-layer means over the tokens, totals per token, the slowest layers first."""
    n = max(len(tokens), 1)
    rows: dict[int, dict[str, float]] = {}
    extra = {"embed_ms": 0.0, "head_ms": 0.0, "gap_ms": 0.0}
    for tok in tokens:
        for seg in tok.segments:
            dur = seg.end - seg.start
            extra["gap_ms"] += seg.gap / n
            if seg.layer < 0:
                extra["embed_ms" if seg.name == "embed" else "head_ms"] += dur / n
                continue
            r = rows.setdefault(seg.layer, _empty_row())
            if seg.name == "A":
                r["a_ms"] += dur / n
                r["gap_a_ms"] += seg.gap / n
            else:  # E and B: the layer's experts
                r["b_ms"] += dur / n
                r["gap_b_ms"] += seg.gap / n
        for layer, st in tok.layers.items():
            r = rows.setdefault(layer, _empty_row())
            r["sched_ms"] += st.sched_ms / n
            r["copy_ms"] += st.copy_ms / n
            r["overlap_ms"] += st.overlap_ms / n
            r["misses"] += st.misses / n
            r["h2d_MB"] += st.h2d_bytes / 1e6 / n
    layers = []
    for layer, r in sorted(rows.items()):
        r["total_ms"] = r["a_ms"] + r["b_ms"] + r["gap_a_ms"] + r["gap_b_ms"]
        layers.append(
            {"layer": layer, "kind": kinds[layer], **{k: round(v, 4) for k, v in r.items()}}
        )
    per_token = {
        "wall_ms": sum(t.wall_ms for t in tokens) / n,
        "gpu_ms": sum(r["a_ms"] + r["b_ms"] for r in rows.values())
        + extra["embed_ms"]
        + extra["head_ms"],
        **extra,
        **{k: sum(r[k] for r in rows.values()) for k in ("sched_ms", "copy_ms", "overlap_ms")},
        "misses": sum(r["misses"] for r in rows.values()),
        "h2d_MB": sum(r["h2d_MB"] for r in rows.values()),
    }
    return {
        "per_token": {k: round(v, 4) for k, v in per_token.items()},
        "layers": sorted(layers, key=lambda r: -r["total_ms"]),
    }


def _empty_row() -> dict[str, float]:
    keys = ("a_ms", "gap_a_ms", "b_ms", "gap_b_ms", "sched_ms", "copy_ms", "overlap_ms")
    return {**dict.fromkeys(keys, 0.0), "misses": 0.0, "h2d_MB": 0.0}


def table(summary: dict[str, Any], eager: dict[str, Any] | None, cuda: bool) -> list[str]:
    t = summary["per_token"]
    busy = "GPU" if cuda else "compute"
    lines = [
        f"per token: {t['wall_ms']:.2f} ms wall; {busy} {t['gpu_ms']:.2f} ms (embed "
        f"{t['embed_ms']:.2f}, head {t['head_ms']:.2f}), idle gaps {t['gap_ms']:.2f} ms, scheduler "
        f"{t['sched_ms']:.2f} ms, copies {t['copy_ms']:.2f} ms ({t['overlap_ms']:.2f} overlapped), "
        f"{t['misses']:.1f} misses, {t['h2d_MB']:.1f} MB H2D",
    ]
    eager_ms = {r["layer"]: r["total_ms"] for r in eager["layers"]} if eager else {}
    head = (
        f"{'layer':>5} {'kind':<4} {'A ms':>7} {'gap':>6} {'B ms':>7} {'gap':>6} {'sched':>6} "
        f"{'copy':>6} {'ovl':>6} {'miss':>5} {'MB':>7}"
    )
    lines.append(head + (f" {'eager':>7}" if eager else ""))
    for r in summary["layers"]:
        line = (
            f"{r['layer']:>5} {r['kind']:<4} {r['a_ms']:>7.3f} {r['gap_a_ms']:>6.3f} "
            f"{r['b_ms']:>7.3f} {r['gap_b_ms']:>6.3f} {r['sched_ms']:>6.3f} {r['copy_ms']:>6.3f} "
            f"{r['overlap_ms']:>6.3f} {r['misses']:>5.1f} {r['h2d_MB']:>7.1f}"
        )
        if eager:
            line += f" {eager_ms.get(r['layer'], float('nan')):>7.3f}"
        lines.append(line)
    return lines


def chrome_trace(tokens: list[TokenProfile]) -> dict[str, Any]:
    """Trace events (chrome://tracing, ui.perfetto.dev): compute segments, copies and host spans
    on separate tracks; tokens one after another."""
    ev: list[dict[str, Any]] = []
    names = {0: "compute stream", 1: "copy stream", 2: "host: scheduler"}
    for pid, name in names.items():
        ev.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}})
    base = 0.0
    for i, tok in enumerate(tokens):
        for s in tok.segments:
            label = s.name if s.layer < 0 else f"{s.name}{s.layer}"
            ev.append(_x(label, 0, base + s.start, s.end - s.start, token=i, gap_ms=s.gap))
        for layer, st in tok.layers.items():
            for a, b in st.copies:
                ev.append(_x(f"copy L{layer}", 1, base + a, b - a, token=i))
        for what, layer, a, b in tok.host_spans:
            ev.append(_x(f"{what} L{layer}", 2, base + a, b - a, token=i))
        base += tok.wall_ms
    return {"traceEvents": ev, "displayTimeUnit": "ms"}


def _x(name: str, pid: int, start_ms: float, dur_ms: float, **args: Any) -> dict[str, Any]:
    return {
        "name": name, "ph": "X", "pid": pid, "tid": 0, "ts": start_ms * 1000,
        "dur": max(dur_ms, 0.0) * 1000, "args": args,
    }  # fmt: skip


def plot(summary: dict[str, Any], path: str | Path) -> None:
    """Stacked bars per layer: A, B (GPU time), the idle gaps before them, copy time not
    overlapped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(summary["layers"], key=lambda r: r["layer"])
    x = [r["layer"] for r in rows]
    parts = [
        ("segment A", [r["a_ms"] for r in rows]),
        ("experts (E/B)", [r["b_ms"] for r in rows]),
        ("idle before A", [r["gap_a_ms"] for r in rows]),
        ("idle before B", [r["gap_b_ms"] for r in rows]),
    ]
    fig, ax = plt.subplots(figsize=(max(6, len(x) * 0.25), 4))
    bottom = [0.0] * len(x)
    for label, ys in parts:
        ax.bar(x, ys, bottom=bottom, label=label)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_xlabel("layer")
    ax.set_ylabel("ms per token")
    ax.set_title("where a decode token's time goes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class DecodeProfileConfig:
    tokens: int = 16  # decode tokens profiled (after warm-up)
    warmup: int = 3
    prompt: int = 32  # prompt tokens before decoding (sets the position)
    compare_eager: bool = False
    seed: int = 0


def profile_decode(
    eng: Any, pc: DecodeProfileConfig, out: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run pc.tokens decode tokens under the recorder (after warm-up); report and return the
    summary (graphs as loaded, and with compare_eager the same tokens run eagerly)."""
    cuda = str(eng.rt.device).startswith("cuda")
    g = torch.Generator().manual_seed(pc.seed)
    ids = torch.randint(0, eng.cfg.vocab_size, (pc.prompt,), generator=g).tolist()
    kinds = [eng.cfg.attn_kind(i) for i in eng.layers]
    runner, store = eng.runner, eng.experts

    def run(graphs: bool) -> tuple[dict[str, Any], list[TokenProfile]]:
        runner.graphs.enabled = graphs and runner.pool is not None
        sess = eng.session()
        try:
            sess.forward(ids, last_only=True)
            tok = ids[-1]
            for _ in range(pc.warmup):  # captures, compiles, first copies: not measured
                tok = int(sess.decode(tok).argmax())
            rec = DecodeRecorder(cuda, eng.scheduler)
            runner.recorder, store.time_copies = rec, cuda
            try:
                for _ in range(pc.tokens):
                    tok = int(sess.decode(tok).argmax())
            finally:
                runner.recorder, store.time_copies = None, False
                runner.graphs.enabled = runner.pool is not None
        finally:
            sess.close()
        return summarize(rec.tokens, kinds), rec.tokens

    graphs_on = runner.pool is not None
    summary, tokens = run(graphs_on)
    eager = run(False)[0] if pc.compare_eager else None
    stats = runner.graph_stats()
    out(
        f"decode profile: {pc.tokens} tokens at position {pc.prompt + pc.warmup}, "
        f"{'CUDA graphs' if graphs_on else 'eager'} on {eng.rt.device}; graphs captured "
        f"{stats['graphs_captured']:.0f} in {stats['graph_capture_s']:.1f} s (torch.compile "
        f"{stats['compile_s']:.1f} s), graph pool {stats['graph_pool_bytes'] / 2**20:.1f} MiB"
    )
    for line in table(summary, eager, cuda):
        out(line)
    result = {
        "profile": "decode",
        "device": str(eng.rt.device),
        "graphs": graphs_on,
        "config": asdict(pc),
        "graph_stats": stats,
        **summary,
        "eager": eager,
    }
    out(json.dumps(result))
    result["_tokens"] = tokens
    return result
