"""Lightning-indexer scores and top-k selection (v4-architecture.md §3.3, CSA layers).

Letters: T query tokens, HI indexer heads (64), DI indexer head dim (128), C compressed entries
in the indexer key cache, k entries selected (512).

    score[t, c] = sum_h w[t, h] * relu(qI[t, h] . kI[c])     (fp32)
    score[t, c] = -inf where c >= n_valid[t]                 (causality: n_valid = (pos+1) // 4)
    idx[t] = the k best c, -1 where fewer than k entries are valid

Tie-break (documented, identical in the kernel and the twin): higher score first, then the lower
entry index. It is made exact by ranking a 64-bit key: the order-preserving int32 image of the fp32
score in the high half and (2^32 - 1 - c) in the low half. The Triton kernel writes these keys
([T, C] int64, memory bound on kI); the selection is torch.topk over the keys (fixed sizes, no host
sync: graph capturable). The order inside idx is by rank, but callers should treat it as a set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._formats import check_tensor, require_triton, tl, triton

__all__ = [
    "IndexerWorkspace",
    "indexer_keys_ref",
    "indexer_scores_ref",
    "indexer_topk",
    "indexer_topk_ref",
    "indexer_workspace",
]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_NEG_INF_KEY = -2139095041  # ordered int32 image of -inf: 0xFF800000 ^ 0x7FFFFFFF, as signed


def _rows(k: torch.Tensor, c: int | None, row0: torch.Tensor | None) -> torch.Tensor:
    """The C key rows the selection ranks: k itself, or rows row0..row0+C-1 of k when the first
    row comes from a device tensor (one arena slot of a stacked cache, graph-capturable)."""
    if row0 is None:
        return k
    return k.index_select(0, row0.reshape(1).long() + torch.arange(c, device=k.device))


def indexer_scores_ref(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, n_valid: torch.Tensor
) -> torch.Tensor:
    """score [T, C] fp32 (masked entries -inf). q [T, HI, DI], k [C, DI], w [T, HI], n_valid [T]."""
    s = torch.einsum("thd,cd->thc", q.float(), k.float()).relu()
    s = torch.einsum("thc,th->tc", s, w.float())
    c = torch.arange(k.shape[0], device=k.device)
    return s.masked_fill(c[None, :] >= n_valid.long()[:, None], float("-inf"))


def indexer_keys_ref(score: torch.Tensor) -> torch.Tensor:
    """fp32 scores [T, C] -> int64 ranking keys (see the module docstring)."""
    bits = score.contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    c = torch.arange(score.shape[-1], device=score.device, dtype=torch.int64)
    return (ordered.to(torch.int64) << 32) | (0xFFFFFFFF - c)


def _select(keys: torch.Tensor, topk: int, out: torch.Tensor, vals=None, inds=None) -> None:
    """Top-k over ranking keys into out [T, topk] int32 (-1 for masked or missing entries)."""
    n_sel = min(topk, keys.shape[1])
    out.fill_(-1)
    if n_sel == 0:
        return
    if vals is None:
        vals, inds = torch.topk(keys, n_sel, dim=1)
    else:
        torch.topk(keys, n_sel, dim=1, out=(vals, inds))
    ok = (vals >> 32) > _NEG_INF_KEY
    out[:, :n_sel] = torch.where(ok, inds, torch.full_like(inds, -1)).to(torch.int32)


def indexer_topk_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    n_valid: torch.Tensor,
    topk: int = 512,
    *,
    n_keys: int | None = None,
    k_row0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Numerical definition: idx [T, topk] int32 of the best entries (-1 = none). With k_row0
    (device int [1]) the keys are rows k_row0..k_row0+n_keys-1 of k and idx counts from k_row0."""
    keys = indexer_keys_ref(indexer_scores_ref(q, _rows(k, n_keys, k_row0), w, n_valid))
    out = torch.empty(q.shape[0], topk, dtype=torch.int32, device=q.device)
    _select(keys, topk, out)
    return out


@triton.jit
def _indexer_keys_kernel(
    q_ptr,  # [T, HI, DI] contiguous
    k_ptr,  # [C, DI], row stride stride_k
    w_ptr,  # [T, HI] fp32/bf16 head weights, contiguous
    nv_ptr,  # [T] int32 number of usable entries per token
    row0_ptr,  # [1] int first key row (HAS_ROW0), else unused
    keys_ptr,  # [T, C] int64 ranking keys (output)
    HI,
    C,
    DI,
    stride_k,
    BLOCK_H: tl.constexpr,  # next power of two >= HI
    BLOCK_D: tl.constexpr,  # next power of two >= DI
    BLOCK_C: tl.constexpr,  # entries per program
    IEEE_FP32: tl.constexpr,
    HAS_ROW0: tl.constexpr,
):
    t = tl.program_id(0)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if HAS_ROW0:
        k_ptr += tl.load(row0_ptr).to(tl.int64) * stride_k
    hh = tl.arange(0, BLOCK_H)
    dd = tl.arange(0, BLOCK_D)
    n_valid = tl.load(nv_ptr + t)
    c_ok = cc < C
    q = tl.load(
        q_ptr + (t * HI + hh[:, None]).to(tl.int64) * DI + dd[None, :],
        mask=(hh[:, None] < HI) & (dd[None, :] < DI),
        other=0.0,
    )
    # Entries past n_valid are masked anyway: skip reading them.
    k = tl.load(
        k_ptr + cc[:, None].to(tl.int64) * stride_k + dd[None, :],
        mask=(c_ok & (cc < n_valid))[:, None] & (dd[None, :] < DI),
        other=0.0,
    )
    if IEEE_FP32:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_H, BLOCK_C]
    else:
        s = tl.dot(q, tl.trans(k))
    w = tl.load(w_ptr + t * HI + hh, mask=hh < HI, other=0.0).to(tl.float32)
    score = tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)
    score = tl.where(cc < n_valid, score, float("-inf"))
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (4294967295 - cc.to(tl.int64))
    tl.store(keys_ptr + t.to(tl.int64) * C + cc, key, mask=c_ok)


@dataclass
class IndexerWorkspace:
    """Scratch for one (T, C, topk); allocate once at startup."""

    keys: torch.Tensor  # [T, C] int64
    vals: torch.Tensor  # [T, min(topk, C)] int64
    inds: torch.Tensor  # [T, min(topk, C)] int64


def indexer_workspace(t: int, c: int, topk: int, device: torch.device | str) -> IndexerWorkspace:
    n = min(topk, c)
    return IndexerWorkspace(
        torch.empty(t, c, dtype=torch.int64, device=device),
        torch.empty(t, n, dtype=torch.int64, device=device),
        torch.empty(t, n, dtype=torch.int64, device=device),
    )


def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    n_valid: torch.Tensor,
    topk: int = 512,
    *,
    out: torch.Tensor | None = None,
    workspace: IndexerWorkspace | None = None,
    config: dict | None = None,
    n_keys: int | None = None,
    k_row0: torch.Tensor | None = None,
) -> torch.Tensor:
    """idx [T, topk] int32: the indexer's best compressed entries per token (-1 = none).

    q [T, HI, DI] and k [C, DI] (rows may be strided) bf16/fp16/fp32 of one dtype; w [T, HI]
    fp32 (or bf16) head weights (already scaled); n_valid [T] int32 usable entries per token.
    With k_row0 (device int [1]) the keys are the n_keys rows of k from row k_row0 on: one slot
    of a stacked cache chosen on the device, so the launch stays graph-capturable.
    """
    require_triton("indexer_topk")
    check_tensor("indexer_topk: q", q, dtypes=_DTYPES)
    if q.dim() != 3:
        raise ValueError(f"indexer_topk: q must be [T, HI, DI], got {list(q.shape)}")
    t, hi, di = q.shape
    dev = q.device
    check_tensor("indexer_topk: k", k, shape=(None, di), dtypes=(q.dtype,), contiguous=False)
    if k.stride(1) != 1:
        raise ValueError("indexer_topk: k must have unit column stride")
    c = k.shape[0]
    if k_row0 is not None:
        if n_keys is None or n_keys > c:
            raise ValueError(f"indexer_topk: k_row0 needs n_keys <= {c}, got {n_keys}")
        check_tensor("indexer_topk: k_row0", k_row0, shape=(1,), device=dev)
        c = n_keys
    check_tensor(
        "indexer_topk: w", w, shape=(t, hi), dtypes=(torch.float32, torch.bfloat16), device=dev
    )
    check_tensor("indexer_topk: n_valid", n_valid, shape=(t,), dtypes=(torch.int32,), device=dev)
    if out is None:
        out = torch.empty(t, topk, dtype=torch.int32, device=dev)
    check_tensor("indexer_topk: out", out, shape=(t, topk), dtypes=(torch.int32,), device=dev)
    if workspace is None:
        workspace = indexer_workspace(t, c, topk, dev)
    ws = workspace
    n_sel = min(topk, c)
    if tuple(ws.keys.shape) != (t, c) or tuple(ws.vals.shape) != (t, n_sel):
        raise ValueError(
            f"indexer_topk: workspace keys {list(ws.keys.shape)} / vals {list(ws.vals.shape)} "
            f"do not match T={t}, C={c}, topk={topk}"
        )
    if t == 0:
        return out
    cfg = dict(config or {})
    bc = cfg.get("block_c", 64)
    if c > 0:
        _indexer_keys_kernel[(t, triton.cdiv(c, bc))](
            q, k, w, n_valid, k_row0 if k_row0 is not None else n_valid, ws.keys, hi, c, di,
            k.stride(0),
            BLOCK_H=max(16, triton.next_power_of_2(hi)), BLOCK_D=triton.next_power_of_2(di),
            BLOCK_C=bc, IEEE_FP32=q.dtype == torch.float32, HAS_ROW0=k_row0 is not None,
            num_warps=cfg.get("num_warps", 4),
        )  # fmt: skip
    _select(ws.keys, topk, out, ws.vals, ws.inds)
    return out
