"""Tokenizer wrapper, incremental detokenizer, and a synthetic stand-in for the V4 tokenizer.

The checkpoint's `tokenizer.json` is a byte-level BPE loaded with the `tokenizers` library. The
chat encoder (`homeseek.chat`) already writes BOS as text, so `Tokenizer.encode` never adds
special tokens of its own: one BOS id at the front, not two.

`build_synthetic_tokenizer` makes a small but real byte-level BPE with the official vocabulary
size (129,280) and every chat special token at its official id, so tiny synthetic checkpoints
run the full text path (chat encoding -> ids -> model -> ids -> streamed text) offline. Its
merges are learned from an English text shipped in the package (`data/corpus_en.txt`) plus a
little Chinese, code and JSON, and the ids the merges do not reach hold phrases of learned words,
so the random weights of the tiny model still print words.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import os
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from homeseek.chat import BOS_ID, BOS_TOKEN, EOS_ID, EOS_TOKEN, SPECIAL_TOKEN_IDS

VOCAB_SIZE = 129_280  # rows of the embedding; ids >= this never come out of the model


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the conventions the engine relies on."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
    ) -> None:
        self._tok = tok
        bos, eos = tok.token_to_id(bos_token), tok.token_to_id(eos_token)
        if bos is None or eos is None:
            missing = bos_token if bos is None else eos_token
            raise ValueError(f"tokenizer has no token {missing!r}; is this a DeepSeek tokenizer?")
        self.bos_id: int = bos
        self.eos_id: int = eos

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer | None:
        """Load `tokenizer.json` (and BOS/EOS names from `tokenizer_config.json` if present).

        Returns None when the directory has no tokenizer.json, so callers can run on ids only.
        """
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            return None
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a plain Exception
            raise ValueError(f"cannot load {tok_file}: {e}") from e
        names = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            for key in names:
                value = cfg.get(key)
                if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
                    value = value.get("content")
                if isinstance(value, str):
                    names[key] = value
        return cls(tok, **names)

    @classmethod
    def synthetic(cls) -> Tokenizer:
        """The deterministic synthetic tokenizer (see `build_synthetic_tokenizer`)."""
        return cls(build_synthetic_tokenizer())

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (may exceed the model's)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token text (`<｜User｜>`...) maps to its id. Adds no BOS/EOS."""
        # encode_batch releases the GIL while it works (encode does not): a server thread
        # tokenizing a long prompt must not stall the others (/health, streaming replies).
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included (the chat parser needs `</think>` and DSML)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated ids into text deltas that never split a character.

    A byte-level BPE token can end in the middle of a UTF-8 sequence (one Chinese character is 3
    bytes and often spans two tokens). Each step decodes a short window of recent ids and emits
    only the text beyond what the window's settled prefix produced, holding it back while it
    ends in U+FFFD (an incomplete sequence). Works for any decoder, not only ByteLevel, because
    the window keeps one settled token of left context.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this are already emitted as text

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add generated id(s); return the text they complete (possibly "")."""
        self._ids.extend([ids] if isinstance(ids, int) else ids)
        return self._advance(final=False)

    def finish(self) -> str:
        """Release text still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        settled = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if not final and (len(text) <= len(settled) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(settled) :]


# ------------------------------------------------------------------------------------------------
# Synthetic tokenizer
# ------------------------------------------------------------------------------------------------

# Id layout, mirroring DeepSeek's: BOS/EOS/pad first, then the BPE vocabulary up to 128,000,
# then 1,280 added tokens (the chat specials at their official ids, placeholders elsewhere).
_PAD_TOKEN = "<｜▁pad▁｜>"
_FIRST_BYTE_ID = 3
_FIRST_ADDED_ID = 128_000
# More than the corpus can use: merging stops when every word is one token (~7,000 merges).
_MAX_MERGES = 32_768
_ENGLISH = Path(__file__).with_name("data") / "corpus_en.txt"
_PHRASE_SEED = 0

# DeepSeek's pre-tokenizer: digits in groups of <= 3, CJK runs isolated, a GPT-style split, then
# the byte-to-printable-character mapping. The decoder undoes that mapping.
_PRE_TOKENIZER: dict[str, Any] = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {"Regex": "\\p{N}{1,3}"},
            "behavior": "Isolated",
            "invert": False,
        },
        {
            "type": "Split",
            "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"},
            "behavior": "Isolated",
            "invert": False,
        },
        {
            "type": "Split",
            "pattern": {
                "Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
                "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
_DECODER: dict[str, Any] = {
    "type": "ByteLevel",
    "add_prefix_space": True,
    "trim_offsets": True,
    "use_regex": True,
}

# Training text for the merges, besides data/corpus_en.txt: a few KB of English, Chinese, code and
# chat-like JSON, so common words and characters get real multi-byte tokens. Changing either
# changes every synthetic tokenizer file (bump synthetic.WRITER_VERSION so cached tiny models are
# rebuilt); nothing stores synthetic ids, but keep the build deterministic.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model reads text as a sequence of tokens,
and a tokenizer decides where one token ends and the next begins. Byte-level BPE starts from the
256 possible bytes and repeatedly merges the most frequent adjacent pair, so every string can be
encoded and common words become single tokens. The weather in Beijing is sunny today, with a
temperature of 22 degrees and light wind from the north. What is the capital of France? The capital
of France is Paris. Please think step by step before you answer the question, and then give the
final answer in one sentence. Reasoning models write their thoughts first and their answer second.
The user asked about the weather, so the assistant should call the weather tool with the location.
Mixture-of-experts models route each token to a few experts; only those experts run for that token.
Attention compresses the key-value cache so long contexts fit in memory. Numbers like 3.14159,
2048, 129280 and 1000000 are split into groups of at most three digits before merging.
你好，世界！今天天气很好，我们去公园散步吧。请一步一步地推理，然后给出答案。
深度求索公司发布了新的语言模型。模型会先思考，再回答用户的问题。北京今天晴，气温二十二度。
这个问题的答案是什么？推理过程很重要，答案也很重要。你好，请问有什么可以帮你的吗？
小柴胡冲剂和布洛芬能一起吃吗？请及时就医。热海大滚锅是世界著名温泉吗？
def fibonacci(n: int) -> int:
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Config:
    def __init__(self, hidden_size: int = 4096, num_layers: int = 43) -> None:
        self.hidden_size = hidden_size
        self.num_layers = num_layers

    def to_dict(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers}


if __name__ == "__main__":
    print(fibonacci(10))
    for i in range(3):
        print(f"step {i}: value = {i * i}")
{"name": "get_weather", "description": "Get the weather for a specific location",
 "parameters": {"type": "object", "properties": {"location": {"type": "string"},
 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"]}}
{"role": "user", "content": "What's the weather in Beijing?"}
{"role": "assistant", "content": "The weather in Beijing is sunny."}
SELECT name, value FROM settings WHERE id = 42 ORDER BY name;
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
The end. Thank you for reading, and have a nice day!
"""


def _bytes_to_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses), by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _learn_merges(words: Counter[str], max_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training on pre-tokenized words: merge the most frequent pair until every word
    is one token or `max_merges` is reached. Ties go to the lexicographically smallest pair, so
    the result is a pure function of the corpus (no hash order, no threads)."""
    seqs = [list(w) for w in words]
    freqs = list(words.values())
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, seq in enumerate(seqs):
        for pair in itertools.pairwise(seq):
            counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:
            continue  # stale entry; the current count was pushed separately
        merges.append(pair)
        joined = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            seq, f = seqs[i], freqs[i]
            for p in itertools.pairwise(seq):
                counts[p] -= f
                touched.add(p)
            out, k = [], 0
            while k < len(seq):
                if k + 1 < len(seq) and seq[k] == pair[0] and seq[k + 1] == pair[1]:
                    out.append(joined)
                    k += 2
                else:
                    out.append(seq[k])
                    k += 1
            seqs[i] = out
            for p in itertools.pairwise(out):
                counts[p] += f
                touched.add(p)
                where.setdefault(p, set()).add(i)
        for p in sorted(touched):
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p)
    return merges


def _phrases(vocab: dict[str, int], corpus_words: Counter[str], n: int) -> list[str]:
    """`n` distinct two-word tokens (" river bread" as ByteLevel writes it: "ĠriverĠbread") made
    of the corpus's English words that are single tokens, none already in `vocab`; a pure
    function of its inputs."""
    space = _bytes_to_chars()[ord(" ")]
    words = sorted(
        w
        for w in corpus_words
        if w in vocab and w[:1] == space and w[1:].isascii() and w[1:].isalpha()
    )
    rng = random.Random(_PHRASE_SEED)  # Mersenne Twister: the same draws in every process
    out: list[str] = []
    seen = set(vocab)
    while len(out) < n:
        phrase = rng.choice(words) + rng.choice(words)
        if phrase not in seen:
            seen.add(phrase)
            out.append(phrase)
    return out


def _added_token(token_id: int, content: str) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def synthetic_tokenizer_json() -> str:
    """The synthetic `tokenizer.json` text (deterministic: same bytes on every run)."""
    # Pre-tokenize the corpus with the very pre-tokenizer the result will use.
    probe = tokenizers.Tokenizer.from_str(
        json.dumps(
            {
                "version": "1.0",
                "pre_tokenizer": _PRE_TOKENIZER,
                "model": {"type": "BPE", "vocab": {}, "merges": []},
            }
        )
    )
    assert probe.pre_tokenizer is not None
    corpus = _ENGLISH.read_text(encoding="utf-8") + "\n" + _CORPUS
    words = Counter(piece for piece, _ in probe.pre_tokenizer.pre_tokenize_str(corpus))
    merges = _learn_merges(words, _MAX_MERGES)

    vocab: dict[str, int] = {BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID, _PAD_TOKEN: 2}
    for b, ch in enumerate(_bytes_to_chars()):
        vocab[ch] = _FIRST_BYTE_ID + b
    for a, b in merges:
        vocab[a + b] = len(vocab)
    if len(vocab) != _FIRST_BYTE_ID + 256 + len(merges):
        raise AssertionError("a merge produced a token that already exists")
    # The ids no merge reaches (~120,000 of them) hold two-word phrases of learned words: text
    # never encodes to them, like rare tokens of a real vocabulary, but a model that samples them
    # (the tiny model's random weights do, nearly uniformly) prints words, not placeholders.
    phrases = _phrases(vocab, words, _FIRST_ADDED_ID - len(vocab))
    for i, phrase in enumerate(phrases, start=len(vocab)):
        vocab[phrase] = i
    if len(vocab) != _FIRST_ADDED_ID:
        raise AssertionError("phrase tokens collide with learned tokens")

    by_id = {i: t for t, i in SPECIAL_TOKEN_IDS.items()}
    added = [_added_token(i, by_id[i]) for i in (BOS_ID, EOS_ID)] + [_added_token(2, _PAD_TOKEN)]
    for i in range(_FIRST_ADDED_ID, VOCAB_SIZE):
        added.append(_added_token(i, by_id.get(i, f"<｜place▁holder▁no▁{i - _FIRST_ADDED_ID}｜>")))

    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _PRE_TOKENIZER,
        "post_processor": None,
        "decoder": _DECODER,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


@functools.cache
def _synthetic_json_once() -> str:
    # A pure function of this file, and synthetic checkpoints are written many times per test run.
    return synthetic_tokenizer_json()


def build_synthetic_tokenizer() -> tokenizers.Tokenizer:
    """A small real byte-level BPE with exactly 129,280 ids and the V4 specials at their ids."""
    return tokenizers.Tokenizer.from_str(_synthetic_json_once())


def tokenizer_config() -> dict[str, Any]:
    """`tokenizer_config.json` as the V4 release has it: no automatic BOS/EOS, pad=EOS
    (docs/architecture.md §5)."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "legacy": True,
        "model_max_length": 1048576,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def write_tokenizer_files(out_dir: str | os.PathLike[str]) -> None:
    """Write the synthetic `tokenizer.json` and `tokenizer_config.json` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_bytes(_synthetic_json_once().encode("utf-8"))
    cfg = json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n"
    (out / "tokenizer_config.json").write_bytes(cfg.encode("utf-8"))
