"""FP8 linear: y = x . W^T with W e4m3fn [N, K] and a 128x128 block scale (E8M0 bytes or fp32).

Two paths, one numerical definition (`fp8_linear_ref`):

- GEMV (M <= GEMV_MAX_M tokens, decode): memory bound. Each program owns BLOCK_N weight rows and
  one K slice (split-K, so even N = 512 gives ~1000 programs); weights are loaded as 16-byte
  vectors of e4m3 bytes, decoded in registers and multiplied on CUDA cores in fp32. The split-K
  partials go to an fp32 workspace; the last program of each row tile to arrive (an atomic
  counter) adds them in a fixed order and writes the output, then resets its counter, so one
  launch does it all, deterministically, and stays CUDA-graph capturable.
- GEMM (prefill): tl.dot tiles BLOCK_M x BLOCK_N stepping K by 128 (one weight-scale block per
  step; the block scale and the activation scale are applied to each step's fp32 partial).

`act_quant=True` simulates the reference activation quantisation (v4-architecture.md §2.5) on x,
per row in blocks of 128 along K, which line up with the weight scale blocks.

Shapes: M tokens, N outputs, K inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._formats import (
    FP8_BLOCK,
    _act_quant_apply,
    _act_quant_scale,
    _e8m0_to_f32,
    act_quant_ref,
    check_tensor,
    dequant_fp8,
    require_triton,
    tl,
    triton,
)

__all__ = [
    "GEMV_MAX_M",
    "Fp8LinearWorkspace",
    "fp8_linear",
    "fp8_linear_ref",
    "fp8_linear_workspace",
]

GEMV_MAX_M = 16  # up to this many rows use the split-K GEMV path
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_W_DTYPES = (torch.float8_e4m3fn, torch.uint8)
_S_DTYPES = (torch.uint8, torch.float8_e8m0fnu, torch.float32)


def fp8_linear_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    act_quant: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Numerical definition: y [M, N] = q(x) [M, K] . dequant(W)^T in fp32, cast to out_dtype
    (default x.dtype); q = act_quant_ref when act_quant else the identity."""
    xf = act_quant_ref(x) if act_quant else x.float()
    y = xf @ dequant_fp8(w, w_scale).t()
    return y.to(out_dtype or x.dtype)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,  # [M, K] activations (bf16/fp16/fp32), row stride stride_xm, unit column stride
    w_ptr,  # [N, K] e4m3fn weight bytes (uint8), contiguous
    s_ptr,  # [ceil(N/128), ceil(K/128)] weight scale, E8M0 bytes or fp32, contiguous
    out_ptr,  # [M, N] output, row stride stride_om
    part_ptr,  # [SPLIT_K, M, N] fp32 split-K partials (unused when SPLIT_K == 1)
    cnt_ptr,  # [ceil(N/BLOCK_N)] int32 arrival counters, zero before and after each launch
    M,
    N,
    K,
    stride_xm,
    stride_om,
    K_PER_SPLIT,  # K range of one split, a multiple of NB * 128
    SCALE_E8M0: tl.constexpr,  # scale is E8M0 bytes (else fp32)
    ACT_QUANT: tl.constexpr,  # quantise-dequantise x per 128-block first
    M_BLOCK: tl.constexpr,  # next power of two >= M (tokens are unrolled)
    BLOCK_N: tl.constexpr,  # weight rows per program; divides 128, so one scale row
    NB: tl.constexpr,  # 128-wide K blocks per loop step
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    kb = tl.arange(0, NB)
    kk = tl.arange(0, 128)
    cols_m = tl.arange(0, M_BLOCK)
    n_kblk = tl.cdiv(K, 128)
    s_row = (pid_n * BLOCK_N) // 128

    acc = tl.zeros([BLOCK_N, M_BLOCK], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, NB * 128):
        kidx = k0 + kb[:, None] * 128 + kk[None, :]  # [NB, 128]
        k_mask = kidx < k_hi
        # [BLOCK_N, NB, 128] bytes: each thread reads 16 contiguous bytes of a row.
        w = tl.load(
            w_ptr + rows[:, None, None].to(tl.int64) * K + kidx[None, :, :],
            mask=n_mask[:, None, None] & k_mask[None, :, :],
            other=0,
        )
        wf = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        sblk = k0 // 128 + kb
        s_mask = sblk < n_kblk
        if SCALE_E8M0:
            s = _e8m0_to_f32(tl.load(s_ptr + s_row * n_kblk + sblk, mask=s_mask, other=0))
        else:
            s = tl.load(s_ptr + s_row * n_kblk + sblk, mask=s_mask, other=0.0)
        for m in tl.static_range(M_BLOCK):
            m_ok = tl.full([NB, 128], m, tl.int32) < M
            xv = tl.load(x_ptr + m * stride_xm + kidx, mask=k_mask & m_ok, other=0.0)
            xv = xv.to(tl.float32)
            if ACT_QUANT:
                sx, sx_inv = _act_quant_scale(tl.max(tl.abs(xv), axis=1))
                xv = _act_quant_apply(xv, sx[:, None], sx_inv[:, None])
            part = tl.sum(wf * xv[None, :, :], axis=2)  # [BLOCK_N, NB], one scale per block
            part = tl.sum(part * s[None, :], axis=1)
            acc = tl.where(cols_m[None, :] == m, acc + part[:, None], acc)

    out_mask = n_mask[:, None] & (cols_m[None, :] < M)
    out_offs = cols_m[None, :] * stride_om + rows[:, None]
    if SPLIT_K == 1:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_offs = cols_m[None, :] * N + rows[:, None]
        tl.store(part_ptr + pid_k * M * N + part_offs, acc, mask=out_mask)
        # Every thread's partial must be written before the counter is bumped (release).
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Last of this row tile: sum the partials in split order (deterministic).
            tot = tl.zeros([BLOCK_N, M_BLOCK], dtype=tl.float32)
            for sk in range(SPLIT_K):
                tot += tl.load(
                    part_ptr + sk * M * N + part_offs,
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
            tl.store(out_ptr + out_offs, tot.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm
    w_ptr,  # [N, K] e4m3fn weight bytes (uint8), contiguous
    s_ptr,  # [ceil(N/128), ceil(K/128)] weight scale, E8M0 bytes or fp32
    out_ptr,  # [M, N] output, row stride stride_om
    M,
    N,
    K,
    stride_xm,
    stride_om,
    SCALE_E8M0: tl.constexpr,
    ACT_QUANT: tl.constexpr,
    IEEE_FP32: tl.constexpr,  # x is fp32: dot in full fp32, not tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # <= 128 and divides 128: one scale per (tile, K step)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    m_mask = rm < M
    n_mask = rn < N
    n_kblk = tl.cdiv(K, 128)
    s_row = (pid_n * BLOCK_N) // 128
    cdt = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, n_kblk):
        k = kb * 128 + rk
        k_mask = k < K
        x = tl.load(
            x_ptr + rm[:, None].to(tl.int64) * stride_xm + k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + rn[:, None].to(tl.int64) * K + k[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0,
        )
        wc = w.to(tl.float8e4nv, bitcast=True).to(cdt)  # e4m3 values are exact in bf16/fp16
        if SCALE_E8M0:
            s = _e8m0_to_f32(tl.load(s_ptr + s_row * n_kblk + kb))
        else:
            s = tl.load(s_ptr + s_row * n_kblk + kb)
        if ACT_QUANT:
            # Dot the e4m3 grid values (exact in any compute dtype), apply the scale after.
            xf = x.to(tl.float32)
            sx, sx_inv = _act_quant_scale(tl.max(tl.abs(xf), axis=1))
            xq = _act_quant_apply(xf, 1.0, sx_inv[:, None]).to(cdt)
            row_scale = sx * s
        else:
            xq = x
            row_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + s
        if IEEE_FP32:
            d = tl.dot(xq, tl.trans(wc), input_precision="ieee")
        else:
            d = tl.dot(xq, tl.trans(wc))
        acc += d * row_scale[:, None]
    tl.store(
        out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


# ------------------------------------------------------------------------------------------------
# Launch planning and workspace
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GemvPlan:
    m_block: int
    block_n: int
    nb: int
    split_k: int
    k_per_split: int
    num_warps: int


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: plan as for an H100 so the same code paths run


def _gemv_plan(m: int, n: int, k: int, device: torch.device, config: dict | None) -> _GemvPlan:
    cfg = dict(config or {})
    m_block = triton.next_power_of_2(max(m, 1))
    block_n = cfg.get("block_n", 16)
    nb = cfg.get("nb", 2 if m_block <= 2 else 1)
    step = nb * 128
    n_tiles = triton.cdiv(n, block_n)
    if "split_k" in cfg:
        split = cfg["split_k"]
    else:
        # ~8 programs per SM keeps enough 16-byte loads in flight to saturate HBM.
        want = 8 * _sm_count(device)
        split = triton.next_power_of_2(triton.cdiv(want, n_tiles)) if n_tiles < want else 1
        split = max(1, min(split, 16, triton.cdiv(k, step)))
    k_per_split = triton.cdiv(triton.cdiv(k, split), step) * step
    split = triton.cdiv(k, k_per_split)  # no empty splits
    return _GemvPlan(m_block, block_n, nb, split, k_per_split, cfg.get("num_warps", 4))


@dataclass
class Fp8LinearWorkspace:
    """Split-K scratch for the GEMV path. One workspace may serve every FP8 linear launched on one
    stream (launches run in order; counters are left at zero). Allocate once at startup."""

    partial: torch.Tensor  # fp32, flat, >= split_k * M * N elements
    counters: torch.Tensor  # int32 zeros, >= ceil(N / block_n) elements


def fp8_linear_workspace(
    shapes: list[tuple[int, int]], max_m: int, device: torch.device | str
) -> Fp8LinearWorkspace:
    """Workspace big enough for every (N, K) in `shapes` at up to max_m rows (GEMV path)."""
    device = torch.device(device)
    part, cnt = 1, 1
    for n, k in shapes:
        for m in range(1, min(max_m, GEMV_MAX_M) + 1):
            p = _gemv_plan(m, n, k, device, None)
            if p.split_k > 1:
                part = max(part, p.split_k * m * n)
            cnt = max(cnt, triton.cdiv(n, p.block_n))
    return Fp8LinearWorkspace(
        torch.empty(part, dtype=torch.float32, device=device),
        torch.zeros(cnt, dtype=torch.int32, device=device),
    )


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    act_quant: bool = False,
    workspace: Fp8LinearWorkspace | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] . W^T with W e4m3fn [N, K] and block scale [ceil(N/128), ceil(K/128)].

    x: bf16/fp16/fp32, rows may be strided (unit column stride). out: [M, N], any of those dtypes
    (default: allocated with x's dtype). workspace: needed by the GEMV path when it splits K;
    pass one from fp8_linear_workspace() to keep the launch allocation-free (graph capture).
    config: optional tuning overrides (block_n, nb, split_k, num_warps; block_m for GEMM).
    """
    require_triton("fp8_linear")
    if x.dim() != 2:
        raise ValueError(f"fp8_linear: x must be [M, K], got {list(x.shape)}")
    m, k = x.shape
    check_tensor("fp8_linear: x", x, dtypes=_ACT_DTYPES, contiguous=False)
    if x.stride(1) != 1:
        raise ValueError("fp8_linear: x must have unit column stride")
    check_tensor("fp8_linear: w", w, shape=(None, k), dtypes=_W_DTYPES, device=x.device)
    n = w.shape[0]
    sshape = (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK))
    check_tensor("fp8_linear: w_scale", w_scale, shape=sshape, dtypes=_S_DTYPES, device=x.device)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    check_tensor("fp8_linear: out", out, shape=(m, n), dtypes=_ACT_DTYPES, contiguous=False)
    if out.stride(1) != 1:
        raise ValueError("fp8_linear: out must have unit column stride")
    if m == 0:
        return out
    wb = w.view(torch.uint8)
    e8m0 = w_scale.dtype != torch.float32
    sb = w_scale.view(torch.uint8) if e8m0 else w_scale
    cfg = dict(config or {})

    if m <= GEMV_MAX_M:
        p = _gemv_plan(m, n, k, x.device, cfg)
        if 128 % p.block_n:
            raise ValueError(f"fp8_linear: block_n must divide 128, got {p.block_n}")
        n_tiles = triton.cdiv(n, p.block_n)
        part, cnt = out, out  # placeholders, unused when split_k == 1
        if p.split_k > 1:
            if workspace is None:
                workspace = Fp8LinearWorkspace(
                    torch.empty(p.split_k * m * n, dtype=torch.float32, device=x.device),
                    torch.zeros(n_tiles, dtype=torch.int32, device=x.device),
                )
            if (
                workspace.partial.numel() < p.split_k * m * n
                or workspace.counters.numel() < n_tiles
            ):
                raise ValueError(
                    f"fp8_linear: workspace too small for M={m} N={n} K={k} split_k={p.split_k}: "
                    f"need {p.split_k * m * n} partials and {n_tiles} counters; size it with "
                    "fp8_linear_workspace() over every shape you launch"
                )
            part, cnt = workspace.partial, workspace.counters
        _fp8_gemv_kernel[(n_tiles, p.split_k)](
            x, wb, sb, out, part, cnt, m, n, k, x.stride(0), out.stride(0), p.k_per_split,
            SCALE_E8M0=e8m0, ACT_QUANT=act_quant, M_BLOCK=p.m_block, BLOCK_N=p.block_n,
            NB=p.nb, SPLIT_K=p.split_k, num_warps=p.num_warps,
        )  # fmt: skip
    else:
        bm = cfg.get("block_m", 64)
        bn = cfg.get("block_n", 128)
        if 128 % bn:
            raise ValueError(f"fp8_linear: block_n must divide 128, got {bn}")
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _fp8_gemm_kernel[grid](
            x, wb, sb, out, m, n, k, x.stride(0), out.stride(0),
            SCALE_E8M0=e8m0, ACT_QUANT=act_quant, IEEE_FP32=x.dtype == torch.float32,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.get("num_warps", 8),
            num_stages=cfg.get("num_stages", 3),
        )  # fmt: skip
    return out
