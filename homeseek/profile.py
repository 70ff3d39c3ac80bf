"""Routing traces and profiles: which experts a model touches, in decode order.

A trace is a list of steps (layer, expert ids of one token at that layer), ordered token-major,
layer-minor: the order in which a decode loop asks the expert store. It can be recorded cheaply
from chunked prefill (routing of a token does not depend on how its sequence was chunked). A
profile is the per-(layer, expert) count of a trace; its top entries are a hot set to pin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

Step = tuple[int, list[int]]


def record_routing(eng, n_tokens: int, chunk: int = 256, seed: int = 0) -> list[Step]:  # noqa: ANN001
    """Run `n_tokens` random token ids through a fresh session; return the decode-order trace."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, eng.cfg.vocab_size, (n_tokens,), generator=g).tolist()
    sess = eng.session()
    steps: list[Step] = []
    sched = eng.scheduler
    sched.trace = []
    try:
        for a in range(0, n_tokens, chunk):
            sched.trace.clear()
            sess.forward(ids[a : a + chunk], last_only=True)
            by_layer = list(sched.trace)  # [(layer, sel [T, K])] in layer order
            T = by_layer[0][1].shape[0]
            for t in range(T):
                for layer, sel in by_layer:
                    steps.append((layer, sel[t].tolist()))
    finally:
        sched.trace = None
    return steps


def save_trace(path: str | Path, steps: list[Step]) -> None:
    layers = np.array([s[0] for s in steps], dtype=np.int32)
    experts = np.array([s[1] for s in steps], dtype=np.int32)
    np.savez_compressed(path, layers=layers, experts=experts)


def load_trace(path: str | Path) -> list[Step]:
    d = np.load(path)
    return [(int(layer), e.tolist()) for layer, e in zip(d["layers"], d["experts"], strict=True)]


def routing_profile(steps: list[Step], n_layers: int, n_experts: int) -> np.ndarray:
    """counts [n_layers, n_experts]."""
    counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    for layer, experts in steps:
        counts[layer, experts] += 1
    return counts


def write_profile(path: str | Path, counts: np.ndarray) -> None:
    Path(path).write_text(json.dumps({"format": "homeseek-routing-1", "counts": counts.tolist()}))


def hot_set(path: str | Path, n: int) -> list[tuple[int, int]]:
    """The n most used (layer, expert) of a profile file, most used first."""
    d = json.loads(Path(path).read_text())
    if d.get("format") != "homeseek-routing-1":
        raise ValueError(f"{path}: not a homeseek routing profile")
    counts = np.asarray(d["counts"])
    order = np.argsort(-counts, axis=None, kind="stable")[:n]
    return [(int(i // counts.shape[1]), int(i % counts.shape[1])) for i in order]
