"""CUDA-graph capture and replay mechanism (imports only torch).

Many small graphs share one memory pool and replay in sequence on one stream, with host work
between them; see capture.py for the contract a captured function keeps.
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
