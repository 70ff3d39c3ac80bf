"""The MTP block's side of a session: its window state and what it needs from the main model.

V4 ships one MTP block (`mtp.0.*`, docs/architecture.md §3.5): a standard block with SWA-only
attention over its own window, fed at position t with the main model's final streams at t and the
embedding of the token at t + 1; its logits are for the token at t + 2. `MtpTrack` keeps, for one
session:

- the block's decode state (one SWA layer: the window ring of W rows);
- the main model's final streams of the last W positions (a ring), since the block at position
  t attends to positions t - W + 1 .. t and their rows are only right when computed from the main
  model's streams and the tokens that really followed;
- an undo log of the ring rows a draft overwrote.

A call at the position the main model reached (`logits(next_token)` right after a forward) first
puts back the rows drafts overwrote, then runs the block over the positions it has not computed
from the main model yet (the window at most, as one chunk), then at t with `next_token`. A chained
call (again before the main model moves) runs the block at the next position on the previous
call's output streams, as a chain of drafts does. Rows computed from a draft input are logged and
undone at the next fresh call, so what the main model accepts is recomputed from its own streams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from homeseek.state import SessionState

if TYPE_CHECKING:
    from homeseek.engine import Engine


class MtpTrack:
    """One session's MTP window and the main-model streams it is computed from."""

    def __init__(self, engine: Engine) -> None:
        cfg, rt = engine.cfg, engine.rt
        self.engine = engine
        self.layer = cfg.num_hidden_layers  # the block's layer id
        self.W = cfg.sliding_window
        # An arena of its own (eager): the block never runs inside the decode graphs.
        self.state = SessionState(cfg, rt, [self.layer])
        N, D = cfg.hc_mult, cfg.hidden_size
        self.finals = torch.zeros(self.W, N, D, dtype=rt.dtype, device=rt.device)
        self.main_pos = 0  # positions the main model has consumed
        self.true_until = 0  # ring rows of positions below this hold main-model rows
        self.undo: list[tuple[int, torch.Tensor]] = []  # (ring row, its content before a draft)
        self.chain: torch.Tensor | None = None  # the last call's output streams [N, D]
        self.chain_pos = 0  # where a chained call runs

    @property
    def window(self) -> torch.Tensor:
        return self.state.layers[self.layer].window  # [W, Dh]

    def observe(self, X: torch.Tensor) -> None:
        """The main model consumed len(X) tokens from `main_pos`: X [T, N, D] their final
        streams (before hc_head)."""
        T = X.shape[0]
        keep = X[-self.W :]
        start = self.main_pos + T - keep.shape[0]
        rows = torch.arange(start, start + keep.shape[0]) % self.W
        self.finals[rows.to(self.finals.device)] = keep.to(self.finals.dtype)
        self.main_pos += T
        self.chain = None  # the next call is fresh, at the new position

    def rewind(self, main_pos: int) -> None:
        """The main model went back to `main_pos` (a rollback): later calls are fresh there."""
        self.main_pos = main_pos
        self.true_until = min(self.true_until, max(main_pos - 1, 0))
        self.chain = None

    def reset(self) -> None:
        self.state.reset()
        self.finals.zero_()
        self.main_pos = self.true_until = self.chain_pos = 0
        self.undo.clear()
        self.chain = None

    def logits(self, next_token: int, tokens: list[int]) -> torch.Tensor:
        """The block's logits [vocab] fp32 for the token after `next_token` (tokens: every id
        the main model consumed, in order)."""
        eng = self.engine
        dev = eng.rt.device
        if self.main_pos == 0:
            raise ValueError("mtp_logits needs at least one consumed token (forward first)")
        if self.chain is None:  # fresh: at the position the main model reached
            for row, old in reversed(self.undo):
                self.window[row] = old
            self.undo.clear()
            t = self.main_pos - 1
            start = max(self.true_until, t - self.W + 1, 0)
            if start < t:  # the rows the main model has fed since, from its own streams
                pos = torch.arange(start, t)
                ids = torch.tensor(tokens[start + 1 : t + 1], dtype=torch.long, device=dev)
                self.state.pos = start
                eng.runner.mtp_step(
                    self.finals[(pos % self.W).to(dev)], ids, self.state, eng.mtp, eng.mtp_top
                )
            self.true_until = t
            X_L = self.finals[t % self.W]
        else:  # chained: the next position, on the previous call's output
            t = self.chain_pos
            X_L = self.chain
        # Position t's row comes from an input the main model may not confirm: log it.
        row = t % self.W
        self.undo.append((row, self.window[row].clone()))
        self.state.pos = t
        ids = torch.tensor([int(next_token)], dtype=torch.long, device=dev)
        logits, X = eng.runner.mtp_step(X_L[None], ids, self.state, eng.mtp, eng.mtp_top)
        self.chain, self.chain_pos = X[0], t + 1
        return logits[0]
