"""MoE routing of a few tokens from the gate's logits in one launch (v4-architecture.md §3.4).

Letters: T tokens, E routed experts, K experts per token.

    score = sqrt(softplus(logits))                      fp32 [T, E]
    ids   = hashed row (hash layers) or top-K of (score + bias), descending (learned router)
    w     = score[ids] / sum(score[ids]) * scale        fp32 [T, K]

`route_ref` is the model's definition (model.route_from_logits). In torch a decode token's routing
is five to six launches (softplus and sqrt, torch.topk's radix select and its sort, the gather,
the normalisation; ~15 us on an H200, 33 of V4-Flash's 36 first layers use the top-k). Here one
program per token holds its E scores in registers and picks the K largest by K rounds of
max-and-mask, which yields them in descending order as torch.topk(sorted=True) does. Equal
scores (torch leaves their order unspecified) go to the lower expert id. softplus is
log1p(exp(x)) below torch's threshold 20 (x itself above it); log1p is computed as
log(u) * e / (u - 1) with u = 1 + e, which keeps its relative precision for small e where log(1 +
e) would not.

Hash layers (`hashed` given): the ids are row ids[t] of the table tid2eid [vocab, K], read on the
device (no host lookup; the token ids are not bounds-checked there: the engine checks them
against the vocabulary first); only the weights are computed.

Rounding: sqrt and the divisions are the correctly rounded ones (torch's), not Triton's fast
defaults, so the scores differ from the twin's only by exp/log's few ulp. A NaN logit makes the
token's weights NaN (torch's result too), instead of disappearing from the selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._formats import check_tensor, require_triton, tl, triton

__all__ = ["route", "route_ref"]


def route_ref(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    hashed: torch.Tensor | None,
    k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 -> (ids [T, K] int64, weights [T, K] fp32); hashed: the hash table's
    rows of the tokens [T, K] (hash layers) or None (top-k of score + bias)."""
    sc = torch.sqrt(F.softplus(logits))
    sel = hashed if hashed is not None else torch.topk(sc + bias, k, dim=-1).indices
    w = sc.gather(1, sel)
    return sel, w / w.sum(-1, keepdim=True) * scale


@triton.jit
def _route_kernel(
    logits_ptr,  # [T, E] fp32, contiguous
    bias_ptr,  # [E] fp32 (learned router)
    table_ptr,  # [vocab, K] int64 tid2eid (hash layers)
    tok_ptr,  # [T] int64 token ids (hash layers)
    sel_ptr,  # [T, K] int64 out
    w_ptr,  # [T, K] fp32 out
    E,
    scale,
    K: tl.constexpr,
    BLOCK_E: tl.constexpr,  # >= E, a power of two
    BLOCK_K: tl.constexpr,  # >= K, a power of two
    HASH: tl.constexpr,
):
    t = tl.program_id(0)
    ee = tl.arange(0, BLOCK_E)
    e_ok = ee < E
    x = tl.load(logits_ptr + t * E + ee, mask=e_ok, other=0.0)
    # softplus with torch's threshold; log1p(e) as log(u) * e / (u - 1) (exact where u == 1)
    ex = tl.exp(tl.minimum(x, 20.0))  # (the exp of an x past the threshold is not used)
    u = 1.0 + ex
    one = u == 1.0
    lp = tl.where(one, ex, tl.log(u) * tl.div_rn(ex, tl.where(one, 1.0, u - 1.0)))
    sc = tl.sqrt_rn(tl.where(x > 20.0, x, lp))
    # A NaN logit (min() above drops it) makes every weight NaN, as in torch, not a hidden pick.
    nan = tl.sum(tl.where(e_ok & (x != x), x, 0.0), axis=0)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    if HASH:
        tok = tl.load(tok_ptr + t)
        sel = tl.load(table_ptr + tok * K + kk, mask=k_ok, other=0)
        w = tl.sum(tl.where((ee[None, :] == sel[:, None]) & e_ok[None, :], sc[None, :], 0.0), 1)
    else:
        s = tl.where(e_ok, sc + tl.load(bias_ptr + ee, mask=e_ok, other=0.0), float("-inf"))
        sel = tl.zeros([BLOCK_K], dtype=tl.int64)
        w = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in tl.static_range(K):
            top = tl.max(s, axis=0)
            # the lowest id among equal maxima
            j = tl.min(tl.where(s == top, ee, BLOCK_E), axis=0)
            sel = tl.where(kk == i, j.to(tl.int64), sel)
            w = tl.where(kk == i, tl.sum(tl.where(ee == j, sc, 0.0), axis=0), w)
            s = tl.where(ee == j, float("-inf"), s)
    w = tl.where(k_ok, w, 0.0)
    tl.store(sel_ptr + t * K + kk, sel, mask=k_ok)
    tl.store(w_ptr + t * K + kk, tl.div_rn(w, tl.sum(w, axis=0)) * scale + nan, mask=k_ok)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """route_ref in one launch: logits [T, E] fp32; learned router: bias [E] fp32 (table and
    tokens None); hash layer: table [vocab, K] int64 (tid2eid) and tokens [T] int64 (bias None).
    -> (ids [T, K] int64, weights [T, K] fp32), into sel_out / w_out when given."""
    require_triton("route")
    check_tensor("route: logits", logits, dtypes=(torch.float32,))
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be [T, E], got {list(logits.shape)}")
    t, e = logits.shape
    dev = logits.device
    hashed = table is not None
    if hashed == (bias is not None) or hashed != (tokens is not None):
        raise ValueError("route: give bias (learned router) or table and tokens (hash layer)")
    if hashed:
        check_tensor("route: table", table, shape=(None, k), dtypes=(torch.int64,), device=dev)
        check_tensor("route: tokens", tokens, shape=(t,), dtypes=(torch.int64,), device=dev)
    else:
        check_tensor("route: bias", bias, shape=(e,), dtypes=(torch.float32,), device=dev)
    if not 0 < k <= e:
        raise ValueError(f"route: k must be in 1..{e}, got {k}")
    if sel_out is None:
        sel_out = torch.empty(t, k, dtype=torch.int64, device=dev)
    if w_out is None:
        w_out = torch.empty(t, k, dtype=torch.float32, device=dev)
    check_tensor("route: sel_out", sel_out, shape=(t, k), dtypes=(torch.int64,), device=dev)
    check_tensor("route: w_out", w_out, shape=(t, k), dtypes=(torch.float32,), device=dev)
    if t == 0:
        return sel_out, w_out
    _route_kernel[(t,)](
        logits, bias if bias is not None else logits, table if hashed else sel_out,
        tokens if hashed else sel_out, sel_out, w_out, e, float(scale),
        K=k, BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(k), HASH=hashed,
        num_warps=4 if e > 512 else 2,
    )  # fmt: skip
    return sel_out, w_out
