"""The CPU lane's hand-off: a kernel that makes its stream wait for the host, then reads the
host's result in place.

Decode's CPU lane computes some of a layer's experts on the host while the GPU works; the
layer's expert kernel needs their sum. Handed over by the host (wait for the lane's job, then
copy), the wait sits on the host's critical path: the host can queue nothing else meanwhile.
Handed over on the GPU, the host queues this kernel and the layer's expert kernel at once and
goes on; the kernel polls a flag in pinned host memory until the lane's worker has written the
job's sequence number there (after the sum), then copies the sum from pinned memory into a
device buffer. Both are read through device views of the pinned buffers
(`homeseek.experts.device_view`), with volatile loads: each poll is a read over the bus, and the
sum is read only after the flag was seen (the host wrote it first; its stores reach memory in
order: this relies on the host storing in program order, as x86-64 does, and on the kernel's
reads of the sum being issued after the loop that saw the flag). A poll budget bounds the
wait: past it the kernel writes NaN, so a lane that never answers cannot hang the GPU for good
(its worker writes the flag even when its job fails, and the host raises the job's error). A
poll is a read over the bus, at least `MIN_POLL_S`: a job that ended within
`MAX_POLLS * MIN_POLL_S` of its submission cannot have outlasted the wait, and the lane flags
any job that took longer (`CpuLane.handoff_late`), so a run-out wait never passes silently.

`await_copy_ref` is the plain-torch twin (host memory, a Python poll).
"""

from __future__ import annotations

import time

import torch

from ._formats import check_tensor, require_triton, tl, triton

__all__ = ["MAX_POLLS", "MIN_POLL_S", "await_copy", "await_copy_ref"]

# Polls of the flag before giving up, and a lower bound of one poll's time (a read over the
# bus; ~1 us over PCIe): the wait lasts at least MAX_POLLS * MIN_POLL_S, ~107 s.
MAX_POLLS = 1 << 30
MIN_POLL_S = 1e-7


# `expected` changes at every call: not specialised, or Triton would compile again for values
# that are 1 or divisible by 16.
@triton.jit(do_not_specialize=["expected"])
def _await_copy_kernel(flag_ptr, expected, src_ptr, dst_ptr, n, max_polls, BLOCK: tl.constexpr):
    seen = tl.load(flag_ptr, volatile=True)
    polls = 0
    while (seen != expected) & (polls < max_polls):
        seen = tl.load(flag_ptr, volatile=True)
        polls += 1
    ok = seen == expected
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(src_ptr + offs, mask=m, other=0.0, volatile=True)
        v = tl.where(ok, v, float("nan"))
        tl.store(dst_ptr + offs, v, mask=m)


def await_copy(
    flag: torch.Tensor,
    expected: int,
    src: torch.Tensor,
    dst: torch.Tensor,
    max_polls: int = MAX_POLLS,
) -> torch.Tensor:
    """On dst's stream: wait until flag [1] int32 == expected, then dst <- src (fp32, same
    numel; NaN if the wait ran out of polls). flag and src: device views of pinned memory."""
    require_triton("await_copy")
    check_tensor("flag", flag, shape=(1,), dtypes=(torch.int32,))
    check_tensor("dst", dst, dtypes=(torch.float32,))
    check_tensor("src", src, shape=tuple(dst.shape), dtypes=(torch.float32,))
    n = dst.numel()
    _await_copy_kernel[(1,)](flag, expected, src, dst, n, max_polls, BLOCK=1024, num_warps=4)
    return dst


def await_copy_ref(
    flag: torch.Tensor,
    expected: int,
    src: torch.Tensor,
    dst: torch.Tensor,
    max_polls: int = MAX_POLLS,
) -> torch.Tensor:
    """The twin: poll flag from Python (a microsecond's sleep between polls), then copy."""
    for _ in range(max_polls):
        if int(flag[0]) == expected:
            return dst.copy_(src)
        time.sleep(1e-6)
    return dst.fill_(float("nan"))
