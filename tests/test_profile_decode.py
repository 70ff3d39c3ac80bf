"""`homeseek profile --decode` on CPU with the tiny model: the table, the JSON line, the Chrome
trace and (with matplotlib) the chart; the mode flags' usage errors."""

from __future__ import annotations

import json

import pytest

from homeseek.cli import main


def test_decode_profile_reports_every_layer(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    rc = main([
        "profile", "--decode", "--model", "tiny", "--tokens", "2", "--prompt-tokens", "8",
        "--trace", str(trace), "--compare-eager",
    ])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("{"))
    res = json.loads(line)
    assert res["profile"] == "decode" and res["graphs"] is False
    layers = sorted(r["layer"] for r in res["layers"])
    assert layers == list(range(len(layers))) and len(layers) == 5  # tiny: 5 layers
    totals = [r["total_ms"] for r in res["layers"]]
    assert totals == sorted(totals, reverse=True)  # slowest first
    t = res["per_token"]
    assert t["gpu_ms"] > 0 and t["wall_ms"] >= t["gpu_ms"] * 0.5
    assert abs(sum(r["a_ms"] + r["b_ms"] for r in res["layers"]) + t["embed_ms"] + t["head_ms"]
               - t["gpu_ms"]) < 1e-2  # fmt: skip
    assert res["eager"] is not None and len(res["eager"]["layers"]) == 5
    assert "per token:" in out and "eager" in out.splitlines()[2]
    ev = json.loads(trace.read_text())["traceEvents"]
    names = {e["name"] for e in ev if e["ph"] == "X"}
    assert {"embed", "H", "A0", "B4"} <= names
    assert any(n.startswith("between A and B") for n in names)
    assert all(e["dur"] >= 0 for e in ev if e["ph"] == "X")


def test_decode_profile_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    args = ["profile", "--decode", "--model", "tiny", "--tokens", "1", "--plot", str(png)]
    assert main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_modes(capsys):
    assert main(["profile"]) == 2
    assert "--routing" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["profile", "--decode", "--out", "x.json"])
    assert e.value.code == 2
    assert "--out is for --routing only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--routing"])
    assert "--routing needs --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--routing", "--decode"])


def test_decode_profile_of_a_synthetic_preset(capsys):
    rc = main(["profile", "--decode", "--synthetic", "tiny", "--tokens", "1",
               "--prompt-tokens", "4", "--expert-alias", "2"])  # fmt: skip
    assert rc == 0
    res = json.loads(next(x for x in capsys.readouterr().out.splitlines() if x.startswith("{")))
    assert len(res["layers"]) == 5
    with pytest.raises(SystemExit):
        main(["profile", "--decode", "--synthetic", "tiny", "--model", "elsewhere"])
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--routing", "--out", "x.json", "--synthetic", "tiny"])
    assert "--synthetic is for --decode only" in capsys.readouterr().err
