"""Memory plan: what goes on the GPU, in pinned host RAM and on disk, for given budgets.

The GPU budget (`gpu_mem_gb`, the engine's total) holds the dense weights (everything but routed
experts), the sessions' decode state, the RoPE tables, the prefill workspace and the expert slot
pool, which gets what is left. Experts that do not fit the pool live in pinned host RAM up to the
host budget, and the rest stay memory-mapped on disk.

The prefill workspace is derived, not guessed: `prefill_phases` counts the bytes live at the
worst point of each phase of one prefill chunk on the kernel path (CUDA), read off the code that
runs (model.py's segment_a / segment_b / head_logits, the runner's grouped FP4 experts, the
kernels' scratch), and `prefill_workspace` adds the allocator's margin, the decode step's
allowance and the fixed scratch. The chunk itself comes from the budget (`derive_chunk`) unless
one is given; a chunk that does not fit is refused before any weight is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from homeseek.checkpoint import ST_SIZES, stored_shapes, tensor_table
from homeseek.config import CSA, DEFAULT_PREFILL_GROUP, HCA, SWA, ModelConfig
from homeseek.experts import record_bytes
from homeseek.model import HEAD_CHUNK_ROWS

GiB = 2**30
MiB = 2**20
# Host RAM left to the OS and the rest of the process when pinning by default.
HOST_RESERVE_FRACTION = 0.25
# Share of the GPU memory free at start that the engine takes by default: the rest is left to the
# CUDA context's own growth (cuBLAS/Triton workspaces) and to a desktop sharing the card.
GPU_FREE_FRACTION = 0.9

# --- prefill chunk rule --------------------------------------------------------------------------
# Derived chunks are powers of two in [MIN_PREFILL_CHUNK, MAX_PREFILL_CHUNK]. Prefill loads every
# expert a chunk touches once per chunk (expert-major), and a chunk of a few hundred tokens already
# touches nearly all 256 experts of a layer, so the expert bytes moved per prompt token fall as
# 1/chunk: longer chunks are much faster prefill. At 4,096 tokens (24,576 token-expert pairs per
# layer) that traffic is small beside the compute, while the workspace keeps growing linearly.
MIN_PREFILL_CHUNK = 64  # also the floor of the engine's out-of-memory fallback (halving)
MAX_PREFILL_CHUNK = 4096
# The derived chunk is the largest whose workspace takes at most this share of what the budget
# leaves after dense weights, decode state and RoPE tables; the expert pool keeps the rest (>= 3/4),
# which is what decode's hit rate lives on. V4-Flash at 24 GiB leaves ~15.6 GiB: a 4,096-token
# workspace (~2.7 GiB) costs the pool ~105 of ~1,140 slots against 2,048-token chunks and halves
# the prefill's expert traffic; on a smaller budget the chunk shrinks before the pool does.
PREFILL_SHARE = 0.25

# --- workspace constants -------------------------------------------------------------------------
# Fragmentation margin on the prefill activations. The per-process cap
# (torch.cuda.set_per_process_memory_fraction, and a real card's size) counts the caching
# allocator's reserved segments, not live tensors: blocks are rounded up (512 B; requests over
# 1 MiB carve 2 MiB-rounded segments, 1-10 MiB ones 20 MiB segments), and a cached block that was
# split for a smaller request cannot serve a larger one with its free tail. On an OOM the
# allocator frees its wholly free segments and retries, so what is lost is the free space inside
# segments that still hold live blocks. Measured at V4-Flash widths (H200, chunks of 64 to 4,096
# tokens) the phases' peak came within 1 % of torch.cuda.max_memory_allocated, so the margin is
# for fragmentation: ALLOC_MARGIN of the activations plus one largest per-layer block. Full-size
# V4-Flash (random weights) capped at 24 GiB, one 4,096-token chunk: without the largest-block
# term it ran out asking for one [4096, 64, 512] fp32 tensor (512 MiB) with 595 MiB reserved but
# unusable (split tails); with it, the prefill peaked at 23.30 GiB allocated and 23.60 GiB
# reserved, +2,035 MiB over the engine against 1.97 GiB of planned activations.
ALLOC_MARGIN = 0.10
# Decode allowance: the CUDA-graph pool of the captured decode step (one private pool for every
# graph and position bucket; measured at ~22 MiB at V4-Flash size), plus the decode's scratch
# (sparse-attention split partials [1, H, 16, Dh] fp32 = 2 MiB and mHC partials, built once:
# decode.decode_workspaces; the indexer's [1, C] int64 keys, the logits) with headroom.
# Measured at full size; smaller models need less.
DECODE_ALLOWANCE_BYTES = 48 * MiB
# cuBLAS keeps one workspace per handle and stream once the first torch matmul ran (the compressor
# and router projections, the head), allocated through torch's caching allocator, so it is live
# from the first prefill on: the first prefill left 36.3 MiB allocated for good on an H200
# (torch 2.11; cuBLAS's 32 MiB Hopper default and cuBLASLt's).
CUBLAS_WORKSPACE_BYTES = 40 * MiB
# Kernel constants the scratch terms mirror (kernels/sparse_attn.py, kernels/fp8_linear.py):
# sparse attention splits the keys of small launches into up to 16 partials until
# (token, 16-head block) programs fill the GPU; the FP8 GEMV (<= 16 rows) splits K likewise.
_ATTN_BLOCK_H, _ATTN_NO_SPLIT_PROGRAMS, _ATTN_MAX_SPLIT, _ATTN_BLOCK_L = 16, 256, 16, 32
_GEMV_MAX_M, _GEMV_MAX_SPLIT = 16, 16


def _bytes(shapes: dict[str, tuple]) -> int:
    total = 0
    for shape, dtypes in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n * ST_SIZES[dtypes[0]]
    return total


def dense_bytes(cfg: ModelConfig, include_mtp: bool = False) -> int:
    """Stored bytes of every non-expert tensor (FP8 stays FP8 on the GPU)."""
    total = 0
    for name, spec in tensor_table(cfg).items():
        if ".experts." in name or (name.startswith("mtp.") and not include_mtp):
            continue
        total += _bytes(stored_shapes(name, spec, cfg))
    return total


def state_bytes(cfg: ModelConfig, max_context: int, act_bytes: int = 2) -> int:
    """Decode state of one session at max_context, activation dtype act_bytes
    (docs/architecture.md §4)."""
    total = 0
    for i in range(cfg.num_hidden_layers):
        total += cfg.sliding_window * cfg.head_dim * act_bytes
        kind, m = cfg.attn_kind(i), cfg.compress_ratios[i]
        if kind in (CSA, HCA):
            c = 2 if kind == CSA else 1
            total += (max_context // m) * cfg.head_dim * act_bytes + 4 * m * 4 * c * cfg.head_dim
        if kind == CSA:
            total += (max_context // m) * cfg.index_head_dim * act_bytes
            total += 4 * m * 4 * 2 * cfg.index_head_dim
    return total


def rope_table_bytes(cfg: ModelConfig, max_context: int) -> int:
    """model.RopeTables: fp32 cos and sin [max_context, d_r/2] for both RoPE regimes (512 B a
    position on V4-Flash: 16 MiB at 32K, 512 MiB at 1M)."""
    return 2 * 2 * max_context * (cfg.qk_rope_head_dim // 2) * 4


def snapshot_bytes(cfg: ModelConfig, act_bytes: int = 2) -> int:
    """What `SessionState.save()` copies before each prefill chunk (the chunk's undo record):
    window rings and the compressors' partial blocks and overlap halves (~27 MiB on V4-Flash)."""
    total = 0
    for i in range(cfg.num_hidden_layers):
        total += cfg.sliding_window * cfg.head_dim * act_bytes
        kind, m = cfg.attn_kind(i), cfg.compress_ratios[i]
        comps = {CSA: [(2, cfg.head_dim), (2, cfg.index_head_dim)], HCA: [(1, cfg.head_dim)]}
        for c, d in comps.get(kind, []):
            total += 2 * m * c * d * 4 + 2 * m * d * 4  # buf_kv/buf_gate, prev_kv/prev_gate fp32
    return total


# --- the prefill workspace -----------------------------------------------------------------------
def _attn_split_bytes(cfg: ModelConfig, t: int, n_keys: int) -> int:
    """Split-K partials kernels/sparse_attn.py allocates for a launch of t tokens over n_keys keys
    (none once t x ceil(H/16) programs fill the GPU, which is every chunk of >= 64 tokens on
    V4-Flash; the last, short chunk of a prompt can split)."""
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    n_hb = -(-H // _ATTN_BLOCK_H)
    if t * n_hb >= _ATTN_NO_SPLIT_PROGRAMS:
        return 0
    split = min(_ATTN_MAX_SPLIT, max(1, -(-n_keys // _ATTN_BLOCK_L)))
    return t * H * split * (Dh + 2) * 4 + t * n_hb * 4


def _phases_at(
    cfg: ModelConfig, T: int, max_context: int, act_bytes: int, quant_sim: bool
) -> dict[str, int]:
    """prefill_phases for a chunk of exactly T tokens (see there)."""
    a, f, i8 = act_bytes, 4, 8
    up = 0 if a == f else f  # x.float() of fp32 activations is no copy
    D, N, V = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    H, Dh, dr, Q, W = (
        cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.q_lora_rank,
        cfg.sliding_window,
    )  # fmt: skip
    HI, DI, topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    E, K, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    out: dict[str, int] = {}

    def rope(heads: int, width: int) -> int:
        # model.apply_rope on [T, heads, width]: the rope dims upcast to fp32, both rotated halves
        # and their stack (~3 d_r floats a head at once), then the output [T, heads, width].
        return T * heads * (3 * dr * f + width * a)

    streams = T * N * D * a  # [T, N, D]: the runner's X, alive for the whole step
    # Runner.step keeps the previous layer's FfnPending bound until the next segment_a returns:
    # its streams, u and shared-expert output (and the small routing tensors) stay live through
    # that whole segment (192 MiB at 4,096 tokens of V4-Flash; seen in a full-size run capped at
    # 24 GiB, where the first layer, which has none, had hidden it).
    prev = streams + 2 * T * D * a + T * K * (i8 + f) + T * N * (N + 1) * f
    # Live through the attention sublayer: X, mHC pre's y, the normed input, the fused wq_a|wkv
    # product [T, Q + Dh] (qa and kva are views of it), qr, and the RoPE rows (cos, sin) of the
    # attention and of the indexer.
    attn_base = prev + streams + 2 * T * D * a + T * (Q + Dh) * a + T * Q * a + 2 * T * dr * f
    ratios: dict[str, int] = {}
    for i in range(cfg.num_hidden_layers):  # the smallest ratio of a kind has the most entries
        kind = cfg.attn_kind(i)
        ratios[kind] = min(ratios.get(kind, 1 << 62), max(cfg.compress_ratios[i], 1))
    for kind, m in sorted(ratios.items()):
        n_c = max_context // m if kind != SWA else 0  # entries at the chunk that ends max_context
        hq = T * H * Dh  # elements of q and of the attention output o
        # The wq_b product (CSA: fused with the indexer's wq_b; qi is a view of it), alive until
        # attention returns because qb and qi are locals there.
        qb = T * (H * Dh + (HI * DI if kind == CSA else 0)) * a
        base = attn_base + qb
        # Per-head RMS of q: q.float() and its square exist at once, 2 x [T, H, Dh] fp32 (128 KiB
        # a token each on V4-Flash): the largest tensors of the dense path.
        out[f"{kind}: query norm"] = base + hq * (up + f)
        out[f"{kind}: query rope"] = base + hq * a + rope(H, Dh)
        # From here on: q [T, H, Dh], kv [T, Dh], the local keys [W - 1 + T, Dh] and the window
        # position lists [T, W] int64 (win and idx).
        base += hq * a + T * Dh * a + (W + T) * Dh * a + 2 * T * W * i8
        if kind != SWA:
            # compress() on the main compressor (the indexer's own is 4x narrower): x in fp32,
            # kv and gate [T, c·d] fp32 (+ the gate product before ape is added), both again
            # with the buffered partial block prepended; CSA pools [B, 2m, d] slots (A halves,
            # slots, softmax, product: 10 x [T, d] fp32), HCA [B, m, c·d] (softmax, product).
            c = 2 if kind == CSA else 1
            cd = c * Dh
            pool = 10 * T * Dh * f if kind == CSA else 2 * T * cd * f
            comp = T * D * up + 5 * T * cd * f + pool
            weight = T * D * up + cd * D * f + 2 * T * cd * f  # the fp32 wkv / wgate copy
            out[f"{kind}: compressor"] = base + max(comp, weight)
            base += (W + T + n_c) * Dh * a  # keys: local keys, then the compressed entries
        S = 0  # compressed entries each query may attend
        if kind == CSA:
            S = topk
            e = T * HI * DI  # elements of the indexer query
            if quant_sim:
                # index_round(qi): the rotated qi and its Hadamard product [T, HI, DI], then
                # fp4_block_sim: the fp32 block view, x / s, |x|, the block amax and scale, and
                # inside round_e2m1 six of its seven comparison masks (bool) with two nested
                # torch.where results (fp32). Measured at V4-Flash size: the peak of the chunk.
                qround = e * (2 * a + up + 2 * f + 6 + 2 * f) + 2 * (e // 32) * f
            else:
                qround = 0
            out["csa: indexer query"] = base + max(rope(HI, DI), qround)
            # Ranking: the kernel's [T, C] int64 keys over every compressed entry up to
            # max_context (2 bytes a context token per query token: the one term that grows
            # with max_context x chunk), torch.topk's values and ids [T, k] int64 and _select's
            # three [T, k] temporaries, the rounded qi and the head weights.
            n_sel = min(topk, n_c)
            rank = T * n_c * i8 + 5 * T * n_sel * i8 + T * topk * 4
            out["csa: indexer top-k"] = base + e * a + T * HI * f * 2 + rank
        elif kind == HCA:
            S = n_c  # every complete block: the index lists grow with max_context
        # Sparse attention: the index lists (sel [T, S] and idx [T, W + S] int64, idx.int()), o
        # and its inverse RoPE (scratch + output).
        L = W + S
        lists = T * S * i8 + T * L * (i8 + 4)
        split = _attn_split_bytes(cfg, T, L)
        out[f"{kind}: attention"] = base + lists + split + hq * a + rope(H, Dh)
    # FFN sublayer (segment_a's second half; the previous layer's pending tensors still live):
    # X and the new streams X2, y, u; the router's
    # u.float() and [T, E] fp32 scores; the shared expert's fused w1|w3 product [T, 2I] and
    # swiglu_act's fp32 temporaries (4 x [T, I]).
    ffn_base = prev + 2 * streams + 2 * T * D * a
    route = T * D * up + E * D * f + 5 * T * E * f
    shared = T * 2 * I * a + 4 * T * I * f + T * I * a + T * D * a
    out["ffn: router, shared expert"] = ffn_base + max(route, shared)
    # Routed experts, grouped FP4 kernels (kernels/fp4_experts.py, fp4_experts_grouped): per
    # (token, expert) pair P = T·K the SwiGLU activations a [P, I] (and their e4m3 copy with
    # quant_sim) and the fp32 down-projection partials y [P, D]: 96 KiB a token on V4-Flash,
    # the largest tensor of the FFN. Beside them X, X2, u, the shared output, the output, x's
    # e4m3 copy, and the pair sort (_group_pairs: ~10 int64 vectors of P).
    P = T * K
    qs = 1 if quant_sim else 0
    experts = P * I * a * (1 + qs) + P * D * f + 10 * P * i8 + P * (I // 128) * f * qs
    out["ffn: routed experts"] = 2 * streams + 3 * T * D * a + T * D * a * qs + experts
    out["ffn: mHC post"] = 3 * streams + T * D * a
    # Head on the last row: the final streams, HEAD_CHUNK_ROWS head rows upcast to fp32 (256 MiB
    # on V4-Flash), the [1, V] fp32 logits.
    out["head (last row)"] = streams + min(HEAD_CHUNK_ROWS, V) * D * f + 2 * V * f
    if T <= _GEMV_MAX_M:  # FP8 GEMV split-K partials of the widest linear (wq_b | indexer wq_b)
        n_max = H * Dh + HI * DI
        gemv = _GEMV_MAX_SPLIT * T * n_max * f
        out["attention: FP8 GEMV partials"] = attn_base + gemv
    return out


def prefill_phases(
    cfg: ModelConfig,
    chunk: int,
    max_context: int,
    act_bytes: int = 2,
    quant_sim: bool = True,
) -> dict[str, int]:
    """Bytes of GPU memory live at the worst point of each phase of a prefill chunk (beyond the
    engine's persistent tensors), on the kernel path (CUDA, Triton kernels; the torch twins'
    reference path allocates more and is not planned), for the worst layer of each attention
    kind and the chunk that ends at max_context.

    Dominant terms, V4-Flash in bf16 with quant_sim (per chunk token): the CSA indexer query's
    FP4 rounding (~490 KiB with everything the attention sublayer holds: q [T, 64, 512] and the
    fused wq_b product alone are 144 KiB, the previous layer's pending tensors 48 KiB), the
    query's per-head norm (~440 KiB: q in fp32 twice), the routed experts' pair buffers (~240 KiB:
    y [T·6, 4096] fp32 is 96 KiB of it); and with a long context the indexer's
    [T, max_context/4] int64 ranking keys (2 bytes per context token per query token) and HCA's
    [T, max_context/128] index lists. A prompt's last chunk may be
    shorter than `chunk`: the scratch only short launches take (sparse-attention split partials
    below 64 tokens, FP8 GEMV split-K partials up to 16) is counted as phases "tail chunk of t
    tokens", at the longest such t.
    """
    T = max(1, min(chunk, max_context))
    out = _phases_at(cfg, T, max_context, act_bytes, quant_sim)
    n_hb = -(-cfg.num_attention_heads // _ATTN_BLOCK_H)
    tail = min(T, -(-_ATTN_NO_SPLIT_PROGRAMS // n_hb) - 1)
    for t in sorted({tail, min(T, _GEMV_MAX_M)} - {T}):
        if t >= 1:
            peak = max(_phases_at(cfg, t, max_context, act_bytes, quant_sim).values())
            out[f"tail chunk of {t} tokens"] = peak
    return out


def prefill_activation_bytes(
    cfg: ModelConfig, chunk: int, max_context: int, act_bytes: int = 2, quant_sim: bool = True
) -> int:
    """Peak transient bytes of one prefill chunk: the largest of `prefill_phases`."""
    return max(prefill_phases(cfg, chunk, max_context, act_bytes, quant_sim).values())


def _largest_block(cfg: ModelConfig, chunk: int, max_context: int, act_bytes: int) -> int:
    """The largest single tensor a chunk allocates (and frees), which is what the allocator's
    split segments can lose at most once: q in fp32 [T, H, Dh], the fused wq_b product, the
    experts' fp32 partials [T·K, D], the indexer's [T, max_context/4] int64 keys or HCA's
    [T, max_context/128] index lists, or the head's block of rows upcast to fp32 (256 MiB at
    V4-Flash size: the largest of all at short chunks; full-size, 24 GiB, max_context 112, a
    plan without it ran out asking for that block with 178 MiB reserved but unusable)."""
    T = max(1, min(chunk, max_context))
    ratios = [r for r in cfg.compress_ratios[: cfg.num_hidden_layers] if r] or [max_context]
    return max(
        min(HEAD_CHUNK_ROWS, cfg.vocab_size) * cfg.hidden_size * 4,
        T * cfg.num_attention_heads * cfg.head_dim * 4,
        T
        * (cfg.num_attention_heads * cfg.head_dim + cfg.index_n_heads * cfg.index_head_dim)
        * act_bytes,
        T * cfg.num_experts_per_tok * cfg.hidden_size * 4,
        T * (max_context // min(ratios)) * 8,
    )


def alloc_margin(
    cfg: ModelConfig, chunk: int, max_context: int, act_bytes: int, activations: int
) -> int:
    """Fragmentation margin on a chunk's activations (see ALLOC_MARGIN)."""
    return math.ceil(activations * ALLOC_MARGIN) + _largest_block(
        cfg, chunk, max_context, act_bytes
    )


def fixed_scratch(cfg: ModelConfig, max_context: int, act_bytes: int = 2) -> int:
    """What the workspace holds besides a chunk's activations: the chunk's undo snapshot, the
    call's token ids on the device (int64, up to max_context), cuBLAS's workspace and the decode
    allowance."""
    return (
        snapshot_bytes(cfg, act_bytes)
        + max_context * 8
        + CUBLAS_WORKSPACE_BYTES
        + DECODE_ALLOWANCE_BYTES
    )


def prefill_workspace(
    cfg: ModelConfig, chunk: int, max_context: int, act_bytes: int = 2, quant_sim: bool = True
) -> int:
    """GPU bytes the plan reserves beside the weights, state and expert pool for prefill chunks
    of `chunk` tokens and decode: the activations' peak, the allocator margin, the fixed
    scratch (`fixed_scratch`)."""
    act = prefill_activation_bytes(cfg, chunk, max_context, act_bytes, quant_sim)
    margin = alloc_margin(cfg, chunk, max_context, act_bytes, act)
    return act + margin + fixed_scratch(cfg, max_context, act_bytes)


def group_stream_bytes(
    cfg: ModelConfig, chunk: int, group: int | None, max_context: int, act_bytes: int = 2
) -> int:
    """What prefilling `group` tokens layer by layer (`Runner.steps`) holds beyond one chunk's
    activations: the other chunks' streams [chunk, hc_mult, hidden] and what their segment A
    hands to their experts (every chunk's A of a layer is queued before the first chunk's
    experts) while one chunk passes a layer (0 for chunk by chunk)."""
    if not group or group <= chunk:
        return 0
    chunks = -(-min(group, max_context) // chunk)
    return (chunks - 1) * (
        _chunk_streams(cfg, chunk, act_bytes) + _chunk_pending(cfg, chunk, act_bytes)
    )


def _chunk_streams(cfg: ModelConfig, chunk: int, act_bytes: int) -> int:
    """One chunk's streams [chunk, hc_mult, hidden]."""
    return chunk * cfg.hc_mult * cfg.hidden_size * act_bytes


def _chunk_pending(cfg: ModelConfig, chunk: int, act_bytes: int) -> int:
    """What one chunk's segment A hands on besides its streams (model.FfnPending): the experts'
    input u and the shared expert's output [chunk, hidden], mHC's post [chunk, N] and comb
    [chunk, N, N] in fp32, the expert ids (int64) and routing weights (fp32) [chunk, K]."""
    N, K = cfg.hc_mult, cfg.num_experts_per_tok
    return chunk * (2 * cfg.hidden_size * act_bytes + (N + N * N) * 4 + K * (8 + 4))


# A derived layer-by-layer group (`derive_group`) takes at most this share of the expert pool the
# plan leaves without one: at 24 GiB on V4-Flash the default 16K group's 578 MiB (4.4% of the
# pool); on a small card, where the same streams would cost a fifth of the pool's slots (and
# decode speed with them), a smaller group or none.
GROUP_POOL_SHARE = 1 / 8


def derive_group(
    cfg: ModelConfig, chunk: int, pool_bytes: int, max_context: int, act_bytes: int = 2
) -> int:
    """The default layer-by-layer group (tokens): the most chunks, up to DEFAULT_PREFILL_GROUP
    tokens and max_context, whose other chunks' streams and pending A (`group_stream_bytes`)
    take at most GROUP_POOL_SHARE of `pool_bytes`; 0 (chunk by chunk) when fewer than two
    chunks would."""
    most = -(-min(DEFAULT_PREFILL_GROUP, max_context) // chunk)
    per_chunk = _chunk_streams(cfg, chunk, act_bytes) + _chunk_pending(cfg, chunk, act_bytes)
    n = min(most, 1 + int(GROUP_POOL_SHARE * pool_bytes) // per_chunk)
    return n * chunk if n >= 2 else 0


def _chunks(max_context: int) -> list[int]:
    """Candidate derived chunks, ascending: powers of two from MIN_PREFILL_CHUNK up to
    MAX_PREFILL_CHUNK, stopping at the first that holds max_context whole."""
    out, c = [], MIN_PREFILL_CHUNK
    while c <= MAX_PREFILL_CHUNK:
        out.append(c)
        if c >= max_context:
            break
        c *= 2
    return out


def derive_chunk(
    cfg: ModelConfig, room: int, max_context: int, act_bytes: int = 2, quant_sim: bool = True
) -> int:
    """The prefill chunk for `room` bytes left after dense weights, state and RoPE tables: the
    largest candidate whose workspace is at most PREFILL_SHARE of it (MIN_PREFILL_CHUNK when
    none is: the plan then says whether even that fits)."""
    best = _largest_within(
        cfg, _chunks(max_context), PREFILL_SHARE * room, max_context, act_bytes, quant_sim
    )
    return best if best is not None else MIN_PREFILL_CHUNK


def _largest_within(
    cfg: ModelConfig,
    chunks: list[int],
    limit: float,
    max_context: int,
    act_bytes: int,
    quant_sim: bool,
    group: int | None = None,
) -> int | None:
    """The last of `chunks` (ascending) whose prefill workspace (with a layer-by-layer group's
    streams and pending A, `group_stream_bytes`) is at most `limit` bytes."""
    fit = [
        c
        for c in chunks
        if prefill_workspace(cfg, c, max_context, act_bytes, quant_sim)
        + group_stream_bytes(cfg, c, group, max_context, act_bytes)
        <= limit
    ]
    return fit[-1] if fit else None


def _gb_up(n: int) -> float:
    """Bytes as GiB rounded up to 0.1 (a "raise to at least" figure must be enough)."""
    return math.ceil(n / GiB * 10) / 10


# How a problem names the settings: Python keywords, or the CLI's flags.
PY_NAMES = {"gpu": "gpu_mem_gb", "chunk": "prefill_chunk", "ctx": "max_context", "eq": "="}
CLI_NAMES = {"gpu": "--gpu-mem-gb", "chunk": "--prefill-chunk", "ctx": "--max-context", "eq": " "}


@dataclass(frozen=True)
class MemoryPlan:
    gpu_budget: int
    host_budget: int
    dense: int
    state: int  # decode state of every session
    rope: int  # RoPE tables
    chunk: int  # prefill chunk (tokens)
    chunk_derived: bool  # chunk chosen by derive_chunk (else given)
    activations: int  # peak transient bytes of one chunk (prefill_activation_bytes)
    margin: int  # the allocator's fragmentation margin on them (alloc_margin)
    group: int  # tokens prefilled layer by layer (0: chunk by chunk)
    group_derived: bool  # group chosen by derive_group (else given)
    group_streams: int  # a group's other chunks' streams and pending A (group_stream_bytes)
    workspace: int  # prefill_workspace(chunk) + group_streams
    record: int
    min_slots: int  # the fewest expert slots a step runs with (one token's experts)
    n_experts: int
    gpu_slots: int
    host_slots: int
    disk_experts: int
    fitting_chunk: int  # largest power-of-two chunk <= chunk that fits (0: none does)

    @property
    def need(self) -> int:
        """GPU bytes this plan needs at least: everything but the pool, plus min_slots slots."""
        return self.dense + self.state + self.rope + self.workspace + self.min_slots * self.record

    @property
    def fits(self) -> bool:
        return self.need <= self.gpu_budget

    @property
    def min_gpu_gb(self) -> float:
        """Smallest gpu_mem_gb that holds this plan (rounded up to 0.1 GiB)."""
        return _gb_up(self.need)

    def breakdown(self) -> str:
        g = GiB
        return (
            f"dense weights {self.dense / g:.2f} GiB + decode state {self.state / g:.2f} GiB + "
            f"RoPE tables {self.rope / g:.2f} GiB + prefill workspace {self.workspace / g:.2f} "
            f"GiB ({self.chunk}-token chunks) + {self.min_slots} expert slots of "
            f"{self.record / MiB:.2f} MiB need {self.need / g:.2f} GiB"
        )

    def problem(self, names: dict[str, str] = PY_NAMES) -> str | None:
        """Why this plan cannot run, with the numbers and what to change (None: it fits).
        `names`: PY_NAMES for load()'s keywords, CLI_NAMES for the command's flags."""
        if self.fits:
            return None
        gpu, chunk, ctx, eq = names["gpu"], names["chunk"], names["ctx"], names["eq"]
        budget = f"{gpu}{eq}{self.gpu_budget / GiB:.1f}"
        if not self.chunk_derived and self.fitting_chunk:
            return (
                f"{chunk}{eq}{self.chunk} does not fit {budget}: {self.breakdown()}; lower "
                f"{chunk} to at most {self.fitting_chunk} (or leave it unset to derive it from "
                f"the budget), raise {gpu} to at least {self.min_gpu_gb:.1f}, or lower {ctx}"
            )
        return (
            f"{budget} is too small: {self.breakdown()}; raise {gpu} to at least "
            f"{self.min_gpu_gb:.1f} or lower {ctx}"
        )

    def lines(self, hypothetical: bool = False) -> list[str]:
        """The plan as text; `hypothetical`: the GPU budget is an example, not this machine's."""
        g = GiB
        how = "derived from the budget" if self.chunk_derived else "as set"
        out = [
            f"GPU budget {self.gpu_budget / g:.1f} GiB: dense weights {self.dense / g:.2f} GiB, "
            f"decode state {self.state / g:.2f} GiB, RoPE tables {self.rope / g:.2f} GiB, "
            f"workspace {self.workspace / g:.2f} GiB, "
            f"expert pool {self.gpu_slots} slots x {self.record / MiB:.2f} MiB "
            f"= {self.gpu_slots * self.record / g:.2f} GiB",
            f"prefill chunk {self.chunk} tokens ({how}): workspace {self.workspace / g:.2f} GiB "
            f"= activations {self.activations / g:.2f} GiB + allocator margin "
            f"{self.margin / g:.2f} GiB + decode graphs and fixed scratch "
            f"{(self.workspace - self.activations - self.margin - self.group_streams) / MiB:.0f}"
            " MiB"
            + (
                f" + the other chunks' streams and pending A of a layer-by-layer group "
                f"{self.group_streams / MiB:.0f} MiB"
                if self.group_streams
                else ""
            ),
            f"prefill layer by layer in groups of {self.group} tokens "
            f"({'derived from the pool' if self.group_derived else 'as set'})"
            if self.group
            else "prefill chunk by chunk"
            + (
                " (derived: max_context, or an eighth of the expert pool, holds less than "
                "two chunks)"
                if self.group_derived
                else ""
            ),
            f"pinned host {self.host_budget / g:.1f} GiB: {self.host_slots} experts",
            f"disk (memory-mapped): {self.disk_experts} experts",
            f"experts total {self.n_experts}: "
            f"{100 * self.gpu_slots / max(self.n_experts, 1):.1f}% on GPU, "
            f"{100 * self.host_slots / max(self.n_experts, 1):.1f}% pinned",
        ]
        card = f"a hypothetical {self.gpu_budget / g:g} GiB card" if hypothetical else None
        if self.fits:
            out.append(f"fits {card}: yes" if card else "fits: yes")
        else:
            lower = (
                f", lower --prefill-chunk to at most {self.fitting_chunk}"
                if not self.chunk_derived and self.fitting_chunk
                else ""
            )
            out.append(
                f"fits{' ' + card if card else ''}: NO - {self.breakdown()}; raise --gpu-mem-gb "
                f"(Python: gpu_mem_gb) to at least {self.min_gpu_gb:.1f}{lower} or lower "
                "--max-context"
            )
        return out


def memory_plan(
    cfg: ModelConfig,
    gpu_mem_gb: float,
    host_mem_gb: float,
    max_context: int,
    act_bytes: int = 2,
    sessions: int = 1,
    prefill_chunk: int | None = None,
    quant_sim: bool = True,
    mtp: bool = False,
    prefill_group: int | None = None,
    derive_prefill_group: bool = False,
) -> MemoryPlan:
    """The GPU split for `sessions` sessions of decode state at max_context each (`mtp`: with
    the MTP block's dense weights, window state and experts).

    prefill_chunk None: derived from the budget (`derive_chunk`: the largest power of two in
    [64, 4096] whose workspace takes at most a quarter of what dense weights, decode state and
    RoPE tables leave; 64 when none does). A given chunk is used as is; `fits` then says whether
    it leaves room for a token's experts, and `fitting_chunk` which chunk would.
    prefill_group: tokens prefilled layer by layer; the other chunks' streams and pending A join
    the workspace (`group_stream_bytes`). `derive_prefill_group` (with prefill_group None): the
    group is `derive_group`'s for the pool a plan without one leaves.
    """
    if derive_prefill_group and prefill_group is None:
        args = (cfg, gpu_mem_gb, host_mem_gb, max_context, act_bytes, sessions)
        base = memory_plan(*args, prefill_chunk, quant_sim, mtp)
        group = derive_group(cfg, base.chunk, base.gpu_slots * base.record, max_context, act_bytes)
        p = memory_plan(*args, base.chunk if prefill_chunk is None else prefill_chunk,
                        quant_sim, mtp, group)  # fmt: skip
        return dataclasses.replace(p, chunk_derived=prefill_chunk is None, group_derived=True)
    dense = dense_bytes(cfg, include_mtp=mtp)
    state = sessions * state_bytes(cfg, max_context, act_bytes)
    if mtp:  # its window ring per session
        state += sessions * cfg.sliding_window * cfg.head_dim * act_bytes
    rope = rope_table_bytes(cfg, max_context)
    record = record_bytes(cfg)
    n = (cfg.num_hidden_layers + int(mtp)) * cfg.n_routed_experts
    gpu = int(gpu_mem_gb * GiB)
    host = int(host_mem_gb * GiB)
    room = gpu - dense - state - rope
    derived = prefill_chunk is None
    chunk = derive_chunk(cfg, room, max_context, act_bytes, quant_sim) if derived else prefill_chunk
    act = prefill_activation_bytes(cfg, chunk, max_context, act_bytes, quant_sim)
    streams = group_stream_bytes(cfg, chunk, prefill_group, max_context, act_bytes)
    workspace = prefill_workspace(cfg, chunk, max_context, act_bytes, quant_sim) + streams
    min_slots = cfg.num_experts_per_tok
    # the chunks `fitting` may name: powers of two from MIN_PREFILL_CHUNK up to the chunk
    powers = [MIN_PREFILL_CHUNK << i for i in range(chunk.bit_length())]  # >= chunk at the end
    fitting = _largest_within(
        cfg, [c for c in powers if c <= chunk], room - min_slots * record, max_context,
        act_bytes, quant_sim, prefill_group,
    ) or 0  # fmt: skip
    gpu_slots = max(0, min(n, (room - workspace) // record))
    host_slots = max(0, min(n - gpu_slots, host // record))
    return MemoryPlan(
        gpu_budget=gpu,
        host_budget=host,
        dense=dense,
        state=state,
        rope=rope,
        chunk=chunk,
        chunk_derived=derived,
        activations=act,
        margin=alloc_margin(cfg, chunk, max_context, act_bytes, act),
        group=prefill_group if prefill_group and prefill_group > chunk else 0,
        group_derived=False,
        group_streams=streams,
        workspace=workspace,
        record=record,
        min_slots=min_slots,
        n_experts=n,
        gpu_slots=gpu_slots,
        host_slots=host_slots,
        disk_experts=n - gpu_slots - host_slots,
        fitting_chunk=fitting,
    )


# --- what this machine has -----------------------------------------------------------------------
def host_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM from /proc/meminfo; (0, 0) where it is not readable."""
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return info.get("MemTotal", 0), info.get("MemAvailable", 0)


def default_host_budget_gb() -> float:
    """A safe fraction of available RAM for pinned experts (the default of --host-mem-gb)."""
    _, avail = host_memory()
    return avail * (1 - HOST_RESERVE_FRACTION) / GiB


def default_gpu_budget_gb(device: str = "cuda") -> float | None:
    """The default of --gpu-mem-gb: GPU memory free at start (plus what torch already holds in
    this process) x GPU_FREE_FRACTION, on `device`; None where there is no CUDA device.

    The one rule the CLI (generate, serve, chat, profile) and `homeseek doctor` share, and the
    same one `Engine` applies when `load()` gets no gpu_mem_gb.
    """
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    return (free + torch.cuda.memory_allocated(dev)) / GiB * GPU_FREE_FRACTION


def pinned_limit() -> int | None:
    """RLIMIT_MEMLOCK in bytes (None = unlimited). CUDA pinning is not bound by it, mlock is."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def disk_free(path: str | os.PathLike) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
