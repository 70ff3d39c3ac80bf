"""CUDA-graph capture and replay mechanism (imports only torch).

Many small graphs share one memory pool and replay in sequence on one stream, with host work
between them; see capture.py for the contract a captured function keeps. How a runner uses it:

    pool = GraphPool(device) if use_graphs and graphs_available(device) else None
    steps = GraphedStep(pool)                  # pool None / enabled=False: everything eager
    for l in range(n_layers):                  # registration order = capture order = replay order
        steps.register(("A", l, T), seg_a[l], inputs={"x": X, "pos": pos})
        steps.register(("B", l, T), seg_b[l], inputs={"slots": slot_table})
    steps.register(("H", T), head)
    steps.capture_all(warmup=2)                # failed keys are logged and run eagerly
    ...
    for l in range(n_layers):
        steps(("A", l, T))                     # replay, or the same function eagerly
        scheduler.layer(l)                     # host: read expert ids, write slot_table in place
        steps(("B", l, T))
    logits = steps(("H", T))
"""

from .capture import (
    CAPTURE_FIX,
    CaptureError,
    GraphCounters,
    GraphedStep,
    GraphPool,
    MemoryDelta,
    StaleInputError,
    StaticGraph,
    StaticInputs,
    format_capture_error,
    graphs_available,
    measure_graph_pool_bytes,
    measure_memory,
)

__all__ = [
    "CAPTURE_FIX",
    "CaptureError",
    "GraphCounters",
    "GraphPool",
    "GraphedStep",
    "MemoryDelta",
    "StaleInputError",
    "StaticGraph",
    "StaticInputs",
    "format_capture_error",
    "graphs_available",
    "measure_graph_pool_bytes",
    "measure_memory",
]
