"""One decode scheduler switch on and off, interleaved in one process: what it is worth.

Runs of `homeseek bench` on different days (or machines) differ by more than most scheduler
changes are worth: the lent host's memory bandwidth, which the copies, the reads of the tier
below and the CPU lane all draw on, has varied ~1.7x between sessions. This tool builds the
engine once (full-size synthetic V4-Flash, as the bench does), prefills a prompt, snapshots the
session, then decodes the same tokens from that snapshot with the switch on and off in turn,
each run from a cold expert pool, `--rounds` times, and prints each run's median ms/token and
one JSON line. The greedy tokens must agree between runs (the switches do not change the math).

    python tools/decode_ab.py --gpu-mem-gb 24 --switch prefetch --tokens 32 --rounds 2

Switches: `prefetch` (the next-layer prediction's copies), `lane` (the CPU lane, built with
--cpu-lane on), `early-prediction` (a layer with misses queues the prediction's copies behind
its own, before its E; off: after the next A), `empty-cache` (the caching allocator's unused
blocks returned before the run: with --warm-chunk, whether a reserve near the budget slows
decode), `time-copies` (events around each batch of copies, as `homeseek bench` records
them to report the copy lane's GB/s), `switch-interval` (the GIL's switch interval lowered
during each step beside the CPU lane, as the engine does, or Python's own; needs the lane),
`zero-copy` (the slot-map updates and slot tables read in place from pinned memory by the
kernels that use them, as the engine does; off: pinned -> device copies first, decode's slot
tables as an int64 copy and a cast, not quite the code before session 18),
`lane-handoff` (on: the CPU lane's sum waited for on the GPU, the host going on; off: the host
waits for the lane's job and copies its sum, the engine's default; needs the lane),
`resident-no-wait` (a layer whose experts are all on the device runs B and the host queues the
next A before reading its ids; off: the host waits for the ids first, the engine's default until
measured; acts with --resident, e.g. `--layers 36 --resident --gpu-mem-gb 135`).
`--switch a,b` measures each in turn on one build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from homeseek.bench import allocator_counters, allocator_delta, build_engine, cap_process
from homeseek.config import RuntimeConfig
from homeseek.runner import SWITCH_INTERVAL
from homeseek.scheduler import make_routing

SWITCHES = (
    "prefetch", "lane", "early-prediction", "empty-cache", "time-copies", "switch-interval",
    "zero-copy", "lane-handoff", "resident-no-wait",
)  # fmt: skip
# each switch as the engine runs it, restored after its runs (the next switch's baseline)
DEFAULT_ON = {
    "prefetch": True,
    "lane": True,
    "early-prediction": False,
    "empty-cache": False,
    "time-copies": False,
    "switch-interval": True,
    "zero-copy": True,
    "lane-handoff": False,
    "resident-no-wait": False,
}


def _set(eng, switch: str, on: bool, lane) -> None:  # noqa: ANN001 - Engine, CpuLane
    sched = eng.scheduler
    if switch == "empty-cache":
        if on and torch.cuda.is_initialized():  # the allocator's unused blocks, returned
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    elif switch == "prefetch":
        sched.prefetch = on
    elif switch == "lane":
        sched.lane = lane if on else None
    elif switch == "early-prediction":
        eng.runner.early_prediction = on
    elif switch == "time-copies":
        eng.experts.time_copies = on
        if not on:
            eng.experts.copy_busy_s()  # the timed batches' events, forgotten
    elif switch == "switch-interval":
        eng.runner.switch_interval = SWITCH_INTERVAL if on else None
    elif switch == "zero-copy":
        eng.experts.zero_copy = on
    elif switch == "resident-no-wait":
        eng.runner.resident_no_wait = on
    elif switch == "lane-handoff":
        eng.runner.lane_handoff = "gpu" if on else "host"
    else:
        raise SystemExit(f"unknown switch {switch!r}: one of {', '.join(SWITCHES)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default="flash")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--expert-alias", type=int, default=64, help="0: every expert its own")
    ap.add_argument("--gpu-mem-gb", type=float, default=24.0)
    ap.add_argument("--layers", type=int, default=None, help="the preset's first N layers")
    ap.add_argument(
        "--resident", action="store_true",
        help="every expert copied into the GPU pool first (refused if the pool cannot hold them)",
    )  # fmt: skip
    ap.add_argument("--host-mem-gb", type=float, default=None)
    ap.add_argument(
        "--switch", default="prefetch",
        help=f"one or a comma list (each measured in turn, one build): {', '.join(SWITCHES)}",
    )  # fmt: skip
    ap.add_argument(
        "--max-context", type=int, default=None,
        help="the engine's max_context (default: what the prompt and tokens need)",
    )  # fmt: skip
    ap.add_argument(
        "--warm-chunk", type=int, default=0,
        help="prefill this many tokens once after the build, as `homeseek bench` warms a full "
        "chunk up (its activations stay in the caching allocator's reserve)",
    )  # fmt: skip
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--routing", default="model", help="model, uniform or trace:PATH")
    ap.add_argument("--cpu-lane", default="auto", choices=("auto", "on", "off"))
    args = ap.parse_args()
    device = args.device
    cap_process(device, args.gpu_mem_gb)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rt = RuntimeConfig.build(
        device=device, dtype=dtype, gpu_mem_gb=args.gpu_mem_gb,
        host_mem_gb=args.host_mem_gb,
        max_context=args.max_context or max(args.prompt, args.warm_chunk) + args.tokens + 64,
        cpu_lane=args.cpu_lane,
    )  # fmt: skip
    switches = [w.strip() for w in args.switch.split(",") if w.strip()]
    if not switches:
        raise SystemExit(f"--switch: at least one of {', '.join(SWITCHES)}")
    for sw in switches:
        if sw not in SWITCHES:
            raise SystemExit(f"unknown switch {sw!r}: one of {', '.join(SWITCHES)}")
        if sw in ("prefetch", "early-prediction") and args.routing != "model":
            raise SystemExit(f"--switch {sw} needs --routing model: an override draws the ids "
                             "after the router, so decode predicts nothing under it")  # fmt: skip
        if sw in ("lane", "switch-interval", "lane-handoff") and args.cpu_lane == "off":
            raise SystemExit(f"--switch {sw} needs a CPU lane: --cpu-lane on")
    eng = build_engine(
        rt, None, args.synthetic, expert_alias=args.expert_alias or None, layers=args.layers
    )
    if args.resident:
        eng.experts.load_all()
    cuda = device.startswith("cuda")
    lane = eng.scheduler.lane
    for sw in ("lane", "switch-interval", "lane-handoff"):  # these act only beside the lane
        if sw in switches and lane is None:
            raise SystemExit(f"--switch {sw}: no CPU lane was built (--cpu-lane {args.cpu_lane})")
    eng.scheduler.routing = make_routing(args.routing, eng.cfg)
    sess = eng.session()
    warm_ids = [1 + i % 1000 for i in range(args.warm_chunk)]
    if warm_ids:
        sess.forward(warm_ids, last_only=True)
        sess.reset()
    sess.forward(list(range(1, args.prompt + 1)), last_only=True)
    snap = sess.snapshot()
    tok = 7
    for _ in range(2):  # captures the graphs of this position bucket, untimed
        tok = int(sess.decode(tok).argmax())
    # One untimed run first: the first run of a process fills the host cache with what this
    # decode reads from the tier below (then a setting's first run would pay it alone).
    sess.rollback(snap)
    eng.experts.reset_gpu()
    eng.scheduler.routing = make_routing(args.routing, eng.cfg)
    tok = 7
    for _ in range(args.tokens):
        tok = int(sess.decode(tok).argmax())
    first_tokens: list[int] | None = None
    for switch in switches:
        runs: list[dict] = []
        for r in range(args.rounds):
            for on in (True, False) if r % 2 == 0 else (False, True):
                if switch == "empty-cache" and not on and warm_ids:
                    # the reserve an "on" run returned, built again (a warm chunk's activations;
                    # its reads also pass through the host cache: disk_reads_per_token shows it)
                    sess.forward(warm_ids, last_only=True)
                sess.rollback(snap)
                eng.experts.reset_gpu()
                # a fresh override each run: the same draws (uniform) or trace rows in every run
                eng.scheduler.routing = make_routing(args.routing, eng.cfg)
                _set(eng, switch, on, lane)
                run, toks = _timed_run(eng, sess, switch, on, r, args.tokens, cuda)
                if first_tokens is None:
                    first_tokens = toks
                run["same_tokens"] = toks == first_tokens
                runs.append(run)
                print(json.dumps(run), flush=True)
        _set(eng, switch, DEFAULT_ON[switch], lane)  # as the engine runs it
        if switch == "empty-cache" and warm_ids:  # the next switch's runs keep the reserve
            sess.forward(warm_ids, last_only=True)
        med = {
            on: statistics.median(x["ms_per_token_median"] for x in runs if x["on"] is on)
            for on in (True, False)
        }
        print(
            json.dumps(
                {
                    "switch": switch,
                    "routing": args.routing,
                    "cpu_lane": args.cpu_lane,
                    "gpu_mem_gb": args.gpu_mem_gb,
                    "max_context": rt.max_context,
                    "warm_chunk": args.warm_chunk,
                    "ms_per_token_on": round(med[True], 2),
                    "ms_per_token_off": round(med[False], 2),
                    "speedup_on": round(med[False] / med[True], 3),
                    "all_same_tokens": all(x["same_tokens"] for x in runs),
                }
            ),
            flush=True,
        )


def _timed_run(eng, sess, switch: str, on: bool, r: int, n: int, cuda: bool):  # noqa: ANN001, ANN202
    """n greedy tokens from the session's state, each timed: (the run's JSON row, its tokens)."""
    pred0 = eng.scheduler.predicted.copied
    c0 = eng.experts.counters.as_dict()
    alloc0 = allocator_counters(cuda)
    toks, ms, tok = [], [], 7
    for _ in range(n):
        t0 = time.perf_counter()
        tok = int(sess.decode(tok).argmax())  # the argmax syncs
        ms.append((time.perf_counter() - t0) * 1000)
        toks.append(tok)
    c1 = eng.experts.counters.as_dict()
    run = {
        "switch": switch,
        "on": on,
        "round": r,
        "ms_per_token_median": round(statistics.median(ms), 2),
        "ms_per_token_mean": round(statistics.fmean(ms), 2),
        "tok_s": round(1000 * len(ms) / sum(ms), 3),
        "disk_reads_per_token": round((c1["disk_loads"] - c0["disk_loads"]) / len(ms), 2),
        "h2d_MB_per_token": round((c1["bytes_h2d"] - c0["bytes_h2d"]) / len(ms) / 1e6, 1),
        "prefetch_copies_per_token": round((eng.scheduler.predicted.copied - pred0) / len(ms), 2),
        "allocator": allocator_delta(alloc0, cuda),
        "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2) if cuda else None,
    }
    return run, toks


if __name__ == "__main__":
    main()
