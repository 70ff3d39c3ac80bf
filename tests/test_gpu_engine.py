"""The engine on CUDA: reference path == CPU, Triton kernel path close to it, the tiered expert
store exact under eviction (tests marked gpu; skipped without CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import homeseek
from homeseek.config import PRESETS
from homeseek.experts import device_view, record_bytes

from oracle import compare

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return torch.randint(0, 129280, (160,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    # The comparisons are about the engine, not about TF32 matmuls in torch.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _load(device: str, **kw):
    kw.setdefault("dtype", torch.float32)
    return homeseek.load("tiny", device=device, max_context=256, **kw)


def _prefill_and_decode(eng, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    full = eng.session().forward(ids).cpu()
    sess = eng.session()
    dec = torch.stack([sess.decode(i) for i in ids]).cpu()
    return full, dec


@pytest.mark.parametrize("quant_sim", [False, True])
def test_cuda_reference_path_matches_cpu(ids, quant_sim, parity_report):
    ref = _load("cpu", quant_sim=quant_sim).session().forward(ids)
    full, dec = _prefill_and_decode(_load("cuda", quant_sim=quant_sim, kernels=False), ids)
    for mode, x in (("prefill", full), ("decode", dec)):
        stats = compare(x, ref)
        parity_report("tiny", f"cuda ref {mode} sim={quant_sim}", stats)
        assert stats["max_err_rel"] < 1e-3 and stats["argmax_agree_pct"] >= 99, stats


@pytest.mark.parametrize("quant_sim", [False, True])
def test_cuda_kernel_path_close_to_reference(ids, quant_sim, parity_report):
    ref = _load("cuda", quant_sim=quant_sim, kernels=False).session().forward(ids).cpu()
    full, dec = _prefill_and_decode(_load("cuda", quant_sim=quant_sim, kernels=True), ids)
    for mode, x in (("prefill", full), ("decode", dec)):
        stats = compare(x, ref)
        parity_report("tiny", f"cuda kernels {mode} sim={quant_sim}", stats)
        # Kernels sum in another order (and tl.dot may use TF32 in the prefill path); the random
        # model amplifies that, so judge by median error and argmax (docs/engine.md §4).
        assert stats["median_err_rel"] < 0.05 and stats["argmax_agree_pct"] >= 90, stats


def test_cuda_store_exact_under_eviction(ids):
    """Reference path on CUDA with a 2-slot pool and a pinned host tier == everything resident."""
    full = _load("cuda", kernels=False)
    # a host tier of 12 records: misses also read the tier below it (the reader threads)
    rec_gb = record_bytes(PRESETS["tiny"]()) / 2**30
    small = _load("cuda", kernels=False, expert_slots=2, host_mem_gb=12 * rec_gb)
    small.experts.join_host_fill()
    a = _prefill_and_decode(full, ids[:60])
    b = _prefill_and_decode(small, ids[:60])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = small.experts.counters
    assert c.evictions > 60 and c.lookups == c.gpu_hits + c.host_hits + c.disk_loads
    assert c.host_hits > 0  # misses were served from the pinned host cache
    assert c.disk_loads > 0  # and read from the tier below it (the reader threads)


def test_cuda_scans_keep_the_host_cache(ids):
    """Prefill chunks are scans: with a host cache smaller than the model, a second prompt
    still finds every record the cache held (the reads of the tier below went through the scan
    ring), and the logits are those of a fully resident engine, for pools holding a layer and
    smaller than one (waves); with room for the next layers, their loads run on the background
    thread and the reads of the layer after the next ahead of its request."""
    cfg = PRESETS["tiny"]()
    n_total = cfg.num_hidden_layers * cfg.n_routed_experts
    rec_gb = record_bytes(cfg) / 2**30
    full = _load("cuda", kernels=False).session().forward(ids[:60]).cpu()
    for slots in (2, 3 * cfg.n_routed_experts):
        eng = _load("cuda", kernels=False, expert_slots=slots, host_mem_gb=24 * rec_gb)
        store = eng.experts
        store.join_host_fill()
        assert store.n_stage > 0 and store.n_host + store.n_stage == 24 < n_total
        hits = []
        for _ in range(2):
            c0 = dataclasses.replace(store.counters)
            store.reset_gpu()
            out = eng.session().forward(ids[:60]).cpu()
            assert torch.equal(out, full), slots
            c = store.counters
            hits.append(c.host_hits - c0.host_hits)
            below = c.disk_loads - c0.disk_loads
            assert c.lookups - c0.lookups == hits[-1] + below, slots
        # every cached record the prompt uses (nearly all), both times
        assert hits[0] == hits[1] >= store.n_host - 4, (slots, hits)
        if slots > cfg.n_routed_experts:  # room for the next layer: its reads ran ahead
            assert store.ahead_used > 0


@pytest.mark.parametrize("slots", [12, 24])
def test_cuda_scan_groups_share_the_ring_halves(ids, slots):
    """Groups of scan chunks layer by layer, with a host cache and scan ring smaller than the
    model: the hash layers' loads at step start, each chunk's loads on demand, the next layer's
    loads and the reads ahead of the one after on their own thread, all through the two halves
    of the ring. Every prompt gives the logits of a resident engine prefilling in the same
    chunks and groups bitwise (a record torn by a read into a slot still being copied would
    not; chunked and one-shot prefill differ in the last bits)."""
    cfg = PRESETS["tiny"]()
    rec_gb = record_bytes(cfg) / 2**30
    chunks = dict(kernels=False, prefill_chunk=16, prefill_group=64)
    full = _load("cuda", **chunks).session().forward(ids).cpu()
    eng = _load("cuda", expert_slots=slots, host_mem_gb=28 * rec_gb, **chunks)
    store = eng.experts
    store.join_host_fill()
    assert store.n_stage >= 4
    for _ in range(3):
        store.reset_gpu()
        assert torch.equal(eng.session().forward(ids).cpu(), full), slots


def test_cuda_a_failed_background_read_surfaces_and_forgets_its_slot(ids, monkeypatch):
    """A scan's loads run on a background thread: a read that fails there raises at the
    layer's wait, the slots it did not fill are forgotten, and the next prompt is exact."""
    cfg = PRESETS["tiny"]()
    rec_gb = record_bytes(cfg) / 2**30
    full = _load("cuda", kernels=False).session().forward(ids[:60]).cpu()
    eng = _load("cuda", kernels=False, host_mem_gb=24 * rec_gb)
    store = eng.experts
    store.join_host_fill()
    real = store._read_parallel
    calls = []

    def failing(reads):
        for item in real(reads):
            calls.append(item[0])
            if len(calls) == 2:
                raise OSError("shard read failed")
            yield item

    monkeypatch.setattr(store, "_read_parallel", failing)
    layer = cfg.num_hidden_layers - 1  # the host cache holds the first layers' records
    store.begin_layer()
    experts = list(range(cfg.n_routed_experts))
    slots = store.ensure_resident(layer, experts, then_wait=True, scan=True)
    with pytest.raises(OSError, match="shard read failed"):
        store.wait(slots)
    assert not store._pending
    mapped = store._mapped  # what the device slot map says: only what is resident, where it is
    assert all(
        store.gpu.slot_of.get((int(a), int(b))) == mapped[a, b]
        for a, b in zip(*(mapped >= 0).nonzero(), strict=True)
    )
    resident = [e for e in experts if (layer, e) in store.gpu.slot_of]
    assert 0 < len(resident) < len(experts)  # the hits and the first read arrived
    monkeypatch.setattr(store, "_read_parallel", real)
    assert torch.equal(eng.session().forward(ids[:60]).cpu(), full)


def test_cuda_layer_by_layer_prefill_equals_chunk_by_chunk(ids):
    """Layer by layer (groups of 16-token chunks, each a scan: background loads, the ring,
    reads ahead) gives bitwise the logits of chunk by chunk on CUDA, with a pool of three
    layers and a host cache smaller than the model; every chunk's A first with the ids read
    early (the default) and chunk after chunk alike, a load's host-cache hits queued before its
    reads ahead are waited for (the default) or after, the ids through the runner's pinned ring
    (the default) or blocks of torch's pinned allocator."""
    cfg = PRESETS["tiny"]()
    rec_gb = record_bytes(cfg) / 2**30
    kw = dict(
        kernels=False, prefill_chunk=16, expert_slots=3 * cfg.n_routed_experts,
        host_mem_gb=24 * rec_gb,
    )  # fmt: skip
    out = []
    for group, a_first, hits_first, rings in (
        (0, True, True, True), (64, True, True, True), (64, False, True, True),
        (64, True, False, True), (64, True, True, False),
    ):  # fmt: skip
        eng = _load("cuda", prefill_group=group, **kw)
        eng.runner.a_first, eng.experts.hits_first = a_first, hits_first
        eng.scheduler.pinned_rings = rings
        eng.experts.join_host_fill()
        out.append(eng.session().forward(ids[:100]).cpu())
    assert all(torch.equal(out[0], o) for o in out[1:])
    # More chunks in a group than the ids ring's buffers at first (25 chunks of 4 tokens),
    # against chunk by chunk at the same chunk size (another chunk size changes the matmuls'
    # shapes, hence their roundings).
    small = []
    for group in (0, 100):
        eng = _load("cuda", prefill_group=group, **{**kw, "prefill_chunk": 4})
        eng.experts.join_host_fill()
        sess = eng.session()
        small.append(sess.forward(ids[:100]).cpu())
        assert sess._layer_major  # not fallen back to chunk by chunk
    assert torch.equal(small[0], small[1])


def test_cuda_layer_by_layer_kernels_through_the_rings(ids):
    """The FP4 kernels' slot tables through the scheduler's pinned ring, several waves a layer
    (4 slots, a chunk uses about all 8 experts) and more chunks than its buffers: the logits of
    torch's pinned allocator, bitwise; and the routing trace keeps each layer's ids (a ring
    buffer is written again 16 chunks later)."""
    cfg = PRESETS["tiny"]()
    kw = dict(kernels=True, prefill_chunk=8, prefill_group=96, expert_slots=4)
    out, traces = [], []
    for rings in (True, False):
        eng = _load("cuda", **kw)
        eng.scheduler.pinned_rings = rings
        eng.scheduler.trace = []
        out.append(eng.session().forward(ids[:96]).cpu())
        traces.append([(layer, sel.tolist()) for layer, sel in eng.scheduler.trace])
    assert torch.equal(out[0], out[1])
    assert traces[0] == traces[1] and len(traces[0]) == 12 * cfg.num_hidden_layers


def test_cuda_resident_layers_take_their_slots_on_the_device(ids):
    """A pool holding every expert: each prefill layer's expert kernel reads its slots from the
    device slot map, queued before the host has the ids (`Scheduler.device_routed`), with the
    logits of the host's slot tables (the same prompt from a cold pool, each layer loaded on
    demand), bitwise; the lookups are counted all the same."""
    eng = _load("cuda", kernels=True, prefill_chunk=32, prefill_group=96)
    eng.experts.join_host_fill()
    routed: list[bool] = []
    check = eng.scheduler.device_routed

    def spy(layer: int) -> bool:
        routed.append(check(layer))
        return routed[-1]

    out = []
    for resident in (False, True):
        eng.scheduler.device_routed = spy if resident else (lambda layer: False)
        eng.experts.reset_gpu()
        if resident:
            eng.experts.load_all()
        c0 = eng.experts.counters.lookups
        out.append(eng.session().forward(ids[:96]).cpu())
        assert eng.experts.counters.lookups > c0
    assert routed and all(routed)
    assert torch.equal(out[0], out[1])


def test_cuda_bf16_generate():
    eng = _load("cuda", dtype=torch.bfloat16)
    msgs = [{"role": "user", "content": "Hello"}]
    r = eng.generate(messages=msgs, max_tokens=16, temperature=0)
    assert len(r.token_ids) == 16 and r.stats["decode_tok_s"] > 0
    assert eng.generate(messages=msgs, max_tokens=16, temperature=0).token_ids == r.token_ids


def test_copy_lane_rate_measured_while_another_thread_pins_memory():
    """The CPU lane splits misses by the copy lane's measured rate; another thread allocating
    pinned memory meanwhile stalls the host between the timing events (an engine that measured
    while pinning its host tier read 0.011 GB/s on an H200, and its lane took every miss)."""
    import threading

    from homeseek.cpu_lane import measure_h2d

    stop = threading.Event()

    def pin() -> None:
        while not stop.is_set():
            torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
            torch.cuda.synchronize()

    t = threading.Thread(target=pin)
    t.start()
    try:
        rate = measure_h2d("cuda", 13_369_344)
    finally:
        stop.set()
        t.join()
    assert rate > 5e9, f"{rate / 1e9:.3f} GB/s"


def test_engine_times_the_copy_lane_before_pinning_its_host_tier():
    """The lane's copy rate, timed at engine start, is near the rate of the same record copy
    timed on a quiet host (a tiny record is latency-bound: ~0.5 GB/s on an H200, so the bound
    is relative); timed while the host tier pinned, it read 1/50 of it."""
    from homeseek.cpu_lane import measure_h2d

    eng = _load("cuda", cpu_lane="on", expert_slots=8, host_mem_gb=1)
    assert eng.experts.n_host > 0
    eng.experts.join_host_fill()
    lane = eng.scheduler.lane
    quiet = measure_h2d("cuda", lane.record_bytes)
    assert lane.h2d_rate > 0.3 * quiet, (lane.h2d_rate, quiet)


def test_pinned_record_pieces_copy_whole_records():
    """A pinned host tier in pieces (experts.PIN_PIECE) copies each record with one row copy
    into the packed GPU pool, which the kernels read as four tensors."""
    from homeseek.experts import RecordBuffer

    cfg = PRESETS["tiny"]()
    host = RecordBuffer(cfg, 5, "cpu", pin=True, piece=2)
    pool = RecordBuffer(cfg, 5, "cuda")
    g = torch.Generator().manual_seed(0)
    for p in host.pieces:
        p.copy_(torch.randint(0, 256, p.shape, dtype=torch.uint8, generator=g))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for s in range(5):
            pool.copy_in(4 - s, host.row(s), non_blocking=True)
    stream.synchronize()
    for s in range(5):
        assert torch.equal(pool.row(4 - s).cpu(), host.row(s))
        got, want = pool.view(4 - s), host.view(s)
        assert all(torch.equal(got[k].cpu(), want[k]) for k in want)
        assert all(torch.equal(pool.t[k][4 - s].cpu(), want[k]) for k in want)


@pytest.mark.parametrize("kernels", [False, True])
def test_prefill_layer_timeline(ids, kernels):
    """experts.Timeline (tools/prefill_profile.py --layers): a traced prefill of scans records,
    per layer, the main thread's id waits, the loads submitted and queued in the background,
    the reads ahead, the copy stream's spans and the compute stream's spans of A (and, with the
    kernels, of the experts), on one clock, and the logits do not change."""
    from homeseek.experts import Timeline

    cfg = PRESETS["tiny"]()
    rec_gb = record_bytes(cfg) / 2**30
    eng = _load(
        "cuda", kernels=kernels, expert_slots=3 * cfg.n_routed_experts, host_mem_gb=24 * rec_gb
    )
    eng.experts.join_host_fill()
    plain = eng.session().forward(ids[:60]).cpu()
    eng.experts.reset_gpu()
    eng.experts.timeline = tl = Timeline(eng.experts.copy_stream)
    assert torch.equal(eng.session().forward(ids[:60]).cpu(), plain)
    rows = tl.rows()
    kinds = {r[0] for r in rows}
    assert {"ids", "submit", "queue", "copies", "join", "gpu A"} <= kinds, kinds
    assert ("gpu E" in kinds) == kernels, kinds
    assert all(0 <= a <= b for _, _, a, b in rows)
    layers = set(range(cfg.num_hidden_layers))
    assert {r[1] for r in rows if r[0] == "ids"} == layers
    assert {r[1] for r in rows if r[0] == "gpu A"} == layers


def test_cuda_host_staging_does_not_wait_for_the_stream():
    """The slot-map updates (`_staged`) and a wave's slot table (`Scheduler.slot_table`) reach
    the device through pinned memory, read in place (`zero_copy`, the engine's) or in
    contiguous copies: queued behind a long kernel, each returns while that kernel still runs,
    and the device receives the right values. (A copy from pageable memory, or a strided one
    torch stages through pageable memory, waits for the stream's queued work first: the host
    then stalls behind the GPU.)"""
    eng = _load("cuda")
    store, sched = eng.experts, eng.scheduler
    assert store.zero_copy
    for zero_copy in (True, False):
        store.zero_copy = zero_copy
        for _ in range(8):  # the rings' buffers created first (STAGE_RING, TABLE_RING)
            store._staged([[0], [0]])
            store._staged_read()
            sched.slot_table(torch.tensor([[0, 1]]), {0: 5, 1: 6}, torch.device("cuda"))
        torch.cuda.synchronize()
        for n in (1, 3, 40, 2 * store.n_slots):
            rows = [list(range(n)), list(range(100, 100 + n))]
            torch.cuda._sleep(500_000_000)  # ~0.25 s of GPU time on the current stream
            busy = torch.cuda.Event()
            busy.record()
            out = store._staged(rows)
            assert not busy.query(), f"_staged of {n} rows waited for the stream"
            # read by a kernel, as the scatter reads it (a zero-copy view is host memory)
            got = out + 0
            store._staged_read()
            assert out.is_contiguous() and got.tolist() == rows
        sel = torch.tensor([[0, 1], [2, 1]])
        torch.cuda._sleep(500_000_000)
        busy = torch.cuda.Event()
        busy.record()
        table = sched.slot_table(sel, {0: 5, 1: 6, 2: 7}, torch.device("cuda"))
        assert not busy.query(), "slot_table waited for the stream"
        assert table.tolist() == [[5, 6], [7, 6]]


def test_cuda_device_view_reads_the_host_in_place():
    """`device_view`: a kernel reads what the host wrote last, also from a CUDA graph replayed
    after each write (the view's address is fixed at capture), and rejects pageable memory."""
    host = torch.zeros(16, dtype=torch.long).pin_memory()
    view = device_view(host)
    assert view.device.type == "cuda" and view.data_ptr() == host.data_ptr()
    dev = torch.zeros(16, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dev.copy_(view)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dev.copy_(view)  # a cast kernel: int64 read in place -> int32
    for k in range(3):
        host.copy_(torch.arange(16) * (k + 2))
        g.replay()
        torch.cuda.synchronize()
        assert dev.tolist() == (torch.arange(16) * (k + 2)).tolist()
    with pytest.raises(ValueError, match="pinned"):
        device_view(torch.zeros(4, dtype=torch.long))
