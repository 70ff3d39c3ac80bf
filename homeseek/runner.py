"""The step: per layer segment A, the scheduler, the routed experts, segment B (docs/runtime.md).

The runner owns how a step is launched; the model owns the math, the scheduler owns which
experts are resident. Today every segment runs eagerly (the same functions CUDA graphs will
capture); `graphs=True` is refused at load until the captured path exists.
"""

from __future__ import annotations

import torch

from homeseek import model as M
from homeseek.config import ModelConfig, RuntimeConfig
from homeseek.kernels import ops
from homeseek.scheduler import Scheduler
from homeseek.state import SessionState


class Runner:
    """Runs steps of T tokens of one sequence over the loaded weights."""

    def __init__(
        self,
        cfg: ModelConfig,
        rt: RuntimeConfig,
        ctx: M.Ctx,
        top: dict[str, torch.Tensor],
        weights: list[M.LayerWeights],
        rope: M.RopeTables,
        scheduler: Scheduler,
    ) -> None:
        self.cfg, self.rt, self.ctx = cfg, rt, ctx
        self.top, self.weights, self.rope = top, weights, rope
        self.scheduler = scheduler
        self.layers = list(range(len(weights)))

    def step(self, ids: torch.Tensor, id_list: list[int], state: SessionState) -> torch.Tensor:
        """ids [T] at the state's position -> the final streams [T, N, D]; advances the state."""
        pos = torch.arange(state.pos, state.pos + ids.shape[0], device=ids.device)
        self.scheduler.begin_step(id_list)
        X = M.embed(ids, self.top["embed"], self.ctx)
        for layer in self.layers:
            p = M.segment_a(
                X, ids, pos, state.pos, self.weights[layer], state.layers[layer], layer,
                self.rope, self.ctx,
            )  # fmt: skip
            X = M.segment_b(p, self.moe(p, layer), self.ctx)
        state.pos += ids.shape[0]
        return X

    def head(self, X: torch.Tensor) -> torch.Tensor:
        return M.head_logits(X, self.top, self.ctx)

    def moe(self, p: M.FfnPending, layer: int) -> torch.Tensor:
        """Routed experts + shared expert of one layer -> [T, D] in the activation dtype.

        CUDA: the FP4 kernel reads the slot pool through a slot table. CPU: the reference loop,
        experts in id order, so the sum is bitwise the same for any pool size or wave split.
        """
        store = self.scheduler.store
        fused = self.ctx.kernels
        out = p.shared if fused else None
        acc = None if fused else torch.zeros_like(p.u, dtype=torch.float32)
        for sel, slot_of in self.scheduler.layer(layer, p.sel):
            if fused:
                slots = self.scheduler.slot_table(sel, slot_of, p.u.device)
                t = store.pool.t
                out = ops.fp4_experts(
                    p.u, slots, p.weights, out, t["w13_q"], t["w13_s"], t["w2_q"], t["w2_s"],
                    self.cfg.swiglu_limit, act_quant=self.rt.quant_sim,
                )  # fmt: skip
            else:
                weights_of = {e: store.weights(s) for e, s in slot_of.items()}.__getitem__
                sel_d = sel.to(p.u.device)
                M.routed_experts(p.u, sel_d, p.weights, sorted(slot_of), weights_of, self.ctx, acc)
        if fused:
            return out
        return (acc + p.shared.float()).to(p.u.dtype)
