"""The first five minutes: every user mistake is one line (exit 2 for usage errors) found before
any weight is read; --version, --help, the env-var table; doctor without a GPU; the shared memory
budget rule; `import homeseek` alone giving its submodules."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import homeseek
import homeseek.engine
from homeseek import cli, plan
from homeseek.config import tiny_config
from homeseek.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


class Loaded(Exception):
    """Raised by the stand-in loader: reaching it means the checks passed."""


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Make any weight loading fail loudly; record what `homeseek.load` was asked for."""
    seen: dict = {}

    def fake_load(path, **kw):  # noqa: ANN001, ANN003 - stands in for homeseek.load
        seen.update(kw, path=path)
        raise Loaded

    def engine_init(*a, **kw):  # noqa: ANN002, ANN003
        raise AssertionError("Engine constructed: weights would be read")

    monkeypatch.setattr(homeseek, "load", fake_load)
    monkeypatch.setattr(homeseek.engine.Engine, "__init__", engine_init)
    return seen


@pytest.fixture(scope="module")
def ck_no_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ck"), tiny_config(), tokenizer=False)


def _fails(capsys: pytest.CaptureFixture, argv: list[str], code: int = 2) -> str:
    """Run the command in-process; it must stop with `code` and exactly one line on stderr."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err and "loading layers" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


MISTAKES = [
    (["generate"], "give a prompt"),
    (["generate", "--max-tokens", "-1", "x"], "argument --max-tokens: must be >= 1, got -1"),
    (["generate", "--top-p", "5", "x"], "argument --top-p: must be > 0 and <= 1"),
    (["generate", "--prompt-ids", "abc"], "'abc' is not a comma-separated list of token ids"),
    (["generate", "--prompt-ids", "0,5,999999"], "id 999999 is outside the vocabulary"),
    (["generate", "--prompt-ids", "0,5", "hello"], "a prompt or --prompt-ids, not both"),
    (["generate", "--device", "tpu", "x"], "'tpu' is not a device"),
    (["generate", "--threads", "-2", "x"], "argument --threads: must be >= 1, got -2"),
    (["generate", "--max-context", "0", "x"], "argument --max-context: must be >= 1"),
    (["generate", "--max-context", "9999999", "x"], "exceeds the model's max_position"),
    (["generate", "--gpu-mem-gb", "-1", "x"], "argument --gpu-mem-gb: must be > 0"),
    (["generate", "--model", "flash", "x"], "homeseek synth flash DIR"),
    (["generate", "--model", "no/such/dir", "x"], "no such directory"),
    (["serve", "--port", "99999"], "argument --port: must be between 0 and 65535"),
    (["serve", "--host", "999.1.1.1"], "'999.1.1.1' is not a valid IP address"),
    (["serve", "--max-queue", "0"], "argument --max-queue: must be >= 1"),
    (["chat", "--gpu-mem-gb", "4"], "add --model"),
    (["chat", "--mtp", "2"], "--mtp is for an in-process model"),
    (["generate", "--mtp", "4", "x"], "argument --mtp: must be between 0 and 3"),
    (["synth", "nonsense", "out"], "neither a preset"),
]


@pytest.mark.parametrize("argv,message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_usage_mistakes_are_one_line_before_loading(capsys, no_load, argv, message) -> None:
    err = _fails(capsys, argv)
    assert message in err
    assert err.startswith(f"homeseek {argv[0]}: error: ")
    assert not no_load, "homeseek.load was reached"


def test_missing_tokenizer_found_from_the_directory(capsys, no_load, ck_no_tokenizer) -> None:
    err = _fails(capsys, ["generate", "--model", str(ck_no_tokenizer), "hi"])
    assert "has no tokenizer.json" in err and "--prompt-ids" in err
    # Raw ids need no tokenizer: the checks pass and loading starts.
    with pytest.raises(Loaded):
        cli.main(["generate", "--model", str(ck_no_tokenizer), "--prompt-ids", "0,5,6"])


def test_directory_without_config_json(capsys, no_load, tmp_path: Path) -> None:
    assert "no config.json" in _fails(capsys, ["generate", "--model", str(tmp_path), "x"])


def test_cuda_without_cuda(capsys, no_load, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _fails(capsys, ["generate", "--device", "cuda", "x"])
    assert "--device cuda" in err and "--device cpu" in err


@pytest.mark.parametrize(
    "env,message",
    [
        ({"HOMESEEK_MAX_CONTEXT": "abc"}, "HOMESEEK_MAX_CONTEXT='abc' is not a whole number"),
        ({"HOMESEEK_PREFILL_CHUNK": "-5"}, "HOMESEEK_PREFILL_CHUNK=-5 must be >= 1"),
    ],
)
def test_bad_environment_variables(capsys, no_load, monkeypatch, env, message) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert message in _fails(capsys, ["generate", "x"])


def test_unwritable_cache_dir(capsys, no_load, monkeypatch, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HOMESEEK_CACHE_DIR", str(blocker / "cache"))  # mkdir fails, even as root
    err = _fails(capsys, ["generate", "x"])
    assert "cannot write the built-in model" in err and "HOMESEEK_CACHE_DIR" in err


def test_too_small_gpu_budget_names_the_flag(capsys, no_load) -> None:
    err = _fails(capsys, ["generate", "--gpu-mem-gb", "0.01", "x"], code=1)
    assert err.startswith("homeseek: error: ") and "raise --gpu-mem-gb to at least" in err


def test_prefill_chunk_flag_reaches_load(no_load, monkeypatch) -> None:
    monkeypatch.delenv("HOMESEEK_PREFILL_CHUNK", raising=False)
    with pytest.raises(Loaded):
        cli.main(["generate", "--device", "cpu", "x"])
    assert no_load["prefill_chunk"] is None  # derived from the budget at load
    for argv in (["generate", "--prefill-chunk", "256", "x"], ["serve", "--prefill-chunk", "256"]):
        no_load.clear()
        with pytest.raises(Loaded):
            cli.main([*argv[:1], "--device", "cpu", *argv[1:]])
        assert no_load["prefill_chunk"] == 256
    monkeypatch.setenv("HOMESEEK_PREFILL_CHUNK", "128")
    with pytest.raises(Loaded):
        cli.main(["generate", "--device", "cpu", "x"])
    assert no_load["prefill_chunk"] == 128


def test_prefill_chunk_that_does_not_fit_names_the_flags(capsys, no_load) -> None:
    argv = ["generate", "--max-context", "65536", "--gpu-mem-gb", "2", "--prefill-chunk", "65536"]
    err = _fails(capsys, [*argv, "x"], code=1)
    assert err.startswith("homeseek: error: --prefill-chunk 65536 does not fit --gpu-mem-gb 2.0")
    assert "lower --prefill-chunk to at most" in err and "raise --gpu-mem-gb to at least" in err


def test_doctor_shows_the_prefill_chunk(capsys) -> None:
    assert cli.main(["doctor", "--gpu-mem-gb", "24", "--prefill-chunk", "1024"]) == 0
    out = capsys.readouterr().out
    assert "prefill chunk 1024 tokens (as set): workspace" in out
    assert cli.main(["doctor", "--gpu-mem-gb", "24"]) == 0
    assert "tokens (derived from the budget)" in capsys.readouterr().out


def test_prefill_group_reaches_load_and_doctor(no_load, capsys) -> None:
    with pytest.raises(Loaded):
        cli.main(["generate", "--device", "cpu", "--prefill-group", "8192", "x"])
    assert no_load["prefill_group"] == 8192
    assert cli.main(["doctor", "--gpu-mem-gb", "24", "--prefill-group", "16384"]) == 0
    assert "pending A of a layer-by-layer group" in capsys.readouterr().out


def test_prefill_group_defaults_to_layer_by_layer_on_cuda_only(no_load, capsys, monkeypatch):
    """CUDA leaves the group to the memory plan unless told (0: chunk by chunk); CPU copies
    nothing, so it goes chunk by chunk; doctor plans for a GPU, with the derived group."""
    from homeseek.config import RuntimeConfig

    monkeypatch.delenv("HOMESEEK_PREFILL_GROUP", raising=False)
    assert RuntimeConfig.build(device="cuda").prefill_group is None  # derived by the plan
    assert RuntimeConfig.build(device="cuda", prefill_group=0).prefill_group == 0
    assert RuntimeConfig.build(device="cpu").prefill_group == 0
    monkeypatch.setenv("HOMESEEK_PREFILL_GROUP", "8192")
    assert RuntimeConfig.build(device="cuda").prefill_group == 8192
    monkeypatch.delenv("HOMESEEK_PREFILL_GROUP")
    assert cli.main(["doctor", "--gpu-mem-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "pending A of a layer-by-layer group" in out
    assert "groups of 16384 tokens (derived from the pool)" in out
    assert cli.main(["doctor", "--gpu-mem-gb", "24", "--prefill-group", "0"]) == 0
    out = capsys.readouterr().out
    assert "pending A of a layer-by-layer group" not in out and "chunk by chunk" in out


def test_memory_flags_reach_load(no_load) -> None:
    with pytest.raises(Loaded):
        cli.main(["generate", "--device", "cpu", "--gpu-mem-gb", "3", "--host-mem-gb", "2", "x"])
    assert no_load["gpu_mem_gb"] == 3.0 and no_load["host_mem_gb"] == 2.0
    assert no_load["device"] == "cpu" and no_load["path"] == "tiny"


@pytest.mark.parametrize("command", ["generate", "serve", "profile", "chat"])
def test_one_default_budget_rule(no_load, monkeypatch, command: str) -> None:
    """Every loading command (and doctor, below) takes its defaults from homeseek.plan."""
    monkeypatch.setattr(plan, "default_gpu_budget_gb", lambda device="cuda": 123.0)
    monkeypatch.setattr(plan, "default_host_budget_gb", lambda: 7.0)
    argv = {
        "generate": ["generate", "x"],
        "serve": ["serve", "--port", "0"],
        "profile": ["profile", "--routing", "--out", "p.json"],
        "chat": ["chat", "--model", "tiny"],
    }[command]
    with pytest.raises(Loaded):
        cli.main(argv)
    assert no_load["gpu_mem_gb"] == 123.0 and no_load["host_mem_gb"] == 7.0


def test_doctor_uses_the_same_rule(capsys, monkeypatch) -> None:
    monkeypatch.setattr(plan, "default_gpu_budget_gb", lambda device="cuda": 5.0)
    monkeypatch.setattr(plan, "default_host_budget_gb", lambda: 0.5)
    assert cli.main(["doctor", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "GPU budget 5.0 GiB" in out and "pinned host 0.5 GiB" in out


def test_doctor_shows_the_cpu_lane(capsys) -> None:
    from homeseek.kernels import cpu_experts

    assert cli.main(["doctor", "--gpu-mem-gb", "24"]) == 0
    out = capsys.readouterr().out
    feats = cpu_experts.cpu_features()
    line = next(x for x in out.splitlines() if x.startswith("CPU: "))
    assert f"{feats['usable_cores']} usable cores" in line and "GB/s" in line
    assert all(f in line for f in feats["flags"])
    lane = next(x for x in out.splitlines() if x.startswith("CPU lane"))
    ok, why = cpu_experts.available()
    assert (f"{feats['isa']} path" in lane) if ok else (why in lane)


def test_doctor_without_gpu_is_hypothetical(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "no GPU here" in out and "--gpu-mem-gb" in out
    assert "fits a hypothetical 24 GiB card: yes" in out
    assert "fits: yes" not in out
    # With a budget given, the plan is a real one for that budget.
    assert cli.main(["doctor", "--gpu-mem-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "hypothetical" not in out


def test_version_and_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert (
        e.value.code == 0 and capsys.readouterr().out.strip() == f"homeseek {homeseek.__version__}"
    )
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    for shown in (
        "(default: 64)",
        "(default: tiny)",
        "(default: 1.0)",
        "(default: 0)",
        "--gpu-mem-gb",
    ):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text
    for name in cli.ENV_VARS:
        assert name in text


def test_every_env_var_is_documented() -> None:
    """config.py is the only reader of HOMESEEK_*: each one it reads is in --help and README."""
    source = (ROOT / "homeseek" / "config.py").read_text()
    read = {f"HOMESEEK_{n}" for n in re.findall(r'(?:_env|env_int)\("([A-Z_]+)"', source)}
    assert read == {
        "HOMESEEK_CACHE_DIR", "HOMESEEK_MAX_CONTEXT", "HOMESEEK_PREFILL_CHUNK",
        "HOMESEEK_PREFILL_GROUP", "HOMESEEK_API_KEY",
    }  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    for name in read:
        assert name in cli.ENV_VARS and name in readme, name
    others = [ROOT / "homeseek", ROOT / "kernels", ROOT / "graphs"]
    for folder in others:
        for f in folder.glob("*.py"):
            reads = re.search(r"(environ\b|getenv)[^\n]*HOMESEEK_", f.read_text())
            assert f.name == "config.py" or not reads, f"{f} reads HOMESEEK_* itself"


def test_generate_json_has_the_text(capsys) -> None:
    argv = ["generate", "--threads", "1", "--json", "--max-tokens", "5", "--temperature", "0"]
    assert cli.main([*argv, "--seed", "1", "Hello"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(row["text"], str) and row["text"].strip()
    assert len(row["token_ids"]) == row["completion_tokens"] == 5
    # The tiny model's random weights print words (its tokenizer's ids are words and phrases).
    words = row["text"].split()
    assert sum(w.isalpha() for w in words) >= len(words) / 2, row["text"]


def test_generate_with_mtp_reports_the_drafts(capsys) -> None:
    argv = ["generate", "--threads", "1", "--json", "--max-tokens", "8", "--temperature", "0"]
    assert cli.main([*argv, "--prompt-ids", "1,2,3", "--mtp", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["completion_tokens"] == 8 and row["mtp_drafted"] >= 2
    assert 0 <= row["mtp_accepted"] <= row["mtp_drafted"] and row["mtp_tokens_per_step"] >= 1


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_import_homeseek_gives_its_submodules(tmp_path: Path) -> None:
    code = (
        "import sys, homeseek\n"
        "assert 'torch' not in sys.modules  # submodules load on first use\n"
        f"homeseek.synthetic.write_checkpoint({str(tmp_path / 'ck')!r}, "
        "homeseek.config.tiny_config(), tokenizer=False)\n"
        "from homeseek import load, Engine\n"
        "print(homeseek.kernels.ops.__name__, load.__module__, Engine.__name__)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["homeseek.kernels.ops", "homeseek.engine", "Engine"]
    assert (tmp_path / "ck" / "config.json").is_file()


def test_usage_errors_end_to_end_without_torch() -> None:
    """In a real process: one line, exit 2, and the argparse-level ones never import torch."""
    code = (
        "import sys\n"
        "from homeseek.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    print(e.code, 'torch' in sys.modules)\n"
    )
    for argv in (["--version"], ["generate"], ["serve", "--port", "99999"]):
        r = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60
        )
        assert "Traceback" not in r.stderr, r.stderr
        assert r.stdout.split()[-2:] == ["2" if argv[0] != "--version" else "0", "False"], argv


def test_checkout_imports_like_the_install(tmp_path: Path) -> None:
    """homeseek.kernels / homeseek.graphs resolve from the source tree itself (symlinks)."""
    code = "import homeseek.kernels.ops, homeseek.graphs, sys; print(homeseek.kernels.ops.__file__)"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == (ROOT / "kernels" / "ops.py").resolve()
    assert (ROOT / "homeseek" / "kernels").is_symlink() and (
        ROOT / "homeseek" / "graphs"
    ).is_symlink()


def test_doc_citations_point_into_the_repository() -> None:
    """Comments cite `docs/<name>.md §N[.M]`: the file and the section (or numbered item) exist."""
    cite = re.compile(r"docs/([a-z_]+)\.md §(\d+)(?:\.(\d+))?")
    found = 0
    for folder in ("homeseek", "kernels", "graphs", "tools", "tests"):
        for f in (ROOT / folder).rglob("*.py"):
            for name, major, minor in cite.findall(f.read_text(encoding="utf-8")):
                found += 1
                doc = ROOT / "docs" / f"{name}.md"
                assert doc.is_file(), f"{f}: cites missing {doc.name}"
                text = doc.read_text(encoding="utf-8")
                section = re.search(rf"^## {major}\. .*?(?=^## |\Z)", text, re.M | re.S)
                assert section, f"{f}: {doc.name} has no section {major}"
                if minor:
                    body = section.group(0)
                    heading = re.search(rf"^### {major}\.{minor} ", body, re.M)
                    item = re.search(rf"^{minor}\. ", body, re.M)
                    assert heading or item, f"{f}: {doc.name} has no §{major}.{minor}"
    assert found > 30


def test_help_words_the_plan_defaults() -> None:
    """--help describes the defaults homeseek.plan applies; keep the two in step."""
    gpu_pct = round(plan.GPU_FREE_FRACTION * 100)
    host_pct = round((1 - plan.HOST_RESERVE_FRACTION) * 100)
    assert cli.GPU_DEFAULT_TEXT.startswith(f"{gpu_pct}%%")
    assert cli.HOST_DEFAULT_TEXT.startswith(f"{host_pct}%%")


def test_the_load_check_plans_with_the_engines_default_group(monkeypatch) -> None:
    """The plan checked before loading reserves what the engine's will: the group derived on
    CUDA when --prefill-group is not given, none with 0."""
    from homeseek import plan

    seen: dict = {}
    real = plan.memory_plan

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(cli, "_check_device", lambda device: "cuda")
    monkeypatch.setattr(plan, "memory_plan", spy)
    monkeypatch.delenv("HOMESEEK_PREFILL_GROUP", raising=False)
    cli.check_load(cli.build_parser().parse_args(["generate", "--gpu-mem-gb", "24", "x"]))
    assert seen["prefill_group"] is None and seen["derive_prefill_group"]
    argv = ["generate", "--gpu-mem-gb", "24", "--prefill-group", "0", "x"]
    cli.check_load(cli.build_parser().parse_args(argv))
    assert seen["prefill_group"] == 0 and not seen["derive_prefill_group"]
