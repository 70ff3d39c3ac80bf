"""Speculative decoding (homeseek/speculative.py) on CPU: greedy output identical to plain
decoding with the MTP block's drafts and with forced drafts at 100 / 50 / 0 % acceptance, across
compressor block boundaries (4, 16 and 128) and window wraps; a chi-square test that speculative
sampling keeps the target distribution; the stats."""

from __future__ import annotations

import pytest
import torch

import homeseek
from homeseek.config import tiny_config
from homeseek.sampling import Sampler, SamplingParams
from homeseek.speculative import Draft, ForcedDrafts, accept
from homeseek.synthetic import write_checkpoint

STEPS = 300
PROMPT = list(range(1000, 1040))


@pytest.fixture(scope="module", params=["tiny", "w128"])
def model(request, tmp_path_factory):
    """tiny: CSA blocks of 4, HCA of 16, window 16; w128: the real window and HCA block (128)."""
    over = {} if request.param == "tiny" else dict(
        num_hidden_layers=3, compress_ratios=(4, 128, 0, 0), sliding_window=128, num_hash_layers=1
    )  # fmt: skip
    path = write_checkpoint(
        tmp_path_factory.mktemp(request.param), tiny_config(**over), seed=11, tokenizer=False
    )
    plain = homeseek.load(path, dtype=torch.float32, max_context=512)
    ref = plain.generate(prompt_ids=PROMPT, max_tokens=STEPS, temperature=0, ignore_eos=True)
    assert len(ref.token_ids) == STEPS
    return path, ref.token_ids


def _forced(ref: list[int], rate: float) -> ForcedDrafts:
    """Proposes the plain run's next tokens, each spoiled with probability 1 - rate."""
    return ForcedDrafts.from_reference(ref, len(PROMPT), rate, 129280)


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.0])
def test_greedy_output_is_plain_decoding_with_forced_drafts(model, rate):
    path, ref = model
    eng = homeseek.load(path, dtype=torch.float32, max_context=512, mtp=3)
    r = eng.generate(
        prompt_ids=PROMPT, max_tokens=STEPS, temperature=0, ignore_eos=True,
        draft_source=_forced(ref, rate),
    )  # fmt: skip
    assert r.token_ids == ref
    st = r.stats
    assert st["mtp_drafted"] > 0
    if rate == 1.0:
        assert st["mtp_acceptance"] == 1.0 and st["mtp_tokens_per_step"] > 3.9
    elif rate == 0.0:
        assert st["mtp_accepted"] == 0 and st["mtp_tokens_per_step"] == 1.0
    else:
        assert 0.2 < st["mtp_acceptance"] < 0.8


def test_greedy_output_is_plain_decoding_with_the_mtp_block(model):
    path, ref = model
    eng = homeseek.load(path, dtype=torch.float32, max_context=512, mtp=2)
    r = eng.generate(prompt_ids=PROMPT, max_tokens=STEPS, temperature=0, ignore_eos=True)
    assert r.token_ids == ref
    assert r.stats["mtp_drafted"] >= STEPS // 3 * 2  # ~2 per step (random weights: few kept)


def test_the_session_ends_as_plain_decoding_leaves_it(model):
    """A completion that ends inside a step's kept drafts leaves the session holding the prompt
    and every generated token but the last, as plain decoding does (the server's prefix cache
    extends such a session)."""
    path, ref = model
    eng = homeseek.load(path, dtype=torch.float32, max_context=512, mtp=3)
    sess = eng.session()
    r = eng.generate(prompt_ids=PROMPT, max_tokens=6, temperature=0, ignore_eos=True,
                     session=sess, draft_source=_forced(ref, 1.0))  # fmt: skip
    assert r.token_ids == ref[:6]
    assert sess.tokens == PROMPT + r.token_ids[:-1] and sess.pos == len(sess.tokens)
    nxt = int(sess.decode(r.token_ids[-1]).argmax())  # and it goes on as plain decoding would
    assert nxt == ref[6]


def test_speculative_sampling_runs_and_counts():
    """Sampling with drafts: a seeded run completes, stats add up, logprobs per token."""
    eng = homeseek.load("tiny", dtype=torch.float32, max_context=256, mtp=2)
    r = eng.generate(prompt_ids=[5, 6, 7], max_tokens=40, temperature=0.8, seed=3,
                     ignore_eos=True, logprobs=2)  # fmt: skip
    assert len(r.token_ids) == 40 and len(r.logprobs) == 40
    st = r.stats
    assert st["mtp_accepted"] <= st["mtp_drafted"]
    assert st["mtp_tokens_per_step"] >= 1.0


# --- the acceptance rule -------------------------------------------------------------------------
V = 6
CHI2_999 = {5: 20.52}  # chi-square critical values at p = 0.001 by degrees of freedom


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    n = float(counts.sum())
    expect = p * n
    return float(((counts - expect) ** 2 / expect).sum())


@pytest.mark.parametrize("k, forced", [(1, False), (2, False), (1, True)])
def test_speculative_sampling_keeps_the_target_distribution(k, forced):
    """The first token a step emits is distributed as the target p1, whatever the drafter's q
    (drafts from q, or a fixed token): chi-square at p = 0.001 over 20,000 steps."""
    g = torch.Generator().manual_seed(1)
    p_rows = [torch.softmax(torch.randn(V, generator=g) * 1.5, 0) for _ in range(k + 1)]
    q_rows = [torch.softmax(torch.randn(V, generator=g) * 1.5, 0) for _ in range(k)]
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7), "cpu")
    counts = torch.zeros(V)
    for _ in range(20_000):
        if forced:
            d = Draft([2] * k, [None] * k)
        else:
            toks = [int(sampler.draw(q)) for q in q_rows]
            d = Draft(toks, list(q_rows))
        j, nxt = accept(p_rows, d, sampler)
        first = d.tokens[0] if j >= 1 else int(nxt)
        counts[first] += 1
    assert _chi2(counts, p_rows[0]) < CHI2_999[V - 1]


def test_greedy_acceptance_stops_at_the_first_miss():
    p = [torch.nn.functional.one_hot(torch.tensor(t), V).float() for t in (1, 2, 3)]
    sampler = Sampler(SamplingParams(temperature=0), "cpu")
    assert [accept(p, Draft([1, 2], [None, None]), sampler)[0]] == [2]
    j, nxt = accept(p, Draft([1, 4], [None, None]), sampler)
    assert (j, int(nxt)) == (1, 2)
    j, nxt = accept(p, Draft([0, 2], [None, None]), sampler)
    assert (j, int(nxt)) == (0, 1)


@pytest.mark.parametrize("rate", [1.0, 0.7, 0.0])
def test_forced_acceptance_keeps_its_share_and_a_consistent_session(model, rate):
    """The benchmarks' ForcedAcceptance: each step keeps drafts at the forced rate whatever the
    model says; the session then holds exactly the tokens produced (the verify cost of a real
    acceptance), and at rate 0 the output is plain decoding."""
    from homeseek import speculative

    path, ref = model
    eng = homeseek.load(path, dtype=torch.float32, max_context=512, mtp=3)
    sess = eng.session()
    sess.forward(PROMPT[:-1])
    sampler = Sampler(SamplingParams(temperature=0), "cpu")
    source = speculative.ForcedAcceptance(rate, eng.cfg.vocab_size, seed=3)
    tok, out, drafted, kept = PROMPT[-1], [], 0, 0
    while len(out) < 120:
        st = speculative.step(sess, tok, 3, sampler, source)
        assert sess.tokens == [*PROMPT, *out, *st.tokens[:-1]]  # consumed: tok and the kept
        assert sess.pos == len(sess.tokens)
        out += st.tokens
        drafted, kept = drafted + st.drafted, kept + st.accepted
        tok = st.tokens[-1]
    if rate == 0.0:
        assert kept == 0 and out[:100] == ref[:100]
    elif rate == 1.0:
        assert kept == drafted
    else:  # each kept with probability 0.7 until the first dropped: E[kept / 3] ~ 0.51
        assert 0.3 < kept / drafted < 0.75
    with pytest.raises(ValueError, match="rate"):
        speculative.ForcedAcceptance(1.5, 10)
