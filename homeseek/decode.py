"""One decode token (T = 1) in capture-safe form: the math of model.py, shaped for CUDA graphs.

The eager step (model.segment_a) takes the position as a host int and slices, concatenates and
branches on it. Here the position and the session's arena slot are device tensors, every shape is
fixed by the layer and a position *bucket* (a host int that only changes when the sequence grows
past a power of two), and nothing reads a value back to the host. So one captured graph per
(layer, bucket) serves every position in the bucket and every session (docs/runtime.md).

How each data-dependent piece of the eager step becomes static (docs/architecture.md §3.3, §4):

- RoPE rows, the window-ring row `pos % W`, the compressor row `pos % m` and the entry `pos // m`
  are gathered / scattered with index tensors computed from `pos` on the device.
- Keys: the window ring and the main compressed cache are one buffer per layer (state.py), so
  the sparse attention reads rows of one tensor; window rows not yet written (`r > pos` early in a
  sequence) and compressed entries not yet complete (`c >= (pos + 1) // m`) are masked (-1).
- The compressor pools the block in progress every step and writes it at row `pos // m`: the
  entry is masked until its block completes, and the step that completes it writes the final
  value. The CSA overlap half moves with `torch.where(block complete, new, old)`.
- The compressed entries a token can see are bounded by the bucket's capacity `n_c` (the first
  `n_c` rows of the cache): the per-token cost follows the position reached, not max_context.

The eager step's keys are ordered (window, then compressed entries) differently from here (ring
rows), so the attention sums in another order: equal to fp32 rounding, not bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from homeseek import model as M
from homeseek.checkpoint import QWeight
from homeseek.config import CSA, SWA
from homeseek.kernels import ops
from homeseek.quant import fp4_block_sim, fp8_block_sim, hadamard
from homeseek.state import ArenaCompressor, ArenaLayer

# Smallest position bucket: every sequence shorter than this shares one set of graphs.
MIN_BUCKET = 512


def bucket_of(pos: int, max_context: int) -> int:
    """The position bucket of a token at `pos`: the next power of two > pos (at least
    MIN_BUCKET, at most max_context). Compressed entries beyond bucket // m cannot be usable."""
    b = MIN_BUCKET
    while b <= pos:
        b *= 2
    return min(b, max_context)


@dataclass
class DecodeIndex:
    """The device-side inputs of one decode token, written by the runner before each step."""

    ids: torch.Tensor  # [1] int64 token id
    pos: torch.Tensor  # [1] int64 position
    slot: torch.Tensor  # [1] int64 arena slot of the session


def mm_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] · w [N, K]ᵀ -> fp32 [T, N], as `x.float() @ w.float().T`.

    On CUDA, when both are bf16, one bf16 GEMM with fp32 accumulation and fp32 output gives the
    same products (bf16·bf16 is exact in fp32) without upcasting the weight every token.
    """
    if x.is_cuda and x.dtype == w.dtype == torch.bfloat16:
        return torch.mm(x, w.T, out_dtype=torch.float32)
    return x.float() @ w.float().T


def plain_f32(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x [T, K] times an unquantised ("plain") weight in fp32, as `x.float() @ w.dequant().T`."""
    if w.fmt != "plain":
        return x.float() @ w.dequant().T
    return mm_f32(x, w.weight)


def compress_step(
    x: torch.Tensor,
    ix: DecodeIndex,
    lw: M.LayerWeights,
    prefix: str,
    ca: ArenaCompressor,
    cache_flat: torch.Tensor,
    cache_row0: torch.Tensor,
    rope: M.RopeTables,
    post: Callable[[torch.Tensor], torch.Tensor],
    ctx: M.Ctx,
) -> None:
    """Feed one token x [1, D] to a compressor of the session in slot ix.slot; write the entry of
    the block in progress at cache row cache_row0 + pos // m (final once the block completes)."""
    m = ca.ratio
    kv = plain_f32(x, lw[f"{prefix}.wkv"])  # [1, c·d] fp32
    off = ix.pos % m  # [1] row in the partial block
    gate = plain_f32(x, lw[f"{prefix}.wgate"]) + lw[f"{prefix}.ape"][off]  # [1, c·d]
    row = ix.slot * m + off
    ca.buf_kv.view(-1, ca.buf_kv.shape[-1]).index_copy_(0, row, kv)
    ca.buf_gate.view(-1, ca.buf_gate.shape[-1]).index_copy_(0, row, gate)
    bk = ca.buf_kv.index_select(0, ix.slot)[0]  # [m, c·d]; rows past `off` are the last block's
    bg = ca.buf_gate.index_select(0, ix.slot)[0]
    if ca.overlap:
        d = ca.d
        pk = ca.prev_kv.index_select(0, ix.slot)[0]  # [m, d] A half of the previous block
        pg = ca.prev_gate.index_select(0, ix.slot)[0]
        slot_kv = torch.cat((pk, bk[:, d:]))  # [2m, d]
        slot_gate = torch.cat((pg, bg[:, d:]))
        complete = (off == m - 1).view(1, 1)  # this token ends the block: its A half moves on
        ca.prev_kv.index_copy_(0, ix.slot, torch.where(complete, bk[:, :d], pk)[None])
        ca.prev_gate.index_copy_(0, ix.slot, torch.where(complete, bg[:, :d], pg)[None])
    else:
        slot_kv, slot_gate = bk, bg
    pooled = (slot_kv * torch.softmax(slot_gate, dim=0)).sum(0, keepdim=True)  # [1, d] fp32
    e = M.rms_norm(pooled.to(ctx.dtype), lw[f"{prefix}.norm"], ctx.cfg.rms_norm_eps)
    cos, sin = rope(True, (ix.pos // m) * m)  # RoPE at the block's first position
    e = post(M.apply_rope(e, cos, sin))
    cache_flat.index_copy_(0, cache_row0 + ix.pos // m, e.to(cache_flat.dtype))


def _kv_post(ctx: M.Ctx) -> Callable[[torch.Tensor], torch.Tensor]:
    nope = ctx.cfg.nope_dim

    def post(e: torch.Tensor) -> torch.Tensor:
        if not ctx.quant_sim:
            return e
        return torch.cat((fp8_block_sim(e[:, :nope], 64), e[:, nope:]), dim=-1)

    return post


def attention_step(
    x: torch.Tensor,
    ix: DecodeIndex,
    bucket: int,
    lw: M.LayerWeights,
    st: ArenaLayer,
    layer: int,
    rope: M.RopeTables,
    ctx: M.Ctx,
) -> torch.Tensor:
    """x [1, D] (after attn_norm) at position ix.pos -> [1, D]; updates the slot's state."""
    cfg = ctx.cfg
    H, Dh, W = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    kind = cfg.attn_kind(layer)
    eps = cfg.rms_norm_eps
    cos, sin = rope(kind != SWA, ix.pos)  # [1, d_r/2]
    R = st.keys.shape[1]  # rows per slot: W window + compressed entries
    keys = st.keys.view(-1, Dh)  # [S·R, Dh]
    base = ix.slot * R  # [1] first row of this slot

    qa, kva = M.linears(x, ("attn.wq_a", "attn.wkv"), lw, ctx)  # [1, Q], [1, Dh]
    qr = M.rms_norm(qa, lw["attn.q_norm"], eps)
    if kind == CSA:
        qb, qi = M.linears(qr, ("attn.wq_b", "attn.indexer.wq_b"), lw, ctx)
    else:
        qb = M.linear(qr, lw["attn.wq_b"], ctx)
    q = qb.view(1, H, Dh)
    q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + eps).to(q.dtype)
    q = M.apply_rope(q, cos.unsqueeze(1), sin.unsqueeze(1))

    kv = M.rms_norm(kva, lw["attn.kv_norm"], eps)
    kv = M.apply_rope(kv, cos, sin)
    if ctx.quant_sim:
        nope = cfg.nope_dim
        kv = torch.cat((fp8_block_sim(kv[:, :nope], 64), kv[:, nope:]), dim=-1)
    keys.index_copy_(0, base + ix.pos % W, kv)  # the ring now holds positions pos-W+1..pos

    # Window: ring row r holds the latest position ≡ r (mod W) up to pos; unwritten while r > pos.
    r = torch.arange(W, device=x.device)
    idx = torch.where(r <= ix.pos, base + r, -1)[None]  # [1, W]

    if kind != SWA:
        comp = st.comp
        n_c = min(-(-bucket // comp.ratio), comp.capacity)  # entries this bucket can reach
        compress_step(x, ix, lw, "attn.compressor", comp, keys, base + W, rope, _kv_post(ctx), ctx)
        limit = (ix.pos + 1) // comp.ratio  # complete entries
        if kind == CSA:
            sel = indexer_step(x, qi, ix, n_c, lw, st, rope, ctx)  # [1, k] entry ids, -1 none
        else:  # HCA: every complete entry
            ent = torch.arange(n_c, device=x.device)[None]
            sel = torch.where(ent < limit, ent, -1)
        idx = torch.cat((idx, torch.where(sel >= 0, sel + base + W, -1)), dim=1)

    o = ops.sparse_attn(q, keys, idx.int(), lw["attn.attn_sink"], Dh**-0.5, triton=ctx.kernels)
    o = M.apply_rope(o, cos.unsqueeze(1), -sin.unsqueeze(1))
    z = M.grouped_linear(o.reshape(1, cfg.o_groups, -1), lw["attn.wo_a"], ctx)
    return M.linear(z, lw["attn.wo_b"], ctx)


def indexer_step(
    x: torch.Tensor,
    qi: torch.Tensor,
    ix: DecodeIndex,
    n_c: int,
    lw: M.LayerWeights,
    st: ArenaLayer,
    rope: M.RopeTables,
    ctx: M.Ctx,
) -> torch.Tensor:
    """Lightning indexer for one token: top-k of the slot's first n_c indexer entries -> [1, k]
    (-1 where fewer are complete)."""
    cfg = ctx.cfg
    HI, DI = cfg.index_n_heads, cfg.index_head_dim
    ca = st.index_comp

    def key_post(k: torch.Tensor) -> torch.Tensor:
        return fp4_block_sim(hadamard(k)) if ctx.quant_sim else k

    cache = ca.cache.reshape(-1, DI)  # [S·C, DI]
    row0 = ix.slot * ca.capacity
    compress_step(x, ix, lw, "attn.indexer.compressor", ca, cache, row0, rope, key_post, ctx)
    cos, sin = rope(True, ix.pos)
    qi = M.apply_rope(qi.view(1, HI, DI), cos.unsqueeze(1), sin.unsqueeze(1))
    if ctx.quant_sim:
        qi = fp4_block_sim(hadamard(qi))
    w = plain_f32(x, lw["attn.indexer.weights_proj"]).to(x.dtype).float()
    w = w * (DI**-0.5 * HI**-0.5)
    limit = ((ix.pos + 1) // ca.ratio).int()
    top = ops.indexer_topk(
        qi, cache, w, limit, min(cfg.index_topk, n_c), n_keys=n_c, k_row0=row0,
        triton=ctx.kernels,
    )  # fmt: skip
    return top.long()


def route_step(
    u: torch.Tensor, ids: torch.Tensor, lw: M.LayerWeights, layer: int, ctx: M.Ctx
) -> tuple[torch.Tensor, torch.Tensor]:
    """model.route for one token, the gate product without upcasting the gate weight."""
    cfg = ctx.cfg
    logits = plain_f32(u, lw["ffn.gate"])  # [1, E] fp32
    sc = torch.sqrt(F.softplus(logits))
    if cfg.is_hash_layer(layer):
        sel = lw["ffn.gate.tid2eid"][ids]
    else:
        sel = torch.topk(sc + lw["ffn.gate.bias"], cfg.num_experts_per_tok, dim=-1).indices
    w = sc.gather(1, sel)
    return sel, w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor


def segment_a_step(
    X: torch.Tensor,
    ix: DecodeIndex,
    bucket: int,
    lw: M.LayerWeights,
    st: ArenaLayer,
    layer: int,
    rope: M.RopeTables,
    ctx: M.Ctx,
) -> M.FfnPending:
    """model.segment_a for one token: streams X [1, N, D] -> what the experts and segment B read."""
    eps = ctx.cfg.rms_norm_eps
    y, post, comb = M.hc_pre(X, lw["hc_attn_fn"], lw["hc_attn_base"], lw["hc_attn_scale"], ctx)
    a = attention_step(M.rms_norm(y, lw["attn_norm"], eps), ix, bucket, lw, st, layer, rope, ctx)
    X = M.hc_post(a, X, post, comb, ctx)
    y, post, comb = M.hc_pre(X, lw["hc_ffn_fn"], lw["hc_ffn_base"], lw["hc_ffn_scale"], ctx)
    u = M.rms_norm(y, lw["ffn_norm"], eps)
    sel, w = route_step(u, ix.ids, lw, layer, ctx)
    g, v = M.linears(u, ("ffn.shared_experts.w1", "ffn.shared_experts.w3"), lw, ctx)
    shared = M.swiglu_down(g, v, lw["ffn.shared_experts.w2"], ctx)
    return M.FfnPending(X, u, post, comb, sel, w, shared)


def head_step(X: torch.Tensor, top: dict[str, torch.Tensor], ctx: M.Ctx) -> torch.Tensor:
    """model.head_logits for one token: [1, N, D] -> [1, V] fp32, without upcasting the head."""
    z = M.hc_head(X, top["hc_head_fn"], top["hc_head_base"], top["hc_head_scale"], ctx)
    z = M.rms_norm(z, top["norm"], ctx.cfg.rms_norm_eps)  # [1, D] activation dtype
    head = top["head"]
    if z.is_cuda and z.dtype == head.dtype == torch.bfloat16:
        return mm_f32(z, head)
    return M.head_logits(X, top, ctx)
