"""Where the host's time goes in a decode token: cProfile over graph decode steps.

Builds the engine as `homeseek bench` does (full-size synthetic V4-Flash on CUDA, the process
capped at --gpu-mem-gb), runs `homeseek profile --decode`'s per-layer report, then decodes
--tokens more tokens under cProfile and prints the functions with the most own time.

    python tools/decode_host_profile.py --gpu-mem-gb 130 --tokens 32
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from homeseek import profiler
from homeseek.bench import build_engine, cap_process
from homeseek.config import RuntimeConfig
from homeseek.scheduler import make_routing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default="flash")
    ap.add_argument("--gpu-mem-gb", type=float, default=24.0)
    ap.add_argument("--host-mem-gb", type=float, default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512, help="prefill first (fills the pool)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--trace", default=None, help="Chrome trace of the per-layer report")
    ap.add_argument("--routing", default="model", help="model, uniform or trace:PATH")
    ap.add_argument("--cpu-lane", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--prefetch", default="on", choices=("on", "off"))
    ap.add_argument(
        "--warm-tokens", type=int, default=4,
        help="untimed tokens before the profiled ones (32: the host cache holds what they read)",
    )  # fmt: skip
    ap.add_argument("--no-report", action="store_true", help="skip the per-layer report")
    ap.add_argument("--pstats", default=None, help="also write the cProfile stats to this file")
    args = ap.parse_args()
    if args.trace and args.no_report:
        raise SystemExit("--trace is the per-layer report's trace: drop --no-report")
    device = "cuda"
    cap_process(device, args.gpu_mem_gb)
    # the report's tokens (its session starts over), then the warm, profiled and plain tokens
    decoded = args.warm_tokens + 2 * args.tokens
    rt = RuntimeConfig.build(
        device=device, dtype=torch.bfloat16, gpu_mem_gb=args.gpu_mem_gb,
        host_mem_gb=args.host_mem_gb, max_context=args.prompt + max(decoded, 24) + 16,
        cpu_lane=args.cpu_lane, prefetch=args.prefetch == "on",
    )  # fmt: skip
    eng = build_engine(rt, None, args.synthetic, expert_alias=64)
    eng.scheduler.routing = make_routing(args.routing, eng.cfg)
    res = None
    if not args.no_report:
        pc = profiler.DecodeProfileConfig(tokens=16, prompt=args.prompt)
        res = profiler.profile_decode(eng, pc)
    if args.trace and res is not None:
        import json

        with open(args.trace, "w") as f:
            json.dump(profiler.chrome_trace(res["_tokens"]), f)
    sess = eng.session()
    sess.forward(list(range(1, args.prompt + 1)), last_only=True)
    tok = 7
    for _ in range(args.warm_tokens):
        tok = int(sess.decode(tok).argmax())
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.tokens):
        tok = int(sess.decode(tok).argmax())
    prof.disable()
    wall = (time.perf_counter() - t0) / args.tokens * 1000
    print(f"host profile: {args.tokens} tokens, {wall:.2f} ms/token wall (under cProfile)")
    if args.pstats:
        prof.dump_stats(args.pstats)
    n0 = eng.runner.graph_stats()["graphs_captured"]
    t0 = time.perf_counter()
    for _ in range(args.tokens):  # as many tokens again, without the profiler
        tok = int(sess.decode(tok).argmax())
    plain = (time.perf_counter() - t0) / args.tokens * 1000
    # a later position bucket captures its graphs on its first token: seconds, not decode
    note = "" if eng.runner.graph_stats()["graphs_captured"] == n0 else " (a capture among them)"
    print(f"the next {args.tokens} tokens without cProfile: {plain:.2f} ms/token{note}")
    if eng.scheduler.lane is not None:
        print("CPU lane:", eng.scheduler.lane.counters)
    for key in ("tottime", "cumtime", "ncalls"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        print(s.getvalue())


if __name__ == "__main__":
    main()
