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
- The compressor writes the token's buffer rows every step; the step that completes a block
  writes its entry at row `pos // m` and moves the CSA overlap half (a branch on the device,
  inside one kernel: kernels/compress.py). An entry is masked until its block completes.
- The compressed entries a token can see are bounded by the bucket's capacity `n_c` (the first
  `n_c` rows of the cache): the per-token cost follows the position reached, not max_context.

The elementwise glue between kernels sits in small functions marked `@fused`, which
homeseek/compile.py turns into Inductor kernels on CUDA (one compilation per shape serves every
layer). A region may end in a row store into session state (`index_copy_` into a buffer it is
given): Inductor writes the row in place from the kernel that computes it. Everything that
follows from the position and the slot alone is one region per layer (`layer_rows`).

The eager step's keys are ordered (window, then compressed entries) differently from here (ring
rows), so the attention sums in another order: equal to fp32 rounding, not bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from homeseek import model as M
from homeseek.compile import fused
from homeseek.config import CSA, SWA, ModelConfig
from homeseek.kernels import ops
from homeseek.kernels.compress import new_key_ref
from homeseek.kernels.rope import rope_heads_ref
from homeseek.quant import hadamard_matrix
from homeseek.state import ArenaCompressor, ArenaLayer

# Smallest position bucket: every sequence shorter than this shares one set of graphs.
MIN_BUCKET = 512
# HCA layers attend at least this many entry slots (masked until complete), so their shapes, and
# with them the compiled glue, stay the same across buckets up to 128 x 128 = 16K positions; a
# bucket change then costs captures only, no compilation.
MIN_HCA_ENTRIES = 128


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


# --- fused glue (pure tensor math; constants as plain arguments) --------------------------------
@fused
def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return M.rms_norm(x, w, eps)


@fused
def rms_into(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """rms into a static buffer: compiled, the norm's kernel stores there (no copy launch)."""
    return out.copy_(M.rms_norm(x, w, eps))


# The new key (norm, RoPE, cache rounding) into its ring row of keys [S·R, Dh], compiled: the store
# is part of the region, so Inductor writes the row in place from the kernel that computes it (no
# launch of its own, no copy of the buffer); the RoPE tables are read at pos inside. The math is
# kernels/compress.py's twin of its one-launch kernel (not yet what decode runs: see there).
new_key = fused(new_key_ref)


@fused
def unrope(
    o: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Undo RoPE at the query position: o [1, H, Dh] (cos_t/sin_t: the layer's tables)."""
    return rope_heads_ref(o, cos_t[pos], -sin_t[pos])


@fused
def indexer_q(
    qi: torch.Tensor,
    wlog: torch.Tensor,
    cos_t: torch.Tensor,
    sin_t: torch.Tensor,
    pos: torch.Tensor,
    hmat: torch.Tensor,
    heads: int,
    quant_sim: bool,
    w_scale: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer query [1, HI, DI] (RoPE, Hadamard + E2M1) and head weights [1, HI] fp32 from the
    weights_proj product wlog (rounded to the activation dtype, as model.linear returns it)."""
    cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)  # [1, 1, d_r/2]
    q = M.apply_rope(qi.view(1, heads, -1), cos, sin)
    return M.index_round(q, quant_sim, hmat), wlog.to(dtype).float() * w_scale


def _key_rows(
    pos: torch.Tensor, base: torch.Tensor, sel: torch.Tensor | None, window: int
) -> torch.Tensor:
    """Rows of the layer's key buffer one token attends to -> [1, W (+ k)] int32 (-1: none).

    Window: ring row r holds the latest position ≡ r (mod W) up to pos; unwritten while r > pos.
    Compressed: entry c (-1: none) at row W + c. base: the slot's first row."""
    r = torch.arange(window, device=pos.device)
    idx = torch.where(r <= pos, base + r, -1)[None]
    if sel is not None:
        idx = torch.cat((idx, torch.where(sel >= 0, sel + base + window, -1)), dim=1)
    return idx.int()


def _hca_select(pos: torch.Tensor, n_c: int, m: int) -> torch.Tensor:
    """Every complete entry of the first n_c: [1, n_c] entry ids, -1 for those not complete
    (HCA; CSA while the bucket's entries fit the indexer's top-k)."""
    ent = torch.arange(n_c, device=pos.device)[None]
    return torch.where(ent < (pos + 1) // m, ent, -1)


@fused
def key_rows(
    pos: torch.Tensor, base: torch.Tensor, sel: torch.Tensor | None, window: int
) -> torch.Tensor:
    """_key_rows compiled (a ranked CSA selection's rows)."""
    return _key_rows(pos, base, sel, window)


@fused
def layer_rows(
    pos: torch.Tensor,
    slot: torch.Tensor,
    rows: int,
    window: int,
    m: int,
    n_sel: int,
    index_cap: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything of one layer's step that follows from the position and the slot alone, in one
    compiled region (two launches; the pieces took ~7 a layer apart) -> (r [4] int64, idx).
    r: the slot's first row of the key buffer (base), the ring row of pos, the main
    compressor's first entry row (base + W) and the indexer cache's (slot · index_cap), one
    tensor so that one kernel writes them. idx: the key rows attended ([1, W + n_sel] int32,
    _key_rows) when the compressed entries are every complete one of the first n_sel
    (_hca_select: HCA, and CSA under the top-k shortcut; m the compression ratio); the window's
    alone when n_sel is 0 (SWA, or CSA ranked by its indexer, whose selection key_rows appends
    later)."""
    base = slot * rows
    sel = _hca_select(pos, n_sel, m) if n_sel else None
    r = torch.cat((base, base + pos % window, base + window, slot * index_cap))
    return r, _key_rows(pos, base, sel, window)


# model.py's own definition, compiled on the kernel path.
swiglu_act = fused(M.swiglu_act)


# --- the step ------------------------------------------------------------------------------------
def decode_workspaces(cfg: ModelConfig, max_context: int, device: torch.device | str) -> dict:
    """The decode token's kernel scratch, built once (Ctx.mhc_ws, Ctx.attn_ws): without it each
    mHC pre and sparse-attention launch allocates its own and zero-fills its counters, one more
    kernel per call. The attention's keys: the window plus the most entries a layer attends
    (CSA: the indexer's top-k; HCA: every entry up to max_context, at least MIN_HCA_ENTRIES)."""
    from homeseek.kernels.mhc import mhc_workspace
    from homeseek.kernels.sparse_attn import sparse_attn_workspace

    entries = 0
    for layer in range(cfg.num_hidden_layers):
        kind, m = cfg.attn_kind(layer), cfg.compress_ratios[layer]
        if kind == CSA:
            entries = max(entries, cfg.index_topk)
        elif kind != SWA:
            entries = max(entries, -(-max_context // m), MIN_HCA_ENTRIES)
    max_l = cfg.sliding_window + entries
    return {
        "mhc_ws": mhc_workspace(1, device),
        "attn_ws": sparse_attn_workspace(1, cfg.num_attention_heads, cfg.head_dim, max_l, device),
    }


def _hmat(ctx: M.Ctx, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(ctx.cfg.index_head_dim, device)


def compress_step(
    x: torch.Tensor,
    ix: DecodeIndex,
    lw: M.LayerWeights,
    prefix: str,
    ca: ArenaCompressor,
    cache_flat: torch.Tensor,
    cache_row0: torch.Tensor,
    rope: M.RopeTables,
    post: str,
    ctx: M.Ctx,
) -> None:
    """Feed one token x [1, D] to a compressor of the session in slot ix.slot: its block buffer
    rows, and, when the token completes the block, the entry at cache row cache_row0 + pos // m
    (and the CSA overlap half). After the two fp32 projections (one GEMV on the stacked
    weights) one launch does it all (kernels/compress.py; ~16 launches before); its torch twin,
    on the twins' path, also writes the entry of the block in progress (masked until complete,
    wherever it is read)."""
    cfg = ctx.cfg
    names = (f"{prefix}.wkv", f"{prefix}.wgate")
    kv, gate = M.plain_f32s(x, names, lw, ctx.kernels)  # [1, c·d] fp32 each, one product
    cos_t, sin_t = rope.tables[True]
    hmat = _hmat(ctx, x.device) if post == "index" and ctx.quant_sim else None
    ops.compress_decode(
        kv, gate, lw[f"{prefix}.ape"], ix.pos, ix.slot, ca.buf_kv, ca.buf_gate, ca.prev_kv,
        ca.prev_gate, cache_flat, cache_row0, lw[f"{prefix}.norm"], cos_t, sin_t, hmat,
        m=ca.ratio, overlap=ca.overlap, eps=cfg.rms_norm_eps, post=post, nope=cfg.nope_dim,
        quant_sim=ctx.quant_sim, dtype=ctx.dtype, triton=ctx.kernels,
    )  # fmt: skip


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
    Dh, W = cfg.head_dim, cfg.sliding_window
    kind = cfg.attn_kind(layer)
    comp = st.comp
    n_c = 0 if comp is None else min(-(-bucket // comp.ratio), comp.capacity)  # entries reached
    # CSA ranks its entries with the indexer unless the bucket's all fit the top-k
    ranked = kind == CSA and not topk_shortcut(n_c, ctx)
    # compressed entries selected by position alone: HCA's every complete one (at least
    # MIN_HCA_ENTRIES slots, so the glue keeps its shapes), CSA's under the top-k shortcut
    if kind == SWA or ranked:
        n_sel = 0
    else:
        n_sel = cfg.index_topk if kind == CSA else max(n_c, MIN_HCA_ENTRIES)
    keys = st.keys.view(-1, Dh)  # [S·R, Dh]
    # base: the slot's first row (R = W window rows + the compressed entries per slot); idx the
    # key rows attended, complete but for a ranked CSA selection (appended below)
    cos_t, sin_t = rope.tables[kind != SWA]  # YaRN if compressed
    r, idx = layer_rows(
        ix.pos, ix.slot, st.keys.shape[1], W,
        1 if comp is None else comp.ratio, n_sel,
        0 if st.index_comp is None else st.index_comp.capacity,
    )  # fmt: skip
    base, ring_row, comp_row0, index_row0 = r[0:1], r[1:2], r[2:3], r[3:4]  # [1] each

    qa, kva = M.linears(x, ("attn.wq_a", "attn.wkv"), lw, ctx)  # [1, Q], [1, Dh]
    qr = rms(qa, lw["attn.q_norm"], cfg.rms_norm_eps)
    if ranked:  # the indexer's query projection with wq_b (one launch)
        qb, qi = M.linears(qr, ("attn.wq_b", "attn.indexer.wq_b"), lw, ctx)
    else:  # no indexer query: SWA and HCA have none; the shortcut does not score
        qb = M.linear(qr, lw["attn.wq_b"], ctx)
    # the query: per-head RMS and RoPE, one launch (the RoPE row read at the position inside)
    H = cfg.num_attention_heads
    q = ops.head_rms_rope(
        qb.view(1, H, -1), cos_t, sin_t, cfg.rms_norm_eps, rows=ix.pos, triton=ctx.kernels
    )
    # the ring then holds positions pos-W+1..pos
    new_key(
        kva, lw["attn.kv_norm"], cos_t, sin_t, ix.pos, keys, ring_row, eps=cfg.rms_norm_eps,
        nope=cfg.nope_dim, quant_sim=ctx.quant_sim,
    )  # fmt: skip

    if comp is not None:
        compress_step(x, ix, lw, "attn.compressor", comp, keys, comp_row0, rope, "kv", ctx)
    if kind == CSA:
        ca = st.index_comp
        cache = ca.cache.reshape(-1, cfg.index_head_dim)  # [S·C, DI]
        compress_step(
            x, ix, lw, "attn.indexer.compressor", ca, cache, index_row0, rope, "index", ctx
        )
        if ranked:
            sel = indexer_step(x, qi, ix, n_c, lw, cache, index_row0, ca.ratio, rope, ctx)
            idx = key_rows(ix.pos, base, sel, W)  # [1, W + k]

    o = ops.sparse_attn(
        q, keys, idx, lw["attn.attn_sink"], Dh**-0.5, workspace=ctx.attn_ws, triton=ctx.kernels
    )
    z = M.grouped_linear(
        unrope(o, cos_t, sin_t, ix.pos).reshape(1, cfg.o_groups, -1), lw["attn.wo_a"], ctx
    )
    return M.linear(z, lw["attn.wo_b"], ctx)


def topk_shortcut(n_c: int, ctx: M.Ctx) -> bool:
    """Whether a CSA layer selects every complete entry without scoring: on the kernel path,
    while the bucket's n_c entries all fit the k selected (positions below 4 x 512 = 2,048 in
    V4-Flash), the top-k is every complete entry whatever the scores, the same set as the
    ranked selection in ascending order. It saves the indexer's query projection (~8 MB of FP8),
    its weights product, the query's rounding, the keys kernel and torch.topk's sort: ~50 us of
    a CSA layer on an H200. The attention then sums its keys in another order (fp32 rounding);
    the torch twins' path (CPU) keeps the ranked selection, unchanged."""
    return ctx.kernels and n_c <= ctx.cfg.index_topk


def indexer_step(
    x: torch.Tensor,
    qi: torch.Tensor,
    ix: DecodeIndex,
    n_c: int,
    lw: M.LayerWeights,
    cache: torch.Tensor,
    row0: torch.Tensor,
    ratio: int,
    rope: M.RopeTables,
    ctx: M.Ctx,
) -> torch.Tensor:
    """Lightning indexer for one token, after its compressor: top-k of the slot's first n_c
    indexer entries (cache [S·C, DI], the slot's first at row0) -> [1, k] (-1 where fewer are
    complete; k = index_topk whatever n_c, so the shapes after the selection do not change with
    the bucket)."""
    cfg = ctx.cfg
    HI, DI = cfg.index_n_heads, cfg.index_head_dim
    wlog = M.plain_f32(x, lw["attn.indexer.weights_proj"], ctx.kernels)
    # Head weights scaled by DI^-1/2 · HI^-1/2 (docs/architecture.md §3.3 step 4).
    q, w = indexer_q(
        qi, wlog, *rope.tables[True], ix.pos, _hmat(ctx, x.device), HI, ctx.quant_sim,
        DI**-0.5 * HI**-0.5, x.dtype,
    )  # fmt: skip
    limit = ((ix.pos + 1) // ratio).int()
    top = ops.indexer_topk(
        q, cache, w, limit, cfg.index_topk, n_keys=n_c, k_row0=row0, triton=ctx.kernels
    )
    return top.long()


def route_step(
    u: torch.Tensor,
    ids: torch.Tensor,
    lw: M.LayerWeights,
    layer: int,
    ctx: M.Ctx,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """model.route for one token, the gate product without upcasting the gate weight -> (ids
    [1, K], weights [1, K]); into out's (ids, weights) when given. On the kernel path the scores,
    the selection (or the hash table's row, looked up on the device) and the weights are one
    launch (kernels/router.py)."""
    cfg = ctx.cfg
    logits = M.plain_f32(u, lw["ffn.gate"], ctx.kernels)  # [1, E] fp32
    hashed = cfg.is_hash_layer(layer)  # ids fixed by the input token, else the bias steers
    sel_out, w_out = (None, None) if out is None else out
    return ops.route(
        logits, None if hashed else lw["ffn.gate.bias"], lw["ffn.gate.tid2eid"] if hashed else None,
        ids if hashed else None, cfg.num_experts_per_tok, cfg.routed_scaling_factor,
        sel_out=sel_out, w_out=w_out, triton=ctx.kernels,
    )  # fmt: skip


def segment_a_step(
    X: torch.Tensor,
    ix: DecodeIndex,
    bucket: int,
    lw: M.LayerWeights,
    st: ArenaLayer,
    layer: int,
    rope: M.RopeTables,
    ctx: M.Ctx,
    out: M.FfnPending | None = None,
) -> M.FfnPending:
    """model.segment_a for one token: streams X [1, N, D] -> what the experts and segment B read.
    out: static buffers the results are written into by the ops that make them (the runner's
    graphs: no copy launch per result), else new tensors."""
    eps = ctx.cfg.rms_norm_eps
    ws = ctx.mhc_ws
    y, post, comb = M.hc_pre(
        X, lw["hc_attn_fn"], lw["hc_attn_base"], lw["hc_attn_scale"], ctx, workspace=ws
    )
    a = attention_step(rms(y, lw["attn_norm"], eps), ix, bucket, lw, st, layer, rope, ctx)
    # Each result straight into its buffer in out, or a new tensor where there is none.
    to = {} if out is None else vars(out)
    X = M.hc_post(a, X, post, comb, ctx, out=to.get("X"))
    y, post, comb = M.hc_pre(
        X, lw["hc_ffn_fn"], lw["hc_ffn_base"], lw["hc_ffn_scale"], ctx,
        post=to.get("post"), comb=to.get("comb"), workspace=ws,
    )  # fmt: skip
    u = rms(y, lw["ffn_norm"], eps) if out is None else rms_into(y, lw["ffn_norm"], eps, out.u)
    sel, w = route_step(u, ix.ids, lw, layer, ctx, None if out is None else (out.sel, out.weights))
    g, v = M.linears(u, ("ffn.shared_experts.w1", "ffn.shared_experts.w3"), lw, ctx)
    h = swiglu_act(g, v, ctx.cfg.swiglu_limit)
    shared = M.linear(h, lw["ffn.shared_experts.w2"], ctx, out=to.get("shared"))
    return M.FfnPending(X, u, post, comb, sel, w, shared)


def head_step(X: torch.Tensor, top: dict[str, torch.Tensor], ctx: M.Ctx) -> torch.Tensor:
    """model.head_logits for one token: [1, N, D] -> [1, V] fp32, without upcasting the head."""
    head = top["head"]
    if not (X.is_cuda and X.dtype == head.dtype == torch.bfloat16):
        return M.head_logits(X, top, ctx)
    z = M.hc_head(X, top["hc_head_fn"], top["hc_head_base"], top["hc_head_scale"], ctx, ctx.mhc_ws)
    return M.mm_f32(rms(z, top["norm"], ctx.cfg.rms_norm_eps), head, ctx.kernels)
