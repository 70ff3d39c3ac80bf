"""CPU lane kernel (kernels/cpu_experts.c): GB/s of expert weight bytes read, against this host's
memory read bandwidth with the same threads, for 1..4 tokens and 1..8 experts per call.

    python tools/cpu_expert_bench.py [--isa avx2,scalar] [--threads 1,4] [--tokens 1,2,3,4]
                                     [--experts 1,2,4,8] [--reps 5]

V4-Flash experts (D = 4096, I = 2048: 13,369,344 bytes each), random codes with realistic scales,
act-quant on, bf16 activations. Calls rotate through a pool of distinct records larger than the
last-level cache, so the weights come from DRAM as they would in decode. Read bandwidth: the
kernel's own pool XOR-reading a 1 GiB buffer (the same threads, the same code path for threads),
and a multi-threaded torch.sum over the same buffer for reference. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from homeseek.kernels import cpu_experts as ce
from homeseek.kernels.fp4_experts import V4_FLASH_D, V4_FLASH_I, slot_bytes


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _median_s(fn, reps: int) -> float:
    """Median wall seconds of fn() over reps calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _records(n: int, d: int, n_i: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    def u8(shape: tuple[int, int], lo: int, hi: int) -> torch.Tensor:
        return torch.randint(lo, hi, shape, dtype=torch.uint8, generator=gen)

    return [
        {
            "w13_q": u8((2 * n_i, d // 2), 0, 256),
            "w13_s": u8((2 * n_i, d // 32), 118, 128),
            "w2_q": u8((d, n_i // 2), 0, 256),
            "w2_s": u8((d, n_i // 32), 118, 128),
        }
        for _ in range(n)
    ]


def main() -> None:
    feats = ce.cpu_features()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", default=",".join(feats["paths"]), help="paths to run (comma list)")
    ap.add_argument(
        "--threads",
        default=",".join(
            str(t) for t in sorted({1, feats["default_threads"], feats["usable_cores"]})
        ),
        help="thread counts (comma list; default 1, all cores but one, all cores)",
    )
    ap.add_argument("--tokens", default="1,2,3,4")
    ap.add_argument("--experts", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pool", type=int, default=40, help="distinct expert records rotated through")
    ap.add_argument("--bw-mib", type=int, default=1024, help="size of the read-bandwidth buffer")
    args = ap.parse_args()

    d, n_i = V4_FLASH_D, V4_FLASH_I
    rec_bytes = slot_bytes(d, n_i)
    gen = torch.Generator().manual_seed(0)
    pool = _records(max(args.pool, max(_ints(args.experts))), d, n_i, gen)
    buf = torch.randint(0, 256, (args.bw_mib << 20,), dtype=torch.uint8, generator=gen)
    print(f"cpu: {feats}")
    print(
        f"expert record: {rec_bytes:,} bytes; pool {len(pool)} records "
        f"({len(pool) * rec_bytes / 2**20:.0f} MiB); read buffer {args.bw_mib} MiB"
    )

    rows = []
    read_bw: dict[int, dict[str, float]] = {}
    for isa in args.isa.split(","):
        ok, why = ce.available(isa)
        if not ok:
            print(f"{isa}: skipped ({why})")
            continue
        for threads in _ints(args.threads):
            with ce.CpuExperts(threads=threads, isa=isa) as lane:
                if threads not in read_bw:
                    torch_threads = torch.get_num_threads()
                    torch.set_num_threads(threads)
                    flt = buf.view(torch.float32)
                    t_sum = _median_s(lambda flt=flt: flt.sum(), args.reps)
                    torch.set_num_threads(torch_threads)
                    t_xor = _median_s(lambda lane=lane: lane.read_xor(buf), args.reps)
                    read_bw[threads] = {
                        "c_read": buf.numel() / t_xor / 1e9,
                        "torch_sum": buf.numel() / t_sum / 1e9,
                    }
                bw = read_bw[threads]["c_read"]
                for n_t in _ints(args.tokens):
                    x = torch.randn(n_t, d, generator=gen).bfloat16().float()
                    for n in _ints(args.experts):
                        w = torch.rand(n_t, n, generator=gen) + 0.05
                        out = torch.empty(n_t, d)
                        start = [0]

                        def call(lane=lane, x=x, w=w, n=n, out=out, start=start) -> None:
                            k = start[0]
                            recs = [pool[(k + j) % len(pool)] for j in range(n)]
                            start[0] = (k + n) % len(pool)
                            lane.run(x, w, recs, 10.0, True, torch.bfloat16, out=out)

                        t = _median_s(call, args.reps)
                        gbs = n * rec_bytes / t / 1e9
                        rows.append(
                            {
                                "isa": isa,
                                "threads": threads,
                                "tokens": n_t,
                                "experts": n,
                                "ms": round(t * 1e3, 3),
                                "gb_s": round(gbs, 2),
                                "read_gb_s": round(bw, 2),
                                "pct_of_read": round(100 * gbs / bw, 1),
                            }
                        )

    # Reading a record of the tier below the host cache into a host slot: the pool's parallel
    # copy (what the expert store uses) against one torch copy.
    copy_gb_s: dict[str, float] = {}
    # As many destinations as sources, in turn: the store's host slots are cold, and one
    # destination reused would stay in the caches (cached stores would then skip their reads
    # for ownership, which the store's copies pay).
    dsts = [{k: torch.zeros_like(v) for k, v in rec.items()} for rec in pool]  # touched
    for threads in _ints(args.threads):
        with ce.CpuExperts(threads=threads) as lane:
            i = [0]

            for streaming in (True, False):

                def pcopy(lane=lane, i=i, streaming=streaming) -> None:
                    i[0] = (i[0] + 1) % len(pool)
                    dst = dsts[(i[0] + 1) % len(pool)]
                    lane.copy([(dst[k], pool[i[0]][k]) for k in dst], streaming=streaming)

                how = "streaming" if streaming else "cached"
                key = f"pool {threads} thr {how}"
                copy_gb_s[key] = rec_bytes / _median_s(pcopy, args.reps) / 1e9

    def tcopy(i=[0]) -> None:  # noqa: B006 - a counter shared by the calls
        i[0] = (i[0] + 1) % len(pool)
        dst = dsts[(i[0] + 1) % len(pool)]
        for k in dst:
            dst[k].copy_(pool[i[0]][k])

    copy_gb_s["torch copy_"] = rec_bytes / _median_s(tcopy, args.reps) / 1e9
    print("\nrecord copy (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in copy_gb_s.items()))
    print(
        "\nmemory read bandwidth (GB/s): "
        + ", ".join(
            f"{t} thr: C read {v['c_read']:.1f}, torch.sum {v['torch_sum']:.1f}"
            for t, v in read_bw.items()
        )
    )
    print(f"\n{'isa':<8} {'thr':>3} {'T':>2} {'n':>2} {'ms':>9} {'GB/s':>7} {'read':>6} {'%':>6}")
    for r in rows:
        print(
            f"{r['isa']:<8} {r['threads']:>3} {r['tokens']:>2} {r['experts']:>2} {r['ms']:>9.3f} "
            f"{r['gb_s']:>7.2f} {r['read_gb_s']:>6.1f} {r['pct_of_read']:>6.1f}"
        )
    summary = {
        "bench": "cpu_expert",
        "cpu": feats,
        "record_bytes": rec_bytes,
        "read_gb_s": {str(t): {k: round(v, 2) for k, v in bw.items()} for t, bw in read_bw.items()},
        "rows": rows,
        "record_copy_gb_s": {k: round(v, 2) for k, v in copy_gb_s.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
