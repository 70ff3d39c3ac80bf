"""Tokenizer wrapper, streaming detokenizer and the synthetic V4 tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tokenizers

import homeseek.tokenizer
from homeseek.chat import BOS_ID, EOS_ID, SPECIAL_TOKEN_IDS, encode_messages
from homeseek.tokenizer import (
    VOCAB_SIZE,
    Tokenizer,
    build_synthetic_tokenizer,
    synthetic_tokenizer_json,
    write_tokenizer_files,
)

SPEC_TEXT = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
# The real tokenizer's ids for SPEC_TEXT (docs/architecture.md §5).
SPEC_IDS = [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.synthetic()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out)
    return out


# ------------------------------------------------------------------------------------------------
# Synthetic tokenizer
# ------------------------------------------------------------------------------------------------


def test_build_is_fast_and_deterministic(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    first = synthetic_tokenizer_json()  # uncached: the whole build
    tokenizers.Tokenizer.from_str(first)
    assert time.perf_counter() - t0 < 2.0
    assert synthetic_tokenizer_json() == first
    write_tokenizer_files(tmp_path / "a")
    write_tokenizer_files(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == first.encode()
    assert (
        build_synthetic_tokenizer().get_vocab_size(with_added_tokens=False) == 128_000
    )  # BPE part; added tokens after


def test_build_is_identical_across_processes() -> None:
    """Another interpreter with another hash seed must produce the same bytes."""
    # A bare package object stands in for homeseek/__init__ so the child skips importing torch.
    pkg_dir = str(Path(homeseek.tokenizer.__file__).parent)
    code = (
        "import hashlib, sys, types\n"
        "pkg = types.ModuleType('homeseek'); pkg.__path__ = [sys.argv[1]]\n"
        "sys.modules['homeseek'] = pkg\n"
        "from homeseek.tokenizer import synthetic_tokenizer_json as j\n"
        "print(hashlib.sha256(j().encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", code, pkg_dir], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == hashlib.sha256(synthetic_tokenizer_json().encode()).hexdigest()


def test_vocabulary_size_and_every_id_decodes(tok: Tokenizer) -> None:
    backend = tok.backend
    assert tok.vocab_size == VOCAB_SIZE == 129_280
    assert backend.id_to_token(VOCAB_SIZE - 1) is not None
    assert backend.id_to_token(VOCAB_SIZE) is None
    texts = backend.decode_batch([[i] for i in range(VOCAB_SIZE)], skip_special_tokens=False)
    assert all(isinstance(t, str) and t for t in texts)


def test_special_tokens_at_official_ids(tok: Tokenizer) -> None:
    added = tok.backend.get_added_tokens_decoder()
    for text, token_id in SPECIAL_TOKEN_IDS.items():
        assert tok.token_to_id(text) == token_id, text
        assert added[token_id].content == text and added[token_id].special
        assert tok.encode(text) == [token_id]
        assert tok.decode([token_id]) == text
    assert (tok.bos_id, tok.eos_id) == (BOS_ID, EOS_ID) == (0, 1)


def test_spec_vector_special_ids(tok: Tokenizer) -> None:
    ids = tok.encode(SPEC_TEXT)
    assert tok.decode(ids) == SPEC_TEXT
    specials = set(SPECIAL_TOKEN_IDS.values())
    assert [i for i in ids if i in specials] == [i for i in SPEC_IDS if i in specials]
    assert [i for i in ids if i >= 128_000 or i < 3] == [128803, 128804, 128821, 128822, 1]


def test_real_byte_level_bpe(tok: Tokenizer) -> None:
    """Merges learned from the corpus give multi-byte tokens; any string round-trips."""
    assert len(tok.encode(" the weather")) == 2  # 12 bytes, two learned tokens
    assert len(tok.encode("你好")) == 1
    rng = random.Random(0)
    alphabet = "abc XYZ 012\n\t你好世界😀é\x00\x7f<>|｜▁" + "".join(
        chr(i) for i in range(0x20, 0x7F)
    )
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(text)
        assert all(3 <= i < 128_000 or i in SPECIAL_TOKEN_IDS.values() for i in ids)
        assert tok.decode(ids) == text


def test_chat_prompt_has_exactly_one_bos(tok: Tokenizer) -> None:
    prompt = encode_messages(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    )
    ids = tok.encode(prompt)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert ids[-2:] == [SPECIAL_TOKEN_IDS["<｜Assistant｜>"], SPECIAL_TOKEN_IDS["</think>"]]
    # Even asking the backend for special tokens adds none (add_bos_token is false).
    assert tok.backend.encode(prompt, add_special_tokens=True).ids == ids


def test_written_files(tok_dir: Path) -> None:
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    assert cfg["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert cfg["eos_token"] == cfg["pad_token"] == "<｜end▁of▁sentence｜>"
    assert cfg["model_max_length"] == 1048576
    loaded = Tokenizer.from_dir(tok_dir)
    assert loaded is not None and loaded.vocab_size == VOCAB_SIZE
    assert loaded.encode(SPEC_TEXT) == Tokenizer.synthetic().encode(SPEC_TEXT)


def test_from_dir_without_tokenizer(tmp_path: Path) -> None:
    assert Tokenizer.from_dir(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_transformers_loads_the_same_tokenizer(tok_dir: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    prompt = encode_messages([{"role": "user", "content": "你好 world 123"}], "thinking")
    assert hf(prompt)["input_ids"] == tok.encode(prompt)
    assert hf.eos_token_id == EOS_ID and hf.bos_token_id == BOS_ID


def _real_tokenizer_dir() -> Path | None:
    """The real V4-Flash tokenizer, only if it is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo in ("deepseek-ai/DeepSeek-V4-Flash", "deepseek-ai/DeepSeek-V4-Flash-Base"):
        hit = try_to_load_from_cache(repo, "tokenizer.json")
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def test_real_tokenizer_spec_vector() -> None:
    path = _real_tokenizer_dir()
    if path is None:
        pytest.skip("real DeepSeek-V4 tokenizer not in the local Hugging Face cache")
    real = Tokenizer.from_dir(path)
    assert real is not None
    assert real.encode(SPEC_TEXT) == SPEC_IDS
    for text, token_id in SPECIAL_TOKEN_IDS.items():
        assert real.token_to_id(text) == token_id, text
    ids = real.encode(encode_messages([{"role": "user", "content": "hi"}]))
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1


# ------------------------------------------------------------------------------------------------
# Streaming detokenizer
# ------------------------------------------------------------------------------------------------


def test_stream_decoder_never_splits_a_character(tok: Tokenizer) -> None:
    text = "Hi 😀 你好世界 é<think>推理🤖</think>done" + "<｜end▁of▁sentence｜>"
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    deltas = [dec.feed(i) for i in ids] + [dec.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # The emoji is four byte tokens in this small vocabulary: some steps must have waited.
    assert "" in deltas[:-1]


def test_stream_decoder_batches_and_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ab😀c")
    dec = tok.stream_decoder()
    assert dec.feed(ids[:2]) + dec.feed(ids[2:]) + dec.finish() == "ab😀c"
    # A generation cut inside a character: finish() releases it as U+FFFD.
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    dec = tok.stream_decoder()
    assert dec.feed(emoji[:-1]) == ""
    assert dec.finish() == "\ufffd"
    assert dec.finish() == ""


def test_stream_decoder_random_text(tok: Tokenizer) -> None:
    rng = random.Random(7)
    pool = list("abc d\n你好世界😀🤖é") + ["<｜User｜>", "</think>", "｜DSML｜"]
    for _ in range(50):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 30)))
        ids = tok.encode(text)
        dec = tok.stream_decoder()
        out, k = [], 0
        while k < len(ids):
            n = rng.randint(1, 3)
            out.append(dec.feed(ids[k : k + n]))
            k += n
        out.append(dec.finish())
        assert "".join(out) == text
        assert all("\ufffd" not in d for d in out)


def test_english_text_encodes_to_learned_subwords(tok: Tokenizer) -> None:
    """Merges learned from data/corpus_en.txt: English (not in the corpus) is a few ids per word,
    all of them learned tokens, none of the unreachable phrase ids above the merges."""
    doc = json.loads(synthetic_tokenizer_json())
    first_phrase = 3 + 256 + len(doc["model"]["merges"])
    assert len(doc["model"]["merges"]) > 2000
    text = (
        "When the children came home from school, their mother had baked fresh bread, and the "
        "smell of it filled the whole house while the rain fell on the garden outside."
    )
    ids = tok.encode(text)
    assert all(3 <= i < first_phrase for i in ids)
    assert len(ids) <= 1.3 * len(text.split())  # mostly one id per word
    assert tok.decode(ids) == text


def test_random_ids_decode_to_words(tok: Tokenizer) -> None:
    """What the tiny model's random weights sample: nearly uniform ids, which must read as words
    (no `<filler_N>` placeholders)."""
    rng = random.Random(3)
    ids = [rng.randrange(VOCAB_SIZE) for _ in range(500)]
    text = tok.decode(ids)
    assert "filler" not in text
    words = text.split()
    assert sum(w.isascii() and w.isalpha() for w in words) >= 0.9 * len(words)
