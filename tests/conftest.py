"""Shared test setup: an isolated model cache, single-threaded torch, and the parity report."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels are tested in triton's CPU interpreter. The switch must be set
# before anything imports triton (the engine imports the kernel layer), so it lives here. The
# engine itself never sends CPU tensors to triton; only the kernel tests do.
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models are dominated by per-op overhead; extra threads only contend (2-core CI machines).
torch.set_num_threads(1)

PARITY_ROWS: list[dict] = []


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are created under a per-run directory, never in the user's cache."""
    if "HOMESEEK_CACHE_DIR" not in os.environ:
        os.environ["HOMESEEK_CACHE_DIR"] = str(tmp_path_factory.mktemp("homeseek-cache"))
    return Path(os.environ["HOMESEEK_CACHE_DIR"])


@pytest.fixture
def parity_report():
    """Record a parity row; all rows print as one table at the end of the run."""

    def add(config: str, mode: str, stats: dict[str, float]) -> None:
        PARITY_ROWS.append({"config": config, "mode": mode, **stats})

    return add


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest hook
    if not PARITY_ROWS:
        return
    tr = terminalreporter
    tr.section("oracle parity (error / std of oracle logits)")
    tr.write_line(f"{'config':<14} {'mode':<22} {'max err':>10} {'median err':>11} {'argmax %':>9}")
    for r in PARITY_ROWS:
        tr.write_line(
            f"{r['config']:<14} {r['mode']:<22} {r['max_err_rel']:>10.2e} "
            f"{r['median_err_rel']:>11.2e} {r['argmax_agree_pct']:>9.2f}"
        )
    out = os.environ.get("HOMESEEK_PARITY_JSON")
    if out:
        Path(out).write_text(json.dumps(PARITY_ROWS, indent=1))
