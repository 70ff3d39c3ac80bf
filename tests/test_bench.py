"""`homeseek bench` end to end on the tiny model (CPU): the table, the JSON line, its fields.

Speed is not asserted (benchmarks are tools); structure and the counters' consistency are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import homeseek
from homeseek import cli
from homeseek.config import ConfigError, tiny_config
from homeseek.profile import save_trace
from homeseek.scheduler import TraceRouting, UniformRouting


def _bench(capsys, *args: str) -> tuple[str, dict]:
    rc = cli.main(["bench", "--model", "tiny", "--device", "cpu", *args])
    assert rc == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    return out, json.loads(last)


def test_bench_cli_on_tiny(capsys, tmp_path):
    cfg = tiny_config()
    L, K = cfg.num_hidden_layers, cfg.num_experts_per_tok
    trace = tmp_path / "t.npz"
    save_trace(trace, [(layer, [layer % 4, 4 + layer % 4]) for _ in range(3) for layer in range(L)])
    out, res = _bench(
        capsys, "--prompts", "8,24", "--decode-tokens", "3", "--long-decode-tokens", "2",
        "--profile-tokens", "1", "--routing", "model,uniform", "--routing-trace", str(trace),
    )  # fmt: skip
    assert "ceilings (measured now)" in out and "per token:" in out
    for key in ("device", "torch", "commit", "ceilings", "rows", "gpu_slots", "host_share"):
        assert key in res, key
    assert res["ceilings"]["hbm_read_GBps"] > 0 and res["ceilings"]["matmul_TFLOPs"] > 0
    assert res["modes"] == ["eager"]
    rows = res["rows"]
    routings = [r["routing"] for r in rows]
    assert routings.count("model") == routings.count("uniform") == 4
    assert routings.count(f"trace:{trace}") == 4
    for r in rows:
        assert r["error"] is None
        assert r["allocator"] is None  # the CUDA allocators' events: none off CUDA
        assert r["tok_s"] > 0 and r["ceiling_ms_per_token"] > 0 and r["pct_of_ceiling"] > 0
        assert 0 <= r["gpu_hit_rate"] <= 1
        assert r["expert_lookups_per_token"] > 0
    dec = [r for r in rows if r["work"] == "decode"]
    # after the longest prompt (24), from a cold pool, as many untimed tokens as the shortest
    # prompt (8) first: the pool as the short row found it, and a new bucket's captures
    assert [(r["tokens"], r["position"]) for r in dec[:2]] == [(3, 8), (2, 32)]
    ratio = res["long_position_ratio"]  # long / short position, ms per token
    assert set(ratio) == {"model@32", "uniform@32", f"trace:{trace}@32"}
    assert all(v > 0 for v in ratio.values())
    # decode: every token looks up K experts in each layer
    assert all(r["expert_lookups_per_token"] == L * K for r in dec)
    prof = [r for r in dec if r["kernels_per_token"] is not None]
    assert len(prof) == 3  # the short-position decode of each routing mode
    for r in prof:
        assert r["kernels_per_token"] > 0 and r["gpu_busy_ms_per_token"] > 0
        assert r["host_ms_per_token"] >= 0


def test_bench_mtp_rows(capsys):
    out, res = _bench(
        capsys, "--prompts", "8", "--decode-tokens", "6", "--long-decode-tokens", "0",
        "--profile-tokens", "0", "--mtp", "2",
    )  # fmt: skip
    spec = [r for r in res["rows"] if r["drafts"] is not None]
    assert [r["drafts"] for r in spec] == ["mtp", "forced 50%", "forced 70%", "forced 90%"]
    for r in spec:
        assert r["error"] is None and r["tokens"] >= 6 and r["position"] == 8
        assert 0 <= r["mtp_acceptance"] <= 1 and 1 <= r["mtp_tokens_per_step"] <= 3
    # forced acceptance keeps drafts whatever the model says (seeded: deterministic)
    assert spec[-1]["mtp_acceptance"] > 0.5 and spec[-1]["mtp_tokens_per_step"] > 1.5
    assert "tokens per verify step" in out


def test_bench_decodes_each_lane_mode_with_each_prefetch_setting(capsys):
    """--prefetch on,off: every lane mode decodes with and without the prefetch, the same
    tokens from the same state; the copy-only row (neither) is what the others are put against."""
    out, res = _bench(
        capsys, "--prompts", "8", "--decode-tokens", "3", "--long-decode-tokens", "0",
        "--profile-tokens", "0", "--cpu-lane", "off", "--prefetch", "on,off",
    )  # fmt: skip
    dec = [r for r in res["rows"] if r["work"] == "decode"]
    assert [(r["cpu_lane"], r["prefetch"]) for r in dec] == [("off", False), ("off", True)]
    assert all(r["error"] is None and r["tok_s"] > 0 for r in dec)
    assert "decode 3 @8 copy+pf" in out and "decode 3 @8 copy " in out
    assert "the copy-only decode" in out
    assert set(res["cpu_lane_speedup"]) == {"model lane off prefetch on"}

    def modes(lane: str) -> list[tuple[str, bool]]:  # (lane, prefetch) of each decode row
        _, res = _bench(
            capsys, "--prompts", "8", "--decode-tokens", "2", "--long-decode-tokens", "0",
            "--profile-tokens", "0", "--cpu-lane", lane,
        )  # fmt: skip
        return [(r["cpu_lane"], r["prefetch"]) for r in res["rows"] if r["work"] == "decode"]

    # one setting: the "off" row is the copy-only baseline, without the prefetch
    assert modes("off") == [("off", False)]
    # a lane asked for that cannot start here (a CPU engine) is labelled "off": not a copy-only
    # baseline, its row keeps the prefetch
    assert modes("auto") == [("off", True)]


def test_bench_copy_only_decode_leaves_the_prompts_their_prefetch(monkeypatch):
    """The copy-only decode row turns the prefetch off while it runs; the prompts after it
    (a 24-token chunk is a scan on the tiny model: it loads the next layer early) and the decode
    after the longest prompt run as asked (that in the copy-only mode), and the engine keeps
    its setting."""
    from homeseek.bench import Bench, BenchConfig
    from homeseek.scheduler import Scheduler

    scans = []
    real = Scheduler.prefetch_next
    monkeypatch.setattr(
        Scheduler, "prefetch_next", lambda self, *a: (scans.append(a), real(self, *a))[1]
    )
    bc = BenchConfig(
        model="tiny", synthetic=None, device="cpu", prompts=(8, 24), decode_tokens=2,
        long_decode_tokens=1, profile_tokens=0, cpu_lanes=("off",),
    )  # fmt: skip
    b = Bench(bc, out=lambda _: None)
    res = b.run()
    dec = [(r["position"], r["prefetch"]) for r in res["rows"] if r["work"] == "decode"]
    assert dec == [(8, False), (32, False)]
    assert any(tokens == 24 for _, tokens in scans) and b.eng.scheduler.prefetch is True


def test_bench_long_decode_starts_as_the_short_rows_did():
    """With several decode modes each short-position row starts from a cold pool, so the decode
    after the longest prompt does too, after the one untimed token that captures its bucket (one
    mode: after as many as the shortest prompt, which warmed the short row's pool)."""
    from homeseek.bench import Bench, BenchConfig

    bc = BenchConfig(
        model="tiny", synthetic=None, device="cpu", prompts=(8, 24), decode_tokens=2,
        long_decode_tokens=1, profile_tokens=0, cpu_lanes=("off",), prefetch=(True, False),
    )  # fmt: skip
    res = Bench(bc, out=lambda _: None).run()
    dec = [(r["position"], r["prefetch"]) for r in res["rows"] if r["work"] == "decode"]
    assert dec == [(8, False), (8, True), (25, True)]


def test_bench_reports_the_lane_kernel_against_the_host_read_rate(monkeypatch):
    """With a CPU lane, the report puts the lane's kernel rate in decode (a record per its
    measured seconds per expert) against the host's RAM read rate with the lane's threads."""
    from types import SimpleNamespace

    from homeseek.bench import Bench, BenchConfig
    from homeseek.cpu_lane import LaneCounters

    bc = BenchConfig(
        model="tiny", synthetic=None, device="cpu", prompts=(8,), decode_tokens=2,
        long_decode_tokens=0, profile_tokens=0, cpu_lanes=("off",),
    )  # fmt: skip
    lines: list[str] = []
    b = Bench(bc, out=lines.append)
    b.run()
    monkeypatch.setattr("homeseek.cpu_lane.measure_read_bandwidth", lambda n, t: 100e9)
    rb = b.setup["record_bytes"]
    lane = SimpleNamespace(
        counters=LaneCounters(experts=10, calls=5, busy_s=10 * rb / 25e9), h2d_rate=50e9, threads=3
    )
    b.eng.scheduler.lane = lane
    try:
        res = b._report()
    finally:
        b.eng.scheduler.lane = None
    assert res["host_read_GBps"] == 100.0 and abs(res["cpu_lane_GBps"] - 25.0) < 1e-6
    assert any("25.0 GB/s per expert against this host's RAM read 100 GB/s" in x for x in lines)


def test_bench_rejects_bad_arguments():
    from homeseek.bench import BenchConfig

    with pytest.raises(ConfigError, match="routing"):
        BenchConfig(model="tiny", synthetic=None, device="cpu", routings=("sideways",))
    with pytest.raises(ConfigError, match="prompts"):
        BenchConfig(model="tiny", synthetic=None, device="cpu", prompts=(0,))
    with pytest.raises(ConfigError, match="no such file"):
        BenchConfig(model="tiny", synthetic=None, device="cpu", routings=("trace:/nonexistent",))
    with pytest.raises(ConfigError, match="mtp"):
        BenchConfig(model="tiny", synthetic=None, device="cpu", mtp=5)
    for bad in ((), True, ("on",)):
        with pytest.raises(ConfigError, match="--prefetch"):
            BenchConfig(model="tiny", synthetic=None, device="cpu", prefetch=bad)


def test_bench_layers_cuts_a_synthetic_preset(capsys):
    """`--layers N`: the synthetic preset's first N layers (what fits a device whole), said in
    the header with the factor to the whole model, and in the JSON line."""
    from homeseek.bench import BenchConfig, synthetic_config

    cfg = synthetic_config("tiny", 3)
    assert cfg.num_hidden_layers == 3 and cfg.compress_ratios == (0, 0, 4, 0)  # MTP block kept
    rc = cli.main([
        "bench", "--synthetic", "tiny", "--device", "cpu", "--layers", "3", "--prompts", "8",
        "--decode-tokens", "2", "--long-decode-tokens", "0", "--profile-tokens", "0",
    ])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert "only the first 3 of the preset's 5 layers" in out and "1.667x" in out
    assert res["layers_of_preset"] == 5
    dec = [r for r in res["rows"] if r["work"] == "decode"]
    assert dec and all(r["expert_lookups_per_token"] == 3 * cfg.num_experts_per_tok for r in dec)
    with pytest.raises(ConfigError, match="not with --model"):
        BenchConfig(model="tiny", synthetic=None, device="cpu", layers=3)
    with pytest.raises(ConfigError, match="1..5"):
        BenchConfig(synthetic="tiny", device="cpu", layers=6)


def test_bench_resident_rows_hit_every_lookup(capsys):
    """`--resident`: every expert copied into the pool before the rows, so every lookup of
    every row hits and nothing is copied; said in the header and the JSON line."""
    rc = cli.main([
        "bench", "--synthetic", "tiny", "--device", "cpu", "--resident", "--prompts", "8,40",
        "--decode-tokens", "3", "--long-decode-tokens", "2", "--profile-tokens", "0",
    ])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert "every expert resident" in out and res["resident"] is True
    assert [r["work"] for r in res["rows"]] == ["prefill", "decode"] * 2
    for r in res["rows"]:
        assert r["gpu_hit_rate"] == 1.0 and r["h2d_bytes_per_token"] == 0, r


def test_load_all_refuses_a_pool_smaller_than_the_model():
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=64, expert_slots=6)
    with pytest.raises(ConfigError, match=r"needs \d+ GPU slots .* gives 6"):
        eng.experts.load_all()
    assert eng.experts.counters.lookups == 0  # refused before copying anything


def test_uniform_routing_draws_distinct_experts_evenly():
    r = UniformRouting(16, 4, seed=1)
    sel = torch.cat([r.select(0, torch.zeros(64, 4, dtype=torch.long)) for _ in range(50)])
    assert sel.shape == (3200, 4)
    assert all(len(set(row)) == 4 for row in sel.tolist())
    counts = np.bincount(sel.flatten().numpy(), minlength=16)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_trace_routing_replays_tokens_in_order(tmp_path):
    cfg = tiny_config()
    L = cfg.num_hidden_layers
    steps = [(layer, [t, t + 1]) for t in range(3) for layer in range(L)]
    save_trace(tmp_path / "t.npz", steps)
    r = TraceRouting(tmp_path / "t.npz", cfg)
    r.begin_step([0, 0])  # tokens 0, 1
    assert r.select(2, torch.zeros(2, 2)).tolist() == [[0, 1], [1, 2]]
    r.begin_step([0, 0])  # tokens 2, 0 (wraps)
    assert r.select(4, torch.zeros(2, 2)).tolist() == [[2, 3], [0, 1]]
    # a step's second chunk (layer by layer, chunks pass a layer in turn): rows from its offset
    r.begin_step([0, 0, 0])  # tokens 1, 2, 0
    assert r.select(1, torch.zeros(2, 2), offset=1).tolist() == [[2, 3], [0, 1]]
    save_trace(tmp_path / "bad.npz", steps[:-1])
    with pytest.raises(ConfigError, match="routing trace"):
        TraceRouting(tmp_path / "bad.npz", cfg)


def test_prefill_layer_timeline_names_why_the_copy_stream_idled(capsys):
    """tools/prefill_profile.py --layers: a gap of the copy stream between two layers' loads is
    put down to the load submitted late (main thread), queued late (background thread busy), or
    queued in time but started late (waiting on events)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "prefill_profile.py"
    spec = importlib.util.spec_from_file_location("prefill_profile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [
        ("copies", 0, 0.00, 0.10),
        ("submit", 1, 0.12, 0.12),  # after layer 0's copies ended: the gap was submitted late
        ("queue", 1, 0.12, 0.13),
        ("copies", 1, 0.14, 0.20),
        ("submit", 2, 0.15, 0.15),
        ("queue", 2, 0.21, 0.22),  # the background thread came to it late: 0.03 s
        ("copies", 2, 0.23, 0.30),
        ("submit", 3, 0.25, 0.25),
        ("queue", 3, 0.26, 0.27),
        ("copies", 3, 0.34, 0.40),  # queued in time, started 0.04 s late
    ]
    out = mod._layers(sorted(rows, key=lambda r: r[2]), show=3)
    assert out["copy_spans"] == 4 and abs(out["copy_busy_s"] - 0.29) < 1e-9
    assert abs(out["copy_idle_submitted_late_s"] - 0.04) < 1e-9  # 0.10 -> 0.14
    assert abs(out["copy_idle_queued_late_s"] - 0.03) < 1e-9  # 0.20 -> 0.23
    assert abs(out["copy_idle_queued_started_late_s"] - 0.04) < 1e-9  # 0.30 -> 0.34
    assert "layer timeline" in capsys.readouterr().out


def test_bench_warms_every_prompt_length_up(capsys, monkeypatch):
    """Before any row, the warm-up prefills each prompt length shorter than a chunk once, and
    one full chunk of the longest prompt: a length's first pass (compiling kernels for its
    size class) is no row's figure."""
    from homeseek import engine

    seen: list[int] = []
    real = engine.Session.forward

    def forward(self, ids, *a, **kw):
        if len(ids) > 1:  # prompts (decode steps come one token at a time)
            seen.append(len(ids))
        return real(self, ids, *a, **kw)

    monkeypatch.setattr(engine.Session, "forward", forward)
    _bench(
        capsys, "--prompts", "8,80,100", "--decode-tokens", "2", "--long-decode-tokens", "0",
        "--profile-tokens", "0",
    )  # fmt: skip
    # the warm-up ends with a chunk of the longest prompt (here the whole of it)
    assert seen == [64, 8, 80, 100] + [8, 80, 100]  # then each prompt's own row
    # 96-token chunks: 100 tokens end with a 4-token chunk, warmed too (and 8: 8 / 96)
    seen.clear()
    monkeypatch.setenv("HOMESEEK_PREFILL_CHUNK", "96")
    _bench(
        capsys, "--prompts", "8,100", "--decode-tokens", "2", "--long-decode-tokens", "0",
        "--profile-tokens", "0",
    )  # fmt: skip
    assert seen == [64, 4, 8, 96] + [8, 100]


def test_decode_kernel_listing_orders_and_totals_the_launches():
    """tools/decode_kernels.py's report: launches in start order with the gap before each (an
    overlapped launch, as under PDL, counts no gap) and per-name totals, largest first."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "decode_kernels.py"
    spec = importlib.util.spec_from_file_location("decode_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    evs = [(100.0, 102.0, "fill"), (102.5, 140.0, "gate_up"), (120.0, 150.0, "down"),
           (160.0, 161.0, "fill")]  # fmt: skip
    lines = mod.report(evs)
    assert lines[0] == "4 launches; span 0.061 ms"
    rows = [ln.split() for ln in lines[2:6]]
    assert [r[-1] for r in rows] == ["fill", "gate_up", "down", "fill"]
    assert [float(r[1]) for r in rows] == [0.0, 0.5, -20.0, 10.0]  # gaps; down overlapped
    totals = {ln.split()[-1]: ln.split()[:3] for ln in lines[8:]}
    assert totals["fill"] == ["2", "3.0", "10.0"] and totals["down"] == ["1", "30.0", "0.0"]
    assert lines[8].split()[-1] == "gate_up"  # 37.5 us + 0.5 gap: the largest
    assert mod.report([]) == ["no events"]
