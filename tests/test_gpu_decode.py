"""The captured decode step on CUDA: graph replay == the same step run eagerly, over long greedy
runs with an evicting pool and with several sessions sharing one set of graphs; the captured
step == the prefill (reference) step; capture counts (tests marked gpu; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

import homeseek
from homeseek.decode import MIN_BUCKET

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

STEPS = 520  # > 500 greedy steps, and across the first position bucket (512)


def _load(graphs: bool, **kw):
    kw.setdefault("dtype", torch.bfloat16)
    kw.setdefault("max_context", 2048)
    # The CPU lane's split follows measured rates (timing), so these bit-for-bit comparisons
    # run copy-only; the lane has tests of its own below.
    kw.setdefault("cpu_lane", "off")
    return homeseek.load("tiny", device="cuda", graphs=graphs, **kw)


def _greedy(sess, first: int, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    toks, logits, tok = [], [], first
    for _ in range(steps):
        lo = sess.decode(tok)
        logits.append(lo.cpu())
        tok = int(lo.argmax())
        toks.append(tok)
    return toks, logits


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a - b| / std(b) over the steps."""
    return max(float((x - y).abs().max() / y.std()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("pinned", [0, 1])
def test_graph_decode_equals_eager_with_an_evicting_pool(pinned):
    prompt = list(range(100, 140))
    # 2 slots: every layer evicts (tiny: 8 experts, 2 per token); one of them pinned leaves one
    # free slot, so each layer runs its experts in two waves (graph E, then B)
    kw = dict(expert_slots=2)
    runs = {}
    for graphs in (True, False):
        eng = _load(graphs, **kw)
        assert eng.experts.pin_hot([(0, 0)][:pinned]) == pinned
        sess = eng.session()
        sess.forward(prompt)
        runs[graphs] = (*_greedy(sess, 7, STEPS), eng)
    (tg, lg, eg), (te, le, ee) = runs[True], runs[False]
    assert tg == te
    assert _close(lg, le) <= 1e-5
    st = eg.runner.graph_stats()
    assert st["graph_capture_failures"] == 0
    assert st["graph_eager_fallbacks"] == 0
    n_layers = eg.cfg.num_hidden_layers
    k = eg.cfg.num_experts_per_tok
    buckets = 2  # positions 40..559 cross MIN_BUCKET once
    assert 40 + STEPS > MIN_BUCKET and k >= 2
    # embed, H, A per layer and bucket, B (the resident experts) and E (a layer with misses:
    # its first wave, and with one free slot the later waves too)
    assert st["graphs_captured"] == 4 + pinned + n_layers * buckets
    assert ee.runner.graph_stats()["graphs_captured"] == 0


def test_sessions_share_one_set_of_graphs():
    prompts = [[5, 6, 7], list(range(300, 340)), [9] * 17]
    eng = _load(True, max_sessions=3)
    ref = _load(False)
    eng.warm_up()  # captures the first bucket on a scratch session, then frees its slot
    warm = eng.runner.graph_stats()["graphs_captured"]
    assert warm == 5 + eng.cfg.num_hidden_layers  # embed, H, B, E twice, A per layer
    sess = [eng.session() for _ in prompts]
    refs = [ref.session() for _ in prompts]
    toks = [[p[-1]] for p in prompts]
    rtoks = [[p[-1]] for p in prompts]
    for s, r, p in zip(sess, refs, prompts, strict=True):
        s.forward(p[:-1])
        r.forward(p[:-1])
    captured = None
    for step in range(60):
        for i in range(3):  # interleaved: every step switches session
            lo = sess[i].decode(toks[i][-1])
            lr = refs[i].decode(rtoks[i][-1])
            assert float((lo - lr).abs().max() / lr.std()) <= 1e-5
            toks[i].append(int(lo.argmax()))
            rtoks[i].append(int(lr.argmax()))
        if step == 0:
            captured = eng.runner.graph_stats()["graphs_captured"]
    assert toks == rtoks
    assert eng.runner.graph_stats()["graphs_captured"] == captured == warm  # none per session
    with pytest.raises(homeseek.state.NoFreeSlotError):
        eng.session()
    sess[0].close()
    eng.session()  # the slot is free again


def test_evicting_pool_decodes_as_the_resident_one():
    """The device slot map B reads stays true to the pool under eviction, and what was resident
    does not change the result: decoding with a 3-slot pool (misses every layer, E reruns
    them) == with every expert resident (B alone), bit for bit."""
    runs = []
    for kw in (dict(expert_slots=3), {}):
        eng = _load(True, dtype=torch.float32, **kw)
        sess = eng.session()
        sess.forward(list(range(50, 90)))
        runs.append((*_greedy(sess, 11, 150), eng))
    (ts, ls, es), (tf, lf, _) = runs
    assert es.experts.counters.evictions > 100
    assert ts == tf
    assert all(torch.equal(a, b) for a, b in zip(ls, lf, strict=True))


def test_partly_resident_pool_decodes_as_the_resident_one():
    """Half the experts fit: some layers B serves whole (their bookkeeping and the next
    layer's prefetch run once the next A is queued), others E reruns; bit for bit the decode
    of a pool that holds every expert, graphs and eager alike."""
    runs = []
    for graphs, kw in ((True, dict(expert_slots=20)), (False, dict(expert_slots=20)), (True, {})):
        eng = _load(graphs, dtype=torch.float32, **kw)
        sess = eng.session()
        sess.forward(list(range(50, 90)))
        runs.append((*_greedy(sess, 11, 150), eng))
    (tg, lg, eg), (te, le, _), (tf, lf, ef) = runs
    st = eg.runner.graph_stats()
    assert st["decode_layers_b"] > 50 and st["decode_layers_e"] > 50, st
    # every expert fits: after the first tokens (experts the prompt did not touch) B alone
    assert ef.runner.graph_stats()["decode_layers_e"] <= 2 * ef.cfg.num_hidden_layers
    assert tg == te == tf
    assert all(torch.equal(a, b) for a, b in zip(lg, lf, strict=True))
    assert _close(lg, le) <= 1e-5


def test_resident_layers_do_not_wait_for_their_ids():
    """Every expert on the device: each layer runs B and the host queues the next A before it
    reads the layer's ids (read later from the layer's own pinned row, for the bookkeeping).
    Bit for bit the decode of the same engine waiting for the ids first, and the same hits."""
    eng = _load(True, dtype=torch.float32)
    eng.experts.load_all()
    r = eng.runner
    runs = []
    for no_wait in (True, False):
        r.resident_no_wait = no_wait
        s = eng.session()
        s.forward(list(range(50, 90)))
        n0, h0 = r.layers_no_wait, eng.experts.counters.gpu_hits
        toks, logits = _greedy(s, 11, 60)
        runs.append((toks, logits, r.layers_no_wait - n0, eng.experts.counters.gpu_hits - h0))
        s.close()
    (ta, la, na, ha), (tb, lb, nb, hb) = runs
    assert na == 60 * eng.cfg.num_hidden_layers and nb == 0
    assert ha == hb > 0  # the deferred bookkeeping counted every layer's ids
    assert ta == tb
    assert all(torch.equal(a, b) for a, b in zip(la, lb, strict=True))


def test_graph_decode_equals_eager_under_a_routing_override():
    """With the ids replaced after A (benchmarks' uniform routing) E runs every expert from
    the host's table, graphs and eager alike."""
    from homeseek.scheduler import UniformRouting

    runs = {}
    for graphs in (True, False):
        eng = _load(graphs, expert_slots=4)
        c = eng.cfg
        eng.scheduler.routing = UniformRouting(c.n_routed_experts, c.num_experts_per_tok, seed=5)
        sess = eng.session()
        sess.forward(list(range(20, 40)))
        runs[graphs] = (*_greedy(sess, 3, 80), eng)
    (tg, lg, eg), (te, le, _) = runs[True], runs[False]
    assert tg == te and _close(lg, le) <= 1e-5
    assert ("E", False) in eg.runner.graphs.graphs and ("B",) not in eg.runner.graphs.graphs


@pytest.mark.parametrize("prefill_mhc", ["split", "block"])
def test_graph_decode_matches_the_prefill_step(prefill_mhc, monkeypatch):
    """The capture-safe step against the eager model.py step (the one the oracle tests), in
    fp32 (in bf16 the two orders of rounding drift apart on a random model, as on CPU), without
    the FP8/FP4 rounding simulation: with it, a 2.4e-7 change of one mHC scale moves these
    logits by 0.18 of their std (an activation crosses a rounding boundary; measured on the
    H200), so any legitimate change of summation order could fail the comparison. The prompt's
    mHC through the split kernel decode uses ("split") or through the block + finish kernels
    (prompts from _BLOCK_MIN_T tokens on: "block")."""
    from homeseek.kernels import mhc

    # the prompt's chunk (200 tokens) through one kernel or the other; decode (T = 1): split
    monkeypatch.setattr(mhc, "_BLOCK_MIN_T", 2 if prefill_mhc == "block" else 10**9)
    ids = torch.randint(0, 129280, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        eng = _load(True, dtype=torch.float32, quant_sim=False)
        full = eng.session().forward(ids).cpu()
        sess = eng.session()
        dec = torch.stack([sess.decode(i) for i in ids]).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    err = float(((dec - full).abs().amax(-1) / full.std(-1)).max())
    agree = float((dec.argmax(-1) == full.argmax(-1)).float().mean())
    assert err < 1e-4 and agree >= 0.99, (err, agree)


def test_decode_selects_every_entry_while_they_fit_the_top_k(monkeypatch):
    """A CSA layer's decode skips the indexer's scoring while the bucket's entries fit its top-k
    (n_c <= k: every complete entry is selected whatever the scores) and ranks them beyond: a
    tiny model with k = 128 takes the shortcut up to position 511 (bucket 512: 128 entries) and
    ranks from 512 on (256 entries). Both against the prefill step, fp32, no rounding simulation
    (see test_graph_decode_matches_the_prefill_step)."""
    import dataclasses

    from homeseek import decode as D
    from homeseek.bench import synthetic_config
    from homeseek.config import RuntimeConfig
    from homeseek.engine import Engine
    from homeseek.synthetic import SyntheticSource

    cfg = dataclasses.replace(synthetic_config("tiny"), index_topk=128)
    rt = RuntimeConfig.build(
        device="cuda", dtype=torch.float32, max_context=2048, cpu_lane="off", quant_sim=False
    )
    eng = Engine(SyntheticSource(cfg, seed=0, device="cuda"), rt)
    assert eng.rt.graphs
    shortcut = []  # (n_sel, m) of every layer_rows: CSA (m = 4) selects n_sel only by shortcut
    rows = D.layer_rows

    def spy(pos, slot, n_rows, window, m, n_sel, index_cap):
        shortcut.append((n_sel, m))
        return rows(pos, slot, n_rows, window, m, n_sel, index_cap)

    monkeypatch.setattr(D, "layer_rows", spy)
    ids = torch.randint(0, cfg.vocab_size, (560,), generator=torch.Generator().manual_seed(5))
    ids = ids.tolist()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        full = eng.session().forward(ids).cpu()
        sess = eng.session()
        dec = torch.stack([sess.decode(i) for i in ids]).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    err = ((dec - full).abs().amax(-1) / full.std(-1)).tolist()
    # positions up to 511 (the shortcut) and from 512 (ranked), each to 1e-4 of the logits' std
    assert max(err[:512]) < 1e-4 and max(err[512:]) < 1e-4, (max(err[:512]), max(err[512:]))
    assert (128, 4) in shortcut  # the CSA layers' selection went through it


def test_decode_profile_on_cuda_times_graphs_and_copies():
    """The profiler's CUDA branch: every segment timed by events, the copies of an evicting
    pool timed on the copy stream and inside the token, the trace ordered."""
    from homeseek import profiler

    eng = _load(True, expert_slots=3)
    pc = profiler.DecodeProfileConfig(tokens=4, warmup=2, prompt=16, compare_eager=True)
    res = profiler.profile_decode(eng, pc, out=lambda s: None)
    assert res["graphs"] is True and res["eager"] is not None
    t = res["per_token"]
    n_layers = eng.cfg.num_hidden_layers
    assert len(res["layers"]) == n_layers
    assert all(r["a_ms"] > 0 and r["b_ms"] > 0 for r in res["layers"])
    assert t["misses"] > 0 and t["copy_ms"] > 0 and t["h2d_MB"] > 0
    assert 0 <= t["overlap_ms"] <= t["copy_ms"] + 1e-6
    assert 0 < t["gpu_ms"] <= t["wall_ms"]
    for tok in res["_tokens"]:
        segs = sorted(tok.segments, key=lambda s: s.start)
        assert [s.name for s in segs][0] == "embed" and segs[-1].name == "H"
        assert all(0 <= s.start <= s.end <= tok.wall_ms + 1e-3 for s in segs)
        for st in tok.layers.values():
            assert all(0 <= a <= b <= tok.wall_ms + 1e-3 for a, b in st.copies)
    assert res["graph_stats"]["graphs_captured"] >= 3 + n_layers


@pytest.mark.parametrize("slots", [None, 2])
def test_verify_equals_decoding_one_at_a_time_with_graphs(slots):
    """Session.verify on CUDA with graphs: decode's own graphs per token (no new captures, no
    eager fallback), so each row equals decoding the tokens one by one, across the first
    position bucket (512). With every expert resident, bitwise in bf16. With a 2-slot pool a
    verify layer's union of experts runs in waves that may split a token's experts (a rounding
    of the partial sum per wave), so fp32 there, to 1e-5 of the logits' std."""
    dtype = torch.bfloat16 if slots is None else torch.float32
    eng = _load(True, dtype=dtype, expert_slots=slots, max_sessions=2)
    prompt = list(range(3000, 3497))
    a, b = eng.session(), eng.session()
    a.forward(prompt)
    b.forward(prompt)
    toks = [2000 + 53 * i for i in range(30)]
    for t in toks:  # every graph a plain decode of these positions needs
        b.decode(t)
    b.close()
    eng.runner.capture_experts()  # E (first wave and not): plain decode needs them only on a miss
    b = eng.session()
    b.forward(prompt)
    captured = eng.runner.graph_stats()["graphs_captured"]
    i, n = 0, 0
    while i < len(toks):
        T = (4, 3, 2)[n % 3]
        rows = a.verify(toks[i : i + T]).cpu()
        for t, tok in enumerate(toks[i : i + T]):
            ref = b.decode(tok).cpu()
            if slots is None:
                assert torch.equal(rows[t], ref), (i, t)
            else:
                assert float((rows[t] - ref).abs().max() / ref.std()) <= 1e-5, (i, t)
        i, n = i + T, n + 1
    st = eng.runner.graph_stats()
    assert st["graphs_captured"] == captured and st["graph_eager_fallbacks"] == 0
    assert st["verify_steps"] == n and a.pos == b.pos == len(prompt) + len(toks)


@pytest.mark.parametrize(
    "rate, dtype",
    [(None, "float32"), (0.5, "float32"), (None, "bfloat16"), (1.0, "bfloat16"),
     (0.5, "bfloat16"), (0.0, "bfloat16")],
)  # fmt: skip
def test_speculative_greedy_equals_plain_on_cuda(rate, dtype):
    """Speculative decoding on CUDA with graphs (verify steps as decode's graphs per token) gives
    plain greedy decoding's tokens over 300 steps; with the MTP block's drafts and with forced
    drafts kept at 100, 50 and 0 %, in bf16 and fp32."""
    from homeseek.speculative import ForcedDrafts

    dt = getattr(torch, dtype)
    prompt = list(range(200, 240))
    plain = _load(True, dtype=dt)
    ref = plain.generate(prompt_ids=prompt, max_tokens=300, temperature=0, ignore_eos=True)
    eng = _load(True, dtype=dt, mtp=3)
    source = None
    if rate is not None:
        source = ForcedDrafts.from_reference(ref.token_ids, len(prompt), rate, eng.cfg.vocab_size)
    r = eng.generate(prompt_ids=prompt, max_tokens=300, temperature=0, ignore_eos=True,
                     draft_source=source)  # fmt: skip
    assert r.token_ids == ref.token_ids
    assert r.stats["mtp_drafted"] > 0
    if rate == 1.0:
        assert r.stats["mtp_acceptance"] == 1.0
    elif rate == 0.0:
        assert r.stats["mtp_accepted"] == 0
    elif rate is not None:
        assert 0.2 < r.stats["mtp_acceptance"] < 0.8


def test_prefill_prefetch_of_the_next_layer_on_cuda():
    """Expert-major prefill on CUDA: the next layer's copies queued before this layer's expert
    kernels (copy stream) give the same logits as loading on demand."""
    ids = list(range(300, 428))
    runs = {}
    for prefetch in (True, False):
        eng = _load(True, dtype=torch.float32, expert_slots=20)
        eng.scheduler.prefetch = prefetch
        runs[prefetch] = (eng.session().forward(ids).cpu(), eng.scheduler.prefetched_experts)
    assert runs[True][1] > 0 and runs[False][1] == 0
    a, b = runs[True][0], runs[False][0]
    assert float((a - b).abs().max() / b.std()) <= 1e-5  # the kernels may sum in any order


def _lane_run(lane: str, dtype: torch.dtype, steps: int, share: float = 0.5, handoff: str = "host"):
    eng = _load(True, dtype=dtype, expert_slots=3, cpu_lane=lane)
    eng.runner.lane_handoff = handoff
    if lane == "on":
        eng.scheduler.lane.fixed_share = share  # not the rates: make it take experts
    sess = eng.session()
    sess.forward(list(range(50, 90)))
    return (*_greedy(sess, 11, steps), eng)


@pytest.mark.parametrize(
    "dtype,handoff",
    [(torch.float32, "host"), (torch.bfloat16, "host"), (torch.float32, "gpu"),
     (torch.bfloat16, "gpu")],
)  # fmt: skip
def test_cpu_lane_decodes_as_copy_only(dtype, handoff):
    """Half of every layer's misses computed on the CPU (the lane's kernel on the host records)
    instead of copied: the same greedy tokens as copy-only decoding with an evicting pool, and
    logits that differ only by the order of fp32 sums; the lane's sum handed over by the host
    or waited for on the GPU (`Runner.lane_handoff`)."""
    ton, lon, eon = _lane_run("on", dtype, 200, handoff=handoff)
    toff, loff, eoff = _lane_run("off", dtype, 200)
    c = eon.experts.counters
    assert c.cpu_lane > 200 and eoff.experts.counters.cpu_lane == 0
    assert c.lookups == c.gpu_hits + c.host_hits + c.disk_loads + c.cpu_lane
    assert eon.scheduler.lane.counters.experts == c.cpu_lane
    assert ton == toff
    assert _close(lon, loff) <= (1e-4 if dtype == torch.float32 else 2e-2)
    st = eon.runner.graph_stats()
    assert st["graph_capture_failures"] == 0 and st["graph_eager_fallbacks"] == 0
    assert not eon.runner._lane_jobs  # every handed-off job was waited for at its step's end


def test_cpu_lane_gpu_handoff_raises_a_failed_job():
    """A lane job that fails under the GPU hand-off still releases the GPU's wait (its flag is
    set), and the step raises the job's error, with no job left behind."""
    eng = _load(True, dtype=torch.float32, expert_slots=3, cpu_lane="on")
    eng.runner.lane_handoff = "gpu"
    lane = eng.scheduler.lane
    lane.fixed_share = 1.0
    sess = eng.session()
    sess.forward(list(range(50, 90)))
    run = lane.kernel.run

    def broken(*args, **kwargs):
        raise RuntimeError("lane kernel failed")

    lane.kernel.run = broken
    with pytest.raises(RuntimeError, match="lane kernel failed"):
        _greedy(sess, 11, 3)
    lane.kernel.run = run
    assert not eng.runner._lane_jobs


def test_cpu_lane_taking_all_misses_and_by_its_rates():
    """Every miss on the CPU (a layer's kernel then runs on hits alone), and the split by the
    measured rates: the same tokens as copy-only."""
    toff, _, _ = _lane_run("off", torch.float32, 80)
    tall, _, eall = _lane_run("on", torch.float32, 80, share=1.0)
    assert tall == toff
    lane = eall.scheduler.lane.counters
    assert lane.experts > 100 and lane.copied == 0  # no miss of a decode layer was copied
    eng = _load(True, dtype=torch.float32, expert_slots=3, cpu_lane="on")
    sess = eng.session()
    sess.forward(list(range(50, 90)))
    assert _greedy(sess, 11, 80)[0] == toff
    assert eng.scheduler.lane.t_cpu is not None  # measured once it ran


def test_next_layer_prediction_prefetches_without_changing_tokens():
    """Decode predicts the next layer's experts in A and starts their copies early: counted
    (accuracy, copies used / wasted), and bit for bit the same decode as without it."""
    runs = []
    # prefetch on (its copies queued behind a layer's own, or after the next A), then off
    for prefetch, early in ((True, True), (True, False), (False, True)):
        eng = _load(True, dtype=torch.float32, expert_slots=10, prefetch=prefetch)
        eng.runner.early_prediction = early
        sess = eng.session()
        sess.forward(list(range(50, 90)))
        runs.append((*_greedy(sess, 11, 120), eng))
    (tp, lp, ep), (tl, ll, el), (tn, ln, en) = runs
    assert tp == tn == tl
    assert all(torch.equal(a, b) for a, b in zip(lp, ln, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ll, ln, strict=True))
    assert el.scheduler.predicted.copied > 0
    p = ep.scheduler.predicted
    assert p.layers > 100 and 0 < p.correct <= p.predicted and p.copied > 0
    assert 0 <= p.copied_used <= p.copied
    assert en.scheduler.predicted.layers == 0
