"""Does a small pinned -> device copy make the host wait for the stream's queued kernels?

Queues ~0.25 s of GPU work (`torch.cuda._sleep`), then copies [2, n] int64 rows from pinned
memory in two ways, and prints whether the GPU work had already finished when the copy call
returned (then the host waited for it):

- `strided`: rows [:, :n] of [2, width] buffers, as `ExpertStore._staged` copied slot-map
  updates until session 17. torch first copies a strided source into pageable memory, and a
  copy from pageable memory waits for the stream.
- `contiguous`: the first 2n elements of flat buffers, viewed as [2, n] (what it does now).

    python tools/staging_probe.py
"""

from __future__ import annotations

import json

import torch


def main() -> None:
    width = 2048
    host = torch.empty(2, width, dtype=torch.long, pin_memory=True)
    dev = torch.empty(2, width, dtype=torch.long, device="cuda")
    flat_h = torch.empty(2 * width, dtype=torch.long, pin_memory=True)
    flat_d = torch.empty(2 * width, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    for name in ("strided", "contiguous"):
        for n in (5, 300):
            torch.cuda._sleep(500_000_000)  # ~0.25 s on the current stream
            busy = torch.cuda.Event()
            busy.record()
            if name == "strided":
                dev[:, :n].copy_(host[:, :n], non_blocking=True)
            else:
                flat_d[: 2 * n].view(2, n).copy_(flat_h[: 2 * n].view(2, n), non_blocking=True)
            waited = busy.query()
            torch.cuda.synchronize()
            print(json.dumps({"copy": name, "rows": n, "host_waited_for_stream": waited}))


if __name__ == "__main__":
    main()
