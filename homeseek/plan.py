"""Memory plan: what goes on the GPU, in pinned host RAM and on disk, for given budgets.

Dense weights (everything but routed experts), per-session decode state and a workspace must fit
the GPU budget; what is left of it becomes the expert slot pool. Experts that do not fit the pool
live in pinned host RAM up to the host budget, and the rest stay memory-mapped on disk.
"""

from __future__ import annotations

import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from homeseek.checkpoint import ST_SIZES, stored_shapes, tensor_table
from homeseek.config import CSA, HCA, ModelConfig
from homeseek.experts import record_bytes

GiB = 2**30
# Activations, logits and kernel scratch at batch 1 (T <= prefill chunk); measured headroom.
WORKSPACE_BYTES = int(1.5 * GiB)
# Host RAM left to the OS and the rest of the process when pinning by default.
HOST_RESERVE_FRACTION = 0.25
# Share of the GPU memory free at start that the engine takes by default: the rest is left to the
# CUDA context's own growth (cuBLAS/Triton workspaces) and to a desktop sharing the card.
GPU_FREE_FRACTION = 0.9


def _bytes(shapes: dict[str, tuple]) -> int:
    total = 0
    for shape, dtypes in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n * ST_SIZES[dtypes[0]]
    return total


def dense_bytes(cfg: ModelConfig, include_mtp: bool = False) -> int:
    """Stored bytes of every non-expert tensor (FP8 stays FP8 on the GPU)."""
    total = 0
    for name, spec in tensor_table(cfg).items():
        if ".experts." in name or (name.startswith("mtp.") and not include_mtp):
            continue
        total += _bytes(stored_shapes(name, spec, cfg))
    return total


def state_bytes(cfg: ModelConfig, max_context: int, act_bytes: int = 2) -> int:
    """Decode state of one session at max_context, activation dtype act_bytes
    (docs/architecture.md §4)."""
    total = 0
    for i in range(cfg.num_hidden_layers):
        total += cfg.sliding_window * cfg.head_dim * act_bytes
        kind, m = cfg.attn_kind(i), cfg.compress_ratios[i]
        if kind in (CSA, HCA):
            c = 2 if kind == CSA else 1
            total += (max_context // m) * cfg.head_dim * act_bytes + 4 * m * 4 * c * cfg.head_dim
        if kind == CSA:
            total += (max_context // m) * cfg.index_head_dim * act_bytes
            total += 4 * m * 4 * 2 * cfg.index_head_dim
    return total


@dataclass(frozen=True)
class MemoryPlan:
    gpu_budget: int
    host_budget: int
    dense: int
    state: int
    workspace: int
    record: int
    n_experts: int
    gpu_slots: int
    host_slots: int
    disk_experts: int

    @property
    def fits(self) -> bool:
        return self.dense + self.state + self.workspace <= self.gpu_budget

    @property
    def min_gpu_gb(self) -> float:
        """Smallest gpu_mem_gb that holds the dense part plus a few expert slots."""
        need = self.dense + self.state + self.workspace + 8 * self.record
        return need / GiB

    def lines(self, hypothetical: bool = False) -> list[str]:
        """The plan as text; `hypothetical`: the GPU budget is an example, not this machine's."""
        g = GiB
        out = [
            f"GPU budget {self.gpu_budget / g:.1f} GiB: dense weights {self.dense / g:.2f} GiB, "
            f"decode state {self.state / g:.2f} GiB, workspace {self.workspace / g:.2f} GiB, "
            f"expert pool {self.gpu_slots} slots x {self.record / 2**20:.2f} MiB "
            f"= {self.gpu_slots * self.record / g:.2f} GiB",
            f"pinned host {self.host_budget / g:.1f} GiB: {self.host_slots} experts",
            f"disk (memory-mapped): {self.disk_experts} experts",
            f"experts total {self.n_experts}: "
            f"{100 * self.gpu_slots / max(self.n_experts, 1):.1f}% on GPU, "
            f"{100 * self.host_slots / max(self.n_experts, 1):.1f}% pinned",
        ]
        card = f"a hypothetical {self.gpu_budget / g:g} GiB card" if hypothetical else None
        if self.fits:
            out.append(f"fits {card}: yes" if card else "fits: yes")
        else:
            out.append(
                f"fits{' ' + card if card else ''}: NO - the dense part needs "
                f"{self.min_gpu_gb:.1f} GiB of GPU memory; raise --gpu-mem-gb (Python: gpu_mem_gb) "
                f"to at least {self.min_gpu_gb:.1f} or lower --max-context"
            )
        return out


def memory_plan(
    cfg: ModelConfig,
    gpu_mem_gb: float,
    host_mem_gb: float,
    max_context: int,
    act_bytes: int = 2,
    sessions: int = 1,
) -> MemoryPlan:
    """The GPU split for `sessions` sessions of decode state at max_context each."""
    dense = dense_bytes(cfg)
    state = sessions * state_bytes(cfg, max_context, act_bytes)
    record = record_bytes(cfg)
    n = cfg.num_hidden_layers * cfg.n_routed_experts
    gpu = int(gpu_mem_gb * GiB)
    host = int(host_mem_gb * GiB)
    free = gpu - dense - state - WORKSPACE_BYTES
    gpu_slots = max(0, min(n, free // record))
    host_slots = max(0, min(n - gpu_slots, host // record))
    return MemoryPlan(
        gpu_budget=gpu,
        host_budget=host,
        dense=dense,
        state=state,
        workspace=WORKSPACE_BYTES,
        record=record,
        n_experts=n,
        gpu_slots=gpu_slots,
        host_slots=host_slots,
        disk_experts=n - gpu_slots - host_slots,
    )


# --- what this machine has -----------------------------------------------------------------------
def host_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM from /proc/meminfo; (0, 0) where it is not readable."""
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return info.get("MemTotal", 0), info.get("MemAvailable", 0)


def default_host_budget_gb() -> float:
    """A safe fraction of available RAM for pinned experts (the default of --host-mem-gb)."""
    _, avail = host_memory()
    return avail * (1 - HOST_RESERVE_FRACTION) / GiB


def default_gpu_budget_gb(device: str = "cuda") -> float | None:
    """The default of --gpu-mem-gb: GPU memory free at start (plus what torch already holds in
    this process) x GPU_FREE_FRACTION, on `device`; None where there is no CUDA device.

    The one rule the CLI (generate, serve, chat, profile) and `homeseek doctor` share, and the
    same one `Engine` applies when `load()` gets no gpu_mem_gb.
    """
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    return (free + torch.cuda.memory_allocated(dev)) / GiB * GPU_FREE_FRACTION


def pinned_limit() -> int | None:
    """RLIMIT_MEMLOCK in bytes (None = unlimited). CUDA pinning is not bound by it, mlock is."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def disk_free(path: str | os.PathLike) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
