"""The decode scheduler's host work per token, on the CPU alone: V4-Flash's expert geometry.

Decode at 24 GiB is bound by the host's Python between a layer's expert ids and its experts'
launch (tools/PERF_NOTES.md, session 17): ~0.7-1.1 ms a layer. Most of it is the scheduler's
bookkeeping (lookups, admissions, the eviction ranking, the host cache, the slot-map updates),
which does not need a GPU to time. This tool builds an `ExpertStore` and a `Scheduler` with
V4-Flash's layers, experts and top-k (43 x 256, 6 a token; tiny expert records, so copies cost
nothing), a GPU pool of --slots records and a host cache of --host records, then runs decode's
per-layer calls for --tokens tokens: each layer's `Scheduler.layer` (all its waves) and the
next layer's `prefetch_predicted`, as `Runner._moe_layer` does. The routing draws each layer's
experts from a Zipf popularity (a hit rate near the bench's model routing), the prediction
keeps each next-layer expert with probability --accuracy.

What it leaves out, being CPU-only: the CUDA calls (events, stream switches, the copies'
queueing, the graph replays). Prints the host time per token and per layer, the hit rate and
(with --profile) the functions with the most own time; one JSON line.

    python tools/host_path_bench.py --tokens 200
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import numpy as np
import torch

from homeseek.config import tiny_config
from homeseek.experts import ExpertStore, LRUPolicy, RecordBuffer, Residency
from homeseek.scheduler import Scheduler
from homeseek.synthetic import SyntheticSource


def flash_geometry():  # noqa: ANN201 - ModelConfig
    """V4-Flash's expert geometry (43 layers of 256 experts, 6 a token, 3 hash layers) with
    tiny dimensions: the scheduler's work is the same, the records are ~2 KB."""
    ratios = (0, 0) + tuple(4 if i % 2 == 0 else 16 for i in range(41)) + (0,)
    return tiny_config(
        num_hidden_layers=43, n_routed_experts=256, num_experts_per_tok=6,
        num_hash_layers=3, compress_ratios=ratios,
    )  # fmt: skip


def host_tier(store: ExpertStore, n_host: int) -> None:
    """Give the CPU store the host cache a CUDA one has, filled in key order (as the engine's
    background filler spreads it, roughly)."""
    cfg = store.cfg
    store.host = RecordBuffer(cfg, n_host, "cpu")
    store.hostres = Residency(n_host, cfg.num_hidden_layers, LRUPolicy(n_host))
    store.n_host, store.n_stage = n_host, 0
    rng = np.random.default_rng(1)
    keys = [(layer, e) for layer in store.layers for e in range(cfg.n_routed_experts)]
    for i in rng.permutation(len(keys))[:n_host]:
        key = keys[int(i)]
        s, _ = store.hostres.admit(key)
        store._fill(store.host.view(s), key)


class ZipfRouting:
    """Each layer's experts drawn from a Zipf popularity over a per-layer permutation."""

    def __init__(self, n_layers: int, n_experts: int, k: int, s: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        w = 1.0 / np.arange(1, n_experts + 1) ** s
        self.p = w / w.sum()
        self.perm = [self.rng.permutation(n_experts) for _ in range(n_layers)]
        self.k = k

    def draw(self, layer: int) -> np.ndarray:
        pick = self.rng.choice(len(self.p), size=self.k, replace=False, p=self.p)
        return self.perm[layer][pick]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--warm", type=int, default=100, help="untimed tokens first")
    ap.add_argument("--slots", type=int, default=989, help="GPU pool (989: the bench at 24 GiB)")
    ap.add_argument("--host", type=int, default=7244, help="host cache records")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--accuracy", type=float, default=0.81, help="prediction accuracy")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    cfg = flash_geometry()
    src = SyntheticSource(cfg, expert_alias=64)
    layers = list(range(cfg.num_hidden_layers))
    store = ExpertStore(src, cfg, layers, "cpu", args.slots, 0)
    host_tier(store, args.host)
    sched = Scheduler(store, cfg)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    # A copier as the engine's C one: each record's pieces copied in turn on this thread.
    store.copier = lambda pairs: [d.copy_(p) for d, p in pairs]
    routing = ZipfRouting(len(layers), E, K, args.zipf, seed=0)
    rng = np.random.default_rng(2)
    # Every token's ids and predictions drawn first: only the scheduler's calls are timed.
    plan = []
    for _ in range(args.warm + args.tokens):
        ids = [torch.from_numpy(routing.draw(layer).astype(np.int64))[None] for layer in layers]
        preds = []
        for layer in layers[1:]:
            keep = rng.random(K) < args.accuracy
            pred = np.where(keep, ids[layer][0].numpy(), rng.integers(0, E, K))
            preds.append(None if cfg.is_hash_layer(layer) else pred.tolist())
        plan.append((ids, preds + [None]))

    def token(ids: list[torch.Tensor], preds: list[list[int] | None]) -> None:
        sched.begin_step([1], prefetch_hash=False)
        for layer in layers:
            for _ in sched.layer(layer, ids[layer]):
                pass  # the wave's kernels would be queued here
            if preds[layer] is not None:
                sched.prefetch_predicted(layer + 1, preds[layer])

    with torch.inference_mode():
        for ids, preds in plan[: args.warm]:
            token(ids, preds)
        c0 = store.counters.as_dict()
        prof = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        for ids, preds in plan[args.warm :]:
            token(ids, preds)
        if prof is not None:
            prof.disable()
        dt = (time.perf_counter() - t0) / args.tokens
    c1 = store.counters.as_dict()
    lookups = c1["lookups"] - c0["lookups"]
    hits = c1["gpu_hits"] - c0["gpu_hits"]
    res = {
        "tool": "host_path_bench",
        "tokens": args.tokens,
        "slots": args.slots,
        "host_records": args.host,
        "ms_per_token": round(dt * 1000, 3),
        "us_per_layer": round(dt * 1e6 / len(layers), 1),
        "gpu_hit_rate": round(hits / max(lookups, 1), 3),
        "misses_per_token": round((lookups - hits) / args.tokens, 1),
        "below_reads_per_token": round((c1["disk_loads"] - c0["disk_loads"]) / args.tokens, 2),
        "profiled": bool(args.profile),
    }
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print(s.getvalue())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
