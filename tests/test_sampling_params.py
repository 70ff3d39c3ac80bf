"""OpenAI sampling parameters on the device sampler and through `Engine.generate`: presence and
frequency penalties, logit_bias, logprobs. References are computed with plain torch from the same
logits (`Session.forward`), never from the sampler's own code."""

from __future__ import annotations

import pytest
import torch

import homeseek
from homeseek.sampling import Sampler, SamplingParams

PROMPT = [0, 5, 17, 29, 300, 41, 7]


def _ref_adjust(
    logits: torch.Tensor, drawn: list[int], pp: float, fp: float, bias: dict[int, float]
) -> torch.Tensor:
    """OpenAI's definition, written out: mu[j] - c[j] * fp - (c[j] > 0) * pp + bias[j]."""
    x = logits.double().clone()
    for j, b in bias.items():
        x[j] += b
    for j in set(drawn):
        c = drawn.count(j)
        x[j] -= c * fp + pp
    return x


@pytest.mark.parametrize("pp,fp", [(0.0, 2.0), (2.0, 0.0), (1.5, -0.5), (-2.0, 0.0)])
def test_penalties_and_bias_follow_openai_definition(pp: float, fp: float) -> None:
    g = torch.Generator().manual_seed(1)
    # Few distinct large logits so that penalties change the greedy choice within a few steps.
    base = torch.randn(50, generator=g)
    base[:4] += 6.0
    bias = {10: 3.0, 2: -1.0}
    s = Sampler(
        SamplingParams(temperature=0, presence_penalty=pp, frequency_penalty=fp, logit_bias=bias),
        "cpu",
    )
    drawn: list[int] = []
    for step in range(12):
        logits = base + 0.01 * step
        want = int(_ref_adjust(logits, drawn, pp, fp, bias).argmax())
        got = int(s(logits))
        assert got == want, (step, drawn)
        drawn.append(got)
    if pp > 0 or fp > 0:
        assert len(set(drawn)) > 1  # the penalty moved the greedy choice off one token


def test_logit_bias_forbids_and_forces_when_sampling() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(100, generator=g) * 3
    top = int(logits.argmax())
    ban = Sampler(SamplingParams(seed=0, logit_bias={top: -100.0}), "cpu")
    assert all(int(ban(logits)) != top for _ in range(200))
    force = Sampler(SamplingParams(seed=0, logit_bias={7: 100.0}), "cpu")
    assert all(int(force(logits)) == 7 for _ in range(50))
    with pytest.raises(ValueError, match="outside"):
        Sampler(SamplingParams(logit_bias={100: 1.0}), "cpu")(logits)


@pytest.mark.parametrize(
    "kw", [{"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"logprobs": 21}]
)
def test_bad_openai_params(kw: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kw)


@pytest.fixture(scope="module")
def eng():
    return homeseek.load("tiny", dtype=torch.float32, max_context=256)


def test_logprobs_match_log_softmax_of_session_logits(eng) -> None:
    """Generated and prompt logprobs equal torch.log_softmax of `Session.forward` logits."""
    res = eng.generate(
        prompt_ids=PROMPT, max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=True
    )
    assert len(res.logprobs) == len(res.token_ids) == 6
    sess = eng.session()
    with torch.inference_mode():
        ref_prompt = torch.log_softmax(sess.forward(PROMPT), dim=-1)
        rows = [ref_prompt[-1]]
        for t in res.token_ids[:-1]:
            rows.append(torch.log_softmax(sess.decode(t), dim=-1))
    # Prompt: position 0 has no predecessor; row i - 1 predicts PROMPT[i].
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        lp = res.prompt_logprobs[i]
        assert lp.token_id == PROMPT[i]
        assert lp.logprob == pytest.approx(float(ref_prompt[i - 1, PROMPT[i]]), abs=1e-5)
        assert [t for t, _ in lp.top] == ref_prompt[i - 1].topk(3).indices.tolist()
    for lp, tok, row in zip(res.logprobs, res.token_ids, rows, strict=True):
        assert lp.token_id == tok == int(row.argmax())  # greedy picks the most likely
        assert lp.logprob == pytest.approx(float(row[tok]), abs=1e-5)
        top_ids = [t for t, _ in lp.top]
        assert top_ids == row.topk(3).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-5)


def test_logprobs_are_raw_model_logprobs_not_after_bias(eng) -> None:
    """Documented choice: logprobs are of the raw logits, before bias and penalties."""
    plain = eng.generate(prompt_ids=PROMPT, max_tokens=1, temperature=0, logprobs=0)
    first = plain.token_ids[0]
    biased = eng.generate(
        prompt_ids=PROMPT, max_tokens=1, temperature=0, logprobs=0, logit_bias={first: -100.0}
    )
    assert biased.token_ids[0] != first
    # The forced-away token's probability is reported as the model has it, not after the bias.
    assert biased.logprobs[0].logprob < plain.logprobs[0].logprob
    assert biased.logprobs[0].top == ()


def test_generate_penalties_match_reference_loop(eng) -> None:
    fp, pp = 1.5, 0.5
    res = eng.generate(
        prompt_ids=PROMPT, max_tokens=10, temperature=0, frequency_penalty=fp, presence_penalty=pp
    )
    sess = eng.session()
    want: list[int] = []
    with torch.inference_mode():
        logits = sess.forward(PROMPT)[-1]
        for _ in range(10):
            tok = int(_ref_adjust(logits, want, pp, fp, {}).argmax())
            if tok == eng.cfg.eos_token_id:
                break
            want.append(tok)
            logits = sess.decode(tok)
    assert res.token_ids == want
    plain = eng.generate(prompt_ids=PROMPT, max_tokens=10, temperature=0)
    assert len(set(res.token_ids)) >= len(set(plain.token_ids))
