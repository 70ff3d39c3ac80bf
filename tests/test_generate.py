"""Sampling, Engine.generate (stop conditions, streaming, stats) and the `homeseek` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import homeseek
from homeseek.config import tiny_config
from homeseek.generation import Generation
from homeseek.sampling import Sampler, SamplingParams
from homeseek.synthetic import write_checkpoint


# --- sampler -------------------------------------------------------------------------------------
def _logits(seed: int = 0, n: int = 1000) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = _logits()
    assert int(Sampler(SamplingParams(temperature=0), "cpu")(x)) == int(x.argmax())


def test_seed_reproducible_and_seeds_differ():
    x = _logits()

    def draw(seed: int) -> list[int]:
        s = Sampler(SamplingParams(temperature=1.0, seed=seed), "cpu")
        return [int(s(x)) for _ in range(20)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_top_k_and_top_p_restrict_the_support():
    x = _logits()
    top5 = set(torch.topk(x, 5).indices.tolist())
    s = Sampler(SamplingParams(temperature=2.0, top_k=5, seed=0), "cpu")
    assert {int(s(x)) for _ in range(300)} <= top5
    # top_p: the smallest prefix of the sorted distribution with mass >= p
    probs = torch.softmax(x / 2.0, -1)
    sp, order = torch.sort(probs, descending=True)
    keep = set(order[: int((sp.cumsum(0) < 0.5).sum()) + 1].tolist())
    s = Sampler(SamplingParams(temperature=2.0, top_p=0.5, seed=0), "cpu")
    drawn = {int(s(x)) for _ in range(300)}
    assert drawn <= keep and len(drawn) > 1
    one = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=3), "cpu")
    assert int(one(x)) == int(x.argmax())


def test_sampling_matches_the_distribution():
    x = torch.tensor([0.0, 1.0, 2.0])
    s = Sampler(SamplingParams(temperature=1.0, seed=0), "cpu")
    counts = torch.bincount(torch.stack([s(x) for _ in range(6000)]), minlength=3).float()
    assert torch.allclose(counts / 6000, torch.softmax(x, -1), atol=0.03)


@pytest.mark.parametrize(
    "kw", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1)]
)
def test_bad_sampling_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


# --- generate on the tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def eng():
    return homeseek.load("tiny", dtype=torch.float32, max_context=256)


def test_greedy_generation_is_deterministic_and_streams(eng):
    msgs = [{"role": "user", "content": "Hello"}]
    deltas: list[str] = []
    a = eng.generate(messages=msgs, max_tokens=12, temperature=0, stream=deltas.append)
    b = eng.generate(messages=msgs, max_tokens=12, temperature=0)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert a.finish_reason == "length"
    assert "".join(deltas) == a.text == eng.tokenizer.decode(a.token_ids)
    assert a.prompt_ids[0] == 0 and a.prompt_ids.count(0) == 1  # exactly one BOS
    assert a.prompt_ids[-2:] == [128804, 128822]  # chat prompts end <｜Assistant｜></think>
    st = a.stats
    assert st["prompt_tokens"] == len(a.prompt_ids) and st["completion_tokens"] == 12
    assert st["ttft_s"] > 0 and st["decode_tok_s"] > 0 and st["prefill_tok_s"] > 0


def test_thinking_prompt_ends_with_think(eng):
    r = eng.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=2, thinking=True)
    assert r.prompt_ids[-2:] == [128804, 128821]


def test_seeded_sampling_reproducible(eng):
    kw = dict(prompt_ids=[0, 5, 6], max_tokens=8, temperature=1.0, top_p=0.9, seed=42)
    assert eng.generate(**kw).token_ids == eng.generate(**kw).token_ids


def test_stop_string_truncates_and_is_never_streamed(eng):
    base = eng.generate(prompt_ids=[0, 7, 8, 9], max_tokens=10, temperature=0)
    piece = eng.tokenizer.decode(base.token_ids[4:6])
    deltas: list[str] = []
    r = eng.generate(
        prompt_ids=[0, 7, 8, 9], max_tokens=10, temperature=0, stop=[piece], stream=deltas.append
    )
    assert r.finish_reason == "stop"
    assert r.text == base.text[: base.text.index(piece)]
    assert piece not in "".join(deltas) and "".join(deltas) == r.text
    # token_ids (and usage) stop with the text the caller gets: the stop string's tokens go
    assert r.token_ids == base.token_ids[:4] and eng.tokenizer.decode(r.token_ids) == r.text


def test_streamed_logprobs_follow_the_text_and_the_stop(eng):
    """stream_logprobs gets every kept token once, never before its text went out."""
    base = eng.generate(prompt_ids=[0, 7, 8, 9], max_tokens=10, temperature=0)
    piece = eng.tokenizer.decode(base.token_ids[4:6])
    events: list[tuple[str, object]] = []
    r = eng.generate(
        prompt_ids=[0, 7, 8, 9], max_tokens=10, temperature=0, stop=[piece], logprobs=1,
        stream=lambda t: events.append(("text", t)),
        stream_logprobs=lambda e: events.append(("lp", e)),
    )  # fmt: skip
    got = [x for kind, e in events if kind == "lp" for x in e]
    assert [x.token_id for x in got] == r.token_ids == base.token_ids[:4]
    assert got == r.logprobs
    sent, n = "", 0
    for kind, e in events:  # each entry's token text is already out when it arrives
        if kind == "text":
            sent += e
        else:
            n += len(e)
            assert sent.startswith(eng.tokenizer.decode(r.token_ids[:n]))
    with pytest.raises(ValueError, match="needs logprobs"):
        eng.generate(prompt_ids=[0, 7], max_tokens=2, stream_logprobs=print)


def test_ids_only_checkpoint_generates_ids(tmp_path):
    path = write_checkpoint(tmp_path / "ids", tiny_config(), tokenizer=False)
    e = homeseek.load(path, dtype=torch.float32, max_context=64)
    r = e.generate(prompt_ids=[0, 1, 2], max_tokens=4, temperature=0)
    assert len(r.token_ids) == 4 and r.text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        e.generate(messages=[{"role": "user", "content": "x"}])


def test_prompt_too_long_is_a_context_error(eng):
    with pytest.raises(homeseek.ContextError, match="max_context=256"):
        eng.generate(prompt_ids=[5] * 256, max_tokens=4)


def test_generation_stops_at_the_context_end():
    e = homeseek.load("tiny", dtype=torch.float32, max_context=20)
    r = e.generate(prompt_ids=list(range(3, 18)), max_tokens=50, temperature=0)
    assert r.finish_reason == "length" and len(r.token_ids) <= 5


class _ScriptedSession:
    """Feeds the decode loop a fixed sequence of logits, to test its stop logic in isolation."""

    def __init__(self, picks: list[int], vocab: int = 129280) -> None:
        self.picks, self.vocab, self.pos, self.step = picks, vocab, 0, 0

    def _logits(self) -> torch.Tensor:
        x = torch.zeros(self.vocab)
        x[self.picks[min(self.step, len(self.picks) - 1)]] = 10.0
        self.step += 1
        return x

    def forward(self, ids, last_only=False):  # noqa: ANN001
        self.pos += len(ids)
        return self._logits().unsqueeze(0)

    def decode(self, tok: int) -> torch.Tensor:
        self.pos += 1
        return self._logits()


def test_eos_and_ignore_eos(eng):
    picks = [300, 301, 1, 302]  # the third token is EOS (id 1)
    r = Generation(eng, _ScriptedSession(picks), SamplingParams(10, 0), False, None).run([0])
    assert r.finish_reason == "stop" and r.token_ids == [300, 301]
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    r = Generation(eng, _ScriptedSession(picks), p, False, None).run([0])
    assert r.finish_reason == "length" and r.token_ids == [300, 301, 1, 302, 302]


def test_cancel(eng):
    n = {"calls": 0}

    def cancel() -> bool:
        n["calls"] += 1
        return n["calls"] >= 3

    r = eng.generate(prompt_ids=[0, 5], max_tokens=50, temperature=0, cancel=cancel)
    assert r.finish_reason == "cancelled" and len(r.token_ids) == 3


# --- the command ---------------------------------------------------------------------------------
def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "homeseek", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_help_for_every_subcommand():
    for sub in ("generate", "synth", "download", "doctor"):
        r = _cli(sub, "--help")
        assert r.returncode == 0 and "usage: homeseek " + sub in r.stdout, r.stderr


def test_cli_generate_tiny_streams_offline():
    r = _cli("generate", "--model", "tiny", "--threads", "1", "Hello", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "[length] " in r.stderr and "decode" in r.stderr


def test_cli_synth_download_verify(tmp_path: Path):
    out = tmp_path / "ck"
    assert _cli("synth", "tiny", str(out), "--shard-gb", "0.01").returncode == 0
    r = _cli("download", str(out), "--verify-only")
    assert r.returncode == 0 and "complete" in r.stdout, r.stderr
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    r = _cli("download", str(out), "--verify-only")
    assert r.returncode == 1 and victim.name in r.stderr


def test_cli_download_without_network_is_a_clear_error(tmp_path: Path):
    r = _cli("download", str(tmp_path / "dl"))
    assert r.returncode == 1 and "download failed" in r.stderr


def test_cli_doctor_plan(tmp_path: Path):
    r = _cli("doctor", "--gpu-mem-gb", "24")
    assert r.returncode == 0, r.stderr
    assert "memory plan" in r.stdout and "RAM:" in r.stdout and "fits: yes" in r.stdout
    r = _cli("doctor", "--gpu-mem-gb", "4")
    assert r.returncode == 1 and "raise --gpu-mem-gb (Python: gpu_mem_gb) to at least" in r.stdout
    ck = write_checkpoint(tmp_path / "ck", tiny_config(), tokenizer=False)
    r = _cli("doctor", "--model", str(ck))
    assert r.returncode == 0 and "complete" in r.stdout, r.stdout + r.stderr


def test_cli_bad_model_is_a_clear_error(tmp_path: Path):
    r = _cli("generate", "--model", str(tmp_path / "nope"), "x")
    assert r.returncode == 2 and "no such directory" in r.stderr
