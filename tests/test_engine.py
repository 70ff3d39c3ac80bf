"""The public API (docs/engine.md §3) and homeseek's self-consistency with quantisation simulation
on: one prefill == chunked prefill == token-by-token decode."""

from __future__ import annotations

import pytest
import torch

import homeseek
from homeseek.engine import ContextError, ensure_preset, preset_dir

from oracle import compare

N = 200


@pytest.fixture(scope="module")
def ids() -> list[int]:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 129280, (N,), generator=g).tolist()


@pytest.fixture(scope="module")
def eng_fp32_sim():
    return homeseek.load("tiny", dtype=torch.float32, quant_sim=True, max_context=256)


def test_tiny_preset_is_created_once_offline():
    p = ensure_preset("tiny")
    assert p == preset_dir("tiny") and (p / "config.json").exists()
    mtime = (p / "config.json").stat().st_mtime
    assert ensure_preset("tiny") == p and (p / "config.json").stat().st_mtime == mtime


def test_quant_sim_self_consistency_fp32(eng_fp32_sim, ids, parity_report):
    full = eng_fp32_sim.session().forward(ids)
    sess = eng_fp32_sim.session()
    dec = torch.stack([sess.decode(i) for i in ids])
    for chunk in (5, 64):
        s = eng_fp32_sim.session()
        ch = torch.cat([s.forward(ids[a : a + chunk]) for a in range(0, N, chunk)])
        stats = compare(ch, full)
        parity_report("tiny", f"sim chunked {chunk}", stats)
        assert stats["max_err_rel"] < 1e-4 and stats["argmax_agree_pct"] == 100.0, stats
    stats = compare(dec, full)
    parity_report("tiny", f"sim decode x{N}", stats)
    assert stats["max_err_rel"] < 1e-4 and stats["argmax_agree_pct"] == 100.0, stats


def test_quant_sim_changes_the_numbers(eng_fp32_sim, ids):
    """The simulation is live: rounding activations/KV/indexer moves logits (docs/engine.md §4)."""
    plain = homeseek.load("tiny", dtype=torch.float32, quant_sim=False, max_context=256)
    a = eng_fp32_sim.session().forward(ids[:50])
    b = plain.session().forward(ids[:50])
    assert (a - b).abs().max() > 1e-3


def _loose(stats: dict[str, float], a: torch.Tensor, b: torch.Tensor) -> None:
    # A random model is chaotic: bf16 rounding moves logits by ~0.1-0.2 std (median), as in the
    # official code (docs/engine.md §4), and with 129,280 near-Gaussian logits the top-1 is fragile.
    # So: median error, correlation, and argmax far above chance (1 / 129,280).
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    assert stats["median_err_rel"] < 0.3 and cos.median() > 0.95, (stats, cos.median())
    assert stats["argmax_agree_pct"] >= 30, stats


def test_bf16_close_to_fp32(ids, parity_report):
    """bf16 activations: judged by loose tolerances (docs/engine.md §4)."""
    bf = homeseek.load("tiny", dtype=torch.bfloat16, quant_sim=True, max_context=256)
    ref = homeseek.load("tiny", dtype=torch.float32, quant_sim=True, max_context=256)
    a = bf.session().forward(ids[:100])
    b = ref.session().forward(ids[:100])
    stats = compare(a, b)
    parity_report("tiny", "bf16 vs fp32 (sim)", stats)
    _loose(stats, a, b)
    sess = bf.session()
    dec = torch.stack([sess.decode(i) for i in ids[:100]])
    stats = compare(dec, a)
    parity_report("tiny", "bf16 decode vs prefill", stats)
    _loose(stats, dec, a)


def test_api_shapes_and_reset(eng_fp32_sim, ids):
    sess = eng_fp32_sim.session()
    out = sess.forward(ids[:7])
    assert out.shape == (7, 129280) and out.dtype == torch.float32
    assert sess.pos == 7
    one = sess.decode(ids[7])
    assert one.shape == (129280,) and sess.pos == 8
    sess.reset()
    again = sess.forward(ids[:7])
    assert torch.equal(again, out)  # a reset session is a fresh sequence
    last = eng_fp32_sim.session().forward(ids[:7], last_only=True)
    assert torch.allclose(last[0], out[-1], atol=1e-5)  # one-row head GEMM rounds differently


def test_sessions_are_independent(eng_fp32_sim, ids):
    a, b = eng_fp32_sim.session(), eng_fp32_sim.session()
    a.forward(ids[:30])
    ref = eng_fp32_sim.session().forward(ids[:10])
    assert torch.equal(b.forward(ids[:10]), ref)


def test_state_is_preallocated(eng_fp32_sim, ids):
    sess = eng_fp32_sim.session()
    before = sess.state.nbytes()
    ptrs = [s.window.data_ptr() for s in sess.state.layers.values()]
    sess.forward(ids[:100])
    assert sess.state.nbytes() == before
    assert ptrs == [s.window.data_ptr() for s in sess.state.layers.values()]


def test_context_overflow_is_a_clear_error(ids):
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=32)
    sess = eng.session()
    sess.forward(ids[:30])
    with pytest.raises(ContextError, match="max_context is 32"):
        sess.forward(ids[:3])
    assert sess.pos == 30  # nothing was consumed
    sess.forward(ids[:2])  # still usable up to the limit
    with pytest.raises(ContextError):
        eng.session().forward(ids[:33])


def test_bad_token_ids(eng_fp32_sim):
    sess = eng_fp32_sim.session()
    with pytest.raises(ValueError, match="outside"):
        sess.forward([1, 129280])
    with pytest.raises(ValueError, match="at least one"):
        sess.forward([])
    assert sess.pos == 0


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory nor a preset"):
        homeseek.load(tmp_path / "missing")


def test_shared_input_linears_are_fused_without_copies(eng_fp32_sim):
    """The loader stacks wq_a+wkv, wq_b+indexer.wq_b (CSA) and shared w1+w3 into one FP8 weight
    each; the parts are views into it, and one fused product equals the separate ones."""
    from homeseek import model as M
    from homeseek.config import CSA

    eng = eng_fp32_sim
    for layer in eng.layers:
        lw = eng.weights[layer]
        csa = eng.cfg.attn_kind(layer) == CSA
        for names in M.SHARED_INPUT_LINEARS:
            fused = lw.get("+".join(names))
            if names[1] == "attn.indexer.wq_b" and not csa:
                assert fused is None
                continue
            assert isinstance(fused, M.FusedLinear), (layer, names)
            base = fused.weight.weight.untyped_storage().data_ptr()
            x = torch.randn(3, fused.weight.shape[1], generator=torch.Generator().manual_seed(0))
            outs = M.linears(x, names, lw, eng.ctx)
            for name, (off, n), y in zip(names, fused.parts, outs, strict=True):
                part = lw[name]
                assert part.weight.untyped_storage().data_ptr() == base  # a view, not a copy
                assert off % part.block == 0 and part.shape == (n, fused.weight.shape[1])
                torch.testing.assert_close(y, M.linear(x, part, eng.ctx), rtol=1e-6, atol=1e-6)


def test_compressor_projections_are_stacked_without_copies(eng_fp32_sim):
    """The loader stacks each compressor's wkv and wgate (bf16/fp32 "plain" weights) into one
    weight, the parts views into it; one product equals the two, column for column."""
    from homeseek import model as M
    from homeseek.config import CSA, SWA

    eng = eng_fp32_sim
    seen = 0
    for layer in eng.layers:
        lw = eng.weights[layer]
        kind = eng.cfg.attn_kind(layer)
        for names in M.SHARED_INPUT_PLAIN:
            fused = lw.get("+".join(names))
            if kind == SWA or (names[0].startswith("attn.indexer") and kind != CSA):
                assert fused is None
                continue
            seen += 1
            assert isinstance(fused, M.FusedLinear) and fused.weight.fmt == "plain", (layer, names)
            base = fused.weight.weight.untyped_storage().data_ptr()
            x = torch.randn(2, fused.weight.shape[1], generator=torch.Generator().manual_seed(1))
            outs = M.plain_f32s(x, names, lw)
            for name, (off, n), y in zip(names, fused.parts, outs, strict=True):
                part = lw[name]
                assert part.weight.untyped_storage().data_ptr() == base  # a view, not a copy
                assert torch.equal(part.weight, fused.weight.weight[off : off + n])
                torch.testing.assert_close(y, M.plain_f32(x, part), rtol=1e-6, atol=1e-6)
    assert seen


def test_head_logits_in_row_blocks_match_one_product(eng_fp32_sim, monkeypatch):
    """The head is upcast a block of rows at a time (a bounded fp32 transient); the logits are
    the single fp32 product's, blocks uneven at the end included."""
    from homeseek import model as M

    eng = eng_fp32_sim
    n = eng.cfg.hc_mult
    X = torch.randn(3, n, eng.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    whole = M.head_logits(X, eng.top, eng.ctx)  # default blocks of 16384 rows
    monkeypatch.setattr(M, "HEAD_CHUNK_ROWS", 1000)  # 129280 rows -> 130 blocks, last short
    blocks = M.head_logits(X, eng.top, eng.ctx)
    z = M.rms_norm(
        M.hc_head(X, eng.top["hc_head_fn"], eng.top["hc_head_base"], eng.top["hc_head_scale"],
                  eng.ctx),
        eng.top["norm"], eng.cfg.rms_norm_eps,
    ).float()  # fmt: skip
    ref = z @ eng.top["head"].float().T
    assert blocks.shape == (3, eng.top["head"].shape[0])
    torch.testing.assert_close(blocks, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, ref, rtol=1e-6, atol=1e-6)


def test_step_reads_nothing_back_from_the_device(eng_fp32_sim, ids, monkeypatch):
    """Segment A (mHC, attention with compressors and indexer, router, shared expert) takes its
    positions from the host: on a GPU every int()/item()/bool()/tolist() of a tensor is a host
    sync, so none may happen there (the engine's one sync per layer is the routing readback)."""
    from homeseek import model as M

    real = M.segment_a
    reads = ("__int__", "__index__", "__bool__", "__float__", "item", "tolist")

    def guarded(*args, **kwargs):
        saved = {n: getattr(torch.Tensor, n) for n in reads}

        def refuse(name):
            def f(self, *a, **k):
                raise AssertionError(f"segment_a read a tensor back: Tensor.{name}")

            return f

        try:
            for n in reads:
                setattr(torch.Tensor, n, refuse(n))
            return real(*args, **kwargs)
        finally:
            for n, f in saved.items():
                setattr(torch.Tensor, n, f)

    eng_fp32_sim.session().forward(ids[:3])  # one-time setup (cached tables) outside the guard
    monkeypatch.setattr(M, "segment_a", guarded)
    s = eng_fp32_sim.session()
    s.forward(ids[:37])  # prefill across compressor blocks (CSA m=4, HCA m=128 in tiny)
    for t in ids[37:45]:
        s.decode(t)


def test_fp8_shapes_cover_every_fp8_product(eng_fp32_sim):
    """The FP8 GEMV workspace is sized from `fp8_shapes`: every FP8 linear the layers launch
    (fused ones as one, wo_a per group), and a workspace built from them serves each shape."""
    from homeseek import model as M
    from homeseek.checkpoint import QWeight
    from homeseek.kernels import fp8_linear as f8

    cfg = eng_fp32_sim.cfg
    shapes = M.fp8_shapes(eng_fp32_sim.weights, cfg)
    lw = eng_fp32_sim.weights[0]
    fused = [
        v.weight for v in lw.values() if isinstance(v, M.FusedLinear) and v.weight.fmt == "fp8"
    ]
    assert fused and all(tuple(f.weight.shape) in shapes for f in fused)
    wo_a = lw["attn.wo_a"]
    assert isinstance(wo_a, QWeight)
    assert (wo_a.weight.shape[0] // cfg.o_groups, wo_a.weight.shape[1]) in shapes
    # tiny's products never split K; V4-Flash's (N, K) do
    shapes += [(512, 4096), (1024, 4096), (4096, 2048), (4096, 8192), (32768, 1024)]
    ws = f8.fp8_linear_workspace(shapes, f8.GEMV_MAX_M, "cpu")
    split = 0
    for n, k in shapes:
        for m in (1, 2, f8.GEMV_MAX_M):
            p = f8._gemv_plan(m, n, k, torch.device("cpu"), None)
            if p.split_k > 1:  # one split needs no scratch
                split += 1
                assert ws.partial.numel() >= p.split_k * m * n
                assert ws.counters.numel() >= -(-n // p.block_n)
    assert split


def _prefill_then_decode(eng, ids: list[int], steps: int = 8) -> tuple[torch.Tensor, list[int]]:
    sess = eng.session()
    logits = sess.forward(ids)
    tok, out = int(logits[-1].argmax()), []
    for _ in range(steps):
        tok = int(sess.decode(tok).argmax())
        out.append(tok)
    assert sess.pos == len(ids) + steps and sess.tokens[: len(ids)] == ids
    return logits, out


@pytest.mark.parametrize("slots", [None, 3, 16])
def test_layer_by_layer_prefill_equals_chunk_by_chunk(ids, slots):
    """A prompt prefilled layer by layer in groups of chunks (every chunk passes a layer before
    the next layer starts: an expert loads once per group) gives bitwise the logits and the
    state of chunk by chunk, with whole and partial groups and a last short chunk, also with a
    3-slot pool that loads each layer in waves, and with a pool of two layers (where chunk by
    chunk loads every layer's experts again for each chunk); every chunk's A of a layer before
    the experts (the default) and chunk after chunk alike."""
    kw = dict(dtype=torch.float32, max_context=256, prefill_chunk=16, expert_slots=slots)
    base = homeseek.load("tiny", **kw)
    want = _prefill_then_decode(base, ids[:100])
    for group, a_first in ((48, True), (64, True), (64, False), (1000, True)):
        eng = homeseek.load("tiny", prefill_group=group, **kw)
        assert eng.runner.a_first  # the default
        eng.runner.a_first = a_first
        got = _prefill_then_decode(eng, ids[:100])
        assert torch.equal(got[0], want[0]), (group, a_first)
        assert got[1] == want[1], (group, a_first)
    if slots == 16:  # each expert of a layer loads once per group
        loads = [e.experts.counters.lookups - e.experts.counters.gpu_hits for e in (eng, base)]
        assert 2 * loads[0] < loads[1], loads


@pytest.mark.parametrize("slots", [16, 20, 24])
def test_a_group_loads_each_expert_once(ids, slots):
    """Layer by layer, the next layer's prefetch starts once a group's first chunk passed a
    layer: it leaves that layer's experts to the later chunks, so each expert loads once per
    group with pools of two to three layers (it had evicted the experts the first chunk did not
    use, and a later chunk loaded them again, behind the next layer's copies)."""
    eng = homeseek.load(
        "tiny", dtype=torch.float32, max_context=256, prefill_chunk=16, prefill_group=1000,
        expert_slots=slots,
    )  # fmt: skip
    eng.session().forward(ids[:100])  # 7 chunks of 16 tokens x 2 experts: all 8 of a layer
    c, cfg = eng.experts.counters, eng.cfg
    assert eng.scheduler.prefetched_experts > 0
    assert c.lookups - c.gpu_hits == cfg.num_hidden_layers * cfg.n_routed_experts


def test_layer_by_layer_group_out_of_memory_goes_on_chunk_by_chunk(ids, monkeypatch):
    """A group that runs out of GPU memory is undone and the prompt goes on chunk by chunk,
    with a warning, to the same logits."""
    kw = dict(dtype=torch.float32, max_context=256, prefill_chunk=16)
    want = homeseek.load("tiny", **kw).session().forward(ids[:70])
    eng = homeseek.load("tiny", prefill_group=64, **kw)
    real = eng.runner.steps

    def steps(chunks, state):
        if len(chunks) > 1:
            real(chunks[:1], state)  # changes the state before it fails, as a real OOM may
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(chunks, state)

    monkeypatch.setattr(eng.runner, "steps", steps)
    with pytest.warns(RuntimeWarning, match="layer by layer ran out of GPU memory"):
        got = eng.session().forward(ids[:70])
    assert torch.equal(got, want)


def test_steps_run_with_the_switch_interval(ids, monkeypatch):
    """A prefill step (and a decode step beside the CPU lane) runs with the GIL's switch
    interval at the runner's `switch_interval` and puts Python's back after it, also when a
    step fails, and after the last of overlapping steps; None leaves Python's."""
    import sys

    from homeseek.runner import SWITCH_INTERVAL

    def spy(fn, seen: list[float]):  # fn, noting the switch interval it runs with
        def call(*args):
            seen.append(sys.getswitchinterval())
            return fn(*args)

        return call

    eng = homeseek.load("tiny", dtype=torch.float32, max_context=256, prefill_chunk=16)
    runner, real = eng.runner, eng.runner._steps
    seen: list[float] = []
    monkeypatch.setattr(runner, "_steps", spy(real, seen))
    old = sys.getswitchinterval()
    assert old != SWITCH_INTERVAL
    eng.session().forward(ids[:40])  # three chunks of 16
    assert seen == [pytest.approx(SWITCH_INTERVAL)] * 3
    assert sys.getswitchinterval() == old
    runner.switch_interval = None
    seen.clear()
    eng.session().forward(ids[:10])
    assert seen == [old] and sys.getswitchinterval() == old

    def failing(chunks, state):
        raise RuntimeError("step failed")

    runner.switch_interval = SWITCH_INTERVAL
    monkeypatch.setattr(runner, "_steps", failing)
    with pytest.raises(RuntimeError, match="step failed"):
        eng.session().forward(ids[:10])
    assert sys.getswitchinterval() == old

    # Overlapping steps (another engine's, here inside this one's): Python's interval comes
    # back only once the last of them has ended.
    other = homeseek.load("tiny", dtype=torch.float32, max_context=256)
    during: list[float] = []

    def nested(chunks, state):
        other.session().forward(ids[:5])
        during.append(sys.getswitchinterval())
        return real(chunks, state)

    monkeypatch.setattr(runner, "_steps", nested)
    eng.session().forward(ids[:10])
    assert during == [pytest.approx(SWITCH_INTERVAL)]
    assert sys.getswitchinterval() == old

    # A decode step: lowered while the CPU lane computes beside it (another thread running
    # Python), else left alone. (The step itself is stubbed: the tiny CPU engine has no lane.)
    in_decode: list[float] = []
    monkeypatch.setattr(runner, "_decode", spy(lambda token, state: torch.zeros(1), in_decode))
    runner.switch_interval = SWITCH_INTERVAL
    state = eng.session().state
    runner.decode(1, state)
    monkeypatch.setattr(eng.scheduler, "lane", object())
    monkeypatch.setattr(runner, "lane_inputs", True)
    runner.decode(1, state)
    runner.switch_interval = None
    runner.decode(1, state)
    assert in_decode == [old, pytest.approx(SWITCH_INTERVAL), old]
    assert sys.getswitchinterval() == old

    # a bad interval leaves nothing behind
    runner.switch_interval = 0.0
    with pytest.raises(ValueError):
        runner.decode(1, state)
    runner.switch_interval = SWITCH_INTERVAL
    runner.decode(1, state)
    assert sys.getswitchinterval() == old


def test_layer_by_layer_prefill_feeds_the_mtp_block(ids):
    """The MTP block sees every chunk's final streams after a layer-by-layer prefill, as after
    a chunk-by-chunk one."""
    kw = dict(dtype=torch.float32, max_context=256, prefill_chunk=16, mtp=1)
    out = []
    for group in (0, 64):
        sess = homeseek.load("tiny", prefill_group=group, **kw).session()
        sess.forward(ids[:70])
        out.append(sess.mtp_logits(ids[70]))
    assert torch.equal(out[0], out[1])
