"""Kernels against their plain-torch `_ref` twins, and the format definitions against torch.

- Format tests run everywhere (CPU, no triton needed).
- `interp` tests run the Triton kernels on CPU through TRITON_INTERPRET=1 (set here when no CUDA
  device is present); small shapes, fp32/fp16 only (the interpreter's bf16 tl.dot is wrong).
  Skipped without triton, and on a CUDA machine (where the gpu tests cover the kernels).
- `gpu` tests run the compiled kernels at V4-Flash sizes, bf16 included, plus a CUDA-graph
  capture/replay check. Skipped without CUDA.

Every output buffer is poisoned (NaN / -7) before a launch and checked to be fully written.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Probe without importing: TRITON_INTERPRET must be set before triton is first imported.
HAS_TRITON = importlib.util.find_spec("triton") is not None

INTERP = HAS_TRITON and not HAS_CUDA
if INTERP:
    os.environ["TRITON_INTERPRET"] = "1"
    # Kernels are bound to interpreter or compiler when their module is imported: if another
    # test imported them first, reload them now that the interpreter is on.
    for _name in (
        "_formats", "fp8_linear", "fp4_experts", "sparse_attn", "indexer", "mhc", "handoff",
        "rope", "gemv", "router", "ops",
    ):  # fmt: skip
        _mod = sys.modules.get(f"homeseek.kernels.{_name}")
        if _mod is not None:
            importlib.reload(_mod)

from homeseek.kernels import _formats as fmt  # noqa: E402
from homeseek.kernels import fp4_experts as f4  # noqa: E402
from homeseek.kernels import fp8_linear as f8  # noqa: E402
from homeseek.kernels import gemv as gv  # noqa: E402
from homeseek.kernels import handoff as hf  # noqa: E402
from homeseek.kernels import indexer as ix  # noqa: E402
from homeseek.kernels import mhc as mh  # noqa: E402
from homeseek.kernels import ops  # noqa: E402
from homeseek.kernels import rope as rp  # noqa: E402
from homeseek.kernels import router as rt  # noqa: E402
from homeseek.kernels import sparse_attn as sa  # noqa: E402

interp = pytest.mark.skipif(not INTERP, reason="needs triton on a machine without CUDA")
DEV = "cuda" if HAS_CUDA else "cpu"

# Tolerance table: |got - ref| <= atol * max|ref| + rtol * |ref|, per output dtype.
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, loose=1.0):
    """Compare with the tolerance table; on failure report how many, where and how bad."""
    assert got.shape == ref.shape, f"{name}: shape {list(got.shape)} != {list(ref.shape)}"
    g, r = got.float().cpu(), ref.float().cpu()
    assert torch.isfinite(g).all(), f"{name}: {(~torch.isfinite(g)).sum()} non-finite outputs"
    atol, rtol = (loose * v for v in TOL[dtype])
    scale = r.abs().max().clamp_min(1e-30)
    err = (g - r).abs()
    bad = err > atol * scale + rtol * r.abs()
    if bad.any():
        i = int(err.argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), r.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (atol {atol:g}*{scale:.3g}, "
            f"rtol {rtol:g}); worst at {idx}: got {g.flatten()[i]:.6g} ref {r.flatten()[i]:.6g} "
            f"(err {err.max():.3g}, {err.max() / scale:.2e} of max)"
        )


def assert_close_rows(name, got, ref, dtype, max_rows: float, bound: float) -> None:
    """assert_close (loose 2) for all but at most a fraction max_rows of the rows, and every
    row within bound * max|ref|: for outputs behind a rounding step that may flip."""
    g, r = got.float().cpu(), ref.float().cpu()
    assert torch.isfinite(g).all(), f"{name}: non-finite outputs"
    atol, rtol = (2.0 * v for v in TOL[dtype])
    scale = r.abs().max().clamp_min(1e-30)
    err = (g - r).abs()
    bad_rows = (err > atol * scale + rtol * r.abs()).any(-1)
    n_bad = int(bad_rows.sum())
    assert n_bad <= max_rows * bad_rows.numel(), f"{name}: {n_bad}/{bad_rows.numel()} rows off"
    worst = float(err.max() / scale)
    assert worst <= bound, f"{name}: worst error {worst:.2e} of max > {bound:g}"


def poison(shape, dtype, device=DEV):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -7, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# Formats (CPU, bit-exact)
# ------------------------------------------------------------------------------------------------


def test_e8m0_matches_torch_dtype():
    b = torch.arange(256, dtype=torch.uint8)
    got = fmt.e8m0_to_float(b)
    ref = b.view(torch.float8_e8m0fnu).float()
    same = (got.view(torch.int32) == ref.view(torch.int32)) | (got.isnan() & ref.isnan())
    assert same.all(), f"E8M0 bytes differ: {b[~same].tolist()}"
    assert got[127] == 1.0 and got[128] == 2.0 and got[255].isnan()


def test_fp8_dequant_matches_torch_dtype():
    b = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    s = torch.tensor([[127]], dtype=torch.uint8)
    got = fmt.dequant_fp8(b, s)
    ref = b.view(torch.float8_e4m3fn).float()
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got[~got.isnan()], ref[~ref.isnan()])
    # block scale: row block 1 / col block 0 get their own scale
    w = torch.ones(130, 129, dtype=torch.float8_e4m3fn)
    s = torch.tensor([[127, 128], [126, 130]], dtype=torch.uint8)
    d = fmt.dequant_fp8(w, s)
    assert d[0, 0] == 1 and d[0, 128] == 2 and d[128, 0] == 0.5 and d[129, 128] == 8


def test_fp4_unpack_table_and_nibble_order():
    b = torch.arange(256, dtype=torch.uint8)
    got = fmt.fp4_unpack(b[None])[0]
    table = torch.tensor(fmt.FP4_E2M1_VALUES)
    assert torch.equal(got[0::2], table[b.long() & 15])  # low nibble = even element
    assert torch.equal(got[1::2], table[b.long() >> 4])
    assert torch.equal(torch.signbit(got[0::2]), (b & 8) != 0)  # 8 is -0
    # the torch dtype has the same byte layout (two E2M1 per byte); int8 views decode the same
    assert torch.float4_e2m1fn_x2.itemsize == 1
    x2 = b.view(torch.float4_e2m1fn_x2)
    assert torch.equal(fmt.fp4_unpack(x2[None])[0], got)
    assert torch.equal(fmt.fp4_unpack(b.view(torch.int8)[None])[0], got)
    try:  # only some torch builds can convert float4_e2m1fn_x2
        ref = x2.to(torch.float32)
    except (RuntimeError, NotImplementedError):
        return
    assert torch.equal(ref.flatten(), got)


def test_fp4_dequant_scale_groups():
    q = torch.full((2, 32), 0x21, dtype=torch.uint8)  # even = 0.5, odd = 1.0
    s = torch.tensor([[127, 129], [126, 0]], dtype=torch.uint8)
    w = fmt.dequant_fp4(q, s)
    assert w[0, 0] == 0.5 and w[0, 1] == 1.0 and w[0, 32] == 2.0 and w[1, 0] == 0.25
    assert w[1, 33] == 2.0**-127


def test_act_quant_ref_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g) * torch.logspace(-6, 3, 300)
    x[0, :128] = 0.0  # all-zero block: amax floor 1e-4
    x[1, :128] = 448.0  # amax/448 exactly 1: s = 1
    got = fmt.act_quant_ref(x)
    xb = torch.nn.functional.pad(x, (0, 84)).view(5, 3, 128)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax.double() / 448))).float()
    ref = (xb / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(got, ref.view(5, 384)[:, :300])
    assert torch.equal(got[1, :128], x[1, :128])
    # The split form (grid values, block scales) the grouped kernel takes recombines exactly.
    q, sc = fmt.act_quant_split(x)
    assert sc.shape == (5, 3)
    assert torch.equal(
        q, (xb / s).clamp(-448, 448).to(torch.float8_e4m3fn).float().view(5, 384)[:, :300]
    )
    assert torch.equal(q * sc.repeat_interleave(128, dim=1)[:, :300], got)


# ------------------------------------------------------------------------------------------------
# Triton format helpers (interpreter, bit-exact)
# ------------------------------------------------------------------------------------------------

if HAS_TRITON:
    from homeseek.kernels._formats import (
        _act_quant_apply,
        _act_quant_scale,
        _e4m3_round,
        _fp4_pair_to_f32,
        tl,
    )

    @fmt.triton.jit
    def _helpers_kernel(v_ptr, r_ptr, b_ptr, lo_ptr, hi_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        v = tl.load(v_ptr + o)
        tl.store(r_ptr + o, _e4m3_round(v))
        b = tl.load(b_ptr + o)
        lo, hi = _fp4_pair_to_f32(b)
        tl.store(lo_ptr + o, lo)
        tl.store(hi_ptr + o, hi)

    _fp4_v2_operand = f4._fp4_v2_operand

    @fmt.triton.jit
    def _v2_operand_kernel(
        q_ptr, s_ptr, o_ptr, R: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr
    ):
        # one step's weight operand of R rows and G scale groups (q: int32 words [R, 4G])
        r = tl.arange(0, R)[:, None]
        w = tl.load(q_ptr + r * (4 * G) + tl.arange(0, 4 * G)[None, :])
        sc = tl.load(s_ptr + r * G + tl.arange(0, G)[None, :]).to(tl.int32)
        op = _fp4_v2_operand(tl.reshape(w, [R, G, 4]), sc[:, :, None], o_ptr.dtype.element_ty, ASM)
        tl.store(o_ptr + r * (32 * G) + tl.arange(0, 32 * G)[None, :], op)

    @fmt.triton.jit
    def _act_quant_kernel(x_ptr, y_ptr, R: tl.constexpr):
        o = tl.arange(0, R)[:, None] * 128 + tl.arange(0, 128)[None, :]
        x = tl.load(x_ptr + o)
        s, s_inv = _act_quant_scale(tl.max(tl.abs(x), axis=1))
        tl.store(y_ptr + o, _act_quant_apply(x, s[:, None], s_inv[:, None]))


@interp
def test_triton_e4m3_round_and_fp4_decode_bit_exact():
    n = 4096
    g = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=g) * torch.logspace(-5, 2.6, n)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid.abs() <= 448)]
    mids = (grid.sort().values[1:] + grid.sort().values[:-1]) / 2  # exact ties
    v[: mids.numel()] = mids
    v[-4:] = torch.tensor([448.0, -448.0, 2.0**-10, -(2.0**-9) * 1.5])
    v = v.clamp(-448, 448)
    r = torch.empty(n)
    b = torch.arange(n, dtype=torch.int32).remainder(256).to(torch.uint8)
    lo, hi = torch.empty(n), torch.empty(n)
    _helpers_kernel[(1,)](v, r, b, lo, hi, N=n)
    ref = v.to(torch.float8_e4m3fn).float()
    assert torch.equal(r.view(torch.int32), ref.view(torch.int32)), (
        f"e4m3 rounding differs at {(r != ref).nonzero()[:5].flatten().tolist()}"
    )
    pair = fmt.fp4_unpack(b[None])[0] * 2.0**-6
    assert torch.equal(lo.view(torch.int32), pair[0::2].view(torch.int32))
    assert torch.equal(hi.view(torch.int32), pair[1::2].view(torch.int32))


@interp
def test_triton_act_quant_bit_exact():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 128, generator=g) * torch.logspace(-7, 4, 8)[:, None]
    x[0] = 0.0
    x[1, 0] = 448.0 * 2.0**-3  # amax/448 a power of two
    y = torch.empty_like(x)
    _act_quant_kernel[(1,)](x, y, R=8)
    assert torch.equal(y, fmt.act_quant_ref(x))


def _ptx_run(text: str, args: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Run a straight-line PTX block of the kernels on int64 tensors of 32-bit values, for the
    few instructions the v2 FP4 decode uses: args maps operand numbers ($n) to inputs, the
    result maps the others written to their values. A check of the block's bit logic on any
    machine; the GPU tests check that the hardware computes the same."""
    regs: dict[str, torch.Tensor] = {f"${n}": v & 0xFFFFFFFF for n, v in args.items()}
    written: dict[int, torch.Tensor] = {}

    def val(tok: str) -> torch.Tensor | int:
        return regs[tok] if tok in regs else int(tok, 0)

    def bf16(v: torch.Tensor) -> torch.Tensor:  # 16-bit patterns -> float64 values
        return (v << 16).to(torch.int32).view(torch.float32).double()

    def bf16_bits(x: torch.Tensor) -> torch.Tensor:  # float64 (exact in bf16) -> 16-bit pattern
        return x.float().to(torch.bfloat16).view(torch.int16).long() & 0xFFFF

    for line in text.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = (t.strip() for t in rest.split(","))
        v = [val(t) for t in src]
        if op == "mad.lo.u32":
            r = v[0] * v[1] + v[2]
        elif op == "mov.b32":
            r = torch.as_tensor(v[0]).expand_as(next(iter(regs.values())))
        elif op == "shr.u32":
            r = v[0] >> v[1]
        elif op == "shl.b32":
            r = v[0] << v[1]
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "lop3.b32":  # bit i of the LUT: the result for (a, b, c) bits = i >> 2, 1, 0
            a, b, c = (torch.as_tensor(x) for x in v[:3])
            r = torch.zeros_like(next(iter(regs.values())))
            for bit in range(32):
                idx = ((a >> bit) & 1) * 4 + ((b >> bit) & 1) * 2 + ((c >> bit) & 1)
                r |= ((v[3] >> idx) & 1) << bit
        elif op == "fma.rn.bf16x2":  # each 16-bit half: a * b + c rounded to bf16
            r = 0
            for sh in (0, 16):
                a, b, c = (bf16((torch.as_tensor(x) >> sh) & 0xFFFF) for x in v)
                r = r | (bf16_bits(a * b + c) << sh)
        else:
            raise AssertionError(f"_ptx_run: no emulation of {op}")
        regs[dst] = torch.as_tensor(r) & 0xFFFFFFFF
        if dst.startswith("$"):
            written[int(dst[1:])] = regs[dst]
    return written


def test_fp4_bf16x2_asm_bit_logic():
    """The v2 decode's PTX (kernels/fp4_experts.py _FP4_BF16X2_ASM_TEXT), emulated: every byte
    in every position of a word, E8M0 scales 0..128 (the range it supports), against the E2M1
    table times the scale, bit for bit; output a holds the word's inputs a (low half), a + 4."""
    g = torch.Generator().manual_seed(3)
    n = 4 * 256 + 2048
    byts = torch.randint(0, 256, (n, 4), generator=g)
    for pos in range(4):  # exhaustive in each byte position
        byts[pos * 256 : (pos + 1) * 256, pos] = torch.arange(256)
    words = (byts << torch.tensor([0, 8, 16, 24])).sum(1)
    scale = torch.arange(n) % 129
    out = _ptx_run(f4._FP4_BF16X2_ASM_TEXT, {4: words, 5: scale})
    vals = fmt.fp4_unpack(byts.to(torch.uint8)) * fmt.e8m0_to_float(scale.to(torch.uint8))[:, None]
    want = vals.to(torch.bfloat16).view(torch.int16).long() & 0xFFFF  # [n, 8] inputs 0..7
    for a in range(4):
        got = out[a]
        assert torch.equal(got & 0xFFFF, want[:, a]), f"output {a}, low half"
        assert torch.equal(got >> 16, want[:, a + 4]), f"output {a}, high half"


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp4_v2_operand_interp(dtype):
    """The v2 weight operand (portable decode): every value and its column order (v2 order: in
    each 32-group, column 8a + b holds input 4b + a) against dequant_fp4, bit for bit."""
    _check_v2_operand(dtype, asm=False)


def _check_v2_operand(dtype, asm):
    r, g_ = 16, 8  # 16 rows, 8 scale groups (256 inputs)
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(0, 256, (r, 128 * g_ // 8), generator=gen, dtype=torch.uint8)
    sc = torch.randint(112, 129, (r, g_), generator=gen, dtype=torch.uint8)
    out = poison((r, 32 * g_), dtype)
    q_dev, sc_dev = q.to(DEV), sc.to(DEV)
    _v2_operand_kernel[(1,)](q_dev.view(torch.int32), sc_dev, out, R=r, G=g_, ASM=asm)
    ref = fmt.dequant_fp4(q, sc)[:, f4._v2_perm(32 * g_)].to(dtype)
    assert torch.equal(out.cpu(), ref)


# ------------------------------------------------------------------------------------------------
# Shared builders
# ------------------------------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def make_fp8(n, k, seed=0, scale_fp32=False):
    g = _gen(seed)
    w = (torch.randn(n, k, generator=g) * 4).to(torch.float8_e4m3fn)
    shape = ((n + 127) // 128, (k + 127) // 128)
    s = torch.randint(118, 124, shape, generator=g, dtype=torch.uint8)
    if scale_fp32:
        s = fmt.e8m0_to_float(s)
    return w.to(DEV), s.to(DEV)


POOL_NAMES = ("w13_q", "w13_s", "w2_q", "w2_s")  # the launchers' argument order


def make_pool(n_slots, d, i, seed=0):
    g = _gen(seed)
    sh = f4.pool_shapes(n_slots, d, i)
    pool = []
    for name in POOL_NAMES:
        if name.endswith("_q"):
            t = torch.randint(0, 256, sh[name], generator=g, dtype=torch.uint8)
        else:  # realistic E8M0 range: weights ~ 2^-7 .. 2^-4 * 6
            t = torch.randint(118, 123, sh[name], generator=g, dtype=torch.uint8)
        pool.append(t.to(DEV))
    return pool


def pool_in_layout(pool, d, i, layout):
    """The experts of `pool` (make_pool: four contiguous tensors) in another layout the kernels
    read alike. "packed": packed_pool_views of one [S, slot_bytes] buffer (the expert store's);
    "padded": each tensor in a buffer of its own whose slots lie 16 * (j + 1) bytes further
    apart than their size (slot strides that differ per tensor and are not multiples of 64),
    the gaps 0xFF (NaN scales, -6 weights) should a kernel read them."""
    s, dev = pool[0].shape[0], pool[0].device
    if layout == "packed":
        buf = torch.empty(s, f4.slot_bytes(d, i), dtype=torch.uint8, device=dev)
        packed = f4.packed_pool_views(buf, d, i)
        views = [packed[nm] for nm in POOL_NAMES]
    else:
        views = []
        for j, t in enumerate(pool):
            n = t[0].numel()
            b = torch.full((s, n + 16 * (j + 1)), 255, dtype=torch.uint8, device=dev)
            views.append(b[:, :n].unflatten(1, t.shape[1:]))  # [S, rows, width]
    for v, t in zip(views, pool, strict=True):
        v.copy_(t)
    return views


def make_routing(m, k, n_slots, seed=0, holes=True):
    g = _gen(seed)
    slots = torch.stack([torch.randperm(n_slots, generator=g)[:k] for _ in range(m)]).int()
    if holes and m > 1:
        slots[1, 0] = -1  # skipped pair
    if holes and m > 2 and k > 2:
        slots[2, 2] = slots[2, 1]  # same slot twice in one token
    rw = torch.rand(m, k, generator=g)
    return slots.to(DEV), rw.to(DEV)


# ------------------------------------------------------------------------------------------------
# Interpreter tests (CPU): small shapes
# ------------------------------------------------------------------------------------------------


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize(
    "m,n,k,scale_fp32",
    [(1, 130, 256, False), (3, 64, 384, True), (1, 17, 200, False), (20, 70, 300, False),
     (5, 48, 2048, False)],
)  # fmt: skip
def test_fp8_linear_interp(m, n, k, scale_fp32, act_quant, dtype):
    w, s = make_fp8(n, k, seed=m + n, scale_fp32=scale_fp32)
    x = torch.randn(m, k, generator=_gen(k)).to(dtype)
    out = poison((m, n), dtype)
    f8.fp8_linear(x, w, s, out=out, act_quant=act_quant)
    ref = f8.fp8_linear_ref(x, w, s, act_quant=act_quant)
    assert_close("fp8_linear", out, ref, dtype)


@interp
@pytest.mark.parametrize("m", [1, 20])  # GEMV and GEMM paths
@pytest.mark.parametrize("r", [128, 64])  # group rows: a multiple and a divisor of 128
def test_fp8_linear_grouped_views_interp(m, r):
    """The block-diagonal use of model.grouped_linear (wo_a): x a group's columns of a wider
    row, W and its scale a group's rows, out a group's columns of a wider row; nothing outside
    the group's output columns is written."""
    g_n, k = 3, 256
    w, s = make_fp8(g_n * r, k, seed=r + m)
    x = torch.randn(m, g_n, k, generator=_gen(m))
    z = poison((m, g_n * r), torch.float32)
    for g in range(g_n):
        s_lo, s_hi = g * r // 128, ((g + 1) * r - 1) // 128 + 1
        out = z[:, g * r : (g + 1) * r]
        f8.fp8_linear(x[:, g], w[g * r : (g + 1) * r], s[s_lo:s_hi], out=out)
        ref = fmt.dequant_fp8(w, s)[g * r : (g + 1) * r]
        assert_close(f"group {g}", out, x[:, g] @ ref.t(), torch.float32)
        assert torch.isnan(z[:, (g + 1) * r :]).all(), f"group {g} wrote past its columns"


def _per_group_ref(x, w, s, groups, **kw):
    """The block-diagonal product as model.grouped_linear used to launch it: one fp8_linear_ref
    per group (its rows, its scale rows, its columns of x), concatenated."""
    r, k = w.shape[0] // groups, w.shape[1]
    ys = []
    for g in range(groups):
        s_lo, s_hi = g * r // 128, ((g + 1) * r - 1) // 128 + 1
        xg = x[:, g * k : (g + 1) * k]
        ys.append(f8.fp8_linear_ref(xg, w[g * r : (g + 1) * r], s[s_lo:s_hi], **kw))
    return torch.cat(ys, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("r", [256, 128, 16])  # group rows: multiples and a divisor of 128
def test_fp8_linear_ref_groups_is_the_per_group_loop(r, act_quant, dtype):
    """The twin's grouped mode is, bit for bit, the per-group loop it replaces in the model (the
    CPU engine's numbers must not move); both views of x (strided: a wider row's columns)."""
    groups, k = 3, 200
    w, s = make_fp8(groups * r, k, seed=r)
    x = torch.randn(4, groups * k + 24, generator=_gen(r)).to(dtype).to(DEV)[:, 8 : 8 + groups * k]
    got = f8.fp8_linear_ref(x, w, s, act_quant=act_quant, groups=groups)
    assert torch.equal(got, _per_group_ref(x, w, s, groups, act_quant=act_quant))
    out = poison((4, groups * r), torch.float32)
    assert ops.fp8_linear(x, w, s, out=out, groups=groups, triton=False) is out
    assert torch.equal(out, _per_group_ref(x, w, s, groups, out_dtype=torch.float32))
    with pytest.raises(ValueError, match="x with"):
        f8.fp8_linear_ref(x[:, :-1], w, s, groups=groups)
    w40, s40 = make_fp8(80, k)
    with pytest.raises(ValueError, match="R=40"):  # neither a multiple nor a divisor of 128
        f8.fp8_linear_ref(x[:, : 2 * k], w40, s40, groups=2)


class _Launches:
    """Stands in for a Triton kernel: counts its launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m,r,k,act_quant,cfg,launches",
    [(1, 128, 256, False, None, 1),  # GEMV, one token a pass
     (3, 256, 256, False, None, 1),  # GEMV, 4 tokens a pass (rows past M masked)
     (3, 128, 256, True, None, 1),
     (2, 128, 512, False, {"split_k": 2}, 1),  # split-K partials and counters of the whole
     (20, 128, 256, False, None, 1),  # GEMM (M > GEMV_MAX_M)
     (20, 256, 384, True, {"block_n": 64}, 1),
     (1, 16, 256, False, None, 3),  # R under the GEMV's 32-row tile: a launch per group
     (20, 64, 256, False, None, 3)],  # R under the GEMM's 128-row tile
)  # fmt: skip
def test_fp8_linear_grouped_interp(monkeypatch, m, r, k, act_quant, cfg, launches, dtype):
    """groups=G: the block-diagonal product in one launch (a row tile reads its group's columns
    of a strided x), against the twin's per-group products; narrow groups fall back to a launch
    per group."""
    groups = 3
    w, s = make_fp8(groups * r, k, seed=r + k)
    x = torch.randn(m, groups * k + 40, generator=_gen(m + r)).to(dtype)[:, 16 : 16 + groups * k]
    kern = "_fp8_gemv_kernel" if m <= f8.GEMV_MAX_M else "_fp8_gemm_kernel"
    spy = _Launches(getattr(f8, kern))
    monkeypatch.setattr(f8, kern, spy)
    out = poison((m, groups * r), dtype)
    f8.fp8_linear(x, w, s, out=out, act_quant=act_quant, groups=groups, config=cfg)
    assert spy.n == launches
    ref = _per_group_ref(x, w, s, groups, act_quant=act_quant)
    assert_close("fp8_linear grouped", out, ref, dtype)
    y = f8.fp8_linear(x, w, s, act_quant=act_quant, groups=groups, config=cfg)  # allocated out
    assert_close("fp8_linear grouped, allocated out", y, ref, dtype)


@interp
def test_fp8_linear_grouped_rejects_bad_shapes():
    w, s = make_fp8(3 * 128, 256)
    x = torch.randn(1, 3 * 256)
    with pytest.raises(ValueError, match="groups=2 needs"):
        f8.fp8_linear(x, w, s, groups=2)  # 384 columns of x, not 2 x 256
    with pytest.raises(ValueError, match="groups=3 needs"):
        f8.fp8_linear(x[:, :-128], w, s, groups=3)
    w40, s40 = make_fp8(120, 256)
    with pytest.raises(ValueError, match="R=40"):
        f8.fp8_linear(x, w40, s40, groups=3)


@interp
def test_fp8_linear_split_k_workspace_reuse():
    w, s = make_fp8(32, 1024, seed=3)
    # forced split: size the workspace for it (fp8_linear_workspace sizes the default plans)
    ws = f8.Fp8LinearWorkspace(torch.empty(4 * 2 * 32), torch.zeros(2, dtype=torch.int32))
    for seed in range(2):  # second launch checks the counters were reset
        x = torch.randn(2, 1024, generator=_gen(seed))
        out = poison((2, 32), torch.float32)
        f8.fp8_linear(x, w, s, out=out, workspace=ws, config={"split_k": 4, "block_n": 16})
        assert_close("fp8_linear split-K", out, f8.fp8_linear_ref(x, w, s), torch.float32)
    assert int(ws.counters.abs().sum()) == 0


@interp
@pytest.mark.parametrize("down", ["pair", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("m,k", [(1, 3), (3, 3)])
def test_fp4_experts_decode_interp(m, k, act_quant, dtype, down):
    d, i, n_slots = 256, 128, 5
    pool = make_pool(n_slots, d, i, seed=m)
    slots, rw = make_routing(m, k, n_slots, seed=m + k)
    if m == 3:
        slots[0, 0] = slots[2, 0]  # a slot shared by two tokens: one leader serves both
    x = torch.randn(m, d, generator=_gen(5)).to(dtype)
    shared = torch.randn(m, d, generator=_gen(6)).to(dtype)
    out = poison((m, d), dtype)
    ws = f4.fp4_experts_workspace(m * k, d, i, dtype, "cpu")
    cfg = {"block_n": 32, "block_n_down": 64, "down": down}
    f4.fp4_experts(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=act_quant, workspace=ws,
                   config=cfg)  # fmt: skip
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=act_quant)
    assert_close("fp4_experts", out, ref, dtype, loose=2.0 if dtype == torch.float16 else 1.0)
    assert int(ws.counters.abs().sum()) == 0


@interp
@pytest.mark.parametrize("down", ["pair", "token"])
@pytest.mark.parametrize("act_quant", [False, True, "inline"])
def test_fp4_experts_decode_shared_slots_interp(act_quant, down):
    """Slots shared by 2 and 3 tokens (two-token passes, an odd member), a token with the same
    slot twice, a skipped pair, several loop steps (nb=1), and the one-token path (M > 1).
    act_quant "inline": a quantised in every down program that reads it instead of once."""
    m, k, d, i, n_slots = 5, 2, 256, 128, 4
    pool = make_pool(n_slots, d, i, seed=3)
    slots = torch.tensor([[0, 1], [1, 2], [1, 1], [3, -1], [0, 2]], dtype=torch.int32)
    rw = torch.rand(m, k, generator=_gen(4))
    x = torch.randn(m, d, generator=_gen(5))
    shared = torch.randn(m, d, generator=_gen(6))
    out = poison((m, d), torch.float32)
    ws = f4.fp4_experts_workspace(m * k, d, i, torch.float32, "cpu")
    cfg = {"block_n": 32, "block_n_down": 64, "nb": 1, "nb_down": 1, "down": down,
           "prefetch": bool(act_quant), "prefetch_down": bool(act_quant)}  # fmt: skip
    if act_quant == "inline":
        cfg["a_quant"] = "inline"
    f4.fp4_experts(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=bool(act_quant),
                   workspace=ws, config=cfg)  # fmt: skip
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=bool(act_quant))
    assert_close("fp4_experts shared slots", out, ref, torch.float32)
    assert int(ws.counters.abs().sum()) == 0
    assert int(ws.a_counters.abs().sum()) == 0


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,n", [(1, 4096), (3, 700)])
def test_act_quant_rows_interp(rows, n, dtype):
    """The one-launch act quantisation (x before gate/up, the grouped kernels' rows) is
    act_quant_split bit for bit, a ragged last block included; the grid values are exact in the
    activation dtype."""
    x = (torch.randn(rows, n, generator=_gen(n)) * 3).to(dtype)
    x[0, :128] *= 1e-6  # a block under the amax floor
    q = poison((rows, n), dtype)
    s = poison((rows, (n + 127) // 128), torch.float32)
    f4._act_quant_rows(x, q, s)
    q_ref, s_ref = fmt.act_quant_split(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.float(), q_ref)


@interp
def test_fp4_experts_decode_small_dims_interp():
    """D, I not multiples of 128 (the tiny test model: 64, 32) go to the grouped kernels."""
    m, k, d, i, n_slots = 2, 2, 64, 32, 3
    pool = make_pool(n_slots, d, i, seed=12)
    slots, rw = make_routing(m, k, n_slots, seed=12)
    x = torch.randn(m, d, generator=_gen(13))
    shared = torch.randn(m, d, generator=_gen(14))
    out = poison((m, d), torch.float32)
    f4.fp4_experts(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=True)
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=True)
    assert_close("fp4_experts small dims", out, ref, torch.float32, loose=2.0)


@interp
@pytest.mark.parametrize(
    "m, d, i, config",
    [
        (19, 128, 64, {"variant": "v1", "block_m": 16, "block_n": 32}),
        (19, 128, 64, {"variant": "v2", "block_m": 16, "block_n": 32}),
        # the tiny test model's D = 64, I = 32 with v2's default tiles (clamped to the matrices)
        (7, 64, 32, {"variant": "v2"}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp4_experts_grouped_interp(dtype, m, d, i, config):
    k, n_slots = 2, 3
    pool = make_pool(n_slots, d, i, seed=9)
    slots, rw = make_routing(m, k, n_slots, seed=9)
    x = torch.randn(m, d, generator=_gen(7)).to(dtype)
    shared = torch.randn(m, d, generator=_gen(8)).to(dtype)
    out = poison((m, d), dtype)
    f4.fp4_experts_grouped(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=True,
                           config=config)  # fmt: skip
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=True)
    assert_close(f"fp4_experts_grouped {config}", out, ref, dtype, loose=2.0)


def _v2_edge_routing(m, k, n_slots):
    """Every token routes to slot 0 (more pairs than a tile holds), skipped pairs (-1), a token
    with the same slot twice; the rest random."""
    slots, rw = make_routing(m, k, n_slots, seed=21, holes=False)
    slots[:, 0] = 0
    slots[:, 1:] = torch.where(slots[:, 1:] == 0, 1, slots[:, 1:])
    slots[::5, 2] = -1
    slots[4, 1] = -1
    slots[6, 2] = slots[6, 1]
    return slots, rw


# v2 tile configs on CPU (D = 256, I = 128): a act-quantised in the gate/up epilogue (block_n
# 128) or by a pass of its own (block_n 64, 16); one loop step per row or several; the
# persistent programs take several tiles each (programs).
V2_INTERP_CONFIGS = [
    {"block_m": 16, "block_n": 128, "block_k": 128, "num_warps": 4},
    {"block_m": 32, "block_n": 64, "block_k": 64, "block_n_down": 32, "block_k_down": 32,
     "programs": 3},
    {"block_m": 16, "block_n": 16, "block_k": 256, "block_n_down": 256},
]  # fmt: skip


@interp
@pytest.mark.parametrize("cfg", V2_INTERP_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype,act_quant", [(torch.float16, True), (torch.float32, True),
                                             (torch.float16, False)])  # fmt: skip
def test_fp4_experts_grouped_v2_interp(cfg, dtype, act_quant):
    m, k, d, i, n_slots = 37, 3, 256, 128, 5
    pool = make_pool(n_slots, d, i, seed=22)
    slots, rw = _v2_edge_routing(m, k, n_slots)
    x = torch.randn(m, d, generator=_gen(23)).to(dtype)
    shared = torch.randn(m, d, generator=_gen(24)).to(dtype)
    out = poison((m, d), dtype)
    f4.fp4_experts_grouped(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=act_quant,
                           config={"variant": "v2", **cfg})  # fmt: skip
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=act_quant)
    assert_close("fp4_experts_grouped v2", out, ref, dtype, loose=2.0)


@interp
@pytest.mark.parametrize("permute", [True, False])
@pytest.mark.parametrize("rows,n", [(2, 512), (3, 96)])
def test_fp4_v2_rows_interp(rows, n, permute):
    """The v2 activation pass: act_quant_ref bit for bit (a ragged last block included), the
    columns in v2 order when permuting; in place when not."""
    x = (torch.randn(rows, n, generator=_gen(n)) * 3).to(torch.float16)
    x[0, :128] *= 1e-3
    out = poison((rows, n), torch.float16) if permute else x.clone()
    f4._v2_rows(x, out, permute=permute, act_quant=True)
    ref = fmt.act_quant_ref(x).to(torch.float16)
    if permute:
        ref = ref[:, f4._v2_perm(n)]
    assert torch.equal(out, ref)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "t,h,dh,n,n_keys", [(1, 16, 64, 50, 40), (2, 20, 48, 90, 300), (1, 16, 32, 600, 4700)]
)
def test_sparse_attn_interp(t, h, dh, n, n_keys, dtype):
    g = _gen(n_keys)
    q = torch.randn(t, h, dh, generator=g).to(dtype)
    kv = torch.randn(n, dh, generator=g).to(dtype)
    idx = torch.randint(-1, n, (t, n_keys), generator=g, dtype=torch.int32)
    if t > 1:
        idx[1] = -1  # a token with no valid key -> 0
    sink = torch.randn(h, generator=g)
    out = poison((t, h, dh), dtype)
    sa.sparse_attn(q, kv, idx, sink, dh**-0.5, out=out)
    assert_close("sparse_attn", out, sa.sparse_attn_ref(q, kv, idx, sink, dh**-0.5), dtype)


class _TileSpy:
    """Stands in for the sparse attention kernel: records each launch's head block, and can
    refuse the prefill tiles as a GPU with ~100 KB of shared memory a block does."""

    def __init__(self, kernel, refuse: bool = False) -> None:
        self.kernel, self.refuse, self.block_h = kernel, refuse, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.block_h.append(kw["BLOCK_H"])
            if self.refuse and kw["BLOCK_H"] == sa.PREFILL_TILES["block_h"]:
                raise sa.OutOfResources(164096, 101376, "shared memory")
            return self.kernel[grid](*args, **kw)

        return launch


def _prefill_attn_case(dtype):
    t, h, dh, n, n_keys = sa.PREFILL_T + 6, 20, 48, 90, 100
    g = _gen(t)
    q = torch.randn(t, h, dh, generator=g).to(dtype)
    kv = torch.randn(n, dh, generator=g).to(dtype)
    idx = torch.randint(-1, n, (t, n_keys), generator=g, dtype=torch.int32)
    idx[3] = -1  # a token with no valid key -> 0
    return q, kv, idx, torch.randn(h, generator=g), dh**-0.5


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_attn_prefill_tiles_interp(dtype, monkeypatch):
    """From PREFILL_T tokens on, 2-byte operands take the prefill tiles (every head of a token
    in one program, fewer heads than the block here: masked; 64-key blocks; never split), fp32
    the decode tiles (the prefill tiles exceed any GPU's shared memory); the twin's numbers."""
    spy = _TileSpy(sa._sparse_attn_kernel)
    monkeypatch.setattr(sa, "_sparse_attn_kernel", spy)
    monkeypatch.setattr(sa, "_PREFILL_FITS", {})
    q, kv, idx, sink, scale = _prefill_attn_case(dtype)
    out = poison(q.shape, dtype)
    sa.sparse_attn(q, kv, idx, sink, scale, out=out)
    assert_close("sparse_attn", out, sa.sparse_attn_ref(q, kv, idx, sink, scale), dtype)
    assert spy.block_h == [64 if dtype == torch.float16 else 16]
    with pytest.raises(ValueError, match="block_h"):
        sa.sparse_attn(q, kv, idx, sink, scale, config={"block_h": 8})


@interp
def test_sparse_attn_prefill_tiles_fall_back_where_they_do_not_fit(monkeypatch):
    """A GPU whose shared memory per block cannot hold the prefill tiles (an RTX 4090's ~100 KB):
    the first prefill call falls back to the decode tiles with the same numbers, and later
    calls on that device go there straight away."""
    spy = _TileSpy(sa._sparse_attn_kernel, refuse=True)
    monkeypatch.setattr(sa, "_sparse_attn_kernel", spy)
    monkeypatch.setattr(sa, "_PREFILL_FITS", {})
    q, kv, idx, sink, scale = _prefill_attn_case(torch.float16)
    ref = sa.sparse_attn_ref(q, kv, idx, sink, scale)
    for _ in range(2):
        out = poison(q.shape, torch.float16)
        sa.sparse_attn(q, kv, idx, sink, scale, out=out)
        assert_close("sparse_attn", out, ref, torch.float16)
    assert spy.block_h == [64, 16, 16]
    assert sa._PREFILL_FITS == {("cpu", None): False}


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_interp(dtype):
    """The query path's RMS + RoPE from a strided (fused projection's) slice, and the in-place
    inverse rotation, against their torch twins (fp32 math; bf16 is checked on the GPU: the
    interpreter truncates bf16 casts)."""
    t, h, dh, p = 5, 6, 48, 8
    g = _gen(dh)
    x = torch.randn(t, h * dh + 40, generator=g).to(dtype)[:, : h * dh].view(t, h, dh)
    ang = torch.randn(t, p, generator=g)
    cos, sin = ang.cos(), ang.sin()
    ref = rp.head_rms_rope_ref(x, cos, sin, 1e-6)
    assert_close("head_rms_rope", rp.head_rms_rope(x, cos, sin, 1e-6), ref, dtype)
    # rows: the tokens' rows of whole tables, read on the device (decode's position)
    rows = torch.tensor([3, 0, 7, 7, 1])
    ang_t = torch.randn(9, p, generator=g)
    got = rp.head_rms_rope(x, ang_t.cos(), ang_t.sin(), 1e-6, rows=rows)
    want_rows = rp.head_rms_rope_ref(x, ang_t.cos()[rows], ang_t.sin()[rows], 1e-6)
    assert_close("head_rms_rope rows", got, want_rows, dtype)
    twin = ops.head_rms_rope(x, ang_t.cos(), ang_t.sin(), 1e-6, rows=rows, triton=False)
    assert torch.equal(twin, want_rows)
    y = x.contiguous()
    want = rp.rope_heads_ref(y, cos, -sin)
    assert rp.rope_heads_(y, cos, -sin) is y
    assert_close("rope_heads_", y, want, dtype)
    assert torch.equal(y[..., : -2 * p], x[..., : -2 * p])  # the unrotated channels untouched


def _gemv_inputs(t, n, k, dtype, seed=0, device=DEV):
    """x [t, k] and w [n, k] in dtype (bf16 values: exact fp32 products), on device."""
    g = _gen(seed * 1009 + n * 31 + k + t)
    x = torch.randn(t, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(device)
    return x, w


def _check_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """gemv_f32 against the float64 product (fp32 summation error only: ~1e-7 of max|y|) and its
    twin; out= written in full (poisoned) and returned, with the same bits as without it; every
    row the same bits as the product of that token alone and of a slice of w's rows (the
    summation order depends on K alone)."""
    t, n = x.shape[0], w.shape[0]
    y = gv.gemv_f32(x, w)
    assert y.dtype == torch.float32 and y.shape == (t, n)
    ref = (x.double() @ w.double().T).cpu()
    err = float((y.cpu().double() - ref).abs().max() / ref.abs().max())
    assert err <= 1e-6, f"gemv_f32 [{t}x{x.shape[1]}]x[{n}]: {err:.2e} of max off float64"
    assert_close("gemv_f32 vs twin", y, gv.gemv_f32_ref(x, w), torch.float32)
    out = poison((t, n), torch.float32)
    assert gv.gemv_f32(x, w, out=out) is out
    assert torch.equal(out, y), "out= differs from the allocated result"
    if t > 1:
        assert torch.equal(gv.gemv_f32(x[-1:], w)[0], y[-1]), "the last token alone differs"
    rows = slice(max(0, n // 2 - 5), max(1, n // 2))  # another row tile and grid than all n
    assert torch.equal(gv.gemv_f32(x, w[rows]), y[:, rows]), "a slice of w's rows differs"
    return y


@interp
@pytest.mark.parametrize("n,k", [(16, 64), (24, 128), (256, 256)])
@pytest.mark.parametrize("t", [1, 3, 8])
def test_gemv_f32_interp(t, n, k):
    """bf16 x bf16 -> fp32 in one launch: float64 reference, twin, out=, T-invariant rows."""
    _check_gemv(*_gemv_inputs(t, n, k, torch.bfloat16))


@interp
@pytest.mark.parametrize("t,n,k,dtype", [(11, 5, 200, torch.bfloat16), (2, 40, 72, torch.float16)])
def test_gemv_f32_ragged_interp(t, n, k, dtype):
    """Ragged K (masked step), N not a multiple of the row tile, T > 8 (two passes over the
    weights), fp16, strided x rows (a column slice) and a strided out."""
    x, w = _gemv_inputs(t, n, k, dtype, seed=1)
    _check_gemv(x, w)
    xs = torch.cat([x, x[:, :5]], dim=1)[:, :k]  # row stride k + 5
    big = poison((t, n + 3), torch.float32)
    gv.gemv_f32(xs, w, out=big[:, 1 : n + 1])
    assert torch.equal(big[:, 1 : n + 1], gv.gemv_f32(x, w))
    assert big[:, 0].isnan().all() and big[:, n + 1 :].isnan().all(), "wrote outside out"


@interp
def test_gemv_f32_rejects_bad_inputs():
    """The launcher's checks name the argument and what is wrong."""
    x, w = _gemv_inputs(2, 16, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="gemv_f32: x: expected dtype"):
        gv.gemv_f32(x.float(), w)
    with pytest.raises(TypeError, match="gemv_f32: w: expected dtype"):
        gv.gemv_f32(x, w.half())
    with pytest.raises(ValueError, match="gemv_f32: w: must be contiguous"):
        gv.gemv_f32(x, torch.cat([w, w], dim=1)[:, ::2])
    with pytest.raises(ValueError, match=r"gemv_f32: w: expected shape \[\*, 64\]"):
        gv.gemv_f32(x, w[:, :32].contiguous())
    with pytest.raises(ValueError, match="gemv_f32: x must be"):
        gv.gemv_f32(x[0], w)
    with pytest.raises(ValueError, match="gemv_f32: x must have unit column stride"):
        gv.gemv_f32(torch.cat([x, x], dim=1)[:, ::2], w)
    with pytest.raises(TypeError, match="gemv_f32: out: expected dtype"):
        gv.gemv_f32(x, w, out=torch.empty(2, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"gemv_f32: out: expected shape \[2, 16\]"):
        gv.gemv_f32(x, w, out=torch.empty(16, 2))


def _check_route(t: int, e: int, k: int, hashed: bool, seed: int = 0) -> None:
    """The routing kernel against its twin: the same ids in the same (descending) order, the
    weights to fp32 rounding, into out= buffers; logits spread wide enough to reach softplus's
    threshold (20) and its small-e branch (-30)."""
    g = _gen(seed * 7 + e + k + t)
    logits = (torch.randn(t, e, generator=g) * 8).to(DEV)
    logits[:, 0] = -30.0
    logits[:, 1] = 25.0
    bias = (torch.randn(e, generator=g) * 0.3).to(DEV)
    table = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(50)]).to(DEV)
    tokens = torch.randint(0, 50, (t,), generator=g).to(DEV)
    args = (None, table, tokens) if hashed else (bias, None, None)
    sel_out = torch.full((t, k), -7, dtype=torch.long, device=DEV)
    w_out = poison((t, k), torch.float32)
    sel, w = rt.route(logits, *args, k, 2.5, sel_out=sel_out, w_out=w_out)
    assert sel is sel_out and w is w_out
    want_sel, want_w = rt.route_ref(logits, bias if not hashed else None,
                                    table[tokens] if hashed else None, k, 2.5)  # fmt: skip
    assert torch.equal(sel.cpu(), want_sel.cpu()), (sel, want_sel)
    assert_close("route weights", w, want_w, torch.float32)
    assert torch.allclose(w.sum(-1).cpu(), torch.full((t,), 2.5), atol=1e-5)
    got = ops.route(logits, *args, k, 2.5, triton=False)
    assert torch.equal(got[0].cpu(), want_sel.cpu()) and torch.equal(got[1].cpu(), want_w.cpu())


@interp
@pytest.mark.parametrize("t,e,k", [(1, 256, 6), (3, 256, 6), (2, 16, 4), (1, 20, 3)])
@pytest.mark.parametrize("hashed", [False, True])
def test_route_interp(t, e, k, hashed):
    """One launch routes like model.route_from_logits: V4-Flash's 256 experts and 6 per token,
    the tiny model's 16 / 4, and an E that is not a power of two (masked lanes)."""
    _check_route(t, e, k, hashed)


@interp
def test_route_nan_logit_shows():
    """A NaN logit makes the token's weights NaN, as the twin's are, rather than vanishing."""
    logits = torch.randn(2, 16, generator=_gen(16))
    logits[1, 5] = float("nan")
    _, w = rt.route(logits, torch.zeros(16), None, None, 4, 1.0)
    _, want = rt.route_ref(logits, torch.zeros(16), None, 4, 1.0)
    assert torch.isfinite(w[0]).all() and torch.isnan(w[1]).all() and torch.isnan(want[1]).all()
    assert_close("route weights", w[:1], want[:1], torch.float32)


@interp
def test_route_rejects_bad_inputs():
    logits = torch.randn(1, 16)
    bias = torch.zeros(16)
    with pytest.raises(ValueError, match="route: give bias"):
        rt.route(logits, bias, torch.zeros(4, 2, dtype=torch.long), None, 2, 1.0)
    with pytest.raises(TypeError, match="route: logits: expected dtype"):
        rt.route(logits.half(), bias, None, None, 2, 1.0)
    with pytest.raises(ValueError, match=r"route: bias: expected shape \[16\]"):
        rt.route(logits, torch.zeros(8), None, None, 2, 1.0)
    with pytest.raises(ValueError, match="route: k must be"):
        rt.route(logits, bias, None, None, 17, 1.0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("hashed", [False, True])
def test_route_gpu(hashed):
    for t in (1, 4):
        _check_route(t, 256, 6, hashed, seed=3)


@interp
def test_sparse_attn_unsplit_when_tokens_fill_the_gpu():
    """Prefill: enough (token, head block) programs -> one split, no partials (their workspace
    would be T * H * splits * Dh fp32); same numbers as the twin."""
    assert sa._n_split(640, {}, programs=4)[0] > 1  # decode: splits fill the GPU
    assert sa._n_split(640, {}, programs=8192) == (1, 640)  # a 2,048-token chunk
    ws = sa.sparse_attn_workspace(2048, 64, 512, 640, "cpu")
    assert ws.acc.numel() * 4 < 2**30  # was 2.7 GB
    t, h, dh, n, n_keys = 6, 16, 32, 600, 700
    g = _gen(3)
    q = torch.randn(t, h, dh, generator=g)
    kv = torch.randn(n, dh, generator=g)
    idx = torch.randint(-1, n, (t, n_keys), generator=g, dtype=torch.int32)
    sink = torch.randn(h, generator=g)
    out = poison((t, h, dh), torch.float32)
    sa.sparse_attn(q, kv, idx, sink, dh**-0.5, out=out, config={"no_split_programs": 6})
    assert_close("sparse_attn", out, sa.sparse_attn_ref(q, kv, idx, sink, dh**-0.5), torch.float32)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_indexer_topk_interp(dtype):
    t, hi, di, c, topk = 3, 16, 32, 200, 64
    g = _gen(11)
    q = torch.randn(t, hi, di, generator=g).to(dtype)
    k = torch.randn(c, di, generator=g).to(dtype)
    k[100:110] = k[90:100]  # exact ties: the lower index wins in both
    w = torch.randn(t, hi, generator=g)
    n_valid = torch.tensor([c, 37, 0], dtype=torch.int32)
    out = poison((t, topk), torch.int32)
    ix.indexer_topk(q, k, w, n_valid, topk, out=out)
    ref = ix.indexer_topk_ref(q, k, w, n_valid, topk)
    for r in range(t):
        assert set(out[r].tolist()) == set(ref[r].tolist()), f"token {r}: selections differ"
    assert (out[1, 37:] == -1).all() and (out[2] == -1).all()
    assert (out[1, :37] >= 0).all()


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "t,d,block",
    [
        (1, 64, None),
        (3, 200, None),
        (2, 300, None),
        (20, 96, None),
        (17, 64, {"BLOCK_T": 16}),
        (40, 36, {"BLOCK_T": 32, "SPLIT": 2}),
        (33, 100, {"BLOCK_T": 16, "SPLIT": 3}),
        (260, 16, {"BLOCK_T": 16}),
        (70, 40, {"BLOCK_T": 64, "BLOCK": 16, "SPLIT": 3}),
    ],
)
def test_mhc_interp(t, d, block, dtype, monkeypatch):
    # Pin the pre/head path whatever the default T threshold: split kernel (block None) or block +
    # finish kernels with these _block_config overrides. Each block T ends in a partial token
    # block; W = 144 (2 splits of 96) and W = 400 (3 splits of 160, SPLIT not a power of two) end
    # their last split in a partial BLOCK (32) step, after several full ones.
    monkeypatch.setattr(mh, "_BLOCK_MIN_T", t if block else t + 1)
    if block:
        cfg = mh._block_config
        monkeypatch.setattr(mh, "_block_config", lambda n: {**cfg(n), **block})
    g = _gen(d)
    x = torch.randn(t, 4, d, generator=g).to(dtype)
    fn = torch.randn(24, 4 * d, generator=g) * 0.05
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn(24, generator=g) * 0.3
    y, post, comb = (
        poison((t, d), dtype),
        poison((t, 4), torch.float32),
        poison((t, 4, 4), torch.float32),
    )
    mh.mhc_pre(x, fn, scale, base, y=y, post=post, comb=comb)
    ry, rp, rc = mh.mhc_pre_ref(x, fn, scale, base)
    assert_close("mhc_pre y", y, ry, dtype)
    assert_close("mhc_pre post", post, rp, torch.float32, loose=5.0)
    assert_close("mhc_pre comb", comb, rc, torch.float32, loose=5.0)
    yh = poison((t, d), dtype)
    mh.mhc_head(x, fn[:4], scale[:1], base[:4], y=yh)
    assert_close("mhc_head", yh, mh.mhc_head_ref(x, fn[:4], scale[:1], base[:4]), dtype)
    f = torch.randn(t, d, generator=g).to(dtype)
    out = poison((t, 4, d), dtype)
    mh.mhc_post(f, x, rp, rc, out=out)
    assert_close("mhc_post", out, mh.mhc_post_ref(f, x, rp, rc), dtype)


@interp
def test_launchers_reject_bad_inputs():
    w, s = make_fp8(64, 256)
    x = torch.randn(1, 256)
    with pytest.raises(TypeError, match="x: expected dtype"):
        f8.fp8_linear(x.to(torch.int32), w, s)
    with pytest.raises(ValueError, match="w_scale: expected shape"):
        f8.fp8_linear(x, w, s[:, :1])
    with pytest.raises(ValueError, match="contiguous"):
        f8.fp8_linear(x, w.t().contiguous().t(), s)
    pool = make_pool(2, 128, 64)
    slots, rw = make_routing(1, 2, 2)
    with pytest.raises(TypeError, match="slots"):
        f4.fp4_experts(x[:, :128], slots.long(), rw, x[:, :128], *pool, 10.0)
    with pytest.raises(ValueError, match="w2_q: expected shape"):
        bad = [pool[0], pool[1], pool[2][:, :1], pool[3]]
        f4.fp4_experts(x[:, :128], slots, rw, x[:, :128], *bad, 10.0)


@pytest.mark.parametrize("d,i", [(64, 32), (256, 128), (f4.V4_FLASH_D, f4.V4_FLASH_I)])
def test_packed_pool_views_tile_the_buffer(d, i):
    """packed_pool_views: four [S, rows, width] views of the buffer, slot stride slot_bytes,
    rows contiguous, at the documented offsets; together they cover every byte exactly once;
    a record (a buffer row) is its four tensors back to back in pool_shapes order."""
    n_slots, sb = 3, f4.slot_bytes(d, i)
    assert sb % 16 == 0
    buf = torch.zeros(n_slots, sb, dtype=torch.uint8)
    views = f4.packed_pool_views(buf, d, i)
    shapes = f4.pool_shapes(n_slots, d, i)
    assert tuple(views) == POOL_NAMES
    offs = [0, i * d, i * d + i * d // 16, i * d + i * d // 16 + d * i // 2]
    cover = torch.zeros(n_slots, sb, dtype=torch.int32)
    for nm, off in zip(POOL_NAMES, offs, strict=True):
        v = views[nm]
        assert v.shape == shapes[nm] and v.dtype == torch.uint8
        assert v.stride() == (sb, shapes[nm][2], 1)
        assert v.data_ptr() - buf.data_ptr() == off and off % 16 == 0
        buf.zero_()
        v.fill_(1)
        cover += buf
    assert (cover == 1).all(), "the views overlap or leave gaps"
    # records built by hand (each slot's four tensors flattened, back to back) read back as the
    # tensors they were built from
    pool = [t.cpu() for t in make_pool(n_slots, d, i, seed=d)]
    recs = torch.stack([torch.cat([t[s].flatten() for t in pool]) for s in range(n_slots)])
    for nm, t in zip(POOL_NAMES, pool, strict=True):
        assert torch.equal(f4.packed_pool_views(recs, d, i)[nm], t), nm
    with pytest.raises(TypeError, match="uint8"):
        f4.packed_pool_views(buf.view(torch.int8), d, i)
    with pytest.raises(ValueError, match="slot_bytes"):
        f4.packed_pool_views(buf[:, :-16], d, i)
    with pytest.raises(ValueError, match="slot_bytes"):
        f4.packed_pool_views(buf[0], d, i)
    with pytest.raises(ValueError, match="contiguous"):
        f4.packed_pool_views(buf[::2], d, i)
    with pytest.raises(ValueError, match="multiples of 32"):
        f4.packed_pool_views(buf, d + 16, i)


@interp
def test_fp4_experts_rejects_bad_pool_strides():
    """Pool tensors may have any slot stride, but their rows must be contiguous, the slot
    stride a multiple of 16 bytes and the start 16-byte aligned (16-byte vector loads)."""
    d, i, n_slots = 128, 64, 2
    pool = make_pool(n_slots, d, i)
    slots, rw = make_routing(1, 2, n_slots)
    x = torch.randn(1, d)
    rows, width = pool[2].shape[1:]
    n = rows * width
    u8 = torch.zeros(2 * n_slots * n + 16, dtype=torch.uint8)  # storage for the bad views
    bad = [  # w2_q [S, rows, width] with
        ("rows must be contiguous", u8[: n_slots * n].view(n_slots, width, rows).transpose(1, 2)),
        ("rows must be contiguous", u8[: n_slots * n * 2].view(n_slots, rows, 2 * width)[..., ::2]),
        ("not a multiple of 16", u8[: n_slots * (n + 8)].view(n_slots, n + 8)[:, :n].view(
            n_slots, rows, width)),
        ("16-byte aligned", u8[4 : 4 + n_slots * n].view(n_slots, rows, width)),
    ]  # fmt: skip
    for msg, w2_q in bad:
        with pytest.raises(ValueError, match=f"w2_q: .*{msg}"):
            f4.fp4_experts(x, slots, rw, x, pool[0], pool[1], w2_q, pool[3], 10.0)


def test_ops_dispatch_matches_ref():
    """ops.* honour out= on whichever path this machine takes (CPU: the twin; CUDA: Triton)."""
    assert ops.use_triton(torch.empty(1, device=DEV)) == (HAS_CUDA and HAS_TRITON)
    w, s = make_fp8(64, 256)
    x = torch.randn(2, 256, generator=_gen(1)).to(DEV)
    out = poison((2, 64), torch.float32)
    ops.fp8_linear(x, w, s, out=out)
    assert_close("ops.fp8_linear", out, f8.fp8_linear_ref(x, w, s), torch.float32)
    q = torch.randn(1, 16, 32, device=DEV)
    kv = torch.randn(40, 32, device=DEV)
    idx = torch.arange(30, dtype=torch.int32, device=DEV)[None]
    sink = torch.zeros(16, device=DEV)
    o = poison((1, 16, 32), torch.float32)
    ops.sparse_attn(q, kv, idx, sink, 0.2, out=o)
    assert_close("ops.sparse_attn", o, sa.sparse_attn_ref(q, kv, idx, sink, 0.2), torch.float32)


def test_gemv_f32_dispatch_and_mm_f32():
    """ops.gemv_f32 honours out= on whichever path this machine takes; model.mm_f32 still equals
    x.float() @ w.float().T (CPU: that very product; CUDA: the GEMV for few tokens, cuBLAS for
    more, both fp32 sums of exact products)."""
    from homeseek import model as M

    x, w = _gemv_inputs(3, 64, 256, torch.bfloat16)
    ref = x.float() @ w.float().T
    out = poison((3, 64), torch.float32)
    assert ops.gemv_f32(x, w, out=out) is out
    assert_close("ops.gemv_f32", out, ref, torch.float32)
    for t in (1, 3, 12):  # 12 > GEMV_MAX_T: torch.mm on CUDA
        xt = torch.randn(t, 256, generator=_gen(t)).to(torch.bfloat16).to(DEV)
        want = xt.float() @ w.float().T
        got = M.mm_f32(xt, w)
        assert got.dtype == torch.float32
        if DEV == "cpu":
            assert torch.equal(got, want)
        else:
            assert_close(f"mm_f32 T={t}", got, want, torch.float32)


# ------------------------------------------------------------------------------------------------
# GPU tests: compiled kernels at V4-Flash sizes
# ------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize(
    "m,n,k",
    [(1, 1024, 4096), (1, 32768, 1024), (1, 512, 4096), (2, 4096, 8192), (16, 2048, 4096),
     (5, 8192, 1024), (1, 130, 200), (3, 200, 1000), (300, 4096, 2048), (77, 1000, 1000)],
)  # fmt: skip
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp8_linear_gpu(m, n, k, act_quant, dtype):
    w, s = make_fp8(n, k, seed=n, scale_fp32=n == 200)
    x = torch.randn(m, k, generator=_gen(m)).to(dtype).to(DEV)
    out = poison((m, n), dtype)
    f8.fp8_linear(x, w, s, out=out, act_quant=act_quant)
    ref = f8.fp8_linear_ref(x, w, s, act_quant=act_quant)
    assert_close("fp8_linear", out, ref, dtype, loose=2.0 if act_quant else 1.0)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m", [1, 4, 300, 4096])  # GEMV one token, GEMV 4 tokens, GEMM
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp8_linear_grouped_gpu(m, dtype):
    """wo_a at V4-Flash size (8 groups of 1024 rows, 4096 inputs each) in one grouped launch,
    with a workspace sized the way the engine sizes it (model.fp8_shapes lists the whole (N, K)),
    against the 8 per-group launches it replaces and the twin."""
    groups, r, k = 8, 1024, 4096
    w, s = make_fp8(groups * r, k, seed=7, scale_fp32=True)  # the engine loads fp32 scales
    x = torch.randn(m, groups * k, generator=_gen(m)).to(dtype).to(DEV)
    ws = f8.fp8_linear_workspace([(groups * r, k), (r, k)], f8.GEMV_MAX_M, DEV)
    out = poison((m, groups * r), dtype)
    f8.fp8_linear(x, w, s, out=out, groups=groups, workspace=ws)
    per = poison((m, groups * r), dtype)
    for g in range(groups):
        f8.fp8_linear(
            x[:, g * k : (g + 1) * k], w[g * r : (g + 1) * r], s[g * r // 128 : (g + 1) * r // 128],
            out=per[:, g * r : (g + 1) * r], workspace=ws,
        )  # fmt: skip
    assert_close("grouped vs per-group launches", out, per, dtype)
    assert_close("grouped vs twin", out, f8.fp8_linear_ref(x, w, s, groups=groups), dtype)
    assert int(ws.counters.abs().sum()) == 0


@pytest.mark.parametrize("down", ["pair", "token"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp4_experts_decode_gpu(m, act_quant, dtype, down):
    d, i, k, n_slots = f4.V4_FLASH_D, f4.V4_FLASH_I, 6, 16
    pool = make_pool(n_slots, d, i, seed=m)
    slots, rw = make_routing(m, k, n_slots, seed=m)
    x = torch.randn(m, d, generator=_gen(m)).to(dtype).to(DEV)
    shared = torch.randn(m, d, generator=_gen(m + 1)).to(dtype).to(DEV)
    out = poison((m, d), dtype)
    f4.fp4_experts(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=act_quant,
                   config={"down": down})  # fmt: skip
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=act_quant)
    assert_close("fp4_experts", out, ref, dtype, loose=2.0)


# Tile configs the benchmark sweeps (tools/bench_kernels.py): any of them may become a default.
FP4_GPU_CONFIGS = [
    {"pdl": False},
    {"a_quant": "inline"},
    {"pdl": True},
    {"nb_down": 16},
    {"asm": False},
    {"block_n": 8, "num_warps": 4, "block_n_down": 16, "num_warps_down": 4},
    {"block_n": 4, "num_warps": 4, "block_n_down": 8, "num_warps_down": 4},
    {"block_n": 32, "num_warps": 4, "block_n_down": 8, "num_warps_down": 8},
    {"block_n": 8, "num_warps": 2, "block_n_down": 16, "num_warps_down": 2},
    {"block_n": 16, "num_warps": 4, "maxnreg": 80, "block_n_down": 8, "num_warps_down": 2},
    {"block_n": 16, "num_warps": 8, "block_n_down": 32, "num_warps_down": 8},
    {"block_n": 32, "num_warps": 8, "block_n_down": 64, "num_warps_down": 8},
    {"nb": 2, "nb_down": 4},
    {"prefetch": True, "prefetch_down": True},
    {"block_n": 8, "prefetch": True, "block_n_down": 16, "prefetch_down": True},
    {"down": "token"},
    {"down": "token", "block_n_down": 8},
    {"down": "token", "block_n_down": 32, "prefetch_down": True},
    {"down": "token", "block_n_down": 8, "num_warps_down": 2},
    {"down": "token", "block_n_down": 16, "num_warps_down": 8, "prefetch_down": True},
]


@pytest.mark.parametrize("cfg", FP4_GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("m,act_quant", [(1, False), (1, True), (4, True)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp4_experts_decode_configs_gpu(m, act_quant, cfg):
    """Every swept tile config computes the same function (bf16; M=4 has a shared slot)."""
    dtype = torch.bfloat16
    d, i, k, n_slots = f4.V4_FLASH_D, f4.V4_FLASH_I, 6, 16
    pool = make_pool(n_slots, d, i, seed=7)
    slots, rw = make_routing(m, k, n_slots, seed=m + 7)
    if m == 4:
        slots[3, 0] = slots[0, 1]  # tokens 0 and 3 share a slot (two-token pass)
        slots[1, 2] = slots[0, 1]  # and token 1: an odd third member
    x = torch.randn(m, d, generator=_gen(m)).to(dtype).to(DEV)
    shared = torch.randn(m, d, generator=_gen(m + 1)).to(dtype).to(DEV)
    out = poison((m, d), dtype)
    ws = f4.fp4_experts_workspace(m * k, d, i, dtype, DEV)
    f4.fp4_experts(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=act_quant,
                   workspace=ws, config=cfg)  # fmt: skip
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=act_quant)
    assert_close("fp4_experts", out, ref, dtype, loose=2.0)
    assert int(ws.counters.abs().sum()) == 0


@pytest.mark.parametrize(
    "dev",
    [
        pytest.param("cpu", marks=interp),
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="")]),
    ],
)
@pytest.mark.parametrize("m", [1, 4])
def test_fp4_experts_act_quant_once_is_inline(m, dev):
    """Quantising a once per act block in gate/up (the default) gives the same bits as
    quantising it in every down program. The calls share one workspace, so the third also finds
    a's arrival counters back at zero."""
    d, i, k = (256, 128, 2) if dev == "cpu" else (f4.V4_FLASH_D, f4.V4_FLASH_I, 6)
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    n_slots = 2 * k
    pool = [t.to(dev) for t in make_pool(n_slots, d, i, seed=21)]
    slots, rw = make_routing(m, k, n_slots, seed=m + 21)
    if m == 4:
        slots[3, 0] = slots[0, 1]  # a slot shared by two tokens
    slots, rw = slots.to(dev), rw.to(dev)
    ws = f4.fp4_experts_workspace(m * k, d, i, dtype, dev)
    x = torch.randn(m, d, generator=_gen(m)).to(dtype).to(dev)
    shared = torch.randn(m, d, generator=_gen(m + 9)).to(dtype).to(dev)
    outs = []
    for aq in ("gate_up", "inline", "gate_up"):
        out = poison((m, d), dtype, dev)
        cfg = {"block_n": 32, "block_n_down": 64} if dev == "cpu" else {}
        f4.fp4_experts(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=True,
                       workspace=ws, config={**cfg, "a_quant": aq})  # fmt: skip
        outs.append(out)
        assert int(ws.a_counters.abs().sum()) == 0
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=True)
    assert_close("fp4_experts", outs[0], ref, dtype, loose=2.0)


# Paths of the pool layout test: decode with either down launch, grouped v1 and v2.
POOL_LAYOUT_PATHS = {
    "pair": {"down": "pair"},
    "token": {"down": "token"},
    "v1": {"variant": "v1"},
    "v2": {"variant": "v2"},
}


@pytest.mark.parametrize(
    "dev",
    [
        pytest.param("cpu", marks=interp),
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="")]),
    ],
)
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("path", list(POOL_LAYOUT_PATHS))
def test_fp4_experts_pool_layouts(path, act_quant, layout, dev):
    """The kernels read each pool tensor at its own slot stride: the same experts as four
    contiguous tensors and as packed_pool_views of one buffer (the expert store's layout), or
    padded (pool_in_layout), give the same bits on every path; so does the plain-torch twin
    (through ops, which passes the views on untouched)."""
    cpu = dev == "cpu"
    d, i = (256, 128) if cpu else (f4.V4_FLASH_D, f4.V4_FLASH_I)
    k, n_slots = (3, 5) if cpu else (6, 12)
    cfg = dict(POOL_LAYOUT_PATHS[path])
    grouped = "variant" in cfg
    if grouped:  # a slot in several tiles, skipped pairs, a token with the same slot twice
        m = 19 if cpu else 300
        slots, rw = _v2_edge_routing(m, k, n_slots)
    else:  # GPU "pair": M = 1, the decode step's case (programmatic dependent launch)
        m = 1 if not cpu and path == "pair" else 3
        slots, rw = make_routing(m, k, n_slots, seed=41)
        if m == 3:
            slots[0, 0] = slots[2, 0]  # a slot shared by two tokens: a two-token pass
        if cpu:  # fewer interpreted programs
            cfg.update(block_n=32, block_n_down=64)
    # the interpreter's bf16 dot is wrong: fp16 for v2 there, fp32 (the v1 default) otherwise
    dtype = torch.bfloat16 if not cpu else torch.float16 if path == "v2" else torch.float32
    pool = [t.to(dev) for t in make_pool(n_slots, d, i, seed=40)]
    slots, rw = slots.to(dev), rw.to(dev)
    x = torch.randn(m, d, generator=_gen(42)).to(dtype).to(dev)
    shared = torch.randn(m, d, generator=_gen(43)).to(dtype).to(dev)
    run = f4.fp4_experts_grouped if grouped else f4.fp4_experts
    outs, refs = [], []
    for p in (pool, pool_in_layout(pool, d, i, layout)):
        out = poison((m, d), dtype, dev)
        run(x, slots, rw, shared, *p, 10.0, out=out, act_quant=act_quant, config=cfg)
        outs.append(out)
        refs.append(ops.fp4_experts(x, slots, rw, shared, *p, 10.0, act_quant=act_quant,
                                    triton=False))  # fmt: skip
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[1], outs[0]), f"{path} differs on a {layout} pool"
    assert torch.equal(refs[1], refs[0]), f"the twin differs on a {layout} pool"
    assert_close(f"fp4_experts {path}", outs[0], refs[0], dtype, loose=2.0)


FP8_GPU_CONFIGS = [
    {"block_n": 8, "split_k": 1},
    {"block_n": 16},
    {"block_n": 64, "num_warps": 8},
    {"block_n": 64, "num_warps": 4},
    {"num_warps": 8},
    {"u": 2},
    {"u": 2, "block_n": 16},
    {"programs_per_sm": 8},
    {"programs_per_sm": 2},
    {"split_k": 3},
    {"pdl": False},
    {"pdl": True, "u": 4},
    {"pdl": True, "pdl_early": False},
    {"pdl": True, "block_n": 8, "split_k": 1, "u": 4},  # 4 steps preloaded before the wait
    {"pdl": True, "block_n": 16, "split_k": 1, "u": 4, "num_warps": 8, "pre": 2},
]


@pytest.mark.parametrize("cfg", FP8_GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("n,k", [(32768, 1024), (4096, 8192), (1000, 1536)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp8_linear_gemv_configs_gpu(n, k, cfg):
    """Every swept GEMV config computes the same function (M=1, bf16, act_quant)."""
    dtype = torch.bfloat16
    w, s = make_fp8(n, k, seed=n + k)
    x = torch.randn(1, k, generator=_gen(k)).to(dtype).to(DEV)
    out = poison((1, n), dtype)
    f8.fp8_linear(x, w, s, out=out, act_quant=True, config=cfg)
    ref = f8.fp8_linear_ref(x, w, s, act_quant=True)
    assert_close("fp8_linear", out, ref, dtype, loose=2.0)


@pytest.mark.parametrize("early", [True, False], ids=["early", "late"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp8_linear_pdl_chain_gpu(graph, early):
    """Back-to-back dependent GEMVs (each reads the output the one before writes, all sharing one
    split-K workspace): with programmatic dependent launch a launch starts early, so any read of
    x, out or the workspace before its wait would see the NaN poison or a stale partial."""
    dtype = torch.bfloat16
    dims = [4096, 1536, 4096, 2048, 4096, 1000]  # K of each link, then its N
    ws = [make_fp8(n, k, seed=j) for j, (k, n) in enumerate(zip(dims, dims[1:], strict=False))]
    wsp = f8.fp8_linear_workspace([(w.shape[0], w.shape[1]) for w, _ in ws], 1, DEV)
    x = torch.randn(1, dims[0], generator=_gen(5)).to(dtype).to(DEV)
    outs = [torch.empty(1, n, dtype=dtype, device=DEV) for n in dims[1:]]

    def chain():
        for o in outs:
            o.fill_(float("nan"))
        h = x
        for (w, s), o in zip(ws, outs, strict=True):
            cfg = {"pdl": True, "pdl_early": early}
            f8.fp8_linear(h, w, s, out=o, act_quant=True, workspace=wsp, config=cfg)
            h = o

    chain()  # compile outside any capture
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain()
        for o in outs:
            o.zero_()
        g.replay()
    torch.cuda.synchronize()
    h = x
    for j, ((w, s), o) in enumerate(zip(ws, outs, strict=True)):
        ref = f8.fp8_linear_ref(h, w, s, act_quant=True)
        assert_close(f"fp8_linear chain link {j}", o, ref, dtype, loose=2.0)
        h = o


# Prefill tile configs the benchmark sweeps (None: the default for the dtype).
FP4_GROUPED_GPU_CONFIGS = [
    None,  # v2 for bf16, v1 for fp32
    {"variant": "v1"},
    {"variant": "v1", "block_m": 16, "block_n": 64, "block_k": 32, "num_warps": 4},
    {"variant": "v1", "block_m": 16, "block_n": 128, "block_k": 64, "num_warps": 8},
    {"variant": "v1", "block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 8, "num_stages": 3},
    {"variant": "v2", "block_m": 64, "num_stages": 4},
    {"variant": "v2", "block_m": 32, "block_k": 256, "num_stages": 2},
    {"variant": "v2", "block_n": 64, "num_warps": 4, "num_stages": 4, "num_warps_down": 8},
    {"variant": "v2", "block_n_down": 256, "programs_per_sm": 1},
    {"variant": "v2", "asm": False},
]


@pytest.mark.parametrize("cfg", FP4_GROUPED_GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m", [17, 512])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp4_experts_grouped_gpu(m, dtype, act_quant, cfg):
    if cfg is not None and (dtype != torch.bfloat16 or m != 512):
        pytest.skip("tile configs: bf16 at M=512")
    d, i, k, n_slots = f4.V4_FLASH_D, f4.V4_FLASH_I, 6, 12
    pool = make_pool(n_slots, d, i, seed=m)
    slots, rw = make_routing(m, k, n_slots, seed=m)
    x = torch.randn(m, d, generator=_gen(m)).to(dtype).to(DEV)
    shared = torch.randn(m, d, generator=_gen(m + 1)).to(dtype).to(DEV)
    out = poison((m, d), dtype)
    f4.fp4_experts_grouped(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=act_quant,
                           config=cfg)  # fmt: skip
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=act_quant)
    if act_quant and dtype == torch.float32:
        # fp32 with act_quant: the kernel's a = route_w·silu(g)·v differs from the twin's in the
        # last bits (summation order, exp), and act-quantising it before w2 amplifies that where
        # a value sits on an e4m3 rounding edge (or a block amax on a power-of-two edge): then a
        # whole token row moves by up to a requantised block's worth. H100: 4 of 512 rows, the
        # same 4 under every tile config, 1.7e-3 of max; without act_quant all rows agree to
        # 2e-6. So: rows off beyond the fp32 tolerance must be rare and bounded.
        assert_close_rows("fp4_experts_grouped", out, ref, dtype, max_rows=0.01, bound=5e-3)
    else:
        assert_close("fp4_experts_grouped", out, ref, dtype, loose=2.0)


@pytest.mark.parametrize("cfg", [None, {"block_m": 64, "block_n": 64, "num_warps": 4}], ids=str)
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp4_experts_grouped_v2_edges_gpu(dtype, act_quant, cfg):
    """v2 at V4-Flash sizes: a slot used by every token (three 128-pair tiles), skipped pairs,
    a token with the same slot twice; bf16 (PTX decode) and fp16 (portable decode)."""
    m, k, d, i, n_slots = 300, 6, f4.V4_FLASH_D, f4.V4_FLASH_I, 10
    pool = make_pool(n_slots, d, i, seed=31)
    slots, rw = _v2_edge_routing(m, k, n_slots)
    x = torch.randn(m, d, generator=_gen(32)).to(dtype).to(DEV)
    shared = torch.randn(m, d, generator=_gen(33)).to(dtype).to(DEV)
    out = poison((m, d), dtype)
    f4.fp4_experts_grouped(x, slots, rw, shared, *pool, 10.0, out=out, act_quant=act_quant,
                           config={"variant": "v2", **(cfg or {})})  # fmt: skip
    ref = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=act_quant)
    assert_close("fp4_experts_grouped v2", out, ref, dtype, loose=2.0)


@pytest.mark.parametrize("dtype,asm", [(torch.bfloat16, True), (torch.bfloat16, False),
                                       (torch.float16, False)])  # fmt: skip
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp4_v2_operand_gpu(dtype, asm):
    """The v2 weight operand on the GPU, the PTX decode included, bit for bit."""
    _check_v2_operand(dtype, asm)


@pytest.mark.parametrize("cfg", [None, {"keys_per_split": 256}, {"keys_per_split": 64}], ids=str)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("t,n_keys", [(1, 128), (1, 640), (4, 640), (2, 8320), (1, 1)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_sparse_attn_gpu(t, n_keys, dtype, cfg):
    _check_sparse_attn_gpu(t, n_keys, dtype, cfg)


def _check_sparse_attn_gpu(t: int, n_keys: int, dtype: torch.dtype, cfg: dict | None) -> None:
    h, dh, n = 64, 512, 9000
    g = _gen(n_keys)
    q = (torch.randn(t, h, dh, generator=g) * 0.3).to(dtype).to(DEV)
    kv = torch.randn(n, dh, generator=g).to(dtype).to(DEV)
    idx = torch.randint(-1, n, (t, n_keys), generator=g, dtype=torch.int32).to(DEV)
    sink = torch.randn(h, generator=g).to(DEV)
    out = poison((t, h, dh), dtype)
    sa.sparse_attn(q, kv, idx, sink, dh**-0.5, out=out, config=cfg)
    ref = sa.sparse_attn_ref(q, kv, idx, sink, dh**-0.5)
    assert_close("sparse_attn", out, ref, dtype, loose=2.0)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("t,n_keys", [(sa.PREFILL_T, 160), (300, 640), (4096, 160)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_sparse_attn_prefill_tiles_gpu(t, n_keys, dtype):
    """From PREFILL_T tokens: the prefill tiles (bf16), the decode tiles (fp32)."""
    _check_sparse_attn_gpu(t, n_keys, dtype, None)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_rope_gpu(dtype):
    t, h, dh, p = 300, 64, 512, 32
    g = _gen(t)
    x = torch.randn(t, h * dh + 8192, generator=g).to(dtype).to(DEV)[:, : h * dh].view(t, h, dh)
    ang = torch.randn(t, p, generator=g).to(DEV)
    cos, sin = ang.cos(), ang.sin()
    ref = rp.head_rms_rope_ref(x, cos, sin, 1e-6)
    assert_close("head_rms_rope", rp.head_rms_rope(x, cos, sin, 1e-6), ref, dtype)
    rows = torch.randint(0, t, (1,), generator=g).to(DEV)  # decode: one token, its position
    got = rp.head_rms_rope(x[:1], cos, sin, 1e-6, rows=rows)
    assert_close(
        "head_rms_rope rows", got, rp.head_rms_rope_ref(x[:1], cos[rows], sin[rows], 1e-6), dtype
    )
    y = x.contiguous()
    want = rp.rope_heads_ref(y, cos, -sin)
    assert_close("rope_heads_", rp.rope_heads_(y, cos, -sin), want, dtype)
    assert torch.equal(y[..., : -2 * p], x[..., : -2 * p])


@pytest.mark.parametrize("n", [64, 256, 512, 1024])
@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gemv_f32_gpu(t, n):
    """V4-Flash's plain decode products (weights_proj, router / indexer compressor, compressors;
    K = 4096): float64 reference, twin, out=, T-invariant rows (_check_gemv); two calls and a
    CUDA-graph replay give the same bits; no tensor cores (fp32 FMAs: ~1e-7 of max, where a
    TF32 dot would be ~1e-4 off)."""
    x, w = _gemv_inputs(t, n, 4096, torch.bfloat16)
    y = _check_gemv(x, w)
    assert torch.equal(gv.gemv_f32(x, w), y), "two calls differ"
    out = torch.empty(t, n, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gv.gemv_f32(x, w, out=out)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gv.gemv_f32(x, w, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y), "graph replay differs from the eager call"


@pytest.mark.parametrize("c", [4096, 65536, 300])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_indexer_topk_gpu(c):
    t, hi, di, topk = 2, 64, 128, 512
    g = _gen(c)
    q = torch.randn(t, hi, di, generator=g).to(torch.bfloat16).to(DEV)
    k = torch.randn(c, di, generator=g).to(torch.bfloat16).to(DEV)
    w = (torch.randn(t, hi, generator=g) * 0.011).to(DEV)
    n_valid = torch.tensor([c, c // 3], dtype=torch.int32, device=DEV)
    out = poison((t, topk), torch.int32)
    ix.indexer_topk(q, k, w, n_valid, topk, out=out)
    ref = ix.indexer_topk_ref(q, k, w, n_valid, topk)
    # bf16 dot vs fp32 einsum: near-ties at the k-th score may swap; compare as sets with slack.
    scores = ix.indexer_scores_ref(q, k, w, n_valid)
    for r in range(t):
        a, b = set(out[r].tolist()), set(ref[r].tolist())
        diff = (a ^ b) - {-1}
        kth = scores[r, [v for v in b if v >= 0]].min() if (ref[r] >= 0).any() else 0.0
        for v in diff:
            assert abs(float(scores[r, v]) - float(kth)) < 1e-3 * float(scores[r].abs().max()), (
                f"token {r}: entry {v} selected differently and is not a near-tie"
            )


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    "t,block", [(1, False), (4, False), (17, False), (64, True), (300, False), (300, True),
                (4096, True), (4133, True)],
)  # fmt: skip
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_mhc_gpu(t, block, dtype, monkeypatch):
    # The split kernel (64 splits at 1, 4; 16 from 17) or the block + finish kernels at their
    # default config (BLOCK_T 16 x 64 splits at 64; 16 x 32 with a partial last block at 300;
    # 32 x 16 at 4096, partial at 4133), whatever the default threshold picks.
    monkeypatch.setattr(mh, "_BLOCK_MIN_T", t if block else t + 1)
    d = 4096
    g = _gen(t)
    x = torch.randn(t, 4, d, generator=g).to(dtype).to(DEV)
    fn = (torch.randn(24, 4 * d, generator=g) * 0.01).to(DEV)
    scale = (torch.rand(3, generator=g) + 0.5).to(DEV)
    base = (torch.randn(24, generator=g) * 0.3).to(DEV)
    y, post, comb = mh.mhc_pre(x, fn, scale, base, y=poison((t, d), dtype),
                               post=poison((t, 4), torch.float32),
                               comb=poison((t, 4, 4), torch.float32))  # fmt: skip
    ry, rp, rc = mh.mhc_pre_ref(x, fn, scale, base)
    assert_close("mhc_pre y", y, ry, dtype, loose=5.0)
    assert_close("mhc_pre post", post, rp, torch.float32, loose=20.0)
    assert_close("mhc_pre comb", comb, rc, torch.float32, loose=20.0)
    yh = mh.mhc_head(x, fn[:4].contiguous(), scale[:1], base[:4], y=poison((t, d), dtype))
    assert_close("mhc_head", yh, mh.mhc_head_ref(x, fn[:4], scale[:1], base[:4]), dtype, 5.0)
    f = torch.randn(t, d, generator=g).to(dtype).to(DEV)
    out = mh.mhc_post(f, x, rp, rc, out=poison((t, 4, d), dtype))
    assert_close("mhc_post", out, mh.mhc_post_ref(f, x, rp, rc), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay():
    """All decode launches capture into one graph (no host syncs, no allocation with
    workspaces) and replay correctly after the static inputs change."""
    dt = torch.bfloat16
    d, i, k, n_slots = f4.V4_FLASH_D, f4.V4_FLASH_I, 6, 8
    pool = make_pool(n_slots, d, i)
    w, s = make_fp8(1024, d)
    x = torch.randn(1, d, device=DEV).to(dt)
    slots, rw = make_routing(1, k, n_slots, holes=False)
    shared = torch.randn(1, d, device=DEV).to(dt)
    q = torch.randn(1, 64, 512, device=DEV).to(dt)
    kv = torch.randn(2000, 512, device=DEV).to(dt)
    idx = torch.randint(0, 2000, (1, 640), dtype=torch.int32, device=DEV)
    sink = torch.randn(64, device=DEV)
    xs = torch.randn(1, 4, d, device=DEV).to(dt)
    fn = torch.randn(24, 4 * d, device=DEV) * 0.01
    sc, base = torch.ones(3, device=DEV), torch.zeros(24, device=DEV)
    ws4 = f4.fp4_experts_workspace(k, d, i, dt, DEV)
    ws8 = f8.fp8_linear_workspace([(1024, d)], 1, DEV)
    wsa = sa.sparse_attn_workspace(1, 64, 512, 640, DEV)
    wsm = mh.mhc_workspace(1, DEV)
    o4 = torch.empty(1, d, device=DEV, dtype=dt)
    o4t = torch.empty(1, d, device=DEV, dtype=dt)
    o8 = torch.empty(1, 1024, device=DEV, dtype=dt)
    oa = torch.empty_like(q)
    om = (
        torch.empty(1, d, device=DEV, dtype=dt),
        torch.empty(1, 4, device=DEV),
        torch.empty(1, 4, 4, device=DEV),
    )

    def step():
        f4.fp4_experts(x, slots, rw, shared, *pool, 10.0, out=o4, act_quant=True, workspace=ws4)
        f4.fp4_experts(x, slots, rw, shared, *pool, 10.0, out=o4t, act_quant=True, workspace=ws4,
                       config={"down": "token"})  # fmt: skip
        f8.fp8_linear(x, w, s, out=o8, act_quant=True, workspace=ws8)
        sa.sparse_attn(q, kv, idx, sink, 512**-0.5, out=oa, workspace=wsa)
        mh.mhc_pre(xs, fn, sc, base, y=om[0], post=om[1], comb=om[2], workspace=wsm)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        x.copy_(torch.randn(1, d, generator=_gen(seed)).to(dt))
        slots.copy_(make_routing(1, k, n_slots, seed=seed, holes=False)[0])
        idx.copy_(torch.randint(0, 2000, (1, 640), generator=_gen(seed), dtype=torch.int32))
        xs.copy_(torch.randn(1, 4, d, generator=_gen(seed)).to(dt))
        graph.replay()
        torch.cuda.synchronize()
        ref4 = f4.fp4_experts_ref(x, slots, rw, shared, *pool, 10.0, act_quant=True)
        assert_close("graph fp4_experts", o4, ref4, dt, loose=2.0)
        assert_close("graph fp4_experts token", o4t, ref4, dt, loose=2.0)
        assert_close("graph fp8_linear", o8, f8.fp8_linear_ref(x, w, s, act_quant=True), dt, 2.0)
        ref_a = sa.sparse_attn_ref(q, kv, idx, sink, 512**-0.5)
        assert_close("graph sparse_attn", oa, ref_a, dt, 2.0)
        assert_close("graph mhc_pre", om[0], mh.mhc_pre_ref(xs, fn, sc, base)[0], dt, 5.0)


# ================================================================================================
# FP8 prefill through torch's FP8 scaled matmul (kernels/fp8_linear.py, "Prefill through torch's
# FP8 scaled matmul"). CPU: the act-quant kernel (interpreter), the operand layouts against
# torch's own checks (meta tensors), the dispatch rules, the once-per-device probe and its
# fallbacks, with a plain-torch twin of the blockwise scaled matmul standing in for cuBLAS (torch
# runs it on sm_90 only). GPU: the real path against fp8_linear_ref and the Triton GEMM.
# ================================================================================================


def _emulated_scaled_mm(a, b, sa, sb):
    """torch's 1x128 x 128x128 blockwise FP8 scaled matmul (bf16 out) in plain torch, asserting
    the operand layouts torch demands on CUDA."""
    mp, k = a.shape
    n = b.shape[1]
    kb = -(-k // 128)
    assert a.dtype == b.dtype == torch.float8_e4m3fn
    assert a.stride() == (k, 1) and b.stride() == (1, k), "A row-major, B column-major"
    assert sa.dtype == sb.dtype == torch.float32
    assert sa.shape == (mp, kb) and sa.stride() == (1, mp), "scale_a outer-dim-major"
    assert sb.shape == (kb, -(-n // 128)) and sb.stride() == (1, kb), "scale_b [K/128, N/128]"
    af = a.float() * sa.repeat_interleave(128, 1)[:, :k]
    bf = b.float() * sb.repeat_interleave(128, 0)[:k].repeat_interleave(128, 1)[:, :n]
    return (af @ bf).to(torch.bfloat16)


class _Spy:
    """Counts calls and forwards them."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@interp
@pytest.mark.parametrize(
    "m,k,dtype", [(5, 256, torch.float32), (37, 384, torch.float16), (20, 200, torch.bfloat16)]
)
def test_fp8_act_quant_e4m3_interp(m, k, dtype):
    """The act-quant kernel of the scaled-matmul path is act_quant_split bit for bit: e4m3 values,
    fp32 scales stored column-major, zero rows past M; x rows may be strided."""
    wide = torch.randn(m, k + 64, generator=_gen(m)).to(dtype) * 3
    wide[1, :128] *= 1e-6  # a block under the amax floor
    x = wide[:, :k]
    m_pad = -(-m // 16) * 16
    q = torch.full((m_pad, k), 99.0).to(torch.float8_e4m3fn)
    s_t = poison((-(-k // 128), m_pad), torch.float32)
    f8._act_quant_e4m3(x, q, s_t)
    rq, rs = fmt.act_quant_split(x)
    assert torch.equal(q[:m].float(), rq)
    assert torch.equal(s_t.t()[:m], rs)
    assert (q[m:].float() == 0).all() and torch.isfinite(s_t).all()


def test_fp8_scaled_mm_weight_scale_cache():
    """E8M0 weight scales are converted to fp32 once per tensor (an in-place change is seen, the
    entry goes with the tensor); fp32 scales are used as they are."""
    s = torch.randint(118, 124, (3, 8), dtype=torch.uint8)
    f = f8._weight_scale_f32(s)
    assert f.dtype == torch.float32 and torch.equal(f, fmt.e8m0_to_float(s))
    assert f8._weight_scale_f32(s) is f  # cached
    s.add_(1)
    f2 = f8._weight_scale_f32(s)
    assert torch.equal(f2, fmt.e8m0_to_float(s)) and not torch.equal(f2, f)
    n_before = len(f8._W_SCALE_F32)
    del s, f, f2
    assert len(f8._W_SCALE_F32) == n_before - 1
    sf = fmt.e8m0_to_float(torch.randint(118, 124, (3, 8), dtype=torch.uint8))
    assert f8._weight_scale_f32(sf) is sf
    # Made under inference_mode (an engine's prefill, and the probe run in it): no version
    # counter, so converted each time and not kept (the first engine run found the probe failing
    # on `_version` and the fast path off).
    with torch.inference_mode():
        si = torch.randint(118, 124, (3, 8), dtype=torch.uint8)
        n_before = len(f8._W_SCALE_F32)
        assert torch.equal(f8._weight_scale_f32(si), fmt.e8m0_to_float(si))
        assert len(f8._W_SCALE_F32) == n_before


@interp
def test_fp8_scaled_mm_operand_layouts_pass_torch_checks():
    """The operands built for the scaled matmul pass torch's checks for the 1x128 x 128x128 recipe
    (meta tensors run torch's CUDA shape/stride validation on CPU) with every API this torch has;
    a row-major activation scale is refused where torch checks strides."""
    cands = f8._scaled_mm_candidates()
    if not cands:
        pytest.skip(f"torch {torch.__version__} has no FP8 scaled matmul")
    m, n, k = 200, 384, 1024
    w, s = make_fp8(n, k, seed=1)
    x = torch.randn(m, k, generator=_gen(2))
    ops_ = f8._scaled_mm_operands(x, w, s)
    a, b, sa_, sb = ops_
    assert a.shape == (208, k) and a.stride() == (k, 1) and b.stride() == (1, k)
    assert sa_.shape == (208, k // 128) and sa_.stride() == (1, 208)
    assert sb.shape == (k // 128, n // 128) and sb.stride() == (1, k // 128)

    def meta(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    for name, call in cands:
        y = call(*(meta(t) for t in ops_))
        assert y.shape == (208, n) and y.dtype == torch.bfloat16, name
    names = [nm for nm, _ in cands]
    if "torch.nn.functional.scaled_mm" in names:
        v2 = dict(cands)["torch.nn.functional.scaled_mm"]
        row_major = torch.empty(208, k // 128, device="meta")
        with pytest.raises(RuntimeError):
            v2(meta(a), meta(b), row_major, meta(sb))


@interp
@pytest.mark.parametrize(
    "m,n,k,scale_fp32", [(128, 256, 512, False), (200, 384, 1024, True), (130, 128, 2048, False)]
)
def test_fp8_linear_scaled_mm_path_emulated_interp(monkeypatch, m, n, k, scale_fp32):
    """fp8_linear through the scaled-matmul path (the act-quant kernel in the interpreter, the
    plain-torch twin for cuBLAS) equals fp8_linear_ref; M padded to 16 rows and cut back; out=
    (a column slice of a wider buffer) gets exactly its columns."""
    fake = _Spy(_emulated_scaled_mm)
    monkeypatch.setattr(f8, "_compiled_cuda", lambda _dev: True)
    monkeypatch.setattr(f8, "_scaled_mm_backend", lambda _dev: fake)
    w, s = make_fp8(n, k, seed=m, scale_fp32=scale_fp32)
    x = torch.randn(m, k, generator=_gen(k)).to(torch.bfloat16)
    ref = f8.fp8_linear_ref(x, w, s, act_quant=True)
    y = f8.fp8_linear(x, w, s, act_quant=True)
    assert fake.calls == 1 and y.shape == (m, n) and y.dtype == torch.bfloat16
    assert_close("scaled_mm path", y, ref, torch.bfloat16)
    z = poison((m, n + 64), torch.bfloat16)
    f8.fp8_linear(x, w, s, out=z[:, :n], act_quant=True)
    assert fake.calls == 2
    assert torch.equal(z[:, :n], y) and torch.isnan(z[:, n:]).all()


def test_fp8_scaled_mm_dispatch_rules(monkeypatch):
    """Which products go to the scaled matmul: act_quant, M >= SCALED_MM_MIN_M, bf16 out,
    N % 128 == 0, K % 512 == 0, config scaled_mm not False, a compiled CUDA device with a working
    API; everything else (decode GEMVs included) keeps the Triton kernels."""
    assert f8.SCALED_MM_MIN_M > f8.GEMV_MAX_M  # decode steps (graph-captured) never take it
    fake = object()
    monkeypatch.setattr(f8, "_compiled_cuda", lambda _dev: True)
    monkeypatch.setattr(f8, "_scaled_mm_backend", lambda _dev: fake)
    base = dict(m=f8.SCALED_MM_MIN_M, n=256, k=512, dt=torch.bfloat16, aq=True, cfg={})

    def call(**kw):
        a = {**base, **kw}
        x = torch.empty(a["m"], a["k"])
        return f8._scaled_mm_call(x, a["n"], a["k"], a["dt"], a["aq"], a["cfg"])

    assert call() is fake
    assert call(m=4096, n=40960, k=1024) is fake
    assert call(m=f8.SCALED_MM_MIN_M - 1) is None
    assert call(aq=False) is None
    assert call(dt=torch.float16) is None and call(dt=torch.float32) is None
    assert call(n=200) is None and call(n=1000) is None
    assert call(k=384) is None and call(k=640) is None  # K/128 not a multiple of 4
    assert call(cfg={"scaled_mm": False}) is None
    assert call(cfg={"scaled_mm": True}) is fake
    monkeypatch.setattr(f8, "_scaled_mm_backend", lambda _dev: None)  # no working API
    assert call() is None
    monkeypatch.undo()
    assert call() is None  # a CPU tensor: never
    assert f8.scaled_mm_status("cpu").startswith("off")


def test_fp8_scaled_mm_backend_decided_once(monkeypatch, caplog):
    """The API is probed once per device and process: a device without one logs one warning and
    stays on Triton; a probe that raises counts as none; nothing is decided while a CUDA graph is
    being captured (the probe synchronises)."""
    probes = []

    def probe(result):
        def run(dev):
            probes.append(dev)
            if isinstance(result, Exception):
                raise result
            return result

        return run

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(f8, "_compiled_cuda", lambda _dev: True)
    monkeypatch.setattr(f8, "_capturing", lambda: False)
    monkeypatch.setattr(f8, "_BACKENDS", {})
    monkeypatch.setattr(f8, "_probe", probe((None, "no API here")))
    with caplog.at_level("WARNING", logger=f8.__name__):
        assert f8._scaled_mm_backend(dev) is None
        assert f8._scaled_mm_backend(dev) is None
    assert len(probes) == 1
    warned = [r for r in caplog.records if "no API here" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0].getMessage()
    assert f8.scaled_mm_status("cuda:0") == "off: no API here"

    monkeypatch.setattr(f8, "_BACKENDS", {})
    monkeypatch.setattr(f8, "_probe", probe(RuntimeError("CUDA out of memory")))
    assert f8._scaled_mm_backend(dev) is None
    assert f8.scaled_mm_status("cuda:0").startswith("off: probe failed: RuntimeError")

    fake = object()
    probes.clear()
    monkeypatch.setattr(f8, "_BACKENDS", {})
    monkeypatch.setattr(f8, "_probe", probe((fake, "fake api")))
    monkeypatch.setattr(f8, "_capturing", lambda: True)
    assert f8._scaled_mm_backend(dev) is None and not probes and not f8._BACKENDS
    monkeypatch.setattr(f8, "_capturing", lambda: False)
    assert f8._scaled_mm_backend(dev) is fake and f8._scaled_mm_backend(dev) is fake
    assert len(probes) == 1 and f8.scaled_mm_status("cuda:0") == "fake api"


def test_fp8_scaled_mm_feature_detection(monkeypatch):
    """Candidates follow what this torch has (the functional API first, then torch._scaled_mm);
    with none, or off sm_90, the probe says why without touching a device."""
    import torch.nn.functional as F

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (9, 0))
    names = [n for n, _ in f8._scaled_mm_candidates()]
    assert ("torch._scaled_mm" in names) == hasattr(torch, "_scaled_mm")
    if "torch.nn.functional.scaled_mm" in names:
        assert names[0] == "torch.nn.functional.scaled_mm"  # the newer API first
    monkeypatch.delattr(F, "scaled_mm", raising=False)
    assert [n for n, _ in f8._scaled_mm_candidates()] == [
        n for n in names if n.startswith("torch._")
    ]
    monkeypatch.delattr(torch, "_scaled_mm", raising=False)
    assert f8._scaled_mm_candidates() == []
    call, why = f8._probe(torch.device("cuda", 0))
    assert call is None and "no FP8 scaled matmul" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (8, 9))
    call, why = f8._probe(torch.device("cuda", 0))
    assert call is None and "sm_89" in why


@interp
def test_fp8_scaled_mm_probe_rejects_broken_apis_interp():
    """The probe passes over an API that raises and one that misreads the activation-scale
    layout (row-major instead of column-major), and takes the first that agrees with
    fp8_linear_ref; with no good one it reports each failure."""

    def raises(a, b, sa_, sb):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED\nwhen calling cublasLtMatmul")

    def misread(a, b, sa_, sb):
        mp, kb = sa_.shape
        wrong = sa_.t().reshape(mp, kb).t().contiguous().t()  # storage read row-major
        return _emulated_scaled_mm(a, b, wrong, sb)

    cpu = torch.device("cpu")
    good = _Spy(_emulated_scaled_mm)
    call, name = f8._pick_candidate([("raises", raises), ("misread", misread), ("ok", good)], cpu)
    assert call is good and name == "ok" and good.calls == 1
    call, why = f8._pick_candidate([("raises", raises), ("misread", misread)], cpu)
    assert call is None and "raises: RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED when" in why
    assert "misread: differs from fp8_linear_ref" in why and "\n" not in why
    # An engine decides at its first prefill, under inference_mode: the probe works there too.
    with torch.inference_mode():
        call, name = f8._pick_candidate([("ok", good)], cpu)
    assert call is good and name == "ok"


# --- GPU: the real scaled matmul ------------------------------------------------------------------

# V4-Flash's dense FP8 products as the engine launches them (model.fp8_shapes; wo_a's groups run
# without act_quant and stay on Triton). Scale formats alternate: the engine loads fp32 scales,
# direct users may pass E8M0 bytes.
FP8_PREFILL_SHAPES = [
    ("wq_a+wkv", 1536, 4096, True),
    ("wq_b+indexer wq_b", 40960, 1024, False),
    ("wq_b", 32768, 1024, True),
    ("wo_b", 4096, 8192, False),
    ("shared w1+w3 / mtp proj", 4096, 4096, True),
    ("shared w2", 4096, 2048, False),
    ("wq_a", 1024, 4096, False),
    ("wkv", 512, 4096, True),
]
_SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)


def _scaled_mm_on():
    status = f8.scaled_mm_status(DEV)
    if status.startswith("off"):
        pytest.skip(f"scaled matmul not active here ({status}); see test_fp8_scaled_mm_active_gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not _SM90, reason="needs an sm_90 CUDA device")
def test_fp8_scaled_mm_active_gpu():
    """On sm_90 the probe finds a working scaled-matmul API (else prefill GEMMs silently run the
    slower Triton kernel: the status says why)."""
    status = f8.scaled_mm_status(DEV)
    assert not status.startswith("off"), status


@pytest.mark.parametrize("m", [128, 200, 512, 4096])
@pytest.mark.parametrize(
    "name,n,k,scale_fp32", FP8_PREFILL_SHAPES, ids=[s[0] for s in FP8_PREFILL_SHAPES]
)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp8_linear_scaled_mm_gpu(monkeypatch, m, name, n, k, scale_fp32):
    """Prefill products through torch's scaled matmul against fp8_linear_ref and the Triton GEMM
    (act_quant, bf16), at V4-Flash shapes."""
    _scaled_mm_on()
    spy = _Spy(f8._scaled_mm_linear)
    monkeypatch.setattr(f8, "_scaled_mm_linear", spy)
    dtype = torch.bfloat16
    w, s = make_fp8(n, k, seed=n + k, scale_fp32=scale_fp32)
    x = torch.randn(m, k, generator=_gen(m)).to(dtype).to(DEV)
    y = f8.fp8_linear(x, w, s, act_quant=True)
    assert spy.calls == 1, "the scaled matmul did not run"
    y_tr = f8.fp8_linear(x, w, s, act_quant=True, config={"scaled_mm": False})
    assert spy.calls == 1
    ref = f8.fp8_linear_ref(x, w, s, act_quant=True)
    assert_close(f"scaled_mm {name} M={m}", y, ref, dtype, loose=2.0)
    assert_close(f"scaled_mm vs triton {name} M={m}", y, y_tr, dtype, loose=2.0)


@pytest.mark.parametrize(
    "m,n,k,act_quant,dtype,cfg",
    [(512, 1000, 1536, True, torch.bfloat16, None),  # N not a multiple of 128
     (512, 4096, 1152, True, torch.bfloat16, None),  # K/128 = 9, not a multiple of 4
     (512, 4096, 4096, False, torch.bfloat16, None),  # bf16 x: no exact e4m3 form
     (512, 4096, 4096, True, torch.float32, None),  # fp32 output
     (100, 4096, 4096, True, torch.bfloat16, None),  # below SCALED_MM_MIN_M
     (512, 4096, 4096, True, torch.bfloat16, {"scaled_mm": False})],
)  # fmt: skip
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp8_linear_scaled_mm_fallbacks_gpu(monkeypatch, m, n, k, act_quant, dtype, cfg):
    """Products the scaled matmul does not take run the Triton GEMM, and match the reference."""
    spy = _Spy(f8._scaled_mm_linear)
    monkeypatch.setattr(f8, "_scaled_mm_linear", spy)
    w, s = make_fp8(n, k, seed=n + k)
    x = torch.randn(m, k, generator=_gen(m)).to(dtype).to(DEV)
    out = poison((m, n), dtype)
    f8.fp8_linear(x, w, s, out=out, act_quant=act_quant, config=cfg)
    assert spy.calls == 0
    ref = f8.fp8_linear_ref(x, w, s, act_quant=act_quant)
    assert_close("fp8_linear fallback", out, ref, dtype, loose=2.0 if act_quant else 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp8_linear_scaled_mm_out_and_strided_x_gpu():
    """Strided x rows and an out= that is a column slice of a wider buffer (only its columns
    written), through the scaled matmul; same result as without out=."""
    _scaled_mm_on()
    dtype, m, n, k = torch.bfloat16, 300, 1536, 4096
    w, s = make_fp8(n, k, seed=7)
    wide = torch.randn(m, k + 128, generator=_gen(3)).to(dtype).to(DEV)
    x = wide[:, 64 : 64 + k]
    z = poison((m, n + 64), dtype)
    f8.fp8_linear(x, w, s, out=z[:, :n], act_quant=True)
    y = f8.fp8_linear(x, w, s, act_quant=True)
    torch.cuda.synchronize()
    assert torch.equal(z[:, :n], y) and torch.isnan(z[:, n:]).all()
    assert_close("scaled_mm strided", y, f8.fp8_linear_ref(x, w, s, act_quant=True), dtype, 2.0)


@pytest.mark.parametrize("decided", [True, False], ids=["decided", "undecided"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fp8_linear_scaled_mm_graph_capture_gpu(monkeypatch, decided):
    """A prefill product captures into a CUDA graph and replays right. Decided: the scaled matmul
    is captured, with an E8M0 scale first seen inside the capture (converted there, not cached:
    its values only exist on replay). Undecided (no probe yet): the capture takes the Triton GEMM
    and decides nothing (the probe synchronises)."""
    if decided:
        _scaled_mm_on()
    dtype, m, n, k = torch.bfloat16, 512, 4096, 4096
    w, s_warm = make_fp8(n, k, seed=11)
    s = s_warm.clone()  # a scale tensor the capture sees first
    x = torch.randn(m, k, generator=_gen(1)).to(dtype).to(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f8.fp8_linear(x, w, s_warm, act_quant=True, config={"scaled_mm": decided})  # compile
    torch.cuda.current_stream().wait_stream(side)
    if not decided:
        monkeypatch.setattr(f8, "_BACKENDS", {})
    spy = _Spy(f8._scaled_mm_linear)
    monkeypatch.setattr(f8, "_scaled_mm_linear", spy)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = f8.fp8_linear(x, w, s, act_quant=True)
    assert spy.calls == (1 if decided else 0)
    if decided:
        assert f8._W_SCALE_F32.get(s) is None
    else:
        assert not f8._BACKENDS
    for seed in range(2):
        x.copy_(torch.randn(m, k, generator=_gen(seed + 5)).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        ref = f8.fp8_linear_ref(x, w, s, act_quant=True)
        assert_close(f"graph scaled_mm replay {seed}", y, ref, dtype, loose=2.0)


# --- the CPU lane's hand-off (kernels/handoff.py) -------------------------------------------
@interp
def test_await_copy_interp():
    """The kernel copies once the flag holds the expected value, and gives NaN instead of
    waiting forever when it never does; the twin agrees."""
    flag = torch.zeros(1, dtype=torch.int32)
    src = torch.randn(1, 3000)
    for fn in (hf.await_copy, hf.await_copy_ref):
        dst = torch.zeros(1, 3000)
        flag[0] = 7
        fn(flag, 7, src, dst)
        assert torch.equal(dst, src)
        fn(flag, 8, src, dst, max_polls=5)
        assert torch.isnan(dst).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_await_copy_waits_for_the_host_gpu():
    """Queued on the stream, the kernel holds it until the host sets the flag (the host is not
    held meanwhile), then reads the host's row in place."""
    from homeseek.experts import device_view

    flag_h = torch.zeros(1, dtype=torch.int32).pin_memory()
    src_h = torch.zeros(1, 4096).pin_memory()
    dst = torch.zeros(1, 4096, device="cuda")
    ops.await_copy(device_view(flag_h), 5, device_view(src_h), dst)
    done = torch.cuda.Event()
    done.record()
    time.sleep(0.05)
    assert not done.query()  # still waiting for the flag
    src_h.copy_(torch.arange(4096.0).view(1, -1))
    flag_h[0] = 5
    done.synchronize()
    assert torch.equal(dst.cpu(), src_h)
