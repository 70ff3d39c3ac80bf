"""Does a small host -> device transfer on the compute stream wait behind the copy stream's
expert copies?

The prefill layer timeline of session 18 showed the compute stream's work after a layer's
experts starting only when the copy stream had finished the next layer's expert copies, where
nothing the engine queued makes it wait for those. A guess: the compute stream's small
pinned -> device copies (slot-map updates, slot tables, the CPU lane's sum) are served by the
same copy engine as the expert copies, in the order they reach it, so a small copy that
becomes ready after ~70 ms of expert copies were queued runs after all of them. This probe
did not reproduce it (the small copy ran at once in every case, session 18); reading those
bytes in place did remove the wait in the engine (tools/PERF_NOTES.md, session 18).

The probe queues, on the compute stream, a spin of --spin-ms then a small transfer; on a
copy stream --records copies of one expert record each; and times both on the device:

- `memcpy`: the small transfer as a pinned -> device copy (what the engine did before);
- `zero-copy`: a kernel reads the pinned rows in place (a device view of the pinned buffer,
  `homeseek.experts.device_view`) and writes them cast to int32 (no copy engine at all).

(That a CUDA graph's kernel reads such a view afresh at each replay is
`tests/test_gpu_engine.py::test_cuda_device_view_reads_the_host_in_place`; session 18's run of
this probe printed it too.)

`order`: `spin-first` queues the compute stream's work first (the small transfer is ready only
after the spin, by when the expert copies are queued); `copies-first` queues the copies first
and the small transfer on an idle compute stream. Prints one JSON line per case.

    python tools/copy_queue_probe.py
"""

from __future__ import annotations

import argparse
import json

import torch

from homeseek.experts import device_view

RECORD_BYTES = 13_369_344  # one V4-Flash expert record


CYCLES_PER_MS = 2e6  # replaced by `calibrate`


def calibrate() -> float:
    """GPU clock cycles of `torch.cuda._sleep` per millisecond, measured."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm
    a.record()
    torch.cuda._sleep(20_000_000)
    b.record()
    b.synchronize()
    return 20_000_000 / a.elapsed_time(b)


def case(
    mode: str, order: str, spin_ms: float, srcs: list[torch.Tensor], dsts: list[torch.Tensor]
) -> dict[str, object]:
    compute = torch.cuda.current_stream()
    copy = torch.cuda.Stream()
    n = 8
    host = torch.arange(2 * n, dtype=torch.long).pin_memory()
    dev = torch.full((2 * n,), -1, dtype=torch.int32, device="cuda")
    view = device_view(host)
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    small = torch.cuda.Event(enable_timing=True)
    big = torch.cuda.Event(enable_timing=True)
    cycles = int(spin_ms * CYCLES_PER_MS)
    t0.record(compute)

    def queue_small() -> None:
        torch.cuda._sleep(cycles)
        if mode == "memcpy":
            dev.copy_(host.to("cuda", non_blocking=True))
        else:
            dev.copy_(view)  # a cast kernel: int64 read in place -> int32
        small.record(compute)

    def queue_copies() -> None:
        copy.wait_event(t0)
        with torch.cuda.stream(copy):
            for s, d in zip(srcs, dsts, strict=True):
                d.copy_(s, non_blocking=True)
            big.record(copy)

    if order == "spin-first":
        queue_small()
        queue_copies()
    else:
        queue_copies()
        queue_small()
    torch.cuda.synchronize()
    ok = dev.cpu().tolist() == list(range(2 * n))
    return {
        "mode": mode,
        "order": order,
        "spin_ms": spin_ms,
        "records": len(srcs),
        "small_done_ms": round(t0.elapsed_time(small), 3),
        "copies_done_ms": round(t0.elapsed_time(big), 3),
        "values_ok": ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=40)
    ap.add_argument("--spin-ms", type=float, default=2.0)
    args = ap.parse_args()
    global CYCLES_PER_MS
    CYCLES_PER_MS = calibrate()
    srcs = [torch.empty(RECORD_BYTES, dtype=torch.uint8).pin_memory() for _ in range(args.records)]
    dsts = [torch.empty(RECORD_BYTES, dtype=torch.uint8, device="cuda") for _ in srcs]
    for s, d in zip(srcs, dsts, strict=True):  # first touch
        d.copy_(s)
    for rep in range(2):
        for order in ("spin-first", "copies-first"):
            for mode in ("memcpy", "zero-copy"):
                row = case(mode, order, args.spin_ms, srcs, dsts)
                row["rep"] = rep
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
