"""Small fp32-output products of bf16 operands: y [T, N] = x [T, K] . w [N, K]^T in fp32.

The decode step's unquantised ("plain") products: the MoE router gate (N = 256), the attention
compressors' wkv / wgate (N = 512 or 1024), the indexer compressor (N = 256) and the indexer's
weights_proj (N = 64), all with K = 4096 and T = 1..4 tokens. cuBLAS runs these as a split-K
GEMM plus a separate reduce kernel: two launches, ~6 us a call on an H200, ~4 calls a layer.
This kernel does the product in one launch, bound by reading the weight (2 MB for N = 256).

Numerics: bf16 x bf16 products are exact in fp32, and every sum is an fp32 FMA chain, so the
result equals `x.float() @ w.float().T` (`gemv_f32_ref`) up to fp32 summation order. That order
is fixed (no atomics, no split-K race): two calls, or a CUDA-graph replay and the eager run, give
the same bits. It also depends on K alone (_gemv_tiles), so a row of the result has the same bits
whatever T and N are: a token alone or in an MTP batch, a weight alone or stacked with others.

Design (memory bound at T <= 8):

- Grid: one program per BLOCK_N weight rows, each owning the whole K (no split-K: partial sums
  across programs would need a second launch, or atomics, whose order is not fixed). BLOCK_N is
  small (1..8) so that even N = 256 gives ~2 programs per SM (_gemv_tiles).
- Each step loads a [BLOCK_N, BLOCK_K] weight tile, 8 consecutive inputs (16 bytes) a lane,
  lanes and warps along K (a warp reads 512 contiguous bytes of a row per load), and each
  token's [BLOCK_K] inputs in the same layout (so the broadcast over the tile's rows moves no
  data). A lane multiplies its 8 weights with its 8 inputs in an fp32 FMA chain (`_fma8`) into
  an accumulator [BLOCK_N, BLOCK_K / 8] per token; lanes are summed once, after the K loop.
  BLOCK_K is up to 4096: at K = 4096 a program loads its whole rows in one step, all its loads
  in flight together (one DRAM round trip; these products are too small to be anything but
  latency bound).
- No tl.dot: a dot needs >= 16 rows of x (T is 1..8) and would run bf16 tensor-core MMAs; nor a
  `sum(a[:, :, None] * b[None, :, :])` form, which the compiler may turn into a (TF32) dot.
  The FMA chain is plain elementwise math on 2D tiles.
- Tokens: TB = next_pow2(T) (at most 8) accumulators side by side, each weight tile used for all
  of them; T > 8 takes ceil(T / 8) passes over the weights (not the decode case). Token rows past
  T repeat the last token (valid memory) and are not stored.
"""

from __future__ import annotations

import torch

from ._formats import _fma8, check_tensor, require_triton, tl, triton

__all__ = ["GEMV_MAX_T", "gemv_f32", "gemv_f32_ref"]

GEMV_MAX_T = 8  # tokens per pass over the weights (accumulators kept side by side)
_DTYPES = (torch.bfloat16, torch.float16)


def gemv_f32_ref(
    x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Numerical definition: y [T, N] = x.float() [T, K] @ w.float() [N, K]^T, fp32 (into out
    when given)."""
    y = x.float() @ w.float().T
    if out is None:
        return y
    out.copy_(y)
    return out


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------


@triton.jit
def _split8(v, C: tl.constexpr):
    """[R, C * 8] -> its elements e = 0..7 of every group of 8 consecutive columns, as 8 tensors
    [R, C]. A lane holds its 8 consecutive inputs, so the reshape and splits stay in registers."""
    v = tl.reshape(v, [v.shape[0], C, 2, 2, 2])  # e = 4 * i + 2 * j + k
    ev, od = tl.split(v)  # k
    e04, e26 = tl.split(ev)  # j
    o15, o37 = tl.split(od)
    v0, v4 = tl.split(e04)  # i
    v2, v6 = tl.split(e26)
    v1, v5 = tl.split(o15)
    v3, v7 = tl.split(o37)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _gemv_tok(acc, w0, w1, w2, w3, w4, w5, w6, w7, xp, kk, k_ok, C: tl.constexpr,
              EVEN_K: tl.constexpr):  # fmt: skip
    """acc [BLOCK_N, C] += the tile's weights (split by _split8) times one token's inputs at xp
    (columns kk [1, BLOCK_K]), each lane an 8-long FMA chain."""
    if EVEN_K:
        xv = tl.load(xp + kk)
    else:
        xv = tl.load(xp + kk, mask=k_ok, other=0.0)
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xv.to(tl.float32), C)
    return _fma8(acc, w0, w1, w2, w3, w4, w5, w6, w7, x0, x1, x2, x3, x4, x5, x6, x7)


@triton.jit
def _gemv_store(acc, t, T, rows, n_ok, out_ptr, stride_ot):
    """Token t's row sums (acc [BLOCK_N, C], one lane sum per element) -> out[t, rows]."""
    y = tl.sum(acc, axis=1)  # [BLOCK_N]: the cross-lane (and cross-warp) sum, once
    tl.store(out_ptr + t * stride_ot + rows, y, mask=n_ok & (rows * 0 + t < T))


@triton.jit
def _gemv_f32_kernel(
    x_ptr,  # [T, K] bf16/fp16, row stride stride_xt, unit column stride
    w_ptr,  # [N, K] same dtype, contiguous
    out_ptr,  # [T, N] fp32, row stride stride_ot, unit column stride
    T,
    N,
    K,
    stride_xt,
    stride_ot,
    TB: tl.constexpr,  # tokens per pass: a power of two <= GEMV_MAX_T
    BLOCK_N: tl.constexpr,  # weight rows per program (power of two)
    BLOCK_K: tl.constexpr,  # inputs per step (power of two, >= 8)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the loop
):
    C: tl.constexpr = BLOCK_K // 8  # 8-input groups per row and step (one lane's 16 bytes)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < N
    # Ragged N: the rows past N load row N-1 (valid memory) and store nothing.
    wrow = tl.minimum(rows, N - 1).to(tl.int64)[:, None] * K  # [BLOCK_N, 1]
    kk = tl.arange(0, BLOCK_K)[None, :]  # [1, BLOCK_K]
    for c in range(0, T, TB):
        # Token rows of this pass; those past T read the last token and are not stored.
        x0p = x_ptr + tl.minimum(c, T - 1).to(tl.int64) * stride_xt
        x1p = x_ptr + tl.minimum(c + 1, T - 1).to(tl.int64) * stride_xt
        x2p = x_ptr + tl.minimum(c + 2, T - 1).to(tl.int64) * stride_xt
        x3p = x_ptr + tl.minimum(c + 3, T - 1).to(tl.int64) * stride_xt
        x4p = x_ptr + tl.minimum(c + 4, T - 1).to(tl.int64) * stride_xt
        x5p = x_ptr + tl.minimum(c + 5, T - 1).to(tl.int64) * stride_xt
        x6p = x_ptr + tl.minimum(c + 6, T - 1).to(tl.int64) * stride_xt
        x7p = x_ptr + tl.minimum(c + 7, T - 1).to(tl.int64) * stride_xt
        acc0 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
        acc4 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
        acc5 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
        acc6 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
        acc7 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + kk) < K
            if EVEN_K:
                wv = tl.load(w_ptr + wrow + k0 + kk)
            else:
                wv = tl.load(w_ptr + wrow + k0 + kk, mask=k_ok, other=0.0)
            w0, w1, w2, w3, w4, w5, w6, w7 = _split8(wv.to(tl.float32), C)
            acc0 = _gemv_tok(acc0, w0, w1, w2, w3, w4, w5, w6, w7, x0p + k0, kk, k_ok, C, EVEN_K)
            if TB > 1:
                acc1 = _gemv_tok(acc1, w0, w1, w2, w3, w4, w5, w6, w7, x1p + k0, kk, k_ok, C,
                                 EVEN_K)  # fmt: skip
            if TB > 2:
                acc2 = _gemv_tok(acc2, w0, w1, w2, w3, w4, w5, w6, w7, x2p + k0, kk, k_ok, C,
                                 EVEN_K)  # fmt: skip
                acc3 = _gemv_tok(acc3, w0, w1, w2, w3, w4, w5, w6, w7, x3p + k0, kk, k_ok, C,
                                 EVEN_K)  # fmt: skip
            if TB > 4:
                acc4 = _gemv_tok(acc4, w0, w1, w2, w3, w4, w5, w6, w7, x4p + k0, kk, k_ok, C,
                                 EVEN_K)  # fmt: skip
                acc5 = _gemv_tok(acc5, w0, w1, w2, w3, w4, w5, w6, w7, x5p + k0, kk, k_ok, C,
                                 EVEN_K)  # fmt: skip
                acc6 = _gemv_tok(acc6, w0, w1, w2, w3, w4, w5, w6, w7, x6p + k0, kk, k_ok, C,
                                 EVEN_K)  # fmt: skip
                acc7 = _gemv_tok(acc7, w0, w1, w2, w3, w4, w5, w6, w7, x7p + k0, kk, k_ok, C,
                                 EVEN_K)  # fmt: skip
        _gemv_store(acc0, c, T, rows, n_ok, out_ptr, stride_ot)
        if TB > 1:
            _gemv_store(acc1, c + 1, T, rows, n_ok, out_ptr, stride_ot)
        if TB > 2:
            _gemv_store(acc2, c + 2, T, rows, n_ok, out_ptr, stride_ot)
            _gemv_store(acc3, c + 3, T, rows, n_ok, out_ptr, stride_ot)
        if TB > 4:
            _gemv_store(acc4, c + 4, T, rows, n_ok, out_ptr, stride_ot)
            _gemv_store(acc5, c + 5, T, rows, n_ok, out_ptr, stride_ot)
            _gemv_store(acc6, c + 6, T, rows, n_ok, out_ptr, stride_ot)
            _gemv_store(acc7, c + 7, T, rows, n_ok, out_ptr, stride_ot)


# ------------------------------------------------------------------------------------------------
# Launch planning and launcher
# ------------------------------------------------------------------------------------------------

# Programs the row tiles aim at: ~2 per SM of an H100/H200 (132 SMs), so each SM has two
# programs' loads in flight and the last wave is short.
_TARGET_PROGRAMS = 256
# The widest K step: K = 4096 (every decode product here) is one step, whole rows, so a program
# has all its loads in flight at once (one DRAM round trip, not one per step).
_MAX_BLOCK_K = 4096
# Weight plus input elements (16-bit) one thread loads per step, the register budget that caps
# BLOCK_N: (BLOCK_N + TB) * BLOCK_K / threads. 192 = 96 registers of loaded pairs; with the fp32
# chain accumulators that is at most ~128 registers a thread (ptxas for sm_90 at K = 4096: one
# token 44 / 56 / 110 registers with 1 / 2 / 4 rows, 2 tokens 54-128, 4 tokens x 2 rows 128; 8
# tokens x 2 rows 182, over the budget (see _gemv_tiles), none spill).
_ELEMS_PER_THREAD = 192
_MAX_BLOCK_N = 8


def _gemv_tiles(t: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a [t, k] x [n, k]^T product.

    - BLOCK_K = min(next_pow2(K), 4096) and num_warps = BLOCK_K / 256 (1..4): functions of K
      alone, and with lanes and warps all along K, BLOCK_K and num_warps fix the summation order
      of a row. So row t of the result has the same bits whatever T and N are and whichever tile
      holds the weight row (a token decoded alone or in an MTP batch, the router alone or fused).
      The warps also stay along K at small K (no idle or duplicated lanes), and the inputs' layout
      is the weights' own (see the module docstring).
    - BLOCK_N: the fewest rows that still give ~_TARGET_PROGRAMS programs (N = 256 -> 1 row, 256
      programs; 1024 -> 4 rows), capped by the register budget (_ELEMS_PER_THREAD) and at 8,
      but at least 2 from 4 tokens on: each program reads all of x (T rows, from L2), so with
      one weight row the x bytes would be T times the weight bytes (8 tokens: 2 rows is over
      the budget, 182 registers, still no spills).
    """
    tb = min(triton.next_power_of_2(max(t, 1)), GEMV_MAX_T)
    block_k = max(8, min(triton.next_power_of_2(k), _MAX_BLOCK_K))
    num_warps = max(1, min(4, block_k // 256))
    block_n = triton.next_power_of_2(triton.cdiv(n, _TARGET_PROGRAMS))
    fit = _ELEMS_PER_THREAD * 32 * num_warps // block_k - tb  # rows the budget leaves
    fit = 1 << (max(fit, 1).bit_length() - 1)  # a power of two, at or below
    block_n = min(block_n, fit, _MAX_BLOCK_N)
    if tb >= 4:
        block_n = max(block_n, 2)
    return block_n, block_k, num_warps


def gemv_f32(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [T, N] fp32 = x [T, K] . w [N, K]^T, one launch (see the module docstring).

    x: bf16 or fp16, rows may be strided (unit column stride). w: x's dtype, contiguous.
    out: fp32 [T, N] with unit column stride (allocated when None); every element is written.
    """
    require_triton("gemv_f32")
    check_tensor("gemv_f32: x", x, dtypes=_DTYPES, contiguous=False)
    if x.dim() != 2:
        raise ValueError(f"gemv_f32: x must be [T, K], got {list(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError("gemv_f32: x must have unit column stride")
    t, k = x.shape
    check_tensor("gemv_f32: w", w, dtypes=(x.dtype,), device=x.device)
    if w.dim() != 2 or w.shape[1] != k:
        raise ValueError(f"gemv_f32: w: expected shape [*, {k}] (x is [{t}, {k}]), got "
                         f"{list(w.shape)}")  # fmt: skip
    n = w.shape[0]
    if out is None:
        out = torch.empty((t, n), dtype=torch.float32, device=x.device)
    else:
        check_tensor("gemv_f32: out", out, shape=(t, n), dtypes=(torch.float32,),
                     contiguous=False, device=x.device)  # fmt: skip
        if out.stride(1) != 1:
            raise ValueError("gemv_f32: out must have unit column stride")
    if t == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    block_n, block_k, nw = _gemv_tiles(t, n, k)
    _gemv_f32_kernel[(triton.cdiv(n, block_n),)](
        x, w, out, t, n, k, x.stride(0), out.stride(0),
        TB=min(triton.next_power_of_2(t), GEMV_MAX_T), BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=nw, num_stages=1,
    )  # fmt: skip
    return out
