"""Routed-expert weights: where each (layer, expert) record lives and how it reaches the math.

`ResidentExperts` is the simplest store: every expert record read from the checkpoint once, kept
packed (FP4 + E8M0, never BF16) on the engine's device. It serves CPU runs and any model whose
experts fit; the tiered GPU/pinned/disk store replaces it behind the same `get` call.
"""

from __future__ import annotations

from tqdm import tqdm

from homeseek.checkpoint import Checkpoint, QWeight, layer_prefix
from homeseek.config import ModelConfig


class ResidentExperts:
    """All routed experts of the listed layers, resident on `device` in their stored format."""

    def __init__(
        self,
        ckpt: Checkpoint,
        cfg: ModelConfig,
        layers: list[int],
        device: str,
        progress: bool = False,
    ) -> None:
        self.records: dict[tuple[int, int], tuple[QWeight, QWeight, QWeight]] = {}
        self.lookups = 0
        total = len(layers) * cfg.n_routed_experts
        with tqdm(total=total, desc="loading experts", unit="exp", disable=not progress) as bar:
            for layer in layers:
                pre = layer_prefix(cfg, layer)
                for e in range(cfg.n_routed_experts):
                    ws = tuple(
                        ckpt.get_weight(f"{pre}ffn.experts.{e}.{w}.weight").to(device)
                        for w in ("w1", "w3", "w2")
                    )
                    self.records[(layer, e)] = ws  # type: ignore[assignment]
                    bar.update(1)

    def get(self, layer: int, expert: int) -> tuple[QWeight, QWeight, QWeight]:
        self.lookups += 1
        return self.records[(layer, expert)]
