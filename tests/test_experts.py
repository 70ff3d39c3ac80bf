"""The tiered expert store: correctness under eviction, counters, and eviction policies."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import homeseek
from homeseek import experts
from homeseek.config import ConfigError
from homeseek.experts import (
    LRFUPolicy,
    LRUPolicy,
    RecordBuffer,
    Residency,
    make_policy,
    record_bytes,
    simulate,
)
from homeseek.kernels import cpu_experts
from homeseek.profile import hot_set
from homeseek.scheduler import UniformRouting


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return torch.randint(0, 129280, (120,), generator=torch.Generator().manual_seed(9)).tolist()


def _run(eng, ids: list[int]) -> torch.Tensor:
    sess = eng.session()
    pre = sess.forward(ids[:80])  # chunked prefill (waves when the pool is small)
    dec = torch.stack([sess.decode(i) for i in ids[80:]])
    return torch.cat([pre, dec])


@pytest.mark.parametrize("policy", ["lru", "lrfu"])
def test_logits_bitwise_equal_with_a_pool_that_evicts_every_step(ids, policy):
    full = homeseek.load("tiny", dtype=torch.float32, max_context=256)
    small = homeseek.load(
        "tiny", dtype=torch.float32, max_context=256, expert_slots=2, eviction=policy
    )
    assert full.experts.n_slots == 5 * 8 and small.experts.n_slots == 2
    a, b = _run(full, ids), _run(small, ids)
    assert torch.equal(a, b)
    c = small.experts.counters
    assert c.evictions > len(ids)  # every step evicts (2 slots, 2 experts per token, 5 layers)
    assert c.lookups == c.gpu_hits + c.host_hits + c.disk_loads
    f = full.experts.counters
    assert f.lookups == f.gpu_hits + f.host_hits + f.disk_loads and f.evictions == 0
    # Without evictions every expert is read from disk once, then always hit.
    assert f.disk_loads <= 40 and f.bytes_disk == f.disk_loads * record_bytes(full.cfg)


def test_generate_reports_expert_stats():
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=128, expert_slots=4)
    r = eng.generate(prompt_ids=[0, 5, 6, 7], max_tokens=6, temperature=0)
    s = r.stats
    assert s["expert_lookups"] > 0 and 0 <= s["expert_hit_rate"] <= 1
    assert s["expert_bytes_disk"] > 0


def test_too_small_gpu_budget_fails_at_load_with_numbers():
    with pytest.raises(ConfigError, match=r"gpu_mem_gb=0\.0 is too small: dense weights .* GiB"):
        homeseek.load("tiny", gpu_mem_gb=0.001, host_mem_gb=0.1)


def test_budget_sizes_the_pool():
    eng = homeseek.load("tiny", gpu_mem_gb=1.6, host_mem_gb=0.1, max_context=256)
    # 1.6 GiB minus dense weights, state and the planned workspace holds every tiny expert.
    assert eng.experts.n_slots == eng.plan.gpu_slots == 40


def test_disk_tier_is_zero_copy(ids):
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    rec = eng.experts._disk_record((0, 3))
    raw = eng.ckpt.get("layers.0.ffn.experts.3.w2.weight").view(torch.uint8)
    assert torch.equal(rec["w2_q"], raw)
    mapped = eng.ckpt.get_mapped("layers.0.ffn.experts.3.w2.weight")
    assert mapped.untyped_storage().data_ptr() != raw.untyped_storage().data_ptr()
    assert not mapped.untyped_storage().resizable()  # a view over the map, not an owned copy


def test_record_buffer_rows_are_whole_records():
    """A record is one packed row: its four tensors tile the row (the kernels' layout), and one
    copy of a row moves all of them; a record given by name still copies tensor by tensor; a
    buffer in pieces (pinned host tiers) holds the same records."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    store = eng.experts
    a, b = RecordBuffer(eng.cfg, 2, "cpu"), RecordBuffer(eng.cfg, 5, "cpu", piece=2)
    assert a.t["w13_q"].shape[0] == 2 and len(a.pieces) == 1
    assert [p.shape for p in b.pieces] == [(2, experts.record_bytes(eng.cfg))] * 2 + [
        (1, experts.record_bytes(eng.cfg))
    ]
    with pytest.raises(ValueError, match="pieces"):
        _ = b.t
    store._fill(a.view(1), (1, 5))
    for p in b.pieces:
        p.fill_(0)
    b.copy_in(3, a.row(1))
    want = store._disk_record((1, 5))
    assert all(torch.equal(b.view(3)[k], want[k]) for k in want)
    assert sum(int(b.row(s).count_nonzero()) for s in (0, 1, 2, 4)) == 0  # only its slot
    b.copy_in(4, want)  # by name (the disk tier read in place)
    assert torch.equal(b.row(4), a.row(1))
    # the four views cover the row exactly once, in the order the kernels expect
    for buf, s in ((a, 1), (b, 4)):
        v = buf.view(s)
        sizes = [t.numel() for t in v.values()]
        offsets = [t.data_ptr() - buf.row(s).data_ptr() for t in v.values()]
        assert sum(sizes) == buf.row(s).numel()
        assert offsets == [sum(sizes[:i]) for i in range(4)]


def test_disk_reads_fill_a_host_record_in_place():
    """The reader threads' copy (parts straight into a host record's rows, no concatenation)
    gives the record the disk tier stores, from the main thread and from the reader pool."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    store = eng.experts
    buf = RecordBuffer(eng.cfg, 2, "cpu")
    store._fill(buf.view(0), (1, 5))
    store._readers().submit(store._fill, buf.view(1), (2, 7)).result()
    for slot, key in ((0, (1, 5)), (1, (2, 7))):
        want = store._disk_record(key)
        assert all(torch.equal(buf.view(slot)[k], want[k]) for k in want)
    # In pieces of 3 rows over the reader threads (how decode reads the tier below), the last
    # piece of a part ragged.
    pieces = RecordBuffer(eng.cfg, 2, "cpu")
    for t in pieces.t.values():
        t.fill_(0xAB)
    reads = [(0, (1, 5), pieces.view(0)), (1, (2, 7), pieces.view(1))]
    old_piece = experts.READ_PIECE
    experts.READ_PIECE = 3 * (eng.cfg.hidden_size // 2)
    try:
        done = list(store._read_parallel(reads))
    finally:
        experts.READ_PIECE = old_piece
    assert [s for s, _ in done] == [0, 1]
    for slot, key in ((0, (1, 5)), (1, (2, 7))):
        want = store._disk_record(key)
        assert all(torch.equal(pieces.view(slot)[k], want[k]) for k in want)
    # with the CPU kernel library's parallel copy, where it builds
    if cpu_experts.available()[0]:
        for t in pieces.t.values():
            t.fill_(0xCD)
        with cpu_experts.CpuExperts(threads=2) as k:
            store.copier = k.copy
            try:
                assert [s for s, _ in store._read_parallel(reads)] == [0, 1]
            finally:
                store.copier = None
        for slot, key in ((0, (1, 5)), (1, (2, 7))):
            want = store._disk_record(key)
            assert all(torch.equal(pieces.view(slot)[k], want[k]) for k in want)


# --- policies ------------------------------------------------------------------------------------
def _fill(res: Residency, keys) -> None:
    for k in keys:
        if res.lookup(k) is None:
            res.admit(k)


def test_lru_evicts_least_recent():
    res = Residency(3, 1, LRUPolicy(3))
    _fill(res, [(0, 1), (0, 2), (0, 3)])
    res.lookup((0, 1))  # 2 is now the least recent
    _, ev = res.admit((0, 4))
    assert ev == (0, 2)


def test_lrfu_keeps_frequent_over_recent_one_offs():
    res = Residency(3, 1, LRFUPolicy(3, half_life=1000))
    _fill(res, [(0, 1)] * 5 + [(0, 2)] * 5 + [(0, 3)])
    _, ev = res.admit((0, 4))  # 3 was used once; 1 and 2 five times
    assert ev == (0, 3)
    _, ev = res.admit((0, 5))  # 4 (once, newest) goes before the frequent ones
    assert ev == (0, 4)
    # A short half-life forgets: it behaves like LRU.
    res = Residency(3, 1, LRFUPolicy(3, half_life=0.01))
    _fill(res, [(0, 1)] * 5 + [(0, 2), (0, 3)])
    _, ev = res.admit((0, 4))
    assert ev == (0, 1)


def test_protected_and_pinned_are_never_evicted():
    res = Residency(3, 1, LRUPolicy(3))
    _fill(res, [(0, 1), (0, 2), (0, 3)])
    res.pin(res.slot_of[(0, 1)])
    res.protected[res.slot_of[(0, 2)]] = True
    _, ev = res.admit((0, 9))
    assert ev == (0, 3)
    res.protected[res.slot_of[(0, 9)]] = True
    with pytest.raises(RuntimeError, match="raise gpu_mem_gb"):
        res.admit((0, 10))


def test_per_layer_floor():
    res = Residency(4, 2, LRUPolicy(4), floor=1)
    _fill(res, [(0, 1), (1, 1), (1, 2), (1, 3)])  # layer 0 holds one entry: its floor
    res.lookup((1, 1))
    res.lookup((1, 2))
    res.lookup((1, 3))
    _, ev = res.admit((1, 4))  # (0, 1) is least recent but protected by the floor
    assert ev[0] == 1 and res.per_layer[0] == 1


@pytest.mark.parametrize("policy", ["lru", "lrfu:50", "lrfu:5000"])
@pytest.mark.parametrize("floor", [0, 1, 3])
@pytest.mark.parametrize("n", [40, 200])
def test_admit_many_chooses_what_admit_would(policy: str, floor: int, n: int):
    """The batched admission of a layer's misses evicts the same entries, in the same order,
    as admitting them one at a time (each protected before the next); with 200 slots the
    batch ranks only the lowest candidates."""
    rng = np.random.default_rng(floor)
    layers, experts = 6, n // 40 * 24
    one = Residency(n, layers, make_policy(policy, n), floor)
    many = Residency(n, layers, make_policy(policy, n), floor)
    for step in range(300):
        layer = int(rng.integers(layers))
        want = [(layer, int(e)) for e in rng.choice(experts, size=6, replace=False)]
        for res in (one, many):
            res.protected[:] = False
            if step == 50:
                res.pin(3)
        got = []
        for res, batched in ((one, False), (many, True)):
            hits = [k for k in want if res.lookup(k) is not None]
            for k in hits:
                res.protected[res.slot_of[k]] = True
            miss = [k for k in want if k not in hits]
            if batched:
                got.append(res.admit_many(miss))
            else:
                out = []
                for k in miss:
                    out.append(res.admit(k))
                    res.protected[out[-1][0]] = True
                got.append(out)
        assert got[0] == got[1], step
        assert one.slot_of == many.slot_of and (one.per_layer == many.per_layer).all()


def test_admit_many_when_every_slot_is_taken():
    res = Residency(3, 1, LRUPolicy(3))
    with pytest.raises(RuntimeError, match="raise gpu_mem_gb"):
        res.admit_many([(0, e) for e in range(4)])


def test_admit_many_fails_before_changing_anything():
    res = Residency(4, 1, LRUPolicy(4))
    _fill(res, [(0, 1), (0, 2), (0, 3), (0, 4)])
    res.protected[[0, 1]] = True  # two evictable slots, three misses
    slot_of, per_layer, clock = dict(res.slot_of), res.per_layer.copy(), res.clock
    with pytest.raises(RuntimeError, match="raise gpu_mem_gb"):
        res.admit_many([(0, 7), (0, 8), (0, 9)])
    assert res.slot_of == slot_of and (res.per_layer == per_layer).all() and res.clock == clock
    assert not res.free and not res.protected[2:].any()


def test_lrfu_ranks_entries_whose_decayed_score_underflows():
    """Long-unused entries' decayed CRF reaches 0.0 in float64; the rank still orders them:
    8 uses at time 0 against 1 use at time 10 with a half-life of 5 is 2^-1072 against 2^-1073
    at time 5375, so the second goes first."""
    pol = LRFUPolicy(2, half_life=5)
    pol.crf[:] = [8.0, 1.0]
    pol.last[:] = [0, 10]
    ok = np.ones(2, dtype=bool)
    assert pol.victim_of(ok, 5375) == 1
    assert pol.eviction_order(ok, 5375).tolist() == [1, 0]
    assert pol.victim(np.array([0, 1]), 5375) == 1


def test_lrfu_partial_order_is_exact_whatever_bound_earlier_calls_left():
    """`eviction_order` with `first` selects among the candidates at or below a bound kept
    from earlier calls: whatever that bound (stale, too low, too high), it returns exactly
    the whole ranking's entries down to the `first`-th lowest rank (ties there kept whole)."""
    rng = np.random.default_rng(3)
    n = 300
    pol = LRFUPolicy(n, half_life=500)
    now = 0
    for step in range(400):
        for _ in range(int(rng.integers(1, 20))):
            now += 1
            s = int(rng.integers(0, n))
            (pol.on_fill if rng.random() < 0.3 else pol.on_access)(s, now)
        if step % 50 == 49:  # a tie at the cut: two entries of the same rank
            a, b = (int(x) for x in rng.choice(n, size=2, replace=False))
            pol.crf[b], pol.last[b] = pol.crf[a], pol.last[a]
        if step % 40 == 0:
            pol._bound = float(rng.choice([-np.inf, np.inf, rng.normal(now / 500, 1)]))
        ok = rng.random(n) < 0.9
        first = int(rng.integers(1, 60))
        whole = pol.eviction_order(ok, now)
        rank = pol._rank(np.arange(n))
        cut = np.sort(rank[ok])[first - 1]
        got = pol.eviction_order(ok, now, first)
        assert got.tolist() == whole[: int((rank[ok] <= cut).sum())].tolist(), step


def test_prediction_copies_predicted_host_cache_records_not_resident():
    """Decode's prediction copies, in the prediction's order and as far as the free slots
    allow, the predicted experts neither resident nor below the host cache."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64, expert_slots=8)
    store, sched, cfg = eng.experts, eng.scheduler, eng.cfg
    layer = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_hash_layer(i))
    store.host = RecordBuffer(cfg, 4, "cpu")
    store.hostres = Residency(4, cfg.num_hidden_layers, make_policy("lru", 4, 1), 0)
    for e in (1, 2, 3, 4):
        s, _ = store.hostres.admit((layer, e))
        store._fill(store.host.view(s), (layer, e))
    store.begin_layer()
    store.ensure_resident(layer, [2])
    store.begin_layer()
    # 5 lies below the host cache and 2 is resident: 3 then 1 are copied, 4 finds no room
    store.gpu.protected[: store.n_slots - 2] = True  # room for two (`free_slots`)
    sched.prefetch_predicted(layer, [5, 2, 3, 3, 1, 4])
    assert sched._prediction == (layer, {1, 2, 3, 4, 5}, {1, 3})
    resident = {e for e in range(cfg.n_routed_experts) if (layer, e) in store.gpu.slot_of}
    assert resident == {1, 2, 3} and store.prefetched == {(layer, 1), (layer, 3)}
    store.host = None  # no host cache: nothing is copied ahead
    store.begin_layer()
    sched.prefetch_predicted(layer, [4, 6])
    assert sched._prediction == (layer, {4, 6}, set())


def test_a_failed_read_leaves_nothing_behind(monkeypatch):
    """A record whose read fails must not be found later: neither its slot nor the host-cache
    slot it was read into holds it."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64, expert_slots=6)
    store = eng.experts
    store.begin_layer()
    calls = []

    def failing(reads):
        for s, key, src in reads:
            calls.append(key)
            if len(calls) == 2:
                raise OSError("shard read failed")
            store._fill(src, key)
            yield s, src

    monkeypatch.setattr(store, "_read_parallel", failing)
    if store.host is None:  # CPU: records are read in place; make the second one fail there
        real = store._below_source

        def source(key, scan):
            calls.append(key)
            if len(calls) == 2:
                raise OSError("shard read failed")
            return real(key, scan)

        monkeypatch.setattr(store, "_below_source", source)
    free = len(store.gpu.free)
    with pytest.raises(OSError, match="shard read failed"):
        store.ensure_resident(3, [0, 1, 2])
    resident = [e for e in (0, 1, 2) if (3, e) in store.gpu.slot_of]
    assert resident == [0]  # the first arrived; the failed one and the one after are forgotten
    assert len(store.gpu.free) == free - 1
    assert not store._newmap or all(k == (3, 0) for k in store._newmap.values())


def _skewed_trace(steps: int, layers: int, experts: int, k: int, seed: int):
    """Zipf-like expert popularity per layer plus noise: what learned routers produce."""
    rng = np.random.default_rng(seed)
    pop = [rng.permutation(experts) for _ in range(layers)]
    weights = 1.0 / np.arange(1, experts + 1) ** 0.8
    weights /= weights.sum()
    for _ in range(steps):
        for layer in range(layers):
            picks = rng.choice(experts, size=k, replace=False, p=weights)
            yield layer, pop[layer][picks].tolist()


def test_frequency_aware_beats_lru_on_skewed_routing():
    trace = list(_skewed_trace(steps=600, layers=8, experts=64, k=6, seed=0))
    lru = simulate(trace, n_slots=96, n_layers=8, policy="lru")
    lrfu = simulate(trace, n_slots=96, n_layers=8, policy="lrfu:5000")
    assert lrfu["lookups"] == lru["lookups"] == 600 * 8 * 6
    assert lrfu["hit_rate"] > lru["hit_rate"] + 0.03, (lru, lrfu)


def test_hash_layer_experts_are_prefetched_at_step_start():
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64, expert_slots=20)
    sess = eng.session()
    sess.forward([0])
    before = dataclasses.replace(eng.experts.counters)
    tok = 4242
    want = {(layer, int(e)) for layer in (0, 1) for e in eng.experts.tid2eid[layer][tok]}
    sess.decode(tok)
    assert want <= set(eng.experts.gpu.slot_of)
    c = eng.experts.counters
    # Each hash-layer expert is looked up once (by the prefetch), not again by its layer: a
    # decode token counts exactly K lookups per layer, so hit rates are not flattered.
    assert c.lookups - before.lookups == eng.cfg.num_hidden_layers * eng.cfg.num_experts_per_tok


def test_profile_command_and_hot_set(tmp_path):
    prof = tmp_path / "routing.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "homeseek", "profile", "--routing", "--model", "tiny"]
    cmd += ["--threads", "1", "--tokens", "64", "--out", str(prof)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    hot = hot_set(prof, 6)
    counts = json.loads(prof.read_text())["counts"]
    assert counts[hot[0][0]][hot[0][1]] == max(max(row) for row in counts)
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64, expert_slots=12,
                        hot_profile=str(prof))  # fmt: skip
    assert int(eng.experts.gpu.pinned.sum()) == 6
    assert {eng.experts.gpu.key_of[s] for s in np.flatnonzero(eng.experts.gpu.pinned)} == set(hot)
    ref = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    ids = list(range(100, 140))
    assert torch.equal(eng.session().forward(ids), ref.session().forward(ids))


@pytest.mark.parametrize("policy", ["lru", "lrfu:50"])
def test_masked_victim_equals_candidate_victim(policy):
    """The whole-array victim the residency map uses picks what the candidate-list rule does."""
    rng = np.random.default_rng(1)
    p = make_policy(policy, 300)
    for now in range(1, 3000):
        s = int(rng.integers(0, 300))
        (p.on_fill if rng.random() < 0.3 else p.on_access)(s, now)
        if now % 7 == 0:
            ok = rng.random(300) < 0.5
            ok[int(rng.integers(0, 300))] = True
            cand = np.flatnonzero(ok)
            assert p.victim_of(ok, now) == int(cand[p.victim(cand, now)])


def test_prefill_loads_the_next_layers_experts_early():
    """A long prefill chunk queues the next layer's experts while the current layer computes
    (expert-major prefill): same logits as loading on demand, the next layers' requests find
    them resident, and each lookup is counted once."""
    ids = list(range(300, 364))  # 64 tokens x 2 experts >= 4 x 8 experts per layer
    runs = {}
    for prefetch in (True, False):
        eng = homeseek.load("tiny", dtype=torch.float32, max_context=128, expert_slots=20)
        eng.scheduler.prefetch = prefetch
        store, cfg = eng.experts, eng.cfg
        loads, reads, load, read = [], [], store.prefetch, store.read_ahead

        def spy(layer, experts, scan=False, load=load, loads=loads):
            loads.append((layer, sorted(experts), scan))
            load(layer, experts, scan)

        def spy_read(layer, experts=None, read=read, reads=reads):
            reads.append(layer)
            read(layer, experts)

        store.prefetch, store.read_ahead = spy, spy_read
        logits = eng.session().forward(ids)
        if prefetch:
            # the second hash layer (the step start skips them: all of them would crowd out
            # half the pool) loads a layer ahead, the experts of the step's token ids only
            hashed = [(layer, e) for layer, e, scan in loads if scan and cfg.is_hash_layer(layer)]
            assert hashed == [(1, store.hash_experts(1, ids))], loads
            want = [sorted({e for t in ids for e in store.tid2eid[1][t].tolist()})]
            assert [e for _, e in hashed] == want
            # each layer after the next is read ahead once in the step
            assert reads == list(range(2, cfg.num_hidden_layers)), reads
        # prefetched experts the layer's own request found resident leave `prefetched`
        found = eng.scheduler.prefetched_experts - len(store.prefetched)
        runs[prefetch] = (logits, eng.scheduler.prefetched_experts, found, store.counters.lookups)
    (la, n_pf, found, look_pf), (lb, n_off, _, look_off) = runs[True], runs[False]
    assert torch.equal(la, lb)
    assert n_off == 0 and n_pf > 0 and found > 0
    # every lookup counted once: the only extra ones are the prefetched experts left unused
    assert look_pf - look_off == n_pf - found


def test_prefill_under_a_routing_override_loads_the_next_layers_experts_early():
    """A routing override (the bench's uniform routing) draws its ids per layer, after the
    router, hash layers included: a long chunk still queues the next layer's experts early
    (all of them), to the same logits as loading on demand."""
    ids = list(range(300, 364))
    runs = {}
    for prefetch in (True, False):
        eng = homeseek.load("tiny", dtype=torch.float32, max_context=128, expert_slots=20)
        cfg = eng.cfg
        eng.scheduler.routing = UniformRouting(cfg.n_routed_experts, cfg.num_experts_per_tok, 3)
        eng.scheduler.prefetch = prefetch
        runs[prefetch] = (eng.session().forward(ids), eng.scheduler.prefetched_experts)
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[False][1] == 0 and runs[True][1] > 0


def test_a_scan_under_a_routing_override_takes_every_expert_of_a_hash_layer():
    """The experts a scan prefetches at a hash layer: the step's ids' (the table's), but all of
    them under a routing override, which draws a hash layer's ids too."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    sched, cfg = eng.scheduler, eng.cfg
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_hash_layer(i))
    ids = [5, 6]
    sched.begin_step(ids, prefetch_hash=False)
    table = sched._scan_experts(layer)
    assert list(table) == eng.experts.hash_experts(layer, ids)
    assert len(table) < cfg.n_routed_experts
    sched.routing = UniformRouting(cfg.n_routed_experts, cfg.num_experts_per_tok, 0)
    sched.begin_step(ids)
    assert list(sched._scan_experts(layer)) == list(range(cfg.n_routed_experts))


def test_the_scheduler_waits_for_ids_still_arriving_on_the_host():
    """`Scheduler.layer(..., ready=event)`: sel is a host copy still arriving; the scheduler
    waits on its event once, then uses it as it is."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)

    class Arriving:
        waits = 0

        def synchronize(self) -> None:
            self.waits += 1

    sel = torch.tensor([[0, 3], [3, 5]])
    ev = Arriving()
    waves = list(eng.scheduler.layer(2, sel, ready=ev))
    assert ev.waits == 1
    assert [sorted(w[1]) for w in waves] == [[0, 3, 5]]
    assert all(torch.equal(w[0], sel) for w in waves)


def test_a_scans_load_queues_its_host_cache_hits_before_waiting_for_the_reads_ahead():
    """A scan's background load (`_sources` with the reads ahead of its ring half): the
    host-cache hits come out before the reads ahead are waited for, so the copy stream has
    their copies while the reads finish; the records read ahead come out once they are done,
    and the wait is counted."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    store = eng.experts
    hits = {(3, 0): 5, (3, 2): 6}
    store._host_hit = lambda key: (torch.zeros(1), hits[key]) if key in hits else None
    store.host = RecordBuffer(eng.cfg, 2, "cpu")  # the ring slot the read ahead landed in: 1
    store._ahead = {(3, 1): 1}
    ahead = concurrent.futures.Future()
    waited0 = store.counters.await_s
    out = store._sources([(10, (3, 0)), (11, (3, 1)), (12, (3, 2))], True, ahead)
    assert [next(out)[0], next(out)[0]] == [10, 12] and not ahead.done()
    threading.Timer(0.05, ahead.set_result, (None,)).start()
    s, src, h = next(out)
    assert ahead.done() and (s, h) == (11, 1) and src.data_ptr() == store.host.row(1).data_ptr()
    assert next(out, None) is None
    assert store.counters.await_s - waited0 > 0.02 and store._ahead == {}


def test_slot_table_looks_every_id_up():
    """The wave's slot table: each id's slot, -1 for ids not in the wave and for -1 itself."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    g = torch.Generator().manual_seed(0)
    sel = torch.randint(-1, eng.cfg.n_routed_experts, (300, 2), generator=g)
    slot_of = {e: 17 - e for e in range(0, eng.cfg.n_routed_experts, 2)}
    want = [[slot_of.get(e, -1) for e in row] for row in sel.tolist()]
    table = eng.scheduler.slot_table(sel, slot_of, torch.device("cpu"))
    assert table.dtype == torch.int32 and table.tolist() == want
    assert eng.scheduler.slot_table(sel, {}, torch.device("cpu")).eq(-1).all()


def test_pinned_ring_hands_buffers_out_in_turn():
    """PinnedRing: buffers in turn, the same memory when one comes round again (grown only when
    too small), a typed view of the size asked for; off CUDA no events."""
    from homeseek.experts import PinnedRing

    ring = PinnedRing(3, pin=False)
    a = ring.tensor((5, 6), torch.int64)
    assert a.shape == (5, 6) and a.dtype == torch.int64 and ring.used(None) is None
    a[:] = 7
    b, c = ring.take(100), ring.take(9000)
    assert ring.created == 3 and b.numel() == 100 and c.numel() == 9000
    again = ring.tensor((5, 6), torch.int64)  # buffer 0 again, still 4 KiB: no new memory
    assert again.data_ptr() == a.data_ptr() and again.eq(7).all() and ring.created == 3
    assert ring.take(100).data_ptr() == b.data_ptr()
    assert ring.take(20000).numel() == 20000 and ring.created == 4  # buffer 2 grew
    t = ring.tensor((2, 3), torch.int32)
    t.numpy()[...] = np.arange(6).reshape(2, 3)
    assert t.tolist() == [[0, 1, 2], [3, 4, 5]]
    ring.at_least(5)  # two more buffers in turn before buffer 0 comes round again
    took = [ring.take(10).data_ptr() for _ in range(5)]
    assert len(set(took)) == 5 and ring.created == 6
    with pytest.raises(ValueError, match="at least 1"):
        PinnedRing(0)


def test_experts_of_a_step():
    """The distinct experts of a step's ids, sorted, for a few ids and for a long chunk's."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    g = torch.Generator().manual_seed(1)
    for T in (1, 4, 300):
        sel = torch.randint(0, eng.cfg.n_routed_experts, (T, 2), generator=g)
        assert eng.scheduler.experts_of(sel) == sorted(set(sel.flatten().tolist()))
    sel = torch.tensor([[3, 5]] * 100)
    assert eng.scheduler.experts_of(sel) == [3, 5]


def test_a_request_never_evicts_its_own_hits():
    """ensure_resident protects a request's hits before it admits its misses: a miss early in
    the list does not evict an entry later in it (which would cost a second copy, and could be
    the slot decode's B is reading), prefetched or not; each lookup is counted once."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64, expert_slots=3,
                        eviction="lru")  # fmt: skip
    store, cfg = eng.experts, eng.cfg
    layer = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_hash_layer(i))
    store.reset_gpu()
    for e in (0, 1):
        store.begin_layer()
        store.ensure_resident(layer, [e])
    store.begin_layer()
    store.ensure_resident(layer, [5])  # a prefetch: counted now, not by the layer's request
    store.prefetched.add((layer, 5))
    store.gpu.lookup((layer, 0))
    store.gpu.lookup((layer, 1))  # (layer, 5) is now the least recently used
    store.begin_layer()
    c0, h0 = store.counters.lookups, store.counters.host_hits + store.counters.disk_loads
    slots = store.ensure_resident(layer, [3, 5])  # 3 misses; 5, the LRU entry, is kept
    assert store.gpu.slot_of[(layer, 5)] == slots[1] and store.gpu.slot_of[(layer, 3)] == slots[0]
    assert (layer, 0) not in store.gpu.slot_of  # the victim: the LRU entry not in the request
    assert store.counters.lookups - c0 == 1  # 5 was counted by its prefetch
    assert store.counters.host_hits + store.counters.disk_loads - h0 == 1  # one copy: 3's
    assert (layer, 5) not in store.prefetched
    store.begin_layer()
    store.ensure_resident(layer, [5])  # a hit, counted
    assert store.counters.lookups - c0 == 2
    c = store.counters
    assert c.lookups == c.gpu_hits + c.host_hits + c.disk_loads + c.cpu_lane


def test_a_host_slot_is_refilled_only_after_its_last_copy_to_the_gpu():
    """Copies from the pinned host cache are asynchronous, and a prefetch's are not waited for
    before the next layer's misses take host-cache slots: reading a record into a slot whose
    entry is evicted first waits for the last copy from it (here a stand-in event)."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    store, cfg = eng.experts, eng.cfg
    store.host = RecordBuffer(cfg, 1, "cpu")
    store.hostres = Residency(1, cfg.num_hidden_layers, LRUPolicy(1))

    class Pending:
        synced = False

        def synchronize(self) -> None:
            self.synced = True

    src, unread, h = store._below_source((1, 5), False)
    assert unread and h == 0
    pending = store._host_copy[0] = Pending()  # as `_copy_to_slot` notes a copy from it
    store.begin_layer()
    src, unread, h = store._below_source((1, 6), False)  # evicts (1, 5): its copy may still read
    assert unread and h == 0 and pending.synced
    assert 0 not in store._host_copy


def test_a_failed_read_leaves_no_piece_writing(monkeypatch):
    """Reads of the tier below run in pieces on the reader threads: when one fails, the others
    have all ended before the error leaves `_read_parallel` (the slots they write into are
    handed out again at once)."""
    import time

    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    store = eng.experts
    done = []

    def pieces(dst, key, rows):
        def slow(i=key[1]):
            time.sleep(0.05)
            done.append(i)

        def fail():
            raise OSError("shard read failed")

        return [fail] if key[1] == 0 else [slow]

    monkeypatch.setattr(store, "_pieces", pieces)
    reads = [(s, (1, e), {}) for s, e in enumerate(range(6))]
    with pytest.raises(OSError, match="shard read failed"):
        list(store._read_parallel(reads))
    assert sorted(done) == [1, 2, 3, 4, 5]


def _cpu_host_tier(store, n_host: int, n_stage: int) -> None:
    """Give a CPU store the host tier a CUDA one has (a cache of n_host records, then a scan ring
    of n_stage), filled in key order as the background filler fills it."""
    cfg = store.cfg
    store.host = RecordBuffer(cfg, n_host + n_stage, "cpu")
    store.hostres = Residency(n_host, cfg.num_hidden_layers, LRUPolicy(n_host))
    store.n_host, store.n_stage = n_host, n_stage
    keys = [(layer, e) for layer in store.layers for e in range(cfg.n_routed_experts)]
    for key in keys[:n_host]:
        s, _ = store.hostres.admit(key)
        store._fill(store.host.view(s), key)


def test_scans_leave_the_host_cache_as_it_was():
    """A scan (a prefill chunk's layers, each asking for every expert) larger than the host
    cache: its reads of the tier below go through the scan ring and are not admitted, so the
    next scan still finds every record the cache held (admitted, LRU evicts exactly the records
    the next scan asks for first and it finds none). The slots get the right records, also when
    a layer reads more records than the ring holds (each ring slot is reused only after the copy
    out of it). A request that is not a scan admits its misses as before."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    store, cfg = eng.experts, eng.cfg
    E, L = cfg.n_routed_experts, cfg.num_hidden_layers
    n_host = E * L // 2
    _cpu_host_tier(store, n_host, 3)  # a layer reads up to E = 8 records through 3 ring slots
    for scan in range(2):
        store.reset_gpu()
        hits0, below0 = store.counters.host_hits, store.counters.disk_loads
        for layer in range(L):
            store.begin_layer()
            slots = store.ensure_resident(layer, list(range(E)), scan=True)
            for e, s in enumerate(slots):
                want = store._disk_record((layer, e))
                got = store.pool.view(s)
                assert all(torch.equal(got[k], want[k]) for k in want), (scan, layer, e)
        assert store.counters.host_hits - hits0 == n_host, scan
        assert store.counters.disk_loads - below0 == E * L - n_host, scan
    assert len(store.hostres.slot_of) == n_host
    assert all(key[0] < L // 2 + 1 for key in store.hostres.slot_of)  # the cache as filled
    store.reset_gpu()
    store.begin_layer()
    store.ensure_resident(L - 1, [0, 1])  # not a scan: misses enter the cache
    assert (L - 1, 0) in store.hostres.slot_of and (L - 1, 1) in store.hostres.slot_of


def test_scheduler_marks_host_ranges_only_while_a_profiler_records():
    """The layer's id read is a named range for tools/prefill_profile.py while a profiler
    records, and costs nothing (no record_function) otherwise: it sits on decode's path."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    assert isinstance(experts.marker("hs::ids"), contextlib.nullcontext)
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.session().forward([1, 2, 3])
    assert any(ev.name == "hs::ids" for ev in prof.events())


def _host_tier_store(monkeypatch, fail_pin: bool):
    """A tiny engine's store given a 4-record host tier as on CUDA; pinning it fails with
    `fail_pin`, else it is a plain host buffer (nothing to pin on a CPU-only machine)."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    store = eng.experts
    store.n_host = 4
    store.hostres = Residency(4, eng.cfg.num_hidden_layers, make_policy("lru", 4), 0)

    def buffer(*args, pin: bool = False, **kwargs):
        if fail_pin:
            raise RuntimeError("CUDA error: out of memory")
        return RecordBuffer(*args, **kwargs)

    monkeypatch.setattr(experts, "RecordBuffer", buffer)
    return store


def _failed_fill(store, warned: str, raised: str) -> None:
    """The fill thread warns `warned` and join_host_fill raises `raised` (regexes)."""
    with pytest.warns(RuntimeWarning, match=warned):
        store.start_host_fill()
        store._filler.join()
    with pytest.raises(ConfigError, match=raised):
        store.join_host_fill()


def test_host_cache_that_cannot_be_pinned_is_reported(monkeypatch):
    """Pinning the host cache runs on a thread: when it fails (out of pinned memory) the engine
    keeps reading the tier below, warns, and join_host_fill says why (it used to die silently,
    leaving every prefill ~5x slower)."""
    store = _host_tier_store(monkeypatch, fail_pin=True)
    _failed_fill(store, "pinning the host expert cache", r"4 records.*out of memory.*host-mem-gb")
    assert store.host is None


def test_host_cache_fill_that_fails_forgets_the_record_and_says_why(monkeypatch):
    """A record that cannot be read while the host cache fills (a bad shard) stops the fill:
    its slot is not left admitted without data, and join_host_fill says which and why."""
    store = _host_tier_store(monkeypatch, fail_pin=False)
    read, calls = store._fill, []

    def fill(dst, key):
        calls.append(key)
        if len(calls) == 3:
            raise OSError("shard 2: read error")
        read(dst, key)

    monkeypatch.setattr(store, "_fill", fill)
    _failed_fill(store, "stopped at", r"stopped at \(2, 0\) after 2 records: shard 2")
    assert set(store.hostres.slot_of) == {(0, 0), (1, 0)}


def test_host_cache_fill_spreads_over_the_layers(monkeypatch):
    """A host cache smaller than the model holds the same share of every layer's records (a
    prefill's reads of the tier below then fall evenly on its layers, not all on the last)."""
    store = _host_tier_store(monkeypatch, fail_pin=False)
    n_layers = len(store.layers)
    n = 2 * n_layers + 1  # two records of every layer, and one more
    store.n_host = n
    store.hostres = Residency(n, n_layers, make_policy("lru", n), 0)
    store.start_host_fill()
    store.join_host_fill()
    per_layer = [sum(k[0] == layer for k in store.hostres.slot_of) for layer in store.layers]
    assert sum(per_layer) == n and max(per_layer) - min(per_layer) == 1, per_layer
    assert store.hostres.slot_of.keys() == {(L, e) for L in store.layers for e in (0, 1)} | {
        (store.layers[0], 2)
    }
