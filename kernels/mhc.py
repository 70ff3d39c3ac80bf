"""mHC (manifold-constrained hyper-connections), v4-architecture.md §3.2; all math in fp32.

Letters: T tokens, D model dim, 4 residual streams, W = 4*D flattened stream width.

pre (sublayer variant, fn [24, W], scale [3], base [24]):
    r = 1/sqrt(mean(X^2) + norm_eps) over all W values of a token;  m = (X.flat . fn^T) * r
    pre  = sigmoid(m[0:4] * scale[0] + base[0:4]) + hc_eps
    post = 2 * sigmoid(m[4:8] * scale[1] + base[4:8])
    C    = m[8:24].view(4, 4) * scale[2] + base[8:24]
    Sinkhorn: C = softmax(C, -1) + hc_eps; C /= colsum + hc_eps;
              (iters - 1) x { C /= rowsum + hc_eps; C /= colsum + hc_eps }
    y = sum_k pre_k * X_k   -> (y [T, D], post [T, 4], C [T, 4, 4])
head variant (fn [4, W], scale [1], base [4]): only pre and y.
post: X'_k = post_k * F + sum_j C[j, k] * X_j.

Decode and short prompts (T < _BLOCK_MIN_T): one launch, the split kernel. The W-long
projection is split over SPLIT programs per token (fn is 1.5 MB, too much for one SM at decode);
each writes fp32 partials, and the last to arrive (atomic counter, reset afterwards) reduces them
in a fixed order, runs the 4x4 Sinkhorn in registers and writes y.
Longer prompts (T >= _BLOCK_MIN_T): two launches. The split kernel would read all of fn from L2
once per token (6.4 GB at T=4096), and one program per token block over all of W is a long
serial chain (latency-bound), so the block kernel splits both ways: grid (token blocks of
BLOCK_T, SPLIT slices of W); each program streams its fn slice once for its BLOCK_T tokens
through a tl.dot at fp32-level error (tf32x3 on tensor cores; fp32 FMAs before sm_80) and
writes the same fp32 partial rows as the split kernel. The finish kernel (one program per token)
then runs the split kernel's epilogue on them (_pre_finish, shared: same fixed-order reduction,
Sinkhorn and y).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._formats import check_tensor, require_triton, tl, triton

__all__ = [
    "MhcWorkspace",
    "mhc_head",
    "mhc_head_ref",
    "mhc_post",
    "mhc_post_ref",
    "mhc_pre",
    "mhc_pre_ref",
    "mhc_workspace",
]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_PART = 32  # partial row: 8 pre/post sums, 16 comb sums, 1 sum of squares, padding


def _split(t: int) -> int:
    """Split kernel's programs per token over the W-long projection (a power of two). Decode:
    64, so each reads one 256-column slice of fn (H200: 17 us at 16 splits, ~half at 64); from
    17 tokens (up to _BLOCK_MIN_T) 16 per token already fill the GPU."""
    return 64 if t <= 16 else 16


def _part_rows(max_t: int) -> int:
    """Partial rows that every T <= max_t fits in, whichever kernel it takes: the split kernel's
    T * _split(T) (64 T up to 16 tokens, then 16 T) and the block kernel's T * SPLIT
    (_block_config: 16 T, or 32 T / 64 T only while there are <= 32 / 16 token blocks of <= 32
    tokens, so <= 1024 * 32 rows)."""
    return max(16 * max_t, min(64 * max_t, 1024 * 32))


# The block kernel (two launches) serves T >= _BLOCK_MIN_T, the split kernel T below it (decode).
# Measured on the H200 (tools/bench_kernels.py --only mhc, bf16, D=4096; session 20, the block
# kernel's dot at tf32x3; `tools/results/bench-mhc-h200-s20.log`):
#   T      split kernel   block kernel
#   64        27.8 us        14.9 us
#   128       47.1 us        17.3 us
#   256       84.3 us        24.5 us
#   1024     218.3 us        74.8 us
#   4096     895.6 us       266.7 us
#   16384   3606   us      1007   us
# so the block kernel wins from the smallest T measured (64); at decode's T = 1..4 the split
# kernel's one launch is what counts. (With the fp32-FMA dot of session 19 the crossover lay
# between 256 and 1024.)
_BLOCK_MIN_T = 64


def _use_block(t: int) -> bool:
    return t >= _BLOCK_MIN_T


def _block_config(t: int) -> dict:
    """Tiles of the block kernel. Its unsplit predecessor (T/16 or T/32 programs, each all 512
    steps of W) ran ~1.3-1.7 us per step at any T: one program per SM waits on every step's loads.
    SPLIT slices of W per token block give ~1024 programs (~8 per SM on 132 SMs, whose loads
    overlap) with 8-32 steps each. BLOCK_T tokens share each fn tile: fn comes from L2 once per
    BLOCK_T tokens (200 MB at T=4096 with 32, against 6.4 GB for the split kernel); 16 below T=512
    so that small T still has token blocks to spread. With 4 warps a [32, 32] accumulator is 8 fp32
    per thread, the x tile 8 and the sum of squares 8 (registers, hence occupancy, stay moderate);
    BLOCK 32 keeps the dot's per-thread operand slices (K long) small. PREC "tf32x3": three tf32
    tensor-core products per step (x and fn each split into a tf32 high part and the remainder),
    at fp32-level error. Measured on the H200 (session 20, against a float64 reference, bf16 x,
    D=4096, T=1024): 82 us against 192 us for "ieee" (fp32 FMAs), relative error of post / comb
    1.2e-6 / 2.2e-6 against 1.8e-6 / 2.7e-6 for ieee and 1.1e-6 / 2.1e-6 for the split kernel.
    Plain "tf32" (or a broadcast-multiply-and-sum, which Triton turns into a tf32 dot) errs ~1e-3.
    Optional key "num_stages" (Triton's default otherwise)."""
    bt = 16 if t < 512 else 32
    n_blk = -(-t // bt)
    split = 64 if n_blk <= 16 else 32 if n_blk <= 32 else 16
    return {"BLOCK_T": bt, "SPLIT": split, "BLOCK": 32, "num_warps": 4, "PREC": "tf32x3"}


def _block_prec(prec: str, device: torch.device) -> str:
    """tf32x3 needs tensor cores with tf32 (sm_80 on); older parts take the fp32 FMA dot."""
    if prec.startswith("tf32") and device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "ieee"
    return prec


def _sinkhorn_ref(c: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    c = torch.softmax(c, dim=-1) + hc_eps
    c = c / (c.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + hc_eps)
        c = c / (c.sum(-2, keepdim=True) + hc_eps)
    return c


def _mix_ref(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    xf = x.float().flatten(1)  # [T, W]
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    return (xf @ fn.float().t()) * r


def mhc_pre_ref(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    *,
    hc_eps: float = 1e-6,
    iters: int = 20,
    norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, 4, D] -> (y [T, D] in x's dtype, post [T, 4] fp32, comb [T, 4, 4] fp32)."""
    t = x.shape[0]
    m = _mix_ref(x, fn, norm_eps)
    pre = torch.sigmoid(m[:, :4] * scale[0] + base[:4]) + hc_eps
    post = 2 * torch.sigmoid(m[:, 4:8] * scale[1] + base[4:8])
    comb = _sinkhorn_ref((m[:, 8:] * scale[2] + base[8:]).view(t, 4, 4), hc_eps, iters)
    y = (pre[:, :, None] * x.float()).sum(1)
    return y.to(x.dtype), post, comb


def mhc_head_ref(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    *,
    hc_eps: float = 1e-6,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Head collapse: x [T, 4, D], fn [4, 4D] -> y [T, D] in x's dtype."""
    m = _mix_ref(x, fn, norm_eps)
    pre = torch.sigmoid(m * scale[0] + base) + hc_eps
    return (pre[:, :, None] * x.float()).sum(1).to(x.dtype)


def mhc_post_ref(
    f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """X'_k = post_k * F + sum_j comb[j, k] * X_j: f [T, D], x [T, 4, D] -> [T, 4, D] (x dtype)."""
    out = post.float()[:, :, None] * f.float()[:, None, :]
    out = out + torch.einsum("tjk,tjd->tkd", comb.float(), x.float())
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _pre_finish(
    t,  # token
    x_ptr,  # [T, 4, D] contiguous
    scale_ptr,
    base_ptr,
    y_ptr,
    post_ptr,
    comb_ptr,
    part_ptr,  # [T, SPLIT, 32] fp32 partial rows (column n: fn row n; column 24: sum of squares)
    D,
    hc_eps,
    norm_eps,
    ITERS: tl.constexpr,
    HEAD: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Epilogue of one token, shared by both paths: its SPLIT partial rows reduced in a fixed
    order, r, pre / post, the Sinkhorn, y."""
    W = 4 * D
    r2 = tl.arange(0, 2)
    r4 = tl.arange(0, 4)
    pp_rows = r2[:, None] * 4 + r4[None, :]
    cc_rows = 8 + r4[:, None] * 4 + r4[None, :]
    x_row = x_ptr + t.to(tl.int64) * W
    # All partials in one load (a loop over the splits costs a dependent L2 round trip per
    # split, which dominated at decode), reduced in a fixed order.
    sx = tl.arange(0, SPLIT_P2)
    s_ok = sx < SPLIT
    srows = part_ptr + (t * SPLIT + sx) * 32  # [SPLIT_P2]
    m3 = s_ok[:, None, None]
    pp = tl.load(srows[:, None, None] + pp_rows[None], mask=m3, other=0.0, cache_modifier=".cg")
    pp = tl.sum(pp, axis=0)
    sq = tl.sum(tl.load(srows + 24, mask=s_ok, other=0.0, cache_modifier=".cg"), axis=0)
    r = 1.0 / tl.sqrt_rn(sq / W + norm_eps)
    s0 = tl.load(scale_ptr)
    pre_m = tl.sum(tl.where(r2[:, None] == 0, pp, 0.0), axis=0) * r  # [4]
    pre = 1.0 / (1.0 + tl.exp(-(pre_m * s0 + tl.load(base_ptr + r4)))) + hc_eps
    if not HEAD:  # (the head's block kernel leaves the comb columns of its rows unwritten)
        cc = tl.load(srows[:, None, None] + cc_rows[None], mask=m3, other=0.0, cache_modifier=".cg")
        cc = tl.sum(cc, axis=0)
        s1 = tl.load(scale_ptr + 1)
        s2 = tl.load(scale_ptr + 2)
        post_m = tl.sum(tl.where(r2[:, None] == 1, pp, 0.0), axis=0) * r
        post = 2.0 / (1.0 + tl.exp(-(post_m * s1 + tl.load(base_ptr + 4 + r4))))
        tl.store(post_ptr + t * 4 + r4, post)
        c = cc * r * s2 + tl.load(base_ptr + cc_rows)
        c = tl.exp(c - tl.max(c, axis=1)[:, None])
        c = c / tl.sum(c, axis=1)[:, None] + hc_eps
        c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
        for _ in tl.static_range(ITERS - 1):
            c = c / (tl.sum(c, axis=1)[:, None] + hc_eps)
            c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
        tl.store(comb_ptr + t * 16 + r4[:, None] * 4 + r4[None, :], c)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        xs = tl.load(x_row + r4[:, None] * D + dd[None, :], mask=d_ok[None, :], other=0.0).to(
            tl.float32
        )
        y = tl.sum(pre[:, None] * xs, axis=0)
        tl.store(y_ptr + t.to(tl.int64) * D + dd, y.to(y_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _mhc_pre_kernel(
    x_ptr,  # [T, 4, D] contiguous (row = W values)
    fn_ptr,  # [24, W] fp32 (head: [4, W]), contiguous
    scale_ptr,  # [3] fp32 (head: [1])
    base_ptr,  # [24] fp32 (head: [4])
    y_ptr,  # [T, D], contiguous
    post_ptr,  # [T, 4] fp32 (unused for HEAD)
    comb_ptr,  # [T, 4, 4] fp32 (unused for HEAD)
    part_ptr,  # [T, SPLIT, 32] fp32 partial sums
    cnt_ptr,  # [T] int32 arrival counters, zero before and after
    D,
    CHUNK,  # W range of one split, a multiple of BLOCK
    hc_eps,
    norm_eps,
    ITERS: tl.constexpr,  # Sinkhorn iterations (20)
    HEAD: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,  # next power of two >= SPLIT
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    sp = tl.program_id(1)
    W = 4 * D
    r2 = tl.arange(0, 2)
    r4 = tl.arange(0, 4)
    n_rows = 4 if HEAD else 24
    # rows of fn: pre/post as [2, 4] (row 4*i + k), comb as [4, 4] (row 8 + 4*j + k)
    pp_rows = r2[:, None] * 4 + r4[None, :]
    cc_rows = 8 + r4[:, None] * 4 + r4[None, :]
    acc_pp = tl.zeros([2, 4], dtype=tl.float32)
    acc_cc = tl.zeros([4, 4], dtype=tl.float32)
    ssq = tl.zeros([BLOCK], dtype=tl.float32)
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, W)
    x_row = x_ptr + t.to(tl.int64) * W
    for c0 in range(lo, hi, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < hi
        xv = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        ssq += xv * xv
        f = tl.load(
            fn_ptr + pp_rows[:, :, None] * W + cols[None, None, :],
            mask=(pp_rows[:, :, None] < n_rows) & ok[None, None, :],
            other=0.0,
        )
        acc_pp += tl.sum(f * xv[None, None, :], axis=2)
        if not HEAD:
            f = tl.load(
                fn_ptr + cc_rows[:, :, None] * W + cols[None, None, :],
                mask=ok[None, None, :],
                other=0.0,
            )
            acc_cc += tl.sum(f * xv[None, None, :], axis=2)
    prow = part_ptr + (t * SPLIT + sp) * 32
    tl.store(prow + pp_rows, acc_pp)
    tl.store(prow + cc_rows, acc_cc)
    tl.store(prow + 24, tl.sum(ssq, axis=0))
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel")
    if arrived == SPLIT - 1:
        _pre_finish(
            t, x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, part_ptr, D, hc_eps,
            norm_eps, ITERS, HEAD, SPLIT, SPLIT_P2, BLOCK_D,
        )  # fmt: skip
        tl.atomic_xchg(cnt_ptr + t, 0)


@triton.jit
def _mhc_pre_block_kernel(
    x_ptr,  # [T, 4, D] contiguous (row = W values)
    fn_ptr,  # [24, W] fp32 (head: [4, W]), contiguous
    part_ptr,  # [T, SPLIT, 32] fp32 partial rows, SPLIT = the grid's second axis
    T,
    D,
    CHUNK,  # W range of one split, a multiple of BLOCK
    HEAD: tl.constexpr,
    N_P: tl.constexpr,  # fn rows padded to a tl.dot width (>= 16): 32, head 16
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK: tl.constexpr,  # W columns per step
    PREC: tl.constexpr,  # tl.dot input_precision
):
    """Partial rows of BLOCK_T tokens over one W slice: the slice's fn tiles are read once for
    all of them, and the tokens' sums go to the same rows the split kernel writes."""
    tt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    sp = tl.program_id(1)
    t_ok = tt < T
    W = 4 * D
    n_rows = 4 if HEAD else 24
    nn = tl.arange(0, N_P)
    x_rows = x_ptr + tt.to(tl.int64)[:, None] * W  # [BLOCK_T, 1]
    acc = tl.zeros([BLOCK_T, N_P], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_T, BLOCK], dtype=tl.float32)  # reduced once, after the loop
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, W)
    for c0 in range(lo, hi, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        c_ok = cols < hi
        xv = tl.load(x_rows + cols[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(
            tl.float32
        )
        ssq += xv * xv
        # fn^T tile [BLOCK, N_P]: one read of these columns serves all BLOCK_T tokens
        f = tl.load(
            fn_ptr + nn[None, :] * W + cols[:, None],
            mask=(nn[None, :] < n_rows) & c_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(xv, f, acc, input_precision=PREC)
    # Column n of acc is fn row n (zero past n_rows); column 24 takes the sum of squares.
    sq = tl.sum(ssq, axis=1)  # [BLOCK_T]
    prow = part_ptr + (tt * tl.num_programs(1) + sp) * 32  # [BLOCK_T]
    if N_P > 24:
        acc = tl.where(nn[None, :] == 24, sq[:, None], acc)
    else:
        tl.store(prow + 24, sq, mask=t_ok)
    tl.store(prow[:, None] + nn[None, :], acc, mask=t_ok[:, None])


@triton.jit
def _mhc_pre_finish_kernel(
    x_ptr,  # [T, 4, D] contiguous
    scale_ptr,  # [3] fp32 (head: [1])
    base_ptr,  # [24] fp32 (head: [4])
    y_ptr,  # [T, D], contiguous
    post_ptr,  # [T, 4] fp32 (unused for HEAD)
    comb_ptr,  # [T, 4, 4] fp32 (unused for HEAD)
    part_ptr,  # [T, SPLIT, 32] fp32 partial rows of the block kernel
    D,
    hc_eps,
    norm_eps,
    ITERS: tl.constexpr,
    HEAD: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    _pre_finish(
        tl.program_id(0), x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, part_ptr, D,
        hc_eps, norm_eps, ITERS, HEAD, SPLIT, SPLIT_P2, BLOCK_D,
    )  # fmt: skip


@triton.jit
def _mhc_post_kernel(
    f_ptr,  # [T, D] sublayer output, contiguous
    x_ptr,  # [T, 4, D] streams, contiguous
    post_ptr,  # [T, 4] fp32
    comb_ptr,  # [T, 4, 4] fp32
    out_ptr,  # [T, 4, D] contiguous (may alias x: each program reads its tile first)
    D,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    r4 = tl.arange(0, 4)
    base = t.to(tl.int64) * 4 * D
    f = tl.load(f_ptr + t.to(tl.int64) * D + dd, mask=d_ok, other=0.0).to(tl.float32)
    xs = tl.load(x_ptr + base + r4[:, None] * D + dd[None, :], mask=d_ok[None, :], other=0.0)
    post = tl.load(post_ptr + t * 4 + r4)
    c = tl.load(comb_ptr + t * 16 + r4[:, None] * 4 + r4[None, :])  # [j, k]
    mix = tl.sum(c[:, :, None] * xs.to(tl.float32)[:, None, :], axis=0)  # [k, BLOCK_D]
    o = post[:, None] * f[None, :] + mix
    tl.store(
        out_ptr + base + r4[:, None] * D + dd[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=d_ok[None, :],
    )


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


@dataclass
class MhcWorkspace:
    """Split scratch for mhc_pre / mhc_head; allocate once for the largest T."""

    part: torch.Tensor  # fp32, >= _part_rows(T) * 32
    counters: torch.Tensor  # int32 zeros, >= T


def mhc_workspace(max_t: int, device: torch.device | str) -> MhcWorkspace:
    return MhcWorkspace(
        torch.empty(_part_rows(max_t) * _PART, dtype=torch.float32, device=device),
        torch.zeros(max_t, dtype=torch.int32, device=device),
    )


def _launch_pre(
    name, x, fn, scale, base, y, post, comb, workspace, hc_eps, norm_eps, iters, head,
    *, block: bool | None = None, config: dict | None = None,
):  # fmt: skip
    """block: force a path (True: block + finish kernels, False: split kernel; default by T,
    _use_block); config: overrides of _block_config (both for tools/bench_kernels.py)."""
    require_triton(name)
    check_tensor(f"{name}: x", x, dtypes=_DTYPES)
    if x.dim() != 3 or x.shape[1] != 4:
        raise ValueError(f"{name}: x must be [T, 4, D], got {list(x.shape)}")
    t, _, d = x.shape
    dev = x.device
    n_rows = 4 if head else 24
    check_tensor(f"{name}: fn", fn, shape=(n_rows, 4 * d), dtypes=(torch.float32,), device=dev)
    check_tensor(
        f"{name}: scale", scale, shape=(1 if head else 3,), dtypes=(torch.float32,), device=dev
    )
    check_tensor(f"{name}: base", base, shape=(n_rows,), dtypes=(torch.float32,), device=dev)
    check_tensor(f"{name}: y", y, shape=(t, d), dtypes=_DTYPES, device=dev)
    if not head:
        check_tensor(f"{name}: post", post, shape=(t, 4), dtypes=(torch.float32,), device=dev)
        check_tensor(f"{name}: comb", comb, shape=(t, 4, 4), dtypes=(torch.float32,), device=dev)
    if block is None:
        block = _use_block(t)
    w = 4 * d
    if block:
        cfg = {**_block_config(t), **(config or {})}
        step = cfg["BLOCK"]
        split = cfg["SPLIT"]
    else:
        step = 256
        split = _split(t)
    chunk = triton.cdiv(triton.cdiv(w, split), step) * step
    n_split = triton.cdiv(w, chunk)  # small D: fewer, never empty, splits
    if workspace is None:
        part = torch.empty(max(t * n_split, 1) * _PART, dtype=torch.float32, device=dev)
        cnt = torch.zeros(0 if block else t, dtype=torch.int32, device=dev)  # block: unused
        workspace = MhcWorkspace(part, cnt)
    # Checked against what any path needs at this T (plus a config override's SPLIT), so that a
    # workspace's validity does not depend on which kernel a T picks.
    elif (
        workspace.part.numel() < max(_part_rows(t), t * n_split) * _PART
        or workspace.counters.numel() < t
    ):
        raise ValueError(f"{name}: workspace too small for T={t}; use mhc_workspace(max_t)")
    if t == 0:
        return
    if block:
        bt = cfg["BLOCK_T"]
        stages = {"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}
        _mhc_pre_block_kernel[(triton.cdiv(t, bt), n_split)](
            x, fn, workspace.part, t, d, chunk,
            HEAD=head, N_P=16 if head else 32, BLOCK_T=bt, BLOCK=step,
            PREC=_block_prec(cfg["PREC"], dev),
            num_warps=cfg["num_warps"], **stages,
        )  # fmt: skip
        _mhc_pre_finish_kernel[(t,)](
            x, scale, base, y, post, comb, workspace.part, d, float(hc_eps), float(norm_eps),
            ITERS=iters, HEAD=head, SPLIT=n_split, SPLIT_P2=triton.next_power_of_2(n_split),
            BLOCK_D=2048, num_warps=4,
        )  # fmt: skip
        return
    _mhc_pre_kernel[(t, n_split)](
        x, fn, scale, base, y, post, comb, workspace.part, workspace.counters, d, chunk,
        float(hc_eps), float(norm_eps),
        ITERS=iters, HEAD=head, SPLIT=n_split, SPLIT_P2=triton.next_power_of_2(n_split),
        BLOCK=step, BLOCK_D=2048, num_warps=4,
    )  # fmt: skip


def mhc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    *,
    hc_eps: float = 1e-6,
    iters: int = 20,
    norm_eps: float = 1e-6,
    y: torch.Tensor | None = None,
    post: torch.Tensor | None = None,
    comb: torch.Tensor | None = None,
    workspace: MhcWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre: x [T, 4, D] (bf16/fp16/fp32), fn [24, 4D], scale [3], base [24] (fp32) ->
    (y [T, D] (default x's dtype), post [T, 4] fp32, comb [T, 4, 4] fp32). One launch below
    _BLOCK_MIN_T tokens, two from it."""
    t, _, d = x.shape
    if y is None:
        y = torch.empty(t, d, dtype=x.dtype, device=x.device)
    if post is None:
        post = torch.empty(t, 4, dtype=torch.float32, device=x.device)
    if comb is None:
        comb = torch.empty(t, 4, 4, dtype=torch.float32, device=x.device)
    _launch_pre(
        "mhc_pre", x, fn, scale, base, y, post, comb, workspace, hc_eps, norm_eps, iters, False
    )
    return y, post, comb


def mhc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    *,
    hc_eps: float = 1e-6,
    norm_eps: float = 1e-6,
    y: torch.Tensor | None = None,
    workspace: MhcWorkspace | None = None,
) -> torch.Tensor:
    """mHC head collapse: x [T, 4, D], fn [4, 4D], scale [1], base [4] -> y [T, D]."""
    t, _, d = x.shape
    if y is None:
        y = torch.empty(t, d, dtype=x.dtype, device=x.device)
    _launch_pre("mhc_head", x, fn, scale, base, y, y, y, workspace, hc_eps, norm_eps, 1, True)
    return y


def mhc_post(
    f: torch.Tensor,
    x: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """mHC post: X'_k = post_k * F + sum_j comb[j, k] * X_j. f [T, D], x [T, 4, D] ->
    out [T, 4, D] (default x's dtype; may be x itself for an in-place update)."""
    require_triton("mhc_post")
    check_tensor("mhc_post: x", x, dtypes=_DTYPES)
    if x.dim() != 3 or x.shape[1] != 4:
        raise ValueError(f"mhc_post: x must be [T, 4, D], got {list(x.shape)}")
    t, _, d = x.shape
    dev = x.device
    check_tensor("mhc_post: f", f, shape=(t, d), dtypes=_DTYPES, device=dev)
    check_tensor("mhc_post: post", post, shape=(t, 4), dtypes=(torch.float32,), device=dev)
    check_tensor("mhc_post: comb", comb, shape=(t, 4, 4), dtypes=(torch.float32,), device=dev)
    if out is None:
        out = torch.empty_like(x)
    check_tensor("mhc_post: out", out, shape=(t, 4, d), dtypes=_DTYPES, device=dev)
    if t == 0:
        return out
    bd = 512
    _mhc_post_kernel[(t, triton.cdiv(d, bd))](f, x, post, comb, out, d, BLOCK_D=bd, num_warps=4)
    return out
