"""Token sampling on the logits' device: greedy, temperature, top-k, top-p, seeded; OpenAI's
presence/frequency penalties and logit_bias; log-probabilities of the chosen and top tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (chat) and logprobs (completions)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0  # generation_config.json of V4-Flash: 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # benchmarks: always run to max_tokens
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per earlier occurrence
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to logit
    logprobs: int | None = None  # None: none; n: the chosen token's and the n most likely

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability and the `n` most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (id, logprob), most likely first


def logprobs_of(logits: torch.Tensor, ids: torch.Tensor, n: int) -> list[TokenLogprob]:
    """logits [T, V] (each row predicts the next token), ids [T] the tokens that followed.

    Log-softmax of the raw model logits: before logit_bias, penalties, temperature, top-k and
    top-p, so the numbers say what the model predicts whatever the sampling settings (vLLM's
    default; OpenAI does not document its order). One host read for all T rows.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, ids.reshape(-1, 1).to(lp.device)).squeeze(-1).tolist()
    top_v, top_i = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
    tv, ti = top_v.tolist(), top_i.tolist()
    return [
        TokenLogprob(int(t), c, tuple(zip(i, v, strict=True)))
        for t, c, i, v in zip(ids.reshape(-1).tolist(), chosen, ti, tv, strict=True)
    ]


class Sampler:
    """Draws one token id per call; owns the random generator and the token counts of one
    request (the penalties see only the tokens this sampler drew, as OpenAI's do)."""

    def __init__(self, params: SamplingParams, device: torch.device | str) -> None:
        self.params = params
        self.device = device
        self.gen = torch.Generator(device=device)
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()
        self.penalized = bool(params.presence_penalty or params.frequency_penalty)
        self.counts: torch.Tensor | None = None  # [V] fp32 on the device, built on first call
        self.bias: torch.Tensor | None = None  # [V] fp32, or None when no logit_bias
        self._ready = False  # counts and bias need the vocabulary size: built on first call

    def _setup(self, vocab: int) -> None:
        p = self.params
        self._ready = True
        if self.penalized:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)
        if p.logit_bias:
            bad = [t for t in p.logit_bias if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"logit_bias token id {bad[0]} is outside [0, {vocab})")
            self.bias = torch.zeros(vocab, dtype=torch.float32)
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            self.bias[ids] = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)
            self.bias = self.bias.to(self.device)

    def adjusted(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """logits [V] plus logit_bias minus OpenAI's penalties over the tokens drawn so far
        (and `pending`, as if drawn too): logit[j] -= count[j] * frequency_penalty
        + (count[j] > 0) * presence_penalty."""
        if not self._ready:
            self._setup(logits.shape[-1])
        x = logits.float()
        if self.bias is not None:
            x = x + self.bias
        counts = self.counts
        if counts is not None:
            if pending:
                ids = torch.tensor(list(pending), dtype=torch.long, device=counts.device)
                counts = counts + torch.bincount(ids, minlength=counts.shape[0]).float()
            p = self.params
            x = x - counts * p.frequency_penalty - (counts > 0).float() * p.presence_penalty
        return x

    def _shaped(self, x: torch.Tensor) -> torch.Tensor:
        """Adjusted logits -> temperature, top-k and top-p applied (temperature > 0)."""
        p = self.params
        x = x / p.temperature
        if p.top_k:
            kth = torch.topk(x, min(p.top_k, x.shape[-1])).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = probs.cumsum(-1) - probs >= p.top_p
            x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
        return x

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One id from the distribution probs [V] (this sampler's generator)."""
        # Exponential-race sampling: argmax(p / Exp(1)) draws from p without a host sync.
        race = torch.empty_like(probs).exponential_(1, generator=self.gen)
        return (probs / race).argmax()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] fp32 -> token id (0-dim int64 tensor, still on the device)."""
        x = self.adjusted(logits)
        if self.params.temperature == 0:
            tok = x.argmax()
        else:
            tok = self.draw(torch.softmax(self._shaped(x), dim=-1))
        self.note(tok)
        return tok

    def note(self, tok: torch.Tensor | int) -> None:
        """Count a token as drawn (the penalties see it from now on)."""
        if self.counts is not None:  # on the device: no host sync
            t = torch.as_tensor(tok, device=self.counts.device).reshape(1)
            self.counts.scatter_add_(0, t, torch.ones(1, device=self.counts.device))

    def dist(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """The distribution [V] fp32 this sampler draws from for logits [V], as if the tokens
        `pending` had been drawn first (speculative decoding: the target and draft
        distributions of a position after unconfirmed drafts). Greedy: one-hot at the argmax."""
        x = self.adjusted(logits, pending)
        if self.params.temperature == 0:
            return torch.nn.functional.one_hot(x.argmax(), x.shape[-1]).float()
        return torch.softmax(self._shaped(x), dim=-1)

    def logprobs(self, logits: torch.Tensor, tok: torch.Tensor | int) -> TokenLogprob:
        """The drawn token's log-probability and the top `params.logprobs` (raw logits)."""
        n = self.params.logprobs or 0
        ids = torch.as_tensor(tok, device=logits.device).reshape(1)
        return logprobs_of(logits.reshape(1, -1), ids, n)[0]
