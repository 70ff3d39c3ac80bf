"""Benchmark the Triton kernels at V4-Flash shapes against HBM bandwidth measured in the same run.

    python tools/bench_kernels.py [--sets N] [--sweep] [--quick] [--only fp4,fp8,...] [--jobs N]

Per kernel: median time (triton.testing.do_bench) of CUDA-graph replay (the eager time is in
the JSON as us_eager) while rotating over several input sets so L2 (50 MB on H100) cannot serve
repeats, bytes that must move, GB/s, and % of the copy bandwidth (large device-to-device copy,
bytes read + written). Prints a table and ends with one JSON line; with $OUT set (or --rows) each
row is also appended to a JSON-lines file as it is measured, so a run cut short keeps its rows.
--jobs N first compiles every kernel variant the run will time in N parallel processes (each
runs the same schedule but only calls its share of the kernels once, filling Triton's on-disk
cache), so the timed process does not spend the lease compiling one variant at a time.
--sweep adds tile-config sweeps (FP4 decode launches timed apart; FP8 GEMV configs).
Targets (>= 70% of the copy bandwidth): FP4 experts M=1 K=6 with and without the activation
quantisation simulation (the engine's default runs it), and FP8 GEMV as a decode step runs
it: one layer's five FP8 launches back to back (M=1), all their bytes over the chain's time. Each
single FP8 launch is reported too, without a target: a dependent launch costs about 2.5 us before
it moves a byte (tools/chain_floor.py measures it), so the two smallest (6.3 and 8.4 MB) cannot
reach 70% alone. Each row also gives its % of the read-only ceiling (pct_read_bw). The graph
holds its calls back to back, each depending on the one before, as a decode step chains its
launches; on sm_90+ the FP8 GEMV is a programmatic dependent launch (it starts and loads its
first weights while the launch before finishes), and "pdl off" rows time the same launches
without that overlap (what sm_89 cards get).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

TARGET = 0.70


_LAST: dict[str, float | None] = {}  # eager time of the last _bench call, for the table
# Warm mode (a --jobs worker): (worker index, workers). Every _bench call gets a number in call
# order; a worker only runs fn(0) once for its numbers (compiling the variant) and times nothing.
_WARM: tuple[int, int] | None = None
_CALLS = [0]


def graph_ms(fn, calls: int) -> float:
    """Median ms per call of one CUDA graph holding fn(0) .. fn(calls - 1), back to back (each
    call warmed up on a side stream first, as capture requires)."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for j in range(calls):
            fn(j)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(calls):
            fn(j)
    return do_bench(graph.replay, warmup=10, rep=200, return_mode="median") / calls


def _bench(fn, sets: int) -> float:
    """Median ms per call of fn(i), i cycling over the input sets.

    Timed as the engine runs: one CUDA graph holding a call per input set, replayed (so host
    launch overhead does not hide short kernels); the eager time is kept in _LAST["eager"]. Falls
    back to eager timing when the calls cannot be captured.
    """
    from triton.testing import do_bench

    n = _CALLS[0]
    _CALLS[0] += 1
    if _WARM is not None:
        if n % _WARM[1] == _WARM[0]:
            fn(0)
            torch.cuda.synchronize()
        return 1.0

    state = {"i": 0}

    def call():
        fn(state["i"] % sets)
        state["i"] += 1

    eager = do_bench(call, warmup=25, rep=200, return_mode="median")
    _LAST["eager"] = eager
    try:
        ms = graph_ms(fn, sets)
    except Exception as exc:  # not capturable (allocations, syncs): report eager
        print(f"   (graph capture failed: {type(exc).__name__}: {exc}; eager time)", flush=True)
        torch.cuda.synchronize()
        ms = eager
    return ms


def _empty_copy_ms(n: int) -> float:
    e0 = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    e1 = torch.empty_like(e0)
    return _bench(lambda _i: e1.copy_(e0), 1)


def hbm_ceilings() -> dict[str, float]:
    """Measured ceilings: GB/s of a 2 GiB device-to-device copy of random data (bytes read +
    written; the copy bandwidth the targets use), the same copy between two never-written
    `torch.empty` buffers (run 1 measured that way), a 2 GiB read-only reduction (torch.sum) of
    random data, and the graph-replay time of a trivial one-element kernel (the per-launch floor
    every small kernel pays)."""
    n = 1 << 30  # 1 Gi bf16 elements = 2 GiB
    fresh_ms = _empty_copy_ms(n)
    a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    copy_ms = _bench(lambda _i: b.copy_(a), 1)
    read_ms = _bench(lambda _i: torch.sum(a, dtype=torch.float32), 1)
    t = torch.zeros(1, device="cuda")
    tiny_ms = _bench(lambda _i: t.add_(1.0), 8)
    _LAST.pop("eager", None)
    return {
        "copy_bw_GBps": round(2 * 2 * n / (copy_ms * 1e-3) / 1e9, 1),
        "copy_empty_bufs_GBps": round(2 * 2 * n / (fresh_ms * 1e-3) / 1e9, 1),
        "read_bw_GBps": round(2 * n / (read_ms * 1e-3) / 1e9, 1),
        "launch_floor_us": round(tiny_ms * 1e3, 2),
    }


def _fp4_pool(dev, n_slots: int):
    from homeseek.kernels import fp4_experts as f4

    sh = f4.pool_shapes(n_slots, f4.V4_FLASH_D, f4.V4_FLASH_I)
    q = {n: torch.randint(0, 256, sh[n], dtype=torch.uint8, device=dev) for n in ("w13_q", "w2_q")}
    s = {
        n: torch.randint(118, 123, sh[n], dtype=torch.uint8, device=dev) for n in ("w13_s", "w2_s")
    }
    return q["w13_q"], s["w13_s"], q["w2_q"], s["w2_s"]


def _sweep_point(record, name: str, fn, sets: int, nbytes: float) -> None:
    """One sweep measurement; a config that fails (compile, launch) is reported, not fatal."""
    try:
        record(name, _bench(fn, sets), nbytes)
    except Exception as exc:
        print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


# Decode tile sweeps (M = 1), each launch timed on its own (config "_launch"). Run 1 (H100)
# swept block_n 4..32 x num_warps 2..8, asm, maxnreg and prefetch for both launches; these are
# the contenders left, plus the token-parallel down launch.
FP4_GATE_UP_SWEEP = [
    {"block_n": 8, "num_warps": 4},  # default
    {"block_n": 16, "num_warps": 4},  # run-1 default
    {"block_n": 8, "num_warps": 4, "prefetch": True},
    {"block_n": 16, "num_warps": 8},
    {"block_n": 8, "num_warps": 2},
]
FP4_DOWN_SWEEP = [
    {"block_n_down": 16, "num_warps_down": 4},  # default (pair)
    {"block_n_down": 32, "num_warps_down": 4},
    {"block_n_down": 8, "num_warps_down": 2},
    {"down": "token", "block_n_down": 16},
    {"down": "token", "block_n_down": 8},
    {"down": "token", "block_n_down": 32},
    {"down": "token", "block_n_down": 16, "prefetch_down": True},
    {"down": "token", "block_n_down": 32, "prefetch_down": True},
    {"down": "token", "block_n_down": 8, "num_warps_down": 2},
    {"down": "token", "block_n_down": 16, "num_warps_down": 8, "prefetch_down": True},
]
# Whole-call contenders at M = 1 with the down launch a programmatic dependent (both launches).
FP4_PDL_SWEEP = [
    {"prefetch_down": True},  # both down steps' weights requested before the wait
    {"nb_down": 16},  # one down step: the whole tile before the wait
    {"nb_down": 16, "block_n_down": 8, "num_warps_down": 2},
    {"block_n_down": 16, "num_warps_down": 8, "prefetch_down": True},
]
# Whole-call contenders (both launches), M = 1..4.
FP4_CALL_SWEEP = [
    {"down": "token", "block_n_down": 16},
    {"down": "token", "block_n_down": 32, "prefetch_down": True},
    {"down": "token", "block_n_down": 8},
]


def bench_fp4_decode(record, dev, dt, n_sets: int, quick: bool, sweep: bool) -> None:
    """Routed experts at decode; a 48-slot pool (642 MB) so rotated sets miss L2."""
    from homeseek.kernels import fp4_experts as f4

    d, i, k, n_slots = f4.V4_FLASH_D, f4.V4_FLASH_I, 6, 48
    pool = _fp4_pool(dev, n_slots)
    slot_b = f4.slot_bytes(d, i)
    gate_up_b = 2 * i * (d // 2 + d // 32)  # per slot: w13 codes + scales
    down_b = d * (i // 2 + i // 32)
    for m in [1, 2, 4] if quick else [1, 2, 3, 4, 8, 16]:
        ws = f4.fp4_experts_workspace(m * k, d, i, dt, dev)
        sets = []
        for _ in range(n_sets):
            perm = torch.randperm(n_slots, device=dev)
            base = torch.arange(m, device=dev)[:, None] * k + torch.arange(k, device=dev)
            slots = perm[base % n_slots].int().contiguous()  # tokens share slots past 8
            x = torch.randn(m, d, device=dev, dtype=dt)
            sets.append((x, slots, torch.rand(m, k, device=dev), torch.randn_like(x)))
        out = torch.empty(m, d, device=dev, dtype=dt)
        uniq = sum(int(torch.unique(s[1]).numel()) for s in sets) / n_sets
        nbytes = uniq * slot_b + m * d * 2 * 3
        for aq in (False, True):

            def run(j, aq=aq, cfg=None, sets=sets, out=out, ws=ws):
                x, slots, rw, shared = sets[j]
                f4.fp4_experts(
                    x,
                    slots,
                    rw,
                    shared,
                    *pool,
                    10.0,
                    out=out,
                    act_quant=aq,
                    workspace=ws,
                    config=cfg,
                )

            # Both: the engine runs act_quant (quant_sim) by default, as the reference does.
            tgt = TARGET if m == 1 else None
            name = f"fp4_experts M={m} K={k} act_quant={int(aq)}"
            record(name, _bench(run, n_sets), nbytes, tgt, unique_experts=uniq)
            if m <= 4:  # the default launches the down kernel as a programmatic dependent
                fn = functools.partial(run, cfg={"pdl": False})
                _sweep_point(record, f"  {name} without PDL", fn, n_sets, nbytes)
            if aq and m <= 4:  # a quantised once in gate/up (default) against in every program
                fn = functools.partial(run, cfg={"a_quant": "inline"})
                _sweep_point(record, f"  {name} a_quant=inline", fn, n_sets, nbytes)
            if m in (1, 4) and not quick:  # the two launches apart (default tiles)
                for part, pb in (("gate_up", gate_up_b), ("down", down_b)):
                    ms = _bench(functools.partial(run, cfg={"_launch": part}), n_sets)
                    record(f"  fp4 {part} M={m} act_quant={int(aq)}", ms, uniq * pb)
            if sweep and m == 1:
                for cfg in FP4_PDL_SWEEP:
                    fn = functools.partial(run, cfg=cfg)
                    name = f"  sweep fp4 call M=1 aq={int(aq)} {cfg}"
                    _sweep_point(record, name, fn, n_sets, nbytes)
            if sweep and m <= 4:
                for cfg in FP4_CALL_SWEEP:
                    fn = functools.partial(run, cfg=cfg)
                    name = f"  sweep fp4 call M={m} aq={int(aq)} {cfg}"
                    _sweep_point(record, name, fn, n_sets, nbytes)
            if sweep and m == 1 and not aq:
                for cfg in FP4_GATE_UP_SWEEP:
                    fn = functools.partial(run, cfg={**cfg, "_launch": "gate_up"})
                    _sweep_point(
                        record, f"  sweep fp4 gate_up M=1 {cfg}", fn, n_sets, uniq * gate_up_b
                    )
                for cfg in FP4_DOWN_SWEEP:
                    fn = functools.partial(run, cfg={**cfg, "_launch": "down"})
                    _sweep_point(record, f"  sweep fp4 down M=1 {cfg}", fn, n_sets, uniq * down_b)
            if sweep and m == 4 and not aq:
                for cfg in ({"block_n": 8, "num_warps": 2}, {"block_n": 16}):
                    fn = functools.partial(run, cfg={**cfg, "_launch": "gate_up"})
                    name = f"  sweep fp4 gate_up M=4 {cfg}"
                    _sweep_point(record, name, fn, n_sets, uniq * gate_up_b)
                for cfg in (
                    {"block_n_down": 16},
                    {"down": "token", "block_n_down": 16},
                    {"down": "token", "block_n_down": 32},
                ):
                    fn = functools.partial(run, cfg={**cfg, "_launch": "down"})
                    _sweep_point(record, f"  sweep fp4 down M=4 {cfg}", fn, n_sets, uniq * down_b)


# Act-quant contenders (--only fp4_aq): where a is quantised ("gate_up": once, by the last
# gate/up program of each act block; "inline": in every down program that reads it) and the
# gate/up tiles that amortise x's in-kernel quantisation over more rows per warp.
FP4_AQ_SWEEP = {
    1: [
        {},
        {"a_quant": "inline"},
        {"block_n": 8},
        {"block_n": 16, "num_warps": 2},
        {"block_n": 64, "num_warps": 8},
        {"block_n_down": 32},
        {"_aq": False},
        {"_aq": False, "block_n": 32},
    ],
}
for _m in (2, 3, 4):
    FP4_AQ_SWEEP[_m] = [{}, {"a_quant": "inline"}, {"block_n": 16, "a_quant": "inline"}]


def bench_fp4_act_quant(record, dev, dt, n_sets: int) -> None:
    """Decode experts with act-quant (the engine default): the placements and tiles of
    FP4_AQ_SWEEP, whole calls."""
    from homeseek.kernels import fp4_experts as f4

    d, i, k, n_slots = f4.V4_FLASH_D, f4.V4_FLASH_I, 6, 48
    pool = _fp4_pool(dev, n_slots)
    for m, cfgs in FP4_AQ_SWEEP.items():
        ws = f4.fp4_experts_workspace(m * k, d, i, dt, dev)
        sets = []
        for _ in range(n_sets):
            perm = torch.randperm(n_slots, device=dev)
            slots = perm[: m * k].view(m, k).int().contiguous()
            x = torch.randn(m, d, device=dev, dtype=dt)
            sets.append((x, slots, torch.rand(m, k, device=dev), torch.randn_like(x)))
        out = torch.empty(m, d, device=dev, dtype=dt)
        nbytes = m * k * f4.slot_bytes(d, i) + m * d * 2 * 3

        def run(j, cfg, sets=sets, out=out, ws=ws):
            x, slots, rw, shared = sets[j]
            aq = cfg.get("_aq", True)  # {"_aq": False}: the same tiles without act-quant
            f4.fp4_experts(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=aq,
                           workspace=ws, config=cfg)  # fmt: skip

        for cfg in cfgs:
            fn = functools.partial(run, cfg=cfg)
            _sweep_point(record, f"  aq fp4 call M={m} {cfg}", fn, n_sets, nbytes)


# Prefill tile contenders of the v1 kernel (bf16); the offline sm_90 compile of these spills no
# registers. (The default is v2 now: FP4_GROUPED_V2_SWEEP, section fp4_grouped_v2.)
FP4_GROUPED_SWEEP = [
    {"variant": "v1", "block_m": 16, "block_n": 64, "block_k": 32, "num_warps": 4},
    {"variant": "v1", "block_m": 16, "block_n": 64, "block_k": 64, "num_warps": 4},
    {"variant": "v1", "block_m": 32, "block_n": 64, "block_k": 64, "num_warps": 4},
    {"variant": "v1", "block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 8},
    {"variant": "v1", "block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 8, "num_stages": 3},
    {"variant": "v1", "block_m": 16, "block_n": 128, "block_k": 64, "num_warps": 8},
]


def bench_fp4_grouped(record, dev, dt, quick: bool, sweep: bool = False) -> None:
    """Routed experts at prefill (grouped by slot, tl.dot tiles). 256 slots (one layer's experts,
    3.4 GB), so the pairs spread over experts as in a real prefill chunk."""
    from homeseek.kernels import fp4_experts as f4

    d, i, k, n_slots = f4.V4_FLASH_D, f4.V4_FLASH_I, 6, 256
    pool = _fp4_pool(dev, n_slots)
    for m in [256] if quick else [64, 512, 2048]:
        x = torch.randn(m, d, device=dev, dtype=dt)
        slots = torch.stack([torch.randperm(n_slots, device=dev)[:k] for _ in range(m)]).int()
        rw = torch.rand(m, k, device=dev)
        out = torch.empty(m, d, device=dev, dtype=dt)
        fn = functools.partial(
            f4.fp4_experts_grouped,
            x,
            slots,
            rw,
            torch.randn_like(x),
            *pool,
            10.0,
            out=out,
            act_quant=True,
        )
        ms = _bench(lambda _j, fn=fn: fn(), 1)
        flops = 2 * m * k * 3 * d * i
        uniq = int(torch.unique(slots).numel())
        nbytes = uniq * f4.slot_bytes(d, i) + m * d * 6
        tf = round(flops / (ms * 1e-3) / 1e12, 1)
        record(f"fp4_experts_grouped M={m} K={k}", ms, nbytes, TFLOPS=tf)
        ms1 = _bench(lambda _j, fn=fn: fn(config={"variant": "v1"}), 1)
        tf1 = round(flops / (ms1 * 1e-3) / 1e12, 1)
        record(f"  fp4_experts_grouped M={m} K={k} v1", ms1, nbytes, TFLOPS=tf1)
        if sweep and m >= 512:
            for cfg in FP4_GROUPED_SWEEP:
                fn2 = functools.partial(fn, config=cfg)

                def one(_j, fn2=fn2):
                    return fn2()

                name = f"  sweep fp4_grouped M={m} {cfg}"
                try:
                    ms2 = _bench(one, 1)
                    record(name, ms2, nbytes, TFLOPS=round(flops / (ms2 * 1e-3) / 1e12, 1))
                except Exception as exc:
                    print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


# v2 contenders (bf16). The default first: block_m from the pairs per slot (128 at M = 4096 and
# 16384 with 256 slots), block_n 128 (of w1 and of w3: 256 weight rows), block_k 128, 8 warps, 3
# stages, 4 persistent programs per SM. Compiled offline for sm_90 (triton 3.6): no spills in the
# main loops, except block_n_down 256 (72 bytes); gate/up at block_m 128 uses 255 registers.
FP4_GROUPED_V2_SWEEP = [
    {},
    {"num_stages": 4},
    {"num_stages": 2},
    {"block_m": 64},
    {"block_m": 64, "block_k": 256, "num_stages": 2},
    {"block_m": 32, "num_stages": 4},
    {"block_k_down": 256, "num_stages_down": 2},
    {"block_n_down": 256},
    {"block_n": 64, "num_warps": 4, "num_stages": 4, "num_warps_down": 8},  # a quantised apart
    {"block_n": 64, "num_warps": 4, "num_stages": 2, "block_n_down": 64},  # two CTAs per SM
    {"programs_per_sm": 1},
    {"asm": False},  # the portable decode (what fp16 runs)
]
FP4_GROUPED_V2_M = (4096, 16384)


def _bench_once(fn) -> float:
    """Median ms of fn() for calls of milliseconds (launch overhead is noise there): one eager
    do_bench, L2 flushed between calls, so every call reads the weights from HBM. Follows
    _bench's numbering, so --jobs workers compile these too."""
    from triton.testing import do_bench

    n = _CALLS[0]
    _CALLS[0] += 1
    if _WARM is not None:
        if n % _WARM[1] == _WARM[0]:
            fn()
            torch.cuda.synchronize()
        return 1.0
    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def _prefill_routing(m: int, k: int, n_slots: int, kind: str, dev) -> torch.Tensor:
    """[m, k] int32 slots, k distinct per token. "uniform": random; "zipf": slot popularity ~
    1 / rank^0.5 (the hottest slot ~8x the average pair count, the coldest ~0.5x), drawn
    without replacement per token: the load imbalance of a real prefill, roughly."""
    if kind == "uniform":
        return torch.rand(m, n_slots, device=dev).topk(k, dim=1).indices.int().contiguous()
    pop = torch.arange(1, n_slots + 1, device=dev, dtype=torch.float32) ** -0.5
    pop = pop[torch.randperm(n_slots, device=dev)]
    return torch.multinomial(pop.expand(m, n_slots), k, replacement=False).int().contiguous()


def bench_fp4_grouped_v2(record, dev, dt, quick: bool) -> None:
    """Prefill routed experts, v1 (its default tiles) against the v2 contenders: M = 4096 and
    16384 tokens, K = 6, 256 slots (one layer's experts, 3.4 GB), act_quant (the engine's
    default), uniform and Zipf-skewed routing. Each v2 output is checked against v1's: the
    largest |difference| over the standard deviation of v1's output (both are one summation
    order of the same products; act_quant can move a few blocks by a quantum). Prints a table;
    with --quick, M = 4096 uniform only."""
    from homeseek.kernels import fp4_experts as f4

    d, i, k, n_slots = f4.V4_FLASH_D, f4.V4_FLASH_I, 6, 256
    pool = _fp4_pool(dev, n_slots)
    table = []
    for m in FP4_GROUPED_V2_M[:1] if quick else FP4_GROUPED_V2_M:
        x = torch.randn(m, d, device=dev, dtype=dt)
        shared = torch.randn_like(x)
        rw = torch.rand(m, k, device=dev)
        out = torch.empty(m, d, device=dev, dtype=dt)
        flops = 2 * m * k * 3 * d * i
        for routing in ("uniform",) if quick else ("uniform", "zipf"):
            slots = _prefill_routing(m, k, n_slots, routing, dev)
            uniq = int(torch.unique(slots).numel())
            nbytes = uniq * f4.slot_bytes(d, i) + m * d * 6
            per_slot = torch.bincount(slots.flatten().long(), minlength=n_slots).float()
            print(f"fp4 grouped M={m} {routing}: pairs per slot mean {per_slot.mean():.0f}, "
                  f"max {per_slot.max():.0f}, min {per_slot.min():.0f}", flush=True)  # fmt: skip
            run = functools.partial(
                f4.fp4_experts_grouped, x, slots, rw, shared, *pool, 10.0, out=out, act_quant=True
            )
            ref = None
            if _WARM is None:
                ref = run(config={"variant": "v1"}).float().clone()
                ref_std = float(ref.std())
            for label, cfg in [("v1", {"variant": "v1"})] + [
                ("v2 " + (",".join(f"{a}={b}" for a, b in c.items()) or "default"),
                 {"variant": "v2", **c})
                for c in FP4_GROUPED_V2_SWEEP
            ]:  # fmt: skip
                name = f"fp4_grouped_v2 M={m} {routing} {label}"
                try:
                    ms = _bench_once(functools.partial(run, config=cfg))
                except Exception as exc:
                    print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                if ref is None:
                    continue
                diff = (run(config=cfg).float() - ref).abs()
                err, mean = float(diff.max()) / ref_std, float(diff.mean()) / ref_std
                tf = flops / (ms * 1e-3) / 1e12
                record(name, ms, nbytes, TFLOPS=round(tf, 1), max_diff_over_std=round(err, 5),
                       mean_diff_over_std=round(mean, 7))  # fmt: skip
                table.append((m, routing, label, ms, tf, err, mean))
    if not table:
        return
    print("\nfp4_experts_grouped, K=6, 256 slots, bf16, act_quant: ms per call, TFLOP/s "
          "(2*M*K*3*D*I), speedup over v1, max and mean |out - out_v1| / std(out_v1)")  # fmt: skip
    base = {(m, r): ms for m, r, label, ms, *_ in table if label == "v1"}
    for m, routing, label, ms, tf, err, mean in table:
        up = base.get((m, routing), float("nan")) / ms
        print(f"M={m:<6d} {routing:8s} {label:58s} {ms:9.3f} ms {tf:6.1f} TF/s {up:6.2f}x "
              f"{err:9.2e} {mean:9.2e}")  # fmt: skip
    print(flush=True)


# GEMV configs swept per engine launch (M = 1). With PDL the weights a program loads before
# waiting (first `pre` steps) overlap the previous launch; whole rows per program (split_k 1)
# leave no split-K partials to reduce after the wait.
_FP8_SMALL = [
    {"u": 4, "programs_per_sm": 1},
    {"u": 4, "programs_per_sm": 1, "maxnreg": 168},
    {"u": 2, "programs_per_sm": 1, "pre": 2},
    {"block_n": 16, "split_k": 2, "u": 4, "pre": 2},
    {"block_n": 16, "split_k": 2, "u": 2, "pre": 4},
    {"block_n": 16, "split_k": 4, "u": 2, "pre": 2},
    {"block_n": 16, "split_k": 1, "u": 4, "pre": 2},
    {"block_n": 16, "split_k": 1, "u": 2, "pre": 4},
    {"block_n": 32, "split_k": 2, "u": 2, "pre": 2},
]
FP8_SWEEP = {
    "wq_a+wkv": _FP8_SMALL,
    "shared w2": _FP8_SMALL,
    "shared w1+w3": [{"u": 4, "programs_per_sm": 1}, {"pre": 2}, {"block_n": 16, "u": 2, "pre": 4}],
    "wq_b+indexer wq_b": [{"pre": 2}, {"programs_per_sm": 4}],
}


# The engine's dense FP8 launches at prefill (model.fuse_linears stacks those sharing an input).
# wo_a's groups are not here: they run without act_quant, on the Triton GEMM either way.
FP8_PREFILL = [
    ("wq_a+wkv", 1536, 4096),
    ("wq_b+indexer wq_b", 40960, 1024),  # CSA layers
    ("wq_b", 32768, 1024),  # HCA / SWA layers
    ("wo_b", 4096, 8192),
    ("shared w1+w3", 4096, 4096),
    ("shared w2", 4096, 2048),
]


def bench_fp8(record, dev, dt, n_sets: int, quick: bool, sweep: bool = False) -> None:
    """FP8 linears of V4-Flash; >= 400 MB of weights rotated for the GEMV rows."""
    from homeseek.kernels import fp8_linear as f8

    # The engine's launches first (model.fuse_linears stacks the linears that share an input),
    # then the single matrices they are made of, for reference.
    shapes = [
        *FP8_PREFILL,
        ("wq_a", 1024, 4096),
        ("wkv", 512, 4096),
        ("shared w1", 2048, 4096),
        ("indexer wq_b", 8192, 1024),
    ]
    engine_launch = {name for name, _, _ in shapes[:6]}
    if quick:
        shapes = shapes[:2]
    ws8 = f8.fp8_linear_workspace([(n, kk) for _, n, kk in shapes], 16, dev)
    ws_sweep = f8.Fp8LinearWorkspace(
        torch.empty(16 * 32768 * 4, device=dev), torch.zeros(32768, dtype=torch.int32, device=dev)
    )
    for name, n, kk in shapes:
        per = n * kk + (n // 128) * (kk // 128)
        n_w = max(1, min(n_sets, (400 << 20) // per))
        ws_ = [torch.randint(0, 0x7F, (n, kk), dtype=torch.uint8, device=dev) for _ in range(n_w)]
        ss_ = [
            torch.randint(118, 124, (n // 128, kk // 128), dtype=torch.uint8, device=dev)
            for _ in range(n_w)
        ]
        for m in [1] if quick else [1, 4, 512]:
            x = torch.randn(m, kk, device=dev, dtype=dt)
            out = torch.empty(m, n, device=dev, dtype=dt)

            def run(j, x=x, out=out, ws_=ws_, ss_=ss_, cfg=None, wsp=ws8):
                f8.fp8_linear(x, ws_[j], ss_[j], out=out, act_quant=True, workspace=wsp,
                              config=cfg)  # fmt: skip

            ms = _bench(run, n_w)
            extra = {"TFLOPS": round(2 * m * n * kk / (ms * 1e-3) / 1e12, 1)} if m > 16 else {}
            if m <= 16:
                p = f8._gemv_plan(m, n, kk, x.device, None)
                extra["plan"] = f"bn{p.block_n} w{p.num_warps} u{p.u} split{p.split_k} tok{p.tok}"
            # The FP8 target applies to the layer chain (bench_fp8_layer); single launches are
            # reported against the same ceiling without a target (see the module docstring).
            record(f"fp8_linear {name} [{n}x{kk}] M={m}", ms, per + m * (kk + n) * 2, **extra)
            if m == 1 and name in engine_launch and f8.pdl_supported(x.device):
                # The same launches without programmatic dependent launch: each one starts only
                # after the one before has finished (what sm_89 cards such as the 4090 get).
                fn = functools.partial(run, cfg={"pdl": False})
                ms_iso = _bench(fn, n_w)
                record(f"  fp8_linear {name} M=1 pdl off", ms_iso, per + m * (kk + n) * 2)
                if sweep:
                    fn = functools.partial(run, cfg={"pdl_early": False})
                    ms_late = _bench(fn, n_w)
                    record(f"  fp8_linear {name} M=1 pdl, next launch after the wait", ms_late,
                           per + m * (kk + n) * 2)  # fmt: skip
            if sweep and m == 1:
                for cfg in FP8_SWEEP.get(name, []):
                    fn = functools.partial(run, cfg=cfg, wsp=ws_sweep)
                    _sweep_point(
                        record, f"  sweep fp8 {name} M=1 {cfg}", fn, n_w, per + m * (kk + n) * 2
                    )


# wo_a (model.grouped_linear): G groups of R rows, each over its own I inputs; no act_quant.
WO_A = (8, 1024, 4096)


def bench_fp8_wo_a(record, dev, dt, n_sets: int, quick: bool) -> None:
    """wo_a's block-diagonal product as one grouped launch (fp8_linear groups=8) next to the 8
    per-group launches it replaces, at decode (M = 1, weights rotated) and prefill (M = 4096,
    compute bound: one weight). fp32 weight scales, as the engine loads them."""
    from homeseek.kernels import _formats as fmt
    from homeseek.kernels import fp8_linear as f8

    g_n, r, k = WO_A
    n = g_n * r
    per = n * k + (n // 128) * (k // 128) * 4
    n_w = max(1, min(n_sets, (400 << 20) // per))
    ws_ = [torch.randint(0, 0x7F, (n, k), dtype=torch.uint8, device=dev) for _ in range(n_w)]
    ss_ = [
        fmt.e8m0_to_float(torch.randint(118, 124, (n // 128, k // 128), dtype=torch.uint8,
                                        device=dev))
        for _ in range(n_w)
    ]  # fmt: skip
    # Sized as the engine sizes it (model.fp8_shapes): the whole (N, K) and one group's.
    wsp = f8.fp8_linear_workspace([(n, k), (r, k)], 16, dev)
    for m in [1] if quick else [1, 4096]:
        sets = n_w if m <= f8.GEMV_MAX_M else 1
        x = torch.randn(m, g_n * k, device=dev, dtype=dt)
        out = torch.empty(m, n, device=dev, dtype=dt)

        def grouped(j, x=x, out=out):
            f8.fp8_linear(x, ws_[j], ss_[j], out=out, groups=g_n, workspace=wsp)

        def per_group(j, x=x, out=out):
            for g in range(g_n):
                f8.fp8_linear(
                    x[:, g * k : (g + 1) * k], ws_[j][g * r : (g + 1) * r],
                    ss_[j][g * r // 128 : (g + 1) * r // 128], out=out[:, g * r : (g + 1) * r],
                    workspace=wsp,
                )  # fmt: skip

        nbytes = per + m * (g_n * k + n) * 2
        ms_g = _bench(grouped, sets)
        if m > f8.GEMV_MAX_M:
            extra = {"TFLOPS": round(2 * m * n * k / (ms_g * 1e-3) / 1e12, 1)}
        else:
            p = f8._gemv_plan(m, n, k, x.device, None)
            extra = {"plan": f"bn{p.block_n} w{p.num_warps} u{p.u} split{p.split_k} tok{p.tok}"}
        record(f"fp8_linear wo_a grouped [{g_n}x{r}x{k}] M={m}", ms_g, nbytes, **extra)
        ms_p = _bench(per_group, sets)
        record(f"  fp8_linear wo_a per group ({g_n} launches) M={m}", ms_p, nbytes,
               grouped_speedup=round(ms_p / ms_g, 2))  # fmt: skip


# A CSA layer's FP8 launches in decode-step order (attention in, q up, out, shared expert).
FP8_LAYER = [
    ("wq_a+wkv", 1536, 4096),
    ("wq_b+indexer wq_b", 40960, 1024),
    ("wo_b", 4096, 8192),
    ("shared w1+w3", 4096, 4096),
    ("shared w2", 4096, 2048),
]


def bench_fp8_layer(record, dev, dt, n_sets: int) -> None:
    """One layer's FP8 GEMV launches back to back (M = 1), as a decode step issues them: the
    time of the chain and the bandwidth of all its weight bytes together. The weights of
    several layers are rotated so L2 (50-60 MB) cannot serve them."""
    from homeseek.kernels import fp8_linear as f8

    per_layer = sum(n * k + (n // 128) * (k // 128) for _, n, k in FP8_LAYER)
    n_l = max(2, min(n_sets, (400 << 20) // per_layer))
    layers = [
        [
            (
                torch.randint(0, 0x7F, (n, k), dtype=torch.uint8, device=dev),
                torch.randint(118, 124, (n // 128, k // 128), dtype=torch.uint8, device=dev),
            )
            for _, n, k in FP8_LAYER
        ]
        for _ in range(n_l)
    ]
    xs = [torch.randn(1, k, device=dev, dtype=dt) for _, _, k in FP8_LAYER]
    outs = [torch.empty(1, n, device=dev, dtype=dt) for _, n, _ in FP8_LAYER]
    wsp = f8.fp8_linear_workspace([(n, k) for _, n, k in FP8_LAYER], 1, dev)
    nbytes = per_layer + sum((n + k) * 2 for _, n, k in FP8_LAYER)
    for cfg, label in (({}, ""), ({"pdl": False}, " pdl off")):

        def run(j, cfg=cfg):
            for (w, sc), x, o in zip(layers[j], xs, outs, strict=True):
                f8.fp8_linear(x, w, sc, out=o, act_quant=True, workspace=wsp, config=cfg)

        if label and not f8.pdl_supported(torch.device(dev)):
            continue
        ms = _bench(run, n_l)
        tgt = None if label else TARGET
        record(f"fp8_linear layer chain ({len(FP8_LAYER)} launches) M=1{label}", ms, nbytes, tgt)


def bench_fp8_prefill(record, dev, dt, quick: bool) -> None:
    """Prefill FP8 linears (act_quant, bf16 out, fp32 weight scales as the engine loads them): the
    Triton GEMM against torch's FP8 scaled matmul (fp8_linear's default from SCALED_MM_MIN_M rows
    where the device has one) at M = 128, 512 and 4096 (512 and 4096 with --quick), then the
    act-quant launch of the scaled-matmul path alone. ms are CUDA-graph replays (GPU time; the
    eager time, host work included, is in the JSON). One weight per shape, not rotated: at these
    sizes the products are compute bound, except the smallest at M = 128."""
    from homeseek.kernels import _formats as fmt
    from homeseek.kernels import fp8_linear as f8

    if _WARM is not None:
        return  # a few compiles, not worth the parallel warm-up
    status = f8.scaled_mm_status(dev)
    on = not status.startswith("off")
    print(f"fp8 prefill: scaled matmul: {status} (SCALED_MM_MIN_M = {f8.SCALED_MM_MIN_M})")
    table = []
    shapes = FP8_PREFILL[:2] if quick else FP8_PREFILL
    for name, n, k in shapes:
        w = torch.randint(0, 0x7F, (n, k), dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn)
        e8m0 = torch.randint(118, 124, (n // 128, k // 128), dtype=torch.uint8, device=dev)
        s = fmt.e8m0_to_float(e8m0)
        for m in [512, 4096] if quick else [128, 512, 4096]:
            x = torch.randn(m, k, device=dev, dtype=dt)
            flops = 2 * m * n * k
            nbytes = n * k + s.numel() * 4 + (m * k + m * n) * 2
            row = {"shape": f"{name} [{n}x{k}]", "m": m}
            for label, cfg in (("triton", {"scaled_mm": False}), ("scaled_mm", None)):
                if label == "scaled_mm" and not on:
                    continue
                fn = functools.partial(f8.fp8_linear, x, w, s, act_quant=True, config=cfg)
                ms = _bench(lambda _j, fn=fn: fn(), 1)
                tf = flops / (ms * 1e-3) / 1e12
                record(f"fp8 prefill {name} M={m} {label}", ms, nbytes, TFLOPS=round(tf, 1))
                row[label] = (ms, tf)
            table.append(row)
        del w, e8m0, s
    if on:  # the scaled-matmul path's extra launch: x -> e4m3 + column-major scales
        for k in sorted({k for _, _, k in shapes}):
            m = 4096
            x = torch.randn(m, k, device=dev, dtype=dt)
            q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=dev)
            s_t = torch.empty(k // 128, m, device=dev)
            ms = _bench(lambda _j, x=x, q=q, s_t=s_t: f8._act_quant_e4m3(x, q, s_t), 1)
            record(f"  act-quant e4m3 M={m} K={k}", ms, m * k * 3 + m * (k // 128) * 4)
    print("\nfp8 prefill, act_quant, bf16: ms per call (graph replay) and TFLOP/s")
    print(f"{'shape':30s} {'M':>5s} {'triton ms':>10s} {'TF/s':>7s} {'scaled_mm ms':>13s} "
          f"{'TF/s':>7s} {'speedup':>8s}")  # fmt: skip
    for r in table:
        t_ms, t_tf = r["triton"]
        line = f"{r['shape']:30s} {r['m']:5d} {t_ms:10.3f} {t_tf:7.1f}"
        if "scaled_mm" in r:
            s_ms, s_tf = r["scaled_mm"]
            line += f" {s_ms:13.3f} {s_tf:7.1f} {t_ms / s_ms:7.2f}x"
        print(line)
    print(flush=True)


def bench_attention(record, dev, dt, n_sets: int, sweep: bool = False) -> None:
    """Sparse attention with sink, and the indexer (scores + top-k)."""
    from homeseek.kernels import indexer as ix
    from homeseek.kernels import sparse_attn as sa

    h, dh, n_kv = 64, 512, 16384
    wsa = sa.sparse_attn_workspace(4, h, dh, 8320, dev)
    n_sp = 8320 // 64 + 1  # sweep configs split finer than the default
    wss = sa.SparseAttnWorkspace(
        torch.empty(4 * h * n_sp * dh, device=dev),
        torch.empty(4 * h * n_sp * 2, device=dev),
        torch.zeros(4 * 4, dtype=torch.int32, device=dev),
    )
    kvs = [torch.randn(n_kv, dh, device=dev, dtype=dt) for _ in range(n_sets)]
    for t, n_keys in [(1, 128), (1, 640), (4, 640), (1, 8320)]:
        q = torch.randn(t, h, dh, device=dev, dtype=dt)
        idx = torch.randint(0, n_kv, (t, n_keys), dtype=torch.int32, device=dev)
        sink = torch.randn(h, device=dev)
        out = torch.empty_like(q)

        def run(j, q=q, idx=idx, sink=sink, out=out):
            sa.sparse_attn(q, kvs[j], idx, sink, dh**-0.5, out=out, workspace=wsa)

        nbytes = (t * n_keys + 2 * t * h) * dh * 2
        record(f"sparse_attn T={t} L={n_keys}", _bench(run, n_sets), nbytes)
        if sweep:
            for cfg in ({"keys_per_split": 256}, {"keys_per_split": 64}, {"num_warps": 4}):
                fn = functools.partial(
                    sa.sparse_attn, q, idx=idx, sink=sink, scale=dh**-0.5, out=out,
                    workspace=wss, config=cfg,
                )  # fmt: skip
                _sweep_point(record, f"  sweep sparse_attn T={t} L={n_keys} {cfg}",
                             lambda j, fn=fn: fn(kv=kvs[j]), n_sets, nbytes)  # fmt: skip
    for c in [2048, 65536]:
        ks = [torch.randn(c, 128, device=dev, dtype=dt) for _ in range(n_sets)]
        q = torch.randn(1, 64, 128, device=dev, dtype=dt)
        w = torch.randn(1, 64, device=dev) * 0.011
        nv = torch.full((1,), c, dtype=torch.int32, device=dev)
        wsi = ix.indexer_workspace(1, c, 512, dev)
        out = torch.empty(1, 512, dtype=torch.int32, device=dev)

        def run(j, ks=ks, q=q, w=w, nv=nv, wsi=wsi, out=out):
            ix.indexer_topk(q, ks[j], w, nv, 512, out=out, workspace=wsi)

        record(f"indexer_topk C={c} (scores + torch.topk)", _bench(run, n_sets), c * (256 + 16))


def bench_mhc(record, dev, dt, n_sets: int, sweep: bool = False, quick: bool = False) -> None:
    """mHC pre (split kernel: projection + Sinkhorn) and post at decode; pre and head at prefill
    (T=64..16384, 16384 not with --quick), each T also through both pre paths forced (split
    kernel; block + finish kernels) to place mhc._BLOCK_MIN_T. --sweep: block-kernel configs at
    T=256 and T=4096 (tiles, splits, warps, stages, tensor-core precisions), each with its max
    error against mhc_pre_ref."""
    d = 4096
    from homeseek.kernels import mhc as mh

    fns = [torch.randn(24, 4 * d, device=dev) * 0.01 for _ in range(n_sets)]
    sc, base = torch.ones(3, device=dev), torch.zeros(24, device=dev)
    wsm = mh.mhc_workspace(4, dev)
    for t in [1, 4]:
        x = torch.randn(t, 4, d, device=dev, dtype=dt)
        y = torch.empty(t, d, device=dev, dtype=dt)
        post = torch.empty(t, 4, device=dev)
        comb = torch.empty(t, 4, 4, device=dev)

        def run(j, x=x, y=y, post=post, comb=comb):
            mh.mhc_pre(x, fns[j], sc, base, y=y, post=post, comb=comb, workspace=wsm)

        record(
            f"mhc_pre T={t}", _bench(run, n_sets), 24 * 4 * d * 4 + x.numel() * 4 + y.numel() * 2
        )
        f = torch.randn(t, d, device=dev, dtype=dt)
        o = torch.empty_like(x)
        fn = functools.partial(mh.mhc_post, f, x, post, comb, out=o)
        record(
            f"mhc_post T={t}", _bench(lambda _j, fn=fn: fn(), 1), 2 * x.numel() * 2 + f.numel() * 2
        )

    # Prefill. Bytes: x read once, fn once, y written (both paths read x a second time for y,
    # which may or may not come from L2). The public rows take the path the T picks; then both
    # paths are forced through the private launcher (args after comb: workspace, hc_eps,
    # norm_eps, iters, head).
    big = 4096
    wsp = mh.mhc_workspace(4 * big, dev)  # T=16384, and the sweep's SPLIT up to 64 at T=big
    heads = [f[:4].contiguous() for f in fns]

    def inputs(t):
        x = torch.randn(t, 4, d, device=dev, dtype=dt)
        y = torch.empty(t, d, device=dev, dtype=dt)
        xy = x.numel() * x.element_size() + y.numel() * y.element_size()
        return x, y, torch.empty(t, 4, device=dev), torch.empty(t, 4, 4, device=dev), xy

    for t in [64, 128, 256, 512, 1024, big] + ([] if quick else [4 * big]):
        x, y, post, comb, xy = inputs(t)
        nbytes = xy + 24 * 4 * d * 4

        def run(j, x=x, y=y, post=post, comb=comb):
            mh.mhc_pre(x, fns[j], sc, base, y=y, post=post, comb=comb, workspace=wsp)

        def run_head(j, x=x, y=y):
            mh.mhc_head(x, heads[j], sc[:1], base[:4], y=y, workspace=wsp)

        record(f"mhc_pre T={t}", _bench(run, n_sets), nbytes)
        record(f"mhc_head T={t}", _bench(run_head, n_sets), xy + 4 * 4 * d * 4)
        for block in (False, True):

            def run(j, x=x, y=y, post=post, comb=comb, block=block):
                mh._launch_pre("mhc_pre", x, fns[j], sc, base, y, post, comb, wsp, 1e-6, 1e-6,
                               20, False, block=block)  # fmt: skip

            kind = "block" if block else "split"
            record(f"  mhc_pre T={t} {kind} kernel", _bench(run, n_sets), nbytes)
    if not sweep:
        return
    # The default config ({}) first, for its error.
    sweeps = {
        256: [{}, {"SPLIT": 32}, {"SPLIT": 128}, {"BLOCK_T": 32}, {"num_warps": 2},
              {"PREC": "ieee"}],
        big: [{}, {"BLOCK_T": 16}, {"BLOCK_T": 64}, {"BLOCK_T": 64, "num_warps": 8},
              {"SPLIT": 8}, {"SPLIT": 32}, {"SPLIT": 64}, {"num_warps": 8}, {"num_warps": 2},
              {"BLOCK": 16}, {"BLOCK": 64}, {"num_stages": 1}, {"num_stages": 4},
              {"PREC": "ieee"}, {"BLOCK_T": 64, "BLOCK": 64}, {"PREC": "bf16x3"},
              {"PREC": "bf16x6"}],
    }  # fmt: skip
    for t, cfgs in sweeps.items():
        x, y, post, comb, xy = inputs(t)
        nbytes = xy + 24 * 4 * d * 4
        ref = mh.mhc_pre_ref(x, fns[0], sc, base) if _WARM is None else None
        for cfg in cfgs:
            name = f"  sweep mhc_pre T={t} block {cfg}"

            def run(j, x=x, y=y, post=post, comb=comb, cfg=cfg):
                mh._launch_pre("mhc_pre", x, fns[j], sc, base, y, post, comb, wsp, 1e-6, 1e-6,
                               20, False, block=True, config=cfg)  # fmt: skip

            try:
                err = {}
                if _WARM is None:  # a warm-up worker only compiles its share, in _bench
                    run(0)
                    outs = (("y", y), ("post", post), ("comb", comb))
                    err = {
                        f"max_err_{n}": float((got.float() - r.float()).abs().max())
                        for (n, got), r in zip(outs, ref, strict=True)
                    }
                record(name, _bench(run, n_sets), nbytes, **err)
            except Exception as exc:  # a config that does not compile here is reported, not fatal
                print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


SECTIONS = ("fp4", "fp4_grouped", "fp8", "attn", "mhc")
EXTRA_SECTIONS = ("fp4_aq", "fp8_prefill", "fp4_grouped_v2")  # only when named in --only


def _prewarm(jobs: int, timeout_s: float) -> None:
    """Run `jobs` warm workers (this script with --warm i/jobs) in parallel and wait for them."""
    import os
    import subprocess
    import time

    argv, skip = [], False
    for a in sys.argv[1:]:  # drop --jobs N / --jobs=N (a worker must not spawn workers)
        if skip or a.startswith("--jobs="):
            skip = False
            continue
        if a == "--jobs":
            skip = True
            continue
        argv.append(a)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                *argv,
                "--jobs",
                "0",
                "--warm",
                f"{w}/{jobs}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(jobs)
    ]
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
            if p.returncode:
                print(
                    f"   (warm worker failed, rc {p.returncode}: {err.strip()[-400:]})", flush=True
                )
        except subprocess.TimeoutExpired:
            p.kill()
            print("   (warm worker timed out; the timed run compiles the rest)", flush=True)
    print(f"precompiled in {jobs} processes: {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> int:
    global _WARM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=8, help="input sets rotated per kernel")
    ap.add_argument("--sweep", action="store_true", help="also sweep decode tile configs")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="comma list of " + ",".join(SECTIONS + EXTRA_SECTIONS),
    )
    ap.add_argument("--jobs", type=int, default=0, help="precompile in N processes first")
    ap.add_argument("--warm-timeout", type=float, default=150.0, help="seconds for --jobs")
    ap.add_argument("--rows", default=None, help="JSON-lines file for rows ($OUT/bench_rows.jsonl)")
    ap.add_argument("--warm", default=None, help=argparse.SUPPRESS)  # worker "i/n"
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device", file=sys.stderr)
        print(json.dumps({"error": "no cuda"}))
        return 2
    only = set(args.only.split(","))
    ceil0: dict[str, float] = {}
    if args.warm:
        w, n = (int(v) for v in args.warm.split("/"))
        _WARM = (w, n)
    else:
        ceil0 = hbm_ceilings()  # on a quiet GPU, before any worker starts
        torch.cuda.empty_cache()
        if args.jobs > 1:
            _prewarm(args.jobs, args.warm_timeout)

    import os

    import triton

    torch.manual_seed(0)
    dev = torch.device("cuda")
    dt = torch.bfloat16
    n_sets = args.sets
    props = torch.cuda.get_device_properties(dev)
    bw = ceil0.get("copy_bw_GBps", 1.0)
    rows: list[dict] = []
    rows_path = args.rows or (
        os.path.join(os.environ["OUT"], "bench_rows.jsonl") if os.environ.get("OUT") else None
    )
    if _WARM is not None:
        rows_path = None

    def record(name, ms, nbytes, target=None, **extra):
        eager = _LAST.pop("eager", None)
        if _WARM is not None:
            return
        if eager is not None:
            extra = {"us_eager": round(eager * 1e3, 2), **extra}
        gbs = nbytes / (ms * 1e-3) / 1e9
        r = {
            "kernel": name,
            "us": round(ms * 1e3, 2),
            "MB": round(nbytes / 1e6, 3),
            "GB/s": round(gbs, 1),
            "pct_copy_bw": round(100 * gbs / bw, 1),
            "pct_read_bw": round(100 * gbs / ceil0.get("read_bw_GBps", bw), 1),
        }
        if target is not None:
            r["target_pct"] = round(100 * target, 0)
            r["meets_target"] = gbs / bw >= target
        r.update(extra)
        rows.append(r)
        if rows_path:
            with open(rows_path, "a") as f:
                f.write(json.dumps(r) + "\n")
        print(
            f"{name:44s} {r['us']:9.2f} us {r['MB']:10.3f} MB {r['GB/s']:8.1f} GB/s "
            f"{r['pct_copy_bw']:6.1f} %"
            + (f"  eager {eager * 1e3:.2f} us" if eager is not None else "")
            + (f"  (target {100 * target:.0f} %)" if target else ""),
            flush=True,
        )

    if _WARM is None:
        print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
        print(f"triton {triton.__version__}; HBM copy bandwidth (read+write): {bw:.1f} GB/s")
        print(f"ceilings: {ceil0}\n")
        if rows_path:
            with open(rows_path, "a") as f:
                f.write(json.dumps({"device": props.name, **ceil0}) + "\n")

    if "fp4" in only:
        bench_fp4_decode(record, dev, dt, n_sets, args.quick, args.sweep)
        torch.cuda.empty_cache()
    if "fp4_aq" in only:
        bench_fp4_act_quant(record, dev, dt, n_sets)
        torch.cuda.empty_cache()
    if "fp4_grouped" in only:
        bench_fp4_grouped(record, dev, dt, args.quick, args.sweep)
        torch.cuda.empty_cache()
    if "fp4_grouped_v2" in only:
        bench_fp4_grouped_v2(record, dev, dt, args.quick)
        torch.cuda.empty_cache()
    if "fp8" in only:
        bench_fp8(record, dev, dt, n_sets, args.quick, args.sweep)
        bench_fp8_wo_a(record, dev, dt, n_sets, args.quick)
        if not args.quick:
            bench_fp8_layer(record, dev, dt, n_sets)
        torch.cuda.empty_cache()
    if "fp8_prefill" in only:
        bench_fp8_prefill(record, dev, dt, args.quick)
        torch.cuda.empty_cache()
    if "attn" in only:
        bench_attention(record, dev, dt, n_sets, args.sweep)
        torch.cuda.empty_cache()
    if "mhc" in only:
        bench_mhc(record, dev, dt, n_sets, args.sweep, args.quick)
    if _WARM is not None:
        return 0

    ceil1 = hbm_ceilings()  # again after the run: the card's state may drift
    print(f"ceilings after the run: {ceil1}")
    summary = {
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bw_GBps": round(bw, 1),
        "ceilings_start": ceil0,
        "ceilings_end": ceil1,
        "targets_met": all(r.get("meets_target", True) for r in rows),
        "results": rows,
    }
    print()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
