"""Speculative decoding: drafts from the MTP block (or a test source), verified by one main-model
step over all of them, accepted so that the output is what plain decoding would give.

One step, with `tok` drawn but not yet consumed:

1. The draft source proposes k tokens d1..dk (and the distributions q_i it drew them from).
2. The main model consumes [tok, d1..dk] in one verify step (`Session.verify`: decode's graphs
   for each token, each layer's experts loaded once for all) -> rows L0..Lk; L_{i-1} predicts
   the position of d_i and Lk the one after dk.
3. `accept`: greedy (temperature 0) keeps the drafts while each equals the argmax of its target
   row, then takes the argmax of the next row; sampling keeps d_i with probability
   min(1, p_i(d_i) / q_i(d_i)) and on the first rejection draws from norm(max(0, p_i - q_i)),
   or after k acceptances from p_{k+1} (Leviathan et al., 2023; Chen et al., 2023): the tokens
   are distributed exactly as plain sampling's. The target distributions p_i are the sampler's
   own (logit_bias, penalties as if the earlier drafts were drawn, temperature, top-k, top-p).
4. When j < k drafts were kept, what the rejected ones wrote is undone in place
   (`Session.truncate`: their window and partial-block rows and, if one completed a block, the
   overlap halves come back from the snapshot taken before the step; compressed entries written
   past the position are masked until the sequence reaches them again and rewrites them). Where
   the rings are shorter than the step, the session rolls back to the snapshot and consumes
   [tok, d1..dj] again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from homeseek.sampling import Sampler

if TYPE_CHECKING:
    from homeseek.engine import Session


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    # The distribution each token was drawn from [V] fp32; None: proposed deterministically
    # (a point mass at the token).
    q: list[torch.Tensor | None] = field(default_factory=list)
    # Benchmarks only (`ForcedAcceptance`): keep exactly this many drafts whatever the target
    # says; None: the acceptance rule decides.
    keep: int | None = None


class DraftSource(Protocol):
    def propose(self, sess: Session, tok: int, k: int, sampler: Sampler) -> Draft:
        """Up to k tokens to follow `tok` (drawn, not yet consumed by the session)."""
        ...


class MtpDrafts:
    """Chained drafts from the MTP block: d1 from mtp_logits(tok), d2 from mtp_logits(d1), ...;
    each drawn from the sampler's distribution over the block's logits."""

    def propose(self, sess: Session, tok: int, k: int, sampler: Sampler) -> Draft:
        d = Draft()
        cur = tok
        for _ in range(k):
            q = sampler.dist(sess.mtp_logits(cur), pending=d.tokens)
            nxt = int(q.argmax()) if sampler.params.temperature == 0 else int(sampler.draw(q))
            d.tokens.append(nxt)
            d.q.append(q)
            cur = nxt
        return d


class ForcedDrafts:
    """Tests and benchmarks: drafts from a callable (the session's tokens so far with `tok`,
    k) -> tokens, e.g. a known continuation with some of it spoiled, to exercise acceptance,
    partial acceptance and rollback at any rate on random weights."""

    def __init__(self, fn: Callable[[list[int], int], Sequence[int]]) -> None:
        self.fn = fn

    @classmethod
    def from_reference(
        cls, ref: Sequence[int], start: int, rate: float, vocab: int, seed: int = 0
    ) -> ForcedDrafts:
        """Drafts from a known continuation `ref` (e.g. plain greedy decoding's tokens), each
        kept as is with probability `rate` and otherwise replaced by the next id: with
        `start` the sequence length at which ref[0] is the token to propose, a context of
        length n gets ref[n - start :]."""
        rng = random.Random(seed)

        def fn(context: list[int], k: int) -> list[int]:
            n = len(context) - start
            return [t if rng.random() < rate else (t + 1) % vocab for t in ref[n : n + k]]

        return cls(fn)

    def propose(self, sess: Session, tok: int, k: int, sampler: Sampler) -> Draft:
        toks = [int(t) for t in self.fn([*sess.tokens, tok], k)][:k]
        return Draft(toks, [None] * len(toks))


class ForcedAcceptance:
    """Benchmarks only: the cost of speculative decoding at a given acceptance, on weights whose
    own drafts are never accepted (random ones, where near-tied logits also make any known
    continuation disagree with the verify step). Proposes k arbitrary tokens and has the step
    keep each with probability `rate` until the first it drops, whatever the model predicts:
    the verify forward, the rollback and the re-forward cost what a real acceptance of as many
    would. The tokens it produces are not the model's continuation."""

    def __init__(self, rate: float, vocab: int, seed: int = 0) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"ForcedAcceptance: rate must be in [0, 1], got {rate}")
        self.rate, self.vocab = rate, vocab
        self.rng = random.Random(seed)

    def propose(self, sess: Session, tok: int, k: int, sampler: Sampler) -> Draft:
        toks = [self.rng.randrange(self.vocab) for _ in range(k)]
        keep = 0
        while keep < k and self.rng.random() < self.rate:
            keep += 1
        return Draft(toks, [None] * k, keep=keep)


def accept(p: list[torch.Tensor], draft: Draft, sampler: Sampler) -> tuple[int, torch.Tensor]:
    """p: the target distributions [V] of the positions of d1..dk and the one after (k + 1
    rows). -> (drafts kept j, the token after them, a 0-dim tensor)."""
    greedy = sampler.params.temperature == 0
    for i, (d, q) in enumerate(zip(draft.tokens, draft.q, strict=True)):
        pi = p[i]
        if greedy:
            best = pi.argmax()
            if int(best) != d:
                return i, best
            continue
        qd = 1.0 if q is None else float(q[d])
        u = torch.rand((), generator=sampler.gen, device=pi.device)
        if float(u) < min(1.0, float(pi[d]) / qd):
            continue
        resid = pi.clone()
        if q is None:
            resid[d] = 0.0
        else:
            resid = (pi - q).clamp_min(0.0)
        total = float(resid.sum())
        # p == q up to rounding leaves nothing: then p itself (the rejection had ~0 chance)
        return i, sampler.draw(resid / total if total > 0 else pi)
    last = p[len(draft.tokens)]
    return len(draft.tokens), last.argmax() if greedy else sampler.draw(last)


@dataclass
class Step:
    """What one speculative step produced."""

    tokens: list[int]  # the kept drafts d1..dj, then the token after them (not consumed)
    rows: torch.Tensor  # [j + 1, V] the target logits row of each of those tokens
    drafted: int
    accepted: int
    snap: tuple  # the session before the step (`Session.rollback`)


def step(sess: Session, tok: int, k: int, sampler: Sampler, source: DraftSource) -> Step:
    """One speculative step after `tok` (drawn, not yet consumed): k drafts, one forward over
    [tok, drafts], acceptance, rollback of what was not kept. The session then has consumed
    tok and the kept drafts; the caller notes the returned tokens as drawn."""
    draft = source.propose(sess, tok, k, sampler)
    k = len(draft.tokens)
    snap = sess.snapshot()
    rows = sess.verify([tok, *draft.tokens])  # [k + 1, V]
    target = [sampler.dist(rows[i], pending=draft.tokens[:i]) for i in range(k + 1)]
    if draft.keep is not None:  # a benchmark's forced acceptance (ForcedAcceptance)
        j = min(draft.keep, k)
        last = target[j]
        nxt = last.argmax() if sampler.params.temperature == 0 else sampler.draw(last)
    else:
        j, nxt = accept(target, draft, sampler)
    if j < k:  # keep what was accepted: undo the rest (or all, and consume [tok, d1..dj] again)
        _keep(sess, snap, [tok, *draft.tokens[:j]])
    return Step([*draft.tokens[:j], int(nxt)], rows[: j + 1], k, j, snap)


def settle(sess: Session, tok: int, st: Step, n: int) -> None:
    """The completion ended at st.tokens[n] (or before it): leave the session holding `tok`
    and the n tokens before it, as plain decoding would (it never feeds the last token), so a
    prefix cache can extend the sequence. Nothing to do when n is the last."""
    if n < len(st.tokens) - 1:
        _keep(sess, st.snap, [tok, *st.tokens[:n]])


def _keep(sess: Session, snap: tuple, tokens: list[int]) -> None:
    """The session holds what it held at `snap` plus these tokens (the first of those consumed
    since): the rest undone in place, or, where the rings are too short for that, everything
    undone and these fed again."""
    if not sess.truncate(snap, len(tokens)):
        sess.rollback(snap)
        sess.verify(tokens)
