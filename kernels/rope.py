"""Per-head RMS and RoPE over attention heads in one pass (v4-architecture.md §3.3).

Letters: T tokens, H heads, Dh head dim, d_r the rotated (last) channels, P = d_r / 2 pairs.

    head_rms_rope: y = x * bf(1/sqrt(mean(x^2) + eps)) per (token, head) row (unweighted RMS,
                   rounded to x's dtype as the model's torch code rounds it), then the last d_r
                   channels rotated in interleaved pairs: (a, b) -> (a cos - b sin, a sin + b cos)
                   in fp32. The query path: q [T, H, Dh] -> a new contiguous tensor.
    rope_heads_:   the rotation alone, in place (the attention output's inverse RoPE: pass -sin).

In torch each of these is ~10 passes over the tensor (upcast, square, mean, scale, slice, stack,
cat); at a 4K prefill's q (T x 64 x 512 bf16 = 268 MB) that is ~1 ms a layer, against ~0.15 ms
for one read and one write. The rotation in place touches the d_r channels only.
"""

from __future__ import annotations

import torch

from ._formats import check_tensor, require_triton, tl, triton

__all__ = ["head_rms_rope", "head_rms_rope_ref", "rope_heads_", "rope_heads_ref", "rope_ref"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, the model's definition (v4-architecture.md §3.3): the interleaved pairs of the last
    2·cos.shape[-1] channels rotated in fp32 -> a new tensor in x's dtype. cos/sin broadcast
    against x[..., :pairs]: [T, P] for [T, Dh], [T, 1, P] for [T, H, Dh]. Pass -sin for the
    inverse rotation."""
    dr = cos.shape[-1] * 2
    nope, rope = x[..., :-dr], x[..., -dr:].float().unflatten(-1, (-1, 2))
    a, b = rope[..., 0], rope[..., 1]
    rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((nope, rot.to(x.dtype)), dim=-1)


def rope_heads_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, Dh] with its last 2·P channels rotated by cos/sin [T, P] (fp32 math) -> a new
    tensor in x's dtype."""
    return rope_ref(x, cos[:, None, :], sin[:, None, :])


def head_rms_rope_ref(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    """x [T, H, Dh] -> per-row unweighted RMS (the scale rounded to x's dtype), then RoPE."""
    y = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
    return rope_heads_ref(y, cos, sin)


@triton.jit
def _head_rms_rope_kernel(
    x_ptr,  # [T, H, Dh]: heads and channels contiguous, tokens at stride_xt
    out_ptr,  # [T, H, Dh] contiguous (may be x itself when not NORM)
    cos_ptr,  # [T, P] fp32, tokens at stride_ct (ROWS: a table, row rows_ptr[t] for token t)
    sin_ptr,
    rows_ptr,  # ROWS: [T] int64 table rows (the tokens' positions)
    H,
    DH,
    P,
    stride_xt,
    stride_ct,
    eps,
    NORM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= Dh, a power of two
    BLOCK_P: tl.constexpr,  # >= P, a power of two
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    x_row = x_ptr + t.to(tl.int64) * stride_xt + heads[:, None] * DH  # [BLOCK_H, 1]
    o_row = out_ptr + (t.to(tl.int64) * H + heads[:, None]) * DH
    nope = DH - 2 * P
    if NORM:
        dd = tl.arange(0, BLOCK_D)
        m = h_ok[:, None] & (dd[None, :] < DH)
        x = tl.load(x_row + dd[None, :], mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / DH + eps)
        # the scale in x's dtype, the product rounded to it: as `x * r.to(x.dtype)` in torch
        r = r.to(out_ptr.dtype.element_ty).to(tl.float32)
        y = (x * r[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(o_row + dd[None, :], y, mask=m & (dd[None, :] < nope))
    pp = tl.arange(0, BLOCK_P)
    pm = h_ok[:, None] & (pp[None, :] < P)
    a = tl.load(x_row + nope + 2 * pp[None, :], mask=pm, other=0.0).to(tl.float32)
    b = tl.load(x_row + nope + 2 * pp[None, :] + 1, mask=pm, other=0.0).to(tl.float32)
    if NORM:
        a = (a * r[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
        b = (b * r[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    crow = tl.load(rows_ptr + t) if ROWS else t.to(tl.int64)
    c = tl.load(cos_ptr + crow * stride_ct + pp, mask=pp < P, other=0.0)[None, :]
    s = tl.load(sin_ptr + crow * stride_ct + pp, mask=pp < P, other=0.0)[None, :]
    ra = a * c - b * s
    rb = a * s + b * c
    tl.store(o_row + nope + 2 * pp[None, :], ra.to(out_ptr.dtype.element_ty), mask=pm)
    tl.store(o_row + nope + 2 * pp[None, :] + 1, rb.to(out_ptr.dtype.element_ty), mask=pm)


def _launch(x, out, cos, sin, eps, norm, name, rows=None):
    require_triton(name)
    check_tensor(f"{name}: x", x, dtypes=_DTYPES, contiguous=False)
    if x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        raise ValueError(f"{name}: x must be [T, H, Dh] with heads and channels contiguous")
    t, h, dh = x.shape
    p = cos.shape[-1]
    if rows is not None:
        check_tensor(f"{name}: rows", rows, shape=(t,), dtypes=(torch.int64,), device=x.device)
    for nm, tab in (("cos", cos), ("sin", sin)):
        check_tensor(
            f"{name}: {nm}", tab, shape=(t if rows is None else None, p),
            dtypes=(torch.float32,), contiguous=False, device=x.device,
        )  # fmt: skip
        if tab.stride(1) != 1:
            raise ValueError(f"{name}: {nm} must have unit column stride")
    if cos.stride(0) != sin.stride(0):
        raise ValueError(f"{name}: cos and sin must share their row stride")
    if 2 * p > dh:
        raise ValueError(f"{name}: {2 * p} rotated channels exceed the head dim {dh}")
    check_tensor(f"{name}: out", out, shape=(t, h, dh), dtypes=(x.dtype,), device=x.device)
    if t == 0:
        return out
    bh = 4
    _head_rms_rope_kernel[(t, triton.cdiv(h, bh))](
        x, out, cos, sin, cos if rows is None else rows, h, dh, p, x.stride(0), cos.stride(0),
        float(eps), NORM=norm, ROWS=rows is not None, BLOCK_H=bh,
        BLOCK_D=triton.next_power_of_2(dh), BLOCK_P=triton.next_power_of_2(max(p, 1)), num_warps=4,
    )  # fmt: skip
    return out


def head_rms_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The query path (see the module docstring): x [T, H, Dh] (tokens may be strided, e.g. the
    column slice of a fused projection), cos/sin [T, P] fp32 -> a new contiguous tensor. rows:
    [T] int64 rows of cos/sin (then whole tables) for the tokens, read on the device (decode:
    the position, without a gather launch of its own)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _launch(x, out, cos, sin, eps, True, "head_rms_rope", rows)


def rope_heads_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2·P channels of every head of x [T, H, Dh] (contiguous) in place."""
    check_tensor("rope_heads_: x", x, dtypes=_DTYPES)
    return _launch(x, x, cos, sin, 0.0, False, "rope_heads_")
