"""Number formats shared by the kernels: plain-torch definitions plus their Triton helpers.

Formats (v4-architecture.md §2.3, §2.5):

- E8M0 scale: one byte e, value 2^(e-127); 0xFF is NaN.
- FP8 e4m3fn weight, 128x128 block scale: W[i, j] = Wq[i, j] * S[i // 128, j // 128].
- FP4 E2M1, two per byte, low nibble = even element; per-32-input E8M0 scale [out, in // 32].
- Activation quantisation (QAT emulation), per row in blocks of 128 channels:
  amax = max(|x|, 1e-4); s = 2^ceil(log2(amax / 448)); x_q = e4m3(clamp(x / s, -448, 448)).

The torch functions here are the numerical definitions; the Triton helpers at the bottom reproduce
them bit for bit (tests check it) and are imported by the kernel modules.

This module also owns the optional Triton import: on a machine without triton, `HAS_TRITON` is
False and `triton.jit` is a no-op stand-in, so the kernel modules import and their `_ref` twins
work; only the launchers refuse to run.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the _ref twins still work.
    HAS_TRITON = False

    class _TritonStub:
        """Enough of `triton` / `triton.language` for the kernel modules to be defined."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (int(n) - 1).bit_length())

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _TritonStub()  # type: ignore[assignment]

try:  # grid dependency control for programmatic dependent launch (sm_90+; GPU only)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:
    HAS_GDC = False
    # no triton, or one without GDC: kernels never call them (PDL off)

    def gdc_wait() -> None:
        raise RuntimeError("programmatic dependent launch needs triton >= 3.3")

    gdc_launch_dependents = gdc_wait


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled kernels (not the interpreter) on sm_90 or newer."""
    if not HAS_GDC or interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


__all__ = [
    "E4M3_MAX",
    "FP4_E2M1_VALUES",
    "FP8_BLOCK",
    "FP4_GROUP",
    "ACT_BLOCK",
    "HAS_TRITON",
    "act_quant_ref",
    "act_quant_split",
    "dequant_fp4",
    "dequant_fp8",
    "e8m0_to_float",
    "fp4_unpack",
    "require_triton",
    "scale_to_float",
    "triton",
    "tl",
]

E4M3_MAX = 448.0
FP8_BLOCK = 128  # FP8 weight scale block (both dims)
FP4_GROUP = 32  # FP4 inputs per E8M0 scale
ACT_BLOCK = 128  # activation quantisation block along the input dim
ACT_AMAX_FLOOR = 1e-4

# E2M1 code -> value; code bit 3 is the sign, so 8 is -0.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0) + (
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)


def require_triton(what: str) -> None:
    """Raise a clear error when a launcher is called on a machine without triton."""
    if not HAS_TRITON:
        raise RuntimeError(
            f"{what}: triton is not installed; install the 'gpu' extra (pip install triton) "
            "or use the plain-torch twin through homeseek.kernels.ops"
        )


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    if not HAS_TRITON:
        return False
    try:
        from triton import knobs  # triton >= 3.4
    except ImportError:
        import os

        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def check_device(name: str, t: torch.Tensor) -> None:
    """Launchers need CUDA tensors, except under the interpreter, which needs CPU ones."""
    if interpreting():
        if t.device.type != "cpu":
            raise ValueError(f"{name}: TRITON_INTERPRET=1 needs CPU tensors, got {t.device}")
    elif t.device.type != "cuda":
        raise ValueError(
            f"{name}: the Triton launcher needs a CUDA tensor, got {t.device}; "
            "use homeseek.kernels.ops for device dispatch"
        )


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    shape: tuple[int | None, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    contiguous: bool = True,
    device: torch.device | None = None,
) -> None:
    """Validate one launcher argument; messages name the argument and what was expected."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(
            s is None or s == d for s, d in zip(shape, t.shape, strict=True)
        )
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous() once at load time)")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} like the other inputs")
    check_device(name, t)


# ------------------------------------------------------------------------------------------------
# Plain-torch definitions
# ------------------------------------------------------------------------------------------------


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8 or float8_e8m0fnu) -> fp32 2^(e-127); 255 -> NaN. Exact."""
    if e.dtype == torch.float8_e8m0fnu:
        e = e.view(torch.uint8)
    if e.dtype != torch.uint8:
        raise TypeError(f"e8m0 scale must be uint8 or float8_e8m0fnu, got {e.dtype}")
    ei = e.to(torch.int32)
    # Build the fp32 bit pattern directly: exponent field e for e >= 1, the subnormal 2^-127
    # (mantissa bit 22) for e == 0, NaN for 255.
    bits = torch.where(ei == 0, torch.full_like(ei, 1 << 22), ei << 23)
    bits = torch.where(ei == 255, torch.full_like(ei, 0x7FC00000), bits)
    return bits.view(torch.float32)


def scale_to_float(s: torch.Tensor) -> torch.Tensor:
    """A weight scale tensor that is either E8M0 bytes or already fp32 -> fp32."""
    if s.dtype in (torch.uint8, torch.float8_e8m0fnu):
        return e8m0_to_float(s)
    if s.dtype == torch.float32:
        return s
    raise TypeError(f"weight scale must be uint8/float8_e8m0fnu (E8M0) or float32, got {s.dtype}")


def fp4_unpack(q: torch.Tensor) -> torch.Tensor:
    """Packed E2M1 [..., n/2] (uint8/int8/float4_e2m1fn_x2) -> fp32 [..., n], no scale."""
    if q.dtype in (torch.int8, torch.float4_e2m1fn_x2):
        q = q.view(torch.uint8)
    if q.dtype != torch.uint8:
        raise TypeError(f"packed FP4 must be uint8/int8/float4_e2m1fn_x2, got {q.dtype}")
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=q.device)
    lo = table[(q & 0xF).long()]  # even elements
    hi = table[(q >> 4).long()]  # odd elements
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def dequant_fp4(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """FP4 weight [out, in/2] packed + E8M0 scale [out, in/32] -> fp32 [out, in]. Exact."""
    w = fp4_unpack(q)
    n_in = w.shape[-1]
    if s.shape[-1] * FP4_GROUP != n_in or s.shape[:-1] != w.shape[:-1]:
        raise ValueError(
            f"FP4 scale shape {list(s.shape)} does not match weight {list(w.shape)} "
            f"(expected [..., {n_in // FP4_GROUP}])"
        )
    sf = scale_to_float(s).repeat_interleave(FP4_GROUP, dim=-1)
    return w * sf


def dequant_fp8(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 weight [N, K] (float8_e4m3fn or its uint8 bytes) + scale [ceil(N/128),
    ceil(K/128)] (E8M0 bytes or fp32) -> fp32 [N, K]. Exact."""
    if w.dtype == torch.uint8:
        w = w.view(torch.float8_e4m3fn)
    if w.dtype != torch.float8_e4m3fn:
        raise TypeError(f"FP8 weight must be float8_e4m3fn or uint8, got {w.dtype}")
    n, k = w.shape
    want = (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK))
    if tuple(s.shape) != want:
        raise ValueError(f"FP8 scale shape {list(s.shape)} != {list(want)} for weight [{n}, {k}]")
    sf = scale_to_float(s)
    sf = sf.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
    return w.float() * sf


def _act_quant_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x [.., k] -> (q [.., nb, block] e4m3 grid values, s [.., nb, 1] scales, k), fp32.

    amax = max(|x|, 1e-4); s = 2^ceil(log2(amax/448)); q = e4m3(clamp(x/s, -448, 448)).
    ceil(log2(.)) is taken from the fp32 bits of amax/448 (exponent, +1 if any mantissa bit),
    which is exact, unlike a float log2. A ragged last block is quantised on its own.
    """
    xf = x.float()
    k = xf.shape[-1]
    pad = (-k) % block
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xb = xf.unflatten(-1, (-1, block))
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp_min(ACT_AMAX_FLOOR)
    s = _pow2_ceil(amax / E4M3_MAX)
    q = (xb / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return q, s, k


def act_quant_ref(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """Quantise-dequantise activations per row in blocks of `block` along the last dim (fp32
    out): x_q = e4m3(clamp(x/s, -448, 448)) * s, s a power of two per block (_act_quant_blocks)."""
    q, s, k = _act_quant_blocks(x, block)
    return (q * s).flatten(-2)[..., :k]


def act_quant_split(x: torch.Tensor, block: int = ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant_ref in two parts: (q [.., k] the e4m3 grid values, s [.., ceil(k/block)] the
    block scales), both fp32; act_quant_ref(x) is q times its block's scale, exactly."""
    q, s, k = _act_quant_blocks(x, block)
    return q.flatten(-2)[..., :k], s.squeeze(-1)


def _pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(v)) for positive normal fp32 v, from the bits (exact)."""
    bits = v.contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return ((exp + 127) << 23).view(torch.float32)


# ------------------------------------------------------------------------------------------------
# Triton helpers (bit-exact twins of the definitions above; all math in fp32)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fma8(acc, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    """acc + a0*b0 + ... + a7*b7 as a chain of 8 fused multiply-adds, in that order (the inner
    loop of the GEMV kernels: a lane's 8 weights times their 8 inputs)."""
    acc += a0 * b0
    acc += a1 * b1
    acc += a2 * b2
    acc += a3 * b3
    acc += a4 * b4
    acc += a5 * b5
    acc += a6 * b6
    acc += a7 * b7
    return acc


@triton.jit
def _pow2(e):
    """2^e for an int32 tensor e in [-126, 127], built from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_round(v):
    """Round fp32 |v| <= 448 to the nearest e4m3fn value (ties to even), returned as fp32.

    Hardware fp8 casts are not emulated faithfully by the interpreter, so round by hand: scale v
    so the e4m3 quantum becomes 1 (quantum 2^(e-3) for normals, 2^-9 below 2^-6), round to an
    integer with the 2^23 magic number (exact for |y| < 16), scale back. All steps are exact.
    """
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    y = a * _pow2(3 - e)
    r = (y + 8388608.0) - 8388608.0
    q = r * _pow2(e - 3)
    return tl.where(v < 0, -q, q)


@triton.jit
def _act_quant_scale(amax):
    """UE8M0 activation scale s = 2^ceil(log2(max(amax, 1e-4) / 448)) and its inverse."""
    v = tl.maximum(amax, 1e-4) / 448.0
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return _pow2(e), _pow2(-e)


@triton.jit
def _act_quant_apply(x, s, s_inv):
    """Quantise-dequantise x with its (broadcast) power-of-two scale s; exact as the torch twin."""
    y = tl.minimum(tl.maximum(x * s_inv, -448.0), 448.0)
    return _e4m3_round(y) * s


@triton.jit
def _fp4_lo_e4m3(b):
    """Low nibble of packed E2M1 bytes -> the e4m3 byte whose value is 2^-6 * E2M1 value.

    E2M1 (s e1 e0 m) placed as e4m3 (s 0 0 e1 e0 m 0 0): exponent field e, mantissa m<<2, so the
    e4m3 value is 2^(e-7)(1+m/2) = 2^-6 * 2^(e-1)(1+m/2) for e > 0 and the e4m3 subnormal
    m * 2^-7 = 2^-6 * m/2 for e == 0: exact for all 16 codes, including +-0.5 and -0.
    """
    return ((b & 0x8) << 4) | ((b & 0x7) << 2)


@triton.jit
def _fp4_hi_e4m3(b):
    """High nibble of packed E2M1 bytes -> e4m3 byte (value 2^-6 * E2M1 value), see above."""
    return (b & 0x80) | ((b >> 2) & 0x1C)


@triton.jit
def _fp4_pair_to_f32(b):
    """Packed E2M1 bytes (uint8 tensor) -> (even, odd) fp32 values times 2^-6 (scale later)."""
    lo = _fp4_lo_e4m3(b).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    hi = _fp4_hi_e4m3(b).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _e8m0_times_64(s):
    """E8M0 byte -> 2^(s-127) * 2^6 as fp32 (undoes the 2^-6 of the E2M1 decode). Valid for
    bytes 0..248, i.e. every scale a real checkpoint has (2^121 and beyond would overflow)."""
    return ((s.to(tl.int32) + 6) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_f32(s):
    """E8M0 byte -> 2^(s-127) as fp32 for bytes 1..254 (0 -> 2^-127 is flushed to 0 here;
    255 (NaN) -> +inf)."""
    return (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _and_flag(mask, flag):
    """mask & flag for a tensor mask and a scalar bool flag. (The interpreter mishandles a
    tensor & 0-d bool mask, so broadcast the flag through an int tensor first.)"""
    return mask & ((mask.to(tl.int32) * 0 + flag.to(tl.int32)) > 0)


# Packed-word (SWAR) E2M1 decode: one int32 word = 4 bytes = 8 E2M1 inputs, element 2j in the low
# nibble and 2j+1 in the high nibble of byte j. Two shift/mask passes turn all 8 nibbles into e4m3
# bytes (value 2^-6 * E2M1 value, as _fp4_lo_e4m3 / _fp4_hi_e4m3), ~1 integer op per input
# instead of ~3 when done byte by byte; hardware then converts e4m3 -> f16 -> f32.
# Masks: 0x80808080 (sign bits; -2139062144 as int32) and 0x1C1C1C1C (magnitude bits).


@triton.jit
def _fp4_word_e4m3(w):
    """int32 words of packed E2M1 -> (even, odd) words of 4 e4m3 bytes each."""
    lo = ((w << 4) & -2139062144) | ((w << 2) & 0x1C1C1C1C)
    hi = (w & -2139062144) | ((w >> 2) & 0x1C1C1C1C)
    return lo, hi


@triton.jit
def _e4m3_byte_f32(v, j: tl.constexpr):
    """Byte j of int32 words of e4m3 bytes -> fp32."""
    return ((v >> (8 * j)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _e4m3_q(y, HW_FP8: tl.constexpr):
    """fp32 y -> the nearest e4m3fn value (ties to even), as fp32. Act-quant inputs x / s are
    within +-448 by construction of s; the hardware conversion saturates anyway.

    HW_FP8: the hardware conversion (cvt.rn.satfinite.e4m3x2.f32 on sm_89+, 2 values per
    instruction, then back through f16); else the exact bit-level emulation _e4m3_round, which the
    interpreter needs (it does not emulate the hardware cast faithfully). Same result either way.
    """
    if HW_FP8:
        q = y.to(tl.float8e4nv).to(tl.float32)
    else:
        q = _e4m3_round(tl.minimum(tl.maximum(y, -448.0), 448.0))
    return q


# One int32 word of packed E2M1 -> 8 fp32 values (value * 2^-6), in PTX: the SWAR e4m3 decode of
# _fp4_word_e4m3, then cvt.rn.f16x2.e4m3x2 (two values per instruction, read straight from the
# 16-bit halves) and f16 -> f32 (exact). Same values as the portable path; the portable path lets
# Triton gather byte pairs from different registers (extra PRMT/shift per pair).
_FP4_WORD_ASM_TEXT = """{
.reg .b32 t, lo, hi, h0, h1, h2, h3;
.reg .b16 p0, p1, p2, p3, f0, f1, f2, f3, f4, f5, f6, f7;
shl.b32 t, $8, 4;
and.b32 lo, t, 0x80808080;
shl.b32 t, $8, 2;
and.b32 t, t, 0x1C1C1C1C;
or.b32 lo, lo, t;
and.b32 hi, $8, 0x80808080;
shr.b32 t, $8, 2;
and.b32 t, t, 0x1C1C1C1C;
or.b32 hi, hi, t;
mov.b32 {p0, p1}, lo;
mov.b32 {p2, p3}, hi;
cvt.rn.f16x2.e4m3x2 h0, p0;
cvt.rn.f16x2.e4m3x2 h1, p1;
cvt.rn.f16x2.e4m3x2 h2, p2;
cvt.rn.f16x2.e4m3x2 h3, p3;
mov.b32 {f0, f2}, h0;
mov.b32 {f4, f6}, h1;
mov.b32 {f1, f3}, h2;
mov.b32 {f5, f7}, h3;
cvt.f32.f16 $0, f0;
cvt.f32.f16 $1, f1;
cvt.f32.f16 $2, f2;
cvt.f32.f16 $3, f3;
cvt.f32.f16 $4, f4;
cvt.f32.f16 $5, f5;
cvt.f32.f16 $6, f6;
cvt.f32.f16 $7, f7;
}"""
_FP4_WORD_ASM = tl.constexpr(_FP4_WORD_ASM_TEXT) if HAS_TRITON else _FP4_WORD_ASM_TEXT


@triton.jit
def _fp4_word_f32(w, ASM: tl.constexpr):
    """int32 words of 8 packed E2M1 (element 2j low nibble, 2j+1 high nibble of byte j) -> their
    8 values as fp32 tensors f0..f7, each times 2^-6 (the E8M0 scale adds 6 back, _e8m0_times_64).
    ASM: PTX decode (GPU only); else portable Triton (interpreter)."""
    if ASM:
        f0, f1, f2, f3, f4, f5, f6, f7 = tl.inline_asm_elementwise(
            _FP4_WORD_ASM,
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [w],
            dtype=(tl.float32,) * 8,
            is_pure=True,
            pack=1,
        )
    else:
        lo, hi = _fp4_word_e4m3(w)
        f0 = _e4m3_byte_f32(lo, 0)
        f1 = _e4m3_byte_f32(hi, 0)
        f2 = _e4m3_byte_f32(lo, 1)
        f3 = _e4m3_byte_f32(hi, 1)
        f4 = _e4m3_byte_f32(lo, 2)
        f5 = _e4m3_byte_f32(hi, 2)
        f6 = _e4m3_byte_f32(lo, 3)
        f7 = _e4m3_byte_f32(hi, 3)
    return f0, f1, f2, f3, f4, f5, f6, f7
