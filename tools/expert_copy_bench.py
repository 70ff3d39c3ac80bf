"""Expert-record copies (pinned host -> GPU slot, through the expert store's copy path) against a
plain pinned 1 GiB copy and a pageable one, measured in the same run.

    python tools/expert_copy_bench.py [--records 258]

V4-Flash record: 13,369,344 bytes (w13 + w2, FP4 + E8M0). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from homeseek.bench import cuda_ms
from homeseek.config import flash_config
from homeseek.experts import RecordBuffer, record_bytes


def _time(fn, reps: int = 5) -> float:
    """Median seconds of fn() on the current stream, after one warm-up."""
    return cuda_ms(fn, reps) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=258, help="43 layers x 6 = one token's worth")
    args = ap.parse_args()
    dev = "cuda"
    cfg = flash_config()
    rec = record_bytes(cfg)
    n = args.records
    host = RecordBuffer(cfg, n, "cpu", pin=True)
    for piece in host.pieces:
        piece.random_()
    pool = RecordBuffer(cfg, n, dev)
    stream = torch.cuda.Stream()

    def records() -> None:
        with torch.cuda.stream(stream):
            for i in range(n):
                pool.copy_in(i, host.row(i), non_blocking=True)  # one copy a record
        torch.cuda.current_stream().wait_stream(stream)

    gib = 1 << 30
    src_pinned = torch.empty(gib, dtype=torch.uint8, pin_memory=True).random_()
    src_pageable = torch.empty(gib, dtype=torch.uint8).random_()
    dst = torch.empty(gib, dtype=torch.uint8, device=dev)
    t_rec = _time(records)
    t_pin = _time(lambda: dst.copy_(src_pinned, non_blocking=True))
    t_page = _time(lambda: dst.copy_(src_pageable), reps=3)
    ok = torch.equal(pool.row(n - 1).cpu(), host.row(n - 1))
    res = {
        "bench": "expert_copy",
        "device": torch.cuda.get_device_name(),
        "record_bytes": rec,
        "records": n,
        "record_copy_gbps": n * rec / t_rec / 1e9,
        "pinned_1gib_gbps": gib / t_pin / 1e9,
        "pageable_1gib_gbps": gib / t_page / 1e9,
        "per_token_ms_all_miss": 258 * rec / (n * rec / t_rec) * 1000,
        "copies_verified": ok,
    }
    res["record_vs_pinned"] = res["record_copy_gbps"] / res["pinned_1gib_gbps"]
    print(f"{'what':<34} {'GB/s':>8}")
    print(f"{'expert records (store copy path)':<34} {res['record_copy_gbps']:>8.1f}")
    print(f"{'plain pinned 1 GiB':<34} {res['pinned_1gib_gbps']:>8.1f}")
    print(f"{'pageable 1 GiB':<34} {res['pageable_1gib_gbps']:>8.1f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
