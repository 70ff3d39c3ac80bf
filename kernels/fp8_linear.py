"""FP8 linear: y = x . W^T with W e4m3fn [N, K] and a 128x128 block scale (E8M0 bytes or fp32).

Three paths, one numerical definition (`fp8_linear_ref`):

- GEMV (M <= GEMV_MAX_M tokens, decode): memory bound. Each program owns BLOCK_N weight rows and
  one K slice (split-K, so even N = 512 gives hundreds of programs). Lanes run along K: a warp
  reads 256 contiguous bytes of a row per load (8 bytes a lane), each lane converts its e4m3 bytes
  two at a time (cvt to f16x2, then fp32) and multiplies them with its 8 inputs in an fp32 FMA
  chain, reusing the inputs for all rows of its warp; lanes are reduced once at the end. Tokens go
  1, 2 or 4 per pass over the weights (more passes for larger M). The split-K partials go to an
  fp32 workspace; the last program of each row tile to arrive (an atomic counter) adds them in a
  fixed order and writes the output, then resets its counter, so one launch does it all,
  deterministically, and stays CUDA-graph capturable.
- GEMM (prefill): tl.dot tiles BLOCK_M x BLOCK_N stepping K by 128 (one weight-scale block per
  step; the block scale and the activation scale are applied to each step's fp32 partial).
- Scaled matmul (prefill with act_quant, M >= SCALED_MM_MIN_M, sm_90): the activations are
  quantised to e4m3 with one power-of-two scale per 1x128 block (a small Triton kernel), then one
  torch FP8 scaled matmul (cuBLASLt, DeepSeek-style block scales: activations 1x128, weights
  128x128) multiplies them on the FP8 tensor cores, where the Triton GEMM runs bf16 MMAs. Found
  and checked against fp8_linear_ref once per device; where torch or the device lacks it, the
  Triton GEMM runs instead (see "Prefill through torch's FP8 scaled matmul" below).

`act_quant=True` simulates the reference activation quantisation (v4-architecture.md §2.5) on x,
per row in blocks of 128 along K, which line up with the weight scale blocks.

`groups=G` makes it block diagonal (wo_a): x [M, G*K], W [G*R, K], y [M, G*R], output rows
[g*R, (g+1)*R) reading x's columns [g*K, (g+1)*K). Both Triton kernels take it as a per-program
offset into x (GROUP_ROWS), so all groups go in one launch while no row tile straddles two groups.

Shapes: M tokens, N outputs, K inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ._formats import (
    FP8_BLOCK,
    _act_quant_apply,
    _act_quant_scale,
    _and_flag,
    _e4m3_q,
    _e8m0_to_f32,
    act_quant_ref,
    check_tensor,
    dequant_fp8,
    e8m0_to_float,
    gdc_launch_dependents,
    gdc_wait,
    interpreting,
    pdl_supported,
    require_triton,
    tl,
    triton,
)

__all__ = [
    "GEMV_MAX_M",
    "SCALED_MM_MIN_M",
    "Fp8LinearWorkspace",
    "fp8_linear",
    "fp8_linear_ref",
    "fp8_linear_workspace",
    "scaled_mm_status",
]

GEMV_MAX_M = 16  # up to this many rows use the split-K GEMV path
# From this many rows on, act-quantised products with a bf16 output go to torch's FP8 scaled
# matmul where it works (sm_90). Prefill only: a decode step has 1 token (a few with MTP), so the
# CUDA-graph-captured decode launches never take it. Below it a GEMM is short and bound by its
# weight bytes, where faster tensor cores buy little against the extra act-quant launch. A
# starting point: the benchmark (tools/bench_kernels.py --only fp8_prefill) times both paths at
# M = 128, 512 and 4096 to place it.
SCALED_MM_MIN_M = 128
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_W_DTYPES = (torch.float8_e4m3fn, torch.uint8)
_S_DTYPES = (torch.uint8, torch.float8_e8m0fnu, torch.float32)


def fp8_linear_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    act_quant: bool = False,
    groups: int = 1,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Numerical definition: y [M, N] = q(x) [M, K] . dequant(W)^T in fp32, cast to out_dtype
    (default x.dtype); q = act_quant_ref when act_quant else the identity.

    groups = G > 1: the block-diagonal product of x [M, G*K] and W [G*R, K] (R a multiple or a
    divisor of 128): y[:, gR:(g+1)R] = q(x[:, gK:(g+1)K]) . dequant(W[gR:(g+1)R])^T, each group
    on its own, so all of W is never dequantised at once."""
    if groups == 1:
        xf = act_quant_ref(x) if act_quant else x.float()
        y = xf @ dequant_fp8(w, w_scale).t()
        return y.to(out_dtype or x.dtype)
    r, k = _group_dims(x.shape[1], w.shape, groups, "fp8_linear_ref")
    sshape = (math.ceil(w.shape[0] / FP8_BLOCK), math.ceil(k / FP8_BLOCK))
    if tuple(w_scale.shape) != sshape:  # the group slices below would hide a wrong shape
        raise ValueError(f"fp8_linear_ref: w_scale {list(w_scale.shape)} != {list(sshape)}")
    ys = []
    for g in range(groups):
        xg = x[:, g * k : (g + 1) * k]
        s_lo, s_hi = _group_scale_rows(g, r)
        xf = act_quant_ref(xg) if act_quant else xg.float()
        ys.append(xf @ dequant_fp8(w[g * r : (g + 1) * r], w_scale[s_lo:s_hi]).t())
    return torch.cat(ys, dim=1).to(out_dtype or x.dtype)


def _group_dims(x_cols: int, w_shape: tuple[int, ...], groups: int, who: str) -> tuple[int, int]:
    """(R, K) of a grouped product of x [M, x_cols] and W w_shape, or ValueError."""
    n, k = w_shape
    if groups < 1 or n % groups or x_cols != groups * k:
        raise ValueError(
            f"{who}: groups={groups} needs W [G*R, K] and x [M, G*K], got W {list(w_shape)} "
            f"and x with {x_cols} columns"
        )
    r = n // groups
    if r % FP8_BLOCK and FP8_BLOCK % r:
        # A group must own whole scale blocks or lie inside one, so that its rows and scale rows
        # slice out together (see _group_scale_rows).
        raise ValueError(f"{who}: group rows R={r} must be a multiple or a divisor of 128")
    return r, k


def _group_scale_rows(g: int, r: int) -> tuple[int, int]:
    """The weight-scale rows [lo, hi) of group g's R rows (R a multiple or a divisor of 128)."""
    return g * r // FP8_BLOCK, ((g + 1) * r - 1) // FP8_BLOCK + 1


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


# GEMV tile of one loop step: [16, NB, NW, U, R, 8] weight bytes. Lane (l, b) of warp w holds the
# 8 consecutive bytes at input offset (u * NB + b) * 128 + l * 8 of weight row rows[w, r] (one
# 8-byte load per (u, r)): NB = 2 blocks of 128 inputs x 16 lanes x 8 bytes span the 32 lanes of a
# warp (256 contiguous bytes of a row per load instruction), U such slices make one step (U loads
# per row and lane in flight), and warp w owns R rows. A 128-input block = 16 lanes = one weight-
# scale block and one act-quant block. The input tile [16, NB, NW, U, 1, 8] gives each lane the 8
# inputs matching its bytes (one 16-byte load per u; every warp loads its own copy), reused for its
# R rows. A lane sums its 8 products (an FMA chain), scales the sum per block (weight scale x act
# scale) and accumulates per (lane, row) in fp32; the cross-lane sum happens once, after the loop.
# Dimension order: lanes first, then warps, then per-thread dimensions (Triton 3.6 hands lanes to
# the dimensions after the contiguous one in index order when their contiguity ties).


@triton.jit
def _split8(v):
    """[a, b, c, d, e, 8] -> its 8 elements as tensors [a, b, c, d, e] (element order 0..7)."""
    v = tl.reshape(v, [v.shape[0], v.shape[1], v.shape[2], v.shape[3], v.shape[4], 2, 2, 2])
    ev, od = tl.split(v)
    e04, e26 = tl.split(ev)
    o15, o37 = tl.split(od)
    v0, v4 = tl.split(e04)
    v2, v6 = tl.split(e26)
    v1, v5 = tl.split(o15)
    v3, v7 = tl.split(o37)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _fp8_tok_part(w0, w1, w2, w3, w4, w5, w6, w7, xp, xoff, kmask, EVEN_K: tl.constexpr,
                  ACT_QUANT: tl.constexpr, HW_FP8: tl.constexpr):  # fmt: skip
    """One token's step: lane sums [16, NB, NW, U, R] of the weights w0..w7 (element e of each
    lane's 8 bytes, fp32) times the token's inputs (act-quantised onto the e4m3 grid when
    ACT_QUANT), and the act block scale [1, NB, NW, U, 1]."""
    if EVEN_K:
        xv = tl.load(xp + xoff).to(tl.float32)
    else:
        xv = tl.load(xp + xoff, mask=kmask, other=0.0).to(tl.float32)
    if ACT_QUANT:
        amax = tl.max(tl.max(tl.abs(xv), axis=5), axis=0)  # [NB, NW, U, 1]: 16 lanes a block
        s, s_inv = _act_quant_scale(amax)
        xv = _e4m3_q(xv * s_inv[None, :, :, :, :, None], HW_FP8)
        bs = s[None]
    else:
        bs = tl.full([1, xoff.shape[1], xoff.shape[2], xoff.shape[3], 1], 1.0, tl.float32)
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xv)
    p = w0 * x0
    p += w1 * x1
    p += w2 * x2
    p += w3 * x3
    p += w4 * x4
    p += w5 * x5
    p += w6 * x6
    p += w7 * x7
    return p, bs


@triton.jit
def _fp8_gemv_load(wp, sp, k0, k_hi, koff, kb, n_kblk, EVEN_K: tl.constexpr):
    """One step's weight bytes [16, NB, NW, U, R, 8] and scale values [16, NB, NW, U, 1]."""
    if EVEN_K:
        w = tl.load(wp + k0)
        sv = tl.load(sp + k0 // 128)
    else:
        w = tl.load(wp + k0, mask=(k0 + koff) < k_hi, other=0)
        sv = tl.load(sp + k0 // 128, mask=(k0 // 128 + kb) < n_kblk, other=0)
    return w, sv


@triton.jit
def _fp8_gemv_step(w, sv, k0, k_hi, koff, xoff, x0, x1, x2, x3, acc0, acc1, acc2, acc3,
                   SCALE_E8M0: tl.constexpr, ACT_QUANT: tl.constexpr, HW_FP8: tl.constexpr,
                   EVEN_K: tl.constexpr, TOK: tl.constexpr):  # fmt: skip
    """Add one step (weights w, scales sv at input offset k0) to the TOK tokens' lane sums."""
    if EVEN_K:
        kmask = koff >= 0  # unused
    else:
        kmask = (k0 + koff) < k_hi
    if SCALE_E8M0:
        ws = _e8m0_to_f32(sv)
    else:
        ws = sv
    w0, w1, w2, w3, w4, w5, w6, w7 = _split8(w.to(tl.float8e4nv, bitcast=True).to(tl.float32))
    xo = xoff + k0
    part, bs = _fp8_tok_part(w0, w1, w2, w3, w4, w5, w6, w7, x0, xo, kmask, EVEN_K, ACT_QUANT,
                             HW_FP8)  # fmt: skip
    acc0 += tl.sum(part * (ws * bs), axis=3)  # in-lane sum over U
    if TOK > 1:
        part, bs = _fp8_tok_part(w0, w1, w2, w3, w4, w5, w6, w7, x1, xo, kmask, EVEN_K,
                                 ACT_QUANT, HW_FP8)  # fmt: skip
        acc1 += tl.sum(part * (ws * bs), axis=3)
    if TOK > 2:
        part, bs = _fp8_tok_part(w0, w1, w2, w3, w4, w5, w6, w7, x2, xo, kmask, EVEN_K,
                                 ACT_QUANT, HW_FP8)  # fmt: skip
        acc2 += tl.sum(part * (ws * bs), axis=3)
        part, bs = _fp8_tok_part(w0, w1, w2, w3, w4, w5, w6, w7, x3, xo, kmask, EVEN_K,
                                 ACT_QUANT, HW_FP8)  # fmt: skip
        acc3 += tl.sum(part * (ws * bs), axis=3)
    return acc0, acc1, acc2, acc3


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,  # [M, K] activations (bf16/fp16/fp32; [M, G*K] grouped), row stride stride_xm, unit
    # column stride
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
    K_PER_SPLIT,  # K range of one split, a multiple of NB * 128 (and of the step if EVEN_K)
    GROUP_ROWS: tl.constexpr,  # > 0: block diagonal, rows [gR, (g+1)R) read x[:, gK:(g+1)K]
    SCALE_E8M0: tl.constexpr,  # scale is E8M0 bytes (else fp32)
    ACT_QUANT: tl.constexpr,  # quantise-dequantise x per 128-block first
    HW_FP8: tl.constexpr,  # hardware e4m3 conversion (GPU) vs exact emulation (interpreter)
    EVEN_K: tl.constexpr,  # K % (U * NB * 128) == 0: no masks in the loop
    TOK: tl.constexpr,  # tokens per pass over the weights (1, 2 or 4); M > TOK: more passes
    R: tl.constexpr,  # rows per warp; BLOCK_N = R * NW divides 128 (one scale row)
    NW: tl.constexpr,  # num_warps
    U: tl.constexpr,
    NB: tl.constexpr,  # 128-blocks side by side across the lanes (2 on the GPU)
    SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent launch (see below)
    PRE: tl.constexpr,  # with PDL: weight steps (1..4) loaded before the wait
    EARLY: tl.constexpr,  # with PDL: let the next launch start at once, not after the wait
):
    BLOCK_N: tl.constexpr = R * NW
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GROUP_ROWS > 0:
        # The launcher keeps GROUP_ROWS a multiple of BLOCK_N, so the whole tile is one group's
        # and one offset serves it; only an address, so it may precede the PDL wait.
        x_ptr += (pid_n * BLOCK_N // GROUP_ROWS) * K
    rows = pid_n * BLOCK_N + tl.arange(0, R)[None, :] * NW + tl.arange(0, NW)[:, None]  # [NW, R]
    n_ok = rows < N
    wrow = tl.minimum(rows, N - 1).to(tl.int64)  # ragged N: load a valid row, store nothing
    n_kblk = tl.cdiv(K, 128)
    s_row = (pid_n * BLOCK_N) // 128

    ll = tl.arange(0, 16)[:, None, None, None, None, None]
    bb = tl.arange(0, NB)[None, :, None, None, None, None]
    uu = tl.arange(0, U)[None, None, None, :, None, None]
    ee = tl.arange(0, 8)[None, None, None, None, None, :]
    koff = (uu * NB + bb) * 128 + ll * 8 + ee  # [16, NB, 1, U, 1, 8]
    xoff = koff + tl.zeros([1, 1, NW, 1, 1, 1], tl.int32)  # the inputs of each lane, per warp
    wp = w_ptr + (wrow * K)[None, None, :, None, :, None] + koff  # [16, NB, NW, U, R, 8]
    # Scale block of each lane, constant along its 16 lanes; the contiguity hint of 1 keeps the
    # load in the weights' layout (one value per lane, no layout conversion).
    kb = tl.arange(0, NB)[None, :, None, None] + tl.arange(0, U)[None, None, None, :] * NB
    kb = (kb + tl.zeros([16, 1, NW, 1], tl.int32))[:, :, :, :, None]  # [16, NB, NW, U, 1]
    sp = tl.max_contiguous(s_ptr + s_row * n_kblk + kb, [1, 1, 1, 1, 1])

    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    STEP: tl.constexpr = U * NB * 128
    if PDL:
        # This launch may start while the kernel before it on the stream still runs. The weights
        # never depend on that kernel, so load this program's first PRE steps of them now (for
        # the small decode linears that can be its whole share), then wait for it before reading
        # x or touching out and the workspace. Steps past the first are masked to the split (it
        # may be short). EARLY lets the next launch start (and load its weights) right away;
        # otherwise only after the wait, so at most one launch waits ahead.
        if EARLY:
            gdc_launch_dependents()
        w_p0, s_p0 = _fp8_gemv_load(wp, sp, k_lo, k_hi, koff, kb, n_kblk, EVEN_K)
        if PRE > 1:
            w_p1, s_p1 = _fp8_gemv_load(wp, sp, k_lo + STEP, k_hi, koff, kb, n_kblk, False)
        if PRE > 2:
            w_p2, s_p2 = _fp8_gemv_load(wp, sp, k_lo + 2 * STEP, k_hi, koff, kb, n_kblk, False)
            w_p3, s_p3 = _fp8_gemv_load(wp, sp, k_lo + 3 * STEP, k_hi, koff, kb, n_kblk, False)
        gdc_wait()
        if not EARLY:
            gdc_launch_dependents()
    for c in range(0, M, TOK):
        acc0 = tl.zeros([16, NB, NW, R], dtype=tl.float32)
        acc1 = tl.zeros([16, NB, NW, R], dtype=tl.float32)
        acc2 = tl.zeros([16, NB, NW, R], dtype=tl.float32)
        acc3 = tl.zeros([16, NB, NW, R], dtype=tl.float32)
        # Token rows past M repeat the last token (valid memory); their results are not stored.
        x0 = x_ptr + tl.minimum(c, M - 1).to(tl.int64) * stride_xm
        x1 = x_ptr + tl.minimum(c + 1, M - 1).to(tl.int64) * stride_xm
        x2 = x_ptr + tl.minimum(c + 2, M - 1).to(tl.int64) * stride_xm
        x3 = x_ptr + tl.minimum(c + 3, M - 1).to(tl.int64) * stride_xm
        k_start = k_lo
        if PDL:
            if c == 0:  # the preloaded steps
                acc0, acc1, acc2, acc3 = _fp8_gemv_step(
                    w_p0, s_p0, k_lo, k_hi, koff, xoff, x0, x1, x2, x3, acc0, acc1, acc2, acc3,
                    SCALE_E8M0, ACT_QUANT, HW_FP8, EVEN_K, TOK,
                )  # fmt: skip
                if PRE > 1:
                    acc0, acc1, acc2, acc3 = _fp8_gemv_step(
                        w_p1, s_p1, k_lo + STEP, k_hi, koff, xoff, x0, x1, x2, x3,
                        acc0, acc1, acc2, acc3, SCALE_E8M0, ACT_QUANT, HW_FP8, False, TOK,
                    )  # fmt: skip
                if PRE > 2:
                    acc0, acc1, acc2, acc3 = _fp8_gemv_step(
                        w_p2, s_p2, k_lo + 2 * STEP, k_hi, koff, xoff, x0, x1, x2, x3,
                        acc0, acc1, acc2, acc3, SCALE_E8M0, ACT_QUANT, HW_FP8, False, TOK,
                    )  # fmt: skip
                    acc0, acc1, acc2, acc3 = _fp8_gemv_step(
                        w_p3, s_p3, k_lo + 3 * STEP, k_hi, koff, xoff, x0, x1, x2, x3,
                        acc0, acc1, acc2, acc3, SCALE_E8M0, ACT_QUANT, HW_FP8, False, TOK,
                    )  # fmt: skip
                k_start = k_lo + PRE * STEP
        for k0 in range(k_start, k_hi, STEP):
            w, sv = _fp8_gemv_load(wp, sp, k0, k_hi, koff, kb, n_kblk, EVEN_K)
            acc0, acc1, acc2, acc3 = _fp8_gemv_step(
                w, sv, k0, k_hi, koff, xoff, x0, x1, x2, x3, acc0, acc1, acc2, acc3,
                SCALE_E8M0, ACT_QUANT, HW_FP8, EVEN_K, TOK,
            )  # fmt: skip
        _fp8_gemv_out(acc0, c, rows, n_ok, pid_k, out_ptr, part_ptr, M, N, stride_om, SPLIT_K)
        if TOK > 1:
            _fp8_gemv_out(acc1, c + 1, rows, n_ok, pid_k, out_ptr, part_ptr, M, N, stride_om,
                          SPLIT_K)  # fmt: skip
        if TOK > 2:
            _fp8_gemv_out(acc2, c + 2, rows, n_ok, pid_k, out_ptr, part_ptr, M, N, stride_om,
                          SPLIT_K)  # fmt: skip
            _fp8_gemv_out(acc3, c + 3, rows, n_ok, pid_k, out_ptr, part_ptr, M, N, stride_om,
                          SPLIT_K)  # fmt: skip

    if SPLIT_K > 1:
        # Every thread's partials must be written before the counter is bumped (release).
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Last of this row tile: sum the partials in split order (deterministic).
            for m in range(0, M):
                tot = tl.zeros([NW, R], dtype=tl.float32)
                for sk in range(SPLIT_K):
                    tot += tl.load(
                        part_ptr + (sk * M + m) * N + rows, mask=n_ok, other=0.0,
                        cache_modifier=".cg",
                    )  # fmt: skip
                tl.store(out_ptr + m * stride_om + rows, tot.to(out_ptr.dtype.element_ty),
                         mask=n_ok)  # fmt: skip
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _fp8_gemv_out(acc, m, rows, n_ok, pid_k, out_ptr, part_ptr, M, N, stride_om,
                  SPLIT_K: tl.constexpr):  # fmt: skip
    """Token m's row sums (acc [16, NB, NW, R]): the output (one split) or this split's partial."""
    y = tl.sum(tl.sum(acc, axis=0), axis=0)  # [NW, R]
    ok = _and_flag(n_ok, m < M)
    if SPLIT_K == 1:
        tl.store(out_ptr + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(part_ptr + (pid_k * M + m) * N + rows, y, mask=ok)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr,  # [M, K] activations ([M, G*K] grouped), row stride stride_xm
    w_ptr,  # [N, K] e4m3fn weight bytes (uint8), contiguous
    s_ptr,  # [ceil(N/128), ceil(K/128)] weight scale, E8M0 bytes or fp32
    out_ptr,  # [M, N] output, row stride stride_om
    M,
    N,
    K,
    stride_xm,
    stride_om,
    GROUP_ROWS: tl.constexpr,  # > 0: block diagonal, rows [gR, (g+1)R) read x[:, gK:(g+1)K]
    SCALE_E8M0: tl.constexpr,
    ACT_QUANT: tl.constexpr,
    IEEE_FP32: tl.constexpr,  # x is fp32: dot in full fp32, not tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # <= 128 and divides 128: one scale per (tile, K step)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUP_ROWS > 0:  # a multiple of BLOCK_N (the launcher's rule): the tile is one group's
        x_ptr += (pid_n * BLOCK_N // GROUP_ROWS) * K
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
    tok: int  # tokens per pass over the weights
    rows_per_warp: int
    num_warps: int
    u: int  # 8-byte loads per row and lane per step
    nb: int  # 128-blocks across the lanes
    split_k: int
    k_per_split: int
    even_k: bool
    pre: int  # with PDL: steps loaded before waiting for the previous kernel (1, 2 or 4)

    @property
    def block_n(self) -> int:
        return self.rows_per_warp * self.num_warps


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: plan as for an H100 so the same code paths run


def _small_pdl_defaults(m: int, n: int, k: int, device: torch.device, cfg: dict) -> dict:
    """H200 sweep (run 14), one token, PDL: for the small decode matrices (<= 8.5 MB) fewer,
    larger programs with more of their weights loaded before the wait beat the general plan:
    K = 2048 (shared w2) whole rows, 2 steps preloaded: 5.00 vs 5.73 us; K = 4096 (wq_a+wkv)
    one 1 KB step a row, one program per SM: 4.90 vs 5.46 us."""
    if m != 1 or n * k > 8_500_000 or k < 2048 or not cfg.get("pdl", True):
        return {}
    if not pdl_supported(device):
        return {}
    if k == 2048:
        return {"block_n": 16, "split_k": 1, "u": 4, "pre": 2}
    return {"u": 4, "programs_per_sm": 1}


def _gemv_plan(m: int, n: int, k: int, device: torch.device, config: dict | None) -> _GemvPlan:
    cfg = dict(config or {})
    cfg = {**_small_pdl_defaults(m, n, k, device, cfg), **cfg}
    tok = cfg.get("tok", 1 if m == 1 else 2 if m == 2 else 4)
    nw = cfg.get("num_warps", 4)
    block_n = cfg.get("block_n", 32 if tok == 1 else 16)
    if block_n % nw or 128 % block_n:
        raise ValueError(f"fp8_linear: block_n {block_n} must divide 128, num_warps {nw} it")
    nb = cfg.get("nb", 2)
    slice_k = nb * 128  # inputs across the lanes of one load
    n_tiles = triton.cdiv(n, block_n)
    if "split_k" in cfg:
        split = cfg["split_k"]
    else:
        # A few programs per SM, each streaming >= 16 KB: enough loads in flight for HBM, few
        # split-K partials (H100 sweep: 2 per SM for one token, 4 for more).
        want = cfg.get("programs_per_sm", 2 if tok == 1 else 4) * _sm_count(device)
        split = triton.next_power_of_2(triton.cdiv(want, n_tiles)) if n_tiles < want else 1
        split = max(1, min(split, 16, k * block_n // 16384))
    k_per_split = triton.cdiv(triton.cdiv(k, split), slice_k) * slice_k
    u = cfg.get("u", 2)  # 2 x 8-byte loads per row and lane per step (H100 sweep: beats 4)
    while (k_per_split // slice_k) % u:
        u //= 2
    split = triton.cdiv(k, k_per_split)  # no empty splits
    even_k = k % (u * slice_k) == 0
    # Preloaded steps stay in registers across the wait: about 64 words a thread at most
    # (a step is nb * u * rows-per-warp words a thread), never more than the split holds.
    steps = triton.cdiv(k_per_split, u * slice_k)
    pre = min(cfg.get("pre", 1), steps, max(1, 64 // (nb * u * (block_n // nw))))
    pre = 4 if pre >= 4 else 2 if pre >= 2 else 1
    return _GemvPlan(tok, block_n // nw, nw, u, nb, split, k_per_split, even_k, pre)


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
            for cfg in (None, {"pdl": False}):  # the plan may differ without PDL
                p = _gemv_plan(m, n, k, device, cfg)
                if p.split_k > 1:
                    part = max(part, p.split_k * m * n)
                cnt = max(cnt, triton.cdiv(n, p.block_n))
    return Fp8LinearWorkspace(
        torch.empty(part, dtype=torch.float32, device=device),
        torch.zeros(cnt, dtype=torch.int32, device=device),
    )


# ------------------------------------------------------------------------------------------------
# Prefill through torch's FP8 scaled matmul
# ------------------------------------------------------------------------------------------------
#
# With act_quant, the reference product is q(x) . dequant(W)^T with q(x) = e4m3 value x 2^e per
# 1x128 block of x and dequant(W) = e4m3 value x 128x128 block scale: exactly the DeepSeek-style
# blockwise recipe that torch runs through cuBLASLt on sm_90 (FP8 tensor cores; the Triton GEMM
# converts both operands to bf16 and runs bf16 MMAs at half the rate).
#
# Exactness: the operands are the reference's own values (the act-quant kernel is act_quant_split
# bit for bit; the weights are used as stored), every product of two e4m3 values is exact in fp32
# (4-bit significands), and scaling by power-of-two block scales is exact (fp32 weight scales that
# are not powers of two round once, as in the reference). So the results differ from the
# reference and from the Triton GEMM only in how the sum is formed: cuBLAS sums each 128-input
# block on the tensor cores (Hopper's FP8 MMA accumulates with fewer bits than fp32) and adds the
# block's partial, scaled, into an fp32 accumulator (use_fast_accum=False); the others sum in
# fp32 in other orders. That stays around the bf16 rounding of the output; the tests compare with
# tolerances.
#
# Without act_quant x stays bf16, which has no exact e4m3 form, so that product (wo_a's groups)
# keeps the Triton GEMM; as do fp16/fp32 outputs (only a bf16 output is set up and probed here:
# the engine's dtype).
#
# Operand layouts (torch checks them, ScaledBlas.cpp; K/128 a multiple of 4: _scaled_mm_eligible):
# - mat_a: xq [Mp, K] e4m3, row-major; Mp = M rounded up to _SCALED_MM_ROW_ALIGN (zero rows).
# - mat_b: W^T [K, N] e4m3, column-major: the weight [N, K] as stored, transposed (a view).
# - scale_a (BlockWise1x128): [Mp, K/128] fp32 outer-dim-major, strides (1, Mp): written by the
#   act-quant kernel as a contiguous [K/128, Mp] buffer and passed transposed.
# - scale_b (BlockWise128x128): [K/128, N/128] fp32, strides (1, K/128): the weight scale
#   [N/128, K/128] as stored (fp32, contiguous; E8M0 bytes converted once), transposed.

# Activation rows per act-quant program (one 128-input block each: 32 x 256 bytes of bf16 in).
_AQ_ROWS = 32
# Rows of the quantised activations are padded to a multiple of this (zero rows, their outputs
# dropped), so the activation-scale stride M is 64-byte aligned whatever the chunk length.
_SCALED_MM_ROW_ALIGN = 16
# Probe problem: M (padded like any odd chunk), N and K with non-square scale grids (3 x 8
# blocks), so a transposed or misread scale layout cannot pass.
_PROBE_SHAPE = (200, 384, 1024)
# Probe acceptance: max |scaled_mm - fp8_linear_ref| over max |fp8_linear_ref|. A correct
# product differs by about one bf16 rounding (2^-9 of an element); a wrong scale layout by O(1).
_PROBE_TOL = 2.0**-6

# A (xq, w_t, scale_a, scale_b) -> bf16 [Mp, N] product through one of torch's APIs.
_ScaledMm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_log = logging.getLogger(__name__)
# Per CUDA device index: (the working API or None, its name or why there is none). Decided once
# per process at the first eligible call.
_BACKENDS: dict[int, tuple[_ScaledMm | None, str]] = {}
# E8M0 weight scale tensor -> (its version counter when converted, fp32 copy). Keyed by identity
# and weakly (an entry goes with its tensor); the version check sees in-place updates.
_W_SCALE_F32: WeakIdKeyDictionary = WeakIdKeyDictionary()


@triton.jit
def _act_quant_e4m3_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm, unit column stride
    q_ptr,  # [M_PAD, K] out: e4m3fn grid values, contiguous; rows >= M are zeros
    s_ptr,  # [ceil(K/128), M_PAD] out: fp32 block scales, contiguous (scale_a, column-major)
    M,
    M_PAD,
    K,
    stride_xm,
    ROWS: tl.constexpr,
    HW_FP8: tl.constexpr,  # hardware e4m3 conversion (GPU) vs exact emulation (interpreter)
):
    """act_quant_split of x into e4m3 q and fp32 block scales: grid (cdiv(M_PAD, ROWS), K/128),
    one 128-input block of ROWS rows per program."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1)
    cols = kb * 128 + tl.arange(0, 128)
    r64 = rows.to(tl.int64)[:, None]
    k_ok = cols[None, :] < K
    v = tl.load(
        x_ptr + r64 * stride_xm + cols[None, :], mask=(rows[:, None] < M) & k_ok, other=0.0
    ).to(tl.float32)
    sc, sc_inv = _act_quant_scale(tl.max(tl.abs(v), axis=1))
    q = _e4m3_q(v * sc_inv[:, None], HW_FP8)  # on the e4m3 grid: the cast below is exact
    pad_ok = rows < M_PAD
    tl.store(q_ptr + r64 * K + cols[None, :], q.to(tl.float8e4nv), mask=pad_ok[:, None] & k_ok)
    tl.store(s_ptr + kb * M_PAD + rows, sc, mask=pad_ok)


def _act_quant_e4m3(x: torch.Tensor, q: torch.Tensor, s_t: torch.Tensor) -> None:
    """Quantise x [M, K] into q [Mp, K] e4m3 and s_t [ceil(K/128), Mp] fp32 (Mp >= M rows; the
    rows past M are zeros), in one launch."""
    m_pad, k = q.shape
    grid = (triton.cdiv(m_pad, _AQ_ROWS), triton.cdiv(k, FP8_BLOCK))
    _act_quant_e4m3_kernel[grid](
        x, q, s_t, x.shape[0], m_pad, k, x.stride(0),
        ROWS=_AQ_ROWS, HW_FP8=not interpreting(), num_warps=4,
    )  # fmt: skip


def _weight_scale_f32(w_scale: torch.Tensor) -> torch.Tensor:
    """The weight scale as fp32 [N/128, K/128] (scaled_mm takes fp32 scales). fp32 scales (what
    the engine loads) are used as they are; E8M0 bytes are converted once per tensor and kept
    while the tensor lives (not while a CUDA graph is being captured: a tensor made there only
    gets its values when the graph replays)."""
    if w_scale.dtype == torch.float32:
        return w_scale
    if w_scale.is_inference():  # no version counter to see in-place updates by: not kept
        return e8m0_to_float(w_scale)
    hit = _W_SCALE_F32.get(w_scale)
    if hit is not None and hit[0] == w_scale._version:
        return hit[1]
    f = e8m0_to_float(w_scale)
    if not (w_scale.is_cuda and _capturing()):
        _W_SCALE_F32[w_scale] = (w_scale._version, f)
    return f


def _scaled_mm_operands(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mat_a, mat_b, scale_a, scale_b) of x . W^T in the layouts listed above; mat_a and scale_a
    have M rounded up to _SCALED_MM_ROW_ALIGN rows."""
    m, k = x.shape
    m_pad = triton.cdiv(m, _SCALED_MM_ROW_ALIGN) * _SCALED_MM_ROW_ALIGN
    xq = torch.empty(m_pad, k, dtype=torch.float8_e4m3fn, device=x.device)
    s_t = torch.empty(triton.cdiv(k, FP8_BLOCK), m_pad, dtype=torch.float32, device=x.device)
    _act_quant_e4m3(x, xq, s_t)
    w_t = w.view(torch.float8_e4m3fn).t()
    return xq, w_t, s_t.t(), _weight_scale_f32(w_scale).t()


def _scaled_mm_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out: torch.Tensor | None,
    call: _ScaledMm,
) -> torch.Tensor:
    """fp8_linear with act_quant through `call`: bf16 [M, N], written to out when given."""
    y = call(*_scaled_mm_operands(x, w, w_scale))[: x.shape[0]]  # drop the padding rows
    if out is None:
        return y  # rows of a row-major [Mp, N]: contiguous
    out.copy_(y)
    return out


def _scaled_mm_candidates() -> list[tuple[str, _ScaledMm]]:
    """torch's FP8 scaled-matmul APIs present in this build, newest first. Presence is not
    support (the device, cuBLASLt and torch's own checks decide): _probe tries each."""
    found: list[tuple[str, _ScaledMm]] = []
    fn = getattr(torch.nn.functional, "scaled_mm", None)
    st = getattr(torch.nn.functional, "ScalingType", None) or getattr(
        torch._C, "_ScalingType", None
    )
    if fn is not None and hasattr(st, "BlockWise1x128") and hasattr(st, "BlockWise128x128"):
        ra, rb = st.BlockWise1x128, st.BlockWise128x128

        def v2(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor):
            return fn(a, b, sa, ra, sb, rb, output_dtype=torch.bfloat16, use_fast_accum=False)

        found.append(("torch.nn.functional.scaled_mm", v2))
    legacy = getattr(torch, "_scaled_mm", None)
    if legacy is not None:
        # The older entry point infers the recipe from the scale shapes and strides: [M, K/128]
        # outer-dim-major is 1x128, [K/128, N/128] whose transpose is row-major is 128x128.
        def v1(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor):
            return legacy(a, b, sa, sb, out_dtype=torch.bfloat16, use_fast_accum=False)

        found.append(("torch._scaled_mm", v1))
    return found


def _probe(device: torch.device) -> tuple[_ScaledMm | None, str]:
    """The first of torch's scaled-matmul APIs that runs on this CUDA device and agrees with
    fp8_linear_ref on one small act-quantised problem, and its name; else None and why."""
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        # torch runs 1x128 / 128x128 block scales on sm_90 only (cuBLASLt's Hopper kernels).
        return None, f"sm_{major}{minor}: DeepSeek-style block scales need sm_90"
    candidates = _scaled_mm_candidates()
    if not candidates:
        return None, f"torch {torch.__version__} has no FP8 scaled matmul"
    with torch.cuda.device(device):  # Triton launches on the current device
        return _pick_candidate(candidates, device)


def _pick_candidate(
    candidates: list[tuple[str, _ScaledMm]], device: torch.device
) -> tuple[_ScaledMm | None, str]:
    """The first of `candidates` whose product on `device` agrees with fp8_linear_ref on the probe
    problem (raising or disagreeing ones are passed over), and its name; else None and why."""
    m, n, k = _PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    # Activation blocks over 9 binades, so their scales differ block to block and row to row.
    mag = torch.exp2(torch.randint(-4, 5, (m, k // FP8_BLOCK, 1), generator=g).float())
    x = (torch.randn(m, k // FP8_BLOCK, FP8_BLOCK, generator=g) * mag).flatten(1)
    x = x.to(torch.bfloat16).to(device)
    w = (torch.randn(n, k, generator=g) * 4).to(torch.float8_e4m3fn).to(device)
    s = torch.randint(116, 126, (n // FP8_BLOCK, k // FP8_BLOCK), generator=g, dtype=torch.uint8)
    s = s.to(device)
    ref = fp8_linear_ref(x, w, s, act_quant=True, out_dtype=torch.float32)
    scale = ref.abs().max().clamp_min(1e-30)
    why = []
    for name, call in candidates:
        try:
            got = _scaled_mm_linear(x, w, s, None, call)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous failure surfaces here
        except Exception as exc:  # unsupported here: torch's checks, cuBLASLt, the arch gate
            why.append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
            continue
        if got.dtype != torch.bfloat16 or got.shape != ref.shape:
            why.append(f"{name}: returned {got.dtype} {list(got.shape)}")
            continue
        err = float((got.float() - ref).abs().max() / scale)  # NaN (fails) if not finite
        if err <= _PROBE_TOL:
            return call, name
        why.append(f"{name}: differs from fp8_linear_ref by {err:.3g} of max|y|")
    return None, "; ".join(why)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _capturing() -> bool:
    """A CUDA graph is being captured on the current stream (False on a build without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _compiled_cuda(device: torch.device) -> bool:
    """A CUDA device running compiled kernels (not the interpreter): where scaled_mm can run."""
    return device.type == "cuda" and not interpreting()


def _scaled_mm_backend(device: torch.device) -> _ScaledMm | None:
    """The scaled-matmul API to use on this CUDA device, or None (Triton GEMM). Probed at the first
    call per device and process; a device without one logs one warning. Not decided while a CUDA
    graph is being captured (the probe synchronises): such calls take the Triton GEMM."""
    idx = _device_index(device)
    hit = _BACKENDS.get(idx)
    if hit is None:
        if _capturing():
            return None
        try:
            hit = _probe(torch.device("cuda", idx))
        except Exception as exc:  # the probe's own setup failed (memory, ...): stay on Triton
            hit = (None, f"probe failed: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
        _BACKENDS[idx] = hit
        if hit[0] is None:
            _log.warning(
                "fp8_linear: torch FP8 scaled matmul off on cuda:%d, prefill GEMMs use the "
                "Triton kernel (%s)", idx, hit[1],
            )  # fmt: skip
    return hit[0]


def scaled_mm_status(device: torch.device | str) -> str:
    """The scaled-matmul API act-quantised prefill GEMMs use on `device` (its name), or
    "off: <why>". Probes the device if that has not happened yet."""
    device = torch.device(device)
    if not _compiled_cuda(device):
        return f"off: {device.type} device" + (" (interpreter)" if interpreting() else "")
    if _scaled_mm_backend(device) is None:
        hit = _BACKENDS.get(_device_index(device))
        return "off: " + (hit[1] if hit else "not decided during a CUDA graph capture")
    return _BACKENDS[_device_index(device)][1]


def _scaled_mm_eligible(
    m: int, n: int, k: int, out_dtype: torch.dtype, act_quant: bool, cfg: dict
) -> bool:
    """Whether the product x [M, K] . W^T [K, N] is one for the scaled matmul: act_quant (bf16 x
    has no exact e4m3 form), at least SCALED_MM_MIN_M rows, a bf16 output, N a multiple of 128
    and K of 512 (K/128 blocks a multiple of 4: the 128x128 weight-scale stride torch demands is
    then the stored one; every V4-Flash FP8 linear qualifies), and not config scaled_mm=False."""
    if not act_quant or not cfg.get("scaled_mm", True) or m < SCALED_MM_MIN_M:
        return False
    return out_dtype == torch.bfloat16 and n % FP8_BLOCK == 0 and k % (4 * FP8_BLOCK) == 0


def _scaled_mm_call(
    x: torch.Tensor, n: int, k: int, out_dtype: torch.dtype, act_quant: bool, cfg: dict
) -> _ScaledMm | None:
    """The scaled-matmul API for this product, or None when it goes to a Triton kernel (not
    eligible, not a compiled CUDA device, or the device has no working API)."""
    if not _scaled_mm_eligible(x.shape[0], n, k, out_dtype, act_quant, cfg):
        return None
    if not _compiled_cuda(x.device):
        return None
    return _scaled_mm_backend(x.device)


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
    groups: int = 1,
    workspace: Fp8LinearWorkspace | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] . W^T with W e4m3fn [N, K] and block scale [ceil(N/128), ceil(K/128)].

    x: bf16/fp16/fp32, rows may be strided (unit column stride). out: [M, N], any of those dtypes
    (default: allocated with x's dtype). workspace: needed by the GEMV path when it splits K;
    pass one from fp8_linear_workspace() to keep the launch allocation-free (graph capture).
    config: optional tuning overrides. GEMV: block_n, split_k, u, tok, num_warps,
    programs_per_sm, maxnreg, pdl (programmatic dependent launch, default on where supported),
    pre (with pdl: weight steps loaded before the wait, 1/2/4), pdl_early (with pdl: the next
    launch may start before this one's wait). GEMM: block_m, block_n, num_warps, num_stages
    (Triton GEMM); scaled_mm (default True: M >= SCALED_MM_MIN_M act-quantised products with a
    bf16 output go to torch's FP8 scaled matmul where it works; False keeps the Triton GEMM).
    That path writes its own output: out= costs one more pass over [M, N] (a copy into out).

    groups = G > 1: block diagonal (wo_a): x [M, G*K] and W [G*R, K], R a multiple or a divisor
    of 128; output rows [gR, (g+1)R) read x's columns [gK, (g+1)K) (fp8_linear_ref defines it).
    One launch for all groups when R is a multiple of the kernel's row tile (block_n; V4-Flash's
    R = 1024 always is), else one launch per group (small test models). The one launch plans and
    sizes its split-K workspace as the whole (N = G*R, K); the per-group launches as (R, K). The
    scaled matmul is not taken (grouped act-quantised prefill runs the Triton GEMM).
    """
    require_triton("fp8_linear")
    if x.dim() != 2:
        raise ValueError(f"fp8_linear: x must be [M, K], got {list(x.shape)}")
    m, k = x.shape
    check_tensor("fp8_linear: x", x, dtypes=_ACT_DTYPES, contiguous=False)
    if x.stride(1) != 1:
        raise ValueError("fp8_linear: x must have unit column stride")
    group_rows = 0  # the kernels' GROUP_ROWS: 0 = not grouped
    if groups != 1:
        if w.dim() != 2:
            raise ValueError(f"fp8_linear: w must be [N, K], got {list(w.shape)}")
        group_rows, k = _group_dims(k, tuple(w.shape), groups, "fp8_linear")
    check_tensor("fp8_linear: w", w, shape=(None, k), dtypes=_W_DTYPES, device=x.device)
    n = w.shape[0]
    sshape = (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK))
    check_tensor("fp8_linear: w_scale", w_scale, shape=sshape, dtypes=_S_DTYPES, device=x.device)
    if out is not None:
        check_tensor("fp8_linear: out", out, shape=(m, n), dtypes=_ACT_DTYPES, contiguous=False)
        if out.stride(1) != 1:
            raise ValueError("fp8_linear: out must have unit column stride")
    cfg = dict(config or {})
    if m > GEMV_MAX_M and not group_rows:
        # Prefill: torch's FP8 scaled matmul where it applies and works (it allocates its own
        # output, so this comes before out is allocated), else the Triton GEMM below.
        out_dtype = x.dtype if out is None else out.dtype
        call = _scaled_mm_call(x, n, k, out_dtype, act_quant, cfg)
        if call is not None:
            return _scaled_mm_linear(x, w, w_scale, out, call)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    wb = w.view(torch.uint8)
    e8m0 = w_scale.dtype != torch.float32
    sb = w_scale.view(torch.uint8) if e8m0 else w_scale

    if m <= GEMV_MAX_M:
        p = _gemv_plan(m, n, k, x.device, cfg)
        if group_rows % p.block_n:
            return _per_group(x, w, w_scale, out, groups, act_quant, workspace, config)
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
        # Programmatic dependent launch (sm_90+): overlaps this launch's start and weight fetch
        # with the tail of the previous kernel; the results do not change.
        pdl = cfg.get("pdl", True) and pdl_supported(x.device)
        _fp8_gemv_kernel[(n_tiles, p.split_k)](
            x, wb, sb, out, part, cnt, m, n, k, x.stride(0), out.stride(0), p.k_per_split,
            GROUP_ROWS=group_rows, SCALE_E8M0=e8m0, ACT_QUANT=act_quant, HW_FP8=not interpreting(),
            EVEN_K=p.even_k, TOK=p.tok, R=p.rows_per_warp, NW=p.num_warps, U=p.u, NB=p.nb,
            SPLIT_K=p.split_k, PDL=pdl, PRE=p.pre if pdl else 1,
            EARLY=pdl and cfg.get("pdl_early", True),
            num_warps=p.num_warps, num_stages=1, **({"launch_pdl": True} if pdl else {}),
            **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}),
        )  # fmt: skip
    else:
        bm = cfg.get("block_m", 64)
        bn = cfg.get("block_n", 128)
        if 128 % bn:
            raise ValueError(f"fp8_linear: block_n must divide 128, got {bn}")
        if group_rows % bn:
            return _per_group(x, w, w_scale, out, groups, act_quant, workspace, config)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _fp8_gemm_kernel[grid](
            x, wb, sb, out, m, n, k, x.stride(0), out.stride(0), GROUP_ROWS=group_rows,
            SCALE_E8M0=e8m0, ACT_QUANT=act_quant, IEEE_FP32=x.dtype == torch.float32,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.get("num_warps", 8),
            num_stages=cfg.get("num_stages", 3),
        )  # fmt: skip
    return out


def _per_group(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out: torch.Tensor,
    groups: int,
    act_quant: bool,
    workspace: Fp8LinearWorkspace | None,
    config: dict | None,
) -> torch.Tensor:
    """The grouped product one group per launch, into out: for groups narrower than the kernel's
    row tile, which would straddle two groups whose inputs differ."""
    r, k = w.shape[0] // groups, w.shape[1]
    for g in range(groups):
        s_lo, s_hi = _group_scale_rows(g, r)
        fp8_linear(
            x[:, g * k : (g + 1) * k], w[g * r : (g + 1) * r], w_scale[s_lo:s_hi],
            out=out[:, g * r : (g + 1) * r], act_quant=act_quant, workspace=workspace,
            config=config,
        )  # fmt: skip
    return out
