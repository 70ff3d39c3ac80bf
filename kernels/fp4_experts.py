"""Routed MoE experts straight from the FP4 slot pool (v4-architecture.md §2.3 FP4, §3.4 experts).

Letters: M tokens, K experts per token, P = M*K (token, expert) pairs, D model dim, I expert
width, S pool slots.

Slot pool layout (the expert store allocates it; one slot holds one expert, packed exactly as the
checkpoint stores it):

    w13_q [S, 2*I, D//2]  uint8   E2M1 pairs, low nibble = even input; rows 0..I-1 = w1 (gate),
                                  rows I..2I-1 = w3 (up)
    w13_s [S, 2*I, D//32] uint8   E8M0 scale per 32 inputs (same row order)
    w2_q  [S, D, I//2]    uint8   E2M1 pairs of w2 (down)
    w2_s  [S, D, I//32]   uint8   E8M0 scale per 32 inputs

(V4-Flash: D = 4096, I = 2048: 13,369,344 bytes per slot.) `pool_shapes()` gives the shapes. The
kernels take each tensor with any slot stride (stride(0), a multiple of 16 bytes) and contiguous
rows, so the four may be separate contiguous tensors or views of one packed [S, slot_bytes]
buffer holding each slot's record in one piece (`packed_pool_views`: a host->slot copy is one
memcpy). Each kernel offsets its pointers by slot * slot stride (int64) and indexes rows within
the slot in 32 bits.

Math per pair (token m, expert k) with slot s = slots[m, k] (s < 0: the pair is skipped):
    g = w1[s] . x_m,  v = w3[s] . x_m           (fp32; x_m act-quantised when act_quant)
    g = min(g, limit); v = clamp(v, -limit, limit)
    a = route_w[m, k] * silu(g) * v, cast to the activation dtype (x's dtype)
    y = w2[s] . a                               (a act-quantised when act_quant)
    out[m] = shared_out[m] + sum_k y            (fp32 accumulation, cast to out's dtype)

Decode (`fp4_experts`, M <= 16): two launches, both graph capturable, no host sync. Both stream
weight rows through `_fp4_rows_acc` (tile layout in the comment above it): every lane reads whole
16-byte vectors (32 inputs, one scale group) of its rows, a warp covers 512 contiguous bytes of a
row per load, words are decoded in registers (shift/mask passes turn a word's 8 nibbles into e4m3
bytes, exact, see _formats; cvt.rn.f16x2.e4m3x2 converts two at a time), products go into fp32 FMA
chains and each 32-input group sum is scaled once; lanes are reduced once per row at the end.
  1. gate/up: grid (I/BLOCK_N, P). The program of the first pair that uses a slot (the slot's
     leader) streams BLOCK_N gate rows interleaved with the matching up rows and applies each
     decoded word to every token that routed to that slot (one token: the one-token path; more:
     two tokens per pass), so a slot shared by several tokens is read once. Writes a [P, I].
     With act_quant, each program quantises x's blocks as it reads them, and the last program
     to write a 128-wide block of a (arrival counter) rewrites it as e4m3 grid values and
     stores its scale, so the down programs read a ready-quantised a.
  2. down + combine, two forms (config "down"):
     "pair" (default for M = 1 and M > 4): grid (D/BLOCK_N, P), leaders again (a pair whose token
     already has the same slot at a smaller k is handled on its own). Each program writes its fp32
     partial y; the last program of a row tile to arrive (atomic counter, reset afterwards) adds
     shared_out and the K partials of each token in k order and writes out: deterministic, no
     extra launch.
     "token" (default for M = 2..4): grid (D/BLOCK_N, M); a program streams its token's K experts
     into one accumulator, adds shared_out and writes out (no partials or counters; a slot shared
     by several tokens is read once per token).
Prefill (`fp4_experts_grouped`, any M): pairs are sorted by slot on the device and padded into
BLOCK_M tiles of one slot (the usual MoE alignment), then tl.dot kernels for gate/up and down and a
small combine kernel. Same definition (`fp4_experts_ref`). Two variants (config "variant"):
  v2 (default for bf16 / fp16): each tile is computed transposed, the weights decoded word by word
     in registers as the tensor-core dot's register operand, the activation rows (permuted once
     per call into the order the decode produces, act-quantised in the same pass) streamed
     through shared memory; persistent programs over the tiles in use (block comment "Prefill
     (grouped) kernels, v2").
  v1 (default for fp32): the weights decoded into the dot's shared-memory operand, activations
     in input order, one program per (tile, row tile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._formats import (
    FP4_GROUP,
    HAS_TRITON,
    _act_quant_scale,
    _and_flag,
    _e4m3_q,
    _e8m0_times_64,
    _fma8,
    _fp4_pair_to_f32,
    _fp4_word_f32,
    act_quant_ref,
    check_tensor,
    dequant_fp4,
    gdc_launch_dependents,
    gdc_wait,
    interpreting,
    pdl_supported,
    require_triton,
    tl,
    triton,
)

__all__ = [
    "DECODE_MAX_M",
    "V4_FLASH_D",
    "V4_FLASH_I",
    "Fp4ExpertsWorkspace",
    "fp4_experts",
    "fp4_experts_grouped",
    "fp4_experts_ref",
    "fp4_experts_workspace",
    "packed_pool_views",
    "pool_shapes",
    "slot_bytes",
]

V4_FLASH_D = 4096
V4_FLASH_I = 2048
DECODE_MAX_M = 16
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def pool_shapes(n_slots: int, d: int, i: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the four uint8 pool tensors for S slots of experts with model dim D, width I."""
    if d % FP4_GROUP or i % FP4_GROUP:
        raise ValueError(f"D={d} and I={i} must be multiples of {FP4_GROUP} (FP4 scale groups)")
    return {
        "w13_q": (n_slots, 2 * i, d // 2),
        "w13_s": (n_slots, 2 * i, d // FP4_GROUP),
        "w2_q": (n_slots, d, i // 2),
        "w2_s": (n_slots, d, i // FP4_GROUP),
    }


def slot_bytes(d: int, i: int) -> int:
    """Bytes of one slot (all four tensors); 13,369,344 for V4-Flash."""
    return sum(math.prod(s[1:]) for s in pool_shapes(1, d, i).values())


def packed_pool_views(buf: torch.Tensor, d: int, i: int) -> dict[str, torch.Tensor]:
    """The four pool tensors (pool_shapes(S, d, i), by name) as views of one packed buffer.

    buf [S, slot_bytes(d, i)] uint8, contiguous: row s is slot s's record, its four tensors back
    to back in pool_shapes order, each row-major:

        w13_q [2I, D/2]   at byte 0
        w13_s [2I, D/32]  at byte 2I * D/2
        w2_q  [D, I/2]    at byte 2I * D/2 + 2I * D/32
        w2_s  [D, I/32]   at byte 2I * D/2 + 2I * D/32 + D * I/2   (record ends at slot_bytes)

    Every view has slot stride (stride(0)) slot_bytes and contiguous rows; the offsets and
    slot_bytes are multiples of 16 (D, I are multiples of 32), as the kernels require. This is
    the one definition of the packed layout: the expert store allocates such buffers and moves a
    record with one copy of a row."""
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"packed_pool_views: expected a torch.Tensor, got {type(buf).__name__}")
    if buf.dtype != torch.uint8:
        raise TypeError(f"packed_pool_views: buf must be uint8, got {buf.dtype}")
    want = slot_bytes(d, i)  # validates d and i
    if buf.dim() != 2 or buf.shape[1] != want:
        raise ValueError(
            f"packed_pool_views: buf must be [S, slot_bytes(D={d}, I={i}) = {want}], "
            f"got {list(buf.shape)}"
        )
    if not buf.is_contiguous():
        raise ValueError("packed_pool_views: buf must be contiguous")
    views, off = {}, 0
    for name, shape in pool_shapes(buf.shape[0], d, i).items():
        n = math.prod(shape[1:])
        views[name] = buf[:, off : off + n].unflatten(1, shape[1:])  # [S, rows, width]
        off += n
    return views


# ------------------------------------------------------------------------------------------------
# Numerical definition
# ------------------------------------------------------------------------------------------------


def fp4_experts_ref(
    x: torch.Tensor,
    slots: torch.Tensor,
    route_w: torch.Tensor,
    shared_out: torch.Tensor,
    w13_q: torch.Tensor,
    w13_s: torch.Tensor,
    w2_q: torch.Tensor,
    w2_s: torch.Tensor,
    swiglu_limit: float,
    *,
    act_quant: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-torch definition (see the module docstring). x [M, D], slots [M, K] int (-1 = skip),
    route_w [M, K] fp32, shared_out [M, D] -> out [M, D] in out_dtype (default x.dtype)."""
    m_tok, d = x.shape
    n_i = w2_q.shape[2] * 2
    acc = torch.zeros(m_tok, d, dtype=torch.float32, device=x.device)
    xq = act_quant_ref(x) if act_quant else x.float()
    for s in torch.unique(slots[slots >= 0]).tolist():
        tok, kk = torch.nonzero(slots == s, as_tuple=True)
        w13 = dequant_fp4(w13_q[s], w13_s[s])  # [2I, D]
        h = xq[tok] @ w13.t()  # [n, 2I]
        g = h[:, :n_i].clamp(max=swiglu_limit)
        v = h[:, n_i:].clamp(-swiglu_limit, swiglu_limit)
        a = (route_w[tok, kk].float()[:, None] * F.silu(g) * v).to(x.dtype)
        a = act_quant_ref(a) if act_quant else a.float()
        y = a @ dequant_fp4(w2_q[s], w2_s[s]).t()  # [n, D]
        acc.index_put_((tok,), y, accumulate=True)
    return (shared_out.float() + acc).to(out_dtype or x.dtype)


# ------------------------------------------------------------------------------------------------
# Decode kernels
# ------------------------------------------------------------------------------------------------
#
# Both decode kernels stream FP4 weight rows through one helper, _fp4_rows_dot. Its loop step is a
# tile [4, NB, NW, R, 4] of int32 words: lane (l, b) of warp w holds word j of weight row
# wrow[w, r] at word offset b * 16 + l * 4 + j in the step (NW = num_warps, R rows per warp):
#   - 4 words = one 16-byte vector per lane = 32 inputs = one E8M0 scale group;
#   - 4 lanes l = one 128-input act-quant block (the block amax is a 4-lane max);
#   - NB blocks b: NB * 4 lanes (32 = a warp on the GPU) = NB * 128 inputs per row and step.
# So a warp reads NB * 64 contiguous bytes of a row per vector load (whole 128-byte lines) and every
# lane issues one 16-byte load per row. The input row is the same for every weight row: each lane
# loads its 32 inputs once per step (one 16-byte load per word into an [4, NB, NW, 1, 8] tile:
# every warp loads its own copy) and reuses them for its R rows. A lane sums its 32 products in
# fp32, multiplies by the group scale once, and accumulates per (lane, row); the cross-lane
# reduction happens once, after the loop. Nothing is masked in the loop (the launcher requires D
# and I to be multiples of NB * 128), so the loads stay 16 bytes wide.
# Dimension order matters for the compiled layouts: Triton gives lanes to the dimensions after the
# contiguous one in index order when their contiguity ties (triton 3.6), so the lane dimensions
# come first, then the warp dimension, then the per-thread ones (R, then the contiguous words).
#
# Tokens: a slot used by one token (the usual case) takes the one-token path (TWO=False: decode a
# word once, 8 FMAs); a slot shared by several tokens is processed two tokens per pass over its
# weights (TWO=True: each word decoded once for both), ceil(n/2) passes.


@triton.jit
def _fp4_x_split(xv):
    """[4, NB, NW, 1, 8] inputs of one word per lane -> 8 tensors [4, NB, NW, 1] (element e)."""
    v = tl.reshape(xv, [xv.shape[0], xv.shape[1], xv.shape[2], xv.shape[3], 2, 2, 2])
    ev, od = tl.split(v)  # e = 4*b2 + 2*b1 + b0: b0
    e04, e26 = tl.split(ev)  # b1
    o15, o37 = tl.split(od)
    x0, x4 = tl.split(e04)  # b2
    x2, x6 = tl.split(e26)
    x1, x5 = tl.split(o15)
    x3, x7 = tl.split(o37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _fp4_word_acc(p0, p1, w, xa, xb, TWO: tl.constexpr, ASM: tl.constexpr):
    """p0 += sum_e value_e(w) * xa_e (and p1 with xb when TWO); each word is decoded once."""
    f0, f1, f2, f3, f4, f5, f6, f7 = _fp4_word_f32(w, ASM)
    a0, a1, a2, a3, a4, a5, a6, a7 = _fp4_x_split(xa)
    p0 = _fma8(p0, f0, f1, f2, f3, f4, f5, f6, f7, a0, a1, a2, a3, a4, a5, a6, a7)
    if TWO:
        b0, b1, b2, b3, b4, b5, b6, b7 = _fp4_x_split(xb)
        p1 = _fma8(p1, f0, f1, f2, f3, f4, f5, f6, f7, b0, b1, b2, b3, b4, b5, b6, b7)
    return p0, p1


@triton.jit
def _fp4_x_step(xp, xs, xoff, boff, ACT_QUANT: tl.constexpr, HW_FP8: tl.constexpr):
    """One step of inputs for one token: words j = 0..3 of every lane as fp32 [4, NB, NW, 1, 8]
    (xoff: element offsets of word 0), and the act-quant block scale of every lane (1.0 with
    _AQ_NONE). With act-quant the inputs are e4m3 grid values (_AQ_INLINE: quantised here from
    the row; _AQ_PRE: read as such, the scales from xs at block offsets boff [4, NB, NW, 1]); the
    block scale is applied to the lane sums instead."""
    x0 = tl.load(xp + xoff).to(tl.float32)
    x1 = tl.load(xp + xoff + 8).to(tl.float32)
    x2 = tl.load(xp + xoff + 16).to(tl.float32)
    x3 = tl.load(xp + xoff + 24).to(tl.float32)
    if ACT_QUANT == 2:
        bs = tl.load(xs + boff)
    elif ACT_QUANT == 1:
        a = tl.maximum(
            tl.maximum(tl.max(tl.abs(x0), axis=4), tl.max(tl.abs(x1), axis=4)),
            tl.maximum(tl.max(tl.abs(x2), axis=4), tl.max(tl.abs(x3), axis=4)),
        )  # [4, NB, NW, 1]
        s, s_inv = _act_quant_scale(tl.max(a, axis=0))  # [NB, NW, 1]: one scale per 4 lanes
        si = s_inv[None, :, :, :, None]
        x0 = _e4m3_q(x0 * si, HW_FP8)
        x1 = _e4m3_q(x1 * si, HW_FP8)
        x2 = _e4m3_q(x2 * si, HW_FP8)
        x3 = _e4m3_q(x3 * si, HW_FP8)
        bs = s[None]
    else:
        bs = tl.full([1, xoff.shape[1], xoff.shape[2], 1], 1.0, tl.float32)
    return x0, x1, x2, x3, bs


@triton.jit
def _fp4_rows_dot(
    w_ptr, s_ptr, wrow, xp0, xp1, xs0, xs1, N_IN: tl.constexpr, R: tl.constexpr, NW: tl.constexpr,
    NB: tl.constexpr, TWO: tl.constexpr, ACT_QUANT: tl.constexpr, HW_FP8: tl.constexpr,
    ASM: tl.constexpr, PREFETCH: tl.constexpr, WAIT: tl.constexpr,
):  # fmt: skip
    """(acc0, acc1): [NW, R] fp32 dot products of the weight rows wrow (of the slot w_ptr, s_ptr
    point at) with input rows xp0 and xp1 (acc1 is zeros unless TWO). See _fp4_rows_acc."""
    acc0 = tl.zeros([4, NB, NW, R], dtype=tl.float32)
    acc1 = tl.zeros([4, NB, NW, R], dtype=tl.float32)
    acc0, acc1 = _fp4_rows_acc(
        acc0, acc1, w_ptr, s_ptr, wrow, xp0, xp1, xs0, xs1, N_IN, R, NW, NB, TWO, ACT_QUANT,
        HW_FP8, ASM, PREFETCH, WAIT,
    )  # fmt: skip
    return tl.sum(tl.sum(acc0, axis=0), axis=0), tl.sum(tl.sum(acc1, axis=0), axis=0)


@triton.jit
def _fp4_rows_acc(
    acc0,  # [4, NB, NW, R] fp32 per-(lane, row) partial sums, token 0
    acc1,  # the same for token 1 (updated only when TWO)
    w_ptr,  # int32 view of one slot's packed E2M1 weights, contiguous rows of N_IN // 8 words
    s_ptr,  # int32 view of that slot's E8M0 scales (4 per word), rows of N_IN // 128 words
    wrow,  # [NW, R] int32 weight row indices within the slot (warp w streams rows wrow[w, :])
    xp0,  # input row of token 0 (N_IN elements, any float dtype)
    xp1,  # input row of token 1 (read only when TWO)
    xs0,  # _AQ_PRE: fp32 act-quant block scales of input row 0 (N_IN // 128), else unused
    xs1,  # the same for input row 1
    N_IN: tl.constexpr,
    R: tl.constexpr,
    NW: tl.constexpr,  # = num_warps
    NB: tl.constexpr,
    TWO: tl.constexpr,
    ACT_QUANT: tl.constexpr,  # _AQ_NONE, _AQ_INLINE or _AQ_PRE (see _fp4_x_step)
    HW_FP8: tl.constexpr,
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,  # load step st+1's weights before computing step st
    WAIT: tl.constexpr,  # programmatic dependent launch: gdc_wait before the first input load
):
    """acc0 (and acc1 when TWO) plus the per-(lane, row) partial dot products of the weight rows
    with input rows xp0 (xp1), not yet reduced across lanes. See the block comment above."""
    ROW_W: tl.constexpr = N_IN // 8
    ROW_S: tl.constexpr = N_IN // 128
    ll = tl.arange(0, 4)[:, None]
    bb = tl.arange(0, NB)[None, :]
    lane_w = (bb * 16 + ll * 4)[:, :, None, None, None]  # [4, NB, 1, 1, 1] first word of a lane
    woff = lane_w + tl.arange(0, 4)[None, None, None, None, :]  # [4, NB, 1, 1, 4]
    # Lane (l, b) needs scale byte l of word b: the 4 lanes of a block load the same word, and the
    # contiguity hint of 1 keeps Triton from vectorising the load across lanes, so it gets the
    # weights' layout (one word per lane) instead of a shared-memory layout conversion every step.
    soff = (bb + 0 * ll)[:, :, None, None]  # [4, NB, 1, 1]
    sshift = (tl.arange(0, 4) * 8)[:, None, None, None]  # [4, 1, 1, 1]
    xoff = lane_w * 8 + tl.arange(0, 8)[None, None, None, None, :]  # [4, NB, 1, 1, 8]
    xoff = xoff + tl.zeros([1, 1, NW, 1, 1], tl.int32)  # [4, NB, NW, 1, 8]: a copy per warp
    boff = (bb + 0 * ll)[:, :, None, None] + tl.zeros([1, 1, NW, 1], tl.int32)  # act block
    wp = w_ptr + (wrow * ROW_W)[None, None, :, :, None] + woff  # [4, NB, NW, R, 4]
    sp = tl.max_contiguous(s_ptr + (wrow * ROW_S)[None, None, :, :] + soff, [1, 1, 1, 1])
    N_STEPS: tl.constexpr = N_IN // (NB * 128)
    st0 = 0
    if WAIT:  # PDL: the first weight tile(s) stream while the producer of the inputs drains
        w = tl.load(wp)
        sw = tl.load(sp)
        if PREFETCH:  # the second step's tile too
            nx1 = tl.minimum(1, N_STEPS - 1)
            w_nx = tl.load(wp + nx1 * (NB * 16))
            sw_nx = tl.load(sp + nx1 * NB)
        gdc_wait()
        acc0, acc1 = _fp4_rows_step(
            acc0, acc1, w, sw, sshift, xp0, xp1, xs0, xs1, xoff, boff, NB, NW, R, TWO, ACT_QUANT,
            HW_FP8, ASM,
        )  # fmt: skip
        st0 = 1
    elif PREFETCH:
        w_nx = tl.load(wp)
        sw_nx = tl.load(sp)
    for st in range(st0, N_STEPS):
        if PREFETCH:  # this step's tile was loaded last step; ask for the next one now
            w = w_nx
            sw = sw_nx
            nx = tl.minimum(st + 1, N_STEPS - 1)  # the last step reloads its own (cached) tile
            w_nx = tl.load(wp + nx * (NB * 16))
            sw_nx = tl.load(sp + nx * NB)
        else:
            w = tl.load(wp + st * (NB * 16))  # [4, NB, NW, R, 4]: a 16-byte vector per lane/row
            sw = tl.load(sp + st * NB)  # [4, NB, NW, R]
        acc0, acc1 = _fp4_rows_step(
            acc0, acc1, w, sw, sshift, xp0, xp1, xs0, xs1, xoff + st * (NB * 128), boff + st * NB,
            NB, NW, R, TWO, ACT_QUANT, HW_FP8, ASM,
        )  # fmt: skip
    return acc0, acc1


@triton.jit
def _fp4_rows_step(
    acc0, acc1, w, sw, sshift, xp0, xp1, xs0, xs1, xo, bo, NB: tl.constexpr, NW: tl.constexpr,
    R: tl.constexpr, TWO: tl.constexpr, ACT_QUANT: tl.constexpr, HW_FP8: tl.constexpr,
    ASM: tl.constexpr,
):  # fmt: skip
    """One loop step of _fp4_rows_acc: weight words w [4, NB, NW, R, 4] and their scale words sw
    [4, NB, NW, R] against the inputs at element offsets xo (act blocks bo); returns the updated
    accumulators."""
    sc = _e8m0_times_64((sw >> sshift) & 0xFF)
    wv = tl.reshape(w, [4, NB, NW, R, 2, 2])  # word j = 2 * j1 + j0
    w_a, w_b = tl.split(wv)  # j0
    w0, w2 = tl.split(w_a)  # j1
    w1, w3 = tl.split(w_b)
    xa0, xa1, xa2, xa3, bsa = _fp4_x_step(xp0, xs0, xo, bo, ACT_QUANT, HW_FP8)
    if TWO:
        xb0, xb1, xb2, xb3, bsb = _fp4_x_step(xp1, xs1, xo, bo, ACT_QUANT, HW_FP8)
    else:
        xb0, xb1, xb2, xb3, bsb = xa0, xa1, xa2, xa3, bsa
    p0 = tl.zeros([4, NB, NW, R], dtype=tl.float32)
    p1 = tl.zeros([4, NB, NW, R], dtype=tl.float32)
    p0, p1 = _fp4_word_acc(p0, p1, w0, xa0, xb0, TWO, ASM)
    p0, p1 = _fp4_word_acc(p0, p1, w1, xa1, xb1, TWO, ASM)
    p0, p1 = _fp4_word_acc(p0, p1, w2, xa2, xb2, TWO, ASM)
    p0, p1 = _fp4_word_acc(p0, p1, w3, xa3, xb3, TWO, ASM)
    if ACT_QUANT:
        acc0 += p0 * (sc * bsa)
    else:
        acc0 += p0 * sc
    if TWO:
        if ACT_QUANT:
            acc1 += p1 * (sc * bsb)
        else:
            acc1 += p1 * sc
    return acc0, acc1


@triton.jit
def _fp4_gate_up_store(
    acc, tok, slot, slots_ptr, rw_ptr, a_ptr, as_ptr, acnt_ptr, rows, blk, limit,
    I: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, A_QUANT: tl.constexpr,
    HW_FP8: tl.constexpr,
):  # fmt: skip
    """SwiGLU of one token's sums acc [NW, 2 * R2] (tile row 2i = gate, 2i+1 = up of output rows
    rows [NW, R2], all in act block blk); writes a for every pair of the token that routed to
    `slot` (the same slot twice: both pairs, each with its routing weight). A_QUANT: see
    _fp4_a_block_arrive."""
    g, u = tl.split(tl.reshape(acc, [acc.shape[0], acc.shape[1] // 2, 2]))
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    silu_g = g / (1.0 + tl.exp(-g))
    for k in tl.static_range(K):
        pair = tok * K + k
        if tl.load(slots_ptr + pair) == slot:
            rw = tl.load(rw_ptr + pair)
            a = rw * silu_g * u
            tl.store(a_ptr + pair.to(tl.int64) * I + rows, a.to(a_ptr.dtype.element_ty))
            if A_QUANT:
                _fp4_a_block_arrive(a_ptr, as_ptr, acnt_ptr, pair, blk, I, BLOCK_N, HW_FP8)


@triton.jit
def _fp4_a_block_arrive(
    a_ptr, as_ptr, acnt_ptr, pair, blk, I: tl.constexpr, BLOCK_N: tl.constexpr,
    HW_FP8: tl.constexpr,
):  # fmt: skip
    """Act-quantise a once, in the gate/up launch, instead of in every down program that reads
    it: the 128 / BLOCK_N programs that write the 128 values of act block blk of a pair's row
    each count in on that block's counter after their store; the last to arrive reads the block
    back (from L2), replaces it with its e4m3 grid values (exact in a's dtype), writes the block
    scale to as_ptr [P, I / 128] and resets the counter."""
    tl.debug_barrier()  # every thread's store of this tile comes before the release below
    cnt = acnt_ptr + pair * (I // 128) + blk
    arrived = tl.atomic_add(cnt, 1, sem="acq_rel")
    if arrived == 128 // BLOCK_N - 1:
        ap = a_ptr + pair.to(tl.int64) * I + blk * 128 + tl.arange(0, 128)
        v = tl.load(ap, cache_modifier=".cg").to(tl.float32)
        sc, sc_inv = _act_quant_scale(tl.max(tl.abs(v), axis=0))
        tl.store(ap, _e4m3_q(v * sc_inv, HW_FP8).to(a_ptr.dtype.element_ty))
        tl.store(as_ptr + pair * (I // 128) + blk, sc)
        tl.atomic_xchg(cnt, 0)


@triton.jit
def _act_quant_rows_kernel(
    x_ptr,  # [R, N] rows to quantise, row stride stride_x
    q_ptr,  # [R, N] out: their e4m3 grid values in q's dtype (exact), row stride stride_q
    s_ptr,  # [R, ceil(N / 128)] out: fp32 block scales, row stride stride_s
    N,
    stride_x,
    stride_q,
    stride_s,
    BLOCKS: tl.constexpr,  # 128-input act blocks per program
    HW_FP8: tl.constexpr,
):
    """act_quant_split of one row's BLOCKS blocks per program: grid (R, cdiv(N, 128 * BLOCKS))."""
    r = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    cols = blk[:, None] * 128 + tl.arange(0, 128)[None, :]  # [BLOCKS, 128]
    ok = cols < N
    v = tl.load(x_ptr + r * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    sc, sc_inv = _act_quant_scale(tl.max(tl.abs(v), axis=1))
    q = _e4m3_q(v * sc_inv[:, None], HW_FP8)
    tl.store(q_ptr + r * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + r * stride_s + blk, sc, mask=blk * 128 < N)


@triton.jit
def _fp4_experts_gate_up_kernel(
    x_ptr,  # [M, D] activations, row stride stride_xm
    slots_ptr,  # [M, K] int32 slot per pair, contiguous (-1 = skip)
    rw_ptr,  # [M, K] fp32 routing weights, contiguous
    wq_ptr,  # [S, 2I, D/8] int32 view of w13_q (8 E2M1 inputs per word), slot stride wq_slot
    ws_ptr,  # [S, 2I, D/128] int32 view of the w13 E8M0 scales, slot stride ws_slot
    a_ptr,  # [P, I] workspace: activation a per pair (x's dtype), row p = m*K + k
    as_ptr,  # A_QUANT: [P, I/128] fp32 workspace, the block scales of a
    acnt_ptr,  # A_QUANT: [P, I/128] int32 arrival counters, zero before and after
    M,
    stride_xm,
    wq_slot,  # slot strides of w13_q and w13_s in 16-byte units: so the compiler knows every slot
    ws_slot,  # starts 16-byte aligned (the loads stay 16 bytes wide) whatever the stride's value
    limit,  # swiglu_limit (fp32)
    D: tl.constexpr,
    I: tl.constexpr,
    K: tl.constexpr,  # experts per token
    P_BLOCK: tl.constexpr,  # next power of two >= M*K
    M_BLOCK: tl.constexpr,  # next power of two >= M
    K_BLOCK: tl.constexpr,  # next power of two >= K
    BLOCK_N: tl.constexpr,  # outputs per program: BLOCK_N rows of w1 and the same rows of w3
    NB: tl.constexpr,  # act blocks (4 lanes each) per loop step
    NW: tl.constexpr,  # num_warps
    ACT_QUANT: tl.constexpr,  # for x: _AQ_NONE or _AQ_INLINE
    A_QUANT: tl.constexpr,  # act-quantise a here (grid values in place, scales to as_ptr)
    HW_FP8: tl.constexpr,  # hardware e4m3 conversion (GPU) vs exact emulation (interpreter)
    ASM: tl.constexpr,  # PTX word decode (GPU)
    PREFETCH: tl.constexpr,  # register double buffering of the weight tile
    PDL: tl.constexpr,  # let the down launch start now (programmatic dependent launch)
):
    """Grid (I / BLOCK_N, M*K). The program of a slot's first pair (its leader) computes gate and
    up for every token routed to the slot; the others exit at once."""
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
    slot = tl.load(slots_ptr + p)
    q = tl.arange(0, P_BLOCK)
    sq = tl.load(slots_ptr + q, mask=q < M * K, other=-1)
    n_before = tl.sum(((sq == slot) & (q < p)).to(tl.int32), axis=0)
    if (slot >= 0) & (n_before == 0):
        # Warp w streams output rows w, w + NW, ...: its row 2i is the gate row, 2i+1 the up row,
        # so one load covers both matrices and SwiGLU pairs them with a reshape at the end.
        R2: tl.constexpr = BLOCK_N // NW
        rr = tl.arange(0, 2 * R2)[None, :]
        ww = tl.arange(0, NW)[:, None]
        rows = pid_n * BLOCK_N + tl.arange(0, R2)[None, :] * NW + ww  # [NW, R2] outputs
        wrow = (rr % 2) * I + pid_n * BLOCK_N + (rr // 2) * NW + ww  # [NW, 2 * R2] in the slot
        wq = wq_ptr + slot.to(tl.int64) * wq_slot * 4  # the slot's weights and scales
        ws = ws_ptr + slot.to(tl.int64) * ws_slot * 4
        blk = pid_n * BLOCK_N // 128
        if M_BLOCK == 1:
            acc, _ = _fp4_rows_dot(
                wq, ws, wrow, x_ptr, x_ptr, x_ptr, x_ptr, D, 2 * R2, NW, NB, False,
                ACT_QUANT, HW_FP8, ASM, PREFETCH, False,
            )  # fmt: skip
            _fp4_gate_up_store(
                acc, 0, slot, slots_ptr, rw_ptr, a_ptr, as_ptr, acnt_ptr, rows, blk, limit, I, K,
                BLOCK_N, A_QUANT, HW_FP8,
            )  # fmt: skip
        else:
            mm = tl.arange(0, M_BLOCK)
            kk = tl.arange(0, K_BLOCK)
            s2 = tl.load(
                slots_ptr + mm[:, None] * K + kk[None, :],
                mask=(mm[:, None] < M) & (kk[None, :] < K),
                other=-1,
            )
            member = (tl.max((s2 == slot).to(tl.int32), axis=1) > 0).to(tl.int32)  # [M_BLOCK]
            n_mem = tl.sum(member, axis=0)
            if n_mem == 1:
                tok = tl.sum(member * mm, axis=0)
                acc, _ = _fp4_rows_dot(
                    wq, ws, wrow, x_ptr + tok * stride_xm, x_ptr,
                    x_ptr, x_ptr, D, 2 * R2, NW, NB, False, ACT_QUANT, HW_FP8, ASM, PREFETCH,
                    False,
                )  # fmt: skip
                _fp4_gate_up_store(
                    acc, tok, slot, slots_ptr, rw_ptr, a_ptr, as_ptr, acnt_ptr, rows, blk, limit,
                    I, K, BLOCK_N, A_QUANT, HW_FP8,
                )  # fmt: skip
            else:
                rank = tl.cumsum(member, axis=0) - 1
                for c in range(0, n_mem, 2):
                    t0 = tl.sum(tl.where((member > 0) & (rank == c), mm, 0), axis=0)
                    t1 = tl.sum(tl.where((member > 0) & (rank == c + 1), mm, 0), axis=0)
                    acc0, acc1 = _fp4_rows_dot(
                        wq, ws, wrow, x_ptr + t0 * stride_xm, x_ptr + t1 * stride_xm,
                        x_ptr, x_ptr, D, 2 * R2, NW, NB, True, ACT_QUANT, HW_FP8, ASM, PREFETCH,
                        False,
                    )  # fmt: skip
                    _fp4_gate_up_store(
                        acc0, t0, slot, slots_ptr, rw_ptr, a_ptr, as_ptr, acnt_ptr, rows, blk,
                        limit, I, K, BLOCK_N, A_QUANT, HW_FP8,
                    )  # fmt: skip
                    if c + 1 < n_mem:
                        _fp4_gate_up_store(
                            acc1, t1, slot, slots_ptr, rw_ptr, a_ptr, as_ptr, acnt_ptr, rows, blk,
                            limit, I, K, BLOCK_N, A_QUANT, HW_FP8,
                        )  # fmt: skip


@triton.jit
def _fp4_experts_down_kernel(
    a_ptr,  # [P, I] activations from the gate/up kernel (_AQ_PRE: their e4m3 grid values)
    as_ptr,  # _AQ_PRE: [P, I/128] fp32 block scales of a
    slots_ptr,  # [M, K] int32
    shared_ptr,  # [M, D] shared-expert output, row stride stride_sm
    wq_ptr,  # [S, D, I/8] int32 view of w2_q, slot stride wq_slot
    ws_ptr,  # [S, D, I/128] int32 view of the w2 E8M0 scales, slot stride ws_slot
    y_ptr,  # [P, D] fp32 workspace: y per pair
    cnt_ptr,  # [D / BLOCK_N] int32 arrival counters, zero before and after
    out_ptr,  # [M, D] output, row stride stride_om
    M,
    stride_sm,
    stride_om,
    wq_slot,  # slot strides of w2_q and w2_s in 16-byte units (as in gate/up)
    ws_slot,
    D: tl.constexpr,
    I: tl.constexpr,
    K: tl.constexpr,
    P_BLOCK: tl.constexpr,
    M_BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows of w2 (outputs) per program
    NB: tl.constexpr,
    NW: tl.constexpr,
    ACT_QUANT: tl.constexpr,  # for a: _AQ_NONE, _AQ_INLINE or _AQ_PRE
    HW_FP8: tl.constexpr,
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent of gate/up: wait before reading a
):
    """Grid (D / BLOCK_N, M*K). Leaders as in gate/up (a pair whose token already has the same
    slot at a smaller k is handled on its own); each writes y rows; the last program of a row tile
    to arrive adds shared_out and the K partials of each token in k order and writes out."""
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    P = M * K
    mm = tl.arange(0, M_BLOCK)
    kk = tl.arange(0, K_BLOCK)
    s2 = tl.load(
        slots_ptr + mm[:, None] * K + kk[None, :],
        mask=(mm[:, None] < M) & (kk[None, :] < K),
        other=-1,
    )

    slot = tl.load(slots_ptr + p)
    m_p = p // K
    q = tl.arange(0, P_BLOCK)
    sq = tl.load(slots_ptr + q, mask=q < P, other=-1)
    before = (sq == slot) & (q < p)
    n_before = tl.sum(before.to(tl.int32), axis=0)
    is_dup = tl.sum((before & (q // K == m_p)).to(tl.int32), axis=0) > 0
    if (slot >= 0) & ((n_before == 0) | is_dup):
        # Leader: every token's first pair with this slot. Duplicate (same slot again in the
        # same token): just this pair. pidx[m] is the workspace row of token m's pair.
        first_k = tl.min(tl.where(s2 == slot, kk[None, :], K_BLOCK), axis=1)
        member = tl.where(is_dup, mm == m_p, first_k < K).to(tl.int32)
        pidx = tl.where(is_dup, p, mm * K + first_k)
        R: tl.constexpr = BLOCK_N // NW
        orows = pid_n * BLOCK_N + tl.arange(0, R)[None, :] * NW + tl.arange(0, NW)[:, None]
        wrow = orows  # [NW, R] rows within the slot
        wq = wq_ptr + slot.to(tl.int64) * wq_slot * 4  # the slot's weights and scales
        ws = ws_ptr + slot.to(tl.int64) * ws_slot * 4
        n_mem = tl.sum(member, axis=0)
        if M_BLOCK == 1:  # one token: the only member is token 0 (its first pair, or this dup)
            pr = tl.sum(pidx, axis=0).to(tl.int64)
            acc, _ = _fp4_rows_dot(
                wq, ws, wrow, a_ptr + pr * I, a_ptr, as_ptr + pr * (I // 128), as_ptr, I,
                R, NW, NB, False, ACT_QUANT, HW_FP8, ASM, PREFETCH, PDL,
            )  # fmt: skip
            tl.store(y_ptr + pr * D + orows, acc)
        elif n_mem == 1:
            pr = tl.sum(member * pidx, axis=0).to(tl.int64)
            acc, _ = _fp4_rows_dot(
                wq, ws, wrow, a_ptr + pr * I, a_ptr, as_ptr + pr * (I // 128), as_ptr, I,
                R, NW, NB, False, ACT_QUANT, HW_FP8, ASM, PREFETCH, PDL,
            )  # fmt: skip
            tl.store(y_ptr + pr * D + orows, acc)
        else:
            rank = tl.cumsum(member, axis=0) - 1
            for c in range(0, n_mem, 2):
                p0 = tl.sum(tl.where((member > 0) & (rank == c), pidx, 0), axis=0).to(tl.int64)
                p1 = tl.sum(tl.where((member > 0) & (rank == c + 1), pidx, 0), axis=0).to(tl.int64)
                acc0, acc1 = _fp4_rows_dot(
                    wq, ws, wrow, a_ptr + p0 * I, a_ptr + p1 * I,
                    as_ptr + p0 * (I // 128), as_ptr + p1 * (I // 128), I, R, NW, NB, True,
                    ACT_QUANT, HW_FP8, ASM, PREFETCH, PDL,
                )  # fmt: skip
                tl.store(y_ptr + p0 * D + orows, acc0)
                if c + 1 < n_mem:
                    tl.store(y_ptr + p1 * D + orows, acc1)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # All P programs of this row tile arrive; the last one combines (k order: deterministic).
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
    if arrived == P - 1:
        tot = tl.load(
            shared_ptr + mm[None, :] * stride_sm + rows[:, None],
            mask=mm[None, :] < M,
            other=0.0,
        ).to(tl.float32)
        for k in tl.static_range(K):
            valid_k = tl.sum(tl.where(kk[None, :] == k, s2, 0), axis=1) >= 0  # [M_BLOCK]
            tot += tl.load(
                y_ptr + (mm[None, :] * K + k).to(tl.int64) * D + rows[:, None],
                mask=valid_k[None, :] & (mm[None, :] < M),
                other=0.0,
                cache_modifier=".cg",
            )
        tl.store(
            out_ptr + mm[None, :] * stride_om + rows[:, None],
            tot.to(out_ptr.dtype.element_ty),
            mask=mm[None, :] < M,
        )
        tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _fp4_experts_down_tok_kernel(
    a_ptr,  # [P, I] activations from the gate/up kernel (_AQ_PRE: their e4m3 grid values)
    as_ptr,  # _AQ_PRE: [P, I/128] fp32 block scales of a
    slots_ptr,  # [M, K] int32
    shared_ptr,  # [M, D] shared-expert output, row stride stride_sm
    wq_ptr,  # [S, D, I/8] int32 view of w2_q, slot stride wq_slot
    ws_ptr,  # [S, D, I/128] int32 view of the w2 E8M0 scales, slot stride ws_slot
    out_ptr,  # [M, D] output, row stride stride_om
    stride_sm,
    stride_om,
    wq_slot,  # slot strides of w2_q and w2_s in 16-byte units (as in gate/up)
    ws_slot,
    D: tl.constexpr,
    I: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows of w2 (outputs) per program
    NB: tl.constexpr,
    NW: tl.constexpr,
    ACT_QUANT: tl.constexpr,  # for a: _AQ_NONE, _AQ_INLINE or _AQ_PRE
    HW_FP8: tl.constexpr,
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent of gate/up: wait before reading a
):
    """Down + combine, one program per (row tile, token): grid (D / BLOCK_N, M). Streams the
    token's K experts one after the other into one fp32 accumulator (k order: deterministic), adds
    shared_out and writes out: no partials, no counters, K times the rows per program. A slot
    shared by several tokens is read once per token (the pair-parallel kernel reads it once)."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    R: tl.constexpr = BLOCK_N // NW
    orows = pid_n * BLOCK_N + tl.arange(0, R)[None, :] * NW + tl.arange(0, NW)[:, None]  # [NW, R]
    acc = tl.zeros([4, NB, NW, R], dtype=tl.float32)
    if PDL:
        gdc_wait()
    for k in tl.static_range(K):
        pair = m * K + k
        slot = tl.load(slots_ptr + pair)
        if slot >= 0:
            s64 = slot.to(tl.int64)
            acc, _ = _fp4_rows_acc(
                acc, acc, wq_ptr + s64 * wq_slot * 4, ws_ptr + s64 * ws_slot * 4, orows,
                a_ptr + pair.to(tl.int64) * I, a_ptr, as_ptr + pair * (I // 128), as_ptr, I, R,
                NW, NB, False, ACT_QUANT, HW_FP8, ASM, PREFETCH, False,
            )  # fmt: skip
    y = tl.sum(tl.sum(acc, axis=0), axis=0)  # [NW, R]
    y += tl.load(shared_ptr + m * stride_sm + orows).to(tl.float32)
    tl.store(out_ptr + m * stride_om + orows, y.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------
# Prefill (grouped) kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile_dot(
    x, wq_ptr, ws_ptr, w_row, c0, r_mask, N_IN, BLOCK_K: tl.constexpr, IEEE_FP32: tl.constexpr
):
    """[BLOCK_M, BLOCK_N] fp32 x [BLOCK_M, BLOCK_K] (input columns c0..) times the weight rows
    w_row (within the slot wq_ptr, ws_ptr point at): their E2M1 pairs are decoded here, scaled
    by their E8M0 groups and interleaved back into input order (low nibble = even input) in x's
    dtype."""
    jb = c0 // 2 + tl.arange(0, BLOCK_K // 2)  # this step's bytes in each row
    wmask = r_mask[:, None] & (jb < N_IN // 2)[None, :]
    wb = tl.load(wq_ptr + w_row[:, None] * (N_IN // 2) + jb[None, :], mask=wmask, other=0)
    sc = _e8m0_times_64(
        tl.load(ws_ptr + w_row[:, None] * (N_IN // 32) + jb[None, :] // 16, mask=wmask, other=0)
    )
    lo, hi = _fp4_pair_to_f32(wb)
    w = tl.reshape(tl.join(lo * sc, hi * sc), [lo.shape[0], BLOCK_K]).to(x.dtype)
    if IEEE_FP32:
        return tl.dot(x, tl.trans(w), input_precision="ieee")
    return tl.dot(x, tl.trans(w))


@triton.jit
def _fp4_grouped_gemm_kernel(
    in_ptr,  # gate/up: x [M, D] (row = pair // K); down: a [P, I] (row = pair); with ACT_QUANT
    # the e4m3 grid values of the rows (act_quant_split), else the rows themselves
    sc_ptr,  # ACT_QUANT: fp32 block scales [rows, N_IN / 128], row stride stride_sc
    tile_slot_ptr,  # [n_tiles] int32 slot of each BLOCK_M tile (-1 = unused tile)
    tile_pair_ptr,  # [n_tiles * BLOCK_M] int32 pair id per tile row (-1 = padding)
    rw_ptr,  # [P] fp32 routing weights (gate/up only)
    wq_ptr,  # gate/up: w13_q [S, 2I, D/2]; down: w2_q [S, D, I/2]; slot stride wq_slot
    ws_ptr,  # matching E8M0 scales [S, rows, in/32]; slot stride ws_slot
    dst_ptr,  # gate/up: a [P, I] (x's dtype); down: y [P, D] fp32
    N_OUT,  # gate/up: I; down: D
    N_IN,  # gate/up: D; down: I
    stride_in,  # row stride of in_ptr
    stride_sc,
    wq_slot,  # slot strides of wq and ws in 16-byte units (rows within a slot contiguous)
    ws_slot,
    limit,
    K: tl.constexpr,
    GATE_UP: tl.constexpr,  # True: w1/w3 + SwiGLU epilogue; False: w2
    ACT_QUANT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # inputs per step: 32, 64 or 128 (a step never spans two act blocks)
):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(tile_slot_ptr + t)
    if slot >= 0:
        rm = tl.arange(0, BLOCK_M)
        pair = tl.load(tile_pair_ptr + t * BLOCK_M + rm)
        p_ok = pair >= 0
        if GATE_UP:
            src = (pair // K).to(tl.int64)
        else:
            src = pair.to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        r_mask = rows < N_OUT
        kk = tl.arange(0, BLOCK_K)
        w_row = rows  # weight rows within the slot
        wq = wq_ptr + slot.to(tl.int64) * wq_slot * 16
        ws = ws_ptr + slot.to(tl.int64) * ws_slot * 16
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, N_IN, BLOCK_K):
            k = c0 + kk
            xmask = p_ok[:, None] & (k < N_IN)[None, :]
            x = tl.load(in_ptr + src[:, None] * stride_in + k[None, :], mask=xmask, other=0.0)
            # gate (or down) rows, then the matching up rows
            d_g = _grouped_tile_dot(x, wq, ws, w_row, c0, r_mask, N_IN, BLOCK_K, IEEE_FP32)
            if GATE_UP:
                d_u = _grouped_tile_dot(
                    x, wq, ws, w_row + N_OUT, c0, r_mask, N_IN, BLOCK_K, IEEE_FP32
                )
            if ACT_QUANT:  # grid values times the block's power-of-two scale: exact
                sx = tl.load(sc_ptr + src * stride_sc + c0 // 128, mask=p_ok, other=0.0)
                d_g = d_g * sx[:, None]
                if GATE_UP:
                    d_u = d_u * sx[:, None]
            acc_g += d_g
            if GATE_UP:
                acc_u += d_u
        omask = p_ok[:, None] & r_mask[None, :]
        dst = dst_ptr + pair[:, None].to(tl.int64) * N_OUT + rows[None, :]
        if GATE_UP:
            g = tl.minimum(acc_g, limit)
            u = tl.minimum(tl.maximum(acc_u, -limit), limit)
            rw = tl.load(rw_ptr + pair, mask=p_ok, other=0.0)
            a = rw[:, None] * (g / (1.0 + tl.exp(-g))) * u
            tl.store(dst, a.to(dst_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(dst, acc_g, mask=omask)


@triton.jit
def _fp4_experts_combine_kernel(
    y_ptr,  # [P, D] fp32 per-pair outputs
    slots_ptr,  # [M, K] int32
    shared_ptr,  # [M, D], row stride stride_sm
    out_ptr,  # [M, D], row stride stride_om
    D,
    stride_sm,
    stride_om,
    K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols < D
    tot = tl.load(shared_ptr + m * stride_sm + cols, mask=c_ok, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        ok = tl.load(slots_ptr + m * K + k) >= 0
        tot += tl.load(
            y_ptr + (m * K + k).to(tl.int64) * D + cols, mask=_and_flag(c_ok, ok), other=0.0
        )
    tl.store(out_ptr + m * stride_om + cols, tot.to(out_ptr.dtype.element_ty), mask=c_ok)


# ------------------------------------------------------------------------------------------------
# Prefill (grouped) kernels, v2: weights as the register operand of the tensor-core dot
# ------------------------------------------------------------------------------------------------
#
# v2 computes each tile transposed ("swap AB"): acc[BLOCK_N, BLOCK_M] = W[BLOCK_N, BLOCK_K] @
# X^T, so the weights decoded in registers are the A operand of wgmma (which may sit in
# registers) and the activation rows, loaded straight from memory, are the B operand (shared
# memory, filled by the pipelined async copies). Triton splits each dot into K=16 pieces and
# keeps several in flight while the next piece is decoded.
#
# Weight words: a step loads the tile's weights as int32 words (8 E2M1 inputs each, one 16-byte
# vector per 4 words) and decodes every word into four registers of two bf16 each, with no data
# moving between threads. That fixes which inputs share a register and so the order in which the
# dot's K dimension visits the inputs: register a of a word holds its inputs (a, a + 4) (the
# cheap pairing: nibbles 16 bits apart), and the dot operand layout gives thread t of a quad the
# columns 2t, 2t + 1, 2t + 8, 2t + 9, ... of each 32-wide slice, exactly the 8 values of one
# word. So in every 32-input scale group (4 words, one per thread of the quad) dot column 8a + b
# holds input 4b + a (a < 4, b < 8): the group's inputs as an [8, 4] matrix, transposed
# (_v2_src_col). The activations are permuted that way once per call (_fp4_v2_rows_kernel, which
# also act-quantises them), and the gate/up launch writes a in that order for the down launch by
# loading its weight rows permuted. Any layout Triton picks gives the same values (the order is
# a property of the tensors, not of the layout); only the speed depends on it: compiled offline
# for sm_90 with triton 3.6, the words reach the dot through ldmatrix and registers alone.
#
# Decode (bf16 on the GPU, _FP4_BF16X2_ASM): an E2M1 nibble s|e1 e0 m placed as the bf16 bits
# s<<15 | (e1 e0 m)<<6 is the bf16 of value * 2^-126 (the e = 0 codes land on bf16 subnormals,
# which the bf16 FMA keeps), so one multiply by 2^(scale - 127 + 126) gives the weight, exactly.
# Four shift/mask steps per word, one bf16x2 multiply per two weights. The scale 2^(e - 1) must
# be a finite bf16: E8M0 bytes 0..128, i.e. group maxima up to 12 (real checkpoints: ~2^-4).
# Elsewhere (fp16 / fp32 activations, the interpreter) the portable decode computes the same
# values in fp32 (exact) and casts them to the activation dtype, as v1 does.
#
# Activations are act-quantised before the GEMMs and handed over as quantise-dequantised values
# in the activation dtype (e4m3 grid value times a power of two: exact in bf16 and fp32; fp16
# keeps them exactly unless a block's values fall below fp16's normal range, amax < ~2^-7), so
# the dots need no per-step rescaling and the accumulators stay in the tensor-core chain.

# E2M1 word -> 4 x bf16x2 (see above). $4: word, $5: its E8M0 scale byte. Output a holds inputs
# (a, a + 4) of the word (low half first); s2 = bf16x2 of 2^(e - 1) = (e + 126) << 7 per half;
# the FMA adds -0, so it is a plain multiply (and keeps -0).
_FP4_BF16X2_ASM_TEXT = """{
.reg .b32 s2, nz, t, u;
mad.lo.u32 s2, $5, 0x00800080, 0x3F003F00;
mov.b32 nz, 0x80008000;
shr.u32 t, $4, 6;
and.b32 t, t, 0x01C001C0;
lop3.b32 t, $4, 0x80008000, t, 0xEA;
fma.rn.bf16x2 $3, t, s2, nz;
shl.b32 u, $4, 4;
shr.u32 t, $4, 2;
and.b32 t, t, 0x01C001C0;
lop3.b32 t, u, 0x80008000, t, 0xEA;
fma.rn.bf16x2 $2, t, s2, nz;
shl.b32 u, $4, 8;
shl.b32 t, $4, 2;
and.b32 t, t, 0x01C001C0;
lop3.b32 t, u, 0x80008000, t, 0xEA;
fma.rn.bf16x2 $1, t, s2, nz;
shl.b32 u, $4, 12;
shl.b32 t, $4, 6;
and.b32 t, t, 0x01C001C0;
lop3.b32 t, u, 0x80008000, t, 0xEA;
fma.rn.bf16x2 $0, t, s2, nz;
}"""
_FP4_BF16X2_ASM = tl.constexpr(_FP4_BF16X2_ASM_TEXT) if HAS_TRITON else _FP4_BF16X2_ASM_TEXT


def _v2_perm(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Torch twin of _v2_src_col: perm [n] (n a multiple of 32) with v2 column c holding input
    perm[c], so that x[:, perm] is x in v2 order."""
    c = torch.arange(n, device=device)
    return (c & -32) | ((c & 7) << 2) | ((c >> 3) & 3)


@triton.jit
def _v2_src_col(col):
    """Input (row element) that dot column col of a v2 operand holds: in each group of 32,
    column 8a + b holds input 4b + a (the block comment above)."""
    return (col & -32) | ((col & 7) << 2) | ((col >> 3) & 3)


@triton.jit
def _bf16_halves(r):
    """int32 words holding two bf16 each -> [.., 2] bf16 (low half first); no data moves."""
    lo = r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    hi = (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _fp4_v2_operand(w, s, DT: tl.constexpr, ASM: tl.constexpr):
    """Weights of one step as a dot operand: w [R, G, 4] int32 words (the 4 words of each scale
    group), s [R, G, 1] int32 the group's E8M0 byte -> [R, 32 * G] in DT, columns in v2 order.
    ASM: the bf16 PTX decode; else portable fp32 math (exact), cast. Only elementwise ops, joins
    and a permutation, which Triton carries the dot operand's register layout back through to
    the loads (a reshape of the scales stopped it: the operand then went through shared memory)."""
    R: tl.constexpr = w.shape[0]
    G: tl.constexpr = w.shape[1]
    s = tl.broadcast_to(s, w.shape)
    if ASM:
        r0, r1, r2, r3 = tl.inline_asm_elementwise(
            _FP4_BF16X2_ASM,
            "=r,=r,=r,=r,r,r",
            [w, s],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
        p0 = _bf16_halves(r0)  # inputs (0, 4) of each word: [R, G, 4, 2]
        p1 = _bf16_halves(r1)  # (1, 5)
        p2 = _bf16_halves(r2)  # (2, 6)
        p3 = _bf16_halves(r3)  # (3, 7)
    else:
        f0, f1, f2, f3, f4, f5, f6, f7 = _fp4_word_f32(w, False)
        sc = _e8m0_times_64(s)
        p0 = tl.join((f0 * sc).to(DT), (f4 * sc).to(DT))
        p1 = tl.join((f1 * sc).to(DT), (f5 * sc).to(DT))
        p2 = tl.join((f2 * sc).to(DT), (f6 * sc).to(DT))
        p3 = tl.join((f3 * sc).to(DT), (f7 * sc).to(DT))
    # word t, half h, register a = a0 + 2 * a1 holds input 4b + a of the group, b = 2t + h:
    # [R, G, t, h, a0, a1] -> column 8a + b, i.e. dims (a1, a0, t, h)
    v = tl.join(tl.join(p0, p1), tl.join(p2, p3))
    return tl.reshape(tl.permute(v, (0, 1, 5, 4, 2, 3)), [R, 32 * G])


@triton.jit
def _fp4_v2_step(wq_ptr, s_ptr, w_row, c0, N_IN: tl.constexpr, BLOCK_K: tl.constexpr,
                 DT: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """One step's weight operand [BLOCK_N, BLOCK_K] of rows w_row (within the slot wq_ptr, s_ptr
    point at), inputs c0.. (v2 order). The scale bytes are read as a [rows, groups] tile: read
    as int32 words with the bytes shifted out, they cost the whole operand a trip through shared
    memory (triton 3.6 could not carry the dot layout back through that); the byte tile is
    copied asynchronously all the same."""
    R: tl.constexpr = w_row.shape[0]
    G: tl.constexpr = BLOCK_K // 32  # scale groups per step, 4 words each
    sb = tl.load(s_ptr + w_row[:, None] * (N_IN // 32) + c0 // 32 + tl.arange(0, G)[None, :])
    w = tl.load(wq_ptr + w_row[:, None] * (N_IN // 8) + c0 // 8 + tl.arange(0, BLOCK_K // 8))
    return _fp4_v2_operand(tl.reshape(w, [R, G, 4]), sb.to(tl.int32)[:, :, None], DT, ASM)


@triton.jit
def _fp4_grouped_v2_kernel(
    in_ptr,  # gate/up: x [M, D]; down: a [P, I]: contiguous activations in v2 column order,
    # act-quantised (quantise-dequantised) when act_quant
    n_used_ptr,  # [1] int32 number of tiles in use (they come first in tile_slot)
    tile_slot_ptr,  # [n_tiles] int32 slot of each BLOCK_M tile (-1 = unused tile)
    tile_pair_ptr,  # [n_tiles * BLOCK_M] int32 pair id per tile row (-1 = padding)
    rw_ptr,  # [P] fp32 routing weights (gate/up only)
    wq_ptr,  # int32 view of w13_q [S, 2I, D/8] (gate/up) or w2_q [S, D, I/8] (down)
    ws_ptr,  # the matching E8M0 scales [S, rows, N_IN/32] uint8
    dst_ptr,  # gate/up: a [P, I] (x's dtype, v2 column order); down: y [P, D] fp32
    wq_slot,  # slot strides of wq and ws in 16-byte units (rows within a slot contiguous)
    ws_slot,
    limit,
    N_OUT: tl.constexpr,  # gate/up: I; down: D
    N_IN: tl.constexpr,  # gate/up: D; down: I
    K: tl.constexpr,
    GATE_UP: tl.constexpr,  # True: w1/w3 + SwiGLU epilogue; False: w2
    A_QUANT: tl.constexpr,  # gate/up: act-quantise a in the epilogue (BLOCK_N % 128 == 0)
    ASM: tl.constexpr,  # bf16 PTX weight decode (GPU)
    HW_FP8: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 activations, else "tf32"
    BLOCK_M: tl.constexpr,  # pairs per tile (the dot's N)
    BLOCK_N: tl.constexpr,  # output rows per program (the dot's M; gate/up: of w1 and of w3)
    BLOCK_K: tl.constexpr,  # inputs per step, a multiple of 32 dividing N_IN
):
    """Persistent: the programs share out the work items (tile, row tile) of the tiles in use,
    read from the device (the launch grid is fixed, so no host sync, and a pool of thousands of
    slots launches no empty programs). Item w = tile * n_row_tiles + row tile, program p takes
    p, p + programs, ...: the programs running together work on the row tiles of the same few
    tiles, so they share those tiles' activation rows in L2, and consecutive tiles of one slot
    its weights."""
    NN: tl.constexpr = (N_OUT + BLOCK_N - 1) // BLOCK_N
    DT: tl.constexpr = in_ptr.dtype.element_ty
    n_items = tl.load(n_used_ptr) * NN
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        t = item // NN
        pid_n = item % NN
        slot = tl.load(tile_slot_ptr + t)
        pair = tl.load(tile_pair_ptr + t * BLOCK_M + tl.arange(0, BLOCK_M))
        p_ok = pair >= 0
        # padding rows read row 0 (their results are never stored): no masks in the loop
        if GATE_UP:
            src = tl.where(p_ok, pair // K, 0).to(tl.int64)
        else:
            src = tl.where(p_ok, pair, 0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns this program writes
        c_ok = cols < N_OUT
        # weight rows within the slot, int64 although they fit 32 bits: with int32 rows ptxas
        # spilled more in the gate/up launch (sm_90, triton 3.9: 168 bytes of stack against 112)
        if GATE_UP:
            # a is written in v2 order: column c of a is output feature _v2_src_col(c), so load
            # those weight rows and every store below is contiguous
            w_row = _v2_src_col(tl.minimum(cols, N_OUT - 1)).to(tl.int64)
        else:
            w_row = tl.minimum(cols, N_OUT - 1).to(tl.int64)
        wq = wq_ptr + slot.to(tl.int64) * wq_slot * 4  # the slot's weights and scales
        ws = ws_ptr + slot.to(tl.int64) * ws_slot * 16
        xp = in_ptr + src[:, None] * N_IN + tl.arange(0, BLOCK_K)[None, :]  # contiguous rows
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for c0 in range(0, N_IN, BLOCK_K):
            xt = tl.trans(tl.load(xp + c0))  # [BLOCK_K, BLOCK_M]
            wt = _fp4_v2_step(wq, ws, w_row, c0, N_IN, BLOCK_K, DT, ASM)
            acc = tl.dot(wt, xt, acc, input_precision=PREC)
            if GATE_UP:  # the matching w3 rows, I rows further on
                wt = _fp4_v2_step(wq, ws, w_row + N_OUT, c0, N_IN, BLOCK_K, DT, ASM)
                acc_u = tl.dot(wt, xt, acc_u, input_precision=PREC)
        omask = c_ok[:, None] & p_ok[None, :]
        dst = dst_ptr + pair[None, :].to(tl.int64) * N_OUT + cols[:, None]
        if GATE_UP:
            g = tl.minimum(acc, limit)
            u = tl.minimum(tl.maximum(acc_u, -limit), limit)
            rw = tl.load(rw_ptr + pair, mask=p_ok, other=0.0)
            a = (rw[None, :] * (g / (1.0 + tl.exp(-g))) * u).to(DT)
            if A_QUANT:  # act-quantise a (as rounded to its dtype) per 128 features, as the
                # reference does before w2; each 128-column block of a is 128 features
                ab = tl.reshape(a.to(tl.float32), [BLOCK_N // 128, 128, BLOCK_M])
                sc, sc_inv = _act_quant_scale(tl.max(tl.abs(ab), axis=1))
                ab = _e4m3_q(ab * sc_inv[:, None, :], HW_FP8) * sc[:, None, :]
                a = tl.reshape(ab, [BLOCK_N, BLOCK_M]).to(DT)
            tl.store(dst, a, mask=omask)
        else:
            tl.store(dst, acc, mask=omask)


@triton.jit
def _fp4_v2_rows_kernel(
    x_ptr,  # [R, N] rows, row stride stride_x
    out_ptr,  # [R, N] out (may be x_ptr when not PERMUTE), row stride stride_o
    N,
    stride_x,
    stride_o,
    PERMUTE: tl.constexpr,  # write the columns in v2 order
    ACT_QUANT: tl.constexpr,  # quantise-dequantise per 128-element block (act_quant_ref)
    HW_FP8: tl.constexpr,
    BLOCKS: tl.constexpr,  # 128-element blocks per program
):
    """v2 activations: grid (R, cdiv(N, 128 * BLOCKS)). The v2 permutation stays within groups of
    32, so each 128-block holds the same values either way (same amax and scale)."""
    r = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    cols = blk[:, None] * 128 + tl.arange(0, 128)[None, :]  # [BLOCKS, 128]
    ok = cols < N
    if PERMUTE:
        src = _v2_src_col(cols)
    else:
        src = cols
    v = tl.load(x_ptr + r * stride_x + src, mask=ok, other=0.0).to(tl.float32)
    if ACT_QUANT:
        sc, sc_inv = _act_quant_scale(tl.max(tl.abs(v), axis=1))
        v = _e4m3_q(v * sc_inv[:, None], HW_FP8) * sc[:, None]
    tl.store(out_ptr + r * stride_o + cols, v.to(out_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------------
# Workspace and launchers
# ------------------------------------------------------------------------------------------------

_MIN_BLOCK_N_DOWN = 4  # counters are sized for the smallest down row tile
# Act-quant modes of the decode kernels' inputs (constexpr ACT_QUANT, see _fp4_x_step).
_AQ_NONE, _AQ_INLINE, _AQ_PRE = 0, 1, 2
_ROWQ_BLOCKS = 4  # act blocks per program of _act_quant_rows
_V2_EXPERTS_HINT = 256  # routed experts per layer (V4-Flash): v2's default tile height


@dataclass
class Fp4ExpertsWorkspace:
    """Scratch of the decode launches, allocated once at startup for the largest M*K and reused
    by every layer (the launches run in stream order; counters are left at zero)."""

    a: torch.Tensor  # [P_max, I] activation dtype
    y: torch.Tensor  # [P_max, D] fp32
    counters: torch.Tensor  # [ceil(D / 4)] int32 zeros (one per down row tile)
    a_scale: torch.Tensor  # [P_max, I / 128] fp32 block scales of a
    a_counters: torch.Tensor  # [P_max, I / 128] int32 zeros (one per act block of a)


def fp4_experts_workspace(
    max_pairs: int, d: int, i: int, act_dtype: torch.dtype, device: torch.device | str
) -> Fp4ExpertsWorkspace:
    """Workspace for up to max_pairs = M*K (token, expert) pairs."""
    return Fp4ExpertsWorkspace(
        torch.empty(max_pairs, i, dtype=act_dtype, device=device),
        torch.empty(max_pairs, d, dtype=torch.float32, device=device),
        torch.zeros(triton.cdiv(d, _MIN_BLOCK_N_DOWN), dtype=torch.int32, device=device),
        torch.empty(max_pairs, triton.cdiv(i, 128), dtype=torch.float32, device=device),
        torch.zeros(max_pairs, triton.cdiv(i, 128), dtype=torch.int32, device=device),
    )


def _act_quant_rows(
    x: torch.Tensor, q: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant_split(x) into q (x's shape, any float dtype: the grid values are exact in it)
    and s [rows, ceil(N / 128)] fp32, in one launch."""
    rows, n = x.shape
    _act_quant_rows_kernel[(rows, triton.cdiv(n, 128 * _ROWQ_BLOCKS))](
        x, q, s, n, x.stride(0), q.stride(0), s.stride(0),
        BLOCKS=_ROWQ_BLOCKS, HW_FP8=not interpreting(), num_warps=4,
    )  # fmt: skip
    return q, s


def _check_common(
    name: str,
    x: torch.Tensor,
    slots: torch.Tensor,
    route_w: torch.Tensor,
    shared_out: torch.Tensor,
    w13_q: torch.Tensor,
    w13_s: torch.Tensor,
    w2_q: torch.Tensor,
    w2_s: torch.Tensor,
    out: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be [M, D], got {list(x.shape)}")
    m, d = x.shape
    check_tensor(f"{name}: x", x, dtypes=_ACT_DTYPES, contiguous=False)
    if x.stride(1) != 1:
        raise ValueError(f"{name}: x must have unit column stride")
    dev = x.device
    if w13_q.dim() != 3:
        raise ValueError(f"{name}: w13_q must be [S, 2I, D/2], got {list(w13_q.shape)}")
    s, two_i, _ = w13_q.shape
    i = two_i // 2
    shapes = pool_shapes(s, d, i)
    for nm, t in (("w13_q", w13_q), ("w13_s", w13_s), ("w2_q", w2_q), ("w2_s", w2_s)):
        check_tensor(
            f"{name}: {nm}", t, shape=shapes[nm], dtypes=(torch.uint8,), contiguous=False,
            device=dev,
        )  # fmt: skip
        _check_pool_strides(f"{name}: {nm}", t)
    if i * d >= 2**31:  # w13_q's bytes in a slot: the kernels index within a slot in int32
        raise ValueError(f"{name}: a slot's w13_q ({i * d} bytes) must be under 2 GiB")
    check_tensor(f"{name}: slots", slots, shape=(m, None), dtypes=(torch.int32,), device=dev)
    k = slots.shape[1]
    check_tensor(f"{name}: route_w", route_w, shape=(m, k), dtypes=(torch.float32,), device=dev)
    for nm, t in (("shared_out", shared_out), ("out", out)):
        check_tensor(f"{name}: {nm}", t, shape=(m, d), dtypes=_ACT_DTYPES, contiguous=False)
        if t.stride(1) != 1:
            raise ValueError(f"{name}: {nm} must have unit column stride")
    return m, k, d, i, s


def _check_pool_strides(name: str, t: torch.Tensor) -> None:
    """A pool tensor [S, rows, width]: contiguous rows (any slot stride, e.g. a packed_pool_views
    view), slot stride and start 16-byte aligned, so that every row's 16-byte vectors (the
    decode kernels' loads) are aligned, and the kernels may read it as int32 words."""
    if (t.shape[2] > 1 and t.stride(2) != 1) or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        raise ValueError(
            f"{name}: rows must be contiguous (stride(1) == {t.shape[2]}, stride(2) == 1), got "
            f"strides {list(t.stride())}; the slot stride may be anything (a multiple of 16)"
        )
    if t.shape[0] > 1 and t.stride(0) % 16:
        raise ValueError(f"{name}: slot stride {t.stride(0)} bytes is not a multiple of 16")
    if t.data_ptr() % 16:
        raise ValueError(f"{name}: must start at a 16-byte aligned address")


def _slot16(t: torch.Tensor) -> int:
    """Slot stride of a pool tensor in 16-byte units (the kernels' argument; see
    _check_pool_strides). A one-slot pool's stride is never used."""
    return t.stride(0) // 16 if t.shape[0] > 1 else 0


def _steps(n_in: int, want: int) -> int:
    """Act blocks per loop step: the largest power of two <= want dividing n_in / 128."""
    nb = want
    while (n_in // 128) % nb:
        nb //= 2
    return nb


def fp4_experts(
    x: torch.Tensor,
    slots: torch.Tensor,
    route_w: torch.Tensor,
    shared_out: torch.Tensor,
    w13_q: torch.Tensor,
    w13_s: torch.Tensor,
    w2_q: torch.Tensor,
    w2_s: torch.Tensor,
    swiglu_limit: float,
    *,
    out: torch.Tensor | None = None,
    act_quant: bool = False,
    workspace: Fp4ExpertsWorkspace | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Decode routed experts (M <= 16): out [M, D] = shared_out + sum_k expert(slots[m, k]).

    x [M, D] bf16/fp16/fp32; slots [M, K] int32 (-1 skips a pair); route_w [M, K] fp32;
    shared_out and out [M, D]; pool tensors as in pool_shapes(), rows contiguous, any slot
    stride (a multiple of 16 bytes: separate tensors or packed_pool_views). Two launches, no
    host sync. D or I not a multiple of 128 (small test models): fp4_experts_grouped does the
    work.
    `out` may alias `shared_out`. workspace: from fp4_experts_workspace(), or None to allocate.
    config: tuning overrides: block_n (gate/up outputs per program; it streams 2*block_n rows),
    nb (128-input blocks per step), num_warps; block_n_down, nb_down, num_warps_down for the
    down launch; down ("pair": one program per (row tile, pair), partials combined by the last
    to arrive; "token": one program per (row tile, token) over its K experts); asm (PTX word
    decode, default on); prefetch / prefetch_down (load the next step's weights before computing
    this one); maxnreg / maxnreg_down (register caps); pdl (programmatic dependent launch of
    the down launch on sm_90+, default for M = 1); a_quant with act_quant ("gate_up", default:
    a is quantised once, by the last gate/up program to write each act block; "inline": in
    every down program; same results).
    """
    require_triton("fp4_experts")
    if out is None:
        out = torch.empty_like(shared_out, dtype=x.dtype)
    m, k, d, i, _ = _check_common(
        "fp4_experts", x, slots, route_w, shared_out, w13_q, w13_s, w2_q, w2_s, out
    )
    if m > DECODE_MAX_M:
        raise ValueError(
            f"fp4_experts: decode path takes M <= {DECODE_MAX_M}, got {m}; "
            "use fp4_experts_grouped for prefill"
        )
    if m == 0:
        return out
    if d % 128 or i % 128:  # small test models: the grouped kernels take any multiple of 32
        return fp4_experts_grouped(
            x, slots, route_w, shared_out, w13_q, w13_s, w2_q, w2_s, swiglu_limit,
            out=out, act_quant=act_quant,
        )  # fmt: skip
    pairs = m * k
    if workspace is None:
        workspace = fp4_experts_workspace(pairs, d, i, x.dtype, x.device)
    ws = workspace
    if ws.a.shape[0] < pairs or ws.a.shape[1] != i or ws.y.shape[1] != d:
        raise ValueError(
            f"fp4_experts: workspace a {list(ws.a.shape)} / y {list(ws.y.shape)} does not fit "
            f"M*K={pairs}, I={i}, D={d}"
        )
    if ws.a.dtype != x.dtype:
        raise TypeError(f"fp4_experts: workspace.a is {ws.a.dtype}, x is {x.dtype}")
    if ws.a_scale.shape[0] < pairs:
        raise ValueError(f"fp4_experts: workspace a_scale rows do not fit M*K={pairs}")
    cfg = dict(config or {})
    m_block = triton.next_power_of_2(m)
    p_block = triton.next_power_of_2(pairs)
    k_block = triton.next_power_of_2(k)
    # Defaults from the H100 sweeps (tools/PERF_NOTES.md, run 2): the token-parallel down launch
    # wins for 2..4 tokens, the pair-parallel one for 1 token and for larger M (many shared slots,
    # which it reads once).
    down_tok = cfg.get("down", "token" if 1 < m_block <= 4 else "pair") == "token"
    # H200 act-quant sweep (PERF_NOTES, runs 18-20): with x quantised in every gate/up program,
    # 32 outputs per program (16 rows per warp) amortise it best: M=1 38.0 us against 40.9 at 8.
    bn = min(cfg.get("block_n", 32 if act_quant else 8), i)
    bn2 = min(cfg.get("block_n_down", 16), d)
    if i % bn or d % bn2 or bn2 < _MIN_BLOCK_N_DOWN:
        raise ValueError(f"fp4_experts: block_n {bn} / block_n_down {bn2} must divide I / D")
    # Act-quant placement (same bits either way). a: once per act block, by the gate/up program
    # that completes it (down programs read grid values and scales), 2.5 us faster at M=1 than
    # in every down program. x: in every gate/up program, which the 32-output tiles amortise; a
    # separate x quantisation launch before gate/up cost more on the critical path than the
    # redundant work it saved (H200, M=1..4: PERF_NOTES runs 18-21).
    a_pre = act_quant and cfg.get("a_quant", "gate_up") == "gate_up" and 128 % bn == 0
    x_mode = _AQ_INLINE if act_quant else _AQ_NONE
    a_mode = _AQ_PRE if a_pre else x_mode
    nb = _steps(d, cfg.get("nb", 8))
    nb2 = _steps(i, cfg.get("nb_down", 8))
    if ws.counters.numel() < d // bn2:
        raise ValueError("fp4_experts: workspace.counters too small")
    hw = not interpreting()
    asm = hw and cfg.get("asm", True)
    nw = cfg.get("num_warps", 4)
    nw2 = cfg.get("num_warps_down", 4)
    if bn % nw or bn2 % nw2:
        raise ValueError("fp4_experts: block_n must be a multiple of num_warps (same for down)")
    launch = cfg.get("_launch", "both")  # benchmarks time the two launches apart
    # Programmatic dependent launch: the down launch starts while gate/up drains, streams its first
    # weight tile and waits (griddepcontrol) only before reading a. Off when timing apart.
    # H100: 2 us faster at M = 1 (pair down), slower at M = 2 (token down), even at 3..4.
    pdl = launch == "both" and cfg.get("pdl", m_block == 1) and pdl_supported(x.device)
    pdl_kw = {"launch_pdl": True} if pdl else {}
    if launch in ("both", "gate_up"):
        _fp4_experts_gate_up_kernel[(i // bn, pairs)](
            x, slots, route_w, w13_q.view(torch.int32), w13_s.view(torch.int32), ws.a,
            ws.a_scale, ws.a_counters, m, x.stride(0), _slot16(w13_q), _slot16(w13_s),
            float(swiglu_limit),
            D=d, I=i, K=k, P_BLOCK=p_block, M_BLOCK=m_block, K_BLOCK=k_block, BLOCK_N=bn, NB=nb,
            NW=nw, ACT_QUANT=x_mode, A_QUANT=a_pre, HW_FP8=hw, ASM=asm,
            PREFETCH=cfg.get("prefetch", False), PDL=pdl, num_warps=nw, num_stages=1,
            **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}),
        )  # fmt: skip
    if launch in ("both", "down") and down_tok:
        _fp4_experts_down_tok_kernel[(d // bn2, m)](
            ws.a, ws.a_scale, slots, shared_out, w2_q.view(torch.int32), w2_s.view(torch.int32),
            out, shared_out.stride(0), out.stride(0), _slot16(w2_q), _slot16(w2_s),
            D=d, I=i, K=k, BLOCK_N=bn2, NB=nb2, NW=nw2, ACT_QUANT=a_mode, HW_FP8=hw, ASM=asm,
            PREFETCH=cfg.get("prefetch_down", False), PDL=pdl, num_warps=nw2, num_stages=1,
            **pdl_kw,
            **({"maxnreg": cfg["maxnreg_down"]} if "maxnreg_down" in cfg else {}),
        )  # fmt: skip
    elif launch in ("both", "down"):
        _fp4_experts_down_kernel[(d // bn2, pairs)](
            ws.a, ws.a_scale, slots, shared_out, w2_q.view(torch.int32), w2_s.view(torch.int32),
            ws.y, ws.counters, out, m, shared_out.stride(0), out.stride(0), _slot16(w2_q),
            _slot16(w2_s),
            D=d, I=i, K=k, P_BLOCK=p_block, M_BLOCK=m_block, K_BLOCK=k_block, BLOCK_N=bn2, NB=nb2,
            NW=nw2, ACT_QUANT=a_mode, HW_FP8=hw, ASM=asm,
            PREFETCH=cfg.get("prefetch_down", False), PDL=pdl, num_warps=nw2, num_stages=1,
            **pdl_kw,
            **({"maxnreg": cfg["maxnreg_down"]} if "maxnreg_down" in cfg else {}),
        )  # fmt: skip
    return out


def _group_pairs(
    slots: torch.Tensor, n_slots: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, expert) pairs by slot into BLOCK_M tiles of one slot each, on the device and
    without host syncs (fixed upper-bound sizes). Returns tile_slot [n_tiles] (-1 = unused) and
    tile_pair [n_tiles * BLOCK_M] (pair id m*K + k, -1 = padding), both int32."""
    dev = slots.device
    flat = slots.reshape(-1).long()
    n_pairs = flat.numel()
    valid = flat >= 0
    key = torch.where(valid, flat, torch.full_like(flat, n_slots))
    order = torch.argsort(key, stable=True)
    skey = key[order]
    counts = torch.zeros(n_slots + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:n_slots]
    tiles = (counts + block_m - 1) // block_m
    tile_start = torch.cumsum(tiles, 0) - tiles
    seg_start = torch.cumsum(counts, 0) - counts
    n_tiles = triton.cdiv(n_pairs, block_m) + min(n_slots, n_pairs)
    sv = valid[order]
    s_c = skey.clamp(max=n_slots - 1)
    r = torch.arange(n_pairs, device=dev) - seg_start[s_c]
    tile = tile_start[s_c] + r // block_m
    dump = n_tiles * block_m  # invalid pairs are scattered to one extra, ignored entry
    pos = torch.where(sv, tile * block_m + r % block_m, torch.full_like(tile, dump))
    tile_pair = torch.full((dump + 1,), -1, dtype=torch.int32, device=dev)
    tile_pair.scatter_(0, pos, order.to(torch.int32))
    tile_slot = torch.full((n_tiles + 1,), -1, dtype=torch.int32, device=dev)
    tile_slot.scatter_(
        0, torch.where(sv, tile, torch.full_like(tile, n_tiles)), s_c.to(torch.int32)
    )
    return tile_slot[:n_tiles], tile_pair[:dump]


def _quant_rows(x: torch.Tensor, act_quant: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel inputs of the grouped GEMM: (e4m3 grid values in x's dtype, fp32 block scales)
    with act_quant, else (x, a placeholder the kernel never reads)."""
    if not act_quant:
        return x, x.new_empty(1, 1, dtype=torch.float32)
    q = torch.empty_like(x)
    s = torch.empty(x.shape[0], triton.cdiv(x.shape[1], 128), dtype=torch.float32, device=x.device)
    return _act_quant_rows(x, q, s)


def fp4_experts_grouped(
    x: torch.Tensor,
    slots: torch.Tensor,
    route_w: torch.Tensor,
    shared_out: torch.Tensor,
    w13_q: torch.Tensor,
    w13_s: torch.Tensor,
    w2_q: torch.Tensor,
    w2_s: torch.Tensor,
    swiglu_limit: float,
    *,
    out: torch.Tensor | None = None,
    act_quant: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """Prefill routed experts for any M (same definition as fp4_experts_ref): pairs grouped by
    slot on the device, tl.dot tiles. Allocates its scratch (a [P, I], y [P, D] fp32, and for
    v2 the permuted activations [M, D]) per call.

    config: variant ("v2": the weights are the register operand of the dot, decoded word by
    word, see the v2 block comment; default for bf16 / fp16. "v1": the weights are decoded
    into the dot's second operand; default for fp32, whose IEEE dots have no tensor-core path
    anyway), block_m (pairs per tile), block_n (outputs per program), block_k (inputs per
    step), num_warps, num_stages. v2 only: block_n_down, block_k_down, num_warps_down,
    num_stages_down (the down launch; default: the gate/up values, block_n 128), asm (the
    bf16 PTX decode, default on; off: the portable decode), programs_per_sm (persistent
    programs per SM, default 4) or programs (their number)."""
    require_triton("fp4_experts_grouped")
    if out is None:
        out = torch.empty_like(shared_out, dtype=x.dtype)
    m, k, d, i, s = _check_common(
        "fp4_experts_grouped", x, slots, route_w, shared_out, w13_q, w13_s, w2_q, w2_s, out
    )
    if m == 0:
        return out
    cfg = dict(config or {})
    variant = cfg.pop("variant", "v1" if x.dtype == torch.float32 else "v2")
    args = (x, slots, route_w, shared_out, w13_q, w13_s, w2_q, w2_s, float(swiglu_limit), out)
    if variant == "v2":
        _grouped_v2(*args, act_quant, cfg, m, k, d, i, s)
    elif variant == "v1":
        _grouped_v1(*args, act_quant, cfg, m, k, d, i, s)
    else:
        raise ValueError(f"fp4_experts_grouped: variant must be 'v1' or 'v2', got {variant!r}")
    return out


def _grouped_v1(
    x, slots, route_w, shared_out, w13_q, w13_s, w2_q, w2_s, limit, out, act_quant, config,
    m, k, d, i, s,
) -> None:  # fmt: skip
    """The v1 launches (the weights decoded into the dot's second operand)."""
    # Defaults: tiles that compile for sm_90 without register spills (fp32's FMA dots are
    # larger, so it takes smaller tiles); the benchmark sweeps the alternatives.
    # H100 bf16 (tools/PERF_NOTES.md run 9), 256 experts: M=512 (~12 pairs per expert) is
    # fastest with 16-row tiles, M=2048 (~48) with 64-row tiles and 3 stages.
    if x.dtype == torch.float32:
        cfg = {"block_m": 16, "block_n": 64, "block_k": 32, "num_warps": 4}
    elif m < 1024:
        cfg = {"block_m": 16, "block_n": 64, "block_k": 64, "num_warps": 4}
    else:
        cfg = {"block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 8, "num_stages": 3}
    cfg.update(config)
    bm, bn, bk, warps = cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["num_warps"]
    if bk not in (32, 64, 128):
        raise ValueError(f"fp4_experts_grouped: block_k must be 32, 64 or 128, got {bk}")
    stages = cfg.get("num_stages", 2)
    tile_slot, tile_pair = _group_pairs(slots, s, bm)
    n_tiles = tile_slot.numel()
    pairs = m * k
    a = torch.empty(pairs, i, dtype=x.dtype, device=x.device)
    y = torch.empty(pairs, d, dtype=torch.float32, device=x.device)
    rw = route_w.reshape(-1)
    ieee = x.dtype == torch.float32
    kw = dict(K=k, ACT_QUANT=act_quant, IEEE_FP32=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
              num_warps=warps, num_stages=stages)  # fmt: skip
    # Activations are act-quantised once per row here (not once per output tile in the kernel):
    # e4m3 grid values in the activation dtype, exact, and their fp32 block scales.
    xq, xs = _quant_rows(x, act_quant)
    _fp4_grouped_gemm_kernel[(n_tiles, triton.cdiv(i, bn))](
        xq, xs, tile_slot, tile_pair, rw, w13_q, w13_s, a, i, d, xq.stride(0), xs.stride(0),
        _slot16(w13_q), _slot16(w13_s), limit, GATE_UP=True, **kw,
    )  # fmt: skip
    aq, as_ = _quant_rows(a, act_quant)
    _fp4_grouped_gemm_kernel[(n_tiles, triton.cdiv(d, bn))](
        aq, as_, tile_slot, tile_pair, rw, w2_q, w2_s, y, d, i, aq.stride(0), as_.stride(0),
        _slot16(w2_q), _slot16(w2_s), 0.0, GATE_UP=False, **kw,
    )  # fmt: skip
    bd = 1024
    _fp4_experts_combine_kernel[(m, triton.cdiv(d, bd))](
        y, slots, shared_out, out, d, shared_out.stride(0), out.stride(0), K=k, BLOCK_D=bd
    )


def _pow2_divisor(n: int, want: int) -> int:
    """The largest power of two <= want that divides n (n a multiple of 32: at least 32)."""
    b = triton.next_power_of_2(max(want, 32))
    while b > 32 and n % b:
        b //= 2
    return b


def _v2_rows(src: torch.Tensor, dst: torch.Tensor, permute: bool, act_quant: bool) -> None:
    """dst = src in v2 column order (permute) and/or act-quantised (quantise-dequantise per
    128-block, exact as act_quant_ref), one launch; dst may be src when not permuting."""
    rows, n = src.shape
    _fp4_v2_rows_kernel[(rows, triton.cdiv(n, 128 * _ROWQ_BLOCKS))](
        src, dst, n, src.stride(0), dst.stride(0), PERMUTE=permute, ACT_QUANT=act_quant,
        HW_FP8=not interpreting(), BLOCKS=_ROWQ_BLOCKS, num_warps=4,
    )  # fmt: skip


def _sm_count(dev: torch.device) -> int:
    """Streaming multiprocessors of the device (the interpreter: a few programs, so that each
    takes several work items)."""
    if dev.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(dev).multi_processor_count


def _v2_block_m(pairs: int, n_slots: int) -> int:
    """Default pairs per tile: about the average pairs per slot in use, so most slots fill one
    tile (each tile decodes its slot's weights once; padding rows cost tensor-core time only).
    The slots in use are not known without a host sync: one call serves one layer, whose pairs
    reach at most its routed experts (256 on V4-Flash), however large the pool."""
    per_slot = pairs / max(min(n_slots, _V2_EXPERTS_HINT), 1)
    for bm in (16, 32, 64):
        if per_slot <= 0.75 * bm:
            return bm
    return 128


def _grouped_v2(
    x, slots, route_w, shared_out, w13_q, w13_s, w2_q, w2_s, limit, out, act_quant, cfg,
    m, k, d, i, s,
) -> None:  # fmt: skip
    """The v2 launches: activations permuted (and act-quantised) once, gate/up (writes a in v2
    order, act-quantised when its row tiles cover whole 128-blocks), down, combine."""
    dev, dt = x.device, x.dtype
    pairs = m * k
    bm = max(16, triton.next_power_of_2(cfg.get("block_m", _v2_block_m(pairs, s))))
    # dot operands need >= 16 rows; tiles wider than the matrix only waste work
    bn = max(16, min(cfg.get("block_n", 128), triton.next_power_of_2(i)))
    bn2 = max(16, min(cfg.get("block_n_down", 128), triton.next_power_of_2(d)))
    bk = _pow2_divisor(d, cfg.get("block_k", 128))
    bk2 = _pow2_divisor(i, cfg.get("block_k_down", bk))
    warps = cfg.get("num_warps", 8)
    stages = cfg.get("num_stages", 3)
    warps2 = cfg.get("num_warps_down", warps)
    stages2 = cfg.get("num_stages_down", stages)
    hw = not interpreting()
    asm = hw and dt == torch.bfloat16 and cfg.get("asm", True)
    prec = "ieee" if dt == torch.float32 else "tf32"  # (tf32 only names the default for 16-bit)

    tile_slot, tile_pair = _group_pairs(slots, s, bm)
    n_used = (tile_slot >= 0).sum(dtype=torch.int32).reshape(1)  # the used tiles come first
    n_tiles = tile_slot.numel()  # an upper bound: the grid never exceeds its work items
    # Persistent programs: a few per SM, so configs that fit two or more CTAs on an SM fill it
    # (launching more than fit costs nothing: they run in turn on the same work list).
    programs = cfg.get("programs", cfg.get("programs_per_sm", 4) * _sm_count(dev))
    xp = torch.empty(m, d, dtype=dt, device=dev)
    _v2_rows(x, xp, permute=True, act_quant=act_quant)
    a_quant = act_quant and bn % 128 == 0 and i % bn == 0
    # rows of skipped pairs are never written; zeroed when a pass of its own reads every row
    a = (torch.zeros if act_quant and not a_quant else torch.empty)(pairs, i, dtype=dt, device=dev)
    _fp4_grouped_v2_kernel[(min(programs, n_tiles * triton.cdiv(i, bn)),)](
        xp, n_used, tile_slot, tile_pair, route_w.reshape(-1), w13_q.view(torch.int32), w13_s, a,
        _slot16(w13_q), _slot16(w13_s), limit,
        N_OUT=i, N_IN=d, K=k, GATE_UP=True, A_QUANT=a_quant, ASM=asm, HW_FP8=hw, PREC=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if act_quant and not a_quant:  # row tiles split the 128-blocks: a pass of its own
        _v2_rows(a, a, permute=False, act_quant=True)
    y = torch.empty(pairs, d, dtype=torch.float32, device=dev)
    _fp4_grouped_v2_kernel[(min(programs, n_tiles * triton.cdiv(d, bn2)),)](
        a, n_used, tile_slot, tile_pair, route_w.reshape(-1), w2_q.view(torch.int32), w2_s, y,
        _slot16(w2_q), _slot16(w2_s), 0.0,
        N_OUT=d, N_IN=i, K=k, GATE_UP=False, A_QUANT=False, ASM=asm, HW_FP8=hw, PREC=prec,
        BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=bk2, num_warps=warps2, num_stages=stages2,
    )  # fmt: skip
    bd = 1024
    _fp4_experts_combine_kernel[(m, triton.cdiv(d, bd))](
        y, slots, shared_out, out, d, shared_out.stride(0), out.stride(0), K=k, BLOCK_D=bd
    )
