"""Record a routing trace and replay it through the expert-pool eviction policies.

    python tools/routing_sim.py --model tiny --tokens 512 --slots 16
    python tools/routing_sim.py --synthetic flash --alias 64 --device cuda --tokens 4096 \
        --gpu-mem-gb 24      # the full-size synthetic model, pool sized for a 24 GB card

Prints a table of hit rates (policy x pool size) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from homeseek import plan
from homeseek.config import PRESETS, RuntimeConfig
from homeseek.engine import Engine, resolve_model
from homeseek.experts import simulate
from homeseek.profile import (
    load_trace,
    record_routing,
    routing_profile,
    save_trace,
    write_profile,
)
from homeseek.synthetic import SyntheticSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="checkpoint dir or preset (on disk)")
    ap.add_argument("--synthetic", choices=sorted(PRESETS), help="in-memory synthetic model")
    ap.add_argument("--alias", type=int, default=64, help="distinct expert records (synthetic)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--slots", type=int, nargs="*", default=None, help="pool sizes to simulate")
    ap.add_argument("--gpu-mem-gb", type=float, default=None, help="size the pool from a budget")
    ap.add_argument(
        "--policies", nargs="*", default=["lru", "lrfu", "lrfu:1000", "lrfu:5000", "lrfu:20000"]
    )
    ap.add_argument("--floor", type=int, default=1)
    ap.add_argument("--save-trace", default=None)
    ap.add_argument("--trace", default=None, help="replay a saved trace instead of recording")
    ap.add_argument("--save-profile", default=None)
    args = ap.parse_args()

    # The recording engine's own pool only has to hold one layer's experts of a chunk; the host
    # cache is not needed (the source is in memory already).
    rt = RuntimeConfig.build(
        device=args.device,
        dtype=torch.bfloat16,
        max_context=args.tokens + 16,
        prefill_chunk=args.chunk,
        expert_slots=1100,
        host_mem_gb=0.0,
    )
    t0 = time.perf_counter()
    if args.synthetic:
        src = SyntheticSource(PRESETS[args.synthetic](), seed=0, device=args.device,
                              expert_alias=args.alias)  # fmt: skip
    else:
        src = resolve_model(args.model)
    eng = Engine(src, rt)
    t_load = time.perf_counter() - t0
    cfg = eng.cfg
    t0 = time.perf_counter()
    steps = load_trace(args.trace) if args.trace else record_routing(eng, args.tokens, args.chunk)
    t_rec = time.perf_counter() - t0
    if args.save_trace:
        save_trace(args.save_trace, steps)
    if args.save_profile:
        write_profile(args.save_profile, routing_profile(steps, cfg.num_hidden_layers,
                                                         cfg.n_routed_experts))  # fmt: skip
    n_total = cfg.num_hidden_layers * cfg.n_routed_experts
    sizes = args.slots
    if not sizes and args.gpu_mem_gb:
        sizes = [plan.memory_plan(cfg, args.gpu_mem_gb, 0, 32768).gpu_slots]
    sizes = sizes or [n_total // 10, n_total // 4]
    print(f"model {args.synthetic or args.model}: {cfg.num_hidden_layers} layers x "
          f"{cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}; load {t_load:.1f}s, "
          f"trace of {args.tokens} tokens ({len(steps)} steps) in {t_rec:.1f}s")  # fmt: skip
    print(f"{'slots':>7} {'of total':>9} " + " ".join(f"{p:>11}" for p in args.policies))
    results = []
    for n in sizes:
        row = {}
        for p in args.policies:
            per_token = cfg.num_hidden_layers * cfg.num_experts_per_tok
            row[p] = simulate(steps, n, cfg.num_hidden_layers, p, args.floor, per_token)["hit_rate"]
        results.append({"slots": n, **row})
        print(f"{n:>7} {n / n_total:>8.1%} " + " ".join(f"{row[p]:>11.3f}" for p in args.policies))
    print(json.dumps({"bench": "routing_sim", "model": args.synthetic or args.model,
                      "device": args.device, "tokens": args.tokens, "experts": n_total,
                      "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
