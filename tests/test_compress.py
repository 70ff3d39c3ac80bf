"""The decode compressor kernel and the window-key kernel (kernels/compress.py: compress_decode,
new_key) against their torch twins, and the twins against the decode step's math (model.py's
definitions).

- Twin tests run everywhere (plain torch).
- `interp` tests run the Triton kernels on CPU through TRITON_INTERPRET=1 (set when no CUDA
  device is present): the compressor token by token from a fresh state across block boundaries,
  new_key at a few positions and ring rows; V4-Flash widths and the tiny preset's. Skipped
  without triton, and on a CUDA machine (the gpu tests cover them there).
- `gpu` tests run the compiled kernels in bf16 against the twins, plus CUDA-graph replays.

The compressor kernel writes a compressed entry only on the step that completes its block (the
twin every step), so cache rows are compared for complete entries only; every other cache row
must be left as it was (poisoned with NaN here). new_key writes its ring row only: the rest of
the keys buffer, columns either side of the key included, stays NaN.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Probe without importing: TRITON_INTERPRET must be set before triton is first imported.
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERP = HAS_TRITON and not HAS_CUDA
if INTERP:
    os.environ["TRITON_INTERPRET"] = "1"

from homeseek import model as M  # noqa: E402
from homeseek.kernels import compress as cp  # noqa: E402
from homeseek.kernels import ops  # noqa: E402
from homeseek.kernels._formats import tl, triton  # noqa: E402
from homeseek.quant import fp4_block_sim, hadamard_matrix  # noqa: E402

interp = pytest.mark.skipif(not INTERP, reason="needs triton on a machine without CUDA")
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
kernels_run = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
DEV = "cuda" if HAS_CUDA else "cpu"
EPS = 1e-6


@dataclass(frozen=True)
class Cfg:
    m: int
    d: int
    p: int  # RoPE pairs
    overlap: bool
    post: str
    nope: int


# V4-Flash's three compressors, and the tiny preset's widths (homeseek/config.py tiny_config:
# head 32 = 16 nope + 16 rope, index head 32, HCA ratio 16), plus a ragged FP8 block (nope 48).
FLASH = {
    "csa-main": Cfg(4, 512, 32, True, "kv", 448),
    "csa-index": Cfg(4, 128, 32, True, "index", 448),  # the keys' nope, as the engine passes it
    "hca": Cfg(16, 512, 32, False, "kv", 448),  # V4-Flash's ratio is 128: test_hca_128_* below
}
TINY = {
    "tiny-csa": Cfg(4, 32, 8, True, "kv", 16),
    "tiny-index": Cfg(4, 32, 8, True, "index", 16),
    "tiny-hca": Cfg(16, 32, 8, False, "kv", 16),
    "hca-d64": Cfg(16, 64, 8, False, "kv", 48),
}
SLOTS, SLOT, WINDOW = 3, 1, 3  # the session sits in slot 1 of 3; its entries after W rows


class Run:
    """A compressor's state for SLOTS sessions (fresh: reset() values), its weights and tables,
    and one token stream; `step(p, fn)` feeds position p through fn (twin, kernel or ops)."""

    def __init__(self, cfg: Cfg, steps: int, dtype: torch.dtype, cache_fill: float, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        c = 2 if cfg.overlap else 1
        cd, d = c * cfg.d, cfg.d
        self.cfg, self.dtype = cfg, dtype
        self.cap = steps // cfg.m + 2  # entry rows per slot
        rows = WINDOW + self.cap  # a slot's rows of the flat key buffer: window ring, entries
        self.state = {
            "buf_kv": torch.zeros(SLOTS, cfg.m, cd),
            "buf_gate": torch.full((SLOTS, cfg.m, cd), float("-inf")),
            "prev_kv": torch.zeros(SLOTS, cfg.m, d),
            "prev_gate": torch.full((SLOTS, cfg.m, d), float("-inf")),
            "cache": torch.full((SLOTS * rows, d), cache_fill, dtype=dtype),
        }
        self.state = {k: v.to(DEV) for k, v in self.state.items()}
        self.row0 = torch.tensor([SLOT * rows + WINDOW], device=DEV)
        self.slot = torch.tensor([SLOT], device=DEV)
        self.ape = (0.5 * torch.randn(cfg.m, cd, generator=g)).to(DEV)
        self.norm = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16).to(DEV)
        ang = torch.outer(torch.arange(steps + 1.0), torch.rand(cfg.p, generator=g))
        self.cos, self.sin = ang.cos().to(DEV), ang.sin().to(DEV)
        self.hmat = hadamard_matrix(d, torch.device(DEV)) if d & (d - 1) == 0 else None
        self.kv = (2 * torch.randn(steps, 1, cd, generator=g)).to(DEV)
        self.gate = torch.randn(steps, 1, cd, generator=g).to(DEV)

    def args(self, p: int, pos: torch.Tensor | None = None) -> tuple:
        s = self.state
        pos = torch.tensor([p], device=DEV) if pos is None else pos
        return (
            self.kv[p], self.gate[p], self.ape, pos, self.slot, s["buf_kv"], s["buf_gate"],
            s["prev_kv"], s["prev_gate"], s["cache"], self.row0, self.norm, self.cos, self.sin,
            self.hmat,
        )  # fmt: skip

    def kw(self, quant: bool) -> dict:
        c = self.cfg
        return dict(m=c.m, overlap=c.overlap, eps=EPS, post=c.post, nope=c.nope, quant_sim=quant,
                    dtype=self.dtype)  # fmt: skip

    def entries(self, n: int) -> torch.Tensor:
        r0 = int(self.row0)
        return self.state["cache"][r0 : r0 + n]


def assert_entries(name: str, got: torch.Tensor, ref: torch.Tensor, dtype, post, quant) -> None:
    """Complete entries [n, d]: equal to fp32 rounding (fp32), or within one ulp (bf16); with
    quant_sim a few values may sit one FP8 / E2M1 step apart (a rounding the fp32 difference
    before it flipped)."""
    g, r = got.float().cpu(), ref.float().cpu()
    assert torch.isfinite(g).all(), f"{name}: non-finite entries"
    if dtype == torch.float32:
        tol = 2e-6 * r.abs().amax(-1, keepdim=True) + 2e-6 * r.abs()
    else:  # one bf16 ulp of the larger of the two
        mag = torch.maximum(g.abs(), r.abs()).clamp_min(1e-30)
        tol = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    err = (g - r).abs()
    bad = err > tol
    if not quant:
        assert not bad.any(), f"{name}: {int(bad.sum())} entries off, worst {err.max():.3g}"
        return
    rmax = r.abs().amax(-1, keepdim=True)
    # one grid step: E2M1 <= 2 s, s <= amax / 3; e4m3 <= |v| / 8 (normals), tiny for subnormals
    step = 0.7 * rmax if post == "index" else 0.13 * torch.maximum(g.abs(), r.abs()) + 1e-4 * rmax
    assert int(bad.sum()) <= max(1, bad.numel() // 100), f"{name}: {int(bad.sum())} values off"
    assert bool((err <= step + tol).all()), f"{name}: a value more than one step off"


def run_sequence(cfg: Cfg, steps: int, quant: bool, dtype: torch.dtype, kernel) -> None:
    """Twin and `kernel` token by token over positions 0..steps-1 from fresh states; compare."""
    ref = Run(cfg, steps, dtype, 0.0)
    got = Run(cfg, steps, dtype, float("nan"))
    for p in range(steps):
        cp.compress_decode_ref(*ref.args(p), **ref.kw(quant))
        kernel(*got.args(p), **got.kw(quant))
    for k in ("buf_kv", "buf_gate", "prev_kv", "prev_gate"):
        assert torch.equal(got.state[k], ref.state[k]), f"{k} differs"
    n = steps // cfg.m  # complete entries
    assert n >= 2, "the sequence must complete two blocks"
    assert_entries("entries", got.entries(n), ref.entries(n), dtype, cfg.post, quant)
    # The kernel wrote no other cache row (incomplete entries, other slots, the window rows).
    rest = got.state["cache"].clone()
    r0 = int(got.row0)
    rest[r0 : r0 + n] = float("nan")
    assert rest.isnan().all(), "the kernel wrote cache rows besides the complete entries"


# ------------------------------------------------------------------------------------------------
# The twin (plain torch, everywhere)
# ------------------------------------------------------------------------------------------------


def decode_py_step(
    kv, gate, ape, pos, slot, buf_kv, buf_gate, prev_kv, prev_gate, cache, row0, norm_w, cos_t,
    sin_t, hmat, *, m, overlap, eps, post, nope, quant_sim, dtype,
):  # fmt: skip
    """decode.py's compress_step after its projections as it was before this kernel (the gate
    plus ape, the buffer row writes, the pooled entry, the state writes), restated with
    model.py's definitions."""
    off = pos % m
    row = slot * m + off
    buf_kv.view(-1, buf_kv.shape[-1]).index_copy_(0, row, kv)
    buf_gate.view(-1, buf_gate.shape[-1]).index_copy_(0, row, gate + ape[off])
    bk, bg = buf_kv.index_select(0, slot)[0], buf_gate.index_select(0, slot)[0]
    pk, pg = prev_kv.index_select(0, slot)[0], prev_gate.index_select(0, slot)[0]
    if overlap:
        d = pk.shape[-1]
        slot_kv, slot_gate = torch.cat((pk, bk[:, d:])), torch.cat((pg, bg[:, d:]))
        complete = (pos % m == m - 1).view(1, 1)
        pk = torch.where(complete, bk[:, :d], pk)
        pg = torch.where(complete, bg[:, :d], pg)
    else:
        slot_kv, slot_gate = bk, bg
    pooled = (slot_kv * torch.softmax(slot_gate, dim=0)).sum(0, keepdim=True)
    first = (pos // m) * m
    e = M.apply_rope(M.rms_norm(pooled.to(dtype), norm_w, eps), cos_t[first], sin_t[first])
    e = M.kv_round(e, nope, quant_sim) if post == "kv" else M.index_round(e, quant_sim, hmat)
    if overlap:
        prev_kv.index_copy_(0, slot, pk[None])
        prev_gate.index_copy_(0, slot, pg[None])
    cache.index_copy_(0, row0 + pos // m, e.to(cache.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("name", ["csa-main", "csa-index", "tiny-hca", "hca-d64"])
def test_twin_is_the_decode_step(name, quant, dtype):
    """Bit for bit the decode step's math, complete and incomplete blocks alike."""
    cfg = (FLASH | TINY)[name]
    steps = 3 * cfg.m - 1
    a, b = Run(cfg, steps, dtype, 0.0), Run(cfg, steps, dtype, 0.0)
    for p in range(steps):
        cp.compress_decode_ref(*a.args(p), **a.kw(quant))
        decode_py_step(*b.args(p), **b.kw(quant))
        for k in a.state:
            assert torch.equal(a.state[k], b.state[k]), f"{k} differs at position {p}"


def test_e2m1_block_ref_is_quant_fp4_block_sim():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 96, generator=g) * torch.exp2(torch.randint(-20, 20, (7, 1), generator=g))
    # the E2M1 grid's ties and neighbours, a zero block, a tiny block, -0.0, a ragged tail
    grid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 1.5, 3.0, 4.0])
    edges = torch.cat((grid, -grid, grid.nextafter(grid * 2), grid.nextafter(grid * 0)))
    x[0, : edges.numel()] = edges[:96]
    x[1, :32] = 0.0
    x[2, :32] = 1e-39
    x[3, 5] = -0.0
    for t in (x, x[:, :80], x.to(torch.bfloat16)):
        bits = torch.int16 if t.dtype == torch.bfloat16 else torch.int32  # -0.0 included
        assert torch.equal(cp.e2m1_block_ref(t).view(bits), fp4_block_sim(t).view(bits))


def test_ops_dispatch_cpu_runs_the_twin():
    if DEV != "cpu":
        pytest.skip("CPU dispatch")
    cfg = TINY["tiny-csa"]
    a, b = Run(cfg, 8, torch.float32, 0.0), Run(cfg, 8, torch.float32, 0.0)
    for p in range(8):
        ops.compress_decode(*a.args(p), **a.kw(True))
        cp.compress_decode_ref(*b.args(p), **b.kw(True))
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k


# ------------------------------------------------------------------------------------------------
# The kernel in the interpreter
# ------------------------------------------------------------------------------------------------


@interp
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("name", list(FLASH) + list(TINY))
def test_kernel_interp(name, quant):
    cfg = (FLASH | TINY)[name]
    run_sequence(cfg, 2 * cfg.m + cfg.m // 2 + 1, quant, torch.float32, cp.compress_decode)


@interp
@pytest.mark.parametrize("name", ["csa-main", "csa-index", "tiny-hca"])
def test_kernel_interp_bf16(name):
    """bf16 activations (the engine's): the kernel rounds to bf16 by the bits, so even the
    interpreter (whose cast truncates) stays within one ulp."""
    cfg = (FLASH | TINY)[name]
    run_sequence(cfg, 2 * cfg.m + 1, True, torch.bfloat16, cp.compress_decode)


@interp
@pytest.mark.parametrize("quant", [False, True])
def test_hca_128_interp(quant):
    """V4-Flash's HCA ratio (128 rows: 8 tiles of 16 per pass) from a state that holds earlier
    rows, through two block completions (positions 127 and 255) and the steps around them."""
    cfg = Cfg(128, 512, 32, False, "kv", 448)
    ref = Run(cfg, 260, torch.float32, 0.0, seed=5)
    got = Run(cfg, 260, torch.float32, float("nan"), seed=5)
    g = torch.Generator().manual_seed(6)
    for k, scale in (("buf_kv", 2.0), ("buf_gate", 1.0)):
        v = scale * torch.randn(ref.state[k].shape, generator=g)
        ref.state[k].copy_(v)
        got.state[k].copy_(v)
    for p in (125, 126, 127, 128, 129, 254, 255, 256):
        cp.compress_decode_ref(*ref.args(p), **ref.kw(quant))
        cp.compress_decode(*got.args(p), **got.kw(quant))
    for k in ("buf_kv", "buf_gate", "prev_kv", "prev_gate"):
        assert torch.equal(got.state[k], ref.state[k]), k
    assert_entries("entries", got.entries(2), ref.entries(2), torch.float32, "kv", quant)


@triton.jit
def _roundings_kernel(x_ptr, bf_ptr, e2_ptr, N, BLOCK: tl.constexpr):
    """Per program one block of 32: x rounded to bf16 (the kernel's bit rounding), and the
    E2M1 sim of the block (its scale and grid rounding)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    x = tl.load(x_ptr + i, mask=ok, other=0.0)
    tl.store(bf_ptr + i, cp._round_to(x, 1), mask=ok)
    s, s_inv = cp._ue8m0_scale(tl.max(tl.abs(x), axis=0), cp._E2M1_FLOOR, cp._E2M1_MAX)
    tl.store(e2_ptr + i, cp._e2m1_qdq(x, s, s_inv), mask=ok)


@kernels_run
def test_kernel_roundings_bitwise():
    """The kernel's bf16 and E2M1 roundings on ties and edges, bit for bit torch's."""
    g = torch.Generator().manual_seed(9)
    # halfway between two bf16 values near 1, with even and odd kept LSBs
    bf_ties = (((0x3F80 + torch.arange(64, dtype=torch.int32)) << 16) | 0x8000).view(torch.float32)
    grid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 1.5, 3.0] * 2)
    grid = torch.cat((grid[:12], -grid[12:], torch.tensor([-0.01, 1e-3, 0.0, 6.0] * 2)))
    x = torch.cat((bf_ties, -bf_ties, grid, 3 * torch.randn(128, generator=g),
                   torch.full((32,), 1e-39), torch.full((32,), 448.0 * 2.0**-20)))  # fmt: skip
    x = x.to(DEV)
    bf, e2 = torch.empty_like(x), torch.empty_like(x)
    _roundings_kernel[(triton.cdiv(x.numel(), 32),)](x, bf, e2, x.numel(), BLOCK=32)
    want_bf = x.to(torch.bfloat16).float()
    assert torch.equal(bf.view(torch.int32), want_bf.view(torch.int32))
    want_e2 = cp.e2m1_block_ref(x)
    assert torch.equal(e2.view(torch.int32), want_e2.view(torch.int32))


@kernels_run
def test_launcher_checks_inputs():
    cfg = TINY["tiny-index"]
    r = Run(cfg, 8, torch.float32, 0.0)
    args, kw = list(r.args(0)), r.kw(True)

    def call(i=None, value=None, **over):
        a = list(args)
        if i is not None:
            a[i] = value
        cp.compress_decode(*a, **(kw | over))

    cd = 2 * cfg.d
    cases = [
        (0, torch.zeros(1, cd + 2, device=DEV), ValueError, "kv"),
        (1, torch.zeros(1, cd, device=DEV, dtype=torch.bfloat16), TypeError, "gate"),
        (2, torch.zeros(cfg.m + 1, cd, device=DEV), ValueError, "ape"),
        (3, torch.zeros(1, dtype=torch.int32, device=DEV), TypeError, "pos"),
        (4, torch.zeros(2, dtype=torch.int64, device=DEV), ValueError, "slot"),
        (6, torch.zeros(SLOTS, cfg.m, cd + 1, device=DEV), ValueError, "buf_gate"),
        (7, torch.zeros(SLOTS, cfg.m, cfg.d + 1, device=DEV), ValueError, "prev_kv"),
        (9, torch.zeros(4, cfg.d, 1, device=DEV), ValueError, "cache"),
        (10, torch.zeros(1, device=DEV), TypeError, "cache_row0"),
        (11, torch.ones(cfg.d + 1, device=DEV), ValueError, "norm_w"),
        (13, r.sin[:, :-1], ValueError, "sin_t"),
        (14, None, TypeError, "hmat"),
    ]
    for i, value, err, what in cases:
        with pytest.raises(err, match=what):
            call(i, value)
    with pytest.raises(ValueError, match="post"):
        call(post="keys")
    with pytest.raises(ValueError, match="nope"):
        call(nope=cfg.d + 1, post="kv")
    call(nope=cfg.d + 1)  # an indexer's entry takes no nope width: the keys' is ignored
    with pytest.raises(TypeError, match="dtype"):
        call(dtype=torch.int8)
    call(14, None, quant_sim=False)  # no Hadamard without quant_sim: hmat may be None


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernel
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("name", list(FLASH) + ["tiny-hca", "hca-d64"])
def test_kernel_gpu_bf16(name, quant):
    cfg = (FLASH | TINY)[name]
    run_sequence(cfg, 3 * cfg.m + 1, quant, torch.bfloat16, cp.compress_decode)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("quant", [False, True])
def test_hca_128_gpu(quant):
    run_sequence(Cfg(128, 512, 32, False, "kv", 448), 2 * 128 + 3, quant, torch.bfloat16,
                 cp.compress_decode)  # fmt: skip


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", list(FLASH))
def test_kernel_cuda_graph_replay(name):
    """One captured launch replayed at every position (pos and the inputs rewritten in place)
    does what eager twin steps do."""
    cfg = FLASH[name]
    steps = 2 * cfg.m + 1
    ref = Run(cfg, steps, torch.bfloat16, 0.0)
    got = Run(cfg, steps, torch.bfloat16, float("nan"))
    pos = torch.zeros(1, dtype=torch.int64, device=DEV)
    kv, gate = got.kv[0].clone(), got.gate[0].clone()
    a = list(got.args(0, pos))
    a[0], a[1] = kv, gate
    scratch = [t.clone() if isinstance(t, torch.Tensor) else t for t in a]
    cp.compress_decode(*scratch, **got.kw(True))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cp.compress_decode(*a, **got.kw(True))
    for p in range(steps):
        pos.fill_(p)
        kv.copy_(got.kv[p])
        gate.copy_(got.gate[p])
        graph.replay()
        cp.compress_decode_ref(*ref.args(p), **ref.kw(True))
    torch.cuda.synchronize()
    for k in ("buf_kv", "buf_gate", "prev_kv", "prev_gate"):
        assert torch.equal(got.state[k], ref.state[k]), k
    n = steps // cfg.m
    assert_entries("entries", got.entries(n), ref.entries(n), torch.bfloat16, cfg.post, True)


# ------------------------------------------------------------------------------------------------
# new_key: the token's own key into its window ring row
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyCfg:
    d: int  # head_dim
    nope: int
    p: int  # RoPE pairs


KEYS = {
    "flash": KeyCfg(512, 448, 32),
    "tiny": KeyCfg(32, 16, 8),  # tiny_config: head 32 = 16 nope + 16 rope
    "ragged": KeyCfg(64, 40, 12),  # a ragged FP8 block (40 of 64), P not a power of two
}
KEY_ROWS, KEY_MAX_POS, KEY_PAD = 6, 64, 4  # keys rows; table rows; keys' columns before Dh
# (pos, ring_row) pairs of one case: the first and last table rows and keys rows among them
KEY_STEPS = ((0, 0), (37, 3), (KEY_MAX_POS - 1, KEY_ROWS - 1))
DTYPES = {  # (activations and keys, kv_norm weight): the engine loads norm weights as fp32
    "f32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.float32),
    "bf16-wbf16": (torch.bfloat16, torch.bfloat16),
}


class KeyCase:
    """One layer's new_key inputs: kva a column slice of a wider row (the fused wq_a + wkv
    product's), channels at different scales (FP8 blocks with different exponents), tables."""

    def __init__(self, cfg: KeyCfg, dtype: torch.dtype, w_dtype: torch.dtype, seed: int = 0):
        self.cfg, self.dtype = cfg, dtype
        self.g = torch.Generator().manual_seed(seed)
        q = 24  # wq_a's columns in front of kva's in the fused row
        self.wide = torch.empty(2, q + cfg.d + 8, dtype=dtype, device=DEV)
        self.kva = self.wide[:1, q : q + cfg.d]  # row stride q + d + 8, data at an offset
        self.refill()
        self.w = (1 + 0.1 * torch.randn(cfg.d, generator=self.g)).to(w_dtype).to(DEV)
        ang = torch.outer(torch.arange(KEY_MAX_POS + 0.0), torch.rand(cfg.p, generator=self.g))
        self.cos, self.sin = ang.cos().to(DEV), ang.sin().to(DEV)

    def refill(self) -> None:
        """New kva values, in place (as the projection rewrites its output buffer)."""
        d = self.cfg.d
        x = 3 * torch.randn(self.wide.shape, generator=self.g)
        # groups of 16 channels at scales 2^-8..2^7: blocks whose small values meet e4m3's
        # subnormals, and norm sums dominated by a few groups
        scale = torch.exp2(torch.randint(-8, 8, (-(-d // 16),), generator=self.g).float())
        x[0, 24 : 24 + d] *= scale.repeat_interleave(16)[:d]
        self.wide.copy_(x.to(self.dtype))

    def keys(self, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(buffer [rows, Dh + 2·KEY_PAD], keys: its [rows, Dh] view at column KEY_PAD), so a
        row stride other than Dh and a write past the row's ends both show."""
        d = self.cfg.d
        buf = torch.full((KEY_ROWS, d + 2 * KEY_PAD), fill, dtype=self.dtype, device=DEV)
        return buf, buf[:, KEY_PAD : KEY_PAD + d]

    def kw(self, quant: bool) -> dict:
        return dict(eps=EPS, nope=self.cfg.nope, quant_sim=quant)


def assert_only_row(buf: torch.Tensor, row: int) -> None:
    """Every value of buf but row `row`'s key columns is still the NaN poison."""
    rest = buf.clone()
    rest[row, KEY_PAD:-KEY_PAD] = float("nan")
    assert rest.isnan().all(), f"values besides ring row {row} were written"
    assert torch.isfinite(buf[row, KEY_PAD:-KEY_PAD]).all(), f"ring row {row} not written"


def check_new_key(cfg: KeyCfg, dtypes: str, quant: bool, kernel) -> None:
    """`kernel` against the twin at KEY_STEPS, fresh poisoned keys each time."""
    dtype, w_dtype = DTYPES[dtypes]
    c = KeyCase(cfg, dtype, w_dtype)
    wide = c.wide.clone()
    for p, r in KEY_STEPS:
        pos, row = torch.tensor([p], device=DEV), torch.tensor([r], device=DEV)
        _, ref = c.keys(0.0)
        cp.new_key_ref(c.kva, c.w, c.cos, c.sin, pos, ref, row, **c.kw(quant))
        buf, got = c.keys(float("nan"))
        kernel(c.kva, c.w, c.cos, c.sin, pos, got, row, **c.kw(quant))
        assert_entries(f"pos {p}", got[r : r + 1], ref[r : r + 1], dtype, "kv", quant)
        assert_only_row(buf, r)
    assert torch.equal(c.wide, wide), "kva's buffer changed"


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("name", list(KEYS))
def test_new_key_twin_is_the_decode_step(name, dtypes, quant):
    """Bit for bit decode.py's new_key (its two lines with model.py's definitions)."""
    cfg = KEYS[name]
    c = KeyCase(cfg, *DTYPES[dtypes])
    for p, r in KEY_STEPS:
        pos, row = torch.tensor([p], device=DEV), torch.tensor([r], device=DEV)
        _, a = c.keys(0.0)
        _, b = c.keys(0.0)
        cp.new_key_ref(c.kva, c.w, c.cos, c.sin, pos, a, row, **c.kw(quant))
        kv = M.apply_rope(M.rms_norm(c.kva, c.w, EPS), c.cos[pos], c.sin[pos])
        b.index_copy_(0, row, M.kv_round(kv, cfg.nope, quant))
        bits = torch.int16 if c.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(a.view(bits), b.view(bits)), f"position {p}"


def test_ops_new_key_cpu_runs_the_twin():
    if DEV != "cpu":
        pytest.skip("CPU dispatch")
    c = KeyCase(KEYS["tiny"], torch.float32, torch.float32)
    pos, row = torch.tensor([5]), torch.tensor([2])
    _, a = c.keys(0.0)
    _, b = c.keys(0.0)
    ops.new_key(c.kva, c.w, c.cos, c.sin, pos, a, row, **c.kw(True))
    cp.new_key_ref(c.kva, c.w, c.cos, c.sin, pos, b, row, **c.kw(True))
    assert torch.equal(a, b)


@interp
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("name", list(KEYS))
def test_new_key_interp(name, dtypes, quant):
    """fp32 to fp32 rounding (the norm's sum order), bf16 within one ulp (by the bits, even
    in the interpreter); with quant_sim a value may sit one FP8 step away from the twin's."""
    check_new_key(KEYS[name], dtypes, quant, cp.new_key)


@kernels_run
def test_new_key_checks_inputs():
    cfg = KEYS["tiny"]
    d = cfg.d
    c = KeyCase(cfg, torch.float32, torch.float32)
    _, keys = c.keys(0.0)
    pos, row = torch.tensor([1], device=DEV), torch.tensor([0], device=DEV)
    args = [c.kva, c.w, c.cos, c.sin, pos, keys, row]

    def call(i=None, value=None, **over):
        a = list(args)
        if i is not None:
            a[i] = value
        cp.new_key(*a, **(c.kw(True) | over))

    z = dict(device=DEV)
    cases = [
        (0, c.wide[:1, : 2 * d : 2], ValueError, "kva"),  # column stride 2
        (0, c.wide[:, :d], ValueError, "kva"),  # two rows
        (0, torch.zeros(1, d, dtype=torch.int32, **z), TypeError, "kva"),
        (0, torch.zeros(1, d + 1, **z), ValueError, "kva"),  # odd width: no RoPE pairs
        (1, torch.ones(d + 1, **z), ValueError, "kv_w"),
        (1, torch.ones(d, dtype=torch.int64, **z), TypeError, "kv_w"),
        (2, c.cos[0], ValueError, "cos_t"),
        (2, torch.ones(4, d // 2 + 1, **z), ValueError, "cos_t"),  # more pairs than Dh holds
        (3, c.sin[:, :-1], ValueError, "sin_t"),
        (3, c.sin.double(), TypeError, "sin_t"),
        (4, torch.tensor([1], dtype=torch.int32, **z), TypeError, "pos"),
        (4, torch.tensor([1, 2], **z), ValueError, "pos"),
        (5, torch.zeros(KEY_ROWS, d + 2, **z), ValueError, "keys"),
        (5, torch.zeros(KEY_ROWS, d, dtype=torch.bfloat16, **z), TypeError, "keys"),
        (5, torch.zeros(d, KEY_ROWS, **z).t(), ValueError, "keys"),  # column stride
        (6, torch.tensor([0.0], **z), TypeError, "ring_row"),
    ]
    for i, value, err, what in cases:
        with pytest.raises(err, match=f"new_key: {what}"):
            call(i, value)
    with pytest.raises(ValueError, match="new_key: nope"):
        call(nope=d + 1)
    call(nope=d)  # every channel FP8-rounded is allowed (the model's nope is d - 2P)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("dtypes", ["bf16", "bf16-wbf16"])
@pytest.mark.parametrize("name", list(KEYS))
def test_new_key_gpu_bf16(name, dtypes, quant):
    """The compiled kernel against the twin run by eager CUDA torch (whose rsqrtf is not
    correctly rounded: a value may sit one bf16 ulp away)."""
    check_new_key(KEYS[name], dtypes, quant, cp.new_key)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("quant", [False, True])
def test_new_key_cuda_graph_replay(quant):
    """One launch captured at one position and ring row, replayed at two others with new kva
    values (all rewritten in place): the keys the twin writes there, no other value touched."""
    c = KeyCase(KEYS["flash"], torch.bfloat16, torch.float32)
    pos, row = torch.tensor([3], device=DEV), torch.tensor([1], device=DEV)
    buf, keys = c.keys(float("nan"))
    args = (c.kva, c.w, c.cos, c.sin, pos)
    _, scratch = c.keys(float("nan"))
    cp.new_key(*args, scratch, row, **c.kw(quant))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cp.new_key(*args, keys, row, **c.kw(quant))
    torch.cuda.synchronize()
    assert buf.isnan().all(), "the capture ran the kernel"
    written = []
    for p, r in ((41, 4), (KEY_MAX_POS - 1, 0)):
        c.refill()
        pos.fill_(p)
        row.fill_(r)
        graph.replay()
        _, ref = c.keys(0.0)
        cp.new_key_ref(*args, ref, row, **c.kw(quant))
        torch.cuda.synchronize()
        assert_entries(f"pos {p}", keys[r : r + 1], ref[r : r + 1], torch.bfloat16, "kv", quant)
        written.append(r)
    rest = buf.clone()
    rest[written, KEY_PAD:-KEY_PAD] = float("nan")
    assert rest.isnan().all(), "the replays wrote besides their ring rows"
