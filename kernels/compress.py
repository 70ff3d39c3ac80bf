"""The decode token's (T = 1) attention keys, one launch each (docs/architecture.md §3.3, §4):

- compress_decode: the token through one KV compressor, after its two fp32 projections (the
  torch form is homeseek/decode.py's compress_step);
- new_key: the token's own key into its window ring row (decode.py's new_key), below. Built
  and tested under the interpreter (session 21) but not yet what decode runs: its GPU tests
  had no device time left; decode keeps its compiled new_key until they pass.

Letters: S arena slots, m compress ratio, d entry width, c = 2 with the CSA overlap (else 1),
P RoPE pairs (the entry's last 2P channels rotate), n = `nope` (FP8-rounded channels of a key).

State of one compressor (homeseek/state.py ArenaCompressor), all fp32 but the cache:
    buf_kv, buf_gate [S, m, c·d]   this block's rows; row r = position r of the block
    prev_kv, prev_gate [S, m, d]   CSA: the A half (columns 0..d) of the previous block
    cache [rows, d]                entry j of the slot at row cache_row0 + j (bf16 or fp32)

The token at position pos (device tensor), slot s, o = pos mod m, j = pos // m:
    buf_kv[s, o] = kv;  buf_gate[s, o] = gate + ape[o]                        (every step)
Pooling, per column (the rows are one softmax group):
    overlap: K = [prev_kv[s]; buf_kv[s, :, d:2d]], G = [prev_gate[s]; buf_gate[s, :, d:2d]]  [2m, d]
    else:    K = buf_kv[s], G = buf_gate[s]                                                   [m, d]
    pooled = sum_rows K · softmax_rows(G)                                              fp32 [d]
The entry, bf() rounding to the activation dtype `dtype` where model.py's torch code casts:
    x = bf(pooled);  y = bf(w · (x · rsqrt(mean(x²) + eps)))     rms_norm (w: the norm weight)
    y = rope(y, cos_t[j·m], sin_t[j·m])   interleaved pairs (a, b) of the last 2P channels,
                                          bf(a cos - b sin), bf(a sin + b cos) in fp32
    "kv":    y[:n] = FP8 sim (e4m3, UE8M0 scale 2^ceil(log2(max(amax, 1e-4) / 448)), blocks
             of 64, a ragged last block on its own)                              when quant_sim
    "index": y = E2M1 sim (blocks of 32, scale 2^ceil(log2(max(amax, 6·2^-126) / 6)), round to
             nearest even on the E2M1 grid) of bf(y · H), H the d x d Hadamard    when quant_sim
    cache[cache_row0 + j] = y (in the cache's dtype)
and, when the token completes its block (o = m - 1), with overlap:
    prev_kv[s] = buf_kv[s, :, :d];  prev_gate[s] = buf_gate[s, :, :d]   (after pooling read them)

The entry changes only when its block completes: before that the engine masks it wherever it is
read (decode.py: entries c >= (pos + 1) // m). So the kernel does the pooling, the entry and the
prev update only on completing steps (a branch on the device: no host sync, graph-capturable);
other steps write the two buffer rows only, and the cache row of a block in progress keeps
whatever it held. The torch twin writes the entry every step, as decode.py does: the two agree
on the buffers, the overlap halves and every complete entry.

Kernel: one program per launch (the work is one token's, ~10 KB on most steps). On a completing
step it pools in tiles of BLOCK_R rows x d columns, two passes: the column max of the gate
logits, then the sum of exp(g - max) and of kv · exp(g - max); pooled = their quotient (torch
divides each weight first: one rounding apart). HCA's m = 128 x d = 512 (256 KB of kv and of
gate logits, once in 128 tokens) takes 8 tiles of 16 rows per pass with 8 warps; CSA's 2m = 8
rows fit one tile per half. The token's own row enters the pooling from the inputs (kv, gate +
ape), not read back from the buffer it was just stored to, so no barrier orders the two; one
barrier separates the pooling's reads of the old overlap half from its overwrite.

new_key: the window key of the token at position pos, from kva [1, Dh] (the wkv part of the
fused wq_a + wkv product, in the activation dtype; d = Dh here) and the kv_norm weight w (fp32
as the engine loads norm weights, or the activation dtype: w · (...) is fp32 math either way):
    y = bf(w · (x · rsqrt(mean(x²) + eps)))   x = kva (already in the activation dtype)
    y = rope(y, cos_t[pos], sin_t[pos])       the token's own position (entries: the block's)
    y[:n] = FP8 sim, as for a "kv" entry      when quant_sim
    keys[ring_row] = y                        keys in kva's dtype; no other row is written
One program, no loop: Dh = 512 is 1 KB in and out. The entry's helpers (_rms_norm, _rope,
_fp8_nope) do the math, so the two kernels round alike. It replaces the ~4 launches Inductor made of
decode.py's compiled new_key; pos and ring_row are read on the device (graph-capturable).

Numerics (both kernels): the same math in fp32 with other summation orders (the softmax sums,
the norm's mean, the Hadamard product) and the GPU's exp, so equal to fp32 rounding. The
roundings (bf16, FP8, E2M1) and the block scales are bit for bit their torch definitions (bf16
by the bits, so the interpreter, whose cast truncates, agrees too): a rounded value can differ
from the twin's only where the fp32 value before it does, by one step of its grid. The kernels
compile without fp fusion (no FMA contraction), as torch rounds `a cos - b sin` and
`w · (x · r)` step by step, and take r as 1 / sqrt, each correctly rounded, as torch's CPU
rsqrt does (CUDA's rsqrtf, eager or Inductor, is within 2 ulp: a twin run on the GPU can put a
bf16 value one step off where its fp32 value sits at a rounding boundary).
"""

from __future__ import annotations

import torch

from ._formats import (
    HAS_TRITON,
    _e4m3_q,
    _pow2,
    act_quant_ref,
    check_tensor,
    interpreting,
    require_triton,
    tl,
    triton,
)
from .rope import rope_ref

__all__ = [
    "compress_decode", "compress_decode_ref", "e2m1_block_ref", "kv_round_ref", "new_key",
    "new_key_ref",
]  # fmt: skip

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Activation dtype -> the kernel's rounding code (_round_to).
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KV_BLOCK = 64  # FP8 block of the keys' nope channels (model.kv_round)
INDEX_BLOCK = 32  # E2M1 block of the indexer keys (model.index_round)
E2M1_MAX = 6.0
E2M1_AMAX_FLOOR = 6.0 * 2.0**-126
FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4  # _formats.ACT_AMAX_FLOOR
# The same constants as the kernel's compile-time values.
_E2M1_FLOOR = tl.constexpr(E2M1_AMAX_FLOOR) if HAS_TRITON else E2M1_AMAX_FLOOR
_E2M1_MAX = tl.constexpr(E2M1_MAX) if HAS_TRITON else E2M1_MAX
_FP8_FLOOR = tl.constexpr(FP8_AMAX_FLOOR) if HAS_TRITON else FP8_AMAX_FLOOR
_FP8_MAX = tl.constexpr(FP8_MAX) if HAS_TRITON else FP8_MAX


# ------------------------------------------------------------------------------------------------
# Plain-torch twin
# ------------------------------------------------------------------------------------------------


def _pow2_ceil_ref(x: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(x)) for positive fp32 x (quant.pow2_ceil, by frexp: exact)."""
    mant, e = torch.frexp(x)
    e = torch.where(mant == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(x), e)


def _round_e2m1_ref(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to the even mantissa, saturating at 6 (quant.round_e2m1)."""
    a = x.abs()
    q = torch.full_like(a, 6.0)
    # From the top down, so each threshold overrides the ones above it. `<=` where the lower
    # neighbour has the even mantissa (ties go there).
    for bound, le, val in (
        (5.0, True, 4.0), (3.5, False, 3.0), (2.5, True, 2.0), (1.75, False, 1.5),
        (1.25, True, 1.0), (0.75, False, 0.5), (0.25, True, 0.0),
    ):  # fmt: skip
        q = torch.where(a <= bound if le else a < bound, val, q)
    return torch.copysign(q, x)


def e2m1_block_ref(x: torch.Tensor, block: int = INDEX_BLOCK) -> torch.Tensor:
    """E2M1 quantise-dequantise of the last dim in blocks (a ragged tail is its own block), in
    x's dtype: s = 2^ceil(log2(max(amax, 6·2^-126) / 6)), x -> round_e2m1(x / s) · s. The same
    bits as homeseek/quant.py fp4_block_sim (tests check it); kept here so the kernel layer does
    not import the engine."""
    k = x.shape[-1]
    xf = x.float()
    pad = (-k) % block
    if pad:  # zeros do not change a block's amax
        xf = torch.nn.functional.pad(xf, (0, pad))
    xb = xf.unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(E2M1_AMAX_FLOOR)
    s = _pow2_ceil_ref(amax / E2M1_MAX)
    return (_round_e2m1_ref(xb / s) * s).flatten(-2)[..., :k].to(x.dtype)


def _rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """model.rms_norm with a weight: w · (x · rsqrt(mean(x²) + eps)) in fp32, in x's dtype."""
    xf = x.float()
    return (w * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)


def kv_round_ref(kv: torch.Tensor, nope: int, quant_sim: bool) -> torch.Tensor:
    """A key [T, d] as the cache stores it (the model's definition, model.kv_round): the first
    nope channels FP8-rounded in blocks of KV_BLOCK (quant.fp8_block_sim), the rest as they
    are, in kv's dtype; nothing rounded without quant_sim."""
    if not quant_sim:
        return kv
    q = act_quant_ref(kv[:, :nope], KV_BLOCK).to(kv.dtype)
    return torch.cat((q, kv[:, nope:]), dim=-1)


def _entry_ref(
    pooled: torch.Tensor,
    norm_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    hmat: torch.Tensor | None,
    dtype: torch.dtype,
    eps: float,
    post: str,
    nope: int,
    quant_sim: bool,
) -> torch.Tensor:
    """pooled [1, d] fp32 -> the entry [1, d] in dtype (model.rms_norm, apply_rope, kv_round /
    index_round)."""
    e = rope_ref(_rms_norm_ref(pooled.to(dtype), norm_w, eps), cos, sin)
    if not quant_sim:
        return e
    if post == "kv":
        return kv_round_ref(e, nope, True)
    return e2m1_block_ref((e.float() @ hmat).to(dtype))


def compress_decode_ref(
    kv: torch.Tensor,
    gate: torch.Tensor,
    ape: torch.Tensor,
    pos: torch.Tensor,
    slot: torch.Tensor,
    buf_kv: torch.Tensor,
    buf_gate: torch.Tensor,
    prev_kv: torch.Tensor,
    prev_gate: torch.Tensor,
    cache: torch.Tensor,
    cache_row0: torch.Tensor,
    norm_w: torch.Tensor,
    cos_t: torch.Tensor,
    sin_t: torch.Tensor,
    hmat: torch.Tensor | None,
    *,
    m: int,
    overlap: bool,
    eps: float,
    post: str,
    nope: int,
    quant_sim: bool,
    dtype: torch.dtype,
) -> None:
    """One token through one compressor, in place (see the module docstring); homeseek/decode.py's
    compress_rows + pool_entry + the state writes of compress_step, in torch.

    kv, gate [1, c·d] fp32; ape [m, c·d] fp32; pos, slot, cache_row0 [1] int64; buf_kv,
    buf_gate [S, m, c·d] fp32; prev_kv, prev_gate [S, m, d] fp32; cache [rows, d]; norm_w [d];
    cos_t, sin_t [max_pos, P] fp32; hmat [d, d] fp32 (post "index" with quant_sim only; else
    may be None); dtype: the activation dtype.

    Writes the entry of the block in progress at cache row cache_row0 + pos // m on every step
    (final once the block completes); the Triton kernel writes it only on the completing step.
    """
    cd = buf_kv.shape[-1]
    off = pos % m
    row = slot * m + off
    buf_kv.view(-1, cd).index_copy_(0, row, kv)
    buf_gate.view(-1, cd).index_copy_(0, row, gate + ape[off])
    bk = buf_kv.index_select(0, slot)[0]  # [m, c·d]; rows past pos mod m are the last block's
    bg = buf_gate.index_select(0, slot)[0]
    if overlap:
        d = prev_kv.shape[-1]
        pk = prev_kv.index_select(0, slot)[0]  # [m, d] A half of the previous block
        pg = prev_gate.index_select(0, slot)[0]
        rows_kv = torch.cat((pk, bk[:, d:]))  # [2m, d]
        rows_gate = torch.cat((pg, bg[:, d:]))
        complete = (pos % m == m - 1).view(1, 1)
        prev_kv.index_copy_(0, slot, torch.where(complete, bk[:, :d], pk)[None])
        prev_gate.index_copy_(0, slot, torch.where(complete, bg[:, :d], pg)[None])
    else:
        rows_kv, rows_gate = bk, bg
    pooled = (rows_kv * torch.softmax(rows_gate, dim=0)).sum(0, keepdim=True)  # [1, d] fp32
    first = (pos // m) * m
    e = _entry_ref(
        pooled, norm_w, cos_t[first], sin_t[first], hmat, dtype, eps, post, nope, quant_sim
    )
    cache.index_copy_(0, cache_row0 + pos // m, e.to(cache.dtype))


def new_key_ref(
    kva: torch.Tensor,
    kv_w: torch.Tensor,
    cos_t: torch.Tensor,
    sin_t: torch.Tensor,
    pos: torch.Tensor,
    keys: torch.Tensor,
    ring_row: torch.Tensor,
    *,
    eps: float,
    nope: int,
    quant_sim: bool,
) -> None:
    """The decode token's key into its window ring row, in place: homeseek/decode.py's new_key,
    restated with model.py's definitions (rms_norm, apply_rope, kv_round).

    kva [1, Dh] (the activation dtype; a column slice of a wider row is fine); kv_w [Dh] the
    kv_norm weight (fp32 or the activation dtype); cos_t, sin_t [max_pos, P] fp32; pos,
    ring_row [1] int64; keys [rows, Dh] in kva's dtype: row ring_row <- the key, no other row
    changes."""
    kv = rope_ref(_rms_norm_ref(kva, kv_w, eps), cos_t[pos], sin_t[pos])
    keys.index_copy_(0, ring_row, kv_round_ref(kv, nope, quant_sim))


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _round_to(x, CODE: tl.constexpr):
    """fp32 x rounded to the dtype of CODE (0 fp32, 1 bf16, 2 fp16), returned as fp32.

    bf16 by the bits (round to nearest even: add 0x7FFF plus the kept LSB, clear the low half),
    the same on the GPU and in the interpreter, whose fp32 -> bf16 cast truncates."""
    if CODE == 1:
        b = x.to(tl.int32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
        x = b.to(tl.float32, bitcast=True)
    elif CODE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _ue8m0_scale(amax, FLOOR: tl.constexpr, QMAX: tl.constexpr):
    """Power-of-two block scale s = 2^ceil(log2(max(amax, FLOOR) / QMAX)) and 1/s, exactly.

    The quotient is divided with IEEE rounding (div_rn): Triton's `/` is div.full.f32 on NVIDIA
    (up to 2 ulp), which can lift an exact power of two and double the scale."""
    v = tl.div_rn(tl.maximum(amax, FLOOR), QMAX)
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return _pow2(e), _pow2(-e)


@triton.jit
def _e2m1_qdq(y, s, s_inv):
    """round_e2m1(y / s) · s for a power-of-two scale s (y · s_inv is y / s exactly)."""
    z = y * s_inv
    a = tl.abs(z)
    q = tl.where(a <= 5.0, 4.0, 6.0)
    q = tl.where(a < 3.5, 3.0, q)
    q = tl.where(a <= 2.5, 2.0, q)
    q = tl.where(a < 1.75, 1.5, q)
    q = tl.where(a <= 1.25, 1.0, q)
    q = tl.where(a < 0.75, 0.5, q)
    q = tl.where(a <= 0.25, 0.0, q)
    # copysign by the bits, so a small negative z gives -0.0 as torch.copysign does
    sign = (z.to(tl.int32, bitcast=True) >> 31) << 31  # 0 or the sign bit
    q = (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return q * s


@triton.jit
def _rms_norm(x, w, eps, D: tl.constexpr, ACT: tl.constexpr):
    """model.rms_norm with a weight: bf(w · (x · r)), r = 1 / sqrt(mean(x²) + eps), fp32.

    x [BLOCK_D] fp32 holding values of the activation dtype ACT, w the norm weight in fp32, both
    0 past D (nothing added to the sum, 0 out). Each product rounds on its own as torch's (the
    kernels compile without fp fusion); r is 1 / sqrt, each correctly rounded (div_rn, sqrt_rn:
    Triton's `/` and rsqrt are approximate on NVIDIA)."""
    r = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(x * x, axis=0), D * 1.0) + eps))
    return _round_to(w * (x * r), ACT)


@triton.jit
def _rope(
    y, cos_ptr, sin_ptr, row, rope_stride, D: tl.constexpr, P: tl.constexpr,
    ACT: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """apply_rope on y [BLOCK_D] fp32 (ACT values): its interleaved pairs (a, b) of channels
    D - 2P..D -> bf(a cos - b sin), bf(a sin + b cos), cos / sin row `row` (int64) of the
    [max_pos, P] tables, rows rope_stride apart."""
    a, b = tl.split(tl.reshape(y, (BLOCK_D // 2, 2)))
    hh = tl.arange(0, BLOCK_D // 2)
    pr = hh - (D // 2 - P)  # pair index within the rotated channels
    rot = (pr >= 0) & (hh < D // 2)
    c = tl.load(cos_ptr + row * rope_stride + pr, mask=rot, other=1.0)
    s = tl.load(sin_ptr + row * rope_stride + pr, mask=rot, other=0.0)
    ra = _round_to(a * c - b * s, ACT)
    rb = _round_to(a * s + b * c, ACT)
    return tl.reshape(tl.join(tl.where(rot, ra, a), tl.where(rot, rb, b)), (BLOCK_D,))


@triton.jit
def _fp8_nope(
    y,
    dd,
    NOPE: tl.constexpr,
    ACT: tl.constexpr,
    HW_FP8: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KVB: tl.constexpr,
):
    """model.kv_round's FP8 sim of the channels dd < NOPE of y [BLOCK_D] fp32 (the rest kept):
    e4m3 with a UE8M0 scale per block of KVB channels (BLOCK_D a multiple of KVB; a ragged last
    nope block's other channels count as 0, which leaves its amax as torch's), rounded to ACT."""
    qm = dd < NOPE
    yb = tl.reshape(tl.where(qm, y, 0.0), (BLOCK_D // KVB, KVB))
    sc, sc_inv = _ue8m0_scale(tl.max(tl.abs(yb), axis=1), _FP8_FLOOR, _FP8_MAX)
    qv = tl.minimum(tl.maximum(yb * sc_inv[:, None], -_FP8_MAX), _FP8_MAX)
    qv = tl.reshape(_e4m3_q(qv, HW_FP8) * sc[:, None], (BLOCK_D,))
    return tl.where(qm, _round_to(qv, ACT), y)


@triton.jit
def _compress_decode_kernel(
    kv_ptr,  # [C·D] fp32: this token's kv projection
    gate_ptr,  # [C·D] fp32: its gate logits
    ape_ptr,  # [M, C·D] fp32
    pos_ptr,  # [1] int64
    slot_ptr,  # [1] int64
    buf_kv_ptr,  # [S, M, C·D] fp32 contiguous
    buf_gate_ptr,
    prev_kv_ptr,  # [S, M, D] fp32 contiguous
    prev_gate_ptr,
    cache_ptr,  # [rows, D], unit column stride, rows at cache_stride
    cache_stride,
    row0_ptr,  # [1] int64: cache row of the slot's entry 0
    norm_ptr,  # [D]
    cos_ptr,  # [max_pos, P] fp32, unit column stride, rows at rope_stride
    sin_ptr,
    rope_stride,
    h_ptr,  # [D, D] fp32 Hadamard (POST_INDEX and QUANT only)
    eps,
    M: tl.constexpr,
    D: tl.constexpr,
    CD: tl.constexpr,  # C·D
    OVERLAP: tl.constexpr,
    NOPE: tl.constexpr,
    P: tl.constexpr,
    POST_INDEX: tl.constexpr,
    QUANT: tl.constexpr,
    ACT: tl.constexpr,  # activation dtype code (_round_to)
    OUT: tl.constexpr,  # cache dtype code
    HW_FP8: tl.constexpr,  # hardware e4m3 conversion (GPU) vs exact emulation (interpreter)
    BLOCK_CD: tl.constexpr,  # >= C·D, a power of two
    BLOCK_D: tl.constexpr,  # >= D, a power of two, >= KV_BLOCK
    BLOCK_R: tl.constexpr,  # pooled rows per tile
    BLOCK_J: tl.constexpr,  # Hadamard output columns per step (= the E2M1 block)
    KVB: tl.constexpr,  # FP8 block of the nope channels
):
    pos = tl.load(pos_ptr)
    slot = tl.load(slot_ptr)
    off = pos % M

    # --- every step: the token's rows of the block buffers ---
    cc = tl.arange(0, BLOCK_CD)
    c_ok = cc < CD
    k_new = tl.load(kv_ptr + cc, mask=c_ok)
    g_new = tl.load(gate_ptr + cc, mask=c_ok) + tl.load(ape_ptr + off * CD + cc, mask=c_ok)
    brow = (slot * M + off) * CD
    tl.store(buf_kv_ptr + brow + cc, k_new, mask=c_ok)
    tl.store(buf_gate_ptr + brow + cc, g_new, mask=c_ok)

    if off == M - 1:  # the token completes its block: pool it, write its entry
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < D
        rr = tl.arange(0, BLOCK_R)
        if OVERLAP:
            col0 = D  # the B half of the buffer rows joins the previous block's A half
        else:
            col0 = 0
        # The token's own row (M - 1) comes from the inputs, the others from the buffers (rows
        # 0..M-2 of this block, written by earlier steps). Masked columns: gate 0 and kv 0, so
        # they pool to 0 without NaN.
        fk = tl.load(kv_ptr + col0 + dd, mask=d_ok, other=0.0)
        fg = tl.load(gate_ptr + col0 + dd, mask=d_ok, other=0.0)
        fg += tl.load(ape_ptr + (M - 1) * CD + col0 + dd, mask=d_ok, other=0.0)
        b_rows = buf_gate_ptr + slot * M * CD + col0 + dd[None, :]  # + row * CD
        bk_rows = buf_kv_ptr + slot * M * CD + col0 + dd[None, :]
        p_rows = prev_gate_ptr + slot * M * D + dd[None, :]  # + row * D
        pk_rows = prev_kv_ptr + slot * M * D + dd[None, :]

        # pass 1: the column max of the gate logits over all pooled rows
        mx = fg
        if OVERLAP:
            for r0 in range(0, M, BLOCK_R):
                rows = r0 + rr
                msk = (rows < M)[:, None] & d_ok[None, :]
                g = tl.load(p_rows + rows[:, None] * D, mask=msk, other=float("-inf"))
                mx = tl.maximum(mx, tl.max(g, axis=0))
        for r0 in range(0, M - 1, BLOCK_R):
            rows = r0 + rr
            msk = (rows < M - 1)[:, None] & d_ok[None, :]
            g = tl.load(b_rows + rows[:, None] * CD, mask=msk, other=float("-inf"))
            mx = tl.maximum(mx, tl.max(g, axis=0))
        # pass 2: softmax denominator and the weighted sum (pooled = num / den)
        ef = tl.exp(fg - mx)
        den = ef
        num = fk * ef
        if OVERLAP:
            for r0 in range(0, M, BLOCK_R):
                rows = r0 + rr
                msk = (rows < M)[:, None] & d_ok[None, :]
                g = tl.load(p_rows + rows[:, None] * D, mask=msk, other=float("-inf"))
                k = tl.load(pk_rows + rows[:, None] * D, mask=msk, other=0.0)
                e = tl.exp(g - mx[None, :])
                den += tl.sum(e, axis=0)
                num += tl.sum(k * e, axis=0)
        for r0 in range(0, M - 1, BLOCK_R):
            rows = r0 + rr
            msk = (rows < M - 1)[:, None] & d_ok[None, :]
            g = tl.load(b_rows + rows[:, None] * CD, mask=msk, other=float("-inf"))
            k = tl.load(bk_rows + rows[:, None] * CD, mask=msk, other=0.0)
            e = tl.exp(g - mx[None, :])
            den += tl.sum(e, axis=0)
            num += tl.sum(k * e, axis=0)
        pooled = tl.where(d_ok, tl.div_rn(num, den), 0.0)  # [BLOCK_D] fp32

        if OVERLAP:
            # This block's A half becomes prev, after every thread has read the old one.
            tl.debug_barrier()
            pd = slot * M * D + dd[None, :]
            for r0 in range(0, M - 1, BLOCK_R):
                rows = r0 + rr
                msk = (rows < M - 1)[:, None] & d_ok[None, :]
                src = slot * M * CD + rows[:, None] * CD + dd[None, :]
                dst = pd + rows[:, None] * D
                tl.store(prev_kv_ptr + dst, tl.load(buf_kv_ptr + src, mask=msk), mask=msk)
                tl.store(prev_gate_ptr + dst, tl.load(buf_gate_ptr + src, mask=msk), mask=msk)
            # row M - 1: the token's A half, from the inputs
            last = slot * M * D + (M - 1) * D + dd
            a_k = tl.load(kv_ptr + dd, mask=d_ok)
            a_g = tl.load(gate_ptr + dd, mask=d_ok) + tl.load(
                ape_ptr + (M - 1) * CD + dd, mask=d_ok
            )
            tl.store(prev_kv_ptr + last, a_k, mask=d_ok)
            tl.store(prev_gate_ptr + last, a_g, mask=d_ok)

        # --- the entry: rms_norm, RoPE, rounding ---
        x = _round_to(pooled, ACT)
        w = tl.load(norm_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
        y = _rms_norm(x, w, eps, D, ACT)
        first = (pos // M) * M  # RoPE at the block's first position
        y = _rope(y, cos_ptr, sin_ptr, first, rope_stride, D, P, ACT, BLOCK_D)

        out_row = cache_ptr + (tl.load(row0_ptr) + pos // M) * cache_stride
        if POST_INDEX and QUANT:
            # y · H in BLOCK_J-column steps, each step one E2M1 block (a tail block when D is
            # smaller than BLOCK_J: its masked columns are 0 and do not change the amax)
            for j0 in range(0, D, BLOCK_J):
                jj = j0 + tl.arange(0, BLOCK_J)
                j_ok = jj < D
                h = tl.load(
                    h_ptr + dd[:, None] * D + jj[None, :],
                    mask=d_ok[:, None] & j_ok[None, :],
                    other=0.0,
                )
                z = _round_to(tl.sum(y[:, None] * h, axis=0), ACT)  # [BLOCK_J]
                sc, sc_inv = _ue8m0_scale(tl.max(tl.abs(z), axis=0), _E2M1_FLOOR, _E2M1_MAX)
                z = _round_to(_round_to(_e2m1_qdq(z, sc, sc_inv), ACT), OUT)
                tl.store(out_row + jj, z.to(cache_ptr.dtype.element_ty), mask=j_ok)
        else:
            if QUANT and not POST_INDEX:
                y = _fp8_nope(y, dd, NOPE, ACT, HW_FP8, BLOCK_D, KVB)
            y = _round_to(y, OUT)
            tl.store(out_row + dd, y.to(cache_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _new_key_kernel(
    kva_ptr,  # [D] the token's key projection (unit stride), activation dtype
    w_ptr,  # [D] kv_norm weight
    cos_ptr,  # [max_pos, P] fp32, unit column stride, rows at rope_stride
    sin_ptr,
    rope_stride,
    pos_ptr,  # [1] int64
    keys_ptr,  # [rows, D] activation dtype, unit column stride, rows at keys_stride
    keys_stride,
    row_ptr,  # [1] int64: the ring row to write
    eps,
    D: tl.constexpr,
    NOPE: tl.constexpr,
    P: tl.constexpr,
    QUANT: tl.constexpr,
    ACT: tl.constexpr,  # activation dtype code (_round_to); keys have the same dtype
    HW_FP8: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= D, a power of two, >= KVB
    KVB: tl.constexpr,
):
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    # Masked channels are 0 in x and w: they add nothing to the norm's sum and stay 0.
    x = tl.load(kva_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)  # exact: already ACT values
    w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
    y = _rms_norm(x, w, eps, D, ACT)
    y = _rope(y, cos_ptr, sin_ptr, tl.load(pos_ptr), rope_stride, D, P, ACT, BLOCK_D)
    if QUANT:
        y = _fp8_nope(y, dd, NOPE, ACT, HW_FP8, BLOCK_D, KVB)
    # y holds values of the keys' dtype already, so this cast is exact (the interpreter's too)
    out_row = keys_ptr + tl.load(row_ptr) * keys_stride
    tl.store(out_row + dd, y.to(keys_ptr.dtype.element_ty), mask=d_ok)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def compress_decode(
    kv: torch.Tensor,
    gate: torch.Tensor,
    ape: torch.Tensor,
    pos: torch.Tensor,
    slot: torch.Tensor,
    buf_kv: torch.Tensor,
    buf_gate: torch.Tensor,
    prev_kv: torch.Tensor,
    prev_gate: torch.Tensor,
    cache: torch.Tensor,
    cache_row0: torch.Tensor,
    norm_w: torch.Tensor,
    cos_t: torch.Tensor,
    sin_t: torch.Tensor,
    hmat: torch.Tensor | None,
    *,
    m: int,
    overlap: bool,
    eps: float,
    post: str,
    nope: int,
    quant_sim: bool,
    dtype: torch.dtype,
) -> None:
    """compress_decode_ref in one launch (arguments as there), in place; no host sync, no
    allocation: CUDA-graph capturable.

    Only a step that completes its block (pos mod m == m - 1, decided on the device) pools,
    writes the entry at cache row cache_row0 + pos // m and moves the overlap half; the others
    write the two buffer rows only, so the cache row of a block in progress is unspecified until
    its block completes (the engine masks it). pos must index cos_t / sin_t (pos < max_pos) and
    slot the arena; both stay on the device, so they are not checked here."""
    name = "compress_decode"
    require_triton(name)
    if post not in ("kv", "index"):
        raise ValueError(f"{name}: post must be 'kv' or 'index', got {post!r}")
    if dtype not in _ACT_DTYPES:
        raise TypeError(f"{name}: dtype must be one of {[str(t) for t in _ACT_DTYPES]}")
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"{name}: m must be a positive int, got {m!r}")
    f32 = (torch.float32,)
    i64 = (torch.int64,)
    check_tensor(f"{name}: cache", cache, dtypes=_ACT_DTYPES, contiguous=False)
    if cache.dim() != 2 or cache.stride(1) != 1:
        raise ValueError(f"{name}: cache must be [rows, d] with unit column stride")
    d = cache.shape[1]
    cd = (2 if overlap else 1) * d
    dev = cache.device
    check_tensor(f"{name}: kv", kv, shape=(1, cd), dtypes=f32, device=dev)
    check_tensor(f"{name}: gate", gate, shape=(1, cd), dtypes=f32, device=dev)
    check_tensor(f"{name}: ape", ape, shape=(m, cd), dtypes=f32, device=dev)
    for nm, t in (("pos", pos), ("slot", slot), ("cache_row0", cache_row0)):
        check_tensor(f"{name}: {nm}", t, shape=(1,), dtypes=i64, device=dev)
    check_tensor(f"{name}: buf_kv", buf_kv, shape=(None, m, cd), dtypes=f32, device=dev)
    n_slots = buf_kv.shape[0]
    check_tensor(f"{name}: buf_gate", buf_gate, shape=(n_slots, m, cd), dtypes=f32, device=dev)
    check_tensor(f"{name}: prev_kv", prev_kv, shape=(n_slots, m, d), dtypes=f32, device=dev)
    check_tensor(f"{name}: prev_gate", prev_gate, shape=(n_slots, m, d), dtypes=f32, device=dev)
    check_tensor(f"{name}: norm_w", norm_w, shape=(d,), dtypes=_ACT_DTYPES, device=dev)
    check_tensor(f"{name}: cos_t", cos_t, dtypes=f32, contiguous=False, device=dev)
    if cos_t.dim() != 2 or cos_t.stride(1) != 1:
        raise ValueError(f"{name}: cos_t must be [max_pos, P] with unit column stride")
    p = cos_t.shape[1]
    check_tensor(f"{name}: sin_t", sin_t, shape=tuple(cos_t.shape), dtypes=f32, contiguous=False,
                 device=dev)  # fmt: skip
    if sin_t.stride() != cos_t.stride():
        raise ValueError(f"{name}: sin_t must have cos_t's strides")
    if d % 2 or 2 * p > d:
        raise ValueError(f"{name}: d = {d} must be even and hold the {2 * p} rotated channels")
    if post == "kv" and not 0 <= nope <= d:
        raise ValueError(f"{name}: nope = {nope} must be within the entry width {d}")
    if post == "index":
        nope = 0  # (the keys' nope width does not apply to the indexer's entries)
    use_h = post == "index" and quant_sim
    if use_h:
        check_tensor(f"{name}: hmat", hmat, shape=(d, d), dtypes=f32, device=dev)
    block_d = max(KV_BLOCK, triton.next_power_of_2(d))
    # Pooled-row tiles of ~4K (small m: 4 warps) or ~8K values (HCA's m = 128: 8 warps, more
    # loads in flight for its 512 KB read once per block).
    big = m > 8
    block_r = min(triton.next_power_of_2(m), max(1, (8192 if big else 4096) // block_d))
    _compress_decode_kernel[(1,)](
        kv, gate, ape, pos, slot, buf_kv, buf_gate, prev_kv, prev_gate,
        cache, cache.stride(0), cache_row0, norm_w, cos_t, sin_t, cos_t.stride(0),
        hmat if use_h else kv, float(eps),
        M=m, D=d, CD=cd, OVERLAP=bool(overlap), NOPE=nope, P=p, POST_INDEX=post == "index",
        QUANT=bool(quant_sim), ACT=_DTYPE_CODE[dtype], OUT=_DTYPE_CODE[cache.dtype],
        HW_FP8=not interpreting(), BLOCK_CD=triton.next_power_of_2(cd), BLOCK_D=block_d,
        BLOCK_R=block_r, BLOCK_J=INDEX_BLOCK, KVB=KV_BLOCK,
        num_warps=8 if big else 4, enable_fp_fusion=False,
    )  # fmt: skip


def new_key(
    kva: torch.Tensor,
    kv_w: torch.Tensor,
    cos_t: torch.Tensor,
    sin_t: torch.Tensor,
    pos: torch.Tensor,
    keys: torch.Tensor,
    ring_row: torch.Tensor,
    *,
    eps: float,
    nope: int,
    quant_sim: bool,
) -> None:
    """new_key_ref in one launch (arguments as there), in place: writes row ring_row of keys
    and nothing else. No host sync, no allocation: CUDA-graph capturable, pos and ring_row read
    on the device (so not checked here: pos must index cos_t / sin_t and ring_row keys)."""
    name = "new_key"
    require_triton(name)
    check_tensor(f"{name}: kva", kva, dtypes=_ACT_DTYPES, contiguous=False)
    if kva.dim() != 2 or kva.shape[0] != 1 or kva.stride(1) != 1:
        raise ValueError(
            f"{name}: kva must be [1, Dh] with unit column stride, got shape "
            f"{list(kva.shape)}, strides {kva.stride()}"
        )
    d = kva.shape[1]
    if d % 2:
        raise ValueError(f"{name}: kva's width Dh = {d} must be even (RoPE pairs)")
    dev = kva.device
    # The twin's index_copy_ needs the key's dtype (kva's) in keys: no conversion on the store.
    check_tensor(f"{name}: keys", keys, dtypes=(kva.dtype,), contiguous=False, device=dev)
    if keys.dim() != 2 or keys.shape[1] != d or keys.stride(1) != 1:
        raise ValueError(
            f"{name}: keys must be [rows, {d}] (kva's width) with unit column stride, got "
            f"shape {list(keys.shape)}, strides {keys.stride()}"
        )
    check_tensor(f"{name}: kv_w", kv_w, shape=(d,), dtypes=_ACT_DTYPES, device=dev)
    check_tensor(f"{name}: cos_t", cos_t, dtypes=(torch.float32,), contiguous=False, device=dev)
    if cos_t.dim() != 2 or cos_t.stride(1) != 1:
        raise ValueError(f"{name}: cos_t must be [max_pos, P] with unit column stride")
    p = cos_t.shape[1]
    if 2 * p > d:
        raise ValueError(f"{name}: cos_t's {p} pairs rotate {2 * p} channels, more than Dh = {d}")
    check_tensor(f"{name}: sin_t", sin_t, shape=tuple(cos_t.shape), dtypes=(torch.float32,),
                 contiguous=False, device=dev)  # fmt: skip
    if sin_t.stride() != cos_t.stride():
        raise ValueError(f"{name}: sin_t must have cos_t's strides")
    for nm, t in (("pos", pos), ("ring_row", ring_row)):
        check_tensor(f"{name}: {nm}", t, shape=(1,), dtypes=(torch.int64,), device=dev)
    if not isinstance(nope, int) or not 0 <= nope <= d:
        raise ValueError(f"{name}: nope = {nope!r} must be an int within the key width {d}")
    block_d = max(KV_BLOCK, triton.next_power_of_2(d))
    _new_key_kernel[(1,)](
        kva, kv_w, cos_t, sin_t, cos_t.stride(0), pos, keys, keys.stride(0), ring_row,
        float(eps), D=d, NOPE=nope, P=p, QUANT=bool(quant_sim), ACT=_DTYPE_CODE[kva.dtype],
        HW_FP8=not interpreting(), BLOCK_D=block_d, KVB=KV_BLOCK,
        # Dh = 512: 4 values a thread; the tiny model's 32 fit one warp
        num_warps=max(1, min(4, block_d // 128)), enable_fp_fusion=False,
    )  # fmt: skip
