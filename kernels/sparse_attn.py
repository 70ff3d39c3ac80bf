"""Decode sparse attention with a sink over one shared K=V head (v4-architecture.md §3.3).

Letters: T query tokens (<= 4 at decode), H heads (64), Dh head dim (512), N rows of the KV buffer,
L selected keys per token.

    l_j = scale * q_h . kv[idx[t, j]]          (idx < 0: masked)
    o_h = sum_j e^(l_j - M) kv_j / (sum_j e^(l_j - M) + e^(sink_h - M))

fp32 logits, softmax and accumulation; values are the keys. A token with no valid key gets 0.

Kernel: a program owns BLOCK_H heads of one token (all heads share the keys, so each key block is
loaded once per head block and used by tl.dot for q.k and p.v) and one slice of the L keys
(flash-decoding split). Each split keeps a running max starting at the sink (so a split whose keys
are all masked stays finite) and writes (max, denominator, accumulator) partials; the last split to
arrive (atomic counter, reset afterwards) merges them in a fixed order and adds the sink term.
With one split the program writes the output directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._formats import check_tensor, require_triton, tl, triton

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no triton (CPU-only install): the launcher refuses before it launches

    class OutOfResources(Exception):  # type: ignore[no-redef]
        pass


__all__ = ["SparseAttnWorkspace", "sparse_attn", "sparse_attn_ref", "sparse_attn_workspace"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BLOCK_H = 16
_KEYS_PER_SPLIT = 256
_NO_SPLIT_PROGRAMS = 256  # (token, head block) programs that fill an H100/H200 without splits
# Prefill tiles, from PREFILL_T tokens on (decode and the verify step have <= 4): all 64 heads of
# a token in one program, so each key block comes from L2 once instead of once per 16-head block,
# in 64-key blocks, never split. H200, a 4,096-token chunk of V4-Flash (tools/PERF_NOTES.md,
# session 19): CSA (640 keys a token) 4.23 -> 1.52 ms, HCA (160 keys) 1.17 -> 0.60 ms.
PREFILL_TILES = {
    "block_h": 64, "block_l": 64, "num_warps": 8, "num_stages": 2, "no_split_programs": 64,
}  # fmt: skip
PREFILL_T = 64
_PREFILL_FITS: dict[tuple[str, int | None], bool] = {}  # device -> whether the prefill tiles fit


def sparse_attn_ref(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """Numerical definition. q [T, H, Dh], kv [N, Dh], idx [T, L] int (-1 = masked), sink [H]
    fp32 -> o [T, H, Dh] in q's dtype (fp32 math)."""
    t, h, _ = q.shape
    valid = idx >= 0
    k = kv[idx.clamp(min=0).long()].float()  # [T, L, Dh]
    logits = torch.einsum("thd,tld->thl", q.float(), k) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    # The sink is one more logit with no value: it only enlarges the denominator.
    full = torch.cat([logits, sink.float()[None, :, None].expand(t, h, 1)], dim=-1)
    p = torch.softmax(full, dim=-1)[..., :-1]
    return torch.einsum("thl,tld->thd", p, k).to(q.dtype)


@triton.jit
def _split_term(pacc_ptr, base, s_i, w, ss, dd, o_mask, DH):
    """Split s_i's accumulator [BLOCK_H, BLOCK_D] times its merge weight (column s_i of w)."""
    a_s = tl.load(
        pacc_ptr + (base + s_i)[:, None] * DH + dd[None, :],
        mask=o_mask,
        other=0.0,
        cache_modifier=".cg",
    )
    w_i = tl.sum(tl.where(ss[None, :] == s_i, w, 0.0), axis=1)
    return w_i[:, None] * a_s


@triton.jit
def _sparse_attn_kernel(
    q_ptr,  # [T, H, Dh], contiguous
    kv_ptr,  # [N, Dh], row stride stride_kv
    idx_ptr,  # [T, L] int32, contiguous (-1 = masked)
    sink_ptr,  # [H] fp32
    out_ptr,  # [T, H, Dh], contiguous
    pacc_ptr,  # [T, H, SPLIT, Dh] fp32 partial accumulators (SPLIT > 1)
    pml_ptr,  # [T, H, SPLIT, 2] fp32 partial (max, denominator) (SPLIT > 1)
    cnt_ptr,  # [T * ceil(H/BLOCK_H)] int32 arrival counters, zero before and after
    H,
    L,
    DH,
    stride_kv,
    scale,
    KEYS_PER_SPLIT,  # multiple of BLOCK_L
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,  # next power of two >= SPLIT
    BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= Dh
    IEEE_FP32: tl.constexpr,
):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < DH
    q = tl.load(
        q_ptr + (t * H + heads[:, None]).to(tl.int64) * DH + dd[None, :],
        mask=h_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0)
    m_i = sink  # running max, starting at the sink keeps fully masked blocks finite
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    j_lo = sp * KEYS_PER_SPLIT
    j_hi = tl.minimum(j_lo + KEYS_PER_SPLIT, L)
    for j0 in range(j_lo, j_hi, BLOCK_L):
        jj = j0 + tl.arange(0, BLOCK_L)
        rows = tl.load(idx_ptr + t * L + jj, mask=jj < j_hi, other=-1)
        ok = rows >= 0
        k = tl.load(
            kv_ptr + rows[:, None].to(tl.int64) * stride_kv + dd[None, :],
            mask=ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if IEEE_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE_FP32:
            pv = tl.dot(p, k, input_precision="ieee")
        else:
            pv = tl.dot(p.to(k.dtype), k)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o_mask = h_ok[:, None] & d_ok[None, :]
    o_offs = (t * H + heads[:, None]).to(tl.int64) * DH + dd[None, :]
    if SPLIT == 1:
        o = acc / (l_i + tl.exp(sink - m_i))[:, None]
        tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        row = (t * H + heads).to(tl.int64) * SPLIT + sp  # [BLOCK_H] partial row
        tl.store(pacc_ptr + row[:, None] * DH + dd[None, :], acc, mask=o_mask)
        tl.store(pml_ptr + row * 2, m_i, mask=h_ok)
        tl.store(pml_ptr + row * 2 + 1, l_i, mask=h_ok)
        tl.debug_barrier()
        c_idx = t * tl.num_programs(1) + hb
        arrived = tl.atomic_add(cnt_ptr + c_idx, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            # Every split's (max, denominator) in one load; the accumulators one load per split,
            # unrolled when there are few so the loads are independent (one L2 round trip, not
            # one per split).
            base = (t * H + heads).to(tl.int64) * SPLIT  # [BLOCK_H] first partial row
            ss = tl.arange(0, SPLIT_P2)
            mk = h_ok[:, None] & (ss < SPLIT)[None, :]
            prow = (base[:, None] + ss[None, :]) * 2  # [BLOCK_H, SPLIT_P2]
            m_s = tl.load(pml_ptr + prow, mask=mk, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(pml_ptr + prow + 1, mask=mk, other=0.0, cache_modifier=".cg")
            m_all = tl.maximum(sink, tl.max(m_s, axis=1))
            w = tl.exp(m_s - m_all[:, None])  # 0 for the padding splits
            den = tl.exp(sink - m_all) + tl.sum(w * l_s, axis=1)
            num = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
            if SPLIT <= 16:
                for s_i in tl.static_range(SPLIT):
                    num += _split_term(pacc_ptr, base, s_i, w, ss, dd, o_mask, DH)
            else:
                for s_i in range(SPLIT):
                    num += _split_term(pacc_ptr, base, s_i, w, ss, dd, o_mask, DH)
            tl.store(
                out_ptr + o_offs, (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask
            )
            tl.atomic_xchg(cnt_ptr + c_idx, 0)


@dataclass
class SparseAttnWorkspace:
    """Split-L scratch; allocate once for the largest (T, L), share across layers of a stream."""

    acc: torch.Tensor  # fp32, >= T * H * SPLIT * Dh
    ml: torch.Tensor  # fp32, >= T * H * SPLIT * 2
    counters: torch.Tensor  # int32 zeros, >= T * ceil(H / 16)


def _n_split(n_keys: int, config: dict, programs: int = 1) -> tuple[int, int]:
    """(splits, keys per split) for `programs` (token, head block) pairs. Default: up to 16
    splits of at least one key block, at most _KEYS_PER_SPLIT keys each (decode has T * H / 16 =
    4 head blocks per token only, so the key splits are what fill the GPU); none once the pairs
    alone fill it (prefill), where the partials would cost T * H * splits * Dh * 4 bytes (2.7 GB
    for a 2,048-token chunk of V4-Flash) for no gain."""
    bl = config.get("block_l", 32)
    if "keys_per_split" not in config and programs >= config.get(
        "no_split_programs", _NO_SPLIT_PROGRAMS
    ):
        return 1, max(1, triton.cdiv(n_keys, bl)) * bl
    per = config.get("keys_per_split", min(_KEYS_PER_SPLIT, triton.cdiv(n_keys, 16)))
    per = max(1, triton.cdiv(per, bl)) * bl
    return max(1, triton.cdiv(n_keys, per)), per


def sparse_attn_workspace(
    max_t: int, h: int, dh: int, max_l: int, device: torch.device | str
) -> SparseAttnWorkspace:
    n_hb = triton.cdiv(h, _BLOCK_H)
    # Split partials: t * split(t) rows per head; split is 1 from _NO_SPLIT_PROGRAMS programs on.
    ts = {max_t, min(max_t, max(1, triton.cdiv(_NO_SPLIT_PROGRAMS, n_hb) - 1))}
    rows = max(t * _n_split(n, {}, t * n_hb)[0] for t in ts for n in range(1, max_l + 1))
    return SparseAttnWorkspace(
        torch.empty(rows * h * dh, dtype=torch.float32, device=device),
        torch.empty(rows * h * 2, dtype=torch.float32, device=device),
        torch.zeros(max_t * triton.cdiv(h, _BLOCK_H), dtype=torch.int32, device=device),
    )


def sparse_attn(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    workspace: SparseAttnWorkspace | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """o [T, H, Dh] = sparse attention of q over kv rows idx [T, L] with per-head sink.

    q [T, H, Dh] bf16/fp16/fp32 contiguous; kv [N, Dh] same dtype (rows may be strided); idx
    [T, L] int32, entries in [0, N) or -1; sink [H] fp32. The split-L path (L > 256 keys) needs
    scratch: pass a workspace from sparse_attn_workspace() to keep the launch allocation-free.
    """
    require_triton("sparse_attn")
    check_tensor("sparse_attn: q", q, dtypes=_DTYPES)
    if q.dim() != 3:
        raise ValueError(f"sparse_attn: q must be [T, H, Dh], got {list(q.shape)}")
    t, h, dh = q.shape
    dev = q.device
    check_tensor("sparse_attn: kv", kv, shape=(None, dh), dtypes=(q.dtype,), contiguous=False)
    if kv.stride(1) != 1:
        raise ValueError("sparse_attn: kv must have unit column stride")
    check_tensor("sparse_attn: idx", idx, shape=(t, None), dtypes=(torch.int32,), device=dev)
    check_tensor("sparse_attn: sink", sink, shape=(h,), dtypes=(torch.float32,), device=dev)
    if out is None:
        out = torch.empty_like(q)
    check_tensor("sparse_attn: out", out, shape=(t, h, dh), dtypes=_DTYPES, device=dev)
    if t == 0:
        return out
    args = (q, kv, idx, sink, out, float(scale), workspace)
    # The prefill tiles need ~131 KB of shared memory on Hopper (~164 KB as compiled for Ada or
    # Blackwell consumer parts, which allow ~100 KB a block: an RTX 4090 or 5090) and more than
    # any GPU has with fp32 operands: where the first launch finds they do not fit, prefill
    # keeps the decode tiles on that device from then on.
    fits_key = (dev.type, dev.index)
    if t >= PREFILL_T and q.element_size() == 2 and _PREFILL_FITS.get(fits_key) is not False:
        try:
            _launch(*args, {**PREFILL_TILES, **(config or {})})
            _PREFILL_FITS[fits_key] = True
            return out
        except OutOfResources:
            _PREFILL_FITS[fits_key] = False
    _launch(*args, dict(config or {}))
    return out


def _launch(q, kv, idx, sink, out, scale, workspace, cfg: dict) -> None:
    """sparse_attn's launch with the tiles of cfg (splits and their workspace included)."""
    t, h, dh = q.shape
    dev = q.device
    n_keys = idx.shape[1]
    bl = cfg.get("block_l", 32)
    bh = cfg.get("block_h", _BLOCK_H)
    if bh < _BLOCK_H or bh & (bh - 1):  # the counters are sized for _BLOCK_H-head blocks
        raise ValueError(f"sparse_attn: block_h must be a power of two >= {_BLOCK_H}, got {bh}")
    n_hb = triton.cdiv(h, bh)
    split, per = _n_split(n_keys, cfg, t * n_hb)
    pacc = pml = cnt = out  # placeholders when split == 1
    if split > 1:
        if workspace is None:
            workspace = SparseAttnWorkspace(
                torch.empty(t * h * split * dh, dtype=torch.float32, device=dev),
                torch.empty(t * h * split * 2, dtype=torch.float32, device=dev),
                torch.zeros(t * n_hb, dtype=torch.int32, device=dev),
            )
        ws = workspace
        if (
            ws.acc.numel() < t * h * split * dh
            or ws.ml.numel() < t * h * split * 2
            or ws.counters.numel() < t * n_hb
        ):
            raise ValueError(
                f"sparse_attn: workspace too small for T={t} H={h} Dh={dh} L={n_keys} "
                f"(split {split}); size it with sparse_attn_workspace()"
            )
        pacc, pml, cnt = ws.acc, ws.ml, ws.counters
    _sparse_attn_kernel[(t, n_hb, split)](
        q, kv, idx, sink, out, pacc, pml, cnt, h, n_keys, dh, kv.stride(0), scale, per,
        SPLIT=split, SPLIT_P2=triton.next_power_of_2(split), BLOCK_H=bh, BLOCK_L=bl,
        BLOCK_D=triton.next_power_of_2(dh),
        IEEE_FP32=q.dtype == torch.float32, num_warps=cfg.get("num_warps", 8),
        num_stages=cfg.get("num_stages", 3),
    )  # fmt: skip
