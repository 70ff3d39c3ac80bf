"""torch.compile of the decode step's glue: every setting in one place, applied at engine start.

Between the Triton kernels of a decode token sit hundreds of tiny elementwise launches (norms,
RoPE, the FP8/FP4 rounding simulation, the compressor's pooling, index building): at batch 1
each costs a launch and a round trip through HBM for a few kilobytes. The decode step marks
those regions with `@fused`; on CUDA, inside `use(True)`, each becomes an Inductor
kernel or two. Compilation is plain torch.compile (no CUDA graphs of its own, `dynamic=False`:
decode shapes are fixed per layer kind), and the runner captures the compiled kernels into its
own graphs. Inductor's on-disk caches make a second start fast.

A fused function must be tensor math with hashable constant arguments (ints, floats, bools):
no closures, no host syncs, no dicts that change per call, so one compilation serves every layer
with the same shapes. Its only side effect may be a row store (`index_copy_`) into a tensor it is
given, which Inductor performs in place (the step's state writes, without launches of their
own). Off CUDA, or when not configured, the plain function runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# Fused decode regions: distinct (function, shapes) pairs, each compiled once. Generous, so no
# region silently falls back to eager after a few layer kinds.
RECOMPILE_LIMIT = 64

_state: dict[str, Any] = {"on": False, "compile_s": 0.0}
_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}


def configure() -> None:
    """The compile settings, applied once per process (engine start, when kernels are on)."""
    if _state.get("configured"):
        return
    import torch._dynamo
    import torch._inductor.config

    from homeseek.config import default_cache_dir

    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.cache_size_limit = RECOMPILE_LIMIT
    # Inductor's FX-graph cache keeps the compiled regions across starts; it lives with homeseek's
    # other caches (unless the user points TORCHINDUCTOR_CACHE_DIR elsewhere), not in /tmp.
    torch._inductor.config.fx_graph_cache = True
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "inductor"))
    _state["configured"] = True


@contextlib.contextmanager
def use(enabled: bool) -> Iterator[None]:
    """Run the fused regions compiled (True) or as plain torch (False) inside the block: the
    runner's decode step sets it from its engine's kernel switch."""
    old = _state["on"]
    _state["on"] = enabled
    try:
        yield
    finally:
        _state["on"] = old


def compile_seconds() -> float:
    """Wall seconds spent in calls that compiled (first call per shape), since start."""
    return float(_state["compile_s"])


def fused(fn: F) -> F:
    """Mark a decode region for compilation on CUDA (see the module docstring)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if not _state["on"] or first is None or not first.is_cuda:
            return fn(*args, **kwargs)
        c = _compiled.get(fn)
        if c is None:
            c = _compiled[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
        n0 = _frame_count()
        t0 = time.perf_counter()
        out = c(*args, **kwargs)
        if _frame_count() != n0:  # this call compiled
            _state["compile_s"] += time.perf_counter() - t0
        return out

    return run  # type: ignore[return-value]


def _frame_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
