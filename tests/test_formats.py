"""FP4 / FP8 / E8M0 decoding bit-exact against the formulas and torch's own dtypes, and the
quantisation simulation against independent float64 restatements of docs/architecture.md §2.5."""

from __future__ import annotations

import math

import pytest
import torch

from homeseek import quant

ALL_BYTES = torch.arange(256, dtype=torch.int32).to(torch.uint8)


def e4m3_formula(b: int) -> float:
    """e4m3fn: s eeee mmm, bias 7, no infinities, 0x7F/0xFF NaN."""
    s, e, m = b >> 7, (b >> 3) & 0xF, b & 7
    if e == 15 and m == 7:
        return math.nan
    v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if s else v


def e2m1_formula(c: int) -> float:
    """E2M1: s ee m, bias 1; e = 0 is subnormal (m · 0.5)."""
    s, e, m = c >> 3, (c >> 1) & 3, c & 1
    v = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -v if s else v


def test_e8m0_all_bytes_formula_and_torch():
    got = quant.e8m0_to_float(ALL_BYTES)
    for b in range(255):
        assert got[b].item() == 2.0 ** (b - 127), b
    assert math.isnan(got[255].item())
    ours = got.view(torch.int32)[:255]
    theirs = ALL_BYTES.view(torch.float8_e8m0fnu).float().view(torch.int32)[:255]
    assert torch.equal(ours, theirs)
    assert torch.isnan(ALL_BYTES.view(torch.float8_e8m0fnu).float()[255])


def test_e8m0_roundtrip_and_power_of_two_check():
    s = quant.e8m0_to_float(ALL_BYTES[:255])
    assert torch.equal(quant.float_to_e8m0(s), ALL_BYTES[:255])
    with pytest.raises(ValueError):
        quant.float_to_e8m0(torch.tensor([3.0]))


def test_fp4_table_matches_formula():
    assert [e2m1_formula(c) for c in range(16)] == list(quant.FP4_TABLE)
    assert math.copysign(1, quant.FP4_TABLE[8]) == -1  # code 8 is -0


def test_fp4_unpack_nibble_order_all_bytes():
    vals = quant.unpack_fp4(ALL_BYTES.view(1, 256))[0]  # [512]
    for b in range(256):
        assert vals[2 * b].item() == e2m1_formula(b & 0xF)  # low nibble = even element
        assert vals[2 * b + 1].item() == e2m1_formula(b >> 4)


def test_fp4_packing_matches_torch_float4_layout():
    """torch.float4_e2m1fn_x2 stores element 2k in the low nibble too: same bytes, same order."""
    vals = quant.unpack_fp4(ALL_BYTES.view(16, 16))
    packed = quant.pack_fp4(vals)
    assert torch.equal(packed, ALL_BYTES.view(16, 16))
    assert packed.view(torch.float4_e2m1fn_x2).shape == (16, 16)  # one x2 element per byte
    assert torch.equal(packed.view(torch.float4_e2m1fn_x2).view(torch.uint8), packed)


def test_dequant_fp4_with_group_scales():
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (8, 64), generator=g, dtype=torch.int32).to(torch.uint8)
    scale = torch.randint(110, 140, (8, 4), generator=g, dtype=torch.int32).to(torch.uint8)
    w = quant.dequant_fp4(packed, scale.view(torch.float8_e8m0fnu))
    for i in range(8):
        for j in range(128):
            b = packed[i, j // 2].item()
            code = b & 0xF if j % 2 == 0 else b >> 4
            want = e2m1_formula(code) * 2.0 ** (scale[i, j // 32].item() - 127)
            assert w[i, j].item() == want


def test_e4m3_all_bytes_formula_and_torch():
    fp8 = ALL_BYTES.view(torch.float8_e4m3fn)
    torch_vals = fp8.float()
    for b in range(256):
        want = e4m3_formula(b)
        if math.isnan(want):
            assert math.isnan(torch_vals[b].item())
        else:
            assert torch_vals[b].item() == want, b


def test_dequant_fp8_block_scales_with_ragged_edges():
    g = torch.Generator().manual_seed(1)
    n, k = 200, 300  # grid ceil(200/128) x ceil(300/128) = 2 x 3, edges cut
    q = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    q = torch.where((q & 0x7F) == 0x7F, torch.zeros_like(q), q)  # no NaN codes
    s = torch.randint(120, 135, (2, 3), generator=g, dtype=torch.int32).to(torch.uint8)
    w = quant.dequant_fp8(q.view(torch.float8_e4m3fn), s)
    for i, j in [(0, 0), (127, 127), (128, 128), (199, 299), (5, 257), (150, 3)]:
        want = e4m3_formula(q[i, j].item()) * 2.0 ** (s[i // 128, j // 128].item() - 127)
        assert w[i, j].item() == want
    # fp32 scales are accepted as well (the other `.scale` dtype the format allows)
    w32 = quant.dequant_fp8(q.view(torch.float8_e4m3fn), quant.e8m0_to_float(s))
    assert torch.equal(w, w32)


def test_pow2_ceil():
    x = torch.tensor([1.0, 1.5, 2.0, 3.0, 0.75, 2.0**-126, 1e-30, 448.0, 449.0])
    want = [2.0 ** math.ceil(math.log2(v)) for v in x.double().tolist()]
    assert quant.pow2_ceil(x).tolist() == want


def test_round_e2m1_nearest_ties_even():
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    even = {0.0, 1.0, 2.0, 4.0}  # mantissa bit 0
    xs = torch.linspace(-7, 7, 2801)
    xs = torch.cat([xs, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0])])
    got = quant.round_e2m1(xs)
    for x, y in zip(xs.tolist(), got.tolist(), strict=True):
        a = min(abs(x), 6.0)
        best = min(grid, key=lambda v: (abs(v - a), v not in even))
        assert y == math.copysign(best, x), (x, y)


def fp8_sim_f64(x: torch.Tensor, block: int) -> torch.Tensor:
    """Spec §2.5 restated: amax floor 1e-4, s = 2^ceil(log2(amax/448)), e4m3 RNE of x/s."""
    out = torch.empty_like(x, dtype=torch.float64)
    for r in range(x.shape[0]):
        for b0 in range(0, x.shape[1], block):
            blk = x[r, b0 : b0 + block].double()
            s = 2.0 ** math.ceil(math.log2(max(blk.abs().max().item(), 1e-4) / 448))
            q = (blk / s).clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
            out[r, b0 : b0 + block] = q * s
    return out


@pytest.mark.parametrize("block", [64, 128])
def test_fp8_block_sim_matches_formula(block):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 256, generator=g) * torch.logspace(-6, 3, 6).unsqueeze(1)
    x[0, :block] = 0  # all-zero block: amax floor
    got = quant.fp8_block_sim(x, block)
    assert torch.equal(got.double(), fp8_sim_f64(x, block))


def test_act_quant_sim_keeps_dtype_and_is_idempotent():
    x = torch.randn(4, 512).to(torch.bfloat16)
    y = quant.act_quant_sim(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(quant.act_quant_sim(y), y)


def test_fp4_block_sim_matches_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 128, generator=g) * 3
    got = quant.fp4_block_sim(x, 32)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    for r in range(5):
        for b0 in range(0, 128, 32):
            blk = x[r, b0 : b0 + 32].double()
            s = 2.0 ** math.ceil(math.log2(max(blk.abs().max().item(), 6 * 2.0**-126) / 6))
            for j in range(32):
                a = abs(blk[j].item() / s)
                d = (grid - a).abs()
                cand = grid[d == d.min()]
                v = (
                    cand[0].item()
                    if len(cand) == 1
                    else [c for c in cand.tolist() if c in (0, 1, 2, 4)][0]
                )
                assert got[r, b0 + j].item() == math.copysign(v * s, blk[j].item())


def test_quantisers_roundtrip_exact_values():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(130, 260, generator=g)
    q, s = quant.quant_fp8_blocks(w)
    deq = quant.dequant_fp8(q, s)
    q2, s2 = quant.quant_fp8_blocks(deq)  # already-representable values survive exactly
    assert torch.equal(quant.dequant_fp8(q2, s2), deq)
    assert (deq - w).abs().max() <= w.abs().max() * 2**-3
    p, s4 = quant.quant_fp4_groups(w[:, :256])
    d4 = quant.dequant_fp4(p, s4)
    p2, s42 = quant.quant_fp4_groups(d4)
    assert torch.equal(quant.dequant_fp4(p2, s42), d4)


def test_hadamard_is_orthonormal_sylvester():
    h = quant.hadamard_matrix(128, torch.device("cpu"))
    assert torch.allclose(h @ h.T, torch.eye(128), atol=1e-6)
    h2 = torch.tensor([[1.0]])
    while h2.shape[0] < 128:  # Sylvester recursion [[H, H], [H, -H]]
        h2 = torch.cat([torch.cat([h2, h2], 1), torch.cat([h2, -h2], 1)], 0)
    assert torch.equal(torch.sign(h), h2)
    assert torch.allclose(h.abs(), torch.full_like(h, 128**-0.5))
    x = torch.randn(3, 128)
    assert torch.allclose(quant.hadamard(x), x @ h)
