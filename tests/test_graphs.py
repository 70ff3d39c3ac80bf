"""The CUDA-graph mechanism (homeseek.graphs): dispatcher, errors and import hygiene on CPU;
capture, replay, pool sharing, debug checks, failure recovery and timing on CUDA (marked gpu)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from homeseek.graphs import (
    CAPTURE_FIX,
    CaptureError,
    GraphCounters,
    GraphedStep,
    GraphPool,
    StaleInputError,
    StaticInputs,
    format_capture_error,
    graphs_available,
    measure_graph_pool_bytes,
    measure_memory,
)
from homeseek.graphs import capture as capture_mod

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def gpu(fn):
    """Marks a test as needing CUDA (skipped without it)."""
    fn = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")(fn)
    return pytest.mark.gpu(fn)


# --- CPU -----------------------------------------------------------------------------------------


def test_dispatcher_without_pool_runs_eagerly():
    x = torch.arange(4.0)
    out = torch.zeros(4)
    steps = GraphedStep(None)
    steps.register(("A", 0, 4), lambda: out.copy_(x * 2), inputs={"x": x})
    steps.register(("B", 0, 4), lambda: out.add_(1))
    assert steps.capture(("A", 0, 4)) is False  # no pool: nothing to capture, no error
    assert steps.capture_all() == [("A", 0, 4), ("B", 0, 4)]
    assert not steps.can_run(("A", 0, 4))
    for _ in range(3):
        steps(("A", 0, 4))
        steps.step(("B", 0, 4))
    assert torch.equal(out, x * 2 + 1)
    assert steps.counters.eager_fallbacks == 6 and steps.counters.replays == 0
    assert steps.fallbacks == {("A", 0, 4): 3, ("B", 0, 4): 3}
    assert steps.failures == {} and steps.graphs == {}


def test_dispatcher_disabled_and_eager_override():
    steps = GraphedStep(None, enabled=False)
    steps.register("k", lambda: "registered")
    assert steps("k") == "registered"
    assert steps("k", lambda: "override") == "override"  # e.g. a T no graph was captured for
    assert steps("other", lambda: 7) == 7
    assert steps.counters.eager_fallbacks == 3
    with pytest.raises(KeyError, match="no function registered"):
        steps("missing")
    c = GraphCounters(captured=2, replays=5)
    assert c.as_dict()["replays"] == 5 and set(c.as_dict()) >= {"captured", "capture_s"}


def test_graph_pool_refuses_cpu():
    assert not graphs_available("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        GraphPool("cpu")


def test_capture_error_message():
    cause = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    e = CaptureError("A/3/1", cause)
    msg = str(e)
    assert isinstance(e, RuntimeError) and e.name == "A/3/1" and e.cause is cause
    assert msg.startswith("CUDA-graph capture of 'A/3/1' failed: RuntimeError: CUDA error")
    assert "Likely: a call that is illegal while a stream captures" in msg
    for cause_text in (".item()", ".tolist()", "int(t)", "torch.nonzero", "print(t)"):
        assert cause_text in msg
    assert "pageable" in msg and "pinned" in msg
    assert CAPTURE_FIX in msg and "pass out=" in msg
    assert "left usable" in msg
    inval = format_capture_error("H", "operation failed due to a previous error during capture")
    assert "Likely: an earlier call" in inval
    plain = format_capture_error("B/0/1", ValueError("shape mismatch"))
    assert "Likely" not in plain and "ValueError: shape mismatch" in plain


def test_static_inputs_catch_rebinding_and_storage_swaps():
    x, pos = torch.zeros(4, 8), torch.zeros(1, dtype=torch.int64)
    ins = {"x": x, "pos": pos}
    check = StaticInputs("A/0/4", ins)
    check.record()
    x.add_(1)  # writing into the captured buffer is the contract
    pos.fill_(3)
    check.verify()
    ins["x"] = torch.ones(4, 8)  # rebinding is not
    with pytest.raises(StaleInputError, match=r"'A/0/4': input 'x' .*data pointer.*copy_"):
        check.verify()
    ins["x"] = x
    check.verify()
    pos.resize_(2)
    with pytest.raises(StaleInputError, match=r"input 'pos' .*shape \(1,\) -> \(2,\)"):
        check.verify()
    del ins["pos"]
    with pytest.raises(StaleInputError, match="'pos' is gone"):
        check.verify()
    ins["pos"] = pos
    check.record()  # a fresh capture records the buffers as they are now
    check.verify()
    ins["new"] = torch.zeros(1)
    with pytest.raises(StaleInputError, match="added after capture"):
        check.verify()


def _imported_modules(path: Path) -> set[tuple[int, str]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(0, a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add((node.level, node.module or ""))
    return found


def test_graphs_imports_only_torch_and_stdlib():
    files = sorted((ROOT / "graphs").glob("*.py"))
    assert files
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for f in files:
        for level, mod in _imported_modules(f):
            top = mod.split(".")[0]
            if level == 0:
                assert top in allowed, f"{f.name} imports {mod}"
            else:
                assert level == 1, f"{f.name} imports from outside the package: {'.' * level}{mod}"
    # And at run time: graphs imported as a top-level package pulls in neither homeseek nor kernels.
    code = (
        "import sys, graphs\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('homeseek', 'kernels'))\n"
        "print(bad)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.fixture
def pool():
    p = GraphPool("cuda")
    yield p
    p.close()


@gpu
def test_capture_replay_matches_eager(pool):
    x = torch.randn(8, 64, device="cuda")
    w = torch.randn(64, 32, device="cuda")
    b = torch.randn(32, device="cuda")
    out = torch.empty(8, 32, device="cuda")

    def returns() -> torch.Tensor:
        return torch.relu(x * 2 + 1) @ w + b

    def writes() -> None:
        torch.matmul(torch.sigmoid(x - 0.5), w, out=out)
        out.mul_(3).add_(b)

    ins = {"x": x}
    g1 = pool.capture(returns, name="returns", inputs=ins, warmup=2)
    g2 = pool.capture(writes, name="writes", inputs=ins, warmup=2)
    first = g1.replay()
    for _ in range(3):
        x.copy_(torch.randn(8, 64, device="cuda"))  # new data into the captured buffer
        y = g1.replay()
        assert y is first  # the same static output object every replay
        torch.testing.assert_close(y, returns(), rtol=1e-4, atol=1e-4)
        assert g2.replay() is None
        torch.testing.assert_close(out, torch.sigmoid(x - 0.5) @ w * 3 + b, rtol=1e-4, atol=1e-4)
    assert g1.replays == 4 and g2.replays == 3
    c = pool.counters
    assert c.captured == 2 and c.replays == 7 and c.capture_failures == 0
    assert c.capture_s > 0 and c.warmup_s > 0 and g1.capture_s > 0
    assert pool.graphs == [g1, g2]


@gpu
def test_many_graphs_one_pool_with_host_work_between(pool):
    """2 x 12 'layer' graphs in one pool: A writes expert ids, the host reads them and writes a
    slot table (and copies experts into slots), B reads the slot table. Small integers keep every
    sum exact in fp32, so the graph path must equal the eager path bit for bit."""
    L, T, D, E, S = 12, 4, 32, 16, 6
    gen = torch.Generator().manual_seed(0)

    def ints(*shape: int, lo: int, hi: int) -> torch.Tensor:
        return torch.randint(lo, hi + 1, shape, generator=gen).float().cuda()

    wa = [ints(D, E, lo=-2, hi=2) for _ in range(L)]
    bias = [ints(D, lo=-3, hi=3) for _ in range(L)]
    experts = ints(E, D, D, lo=-1, hi=1)  # every expert (the "host tier")
    slot_pool = torch.zeros(S, D, D, device="cuda")  # the resident ones
    x = torch.zeros(T, D, device="cuda")  # residual stream
    ids = torch.zeros(T, dtype=torch.int64, device="cuda")  # written by A
    slots = torch.zeros(T, dtype=torch.int64, device="cuda")  # written by the host

    def seg_a(layer: int):
        def fn() -> None:
            ids.copy_((x @ wa[layer]).argmax(dim=-1))

        return fn

    def seg_b(layer: int):
        def fn() -> None:
            w = torch.index_select(slot_pool, 0, slots)  # [T, D, D], gather by device index
            y = torch.bmm(x.unsqueeze(1), w).squeeze(1) + bias[layer]
            x.copy_(torch.remainder(x + y, 7) - 3)  # back to small integers

        return fn

    def schedule(layer: int) -> None:
        # The scheduler: one host sync to read the ids, residency, then the slot table.
        want = ids.tolist()
        resident = sorted(set(want))
        table = []
        for e in want:
            s = (resident.index(e) + layer) % S
            slot_pool[s].copy_(experts[e])
            table.append(s)
        slots.copy_(torch.tensor(table, dtype=torch.int64))

    steps = GraphedStep(pool)
    for layer in range(L):
        steps.register(("A", layer, T), seg_a(layer), inputs={"x": x})
        steps.register(("B", layer, T), seg_b(layer), inputs={"slots": slots, "x": x})
    assert steps.capture_all(warmup=1) == []
    assert all(steps.can_run(k) for k in steps.fns)

    def decode(x0: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        x.copy_(x0)
        routes = []
        for layer in range(L):
            steps(("A", layer, T))
            schedule(layer)
            routes.append(ids.tolist())
            steps(("B", layer, T))
        return x.clone(), routes

    for _ in range(3):
        x0 = ints(T, D, lo=-3, hi=3)
        steps.enabled = True
        graph_x, graph_routes = decode(x0)
        steps.enabled = False
        eager_x, eager_routes = decode(x0)
        assert graph_routes == eager_routes
        assert torch.equal(graph_x, eager_x)
    assert len({e for r in graph_routes for e in r}) > 1  # the slot table did route
    c = steps.counters
    assert c.captured == 2 * L and c.replays == 3 * 2 * L and c.eager_fallbacks == 3 * 2 * L
    assert pool.pool_bytes() > 0 and pool.pool_bytes_exact() > 0


@gpu
def test_debug_mode_catches_replaced_input(pool):
    ins = {"x": torch.randn(16, 16, device="cuda")}
    g = pool.capture(lambda: ins["x"] @ ins["x"], name="A/0/16", inputs=ins, debug=True)
    ins["x"].copy_(torch.eye(16, device="cuda"))
    torch.testing.assert_close(g.replay(), torch.eye(16, device="cuda"))
    ins["x"] = torch.randn(16, 16, device="cuda")  # replaced instead of copied into
    with pytest.raises(StaleInputError, match=r"'A/0/16': input 'x' .*data pointer"):
        g.replay()
    quiet = pool.capture(lambda: ins["x"] + 1, name="no-debug", inputs=ins)
    ins["x"] = torch.randn(16, 16, device="cuda")
    quiet.replay()  # debug off: no check (and the graph reads the old buffer)
    with pytest.raises(StaleInputError):
        quiet.check_inputs()


@gpu
def test_item_in_capture_raises_and_eager_still_works(pool):
    x = torch.randn(32, device="cuda")
    out = torch.empty_like(x)

    def bad() -> None:
        out.copy_(x * x.sum().item())  # a host sync: illegal while capturing

    with pytest.raises(CaptureError) as info:
        pool.capture(bad, name="A/7/1", inputs={"x": x}, warmup=1)
    msg = str(info.value)
    assert "'A/7/1'" in msg and ".item()" in msg and CAPTURE_FIX in msg
    assert info.value.name == "A/7/1" and info.value.__cause__ is not None
    assert pool.counters.capture_failures == 1 and pool.counters.captured == 0
    assert pool.graphs == []
    with torch.cuda.stream(pool.stream):
        assert not torch.cuda.is_current_stream_capturing()

    # The device, the stream and the pool are still usable: eager runs, the pool captures again.
    bad()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, x * x.sum())
    good = pool.capture(lambda: x * 3, name="good", warmup=1)
    torch.testing.assert_close(good.replay(), x * 3)

    # The dispatcher keeps the failure and runs the key eagerly.
    steps = GraphedStep(pool)
    steps.register("bad", bad)
    steps.register("good", lambda: out.copy_(x + 1))
    assert steps.capture_all(warmup=1) == ["bad"]
    assert isinstance(steps.failures["bad"], CaptureError)
    assert not steps.can_run("bad") and steps.can_run("good")
    steps("bad")
    torch.testing.assert_close(out, x * x.sum())
    steps("good")
    torch.testing.assert_close(out, x + 1)
    assert steps.fallbacks == {"bad": 1} and pool.counters.capture_failures == 2
    with pytest.raises(CaptureError):
        steps.capture("bad", strict=True)


@gpu
def test_replay_before_capture_and_double_capture(pool):
    g = pool.graph(lambda: None, name="empty")
    with pytest.raises(RuntimeError, match="without a successful capture"):
        g.replay()
    x = torch.ones(4, device="cuda")
    g2 = pool.capture(lambda: x * 2, name="twice", warmup=1)
    with pytest.raises(RuntimeError, match="already captured"):
        g2.capture()


@gpu
def test_record_events_times_each_replay(pool):
    a = torch.randn(512, 512, device="cuda")
    timed = pool.capture(lambda: a @ a, name="H", record_events=True, warmup=1)
    untimed = pool.capture(lambda: a + a, name="plain", warmup=1)
    for _ in range(3):
        timed.replay()
        untimed.replay()
    torch.cuda.synchronize()
    assert untimed.pending_events == []
    times = timed.drain_times_ms()
    assert len(times) == 3 and all(t > 0 for t in times)
    assert timed.drain_times_ms() == []
    timed.replay()
    assert list(pool.drain_times_ms()) == ["H"]


def _private_pool_segments() -> int:
    """Segments the caching allocator holds for graph pools (the default pool's id is (0, 0))."""
    return sum(1 for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) != (0, 0))


@gpu
def test_measure_graph_pool_bytes_frees_its_pool():
    x = torch.randn(256, 256, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = _private_pool_segments()
    n = measure_graph_pool_bytes({"a": lambda: x @ x, "b": lambda: (x @ x).relu() + 1})
    assert n >= 256 * 256 * 4
    if capture_mod._torch_c("_cuda_releasePool") is not None:
        assert _private_pool_segments() <= before  # the throwaway pool went back to the driver


@gpu
def test_measure_memory_reports_growth():
    with measure_memory("cuda") as m:
        t = torch.empty(1 << 20, dtype=torch.float32, device="cuda")  # 4 MiB
    # A cached block may be handed out unsplit, so "at least".
    assert m.allocated_bytes >= 4 << 20 and m.peak_allocated_bytes >= 4 << 20
    assert m.reserved_bytes >= 0 and m.device.type == "cuda"
    del t
