"""The CPU lane's host side (homeseek/cpu_lane.py, Scheduler._split): how misses are split
between the copy lane and the CPU, the hand-off of records where they lie, the modes and flags.
The decode path with the lane runs on CUDA (tests/test_gpu_decode.py)."""

from __future__ import annotations

import pytest
import torch

import homeseek
from homeseek.config import ConfigError, RuntimeConfig
from homeseek.cpu_lane import CpuLane, lane_status
from homeseek.experts import record_bytes
from homeseek.kernels import cpu_experts as ce

needs_cc = pytest.mark.skipif(
    ce._compiler() is None, reason="no C compiler: the CPU lane's kernel cannot be built"
)


@pytest.fixture(scope="module")
def eng():
    return homeseek.load("tiny", dtype=torch.float32, max_context=64)


@pytest.fixture()
def lane(eng):
    lane = CpuLane(eng.cfg, "cpu", record_bytes(eng.cfg), torch.float32, True, threads=2)
    yield lane
    lane.close()


def test_modes_and_their_errors():
    assert lane_status("off", "cuda") == (False, "off")
    on, why = lane_status("auto", "cpu")
    assert not on and "CPU engine" in why
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        lane_status("on", "cpu")
    with pytest.raises(ConfigError, match="cpu_lane must be"):
        RuntimeConfig(cpu_lane="sometimes")
    with pytest.raises(ConfigError, match="cpu_threads"):
        RuntimeConfig(cpu_threads=0)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        homeseek.load("tiny", cpu_lane="on", max_context=64)


@needs_cc
def test_split_moves_the_dearest_copies_while_both_lanes_gain(lane):
    lane.h2d_rate, lane.read_rate = 1e9, 1e9  # a copy: r / 1e9 s, a read below as long again
    t_copy = lane.copy_cost(False)
    assert lane.copy_cost(True) == pytest.approx(2 * t_copy)
    lane.copy_free_at = 0.0
    lane.t_cpu = 100 * t_copy  # a slow CPU: everything is copied
    assert lane.split([(1, False), (2, True)]) == []
    lane.t_cpu = t_copy  # as fast as a copy: half of four host records each way
    assert len(lane.split([(e, False) for e in range(4)])) == 2
    lane.t_cpu = 1.5 * t_copy  # records below the host cache cost two copies: they go first
    assert lane.split([(1, False), (2, True), (3, False)]) == [2]
    lane.fixed_share = 1.0
    assert sorted(lane.split([(1, False), (2, False)])) == [1, 2]


@needs_cc
def test_split_hands_records_where_they_lie_to_the_cpu(eng, lane):
    """With every miss sent to the CPU, a layer's experts leave the wave and the CPU job's sum
    equals the twin over the stored records (read in place: w1 and w3 apart)."""
    sched, store, cfg = eng.scheduler, eng.experts, eng.cfg
    lane.fixed_share = 1.0
    sched.lane = lane
    try:
        g = torch.Generator().manual_seed(0)
        layer = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_hash_layer(i))
        store.reset_gpu()
        sel = torch.tensor([[1, 4]])
        u = torch.randn(1, cfg.hidden_size, generator=g)
        w = torch.rand(1, 2, generator=g) + 0.1
        c0 = store.counters.cpu_lane
        waves = list(sched.layer(layer, sel, lane_input=(u, w)))
        assert [(list(s.shape), slot_of, last) for s, slot_of, last in waves] == [
            ([1, 2], {}, True)
        ]
        got = sched.cpu_job.result()
        assert store.counters.cpu_lane - c0 == 2
        recs = [store._disk_record((layer, e)) for e in (1, 4)]
        want = ce.fp4_experts_cpu_ref(u, w, recs, cfg.swiglu_limit, True, torch.float32)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
        assert lane.counters.experts == 2 and lane.t_cpu is not None
    finally:
        sched.lane = None
        sched.cpu_job = None


def test_bench_takes_several_lane_modes():
    from homeseek.cli import build_parser

    args = build_parser().parse_args(["bench", "--cpu-lane", "off,auto", "--prefetch", "off"])
    assert args.cpu_lane == ("off", "auto") and args.prefetch == (False,)
    args = build_parser().parse_args(["bench", "--prefetch", "on,off,on"])
    assert args.prefetch == (True, False)
    for bad in (["--cpu-lane", "sometimes"], ["--prefetch", "maybe"], ["--prefetch", ","]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", *bad])
    gen = build_parser().parse_args(["generate", "--cpu-lane", "off", "--cpu-threads", "3", "x"])
    assert gen.cpu_lane == "off" and gen.cpu_threads == 3


@needs_cc
def test_a_failing_layer_waits_for_its_cpu_job(eng, lane, monkeypatch):
    """When the copies of a layer fail after the CPU lane started on its share, the error
    leaves the layer only once the lane is done with the records it was handed."""
    sched, store, cfg = eng.scheduler, eng.experts, eng.cfg
    lane.fixed_share = 0.5
    sched.lane = lane
    store.reset_gpu()

    def boom(layer, experts, then_wait=False, scan=False):
        raise RuntimeError("every slot is in use")

    monkeypatch.setattr(store, "ensure_resident", boom)
    layer = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_hash_layer(i))
    u, w = torch.randn(1, cfg.hidden_size), torch.rand(1, 2) + 0.1
    try:
        with pytest.raises(RuntimeError, match="in use"):
            list(sched.layer(layer, torch.tensor([[1, 4]]), lane_input=(u, w)))
        assert sched.cpu_job is None and lane.counters.experts == 1  # it ran to the end
    finally:
        sched.lane = None


@needs_cc
def test_host_cache_records_are_handed_over_in_place_and_protected(eng, lane):
    """A record the pinned host cache holds goes to the CPU lane as views of that cache (no
    copy) and stays protected from eviction until the next layer's request."""
    from homeseek.experts import RecordBuffer, Residency, make_policy

    store, cfg = eng.experts, eng.cfg
    layer = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_hash_layer(i))
    old = store.host, store.hostres
    store.host = RecordBuffer(cfg, 2, "cpu")
    store.hostres = Residency(2, cfg.num_hidden_layers + 1, make_policy("lru", 2, 1), 0)
    try:
        s, _ = store.hostres.admit((layer, 3))
        store._fill(store.host.view(s), (layer, 3))
        assert not store.below_host((layer, 3)) and store.below_host((layer, 4))
        parts, below = store.in_place((layer, 3))
        assert not below and store.hostres.protected[s]
        assert parts["w13_q"][0].data_ptr() == store.host.view(s)["w13_q"].data_ptr()
        parts4, below4 = store.in_place((layer, 4))  # not in the cache: the tier below, in place
        assert below4 and len(parts4["w13_q"]) == 2  # w1 and w3 as stored
        u, w = torch.randn(1, cfg.hidden_size), torch.rand(1, 2) + 0.1
        got = lane.kernel.run(u, w, [parts, parts4], cfg.swiglu_limit, True, torch.float32)
        recs = [store._disk_record((layer, e)) for e in (3, 4)]
        want = ce.fp4_experts_cpu_ref(u, w, recs, cfg.swiglu_limit, True, torch.float32)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
        store.begin_layer()
        assert not store.hostres.protected[s]
    finally:
        store.host, store.hostres = old


@needs_cc
def test_a_job_sets_its_flag_done_or_failed_and_a_late_one_is_flagged(eng, lane, monkeypatch):
    """The GPU hand-off's signal (kernels/handoff.py): each job writes its sequence number into
    its result row's flag once its sum is written, also when it fails; a job that ends later
    after its submission than the GPU's wait is sure to last is flagged (`handoff_late`)."""
    cfg, store = eng.cfg, eng.experts
    layer = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_hash_layer(i))
    u, w = torch.randn(1, cfg.hidden_size), torch.rand(1, 1) + 0.1
    records = [store.in_place((layer, 1))[0]]
    lane.submit(u, w, records).result()
    assert int(lane.flag[lane.i]) == lane.seq == 1 and not lane.handoff_late
    run = lane.kernel.run

    def broken(*args, **kwargs):
        raise OSError("lane kernel failed")

    monkeypatch.setattr(lane.kernel, "run", broken)
    with pytest.raises(OSError):
        lane.submit(u, w, records).result()
    assert int(lane.flag[lane.i]) == lane.seq == 2
    monkeypatch.setattr(lane.kernel, "run", run)
    monkeypatch.setattr("homeseek.cpu_lane.MAX_POLLS", 0)  # any job outlasts a wait of 0 polls
    lane.submit(u, w, records).result()
    assert lane.handoff_late


def test_lane_handoff_modes(eng, monkeypatch):
    runner = eng.runner
    assert runner.lane_handoff == "host"
    with pytest.raises(ValueError, match="lane_handoff must be one of host, gpu"):
        runner.lane_handoff = "sometimes"
    monkeypatch.setattr("homeseek.runner.platform.machine", lambda: "aarch64")
    with pytest.raises(ValueError, match="x86-64"):
        runner.lane_handoff = "gpu"
    assert runner.lane_handoff == "host"


def test_a_late_job_fails_the_step_only_when_the_gpu_waited_for_it(eng, monkeypatch):
    """`Runner._lane_results`: a job flagged late raises only among the jobs handed off on the
    GPU (the host hand-off had no GPU wait to outlast); the flag is cleared either way."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    runner = eng.runner
    lane = SimpleNamespace(handoff_late=True)
    monkeypatch.setattr(eng.scheduler, "lane", lane)
    runner._lane_results()  # no job handed off this step
    assert not lane.handoff_late
    done: Future = Future()
    done.set_result(None)
    lane.handoff_late = True
    runner._lane_jobs = [done]
    with pytest.raises(RuntimeError, match="outlasted the GPU's wait"):
        runner._lane_results()
    assert not lane.handoff_late and not runner._lane_jobs
