"""The MTP block (`Session.mtp_logits`) against an oracle built from transformers' decoder layer
and the spec (tests/oracle.py `MtpOracle`), on CPU in fp32: fresh calls after prefill and after
each decode step, chained calls, across window wraps; and the errors of its API."""

from __future__ import annotations

import pytest
import torch

import homeseek
from homeseek.config import ConfigError, tiny_config
from homeseek.synthetic import write_checkpoint

pytest.importorskip("transformers")
from oracle import MtpOracle, compare  # noqa: E402

TOL_MAX = 1e-4  # as the main model's oracle tests (max |err| / std of the logits)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = tiny_config()
    path = write_checkpoint(tmp_path_factory.mktemp("mtp"), cfg, seed=7, tokenizer=False)
    eng = homeseek.load(path, dtype=torch.float32, quant_sim=False, max_context=256, mtp=1)
    return eng, MtpOracle(path)


def _rows(sess, t: int, tail: list[tuple[torch.Tensor, int]], W: int):
    """The oracle's window for a call at position t + len(tail) - 1: positions before t from
    the main model's streams and the tokens that followed them, then `tail` (the streams fed
    and the next token) at t, t + 1, ... -> (streams [R, N, D], next ids, positions)."""
    end = t + len(tail)  # one past the last position
    lo = max(0, end - W)
    true = list(range(lo, t))
    rows = [sess._mtp.finals[p % W] for p in true] + [r for r, _ in tail]
    ids = [sess.tokens[p + 1] for p in true] + [i for _, i in tail]
    return torch.stack(rows[-W:]), ids[-W:], list(range(end - len(rows[-W:]), end))


def test_mtp_logits_match_the_oracle(pair, parity_report):
    eng, oracle = pair
    W = eng.cfg.sliding_window
    sess = eng.session()
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, eng.cfg.vocab_size, (21,), generator=g).tolist()
    logits = sess.forward(prompt)[-1]
    worst = {"max_err_rel": 0.0}
    for step in range(2 * W + 3):  # past two wraps of the block's window
        t = sess.pos - 1
        tail = [(sess._mtp.finals[t % W], int(logits.argmax()))]
        # a fresh call, then every third step a chain of two more drafts on its outputs
        for k in range(3 if step % 3 == 0 else 1):
            ours = sess.mtp_logits(tail[-1][1])
            ref, streams = oracle(*_rows(sess, t, tail, W))
            stats = compare(ours[None], ref[None])
            assert stats["max_err_rel"] < TOL_MAX, (step, k, stats)
            assert stats["argmax_agree_pct"] == 100.0, (step, k, stats)
            worst = max(worst, stats, key=lambda s: s["max_err_rel"])
            tail.append((streams, int(ours.argmax())))
        logits = sess.decode(tail[0][1])
    parity_report("tiny", "mtp block (worst call)", worst)


def test_mtp_api_errors(pair):
    eng, _ = pair
    sess = eng.session()
    with pytest.raises(ValueError, match="forward first"):
        sess.mtp_logits(3)
    sess.forward([1, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        sess.mtp_logits(eng.cfg.vocab_size)
    plain = homeseek.load("tiny", dtype=torch.float32, max_context=64)
    with pytest.raises(ValueError, match="mtp=1"):
        plain.session().mtp_logits(3)
    with pytest.raises(ConfigError, match="mtp must be"):
        homeseek.load("tiny", mtp=4)
