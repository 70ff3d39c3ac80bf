"""Does a decode layer's small device->host read (its expert ids, into pinned memory) wait behind
the expert-record copies queued on the copy stream?

Decode reads each layer's ids back through a `copy_` into a pinned buffer, queued on the compute
stream (inside A's CUDA graph). If the DMA engine that runs it is the one already busy with
host->device record copies, the ids reach the host only once those copies are done, and records
queued early (the next layer's predicted experts) delay the layer they were meant to hide behind.
Each case queues --records record copies on a side stream first, then on the compute stream a
small read of 64 bytes, and times (host clock) how long the read takes to land:
1. `copy_` (a DMA engine), alone and behind the records;
2. the same `copy_` captured in a CUDA graph and replayed, alone and behind the records;
3. a kernel that stores into the pinned buffer through its device address (no DMA engine),
   alone and behind the records, where this torch/Triton can launch one on host memory.

    python tools/d2h_probe.py [--records 8]

Ends with one JSON line (milliseconds, medians of --reps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from homeseek.config import flash_config
from homeseek.experts import RecordBuffer, record_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    cfg = flash_config()
    n = args.records
    host = RecordBuffer(cfg, n, "cpu", pin=True)
    pool = RecordBuffer(cfg, n, "cuda")
    copy_stream = torch.cuda.Stream()
    ids_dev = torch.arange(8, device="cuda", dtype=torch.long)
    ids_host = torch.zeros(8, dtype=torch.long, pin_memory=True)
    done = torch.cuda.Event()

    def records() -> None:
        with torch.cuda.stream(copy_stream):
            for i in range(n):
                pool.row(i).copy_(host.row(i), non_blocking=True)

    def timed(read: Callable[[], None], behind: bool) -> float:
        ms = []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            if behind:
                records()
            t0 = time.perf_counter()
            read()
            done.record()
            done.synchronize()
            ms.append((time.perf_counter() - t0) * 1000)
        torch.cuda.synchronize()
        return round(statistics.median(ms), 4)

    def by_copy() -> None:
        ids_host.copy_(ids_dev, non_blocking=True)

    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        by_copy()  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        by_copy()

    res: dict[str, object] = {"records": n, "record_MB": record_bytes(cfg) / 1e6}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    records()
    torch.cuda.synchronize()
    res["records_alone_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    for name, fn in (("copy", by_copy), ("graph_copy", g.replay)):
        res[f"{name}_alone_ms"] = timed(fn, False)
        res[f"{name}_behind_records_ms"] = timed(fn, True)
    try:
        kernel = _store_kernel(ids_dev, ids_host)
        kernel()
        torch.cuda.synchronize()
        ok = torch.equal(ids_host, ids_dev.cpu())
        res["kernel_store_exact"] = ok
        res["kernel_alone_ms"] = timed(kernel, False)
        res["kernel_behind_records_ms"] = timed(kernel, True)
    except Exception as e:  # noqa: BLE001 - reported, the other cases stand
        res["kernel_error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(res))


def _store_kernel(src: torch.Tensor, dst_host: torch.Tensor) -> Callable[[], None]:
    """A Triton kernel storing src into pinned host memory through its device address."""
    import triton
    import triton.language as tl

    @triton.jit
    def store(src_ptr, dst_ptr, n: tl.constexpr):
        offs = tl.arange(0, n)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs))

    class _HostPtr:  # Triton takes any object with data_ptr(); the pinned buffer's device address
        def __init__(self, t: torch.Tensor) -> None:
            self.t, self.dtype = t, t.dtype

        def data_ptr(self) -> int:
            return self.t.data_ptr()

    dst = _HostPtr(dst_host)
    n = triton.next_power_of_2(src.numel())
    assert n == src.numel(), "probe: a power-of-two element count"
    return lambda: store[(1,)](src, dst, n)


if __name__ == "__main__":
    main()
