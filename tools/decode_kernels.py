"""Every kernel of one decode token, in launch order, and the totals per kernel name.

Builds the engine as `homeseek bench` does (a synthetic preset with random weights, cut to its
first --layers layers so a large budget can hold every expert), copies every expert into the GPU
pool with --resident, decodes warm tokens, times --tokens more without the profiler, then runs
one under torch.profiler and prints its device events: start (us from the token's first
kernel), the gap before each and its duration, then per name: launches, kernel time and the gaps
before them (what a fused or removed launch would save). Session 20 found the decode step's copy,
counter-zeroing and split-K launches this way (tools/results/kernlist-resident-4l-h200-s20-*.log).

    python tools/decode_kernels.py --layers 4 --resident --gpu-mem-gb 60
    python tools/decode_kernels.py --synthetic tiny --device cpu   # aten ops instead of kernels

On CPU the "kernels" are the top-level aten ops (their times are host times).
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from homeseek.bench import build_engine, cap_process, device_events
from homeseek.config import RuntimeConfig


def report(evs: list[tuple[float, float, str]], width: int = 110) -> list[str]:
    """The ordered listing and the per-name totals of one token's events."""
    if not evs:
        return ["no events"]
    t0 = evs[0][0]
    lines = [f"{len(evs)} launches; span {(evs[-1][1] - t0) / 1000:.3f} ms"]
    lines.append(f"{'start us':>9} {'gap':>6} {'dur':>6}  name")
    prev = t0
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for a, b, name in evs:
        lines.append(f"{a - t0:9.1f} {a - prev:6.1f} {b - a:6.1f}  {name[:width]}")
        agg = by_name[name[:width]]
        agg[0] += 1
        agg[1] += b - a
        agg[2] += max(0.0, a - prev)  # negative: it overlapped the one before (PDL)
        prev = max(prev, b)
    lines.append("")
    lines.append(f"{'launches':>8} {'kernel us':>10} {'gaps us':>9}  name (by kernel + gap time)")
    for name, (n, t, g) in sorted(by_name.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        lines.append(f"{n:8d} {t:10.1f} {g:9.1f}  {name}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default="flash", help="preset built in memory (flash, tiny)")
    ap.add_argument("--layers", type=int, default=None, help="the preset's first N layers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gpu-mem-gb", type=float, default=None, help="cap the process (CUDA)")
    ap.add_argument("--resident", action="store_true", help="every expert in the GPU pool")
    ap.add_argument("--prompt", type=int, default=8, help="tokens prefilled first")
    ap.add_argument("--warm-tokens", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=20, help="timed without the profiler")
    ap.add_argument("--max-context", type=int, default=4144)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if args.resident and not cuda:
        raise SystemExit("--resident copies the experts into a GPU pool: it needs --device cuda")
    cap_process(args.device, args.gpu_mem_gb)
    rt = RuntimeConfig.build(
        device=args.device, dtype=torch.bfloat16, gpu_mem_gb=args.gpu_mem_gb,
        max_context=args.max_context, cpu_lane="off", prefetch=False,
    )  # fmt: skip
    eng = build_engine(rt, None, args.synthetic, 0, 64 if cuda else None, args.layers)
    if args.resident:
        eng.experts.load_all()  # refuses, with the numbers, a pool that cannot hold them all
    sess = eng.session()
    tok = int(sess.forward(list(range(100, 100 + args.prompt)))[-1].argmax())
    for _ in range(args.warm_tokens):
        tok = int(sess.decode(tok).argmax())
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    waits = [0.0]  # seconds the host spent blocked in event waits (the layers' id reads)
    if cuda:
        plain_sync = torch.cuda.Event.synchronize

        def timed_sync(ev: torch.cuda.Event) -> None:
            w0 = time.perf_counter()
            plain_sync(ev)
            waits[0] += time.perf_counter() - w0

        torch.cuda.Event.synchronize = timed_sync  # type: ignore[method-assign]
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        tok = int(sess.decode(tok).argmax())
    wall = (time.perf_counter() - t0) / max(1, args.tokens) * 1000
    if cuda:
        torch.cuda.Event.synchronize = plain_sync  # type: ignore[method-assign]
    wait = waits[0] / max(1, args.tokens) * 1000
    n_layers = eng.cfg.num_hidden_layers
    # What the host did not spend waiting is its own work (Python, launches, replays): when it
    # is near the token's time, the host, not the GPU, sets the pace.
    print(
        f"{n_layers} layers; {wall:.3f} ms a token without the profiler; host blocked in event "
        f"waits {wait:.3f} ms, busy {wall - wait:.3f} ms ({(wall - wait) / n_layers * 1000:.1f} "
        "us a layer)"
    )

    def one() -> None:
        nonlocal tok
        tok = int(sess.decode(tok).argmax())

    evs = device_events(one, cuda, copies=True)
    busy = sum(b - a for a, b, _ in evs) / 1000
    print(f"sum of kernel time {busy:.3f} ms")
    print("\n".join(report(evs)))
    span = (evs[-1][1] - evs[0][0]) / 1000 if evs else 0.0
    print(json.dumps({
        "tool": "decode_kernels", "device": args.device, "layers": eng.cfg.num_hidden_layers,
        "resident": args.resident, "ms_per_token": round(wall, 3),
        "host_wait_ms": round(wait, 3), "launches": len(evs),
        "kernel_ms": round(busy, 3), "span_ms_profiled": round(span, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
