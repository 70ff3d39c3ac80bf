"""Do expert-record copies (pinned host -> GPU) run beside kernels on this machine, and what does
queueing one cost the thread that queues it?

Four measurements, each alone and then together, all on one process and GPU:
1. the host time of one `copy_(pinned, non_blocking=True)` of a V4-Flash record (13.4 MB) on a
   side stream, against its GPU time (is the queueing asynchronous?);
2. the GPU: a queue of matmuls on one stream and a queue of record copies on another, both
   queued up front from one thread: together against each alone (do the engines overlap?);
3. the threads: the main thread launches many small kernels while a second thread queues the
   copies (as the expert store's background loads do): the main thread's launch time and the
   GPU span against each alone (does queueing a copy hold up the other thread's launches?);
4. a deep queue of copies (a scan queues a layer's 256 records at once) from a second thread
   beside small kernels and matmuls from the main thread, unbounded and with at most 16 / 64
   copies queued ahead of the copy engine.

    python tools/copy_overlap_probe.py [--records 128]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable

import torch

from homeseek.config import flash_config
from homeseek.experts import RecordBuffer, record_bytes


def _span(fn: Callable[[], object]) -> tuple[float, float]:
    """fn() between two syncs -> (host seconds of the call, wall seconds until the GPU is done)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return t1 - t0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--matmuls", type=int, default=60)
    ap.add_argument("--small", type=int, default=3000, help="small kernels to launch")
    ap.add_argument("--deep", type=int, default=1024, help="copies of the deep queue (4.)")
    args = ap.parse_args()
    cfg = flash_config()
    n, rec = args.records, record_bytes(cfg)
    host = RecordBuffer(cfg, n, "cpu", pin=True)
    for p in host.pieces:
        p.random_()
    pool = RecordBuffer(cfg, n, "cuda")
    copy_stream, mm_stream = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, device="cuda")
    out: dict[str, float] = {"record_bytes": rec, "records": n}

    def copies() -> None:
        with torch.cuda.stream(copy_stream):
            for i in range(n):
                pool.row(i).copy_(host.row(i), non_blocking=True)

    def matmuls() -> None:
        with torch.cuda.stream(mm_stream):
            for _ in range(args.matmuls):
                a @ a

    def small() -> None:
        y = x
        for _ in range(args.small):
            y = y * 1.0001

    for f in (copies, matmuls, small):  # warm up
        _span(f)

    # 1. one record's copy: host time of the call against its GPU time
    calls, gpu = [], []
    for i in range(20):
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(copy_stream):
            e0.record()
            t0 = time.perf_counter()
            pool.row(i % n).copy_(host.row(i % n), non_blocking=True)
            calls.append(time.perf_counter() - t0)
            e1.record()
        torch.cuda.synchronize()
        gpu.append(e0.elapsed_time(e1) / 1e3)
    out["one_copy_call_us"] = round(statistics.median(calls) * 1e6, 1)
    out["one_copy_gpu_us"] = round(statistics.median(gpu) * 1e6, 1)

    # 2. the engines: copies and matmuls queued up front from one thread
    h, w = _span(copies)
    out.update(copies_host_s=round(h, 4), copies_wall_s=round(w, 4))
    out["copies_GBps"] = round(n * rec / w / 1e9, 1)
    h, w = _span(matmuls)
    out.update(matmuls_host_s=round(h, 4), matmuls_wall_s=round(w, 4))
    h, w = _span(lambda: (matmuls(), copies()))
    out.update(both_one_thread_host_s=round(h, 4), both_one_thread_wall_s=round(w, 4))

    # 3. the threads: small kernels from the main thread, copies from another
    h, w = _span(small)
    out.update(small_host_s=round(h, 4), small_wall_s=round(w, 4))
    t = threading.Thread(target=copies)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    t.start()
    small()
    h = time.perf_counter() - t0
    t.join()
    torch.cuda.synchronize()
    out.update(small_beside_copies_host_s=round(h, 4),
               both_two_threads_wall_s=round(time.perf_counter() - t0, 4))  # fmt: skip
    # the matmul queue beside copies queued by another thread
    t = threading.Thread(target=copies)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    t.start()
    matmuls()
    t.join()
    torch.cuda.synchronize()
    out["matmuls_beside_thread_copies_wall_s"] = round(time.perf_counter() - t0, 4)

    # 4. a deep queue, as a scan's layer queues it (hundreds of records at once), from another
    #    thread while the main thread launches small kernels and matmuls, with at most `bound`
    #    copies queued ahead of the copy engine (0: no bound): the copy thread's host time, the
    #    main thread's launch time and the wall
    def deep(bound: int) -> None:
        ends: list[torch.cuda.Event] = []
        with torch.cuda.stream(copy_stream):
            for j in range(args.deep):
                if bound and len(ends) >= bound:
                    ends[-bound].synchronize()
                pool.row(j % n).copy_(host.row(j % n), non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                ends.append(ev)

    for bound in (0, 16, 64):
        res: dict[str, float] = {}

        def copier(bound: int = bound, res: dict[str, float] = res) -> None:
            t = time.perf_counter()
            deep(bound)
            res["issue"] = time.perf_counter() - t

        t = threading.Thread(target=copier)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t.start()
        for _ in range(3):
            small()
            matmuls()
        launch = time.perf_counter() - t0
        t.join()
        torch.cuda.synchronize()
        tag = f"deep{args.deep}_bound{bound}"
        out[f"{tag}_copy_issue_s"] = round(res["issue"], 4)
        out[f"{tag}_matmul_launch_s"] = round(launch, 4)
        out[f"{tag}_wall_s"] = round(time.perf_counter() - t0, 4)
    _, w = _span(lambda: deep(0))
    out[f"deep{args.deep}_copies_alone_wall_s"] = round(w, 4)
    h, w = _span(lambda: [(small(), matmuls()) for _ in range(3)])
    out["small_matmuls_x3_alone_host_s"] = round(h, 4)
    out["small_matmuls_x3_alone_wall_s"] = round(w, 4)
    for k, v in out.items():
        print(f"{k:40s} {v}")
    print(json.dumps({"probe": "copy_overlap", **out}))


if __name__ == "__main__":
    main()
