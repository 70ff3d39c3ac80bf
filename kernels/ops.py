"""Device dispatch: one function per op. CUDA tensors (with triton installed) go to the Triton
launcher; anything else (CPU engine, tests, CI) runs the plain-torch `_ref` twin. Same signatures
and results (up to fp32 summation order), so the engine calls these and never branches itself.

Every op takes `triton=`: None (default) decides by device, False forces the twin.
`out=` buffers are honoured on both paths (the twin copies its result in), so code written for the
GPU's static buffers runs unchanged on CPU. Workspaces are only used by the Triton path.
"""

from __future__ import annotations

import torch

from . import compress as _compress
from . import fp4_experts as _fp4
from . import fp8_linear as _fp8
from . import gemv as _gemv
from . import handoff as _handoff
from . import indexer as _idx
from . import mhc as _mhc
from . import rope as _rope
from . import router as _router
from . import sparse_attn as _attn
from ._formats import HAS_TRITON, interpreting

__all__ = [
    "await_copy",
    "compress_decode",
    "fp4_experts",
    "fp8_linear",
    "gemv_f32",
    "head_rms_rope",
    "indexer_topk",
    "mhc_head",
    "mhc_post",
    "mhc_pre",
    "new_key",
    "rope_heads_",
    "route",
    "sparse_attn",
    "use_triton",
]


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` should go to a Triton kernel: a CUDA tensor, with triton importable and not
    in interpreter mode. CPU tensors always take the twin, even under TRITON_INTERPRET=1 (the
    kernel tests set it for the whole pytest session; they call the launchers directly)."""
    return HAS_TRITON and t.device.type == "cuda" and not interpreting()


def _pick(triton: bool | None, t: torch.Tensor) -> bool:
    """`triton=None` decides by device (use_triton); False forces the twin (reference runs on
    CUDA); True insists on the kernel."""
    return use_triton(t) if triton is None else triton


def _into(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if out is None:
        return value
    out.copy_(value)
    return out


def head_rms_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    *,
    rows: torch.Tensor | None = None,
    triton: bool | None = None,
) -> torch.Tensor:
    """The query path: per-head unweighted RMS, then RoPE on the last channels: x [T, H, Dh],
    cos/sin [T, P] fp32 -> a new contiguous [T, H, Dh] (kernels/rope.py). rows: [T] int64, the
    rows of cos/sin (whole tables then) the tokens take, read on the device."""
    if _pick(triton, x):
        return _rope.head_rms_rope(x, cos, sin, eps, rows)
    if rows is not None:
        cos, sin = cos[rows], sin[rows]
    return _rope.head_rms_rope_ref(x, cos, sin, eps)


def rope_heads_(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, triton: bool | None = None
) -> torch.Tensor:
    """RoPE on the last 2·P channels of every head of x [T, H, Dh], in place (pass -sin for the
    inverse rotation) -> x."""
    if _pick(triton, x):
        return _rope.rope_heads_(x, cos, sin)
    return _into(x, _rope.rope_heads_ref(x, cos, sin))


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    act_quant: bool = False,
    groups: int = 1,
    workspace: _fp8.Fp8LinearWorkspace | None = None,
    triton: bool | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] . W^T, W e4m3fn [N, K] with 128x128 block scale (E8M0 or fp32).
    groups = G > 1: block diagonal, x [M, G*K], W [G*R, K], y[:, gR:(g+1)R] from x[:, gK:(g+1)K]."""
    aq = dict(act_quant=act_quant, groups=groups)
    if _pick(triton, x):
        return _fp8.fp8_linear(x, w, w_scale, out=out, workspace=workspace, **aq)
    out_dtype = out.dtype if out is not None else None
    return _into(out, _fp8.fp8_linear_ref(x, w, w_scale, out_dtype=out_dtype, **aq))


def gemv_f32(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    triton: bool | None = None,
) -> torch.Tensor:
    """y [T, N] fp32 = x [T, K] . w [N, K]^T for bf16/fp16 x and w, in fp32 (kernels/gemv.py:
    one launch, sized for decode's few tokens)."""
    if _pick(triton, x):
        return _gemv.gemv_f32(x, w, out=out)
    return _gemv.gemv_f32_ref(x, w, out=out)


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
    workspace: _fp4.Fp4ExpertsWorkspace | None = None,
    triton: bool | None = None,
) -> torch.Tensor:
    """Routed experts from the FP4 slot pool: out [M, D] = shared_out + sum_k expert(slots[m, k]).
    M <= 16 takes the decode kernels, larger M the grouped (prefill) kernels."""
    args = (x, slots, route_w, shared_out, w13_q, w13_s, w2_q, w2_s, swiglu_limit)
    if _pick(triton, x):
        if x.shape[0] <= _fp4.DECODE_MAX_M:
            return _fp4.fp4_experts(*args, out=out, act_quant=act_quant, workspace=workspace)
        return _fp4.fp4_experts_grouped(*args, out=out, act_quant=act_quant)
    out_dtype = out.dtype if out is not None else None
    return _into(out, _fp4.fp4_experts_ref(*args, act_quant=act_quant, out_dtype=out_dtype))


def await_copy(
    flag: torch.Tensor, expected: int, src: torch.Tensor, dst: torch.Tensor, *,
    triton: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """dst <- src once flag [1] int32 == expected, waited for on dst's stream (CUDA: by a kernel,
    the host goes on; flag and src are device views of pinned memory)."""
    if _pick(triton, dst):
        return _handoff.await_copy(flag, expected, src, dst)
    return _handoff.await_copy_ref(flag, expected, src, dst)


def sparse_attn(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    workspace: _attn.SparseAttnWorkspace | None = None,
    triton: bool | None = None,
) -> torch.Tensor:
    """o [T, H, Dh]: attention of q over kv rows idx [T, L] (-1 masked) with a per-head sink."""
    if _pick(triton, q):
        return _attn.sparse_attn(q, kv, idx, sink, scale, out=out, workspace=workspace)
    return _into(out, _attn.sparse_attn_ref(q, kv, idx, sink, scale))


def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    n_valid: torch.Tensor,
    topk: int = 512,
    *,
    out: torch.Tensor | None = None,
    workspace: _idx.IndexerWorkspace | None = None,
    n_keys: int | None = None,
    k_row0: torch.Tensor | None = None,
    triton: bool | None = None,
) -> torch.Tensor:
    """idx [T, topk] int32: best indexer entries per token (-1 = none); ties -> lower index.
    k_row0 (device int [1]): rank the n_keys rows of k from k_row0 on instead of all of k."""
    rows = dict(n_keys=n_keys, k_row0=k_row0)
    if _pick(triton, q):
        return _idx.indexer_topk(q, k, w, n_valid, topk, out=out, workspace=workspace, **rows)
    return _into(out, _idx.indexer_topk_ref(q, k, w, n_valid, topk, **rows))


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
    workspace: _mhc.MhcWorkspace | None = None,
    triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre: x [T, 4, D] -> (y [T, D], post [T, 4] fp32, comb [T, 4, 4] fp32)."""
    if _pick(triton, x):
        return _mhc.mhc_pre(
            x, fn, scale, base, hc_eps=hc_eps, iters=iters, norm_eps=norm_eps,
            y=y, post=post, comb=comb, workspace=workspace,
        )  # fmt: skip
    ry, rp, rc = _mhc.mhc_pre_ref(x, fn, scale, base, hc_eps=hc_eps, iters=iters, norm_eps=norm_eps)
    return _into(y, ry), _into(post, rp), _into(comb, rc)


def mhc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    *,
    hc_eps: float = 1e-6,
    norm_eps: float = 1e-6,
    y: torch.Tensor | None = None,
    workspace: _mhc.MhcWorkspace | None = None,
    triton: bool | None = None,
) -> torch.Tensor:
    """mHC head collapse: x [T, 4, D], fn [4, 4D] -> y [T, D]."""
    if _pick(triton, x):
        return _mhc.mhc_head(
            x, fn, scale, base, hc_eps=hc_eps, norm_eps=norm_eps, y=y, workspace=workspace
        )
    return _into(y, _mhc.mhc_head_ref(x, fn, scale, base, hc_eps=hc_eps, norm_eps=norm_eps))


def mhc_post(
    f: torch.Tensor,
    x: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    triton: bool | None = None,
) -> torch.Tensor:
    """mHC post: X'_k = post_k * F + sum_j comb[j, k] * X_j -> [T, 4, D]."""
    if _pick(triton, x):
        return _mhc.mhc_post(f, x, post, comb, out=out)
    return _into(out, _mhc.mhc_post_ref(f, x, post, comb))


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    table: torch.Tensor | None,
    tokens: torch.Tensor | None,
    k: int,
    scale: float,
    *,
    sel_out: torch.Tensor | None = None,
    w_out: torch.Tensor | None = None,
    triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing from the gate's logits [T, E] fp32 -> (ids [T, K] int64, weights [T, K] fp32)
    (kernels/router.py): learned router with bias [E]; hash layer with table [vocab, K] (tid2eid)
    and the tokens [T]. Into sel_out / w_out when given."""
    if _pick(triton, logits):
        return _router.route(logits, bias, table, tokens, k, scale, sel_out=sel_out, w_out=w_out)
    hashed = table[tokens] if table is not None else None
    sel, w = _router.route_ref(logits, bias, hashed, k, scale)
    return _into(sel_out, sel), _into(w_out, w)


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
    triton: bool | None = None,
) -> None:
    """One decode token through one KV compressor after its fp32 projections kv, gate [1, c·d],
    in place: the block buffer rows, and on the step completing a block its entry (cache row
    cache_row0 + pos // m) and the CSA overlap half (kernels/compress.py). The twin also writes
    the entry of a block in progress; the kernel leaves it (masked until complete)."""
    args = (kv, gate, ape, pos, slot, buf_kv, buf_gate, prev_kv, prev_gate, cache, cache_row0,
            norm_w, cos_t, sin_t, hmat)  # fmt: skip
    kw = dict(m=m, overlap=overlap, eps=eps, post=post, nope=nope, quant_sim=quant_sim, dtype=dtype)
    if _pick(triton, kv):
        _compress.compress_decode(*args, **kw)
    else:
        _compress.compress_decode_ref(*args, **kw)


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
    triton: bool | None = None,
) -> None:
    """The decode token's window key, in place: keys[ring_row] = kv_round(rope(rms_norm(kva,
    kv_w), cos_t[pos], sin_t[pos])) for kva [1, Dh], keys [rows, Dh] in kva's dtype, pos and
    ring_row [1] int64 on the device (kernels/compress.py: one launch)."""
    args = (kva, kv_w, cos_t, sin_t, pos, keys, ring_row)
    kw = dict(eps=eps, nope=nope, quant_sim=quant_sim)
    if _pick(triton, kva):
        _compress.new_key(*args, **kw)
    else:
        _compress.new_key_ref(*args, **kw)
