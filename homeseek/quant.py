"""Number formats of the V4 checkpoint and the quantisation simulation (docs/architecture.md
§2.3, §2.5).

Formats:
* E8M0 scale byte e -> 2^(e-127); 0xFF is NaN. Always handled as raw uint8 bytes.
* FP8 e4m3fn weights with one E8M0 (or fp32) scale per 128x128 block (ceil-sized grid at edges).
* FP4 E2M1 weights packed two per byte (low nibble = even element) with one E8M0 scale per
  32 inputs.

Simulation (what the reference's kernels round, so our fp32/bf16 math sees the same values):
* activations entering an FP8/FP4 linear: per-row blocks of 128, UE8M0 scale rounded up, e4m3;
* KV: the non-rope part in blocks of 64, same rounding;
* indexer q/k: Hadamard rotation, then E2M1 in blocks of 32.
"""

from __future__ import annotations

import functools

import torch

# One definition of the stored formats, shared with the kernels' torch twins.
from homeseek.kernels._formats import (  # noqa: F401 - re-exported as this module's API
    act_quant_ref,
    dequant_fp4,
    e8m0_to_float,
    scale_to_float,
)
from homeseek.kernels._formats import dequant_fp8 as _dequant_fp8
from homeseek.kernels._formats import fp4_unpack as unpack_fp4  # noqa: F401

FP8_MAX = 448.0  # largest finite e4m3fn
FP4_MAX = 6.0  # largest E2M1
# E2M1 code -> value; bit 3 is the sign (docs/architecture.md §2.3).
FP4_TABLE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# --- E8M0 ---------------------------------------------------------------------------------------
def float_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Positive powers of two (float32) -> raw E8M0 bytes. The caller guarantees exactness."""
    m, e = torch.frexp(scale.float())  # scale = m * 2^e with m = 0.5 for powers of two
    if not bool((m == 0.5).all()):
        raise ValueError("E8M0 scales must be powers of two")
    return (e - 1 + 127).clamp(0, 254).to(torch.uint8)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(x)) for positive float32 x, exactly (the reference's UE8M0 'round up')."""
    m, e = torch.frexp(x)
    # x = m * 2^e, m in [0.5, 1): a power of two (m == 0.5) is its own ceiling.
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(x), e)


# --- FP8 ----------------------------------------------------------------------------------------
def expand_block_scale(s: torch.Tensor, shape: tuple[int, int], block: int = 128) -> torch.Tensor:
    """[ceil(N/b), ceil(K/b)] block scales -> [N, K] (edges cut)."""
    n, k = shape
    return s.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 e4m3 weight [N, K] + 128x128 block scale (E8M0 or fp32) -> float32 [N, K], exactly."""
    if block != 128:
        raise ValueError(f"FP8 weights use 128x128 blocks (V4's weight_block_size), got {block}")
    return _dequant_fp8(q, scale)


def quant_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (e4m3 [N, K], E8M0 bytes [ceil(N/b), ceil(K/b)]), power-of-two scales."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = w.new_zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4)  # [nb, kb]
    s = pow2_ceil(amax / FP8_MAX)
    q = (w.float() / expand_block_scale(s, (n, k), block)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), float_to_e8m0(s)


# --- FP4 ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _fp4_lut(device: torch.device) -> torch.Tensor:
    return torch.tensor(FP4_TABLE, dtype=torch.float32, device=device)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest E2M1 value, ties to the even mantissa, saturating at 6."""
    a = x.abs()
    # Thresholds between neighbours; `<=` where the lower neighbour has the even mantissa.
    q = torch.where(
        a <= 0.25,
        0.0,
        torch.where(
            a < 0.75,
            0.5,
            torch.where(
                a <= 1.25,
                1.0,
                torch.where(
                    a < 1.75,
                    1.5,
                    torch.where(
                        a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5, 4.0, 6.0))
                    ),
                ),
            ),
        ),
    )
    return torch.copysign(q, x)


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """Exact E2M1 values [..., n] -> packed bytes [..., n/2] (low nibble = even element)."""
    lut = _fp4_lut(values.device)
    # Match on value and sign bit, so -0.0 keeps its code 8.
    code = (values.unsqueeze(-1) == lut).to(torch.uint8).argmax(-1)
    neg_zero = (values == 0) & torch.signbit(values)
    code = torch.where(neg_zero, torch.full_like(code, 8), code)
    code = code.view(*values.shape[:-1], -1, 2)
    return (code[..., 0] | (code[..., 1] << 4)).to(torch.uint8)


def quant_fp4_groups(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (packed E2M1 [out, in/2] uint8, E8M0 bytes [out, in/group])."""
    out, inp = w.shape
    g = w.float().view(out, inp // group, group)
    amax = g.abs().amax(-1).clamp_min(FP4_MAX * 2.0**-126)
    s = pow2_ceil(amax / FP4_MAX)
    q = round_e2m1(g / s.unsqueeze(-1)).view(out, inp)
    return pack_fp4(q), float_to_e8m0(s)


# --- simulation of the reference's in-kernel rounding (docs/architecture.md §2.5) -----------------
def _per_block(x: torch.Tensor, block: int, fn) -> torch.Tensor:
    """Apply `fn` to [..., nblocks, block] views of the last dim; a ragged tail is its own block.

    V4-Flash widths are all multiples of the block; tails only occur in tiny test configs.
    """
    k = x.shape[-1]
    full = (k // block) * block
    parts = []
    if full:
        xb = x[..., :full].float().unflatten(-1, (full // block, block))
        parts.append(fn(xb).flatten(-2))
    if k > full:
        parts.append(fn(x[..., full:].float().unsqueeze(-2)).squeeze(-2))
    return torch.cat(parts, dim=-1).to(x.dtype)


def _fp4_qdq(xb: torch.Tensor) -> torch.Tensor:
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126)
    s = pow2_ceil(amax / FP4_MAX)
    return round_e2m1(xb / s) * s


def fp8_block_sim(x: torch.Tensor, block: int) -> torch.Tensor:
    """Quantise-dequantise the last dim in blocks: UE8M0 scale rounded up (amax floor 1e-4),
    e4m3 round-to-nearest-even. Returns the input dtype. Block 128 for linear inputs, 64 for KV.
    The definition is the kernels' own (`act_quant_ref`), so engine and kernels round alike.
    """
    return act_quant_ref(x, block).to(x.dtype)


def act_quant_sim(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The activation rounding in front of every FP8/FP4 linear (blocks of 128 per row)."""
    return fp8_block_sim(x, block)


def fp4_block_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantise-dequantise to E2M1 in blocks of 32 (amax floor 6·2^-126; indexer q and keys)."""
    return _per_block(x, block, _fp4_qdq)


@functools.lru_cache(maxsize=8)
def hadamard_matrix(n: int, device: torch.device) -> torch.Tensor:
    """Sylvester Hadamard H[i, j] = (-1)^popcount(i & j), scaled by n^-1/2 (orthonormal)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    i = torch.arange(n)
    bits = (i[:, None] & i[None, :]).to(torch.int64)
    pop = torch.zeros_like(bits)
    while bool(bits.any()):
        pop += bits & 1
        bits >>= 1
    h = 1.0 - 2.0 * (pop % 2).float()
    return (h * n**-0.5).to(device)


def hadamard(x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """x -> x·H over the last dim (fp32 math, input dtype out). h: the matrix, when the caller
    holds it (code compiled with torch.compile cannot build it)."""
    if h is None:
        h = hadamard_matrix(x.shape[-1], x.device)
    return (x.float() @ h).to(x.dtype)
