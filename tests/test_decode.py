"""The capture-safe decode step (homeseek/decode.py) on CPU: equal to the eager model.py step it
replaces, its fused regions trace as whole graphs for torch.compile, position buckets, and the
session-state arena."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import homeseek
import homeseek.compile as HC
import homeseek.decode as D
from homeseek.config import ConfigError, RuntimeConfig
from homeseek.state import NoFreeSlotError, StateArena

FUSED = [
    "rms", "rms_into", "new_key", "unrope", "indexer_q", "key_rows", "layer_rows", "swiglu_act",
]  # fmt: skip


def _step_logits(eng, sess, tok: int) -> torch.Tensor:
    """The eager prefill path (model.segment_a, the oracle-tested one) for one token."""
    X = eng.runner.step(torch.tensor([tok]), [tok], sess.state)
    sess.tokens.append(tok)
    return eng.runner.head(X)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_the_prefill_step(dtype):
    """Across window wrap-around, compressed blocks (ratios 4 and 16) and a position bucket."""
    eng = homeseek.load("tiny", dtype=dtype, max_context=1024)
    prompt = torch.randint(0, 129280, (500,), generator=torch.Generator().manual_seed(1)).tolist()
    a, b = eng.session(), eng.session()
    a.forward(prompt)
    b.forward(prompt)
    for i in range(30):  # positions 500..529: bucket 512 -> 1024 at 512
        tok = 1000 + 37 * i
        x, y = a.decode(tok), _step_logits(eng, b, tok)
        assert torch.equal(x, y) or float((x - y).abs().max() / y.std()) < 1e-5, i


@pytest.mark.parametrize("slots", [None, 2])
def test_verify_equals_decoding_one_at_a_time(slots):
    """Session.verify (a few tokens through decode's pieces, layer by layer, experts loaded once
    for all): each row bitwise the logits of decoding the tokens one by one, across a position
    bucket (512), compressor blocks (4, 16) and window wrap; with a 2-slot pool each layer runs
    in waves. The session then goes on as decoding leaves it."""
    eng = homeseek.load("tiny", dtype=torch.bfloat16, max_context=1024, expert_slots=slots)
    prompt = torch.randint(0, 129280, (497,), generator=torch.Generator().manual_seed(2)).tolist()
    a, b = eng.session(), eng.session()
    a.forward(prompt)
    b.forward(prompt)
    toks = [2000 + 53 * i for i in range(30)]
    i, n = 0, 0
    while i < len(toks):
        T = (4, 3, 2, 1)[n % 4]
        rows = a.verify(toks[i : i + T])
        assert rows.shape == (len(toks[i : i + T]), 129280)
        for t, tok in enumerate(toks[i : i + T]):
            assert torch.equal(rows[t], b.decode(tok)), (i, t)
        i, n = i + T, n + 1
    assert a.tokens == b.tokens and a.pos == b.pos == 527
    assert torch.equal(a.decode(7), b.decode(7))
    assert eng.runner.graph_stats()["verify_steps"] == 9  # 4, 3, 2 thrice (1 is a decode step)
    with pytest.raises(ValueError, match="1 to 4 tokens"):
        a.verify([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="at least one"):
        a.verify([])


def test_truncate_undoes_the_last_tokens_in_place():
    """Session.truncate after a verify step: the session equals one that consumed only the kept
    tokens, however many of 4 are kept and across a compressor block (4) and window wrap (16);
    it declines (changing nothing) when the tokens since the snapshot outnumber a ring."""
    eng = homeseek.load("tiny", dtype=torch.bfloat16, max_context=256)
    prompt = list(range(500, 545))
    toks = [901, 902, 903, 904]
    for keep in range(5):
        for shift in range(4):  # the step starts at each offset within a block of 4
            a, b = eng.session(), eng.session()
            a.forward(prompt[: 41 + shift])
            b.forward(prompt[: 41 + shift])
            snap = a.snapshot()
            a.verify(toks)
            assert a.truncate(snap, keep)
            for t in toks[:keep]:
                b.decode(t)
            assert a.tokens == b.tokens and a.pos == b.pos
            for t in (7, 8, 9, 10, 11):
                assert torch.equal(a.decode(t), b.decode(t)), (keep, shift, t)
    a = eng.session()
    a.forward(prompt[:5])
    snap = a.snapshot()
    a.forward(prompt[5:25])
    assert not a.truncate(snap, 3) and a.pos == 25


def test_fused_regions_trace_as_whole_graphs(monkeypatch):
    """What CUDA compiles: every fused region traces without a graph break (fullgraph) and gives
    the eager result (aot_eager backend: the traced graph run by torch, no codegen on CPU)."""
    torch._dynamo.reset()
    compiled: dict = {}

    def traced(fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            if fn not in compiled:
                compiled[fn] = torch.compile(fn, backend="aot_eager", dynamic=False, fullgraph=True)
            return compiled[fn](*args, **kw)

        return run

    plain = {name: getattr(D, name).__wrapped__ for name in FUSED}
    for name, fn in plain.items():
        monkeypatch.setattr(D, name, traced(fn))
    HC.configure()
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=256)
    a, b = eng.session(), eng.session()
    a.forward([5, 6, 7])
    b.forward([5, 6, 7])
    for tok in range(40, 60):
        x, y = a.decode(tok), _step_logits(eng, b, tok)
        assert float((x - y).abs().max() / y.std()) < 1e-5
    # tiny has SWA, CSA and HCA layers: every region ran
    assert set(compiled) == set(plain.values())
    torch._dynamo.reset()


def test_bucket_of():
    assert D.bucket_of(0, 131072) == D.MIN_BUCKET
    assert D.bucket_of(511, 131072) == 512
    assert D.bucket_of(512, 131072) == 1024
    assert D.bucket_of(16383, 131072) == 16384
    assert D.bucket_of(5000, 4096) == 4096


def test_arena_slots():
    eng = homeseek.load("tiny", max_context=64)
    rt = RuntimeConfig(max_context=64)
    arena = StateArena(eng.cfg, rt, eng.layers, 2)
    s0, s1 = arena.acquire(), arena.acquire()
    assert (s0, s1) == (0, 1)
    with pytest.raises(NoFreeSlotError, match="max_sessions=3"):
        arena.acquire()
    arena.release(s0)
    assert arena.acquire() == 0
    # one buffer per layer holds the window ring and the compressed entries side by side
    for lay in arena.layers.values():
        view = lay.view(1)
        assert view.window.data_ptr() == lay.keys[1].data_ptr()
        if view.comp is not None:
            assert view.comp.cache.data_ptr() == lay.keys[1, eng.cfg.sliding_window].data_ptr()


def test_runtime_config_checks():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        RuntimeConfig(device="cpu", graphs=True)
    with pytest.raises(ConfigError, match="max_sessions"):
        RuntimeConfig(max_sessions=0)
    assert RuntimeConfig.build(device="cpu").graphs is False


def test_closed_session_refuses_work():
    eng = homeseek.load("tiny", max_context=64)
    s = eng.session()
    s.forward([1, 2])
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.decode(3)


def test_prefill_chunk_that_runs_out_of_memory_is_retried_in_halves(monkeypatch):
    """An out-of-memory chunk (raised here mid-way through its layers, after it changed the
    state of the first ones) is undone and redone in halves: the result equals a run that used
    the halved chunk from the start."""
    import homeseek.model as M

    prompt = torch.randint(0, 129280, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    ref_eng = homeseek.load("tiny", dtype=torch.float32, max_context=512)
    ref_eng.rt = dataclasses.replace(ref_eng.rt, prefill_chunk=64)
    want = ref_eng.session().forward(prompt, last_only=True)

    eng = homeseek.load("tiny", dtype=torch.float32, max_context=512)
    eng.rt = dataclasses.replace(eng.rt, prefill_chunk=128)
    real = M.segment_b
    calls = {"n": 0}

    def oom_once(p, moe, ctx):
        calls["n"] += 1
        if p.X.shape[0] == 128 and calls["n"] == 3:  # layer 2 of the first 128-token chunk
            raise torch.OutOfMemoryError("simulated")
        return real(p, moe, ctx)

    monkeypatch.setattr(M, "segment_b", oom_once)
    sess = eng.session()
    with pytest.warns(RuntimeWarning, match="continuing with 64-token chunks"):
        got = sess.forward(prompt, last_only=True)
    assert torch.equal(got, want)
    assert sess.pos == len(prompt) and sess.tokens == prompt
