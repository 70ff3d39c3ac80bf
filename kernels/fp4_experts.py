"""Routed MoE experts straight from the FP4 slot pool (v4-architecture.md §2.3 FP4, §3.4 experts).

Letters: M tokens, K experts per token, P = M*K (token, expert) pairs, D model dim, I expert
width, S pool slots.

Slot pool layout (the expert store allocates it; one slot holds one expert, packed exactly as the
checkpoint stores it, so a host->slot copy is a plain memcpy of four tensors):

    w13_q [S, 2*I, D//2]  uint8   E2M1 pairs, low nibble = even input; rows 0..I-1 = w1 (gate),
                                  rows I..2I-1 = w3 (up)
    w13_s [S, 2*I, D//32] uint8   E8M0 scale per 32 inputs (same row order)
    w2_q  [S, D, I//2]    uint8   E2M1 pairs of w2 (down)
    w2_s  [S, D, I//32]   uint8   E8M0 scale per 32 inputs

(V4-Flash: D = 4096, I = 2048: 13,369,344 bytes per slot.) `pool_shapes()` gives the shapes.

Math per pair (token m, expert k) with slot s = slots[m, k] (s < 0: the pair is skipped):
    g = w1[s] . x_m,  v = w3[s] . x_m           (fp32; x_m act-quantised when act_quant)
    g = min(g, limit); v = clamp(v, -limit, limit)
    a = route_w[m, k] * silu(g) * v, cast to the activation dtype (x's dtype)
    y = w2[s] . a                               (a act-quantised when act_quant)
    out[m] = shared_out[m] + sum_k y            (fp32 accumulation, cast to out's dtype)

Decode (`fp4_experts`, M <= 16): two launches, both graph capturable.
  1. gate/up: grid (I/BLOCK_N, P). The program of the first pair that uses a slot (the slot's
     leader) decodes each weight tile once and applies it to every token that routed to that slot,
     so a slot shared by several tokens is read once. Weights are read as 16-byte vectors of int32
     words (8 inputs each) and decoded in registers: shift/mask passes turn a word's 8 nibbles
     into e4m3 bytes (exact, see _formats), hardware converts them; the E8M0 scale is applied
     once per 32-input group sum. Writes a [P, I] to the workspace.
  2. down + combine: grid (D/BLOCK_N, P), leaders again (a pair whose token already has the same
     slot at a smaller k is handled on its own). Each program writes its fp32 partial y; the last
     program of a row tile to arrive (atomic counter, reset afterwards) adds shared_out and the K
     partials of each token in k order and writes out: deterministic, no extra launch.
Prefill (`fp4_experts_grouped`, any M): pairs are sorted by slot on the device and padded into
BLOCK_M tiles of one slot (the usual MoE alignment), then tl.dot kernels for gate/up and down and a
small combine kernel. Same definition (`fp4_experts_ref`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._formats import (
    FP4_GROUP,
    _act_quant_apply,
    _act_quant_scale,
    _and_flag,
    _e8m0_times_64,
    _fp4_pair_to_f32,
    _fp4_words_dot,
    _load_x8,
    act_quant_ref,
    check_tensor,
    dequant_fp4,
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


@triton.jit
def _fp4_experts_gate_up_kernel(
    x_ptr,  # [M, D] activations, row stride stride_xm
    slots_ptr,  # [M, K] int32 slot per pair, contiguous (-1 = skip)
    rw_ptr,  # [M, K] fp32 routing weights, contiguous
    wq_ptr,  # [S, 2I, D/8] int32 view of w13_q (8 E2M1 inputs per word)
    ws_ptr,  # [S, 2I, D/32] uint8 w13 E8M0 scales
    a_ptr,  # [P, I] workspace: activation a per pair (x's dtype), row p = m*K + k
    M,
    I,
    ROW_W,  # D / 8: words per weight row
    ROW_S,  # D / 32: scales per weight row
    stride_xm,
    limit,  # swiglu_limit (fp32)
    K: tl.constexpr,  # experts per token
    P_BLOCK: tl.constexpr,  # next power of two >= M*K
    M_BLOCK: tl.constexpr,  # next power of two >= M
    K_BLOCK: tl.constexpr,  # next power of two >= K
    BLOCK_N: tl.constexpr,  # rows of w1 (and of w3) per program
    NB: tl.constexpr,  # 128-input blocks per loop step
    ACT_QUANT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    slot = tl.load(slots_ptr + p)
    q = tl.arange(0, P_BLOCK)
    sq = tl.load(slots_ptr + q, mask=q < M * K, other=-1)
    n_before = tl.sum(((sq == slot) & (q < p)).to(tl.int32), axis=0)
    if (slot >= 0) & (n_before == 0):  # this pair leads its slot
        mm = tl.arange(0, M_BLOCK)
        kk = tl.arange(0, K_BLOCK)
        s2 = tl.load(
            slots_ptr + mm[:, None] * K + kk[None, :],
            mask=(mm[:, None] < M) & (kk[None, :] < K),
            other=-1,
        )
        uses = s2 == slot  # [M_BLOCK, K_BLOCK]
        member = tl.max(uses.to(tl.int32), axis=1) > 0  # tokens routed to this slot

        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        r_mask = rows < I
        # Word tile [BLOCK_N, NB, 4, 4] of int32: NB act blocks of 128 inputs = 4 scale groups of
        # 32 inputs = 4 words (one 16-byte vector load per thread per group).
        woff3 = (
            tl.arange(0, NB)[:, None, None] * 16
            + tl.arange(0, 4)[None, :, None] * 4
            + tl.arange(0, 4)[None, None, :]
        )
        woff = woff3[None, :, :, :]
        soff = tl.arange(0, NB)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
        slot64 = slot.to(tl.int64)
        g_rows = slot64 * 2 * I + rows.to(tl.int64)
        u_rows = g_rows + I
        g_w = wq_ptr + (g_rows * ROW_W)[:, None, None, None]
        u_w = wq_ptr + (u_rows * ROW_W)[:, None, None, None]
        g_s = ws_ptr + (g_rows * ROW_S)[:, None, None]
        u_s = ws_ptr + (u_rows * ROW_S)[:, None, None]

        acc_g = tl.zeros([BLOCK_N, M_BLOCK], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, M_BLOCK], dtype=tl.float32)
        cols = tl.arange(0, M_BLOCK)
        for c0 in range(0, ROW_W, NB * 16):
            wmask3 = (c0 + woff3) < ROW_W
            wmask = r_mask[:, None, None, None] & wmask3[None, :, :, :]
            smask = r_mask[:, None, None] & ((c0 // 4 + soff) < ROW_S)
            gw = tl.load(g_w + c0 + woff, mask=wmask, other=0)
            uw = tl.load(u_w + c0 + woff, mask=wmask, other=0)
            g_sc = _e8m0_times_64(tl.load(g_s + c0 // 4 + soff, mask=smask, other=0))
            u_sc = _e8m0_times_64(tl.load(u_s + c0 // 4 + soff, mask=smask, other=0))
            xbase = 8 * (c0 + woff3)  # [NB, 4, 4] input index of each word's first element
            for m in tl.static_range(M_BLOCK):
                is_m = tl.sum(tl.where((mm == m) & member, 1, 0), axis=0) > 0
                x0, x1, x2, x3, x4, x5, x6, x7 = _load_x8(
                    x_ptr + m * stride_xm, xbase, _and_flag(wmask3, is_m), ACT_QUANT
                )
                x0, x1, x2, x3 = x0[None], x1[None], x2[None], x3[None]
                x4, x5, x6, x7 = x4[None], x5[None], x6[None], x7[None]
                pg = _fp4_words_dot(gw, x0, x1, x2, x3, x4, x5, x6, x7)
                pu = _fp4_words_dot(uw, x0, x1, x2, x3, x4, x5, x6, x7)
                pg = tl.sum(tl.sum(tl.sum(pg, axis=3) * g_sc, axis=2), axis=1)
                pu = tl.sum(tl.sum(tl.sum(pu, axis=3) * u_sc, axis=2), axis=1)
                acc_g = tl.where(cols[None, :] == m, acc_g + pg[:, None], acc_g)
                acc_u = tl.where(cols[None, :] == m, acc_u + pu[:, None], acc_u)

        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        silu_g = g / (1.0 + tl.exp(-g))
        for k in tl.static_range(K):
            uses_k = tl.sum(tl.where(uses & (kk[None, :] == k), 1, 0), axis=1) > 0  # [M_BLOCK]
            rw = tl.load(rw_ptr + mm * K + k, mask=uses_k, other=0.0)
            a = rw[None, :] * silu_g * u
            tl.store(
                a_ptr + (mm[None, :] * K + k).to(tl.int64) * I + rows[:, None],
                a.to(a_ptr.dtype.element_ty),
                mask=r_mask[:, None] & uses_k[None, :],
            )


@triton.jit
def _fp4_experts_down_kernel(
    a_ptr,  # [P, I] activations from the gate/up kernel
    slots_ptr,  # [M, K] int32
    shared_ptr,  # [M, D] shared-expert output, row stride stride_sm
    wq_ptr,  # [S, D, I/8] int32 view of w2_q
    ws_ptr,  # [S, D, I/32] uint8 w2 E8M0 scales
    y_ptr,  # [P, D] fp32 workspace: y per pair
    cnt_ptr,  # [ceil(D/BLOCK_N)] int32 arrival counters, zero before and after
    out_ptr,  # [M, D] output, row stride stride_om
    M,
    D,
    I,
    ROW_W,  # I / 8
    ROW_S,  # I / 32
    stride_sm,
    stride_om,
    K: tl.constexpr,
    P_BLOCK: tl.constexpr,
    M_BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows of w2 (outputs) per program
    NB: tl.constexpr,
    ACT_QUANT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    P = M * K
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < D
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
        member = tl.where(is_dup, mm == m_p, first_k < K)
        pidx = tl.where(is_dup, p, mm * K + first_k)

        woff3 = (
            tl.arange(0, NB)[:, None, None] * 16
            + tl.arange(0, 4)[None, :, None] * 4
            + tl.arange(0, 4)[None, None, :]
        )
        woff = woff3[None, :, :, :]
        soff = tl.arange(0, NB)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
        w_rows = slot.to(tl.int64) * D + rows.to(tl.int64)
        w_w = wq_ptr + (w_rows * ROW_W)[:, None, None, None]
        w_s = ws_ptr + (w_rows * ROW_S)[:, None, None]
        acc = tl.zeros([BLOCK_N, M_BLOCK], dtype=tl.float32)
        cols = tl.arange(0, M_BLOCK)
        for c0 in range(0, ROW_W, NB * 16):
            wmask3 = (c0 + woff3) < ROW_W
            ww = tl.load(
                w_w + c0 + woff, mask=r_mask[:, None, None, None] & wmask3[None, :, :, :], other=0
            )
            smask = r_mask[:, None, None] & ((c0 // 4 + soff) < ROW_S)
            sc = _e8m0_times_64(tl.load(w_s + c0 // 4 + soff, mask=smask, other=0))
            abase = 8 * (c0 + woff3)
            for m in tl.static_range(M_BLOCK):
                sel = mm == m
                is_m = tl.sum(tl.where(sel & member, 1, 0), axis=0) > 0
                prow = tl.sum(tl.where(sel, pidx, 0), axis=0).to(tl.int64)
                a0, a1, a2, a3, a4, a5, a6, a7 = _load_x8(
                    a_ptr + prow * I, abase, _and_flag(wmask3, is_m), ACT_QUANT
                )
                a0, a1, a2, a3 = a0[None], a1[None], a2[None], a3[None]
                a4, a5, a6, a7 = a4[None], a5[None], a6[None], a7[None]
                py = _fp4_words_dot(ww, a0, a1, a2, a3, a4, a5, a6, a7)
                py = tl.sum(tl.sum(tl.sum(py, axis=3) * sc, axis=2), axis=1)
                acc = tl.where(cols[None, :] == m, acc + py[:, None], acc)
        tl.store(
            y_ptr + pidx[None, :].to(tl.int64) * D + rows[:, None],
            acc,
            mask=r_mask[:, None] & member[None, :],
        )

    # All P programs of this row tile arrive; the last one combines (k order: deterministic).
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
    if arrived == P - 1:
        tot = tl.load(
            shared_ptr + mm[None, :] * stride_sm + rows[:, None],
            mask=r_mask[:, None] & (mm[None, :] < M),
            other=0.0,
        ).to(tl.float32)
        for k in tl.static_range(K):
            valid_k = tl.sum(tl.where(kk[None, :] == k, s2, 0), axis=1) >= 0  # [M_BLOCK]
            tot += tl.load(
                y_ptr + (mm[None, :] * K + k).to(tl.int64) * D + rows[:, None],
                mask=r_mask[:, None] & valid_k[None, :] & (mm[None, :] < M),
                other=0.0,
                cache_modifier=".cg",
            )
        tl.store(
            out_ptr + mm[None, :] * stride_om + rows[:, None],
            tot.to(out_ptr.dtype.element_ty),
            mask=r_mask[:, None] & (mm[None, :] < M),
        )
        tl.atomic_xchg(cnt_ptr + pid_n, 0)


# ------------------------------------------------------------------------------------------------
# Prefill (grouped) kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fp4_grouped_gemm_kernel(
    in_ptr,  # gate/up: x [M, D] (row = pair // K); down: a [P, I] (row = pair)
    tile_slot_ptr,  # [n_tiles] int32 slot of each BLOCK_M tile (-1 = unused tile)
    tile_pair_ptr,  # [n_tiles * BLOCK_M] int32 pair id per tile row (-1 = padding)
    rw_ptr,  # [P] fp32 routing weights (gate/up only)
    wq_ptr,  # gate/up: w13_q [S, 2I, D/2]; down: w2_q [S, D, I/2]
    ws_ptr,  # matching E8M0 scales [S, rows, in/32]
    dst_ptr,  # gate/up: a [P, I] (x's dtype); down: y [P, D] fp32
    N_OUT,  # gate/up: I; down: D
    N_IN,  # gate/up: D; down: I
    stride_in,  # row stride of in_ptr
    limit,
    K: tl.constexpr,
    GATE_UP: tl.constexpr,  # True: w1/w3 + SwiGLU epilogue; False: w2
    ACT_QUANT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
        jj = tl.arange(0, 64)  # 64 bytes = 128 inputs per step
        row_b = N_IN // 2
        row_s = N_IN // 32
        n_w_rows = 2 * N_OUT if GATE_UP else N_OUT
        w_row = slot.to(tl.int64) * n_w_rows + rows.to(tl.int64)
        cdt = in_ptr.dtype.element_ty
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, row_b, 64):
            j = c0 + jj
            j_ok = j < row_b
            xmask = p_ok[:, None] & j_ok[None, :]
            xe = tl.load(in_ptr + src[:, None] * stride_in + 2 * j[None, :], mask=xmask, other=0.0)
            xo = tl.load(
                in_ptr + src[:, None] * stride_in + 2 * j[None, :] + 1, mask=xmask, other=0.0
            )
            if ACT_QUANT:
                xe = xe.to(tl.float32)
                xo = xo.to(tl.float32)
                amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
                sx, sx_inv = _act_quant_scale(amax)
                # e4m3 grid values are exact in every compute dtype; the scale goes on after.
                xe = _act_quant_apply(xe, 1.0, sx_inv[:, None]).to(cdt)
                xo = _act_quant_apply(xo, 1.0, sx_inv[:, None]).to(cdt)
            wmask = r_mask[:, None] & j_ok[None, :]
            sidx = (c0 + jj[None, :]) // 16  # scale group of each byte
            # gate (or down) rows
            wb = tl.load(wq_ptr + w_row[:, None] * row_b + j[None, :], mask=wmask, other=0)
            sc = _e8m0_times_64(
                tl.load(ws_ptr + w_row[:, None] * row_s + sidx, mask=wmask, other=0)
            )
            lo, hi = _fp4_pair_to_f32(wb)
            lo = (lo * sc).to(cdt)
            hi = (hi * sc).to(cdt)
            if IEEE_FP32:
                d = tl.dot(xe, tl.trans(lo), input_precision="ieee")
                d += tl.dot(xo, tl.trans(hi), input_precision="ieee")
            else:
                d = tl.dot(xe, tl.trans(lo))
                d += tl.dot(xo, tl.trans(hi))
            if ACT_QUANT:
                d = d * sx[:, None]
            acc_g += d
            if GATE_UP:
                u_row = w_row + N_OUT
                wb = tl.load(wq_ptr + u_row[:, None] * row_b + j[None, :], mask=wmask, other=0)
                sc = _e8m0_times_64(
                    tl.load(ws_ptr + u_row[:, None] * row_s + sidx, mask=wmask, other=0)
                )
                lo, hi = _fp4_pair_to_f32(wb)
                lo = (lo * sc).to(cdt)
                hi = (hi * sc).to(cdt)
                if IEEE_FP32:
                    d = tl.dot(xe, tl.trans(lo), input_precision="ieee")
                    d += tl.dot(xo, tl.trans(hi), input_precision="ieee")
                else:
                    d = tl.dot(xe, tl.trans(lo))
                    d += tl.dot(xo, tl.trans(hi))
                if ACT_QUANT:
                    d = d * sx[:, None]
                acc_u += d
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
# Workspace and launchers
# ------------------------------------------------------------------------------------------------

_DECODE_BLOCK_N_DOWN = 16


@dataclass
class Fp4ExpertsWorkspace:
    """Scratch of the decode launches, allocated once at startup for the largest M*K and reused
    by every layer (the launches run in stream order; counters are left at zero)."""

    a: torch.Tensor  # [P_max, I] activation dtype
    y: torch.Tensor  # [P_max, D] fp32
    counters: torch.Tensor  # [ceil(D / 16)] int32 zeros


def fp4_experts_workspace(
    max_pairs: int, d: int, i: int, act_dtype: torch.dtype, device: torch.device | str
) -> Fp4ExpertsWorkspace:
    """Workspace for up to max_pairs = M*K (token, expert) pairs."""
    return Fp4ExpertsWorkspace(
        torch.empty(max_pairs, i, dtype=act_dtype, device=device),
        torch.empty(max_pairs, d, dtype=torch.float32, device=device),
        torch.zeros(triton.cdiv(d, _DECODE_BLOCK_N_DOWN), dtype=torch.int32, device=device),
    )


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
        check_tensor(f"{name}: {nm}", t, shape=shapes[nm], dtypes=(torch.uint8,), device=dev)
    check_tensor(f"{name}: slots", slots, shape=(m, None), dtypes=(torch.int32,), device=dev)
    k = slots.shape[1]
    check_tensor(f"{name}: route_w", route_w, shape=(m, k), dtypes=(torch.float32,), device=dev)
    for nm, t in (("shared_out", shared_out), ("out", out)):
        check_tensor(f"{name}: {nm}", t, shape=(m, d), dtypes=_ACT_DTYPES, contiguous=False)
        if t.stride(1) != 1:
            raise ValueError(f"{name}: {nm} must have unit column stride")
    return m, k, d, i, s


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
    shared_out and out [M, D]; pool tensors as in pool_shapes(). Two launches, no host sync.
    `out` may alias `shared_out`. workspace: from fp4_experts_workspace(), or None to allocate.
    config: tuning overrides (block_n, nb, num_warps for gate/up; block_n_down, nb_down).
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
    cfg = dict(config or {})
    m_block = triton.next_power_of_2(m)
    p_block = triton.next_power_of_2(pairs)
    k_block = triton.next_power_of_2(k)
    bn = cfg.get("block_n", 16)
    nb = cfg.get("nb", 2 if m_block <= 2 else 1)
    bn2 = _DECODE_BLOCK_N_DOWN
    nb2 = cfg.get("nb_down", nb)
    if ws.counters.numel() < triton.cdiv(d, bn2):
        raise ValueError("fp4_experts: workspace.counters too small")
    warps = cfg.get("num_warps", 4)
    _fp4_experts_gate_up_kernel[(triton.cdiv(i, bn), pairs)](
        x, slots, route_w, w13_q.view(torch.int32), w13_s, ws.a, m, i, d // 8, d // 32,
        x.stride(0), float(swiglu_limit),
        K=k, P_BLOCK=p_block, M_BLOCK=m_block, K_BLOCK=k_block, BLOCK_N=bn, NB=nb,
        ACT_QUANT=act_quant, num_warps=warps,
    )  # fmt: skip
    _fp4_experts_down_kernel[(triton.cdiv(d, bn2), pairs)](
        ws.a, slots, shared_out, w2_q.view(torch.int32), w2_s, ws.y, ws.counters, out, m, d, i,
        i // 8, i // 32, shared_out.stride(0), out.stride(0),
        K=k, P_BLOCK=p_block, M_BLOCK=m_block, K_BLOCK=k_block, BLOCK_N=bn2, NB=nb2,
        ACT_QUANT=act_quant, num_warps=cfg.get("num_warps_down", warps),
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
    slot on the device, tl.dot tiles. Allocates its scratch (a [P, I], y [P, D] fp32) per call."""
    require_triton("fp4_experts_grouped")
    if out is None:
        out = torch.empty_like(shared_out, dtype=x.dtype)
    m, k, d, i, s = _check_common(
        "fp4_experts_grouped", x, slots, route_w, shared_out, w13_q, w13_s, w2_q, w2_s, out
    )
    if m == 0:
        return out
    cfg = dict(config or {})
    bm = cfg.get("block_m", 64)
    bn = cfg.get("block_n", 64)
    warps = cfg.get("num_warps", 8)  # 4 warps spill with two 64x64 fp32 accumulators
    stages = cfg.get("num_stages", 2)
    tile_slot, tile_pair = _group_pairs(slots, s, bm)
    n_tiles = tile_slot.numel()
    pairs = m * k
    a = torch.empty(pairs, i, dtype=x.dtype, device=x.device)
    y = torch.empty(pairs, d, dtype=torch.float32, device=x.device)
    rw = route_w.reshape(-1)
    ieee = x.dtype == torch.float32
    _fp4_grouped_gemm_kernel[(n_tiles, triton.cdiv(i, bn))](
        x, tile_slot, tile_pair, rw, w13_q, w13_s, a, i, d, x.stride(0), float(swiglu_limit),
        K=k, GATE_UP=True, ACT_QUANT=act_quant, IEEE_FP32=ieee, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _fp4_grouped_gemm_kernel[(n_tiles, triton.cdiv(d, bn))](
        a, tile_slot, tile_pair, rw, w2_q, w2_s, y, d, i, a.stride(0), 0.0,
        K=k, GATE_UP=False, ACT_QUANT=act_quant, IEEE_FP32=ieee, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    bd = 1024
    _fp4_experts_combine_kernel[(m, triton.cdiv(d, bd))](
        y, slots, shared_out, out, d, shared_out.stride(0), out.stride(0), K=k, BLOCK_D=bd
    )
    return out
