"""The OpenAI-compatible server: response building (unit) and the real `openai` client against
`homeseek serve --model tiny` on 127.0.0.1 (end to end, CPU).

The tiny model has random weights, so its text is noise: end-to-end tests check protocol,
accounting and robustness, never wording. Tool-call parsing is checked on real DSML text written
by the V4 encoder; the end-to-end tool test sends a real tool conversation and checks it is
accepted and answered.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from homeseek.chat import EOS_TOKEN, encode_messages
from homeseek.protocol import ApiError, ChatReply, Limits, Outcome, parse_chat_request
from homeseek.server import (
    App,
    EngineWorker,
    Job,
    Metrics,
    PrefixCache,
    Prompt,
    ServerConfig,
    make_server,
)

MAX_CONTEXT = 1024
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CALLS = [
    {
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})},
    },
    {
        "id": "call_b",
        "type": "function",
        "function": {
            "name": "get_weather",
            "arguments": json.dumps({"city": 'Zürich "old town"\n', "days": [1, 2]}),
        },
    },
]


# ------------------------------------------------------------------------------------------------
# Response building on real DSML text (unit)
# ------------------------------------------------------------------------------------------------


def _ids() -> Iterator[str]:
    n = 0
    while True:
        n += 1
        yield f"call_{n}"


def _completion_text(assistant: dict[str, Any], thinking: bool = False) -> str:
    """What the model writes for `assistant`, cut out of the encoder's own rendering of it."""
    msgs = [{"role": "system", "content": "", "tools": [WEATHER]}, {"role": "user", "content": "q"}]
    head = encode_messages(msgs, "thinking" if thinking else "chat")
    full = encode_messages([*msgs, assistant], "thinking" if thinking else "chat")
    # In thinking mode the reply keeps its reasoning (tools switch dropping off).
    assert full.startswith(head)
    return full[len(head) :]


def _feed_in_pieces(reply: ChatReply, text: str, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    deltas, i = [], 0
    while i < len(text):
        n = rng.randint(1, 9)
        deltas += reply.feed(text[i : i + n])
        i += n
    return deltas + reply.finish()


def _accumulate(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild a message from chat deltas the way OpenAI clients do."""
    msg: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": {}}
    for d in deltas:
        msg["content"] += d.get("content") or ""
        msg["reasoning_content"] += d.get("reasoning_content") or ""
        for tc in d.get("tool_calls") or ():
            call = msg["tool_calls"].setdefault(tc["index"], {"id": None, "name": "", "args": ""})
            call["id"] = tc.get("id") or call["id"]
            call["name"] += tc.get("function", {}).get("name") or ""
            call["args"] += tc.get("function", {}).get("arguments") or ""
    return msg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tool_calls_stream_and_round_trip(seed: int) -> None:
    assistant = {"role": "assistant", "content": "Let me check.", "tool_calls": CALLS}
    text = _completion_text(assistant)
    assert "<｜DSML｜invoke" in text and text.endswith(EOS_TOKEN)

    reply = ChatReply(thinking=False, new_call_id=_ids().__next__)
    deltas = _feed_in_pieces(reply, text, seed)
    # Every delta is a valid chunk for the real client's types.
    for d in deltas:
        ChatCompletionChunk.model_validate(
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": d, "finish_reason": None}],
            }
        )
    streamed = _accumulate(deltas)
    msg = reply.message()
    assert reply.finish_reason("stop") == "tool_calls"
    assert msg["content"] == streamed["content"] == "Let me check."
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"] * 2
    for want, got, s in zip(CALLS, msg["tool_calls"], streamed["tool_calls"].values(), strict=True):
        assert json.loads(got["function"]["arguments"]) == json.loads(want["function"]["arguments"])
        assert s["args"] == got["function"]["arguments"] and s["id"] == got["id"]
    # Arguments arrived in several deltas, not in one piece at the end.
    assert sum(1 for d in deltas if "tool_calls" in d) > 4

    # Round trip: the parsed calls, sent back with tool results, render the same DSML block.
    back = {"role": "assistant", "content": msg["content"], "tool_calls": msg["tool_calls"]}
    assert _completion_text(back) == text
    results = [
        {"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in msg["tool_calls"]
    ]
    req = parse_chat_request(
        {
            "messages": [{"role": "user", "content": "q"}, back, *results],
            "tools": [WEATHER],
        },
        Limits(MAX_CONTEXT),
    )
    prompt = encode_messages(req.messages)
    assert text in prompt and prompt.count("<tool_result>sunny</tool_result>") == 2


def test_thinking_reply_splits_reasoning_and_content() -> None:
    assistant = {
        "role": "assistant",
        "reasoning_content": "The user wants weather.",
        "content": "",
        "tool_calls": CALLS[:1],
    }
    text = _completion_text(assistant, thinking=True)
    one = ChatReply(thinking=True, new_call_id=_ids().__next__)
    one.feed(text)
    one.finish()
    many = ChatReply(thinking=True, new_call_id=_ids().__next__)
    streamed = _accumulate(_feed_in_pieces(many, text, 5))
    assert one.message() == many.message()
    msg = one.message()
    assert msg["reasoning_content"] == streamed["reasoning_content"] == "The user wants weather."
    assert msg["content"] is None and len(msg["tool_calls"]) == 1


def test_malformed_block_degrades_to_content() -> None:
    text = 'Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\nnot a parameter tag'
    whole = ChatReply(thinking=False)
    whole.feed(text)
    whole.finish()
    pieces = ChatReply(thinking=False)
    streamed = _accumulate(_feed_in_pieces(pieces, text, 3))
    for r in (whole, pieces):
        assert r.message() == {"role": "assistant", "content": text}
        assert r.finish_reason("stop") == "stop"
    assert streamed["content"] == text


def test_forced_tool_call_prefix() -> None:
    body = {
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    req = parse_chat_request(body, Limits(MAX_CONTEXT))
    assert req.reply_prefix.endswith('invoke name="get_weather">\n')
    reply = ChatReply(thinking=False, new_call_id=_ids().__next__, prefix=req.reply_prefix)
    first = reply.take_prefix_deltas()
    assert first[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    reply.feed('<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n')
    reply.feed("</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS_TOKEN)
    reply.finish()
    calls = reply.message()["tool_calls"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    none = parse_chat_request({**body, "tool_choice": "none"}, Limits(MAX_CONTEXT))
    assert none.reply_prefix == "" and "tools" not in none.messages[0]


# ------------------------------------------------------------------------------------------------
# Prefix cache and worker on the real tiny engine (in-process)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(_model_cache: Path) -> Any:
    import homeseek

    return homeseek.load("tiny", max_context=MAX_CONTEXT)


def test_prefix_cache_reuse_diverge_and_capacity(engine: Any) -> None:
    cache = PrefixCache(engine.session, engine.tokenizer.encode, capacity=2)
    a = [0, 5, 6, 7]
    lease = cache.acquire(None, a)
    assert lease.reused == 0 and lease.tail == a
    res = engine.generate(prompt_ids=lease.tail, session=lease.session, max_tokens=3, temperature=0)
    cache.release(lease, res.token_ids, None)
    held = list(lease.session.tokens)  # prompt + all but the last sampled token
    assert held == a + res.token_ids[:-1]

    # Extends the sequence: only the new ids are left to feed.
    longer = a + res.token_ids + [9, 10]
    lease2 = cache.acquire(None, longer)
    assert lease2.session is lease.session and lease2.reused == len(held)
    assert lease2.tail == longer[len(held) :]
    cache.release(lease2, [], None)

    # Diverges inside the cached sequence: a second session (capacity 2) keeps the first.
    lease3 = cache.acquire(None, [0, 5, 99])
    assert lease3.reused == 0 and lease3.session is not lease.session
    engine.generate(prompt_ids=lease3.tail, session=lease3.session, max_tokens=1, temperature=0)
    cache.release(lease3, [1], None)
    assert cache.acquire(None, longer + [11]).reused == len(held)  # session 1 still cached

    # A failed request never leaves its state behind.
    cache.release(lease3, None, None)
    assert lease3.session.tokens == []


def test_worker_engine_error_is_500_and_keeps_serving() -> None:
    calls: list[int] = []

    def run(job: Job) -> Outcome:  # the worker is engine-agnostic: a plain function runs here
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return Outcome("ok", "stop", 1, 1, 0, {})

    metrics = Metrics()
    w = EngineWorker(run, metrics, max_queue=2, log=open(os.devnull, "w"))
    params = parse_chat_request({"messages": [{"role": "user", "content": "x"}]}, Limits(8)).params
    bad, good = Job(Prompt(None, [0], False), params), Job(Prompt(None, [0], False), params)
    w.submit(bad)
    w.submit(good)
    kind, err = bad.events.get(timeout=10)
    assert kind == "error" and err.status == 500 and "boom" in err.message
    assert good.events.get(timeout=10)[0] == "done"
    assert metrics.c["engine_errors"] == 1
    assert w.drain(5)


def test_worker_queue_full_is_429_with_retry_after() -> None:
    release = threading.Event()

    def run(job: Job) -> Outcome:
        release.wait(10)
        return Outcome("", "stop", 1, 1, 0, {})

    w = EngineWorker(run, Metrics(), max_queue=1)
    params = parse_chat_request({"messages": [{"role": "user", "content": "x"}]}, Limits(8)).params
    jobs = [Job(Prompt(None, [0], False), params) for _ in range(3)]
    w.submit(jobs[0])
    deadline = time.monotonic() + 5
    while w.running is None and time.monotonic() < deadline:  # the first is taken off the queue
        time.sleep(0.01)
    w.submit(jobs[1])
    with pytest.raises(ApiError) as e:
        w.submit(jobs[2])
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
    release.set()
    assert w.drain(5)


# ------------------------------------------------------------------------------------------------
# End to end: `homeseek serve --model tiny` in a subprocess, the real openai client
# ------------------------------------------------------------------------------------------------


class ServerProcess:
    """`python -m homeseek serve` on an ephemeral port of 127.0.0.1."""

    def __init__(
        self, tmp: Path, *extra: str, quiet: bool = True, env: dict[str, str] | None = None
    ) -> None:
        self.log = tmp / "server.log"
        cmd = [sys.executable, "-m", "homeseek", "serve", "--model", "tiny", "--threads", "1"]
        cmd += ["--port", "0", "--max-context", str(MAX_CONTEXT), *extra]
        cmd += ["--quiet"] if quiet else []
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_for_port(timeout_s=180)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _new_lines(self, timeout_s: float, poll_s: float) -> Iterator[str]:
        """Each stdout line as it arrives (kept in self.stdout), until EOF or the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=poll_s)
            except queue.Empty:
                continue
            if line == "":
                return
            self.stdout.append(line)
            yield line

    def _wait_for_port(self, timeout_s: float) -> str:
        for line in self._new_lines(timeout_s, 0.5):
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                return f"http://127.0.0.1:{m.group(1)}"
        self.proc.kill()
        raise RuntimeError(f"server did not start: {''.join(self.stdout)}{self.log.read_text()}")

    def rest_of_stdout(self, timeout_s: float = 5) -> str:
        for _ in self._new_lines(timeout_s, 0.2):
            pass
        return "".join(self.stdout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


@pytest.fixture(scope="module")
def server(_model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(tmp_path_factory.mktemp("serve"), "--max-body-mb", "1", "--max-queue", "32")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _http(
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _metric(server: ServerProcess, name: str) -> float:
    _, _, text = _http(server.url + "/metrics")
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


USER = [{"role": "user", "content": "Hello! What is the capital of France?"}]


def test_models_health_metrics(server: ServerProcess, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    status, _, body = _http(server.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = _http(server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in (
        "homeseek_requests_total",
        "homeseek_queue_depth",
        "homeseek_prompt_tokens_total",
        "homeseek_completion_tokens_total",
        "homeseek_expert_cache_hits_total",
        "homeseek_expert_bytes_moved_total",
        "homeseek_cached_prompt_tokens_total",
    ):
        assert name in body.decode()
    banner = "".join(server.stdout)
    assert "routed experts:" in banner and "decode state" in banner


def test_stream_equals_non_stream_at_temperature_0(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", messages=USER, max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert full.usage.completion_tokens == 8 or choice.finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stats = full.model_extra["stats"]
    for key in ("ttft_s", "prefill_tok_s", "decode_tok_s", "expert_hit_rate", "cached_tokens"):
        assert key in stats

    text, finish, chunks = "", None, 0
    for ch in client.chat.completions.create(**kw, stream=True):
        chunks += 1
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    assert text == choice.message.content and finish == choice.finish_reason
    assert chunks >= 3  # role, at least one text delta, the finish

    # The legacy endpoint agrees with itself too.
    one = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == one.choices[0].text and one.usage.completion_tokens == 6


def test_seed_and_stop(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", messages=USER, max_tokens=6, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    greedy = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=6, temperature=0
    )
    text = greedy.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=6, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]


def test_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage the finish chunk still carries usage (the client keeps it).
    plain = list(
        client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=5, temperature=0, stream=True
        )
    )
    assert plain[-1].usage is not None and plain[-1].usage.completion_tokens == 5
    assert plain[-1].model_extra["stats"]["decode_tok_s"] > 0


def test_tool_conversation_round_trip(client: openai.OpenAI) -> None:
    """A real agent turn: tools offered, the assistant's earlier calls (with reasoning) and the
    tool results in history; answered in thinking mode, streamed and not."""
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should call the tool twice.",
            "tool_calls": CALLS,
        },
        {"role": "tool", "tool_call_id": "call_b", "content": "cloudy, 4°C"},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 21°C"},
    ]
    kw: dict[str, Any] = dict(
        model="tiny",
        messages=messages,
        tools=[WEATHER],
        tool_choice="auto",
        max_tokens=6,
        temperature=0,
        reasoning_effort="high",
    )
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    # Thinking mode: the reply starts as reasoning (the prompt ended with <think>).
    assert "reasoning_content" in choice.message.model_extra
    assert full.usage.prompt_tokens > 200  # the tools block and the history were encoded
    reasoning = ""
    for ch in client.chat.completions.create(**kw, stream=True):
        if ch.choices:
            reasoning += ch.choices[0].delta.model_extra.get("reasoning_content") or ""
    assert reasoning == choice.message.model_extra["reasoning_content"]

    # The agent's next step (the reply with its reasoning sent back, then a new user turn)
    # continues the cached sequence: with tools the V4 format keeps past reasoning, so the
    # prompt extends the previous prompt + completion.
    nxt = client.chat.completions.create(
        **{
            **kw,
            "messages": [
                *messages,
                {"role": "assistant", "content": "", "reasoning_content": reasoning},
                {"role": "user", "content": "Thanks. And Rome?"},
            ],
        }
    )
    cached = nxt.usage.prompt_tokens_details.cached_tokens
    assert cached == full.usage.prompt_tokens + full.usage.completion_tokens - 1

    # tool_choice "required" forces a DSML block; random weights then write noise, which
    # comes back as a (truncated) call or as nothing, never as an error nor as DSML markup.
    forced = client.chat.completions.create(
        **{**kw, "tool_choice": "required", "reasoning_effort": None}
    )
    assert forced.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert "DSML" not in (forced.choices[0].message.content or "")


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty messages", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("message not an object", {"messages": ["hi"]}, "messages[0]"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("negative max_tokens", {"messages": USER, "max_tokens": -3}, "max_tokens"),
    ("zero max_tokens", {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("absurd max_tokens", {"messages": USER, "max_tokens": 10**9}, "max_tokens"),
    ("max_tokens string", {"messages": USER, "max_tokens": "ten"}, "max_tokens"),
    ("max_tokens bool", {"messages": USER, "max_tokens": True}, "max_tokens"),
    ("temperature string", {"messages": USER, "temperature": "hot"}, "temperature"),
    ("temperature range", {"messages": USER, "temperature": 7}, "temperature"),
    ("top_p range", {"messages": USER, "top_p": 1.5}, "top_p"),
    ("stream not bool", {"messages": USER, "stream": "yes"}, "stream"),
    ("stop wrong type", {"messages": USER, "stop": [1, 2]}, "stop"),
    ("n > 1", {"messages": USER, "n": 3}, "n"),
    ("bad effort", {"messages": USER, "reasoning_effort": "extreme"}, "reasoning_effort"),
    ("tools not a list", {"messages": USER, "tools": {"a": 1}}, "tools"),
    ("bad tool", {"messages": USER, "tools": [{"type": "function"}]}, "tools[0]"),
    ("unknown tool_choice", {"messages": USER, "tools": [WEATHER], "tool_choice": "x"}, ""),
    ("ends with assistant", {"messages": [*USER, {"role": "assistant", "content": "a"}]}, ""),
    (
        "bad tool call args",
        {
            "messages": [
                *USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{nope"}}],
                },
                {"role": "tool", "content": "r"},
            ]
        },
        "messages",
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    "body,param", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_chat_requests_are_400(client: openai.OpenAI, body: dict[str, Any], param: str) -> None:
    extra = {k: v for k, v in body.items() if k != "messages"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=body["messages"], extra_body=extra)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert (err["param"] or "").startswith(param), err


def test_malformed_json_body_and_limits(server: ServerProcess, client: openai.OpenAI) -> None:
    url = server.url + "/v1/chat/completions"
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, _, body = _http(url, raw, {"Content-Type": "application/json"})
        assert status == 400, raw
        assert json.loads(body)["error"]["code"] == "invalid_json"
    # Prompt longer than the context (the server runs with max_context 1024).
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello " * 3000}], max_tokens=4
        )
    assert e.value.body["code"] == "context_length_exceeded"
    # Body over --max-body-mb 1.
    with pytest.raises(openai.APIStatusError) as e2:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * (3 * 2**20 // 2)}]
        )
    assert e2.value.status_code == 413
    status, _, _ = _http(server.url + "/v1/nothing")
    assert status == 404
    status, _, _ = _http(server.url + "/v1/chat/completions")  # GET
    assert status == 405
    bad = client.completions
    with pytest.raises(openai.BadRequestError):
        bad.create(model="tiny", prompt=[0, 10**7], max_tokens=2)  # token id outside the vocab
    # After all that, the server answers normally.
    ok = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_prefix_reuse_prefills_only_new_tokens(client: openai.OpenAI) -> None:
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell a story."},
    ]
    one = client.chat.completions.create(model="tiny", messages=convo, max_tokens=12, temperature=0)
    s1 = one.model_extra["stats"]
    convo += [
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": "And then what happened?"},
    ]
    two = client.chat.completions.create(model="tiny", messages=convo, max_tokens=12, temperature=0)
    s2, u2 = two.model_extra["stats"], two.usage
    # Everything the first request consumed is reused: its prompt and its completion but the
    # last sampled token, which was never fed.
    reused = u2.prompt_tokens_details.cached_tokens
    assert reused == one.usage.prompt_tokens + one.usage.completion_tokens - 1
    assert s2["prefill_tokens"] == u2.prompt_tokens - reused
    # Prefilled: the last sampled token, then EOS, the new user turn and the assistant header.
    from homeseek.engine import preset_dir
    from homeseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(preset_dir("tiny"))
    new_turn = encode_messages(convo[-1:], context=convo[:-1])
    assert new_turn.startswith("<｜User｜>And then")
    assert s2["prefill_tokens"] == 2 + len(tok.encode(new_turn)) < u2.prompt_tokens / 2
    assert s1["cached_tokens"] == 0 or s1["prefill_tokens"] < one.usage.prompt_tokens

    # Streamed third turn reuses the second.
    convo += [
        {"role": "assistant", "content": two.choices[0].message.content},
        {"role": "user", "content": "The end?"},
    ]
    usage = None
    for ch in client.chat.completions.create(
        model="tiny",
        messages=convo,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        usage = ch.usage or usage
    assert usage.prompt_tokens_details.cached_tokens == u2.prompt_tokens + 12 - 1

    # A different conversation misses and prefills everything.
    other = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Unrelated."}], max_tokens=2
    )
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert other.model_extra["stats"]["prefill_tokens"] == other.usage.prompt_tokens


def test_disconnect_mid_stream_then_prompt_answer(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    cancelled = _metric(server, "homeseek_cancelled_total")
    # ~1000 tokens would take half a minute on one CPU thread if nobody cancelled them.
    stream = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=1000, temperature=0, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    t0 = time.monotonic()
    quick = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert quick.usage.completion_tokens == 3
    assert time.monotonic() - t0 < 15
    deadline = time.monotonic() + 10
    while _metric(server, "homeseek_cancelled_total") <= cancelled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "homeseek_cancelled_total") == cancelled + 1

    # A non-streaming client that hangs up is noticed too (the server watches the socket).
    body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 1000}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        time.sleep(0.5)  # running now
    t0 = time.monotonic()
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices
    assert time.monotonic() - t0 < 15
    deadline = time.monotonic() + 10
    while _metric(server, "homeseek_cancelled_total") < cancelled + 2:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.1)


def test_concurrent_requests_all_answered(client: openai.OpenAI) -> None:
    results: dict[int, Any] = {}

    def ask(i: int) -> None:
        msgs = [{"role": "user", "content": f"Question number {i}"}]
        stream = i % 2 == 0
        if stream:
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model="tiny", messages=msgs, max_tokens=4, temperature=0, stream=True
                )
                if c.choices
            )
        else:
            r = client.chat.completions.create(
                model="tiny", messages=msgs, max_tokens=4, temperature=0
            )
            text = r.choices[0].message.content
        results[i] = text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(6))
    assert all(isinstance(v, str) and v for v in results.values())


def test_bounded_load(server: ServerProcess, client: openai.OpenAI) -> None:
    """N requests from several threads (N and time bounded): all complete, none lost."""
    n_threads, per_thread, deadline_s = 4, 6, 240
    before = _metric(
        server, 'homeseek_requests_total{endpoint="/v1/chat/completions",status="200"}'
    )
    done: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def worker(w: int) -> None:
        for k in range(per_thread):
            if time.monotonic() > stop_at:
                return
            try:
                r = client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": f"load {w}-{k}"}],
                    max_tokens=3,
                )
                with lock:
                    done.append(r.id)
            except BaseException as e:  # noqa: BLE001 - collected and reported below
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline_s + 30)
    assert not errors, errors[:3]
    assert len(done) == len(set(done)) == n_threads * per_thread
    after = _metric(server, 'homeseek_requests_total{endpoint="/v1/chat/completions",status="200"}')
    assert after - before == n_threads * per_thread
    assert _metric(server, "homeseek_queue_depth") == 0


# ------------------------------------------------------------------------------------------------
# In-process server: API key, queue limit and an injected engine fault
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def inproc(engine: Any) -> Iterator[tuple[App, str]]:
    cfg = ServerConfig(port=0, api_key="sekret", max_queue=1, log_requests=False)
    app = App(engine, cfg, log=open(os.devnull, "w"))
    httpd = make_server(cfg, app)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield app, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    app.worker.drain(10)


def test_api_key_required(inproc: tuple[App, str]) -> None:
    _, url = inproc
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert _http(url + "/health")[0] == 200  # health checks need no key
    right = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    assert right.models.list().data[0].id == "homeseek"


def test_full_queue_gets_429(inproc: tuple[App, str]) -> None:
    app, url = inproc
    c = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=60)
    results: list[Any] = []

    def long(i: int) -> None:
        try:
            r = c.chat.completions.create(
                model="homeseek", messages=[{"role": "user", "content": f"long {i}"}], max_tokens=40
            )
            results.append(r.usage.completion_tokens)
        except openai.RateLimitError as e:
            results.append(e)

    first = threading.Thread(target=long, args=(0,))
    first.start()
    deadline = time.monotonic() + 10
    while app.worker.running is None and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=long, args=(1,))
    second.start()
    while app.worker.depth < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="homeseek", messages=USER, max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1
    first.join(60)
    second.join(60)
    assert results == [40, 40]  # the admitted ones were served


def test_engine_fault_is_500_and_server_keeps_serving(
    inproc: tuple[App, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the engine raises once (as a CUDA or checkpoint error would)."""
    app, url = inproc
    real = app.engine.generate
    calls = []

    def failing_once(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected engine fault")
        return real(*a, **kw)

    monkeypatch.setattr(app.engine, "generate", failing_once)
    c = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="homeseek", messages=USER, max_tokens=2)
    assert "injected engine fault" in e.value.body["message"]
    assert c.chat.completions.create(model="homeseek", messages=USER, max_tokens=2).choices
    # Streaming: the error arrives as an SSE error event, which the client raises.
    calls.clear()
    with pytest.raises(openai.APIError):
        for _ in c.chat.completions.create(
            model="homeseek", messages=USER, max_tokens=2, stream=True
        ):
            pass
    assert c.chat.completions.create(model="homeseek", messages=USER, max_tokens=2).choices


# ------------------------------------------------------------------------------------------------
# Graceful shutdown (its own server process)
# ------------------------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_request(_model_cache: Path, tmp_path: Path) -> None:
    s = ServerProcess(tmp_path)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = c.chat.completions.create(
            model="tiny", messages=USER, max_tokens=40, temperature=0, stream=True
        )
        it = iter(stream)
        next(it)  # the request is running
        queued: list[Any] = []
        waiter = threading.Thread(
            target=lambda: queued.append(
                c.chat.completions.create(model="tiny", messages=USER, max_tokens=5)
            )
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while json.loads(_http(s.url + "/health")[2])["queue_depth"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        finish = None
        for ch in it:
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
        assert finish == "length"  # all 40 tokens, not cut
        waiter.join(60)
        assert queued and queued[0].usage.completion_tokens == 5  # the queued one was served too
        assert s.proc.wait(timeout=60) == 0
        out = s.rest_of_stdout()
        assert "shutting down" in out and "stopped" in out
        with pytest.raises(openai.APIConnectionError):
            c.models.list()
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------
# Issue 15: server conventions and OpenAI parameters
# ------------------------------------------------------------------------------------------------

ORIGIN = "http://app.example"
ENV_KEY = "env-sekret"
LOG_LINE = re.compile(
    r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1 "(GET|HEAD|POST|OPTIONS) \S+" '
    r"\d{3} \d+\.\d{3}s prompt=(\d+|-) completion=(\d+|-) cached=(\d+|-) cancelled=[01]$"
)


@pytest.fixture(scope="module")
def configured(
    _model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """CORS for one origin, the key from HOMESEEK_API_KEY, a max_tokens default and cap, the
    access log on, the default 32 MB body limit."""
    s = ServerProcess(
        tmp_path_factory.mktemp("configured"),
        "--allowed-origins",
        ORIGIN,
        "--max-tokens-default",
        "3",
        "--max-tokens-cap",
        "8",
        quiet=False,
        env={"HOMESEEK_API_KEY": ENV_KEY},
    )
    yield s
    assert s.stop() == 0, s.log.read_text()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ENV_KEY}"}


def test_cors_preflight_and_head(configured: ServerProcess, server: ServerProcess) -> None:
    url = configured.url + "/v1/chat/completions"
    asked = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }
    status, h, body = _http(url, headers=asked, method="OPTIONS")  # no key: preflights have none
    assert status == 204 and body == b""
    assert h["Access-Control-Allow-Origin"] == ORIGIN and "Origin" in h["Vary"]
    assert "POST" in h["Access-Control-Allow-Methods"]
    assert h["Access-Control-Allow-Headers"] == asked["Access-Control-Request-Headers"]
    # Another origin, or a server without --allowed-origins: no CORS headers at all.
    status, h, _ = _http(url, headers={**asked, "Origin": "http://evil.example"}, method="OPTIONS")
    assert status == 204 and "Access-Control-Allow-Origin" not in h
    status, h, _ = _http(server.url + "/v1/models", headers={"Origin": ORIGIN}, method="OPTIONS")
    assert status == 204 and "Access-Control-Allow-Origin" not in h and "GET" in h["Allow"]
    # The real request from the allowed origin carries the header too.
    status, h, _ = _http(configured.url + "/v1/models", headers={"Origin": ORIGIN, **_auth()})
    assert status == 200 and h["Access-Control-Allow-Origin"] == ORIGIN
    # HEAD: GET's status and headers, no body.
    for path, headers in (("/health", {}), ("/v1/models", _auth()), ("/v1/models/tiny", _auth())):
        g_status, g_h, g_body = _http(configured.url + path, headers=headers)
        status, h, body = _http(configured.url + path, headers=headers, method="HEAD")
        assert (status, body) == (g_status, b"") and status == 200, path
        assert h["Content-Length"] == g_h["Content-Length"] == str(len(g_body))
    assert _http(url, method="HEAD", headers=_auth())[0] == 405


def test_api_key_from_environment(configured: ServerProcess, monkeypatch: pytest.MonkeyPatch):
    from homeseek.chat_cli import ChatError, HttpBackend

    wrong = openai.OpenAI(base_url=configured.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=configured.url + "/v1", api_key=ENV_KEY, max_retries=0)
    assert right.models.list().data[0].id == "tiny"
    assert f"--api-key {ENV_KEY}" not in " ".join(configured.proc.args)  # not in `ps`
    # `homeseek chat` takes OPENAI_API_KEY when --api-key is not given, as OpenAI clients do.
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    HttpBackend(configured.url).connect()
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ChatError, match="401"):
        HttpBackend(configured.url).connect()


def test_max_tokens_default_and_cap(configured: ServerProcess) -> None:
    c = openai.OpenAI(base_url=configured.url + "/v1", api_key=ENV_KEY, max_retries=0, timeout=60)
    r = c.chat.completions.create(model="tiny", messages=USER, temperature=0)
    assert r.usage.completion_tokens <= 3  # the server's default
    assert r.usage.completion_tokens == 3 or r.choices[0].finish_reason == "stop"
    t = c.completions.create(model="tiny", prompt="Once upon", temperature=0)
    assert t.usage.completion_tokens <= 3  # the default replaces the legacy 16 too
    assert c.chat.completions.create(model="tiny", messages=USER, max_tokens=8).choices
    with pytest.raises(openai.BadRequestError) as e:  # above the cap: refused, not clamped
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=9)
    assert e.value.body["param"] == "max_tokens" and "cap of 8" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x", max_tokens=100)


def test_access_log_one_line_per_request(configured: ServerProcess) -> None:
    c = openai.OpenAI(base_url=configured.url + "/v1", api_key=ENV_KEY, max_retries=0, timeout=60)
    threads = [
        threading.Thread(
            target=lambda i=i: c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=2
            )
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for _ in range(20):
        _http(configured.url + "/health")
    for t in threads:
        t.join(60)
    time.sleep(0.2)
    lines = [ln for ln in configured.log.read_text().splitlines() if '"' in ln]
    bad = [ln for ln in lines if not LOG_LINE.match(ln)]
    assert not bad, bad
    chats = [ln for ln in lines if "POST /v1/chat/completions" in ln and " 200 " in ln]
    assert all(re.search(r"prompt=\d+ completion=\d+ cached=\d+ cancelled=0$", ln) for ln in chats)
    assert sum(" completion=2 " in ln for ln in chats) >= 4
    assert any('"GET /health" 200' in ln and "prompt=-" in ln for ln in lines)


def test_health_answers_fast_during_a_10mb_request(configured: ServerProcess) -> None:
    text = "hello world " * (10 * 2**20 // 12)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": text}]}).encode()
    big: dict[str, Any] = {}

    def send() -> None:
        t0 = time.perf_counter()
        big["status"], _, big["body"] = _http(
            configured.url + "/v1/chat/completions",
            body,
            {"Content-Type": "application/json", **_auth()},
        )
        big["s"] = time.perf_counter() - t0

    t = threading.Thread(target=send)
    t.start()
    lat = []
    while t.is_alive() or not lat:
        t0 = time.perf_counter()
        assert _http(configured.url + "/health")[0] == 200
        lat.append(time.perf_counter() - t0)
    t.join()
    # Blocked behind the request (tokenizing 10 MB under the GIL) it would wait seconds; the
    # bound leaves room for a loaded two-core CI machine.
    assert max(lat) < 0.5, lat
    assert big["status"] == 400 and big["s"] < 5, big["s"]
    assert json.loads(big["body"])["error"]["code"] == "context_length_exceeded"


def test_tokenizer_releases_the_gil(engine: Any) -> None:
    """A long prompt tokenizes without stalling other threads (the server's /health)."""
    text = "hello world " * 100_000
    done, gaps = threading.Event(), []

    def tick() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            time.sleep(0.001)
            gaps.append(time.perf_counter() - t0)

    th = threading.Thread(target=tick)
    th.start()
    t0 = time.perf_counter()
    engine.tokenizer.encode(text)
    took = time.perf_counter() - t0
    done.set()
    th.join()
    assert took > 0.2 and max(gaps) < 0.1, (took, max(gaps))


def test_unknown_model_is_404_everywhere(server: ServerProcess, client: openai.OpenAI) -> None:
    calls = [
        lambda: client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=1),
        lambda: client.completions.create(model="gpt-4o", prompt="x", max_tokens=1),
        lambda: client.models.retrieve("gpt-4o"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        assert "'tiny'" in e.value.body["message"]
    assert client.models.retrieve("tiny").id == "tiny"
    body = json.dumps({"messages": USER, "max_tokens": 1}).encode()  # no model: served
    assert _http(server.url + "/v1/chat/completions", body)[0] == 200


def test_completions_context_error_names_prompt(client: openai.OpenAI) -> None:
    for prompt in ("hello " * 3000, [5] * 2000):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
        assert e.value.body["code"] == "context_length_exceeded"
        assert e.value.body["param"] == "prompt"


def test_response_format_json_is_refused_not_ignored(client: openai.OpenAI) -> None:
    schema = {"name": "x", "schema": {"type": "object"}}
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": schema}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="tiny", messages=USER, max_tokens=2, response_format=fmt
            )
        assert e.value.body["param"] == "response_format"
        assert e.value.body["code"] == "unsupported_parameter"
        assert "not supported yet" in e.value.body["message"]
    ok = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=2, response_format={"type": "text"}
    )
    assert ok.usage.completion_tokens == 2


def test_logprobs_and_echo_match_torch_reference(client: openai.OpenAI, engine: Any) -> None:
    """Completions with a prompt of ids, echo and logprobs: every number is log_softmax of
    `Session.forward` logits of the same model (the server runs the same tiny checkpoint)."""
    import torch

    ids = [0, 11, 400, 23, 57, 9]
    r = client.completions.create(
        model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
    gen = engine.generate(prompt_ids=ids, max_tokens=3, temperature=0)
    sess = engine.session()
    with torch.inference_mode():
        rows = torch.log_softmax(sess.forward(ids + gen.token_ids[:-1]), dim=-1)
    seq = ids + gen.token_ids
    for i in range(1, len(seq)):
        want = float(rows[i - 1, seq[i]])
        assert lp.token_logprobs[i] == pytest.approx(want, abs=2e-2), i
        assert lp.tokens[i] == engine.tokenizer.decode([seq[i]])
        top = rows[i - 1].topk(2).indices.tolist()
        assert set(lp.top_logprobs[i]) == {engine.tokenizer.decode([t]) for t in top}
    assert r.choices[0].text.startswith(engine.tokenizer.decode(ids))  # echo of an ids prompt
    # Chat: one entry per generated token with top_logprobs alternatives.
    chat = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy
    # Streamed: the same entries, each after the text of its token.
    streamed = []
    text = ""
    for ch in client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
        stream=True,
    ):  # fmt: skip
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
            assert text.endswith(streamed[-1].token) or not streamed[-1].token.strip()
        if ch.choices and ch.choices[0].delta.content:
            text += ch.choices[0].delta.content
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    got = client.completions.create(
        model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=2, stream=True
    )
    toks, offs = [], []
    for ch in got:
        if ch.choices and ch.choices[0].logprobs is not None:
            toks += ch.choices[0].logprobs.tokens
            offs += ch.choices[0].logprobs.text_offset
    assert toks == lp.tokens[len(ids) :]
    assert offs == [sum(len(t) for t in toks[:i]) for i in range(len(toks))]
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(
            model="tiny", prompt=ids, max_tokens=2, logprobs=1, echo=True, stream=True
        )


def test_penalties_and_logit_bias_reach_the_sampler(client: openai.OpenAI, engine: Any) -> None:
    ids = [0, 11, 400, 23, 57, 9]
    kw = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {"300": 4.0}}
    r = client.completions.create(
        model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=0, **kw
    )
    want = engine.generate(
        prompt_ids=ids,
        max_tokens=6,
        temperature=0,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        logit_bias={300: 4.0},
    )
    assert r.choices[0].logprobs.tokens == [engine.tokenizer.decode([t]) for t in want.token_ids]
    forced = client.completions.create(
        model="tiny", prompt=ids, max_tokens=4, logit_bias={"300": 100}, logprobs=0
    )
    assert forced.choices[0].logprobs.tokens == [engine.tokenizer.decode([300])] * 4
    for bad in ({"presence_penalty": 3}, {"logit_bias": {"x": 1}}, {"logit_bias": {"5": 200}}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt=ids, max_tokens=1, **bad)


def test_cut_off_forced_tool_call_never_leaks_dsml() -> None:
    body = {"messages": USER, "tools": [WEATHER], "tool_choice": "required"}
    prefix = parse_chat_request(body, Limits(MAX_CONTEXT)).reply_prefix
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    invoke = parse_chat_request(named, Limits(MAX_CONTEXT)).reply_prefix
    # Noise after the forced opening (what a cut-off random model writes): no call, no markup.
    for p in (prefix, invoke):
        reply = ChatReply(thinking=False, new_call_id=_ids().__next__, prefix=p)
        deltas = reply.take_prefix_deltas() + _feed_in_pieces(reply, "<filler_1>garbage <x>", 0)
        msg = reply.message()
        assert "DSML" not in json.dumps(deltas) + (msg["content"] or "")
        assert "tool_calls" not in msg and reply.finish_reason("length") == "length"
    # A well-formed call cut inside its argument: the partial call, finish_reason length.
    reply = ChatReply(thinking=False, new_call_id=_ids().__next__, prefix=invoke)
    cut = '<｜DSML｜parameter name="city" string="true">Par'
    deltas = reply.take_prefix_deltas() + _feed_in_pieces(reply, cut, 1)
    msg = reply.message()
    assert "DSML" not in (msg["content"] or "")
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert reply.finish_reason("length") == "length"


def test_speculative_server_answers_as_the_plain_one(
    client: openai.OpenAI, _model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`serve --mtp 2`: at temperature 0 the same completion as the plain server, the drafts in
    the request's stats and the metrics, and prefix reuse still extends the sequence."""
    s = ServerProcess(tmp_path_factory.mktemp("mtp"), "--mtp", "2")
    try:
        spec = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        kw = dict(model="tiny", messages=USER, max_tokens=10, temperature=0)
        want = client.chat.completions.create(**kw)
        got = spec.chat.completions.create(**kw)
        assert got.choices[0].message.content == want.choices[0].message.content
        st = got.model_extra["stats"]
        assert st["mtp_drafted"] > 0 and 0 <= st["mtp_accepted"] <= st["mtp_drafted"]
        convo = [*USER, {"role": "assistant", "content": got.choices[0].message.content},
                 {"role": "user", "content": "More."}]  # fmt: skip
        again = spec.chat.completions.create(model="tiny", messages=convo, max_tokens=4)
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        _, _, body = _http(s.url + "/metrics")
        assert "homeseek_mtp_drafted_total" in body.decode()
    finally:
        assert s.stop() == 0, s.log.read_text()
