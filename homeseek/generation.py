"""One request's decode loop (docs/engine.md §3): sample, stream text, stop on EOS, a stop
string, the length limit or cancellation, and gather the result and its stats.

The engine builds a `Generation` per `Engine.generate` call; it drives the session one token at a
time (`Session.decode`), or with drafts a speculative step at a time (`speculative.step`: several
tokens per verifying forward), and never touches the model, the runner or the expert store except
to read the store's counters for the stats.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from homeseek import speculative
from homeseek.sampling import Sampler, SamplingParams, TokenLogprob, logprobs_of
from homeseek.speculative import DraftSource

if TYPE_CHECKING:
    from homeseek.engine import Engine, Session


@dataclass
class GenerationResult:
    text: str  # the raw completion text (reasoning, content and any tool-call block)
    content: str
    reasoning: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    token_ids: list[int]
    prompt_ids: list[int]
    stats: dict[str, float] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt id, when asked


class Generation:
    """One request's decode loop: sample, stream text, stop on EOS / stop string / length."""

    def __init__(
        self,
        eng: Engine,
        sess: Session,
        params: SamplingParams,
        thinking: bool,
        stream: Callable[[str], None] | None,
        cancel: Callable[[], bool] | None = None,
        prompt_logprobs: bool = False,
        stream_logprobs: Callable[[list[TokenLogprob]], None] | None = None,
        drafts: DraftSource | None = None,
    ) -> None:
        """drafts: speculative decoding with eng.rt.mtp drafts per step from this source."""
        self.eng, self.sess, self.params, self.thinking = eng, sess, params, thinking
        self.stream, self.cancel = stream, cancel
        self.prompt_logprobs = prompt_logprobs
        self.tok = eng.tokenizer
        self.decoder = self.tok.stream_decoder() if self.tok is not None else None
        self.text = ""  # decoded completion so far
        self.sent = 0  # characters of self.text already streamed
        self.ends: list[int] = []  # len(self.text) after each generated token
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.stream_logprobs = stream_logprobs
        self.lps: list[TokenLogprob] | None = None  # generated tokens' logprobs, when asked
        self.lp_sent = 0  # of them, how many went to stream_logprobs
        self.drafts = drafts
        self.drafted = self.accepted = self.verify_steps = 0

    def _emit(self, final: bool) -> None:
        # Hold back the last len(longest stop)-1 characters: they may start a stop string.
        upto = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        if self.stream is not None and upto > self.sent:
            self.stream(self.text[self.sent : upto])
        self.sent = max(self.sent, upto)
        if self.stream_logprobs is not None and self.lps is not None:
            # The tokens whose text is wholly out (a stop string can no longer drop them); at the
            # end every token kept.
            n = (
                len(self.lps)
                if final
                else min(bisect.bisect_right(self.ends, self.sent), len(self.lps))
            )
            if n > self.lp_sent:
                self.stream_logprobs(self.lps[self.lp_sent : n])
                self.lp_sent = n

    def _hit_stop(self, out: list[int]) -> bool:
        """Cut the text at the first stop string; drop the tokens whose text lies wholly past
        the cut, so token_ids and usage describe what the caller receives."""
        cut = min((i for s in self.params.stop if (i := self.text.find(s)) >= 0), default=-1)
        if cut < 0:
            return False
        self.text = self.text[:cut]
        keep = sum(1 for start in [0, *self.ends[:-1]] if start < cut)
        del out[keep:]
        return True

    def _take(self, tok: int, logits: torch.Tensor) -> str | None:
        """A drawn token (logits: its row, for logprobs) into the output -> "stop" when it ends
        the completion (EOS, a stop string), else None."""
        p, out = self.params, self.out
        if tok == self.eos and not p.ignore_eos:
            return "stop"
        out.append(tok)
        if self.lps is not None:
            self.lps.append(self.sampler.logprobs(logits, tok))
        if self.decoder is not None:
            self.text += self.decoder.feed(tok)
            self.ends.append(len(self.text))  # text length after each token
            if p.stop and self._hit_stop(out):
                return "stop"
            self._emit(final=False)
        return None

    def _speculate(self, tok: int) -> tuple[str | None, int]:
        """One speculative step after `tok` (drawn and taken, not consumed): drafts, one
        verifying forward, acceptance, rollback of what was not kept -> (finish, the last token
        taken)."""
        eng, sess, sampler, p = self.eng, self.sess, self.sampler, self.params
        k = min(eng.rt.mtp, eng.rt.max_context - sess.pos - 2, p.max_tokens - len(self.out))
        if k < 1:  # no room for a draft: a plain step
            logits = sess.decode(tok)
            nxt = int(sampler(logits))
            return self._take(nxt, logits), nxt
        st = speculative.step(sess, tok, k, sampler, self.drafts)
        self.drafted += st.drafted
        self.accepted += st.accepted
        self.verify_steps += 1
        for i, (t, row) in enumerate(zip(st.tokens, st.rows, strict=True)):
            sampler.note(t)
            finish = self._take(t, row)
            if finish is None and len(self.out) >= p.max_tokens:
                finish = "length"
            if finish is not None:  # the session fed kept drafts past this one: undo them
                speculative.settle(sess, tok, st, i)
                return finish, t
        return None, st.tokens[-1]

    def run(self, prompt: list[int]) -> GenerationResult:
        eng, p = self.eng, self.params
        sampler = Sampler(p, eng.rt.device)
        eos = eng.cfg.eos_token_id
        c0 = dataclasses.replace(eng.experts.counters)
        t0 = time.perf_counter()
        all_logits = self.sess.forward(prompt, last_only=not self.prompt_logprobs)
        logits = all_logits[-1]
        prompt_lps: list[TokenLogprob | None] | None = None
        if self.prompt_logprobs:  # row i predicts prompt[i + 1]
            ids = torch.tensor(prompt[1:], dtype=torch.long)
            prompt_lps = [None, *logprobs_of(all_logits[:-1], ids, p.logprobs or 0)]
        del all_logits
        t_prefill = time.perf_counter() - t0
        self.out: list[int] = []
        out = self.out
        self.lps = [] if p.logprobs is not None else None
        self.sampler, self.eos = sampler, eos
        t1 = time.perf_counter()
        tok = int(sampler(logits))  # the one device->host read per token (two with logprobs)
        ttft = time.perf_counter() - t0
        finish = self._take(tok, logits)
        while finish is None:
            if len(out) >= p.max_tokens or self.sess.pos + 1 >= eng.rt.max_context:
                finish = "length"
            elif self.cancel is not None and self.cancel():
                finish = "cancelled"
            elif self.drafts is not None:
                finish, tok = self._speculate(tok)
            else:
                logits = self.sess.decode(tok)
                tok = int(sampler(logits))
                finish = self._take(tok, logits)
        lps = self.lps
        if self.decoder is not None and finish == "length":
            self.text += self.decoder.finish()
            if self.ends:
                self.ends[-1] = len(self.text)
            if p.stop and self._hit_stop(out):
                finish = "stop"
        if lps is not None:
            del lps[len(out) :]  # a stop string dropped tokens from `out`
        self._emit(final=True)
        t_decode = time.perf_counter() - t1
        parsed = {"content": self.text, "reasoning_content": None, "tool_calls": []}
        if self.tok is not None:
            from homeseek.chat import parse_completion

            try:
                parsed = parse_completion(self.text, "thinking" if self.thinking else "chat")
            except ValueError:  # malformed tool-call block: hand back the raw text as content
                parsed = {"content": self.text, "reasoning_content": None, "tool_calls": []}
        if parsed["tool_calls"] and finish == "stop":
            finish = "tool_calls"
        n_dec = max(len(out) - 1, 0)
        stats = {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(out),
            "ttft_s": ttft or 0.0,
            "prefill_s": t_prefill,
            "prefill_tok_s": len(prompt) / t_prefill if t_prefill > 0 else 0.0,
            "decode_tok_s": n_dec / t_decode if t_decode > 0 and n_dec else 0.0,
        }
        c = eng.experts.counters
        stats.update(
            expert_lookups=float(c.lookups - c0.lookups),
            expert_hit_rate=(c.gpu_hits - c0.gpu_hits) / max(c.lookups - c0.lookups, 1),
            expert_bytes_h2d=float(c.bytes_h2d - c0.bytes_h2d),
            expert_bytes_disk=float(c.bytes_disk - c0.bytes_disk),
            cpu_lane_experts=float(c.cpu_lane - c0.cpu_lane),
        )
        if self.drafts is not None:
            stats.update(
                mtp_drafted=float(self.drafted),
                mtp_accepted=float(self.accepted),
                mtp_acceptance=self.accepted / self.drafted if self.drafted else 0.0,
                mtp_tokens_per_step=(
                    (self.accepted + self.verify_steps) / self.verify_steps
                    if self.verify_steps
                    else 0.0
                ),
            )
        return GenerationResult(
            text=self.text,
            content=parsed["content"],
            reasoning=parsed["reasoning_content"],
            tool_calls=parsed["tool_calls"],
            finish_reason=finish,
            token_ids=out,
            prompt_ids=prompt,
            stats=stats,
            logprobs=lps,
            prompt_logprobs=prompt_lps,
        )
