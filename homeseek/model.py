"""The DeepSeek-V4 forward math, readable top to bottom (docs/architecture.md §3). Stateless.

One sequence, T new tokens at absolute positions `pos` (contiguous, starting at the state's
position). Shapes use the legend: T tokens, D model dim, N = hc_mult streams, H heads, Dh head
dim (nope | rope), W window, C compressed entries, E experts, K experts per token, I expert width.

Weights arrive as `LayerWeights` dicts keyed by the checkpoint's names without the layer prefix
(`attn.wq_a` for the linear `layers.{i}.attn.wq_a.weight`, `attn_norm` for a norm weight).
Decode state arrives as the layer's `LayerState` and is updated in place. Each layer is split
into the two segments of docs/engine.md §2: `segment_a` (attention, mHC, router, shared expert) and
`segment_b` (combine routed + shared, mHC post); the routed experts run between them, where the
expert scheduler makes the selected experts resident.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from homeseek.checkpoint import QWeight
from homeseek.config import CSA, SWA, ModelConfig, yarn_inv_freq
from homeseek.kernels import ops
from homeseek.kernels.compress import kv_round_ref
from homeseek.kernels.gemv import GEMV_MAX_T
from homeseek.kernels.rope import rope_ref
from homeseek.kernels.router import route_ref
from homeseek.quant import act_quant_sim, fp4_block_sim, hadamard
from homeseek.state import CompressorState, LayerState

if TYPE_CHECKING:
    from homeseek.kernels.fp8_linear import Fp8LinearWorkspace
    from homeseek.kernels.mhc import MhcWorkspace
    from homeseek.kernels.sparse_attn import SparseAttnWorkspace

LayerWeights = dict[str, "torch.Tensor | QWeight | FusedLinear"]


@dataclass(frozen=True)
class Ctx:
    """Per-engine constants of the math: config, activation dtype, quantisation simulation."""

    cfg: ModelConfig
    dtype: torch.dtype
    quant_sim: bool
    kernels: bool = False  # kernel layer: True = Triton kernels (CUDA), False = torch twins
    # The FP8 GEMV's split-K scratch, built once for every FP8 linear of the model (the runner
    # sets it on CUDA): without it each launch allocates its own and zero-fills its counters,
    # an extra kernel per linear and token.
    fp8_ws: Fp8LinearWorkspace | None = None
    # The decode token's (T = 1) mHC and sparse-attention scratch, for the same reason (the
    # engine sets them on CUDA; homeseek/decode.py passes them, prompts allocate their own).
    mhc_ws: MhcWorkspace | None = None
    attn_ws: SparseAttnWorkspace | None = None


class RopeTables:
    """cos/sin [positions, d_r/2] for both RoPE regimes, fp32, built once (docs/architecture.md
    §3.3)."""

    def __init__(self, cfg: ModelConfig, max_pos: int, device: str | torch.device) -> None:
        t = torch.arange(max_pos, dtype=torch.float32)
        self.tables = {}
        for compressed in (False, True):
            ang = torch.outer(t, yarn_inv_freq(cfg, compressed))  # [P, d_r/2]
            self.tables[compressed] = (ang.cos().to(device), ang.sin().to(device))

    def __call__(self, compressed: bool, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.tables[compressed]
        return cos[pos], sin[pos]


# --- small pieces --------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """w ⊙ x / sqrt(mean(x²) + eps) in fp32, cast back to x's dtype (w None: unweighted)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if w is not None:
        y = w * y
    return y.to(x.dtype)


# Linears that read the same input, run as one weight when the loader fused them (fuse_linears):
# one launch streams all of them, which matters most for the small decode GEMVs.
SHARED_INPUT_LINEARS = (
    ("attn.wq_a", "attn.wkv"),  # x after attn_norm
    ("attn.wq_b", "attn.indexer.wq_b"),  # qr (CSA layers; the others have no indexer)
    ("ffn.shared_experts.w1", "ffn.shared_experts.w3"),  # u after ffn_norm
)


@dataclass(frozen=True)
class FusedLinear:
    """Row-stacked FP8 linears: `weight` holds each part at a row offset that is a multiple of
    the scale block, so every part keeps its own scale rows; parts = ((offset, rows), ...)."""

    weight: QWeight
    parts: tuple[tuple[int, int], ...]


def fp8_shapes(weights: list[LayerWeights], cfg: ModelConfig) -> list[tuple[int, int]]:
    """(N, K) of every FP8 product the layers launch: each linear (fused ones as one), and wo_a
    both as one grouped product (`grouped_linear`: N = G·R, whose GEMV plan and split-K scratch
    are those of the whole) and one group at a time (N = R: fp8_linear falls back to a launch
    per group when R is narrower than the kernel's row tile, as in small test models)."""
    out = set()
    for lw in weights:
        for name, v in lw.items():
            w = v.weight if isinstance(v, FusedLinear) else v
            if not isinstance(w, QWeight) or w.fmt != "fp8":
                continue
            n, k = w.weight.shape
            out.add((n, k))
            if name == "attn.wo_a":
                out.add((n // cfg.o_groups, k))
    return sorted(out)


# Unquantised (bf16) products of one input, stacked the same way (fuse_linears): a compressor's kv
# and gate projections, one GEMV launch at decode (kernels/gemv.py: a row's bits do not depend
# on the rows beside it, so the stack computes what the two did apart).
SHARED_INPUT_PLAIN = (
    ("attn.compressor.wkv", "attn.compressor.wgate"),
    ("attn.indexer.compressor.wkv", "attn.indexer.compressor.wgate"),
)


def fuse_linears(lw: LayerWeights) -> None:
    """Stack each group of SHARED_INPUT_LINEARS present in lw (all FP8, same input width) into
    one FusedLinear under the joined name; the parts become views into it (no extra memory).
    A part whose rows are not a multiple of the scale block is padded with zero rows (small test
    models only; V4's are all multiples of 128)."""
    for names in SHARED_INPUT_LINEARS:
        ws = [lw.get(n) for n in names]
        if not all(isinstance(w, QWeight) and w.fmt == "fp8" for w in ws):
            continue
        blk, k = ws[0].block, ws[0].shape[1]
        if any(w.block != blk or w.shape[1] != k for w in ws):
            continue
        parts, off = [], 0
        for w in ws:
            parts.append((off, w.shape[0]))
            off += -(-w.shape[0] // blk) * blk
        ref = ws[0].weight
        weight = torch.zeros(off, k, dtype=ref.dtype, device=ref.device)
        scale = torch.empty(
            off // blk, ws[0].scale.shape[1], dtype=torch.float32, device=ref.device
        )
        for (o, n), w in zip(parts, ws, strict=True):
            weight[o : o + n] = w.weight
            scale[o // blk : o // blk + w.scale.shape[0]] = w.scale
        fused = FusedLinear(QWeight(weight, scale, "fp8", blk), tuple(parts))
        lw["+".join(names)] = fused
        for (o, n), name in zip(parts, names, strict=True):
            nb = -(-n // blk)
            lw[name] = QWeight(weight[o : o + n], scale[o // blk : o // blk + nb], "fp8", blk)
    for names in SHARED_INPUT_PLAIN:
        ws = [lw.get(n) for n in names]
        if not all(isinstance(w, QWeight) and w.fmt == "plain" for w in ws):
            continue
        if any(w.weight.dtype != ws[0].weight.dtype or w.shape[1] != ws[0].shape[1] for w in ws):
            continue
        weight = torch.cat([w.weight for w in ws])
        parts, off = [], 0
        for w in ws:
            parts.append((off, w.shape[0]))
            off += w.shape[0]
        lw["+".join(names)] = FusedLinear(QWeight(weight, None, "plain"), tuple(parts))
        for (o, n), name in zip(parts, names, strict=True):
            lw[name] = QWeight(weight[o : o + n], None, "plain")


def linears(
    x: torch.Tensor, names: Sequence[str], lw: LayerWeights, ctx: Ctx
) -> list[torch.Tensor]:
    """The linears `names` of one input x [T, K] -> their outputs; one fused product when the
    loader stacked them (the outputs are then column views of one [T, rows] result)."""
    fused = lw.get("+".join(names))
    if not isinstance(fused, FusedLinear):
        return [linear(x, lw[n], ctx) for n in names]
    y = linear(x, fused.weight, ctx)
    return [y[:, o : o + n] for o, n in fused.parts]


def linear(x: torch.Tensor, w: QWeight, ctx: Ctx, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K]·Wᵀ with fp32 accumulation; FP8/FP4 weights see the reference's activation
    rounding. FP8 goes through the kernel layer (Triton on CUDA, its torch twin elsewhere).
    out: written in place (the decode step's static buffers) and returned."""
    if w.fmt == "fp8":
        return ops.fp8_linear(
            x, w.weight, w.scale, out=out, act_quant=ctx.quant_sim, workspace=ctx.fp8_ws,
            triton=ctx.kernels,
        )  # fmt: skip
    if ctx.quant_sim and w.fmt == "fp4":
        x = act_quant_sim(x)
    y = (x.float() @ w.dequant().T).to(x.dtype)
    return y if out is None else out.copy_(y)


# mm_f32 sends products of up to GEMV_MAX_T tokens and this many weight rows to the one-launch
# Triton GEMV (the router gate, the compressors, weights_proj: N <= 1024); the vocabulary head
# (N = 129280) stays on cuBLAS, which reads it at bandwidth already.
MM_F32_GEMV_MAX_N = 16384


def mm_f32(x: torch.Tensor, w: torch.Tensor, triton: bool | None = None) -> torch.Tensor:
    """x [T, K] · w [N, K]ᵀ -> fp32 [T, N], as `x.float() @ w.float().T`. triton: the kernel
    layer's switch (Ctx.kernels; None: Triton wherever it runs).

    On CUDA, when both are bf16, the products come from the bf16 operands with fp32 accumulation
    (bf16·bf16 is exact in fp32), without upcasting x and the weight every call:
    - decode-sized (T <= GEMV_MAX_T, N <= MM_F32_GEMV_MAX_N, Triton on): one Triton GEMV
      launch (kernels/gemv.py). cuBLAS runs these as a split-K GEMM plus a reduce kernel, two
      launches (~6 us on an H200) for 0.5-8 MB of weights, about 4 times a layer and token. The
      kernel's bits do not depend on T (a token alone or in an MTP batch sums alike).
    - otherwise one bf16 GEMM with fp32 output on tensor cores (a 4K prefill's compressors and
      routers: ~10x the fp32 GEMM; the head's 129280 rows).
    """
    if x.is_cuda and x.dtype == w.dtype == torch.bfloat16:
        if (
            x.shape[0] <= GEMV_MAX_T
            and w.shape[0] <= MM_F32_GEMV_MAX_N
            and (ops.use_triton(x) if triton is None else triton)
            and w.is_contiguous()
            and x.stride(-1) == 1
        ):
            return ops.gemv_f32(x, w)
        return torch.mm(x, w.T, out_dtype=torch.float32)
    return x.float() @ w.float().T


def plain_f32s(
    x: torch.Tensor, names: Sequence[str], lw: LayerWeights, triton: bool | None = None
) -> list[torch.Tensor]:
    """plain_f32 of the weights `names` of one input x [T, K]: one product when the loader stacked
    them (SHARED_INPUT_PLAIN; the outputs are then column views of one [T, rows] result)."""
    fused = lw.get("+".join(names))
    if not isinstance(fused, FusedLinear):
        return [plain_f32(x, lw[n], triton) for n in names]
    y = plain_f32(x, fused.weight, triton)
    return [y[:, o : o + n] for o, n in fused.parts]


def plain_f32(x: torch.Tensor, w: QWeight, triton: bool | None = None) -> torch.Tensor:
    """x [T, K] times an unquantised ("plain") weight in fp32, as `x.float() @ w.dequant().T`
    (the compressor and the router: fp32 math on bf16 weights); triton as for mm_f32."""
    if w.fmt != "plain":
        return x.float() @ w.dequant().T
    return mm_f32(x, w.weight, triton)


# RoPE (docs/architecture.md §3.3): defined once, as the twin of the query path's RoPE kernel.
apply_rope = rope_ref


# --- mHC (docs/architecture.md §3.2) --------------------------------------------------------------
# pre:  r = 1/RMS(X flattened over N·D); m = (X·fnᵀ)·r; pre_k = σ(m_k·s0 + b_k) + eps;
#       post_k = 2σ(m_{N+k}·s1 + b_{N+k}); comb = Sinkhorn(m_{2N..}·s2 + b) (softmax + eps, column
#       norm, then iters-1 row/column pairs); y = Σ_k pre_k·X_k. All fp32 inside.
# post: X'_k = post_k·F + Σ_j comb[j, k]·X_j (out-stream k sums over the FIRST index).
# head: like pre with fn [N, N·D], no post/comb.
# The math lives once, in kernels/mhc.py (`mhc_*_ref` twins, fused Triton kernels on CUDA).
def hc_pre(
    X: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    ctx: Ctx,
    *,
    post: torch.Tensor | None = None,
    comb: torch.Tensor | None = None,
    workspace: MhcWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [T, N, D] -> (sublayer input y [T, D], post [T, N], comb [T, N, N]); post / comb
    written in place when given."""
    c = ctx.cfg
    return ops.mhc_pre(
        X, fn, scale, base, hc_eps=c.hc_eps, iters=c.hc_sinkhorn_iters, norm_eps=c.rms_norm_eps,
        post=post, comb=comb, workspace=workspace, triton=ctx.kernels,
    )  # fmt: skip


def hc_post(
    F_out: torch.Tensor,
    X: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    ctx: Ctx,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, D] sublayer output, streams [T, N, D] -> next streams [T, N, D] (into out if given)."""
    return ops.mhc_post(F_out, X, post, comb, out=out, triton=ctx.kernels)


def hc_head(
    X: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    ctx: Ctx,
    workspace: MhcWorkspace | None = None,
) -> torch.Tensor:
    """Collapse the N streams before the final norm: [T, N, D] -> [T, D]."""
    c = ctx.cfg
    return ops.mhc_head(
        X, fn, scale, base, hc_eps=c.hc_eps, norm_eps=c.rms_norm_eps, workspace=workspace,
        triton=ctx.kernels,
    )  # fmt: skip


# --- compressor (docs/architecture.md §3.3) -------------------------------------------------------
def compress(
    x: torch.Tensor,
    s0: int,
    lw: LayerWeights,
    prefix: str,
    cs: CompressorState,
    rope: RopeTables,
    post: Callable[[torch.Tensor], torch.Tensor],
    ctx: Ctx,
) -> int:
    """Feed T tokens (positions s0..s0+T-1) to a compressor; write every block they complete.

    Returns the number of compressed entries now in `cs.cache`. Block j covers positions
    jm..jm+m-1; its entry pools (CSA) the A half of block j-1 and the B half of block j over
    2m slots, or (HCA) the m tokens of block j, with a per-channel softmax over the gates.
    """
    m, T = cs.ratio, x.shape[0]
    kv = plain_f32(x, lw[f"{prefix}.wkv"], ctx.kernels)  # [T, c·d]; the compressor runs in fp32
    offs = torch.arange(s0, s0 + T, device=x.device) % m
    gate = plain_f32(x, lw[f"{prefix}.wgate"], ctx.kernels) + lw[f"{prefix}.ape"][offs]  # [T, c·d]
    n_buf = s0 % m  # tokens of the current partial block already buffered
    all_kv = torch.cat((cs.buf_kv[:n_buf], kv))
    all_gate = torch.cat((cs.buf_gate[:n_buf], gate))
    n_blk = (n_buf + T) // m
    j0 = (s0 - n_buf) // m  # first block this call completes
    if n_blk:
        bk = all_kv[: n_blk * m].view(n_blk, m, -1)  # [B, m, c·d]
        bg = all_gate[: n_blk * m].view(n_blk, m, -1)
        if cs.overlap:
            d = bk.shape[-1] // 2
            a_kv = torch.cat((cs.prev_kv.unsqueeze(0), bk[:-1, :, :d]))  # A halves of blocks j-1
            a_gate = torch.cat((cs.prev_gate.unsqueeze(0), bg[:-1, :, :d]))
            slot_kv = torch.cat((a_kv, bk[:, :, d:]), dim=1)  # [B, 2m, d]
            slot_gate = torch.cat((a_gate, bg[:, :, d:]), dim=1)
            cs.prev_kv.copy_(bk[-1, :, :d])
            cs.prev_gate.copy_(bg[-1, :, :d])
        else:
            slot_kv, slot_gate = bk, bg
        pooled = (slot_kv * torch.softmax(slot_gate, dim=1)).sum(1)  # [B, d] fp32
        norm_w = lw[f"{prefix}.norm"]
        e = rms_norm(pooled.to(ctx.dtype), norm_w, ctx.cfg.rms_norm_eps)
        first = (torch.arange(j0, j0 + n_blk, device=x.device)) * m  # RoPE at the block's start
        cos, sin = rope(True, first)
        e = post(apply_rope(e, cos, sin))
        cs.cache[j0 : j0 + n_blk] = e
    rem = n_buf + T - n_blk * m
    cs.buf_kv[:rem] = all_kv[n_blk * m :]
    cs.buf_gate[:rem] = all_gate[n_blk * m :]
    return j0 + n_blk


# --- attention (docs/architecture.md §3.3) --------------------------------------------------------
def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float, ctx: Ctx
) -> torch.Tensor:
    """q [T, H, Dh], kv [L, Dh] (K = V), idx [T, S] rows of kv (-1: none), sink [H] -> [T, H, Dh].

    l_j = scale·q·k_j over the selected keys; o = Σ e^(l_j-M) v_j / (Σ e^(l_j-M) + e^(sink-M)):
    the sink enlarges the denominator only. fp32 math (kernels/sparse_attn.py).
    """
    return ops.sparse_attn(q, kv, idx.int(), sink, scale, triton=ctx.kernels)


def indexer_topk(
    x: torch.Tensor,
    qi: torch.Tensor,
    pos: torch.Tensor,
    s0: int,
    lw: LayerWeights,
    st: LayerState,
    rope: RopeTables,
    ctx: Ctx,
) -> torch.Tensor:
    """Lightning indexer: top-k compressed entries per query -> [T, k] (-1 = not usable).
    qi [T, HI·DI] = indexer.wq_b·qr, computed with the attention's wq_b (same input)."""
    cfg = ctx.cfg
    HI, DI = cfg.index_n_heads, cfg.index_head_dim
    cs = st.index_comp
    T = x.shape[0]

    def key_post(k: torch.Tensor) -> torch.Tensor:
        return index_round(k, ctx.quant_sim)

    n_c = compress(x, s0, lw, "attn.indexer.compressor", cs, rope, key_post, ctx)
    cos, sin = rope(True, pos)
    qi = apply_rope(qi.view(T, HI, DI), cos.unsqueeze(1), sin.unsqueeze(1))
    qi = index_round(qi, ctx.quant_sim)
    # Head weights scaled by DI^-1/2 · HI^-1/2 (docs/architecture.md §3.3 step 4).
    w = linear(x, lw["attn.indexer.weights_proj"], ctx).float() * (DI**-0.5 * HI**-0.5)
    # I[t, c] = Σ_h w[t, h]·ReLU(qI[t, h]·kI[c]); entry c usable iff c < floor((p+1)/m);
    # top-k of the usable ones, -1 where fewer exist (kernels/indexer.py).
    limit = ((pos + 1) // cs.ratio).int()
    if n_c == 0:  # no complete block yet: nothing to select
        return torch.empty(T, 0, dtype=torch.long, device=x.device)
    top = ops.indexer_topk(
        qi, cs.cache[:n_c], w, limit, min(cfg.index_topk, n_c), triton=ctx.kernels
    )
    return top.long()


def attention(
    x: torch.Tensor,
    pos: torch.Tensor,
    s0: int,
    lw: LayerWeights,
    st: LayerState,
    layer: int,
    rope: RopeTables,
    ctx: Ctx,
) -> torch.Tensor:
    """x [T, D] (after attn_norm) at positions pos = s0..s0+T-1 -> [T, D]; updates the layer's
    state. s0 comes from the host, so the step never reads a position back from the device."""
    cfg = ctx.cfg
    T, H, Dh, W = x.shape[0], cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    kind = cfg.attn_kind(layer)
    cos, sin = rope(kind != SWA, pos)  # [T, d_r/2]; YaRN only on compressed layers
    eps = cfg.rms_norm_eps

    qa, kva = linears(x, ("attn.wq_a", "attn.wkv"), lw, ctx)  # [T, Q], [T, Dh]

    # Query path: low-rank q, per-head unweighted RMS, RoPE on the last d_r dims. The CSA
    # indexer's query projection reads the same qr.
    qr = rms_norm(qa, lw["attn.q_norm"], eps)  # [T, Q]
    if kind == CSA:
        qb, qi = linears(qr, ("attn.wq_b", "attn.indexer.wq_b"), lw, ctx)
    else:
        qb = linear(qr, lw["attn.wq_b"], ctx)
    q = ops.head_rms_rope(qb.view(T, H, Dh), cos, sin, eps, triton=ctx.kernels)  # [T, H, Dh]

    # One shared K = V head.
    kv = rms_norm(kva, lw["attn.kv_norm"], eps)  # [T, Dh]
    kv = apply_rope(kv, cos, sin)
    kv = kv_round(kv, cfg.nope_dim, ctx.quant_sim)

    # Local keys: the W-1 positions before this call (from the ring), then the new ones.
    n_prev = min(s0, W - 1)
    prev_pos = torch.arange(s0 - n_prev, s0, device=x.device)
    local = torch.cat((st.window[prev_pos % W], kv))  # [n_prev + T, Dh]
    keep = min(T, W)
    st.window[pos[-keep:] % W] = kv[-keep:]
    win = pos.unsqueeze(1) - (W - 1) + torch.arange(W, device=x.device)  # [T, W] positions
    idx = torch.where(win >= 0, win - (s0 - n_prev), torch.full_like(win, -1))
    keys = local

    if kind != SWA:
        n_c = compress(x, s0, lw, "attn.compressor", st.comp, rope, _kv_post(ctx), ctx)
        keys = torch.cat((local, st.comp.cache[:n_c]))
        n_local = local.shape[0]
        if kind == CSA:
            sel = indexer_topk(x, qi, pos, s0, lw, st, rope, ctx)  # [T, k]
        else:  # HCA: every complete block, causally
            ent = torch.arange(n_c, device=x.device).expand(T, n_c)
            limit = ((pos + 1) // st.comp.ratio).unsqueeze(1)
            sel = torch.where(ent < limit, ent, torch.full_like(ent, -1))
        idx = torch.cat((idx, torch.where(sel >= 0, sel + n_local, sel)), dim=1)

    o = sparse_attention(q, keys, idx, lw["attn.attn_sink"], Dh**-0.5, ctx)  # [T, H, Dh]
    o = ops.rope_heads_(o, cos, -sin, triton=ctx.kernels)  # undo RoPE at the query position

    # Grouped output: heads 8g..8g+7 form group g (V4-Flash), each projected to o_lora_rank.
    z = grouped_linear(o.reshape(T, cfg.o_groups, -1), lw["attn.wo_a"], ctx)  # [T, G·R]
    return linear(z, lw["attn.wo_b"], ctx)


def grouped_linear(o: torch.Tensor, w: QWeight, ctx: Ctx) -> torch.Tensor:
    """Block-diagonal linear (wo_a): o [T, G, I] -> z [T, G·R] with z_g = o_g · W[gR:(g+1)R]ᵀ,
    fp32 accumulation, no activation rounding (the reference dequantises wo_a to BF16 at load).

    An FP8 weight goes through the FP8 linear's grouped mode (R a multiple or a divisor of the
    128-row scale block, so a group's rows and scale rows slice out together): on CUDA one
    launch for all G groups at V4-Flash size (each row tile reads its own group's inputs), with
    the torch twin one product per group; either way W is never dequantised whole (a 128 MB
    fp32 copy per layer and call at V4-Flash size)."""
    T, G, _ = o.shape
    R, b = w.shape[0] // G, w.block  # b: the 128-row scale block
    if w.fmt != "fp8" or (R % b and b % R):
        wd = w.dequant().view(G, R, -1)  # [G, R, I]
        return torch.einsum("tgi,gri->tgr", o.float(), wd).to(o.dtype).reshape(T, G * R)
    return ops.fp8_linear(
        o.reshape(T, -1), w.weight, w.scale, act_quant=False, groups=G, workspace=ctx.fp8_ws,
        triton=ctx.kernels,
    )  # fmt: skip


def _kv_post(ctx: Ctx) -> Callable[[torch.Tensor], torch.Tensor]:
    """Main compressor entries are cached like window keys (kv_round)."""

    def post(e: torch.Tensor) -> torch.Tensor:
        return kv_round(e, ctx.cfg.nope_dim, ctx.quant_sim)

    return post


# A key as the cache stores it (the nope part FP8-rounded in blocks of 64, the rope part as is;
# nothing without quant_sim): defined once, as the twin of the decode key's kernels.
kv_round = kv_round_ref


def index_round(x: torch.Tensor, quant_sim: bool, h: torch.Tensor | None = None) -> torch.Tensor:
    """Indexer queries and keys as the reference rounds them: Hadamard rotation over the last
    dim (matrix h, else built), then E2M1 in blocks of 32 (nothing without quant_sim)."""
    if not quant_sim:
        return x
    return fp4_block_sim(hadamard(x, h))


# --- MoE (docs/architecture.md §3.4) --------------------------------------------------------------
def route(
    u: torch.Tensor, ids: torch.Tensor, lw: LayerWeights, layer: int, ctx: Ctx
) -> tuple[torch.Tensor, torch.Tensor]:
    """u [T, D] -> (expert ids [T, K] int64, routing weights [T, K] fp32)."""
    cfg = ctx.cfg
    logits = plain_f32(u, lw["ffn.gate"], ctx.kernels)  # [T, E] fp32
    if cfg.is_hash_layer(layer):
        hashed, bias = lw["ffn.gate.tid2eid"][ids], None  # fixed by the input token id
    else:  # the bias steers selection only
        hashed, bias = None, lw["ffn.gate.bias"]
    return route_from_logits(
        logits, bias, hashed, cfg.num_experts_per_tok, cfg.routed_scaling_factor
    )


# The routing math (scores sqrt(softplus(logits)); ids from the hash table rows, else the top-k of
# score + bias; weights the chosen scores normalised to sum `scale`): defined once, as the twin
# of the decode step's routing kernel (kernels/router.py).
route_from_logits = route_ref


def swiglu(
    u: torch.Tensor,
    w1: QWeight,
    w3: QWeight,
    w2: QWeight,
    ctx: Ctx,
    route_w: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clamped SwiGLU expert: w2·(route_w · silu(min(w1·u, L)) · clamp(w3·u, ±L)) -> [T, D]."""
    return swiglu_down(linear(u, w1, ctx), linear(u, w3, ctx), w2, ctx, route_w)


def swiglu_down(
    g: torch.Tensor,
    v: torch.Tensor,
    w2: QWeight,
    ctx: Ctx,
    route_w: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rest of swiglu from the gate and up projections g = w1·u, v = w3·u [T, I]."""
    return linear(swiglu_act(g, v, ctx.cfg.swiglu_limit, route_w), w2, ctx)


def swiglu_act(
    g: torch.Tensor, v: torch.Tensor, limit: float, route_w: torch.Tensor | None = None
) -> torch.Tensor:
    """route_w · silu(min(g, L)) · clamp(v, ±L) in fp32, returned in g's dtype (w2's input)."""
    a = F.silu(g.float().clamp(max=limit)) * v.float().clamp(-limit, limit)
    if route_w is not None:  # the routing weight multiplies before w2 (docs/architecture.md §3.4)
        a = a * route_w.unsqueeze(-1)
    return a.to(g.dtype)


def routed_experts(
    u: torch.Tensor,
    sel: torch.Tensor,
    w: torch.Tensor,
    experts: Sequence[int],
    weights_of: Callable[[int], tuple[QWeight, QWeight, QWeight]],
    ctx: Ctx,
    out: torch.Tensor,
) -> torch.Tensor:
    """out [T, D] fp32 += Σ over (t, k) with sel[t, k] in `experts` of w[t, k]·expert(u_t).

    Reference path: each listed expert once, all its tokens together, in the listed order (so
    the sum is bitwise the same however the experts are batched into waves).
    """
    for e in experts:
        t_idx, k_idx = (sel == e).nonzero(as_tuple=True)
        w1, w3, w2 = weights_of(e)
        y = swiglu(u[t_idx], w1, w3, w2, ctx, route_w=w[t_idx, k_idx])
        out.index_add_(0, t_idx, y.float())
    return out


# --- one block in two segments (docs/engine.md §2) ------------------------------------------------
@dataclass
class FfnPending:
    """What segment A hands to the expert scheduler and segment B."""

    X: torch.Tensor  # [T, N, D] streams after the attention sublayer
    u: torch.Tensor  # [T, D] normalised FFN input
    post: torch.Tensor  # [T, N]
    comb: torch.Tensor  # [T, N, N]
    sel: torch.Tensor  # [T, K] expert ids
    weights: torch.Tensor  # [T, K] routing weights
    shared: torch.Tensor  # [T, D] shared-expert output


def segment_a(
    X: torch.Tensor,
    ids: torch.Tensor,
    pos: torch.Tensor,
    s0: int,
    lw: LayerWeights,
    st: LayerState,
    layer: int,
    rope: RopeTables,
    ctx: Ctx,
) -> FfnPending:
    eps = ctx.cfg.rms_norm_eps
    y, post, comb = hc_pre(X, lw["hc_attn_fn"], lw["hc_attn_base"], lw["hc_attn_scale"], ctx)
    a = attention(rms_norm(y, lw["attn_norm"], eps), pos, s0, lw, st, layer, rope, ctx)
    X = hc_post(a, X, post, comb, ctx)
    y, post, comb = hc_pre(X, lw["hc_ffn_fn"], lw["hc_ffn_base"], lw["hc_ffn_scale"], ctx)
    u = rms_norm(y, lw["ffn_norm"], eps)
    sel, w = route(u, ids, lw, layer, ctx)
    g, v = linears(u, ("ffn.shared_experts.w1", "ffn.shared_experts.w3"), lw, ctx)
    shared = swiglu_down(g, v, lw["ffn.shared_experts.w2"], ctx)
    return FfnPending(X, u, post, comb, sel, w, shared)


def segment_b(p: FfnPending, moe: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    """MoE output (routed + shared, activation dtype) through mHC post -> next streams."""
    return hc_post(moe, p.X, p.post, p.comb, ctx)


def mtp_input(
    X_L: torch.Tensor, next_ids: torch.Tensor, lw: LayerWeights, table: torch.Tensor, ctx: Ctx
) -> torch.Tensor:
    """The MTP block's input streams (docs/architecture.md §3.5): the main model's final streams
    X_L [T, N, D] at positions t and the ids of the tokens at t + 1 [T] ->
    e_proj(enorm(embed)) broadcast over the streams + h_proj(hnorm(X_L)) per stream [T, N, D]."""
    eps = ctx.cfg.rms_norm_eps
    T, N, D = X_L.shape
    e = rms_norm(table[next_ids].to(ctx.dtype), lw["enorm"], eps)  # [T, D]
    h = rms_norm(X_L, lw["hnorm"], eps).reshape(T * N, D)  # [T*N, D]: each stream alike
    return linear(e, lw["e_proj"], ctx)[:, None, :] + linear(h, lw["h_proj"], ctx).view(T, N, D)


def mtp_top(lw: LayerWeights, top: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MTP block's head: its own hc_head collapse and final norm, the shared head."""
    keys = ("hc_head_fn", "hc_head_base", "hc_head_scale", "norm")
    return {"head": top["head"], **{k: lw[k] for k in keys}}  # type: ignore[misc]


def embed(ids: torch.Tensor, table: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    """ids [T] -> N identical streams [T, N, D]."""
    h = table[ids].to(ctx.dtype)
    return h.unsqueeze(1).expand(-1, ctx.cfg.hc_mult, -1).contiguous()


# Head rows upcast to fp32 at a time: the whole bf16 head as fp32 would be a 2.1 GB transient
# (V4-Flash: 129280 x 4096) on top of the planned workspace; 16384 rows are 256 MB.
HEAD_CHUNK_ROWS = 16384


def head_logits(X: torch.Tensor, top: dict[str, torch.Tensor], ctx: Ctx) -> torch.Tensor:
    """Streams [T, N, D] -> logits [T, V] fp32: hc_head collapse, norm, fp32 head
    (docs/architecture.md §3.2, head collapse: fp32 activations times the fp32-upcast head), a
    block of head rows at a time."""
    z = hc_head(X, top["hc_head_fn"], top["hc_head_base"], top["hc_head_scale"], ctx)
    z = rms_norm(z, top["norm"], ctx.cfg.rms_norm_eps).float()  # [T, D]
    head = top["head"]  # [V, D]
    out = torch.empty(z.shape[0], head.shape[0], dtype=torch.float32, device=z.device)
    for r in range(0, head.shape[0], HEAD_CHUNK_ROWS):
        rows = head[r : r + HEAD_CHUNK_ROWS]
        out[:, r : r + rows.shape[0]] = z @ rows.float().T
    return out
