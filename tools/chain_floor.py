"""What one dependent launch costs in a chain, before any weight bytes: the floor under the small
FP8 GEMV launches of a decode step.

    python tools/chain_floor.py

Each row times a CUDA graph of 32 back-to-back launches of a minimal Triton kernel (median of
graph replays, per launch), with and without programmatic dependent launch (PDL: the launch may
start early and waits for the one before with griddepcontrol; "on" lets the next launch start
after this one's wait, "early" at this one's start), for grids of 1 to 2 programs per
SM, doing: nothing; reading 8 KB (a bf16 input row of 4096) after the wait and writing one value
per program; the same plus a split-K style arrival counter (atomic) with the last program reading
every partial; and the read of 8 KB plus 32 KB of "weights" per program loaded before the wait
(rotated over 400 MB so L2 cannot serve them). Ends with a JSON line.
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl
from bench_kernels import graph_ms  # tools/ is the script's folder, so on sys.path
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

CHAIN = 32


@triton.jit
def _floor_kernel(
    x_ptr,  # [4096] bf16 input row, read after the wait
    w_ptr,  # weights: [programs, 32 KB] bytes per set, read before the wait (WEIGHTS)
    part_ptr,  # [programs] fp32 partials
    cnt_ptr,  # [1] int32 arrival counter, zero between launches
    out_ptr,  # [1] fp32
    PDL: tl.constexpr,
    LOAD: tl.constexpr,  # read x after the wait and write a partial
    ATOMIC: tl.constexpr,  # arrival counter; the last program sums the partials
    WEIGHTS: tl.constexpr,  # load 32 KB of weights per program before the wait
    EARLY: tl.constexpr,  # PDL: let the next launch start at once (else after the wait)
):
    pid = tl.program_id(0)
    npid = tl.num_programs(0)
    acc = 0.0
    if PDL and EARLY:
        gdc_launch_dependents()
    if WEIGHTS:
        offs = tl.arange(0, 8192)  # 128 threads x 16 int32 words = 32 KB
        wv = tl.load(w_ptr + pid.to(tl.int64) * 8192 + offs)
    if PDL:
        gdc_wait()
        if not EARLY:
            gdc_launch_dependents()
    if LOAD:
        xv = tl.load(x_ptr + tl.arange(0, 4096)).to(tl.float32)
        acc = tl.sum(xv)
        if WEIGHTS:
            acc += tl.sum(wv.to(tl.float32))
        if ATOMIC:
            tl.store(part_ptr + pid, acc)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
            if arrived == npid - 1:
                p = tl.load(part_ptr + tl.arange(0, 512), mask=tl.arange(0, 512) < npid, other=0.0)
                tl.store(out_ptr, tl.sum(p))
                tl.atomic_xchg(cnt_ptr, 0)
        else:
            tl.store(part_ptr + pid, acc)
    else:
        if pid == 0:
            tl.store(out_ptr, 1.0)


def _chain_us(fn) -> float:
    fn(0)  # compile outside the capture
    torch.cuda.synchronize()
    return graph_ms(fn, CHAIN) * 1e3


def main() -> None:
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    x = torch.randn(4096, device=dev, dtype=torch.bfloat16)
    part = torch.zeros(512, device=dev)
    cnt = torch.zeros(1, device=dev, dtype=torch.int32)
    out = torch.zeros(1, device=dev)
    rows = []
    for grid in (sms, 2 * sms):
        n_w = max(2, min(CHAIN, (400 << 20) // (grid * 32768)))
        ws = [torch.randint(0, 1 << 20, (grid * 8192,), device=dev, dtype=torch.int32)
              for _ in range(n_w)]  # fmt: skip
        for what, load, atomic, weights in (
            ("empty", False, False, False),
            ("read x", True, False, False),
            ("read x + counter", True, True, False),
            ("32 KB weights + read x + counter", True, True, True),
        ):
            for pdl, early in ((False, False), (True, False), (True, True)):

                def fn(j, pdl=pdl, load=load, atomic=atomic, weights=weights, grid=grid, ws=ws,
                       n_w=n_w, early=early):  # fmt: skip
                    _floor_kernel[(grid,)](
                        x, ws[j % n_w], part, cnt, out, PDL=pdl, LOAD=load, ATOMIC=atomic,
                        WEIGHTS=weights, EARLY=early, num_warps=4,
                        **({"launch_pdl": True} if pdl else {}),
                    )  # fmt: skip

                us = _chain_us(fn)
                mode = "early" if early else "on" if pdl else "off"
                row = {"grid": grid, "what": what, "pdl": mode, "us_per_launch": round(us, 2)}
                rows.append(row)
                print(f"grid {grid:4d}  {what:34s} pdl {mode:5s}  {us:6.2f} us", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(dev), "chain": CHAIN, "rows": rows}))


if __name__ == "__main__":
    main()
