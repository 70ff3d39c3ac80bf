"""The OpenAI protocol: request parsing and validation, response bodies (no HTTP, no threads).

Parsing is pure functions of the JSON body; every failure is an `ApiError` (a 400 naming the
field) answered in OpenAI's error shape. The response side is one machine for streaming and
non-streaming answers (`ChatReply` over the chat parser's `CompletionStream`), so both agree.
This module knows no torch and no sockets; `homeseek.server` serves it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from homeseek.chat import (
    DSML_TOKEN,
    EOS_TOKEN,
    ROLES,
    THINK_END_TOKEN,
    TOOL_CALLS_START,
    CompletionStream,
    StreamEvent,
)

# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as an OpenAI error object: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# ------------------------------------------------------------------------------------------------
# Request parsing (pure functions of the JSON body; every failure is a 400 naming the field)
# ------------------------------------------------------------------------------------------------

_MISSING = object()
# OpenAI's reasoning_effort -> (thinking mode, V4 encoder effort). The V4 format knows only "high"
# (adds nothing) and "max" (a fixed paragraph); lower efforts still think, at the default effort.
REASONING_EFFORT_MAP: dict[str, tuple[bool, str | None]] = {
    "none": (False, None),
    "minimal": (True, None),
    "low": (True, None),
    "medium": (True, None),
    "high": (True, "high"),
    "xhigh": (True, "max"),
    "max": (True, "max"),
}
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20  # as homeseek.sampling (not imported: this module stays free of torch)


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the server's context, vocabulary, name and budgets."""

    max_context: int
    vocab_size: int | None = None  # token ids (prompts, logit_bias) must be below it
    model_name: str | None = None  # a request naming another model is a 404; None: any name
    max_tokens_default: int | None = None  # when a request sets none (None: endpoint default)
    # Larger requests are refused (400), not clamped: a client asking for 32K tokens learns now
    # that it will not get them, instead of reading a reply cut short with finish_reason length.
    max_tokens_cap: int | None = None


def check_model(body: Mapping[str, Any], limits: Limits) -> None:
    """Every endpoint answers an unknown `model` the same way: 404 model_not_found, as OpenAI.
    A request without `model` is served (many local clients leave it out)."""
    name = _typed(body, "model", "str")
    if name is not None and limits.model_name is not None and name != limits.model_name:
        raise model_not_found(name, limits.model_name)


def model_not_found(name: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"the model {name!r} does not exist; this server serves {served!r} (GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def _typed(body: Mapping[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked against kind (int/number/str/bool/list/dict); None or absent -> default.

    bool is not an int here: `"max_tokens": true` is a client bug, not 1.
    """
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "str": isinstance(v, str),
        "bool": isinstance(v, bool),
        "list": isinstance(v, list),
        "dict": isinstance(v, dict),
    }[kind]
    if not ok:
        want = {
            "int": "an integer",
            "number": "a finite number",
            "str": "a string",
            "bool": "a boolean",
            "list": "a list",
            "dict": "an object",
        }[kind]
        raise ApiError(400, f"'{name}' must be {want}, got {json.dumps(v)[:60]}", param=name)
    return v


@dataclass(frozen=True)
class GenParams:
    max_tokens: int | None  # None: until EOS or the end of the context
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; n: the chosen token's and the n most likely
    prompt_logprobs: bool = False  # /v1/completions echo with logprobs


def _max_tokens(
    body: Mapping[str, Any], limits: Limits, endpoint_default: int | None
) -> int | None:
    max_tokens = _typed(body, "max_completion_tokens", "int")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _typed(body, "max_tokens", "int"), "max_tokens"
    cap = limits.max_tokens_cap
    if max_tokens is None:  # the server's default, else the endpoint's, never above the cap
        default = limits.max_tokens_default
        default = default if default is not None else endpoint_default
        return default if cap is None else min(default or cap, cap)
    if max_tokens < 1:
        raise ApiError(400, f"'{name}' must be >= 1, got {max_tokens}", param=name)
    if cap is not None and max_tokens > cap:
        raise ApiError(
            400,
            f"'{name}' = {max_tokens} exceeds this server's cap of {cap} tokens per request "
            "(--max-tokens-cap); ask for fewer",
            param=name,
        )
    max_context = limits.max_context
    if max_tokens > max_context:
        raise ApiError(
            400,
            f"'{name}' = {max_tokens} exceeds the server's context of {max_context} tokens",
            param=name,
        )
    return max_tokens


def _logit_bias(body: Mapping[str, Any], vocab_size: int | None) -> dict[int, float]:
    """OpenAI's {"token id": bias in [-100, 100]}; ids as JSON object keys, i.e. strings."""
    raw = _typed(body, "logit_bias", "dict", {})
    out: dict[int, float] = {}
    for k, v in raw.items():
        try:
            tid = int(k)
        except ValueError:
            raise ApiError(400, f"'logit_bias' key {k!r} is not a token id", "logit_bias") from None
        if tid < 0 or (vocab_size is not None and tid >= vocab_size):
            raise ApiError(
                400, f"'logit_bias': token id {tid} is outside [0, {vocab_size})", "logit_bias"
            )
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100
        if not ok:
            raise ApiError(
                400, f"'logit_bias'[{k!r}] must be a number in [-100, 100], got {v!r}", "logit_bias"
            )
        out[tid] = float(v)
    return out


def parse_gen_params(
    body: Mapping[str, Any],
    limits: Limits,
    endpoint_default: int | None,
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
) -> GenParams:
    """Sampling fields shared by both endpoints (logprobs are parsed per endpoint: their shapes
    differ)."""
    max_tokens = _max_tokens(body, limits, endpoint_default)
    temperature = float(_typed(body, "temperature", "number", 1.0))
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = float(_typed(body, "top_p", "number", 1.0))
    if not 0 <= top_p <= 1:
        raise ApiError(400, f"'top_p' must be in [0, 1], got {top_p}", param="top_p")
    if top_p == 0:  # OpenAI accepts 0 and clients use it to mean "always the top token"
        temperature, top_p = 0.0, 1.0
    top_k = _typed(body, "top_k", "int", 0)  # not OpenAI's; vLLM and llama.cpp accept it
    if top_k < 0:
        raise ApiError(400, f"'top_k' must be >= 0, got {top_k}", param="top_k")
    seed = _typed(body, "seed", "int")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(
                400, f"'stop' has {len(stop)} strings; at most {MAX_STOP_STRINGS}", "stop"
            )
        stops = tuple(s for s in stop if s)
    else:
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    penalties = []
    for name in ("presence_penalty", "frequency_penalty"):
        v = float(_typed(body, name, "number", 0.0))
        if not -2 <= v <= 2:
            raise ApiError(400, f"'{name}' must be in [-2, 2], got {v}", param=name)
        penalties.append(v)
    n = _typed(body, "n", "int", 1)
    if n != 1:
        raise ApiError(400, f"'n' = {n}: only one choice per request is supported", param="n")
    return GenParams(
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        stops,
        presence_penalty=penalties[0],
        frequency_penalty=penalties[1],
        logit_bias=_logit_bias(body, limits.vocab_size),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _typed(body, "stream", "bool", False)
    opts = _typed(body, "stream_options", "dict", {})
    include_usage = _typed(opts, "include_usage", "bool", False)
    return stream, include_usage


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # tools and response_format already on the system message
    thinking: bool
    reasoning_effort: str | None  # the V4 encoder's value: None, "high" or "max"
    reply_prefix: str  # text the reply is forced to start with (tool_choice), "" if none
    params: GenParams
    stream: bool
    include_usage: bool


def _parse_thinking(body: Mapping[str, Any]) -> tuple[bool, str | None]:
    """thinking mode and encoder effort from `thinking` (bool or {"type": "enabled"}),
    `chat_template_kwargs.thinking` (vLLM style) or `reasoning_effort`; explicit thinking wins."""
    effort = _typed(body, "reasoning_effort", "str")
    if effort is not None and effort not in REASONING_EFFORT_MAP:
        raise ApiError(
            400,
            f"'reasoning_effort' must be one of {sorted(REASONING_EFFORT_MAP)}, got {effort!r}",
            param="reasoning_effort",
        )
    thinking, v4_effort = REASONING_EFFORT_MAP[effort] if effort else (False, None)
    raw = body.get("thinking")
    kwargs = _typed(body, "chat_template_kwargs", "dict", {})
    if raw is None and "thinking" in kwargs:
        raw = kwargs["thinking"]
    if raw is not None:
        if isinstance(raw, bool):
            thinking = raw
        elif isinstance(raw, dict) and raw.get("type") in ("enabled", "disabled"):
            thinking = raw["type"] == "enabled"
        else:
            raise ApiError(
                400, '\'thinking\' must be a boolean or {"type": "enabled"|"disabled"}', "thinking"
            )
    return thinking, v4_effort if thinking else None


def _tool_prefix(choice: Any, tools: list[dict[str, Any]], thinking: bool) -> tuple[str, bool]:
    """(forced reply start, keep tools in the prompt) for a tool_choice.

    V4 has no constrained decoding, so "required" and a named function are enforced by writing the
    start of the DSML block (and the invoke head) into the prompt; the reply parser is fed the
    same text first, so the client sees an ordinary tool call. In thinking mode this skips the
    reasoning (the block must follow `</think>`).
    """
    if choice is None or choice == "auto":
        return "", True
    if choice == "none":
        return "", False
    think = THINK_END_TOKEN if thinking else ""
    block = f"{think}{TOOL_CALLS_START}>\n"
    if choice == "required":
        if not tools:
            raise ApiError(400, "tool_choice 'required' needs 'tools'", param="tool_choice")
        return block, True
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        names = [t["function"]["name"] for t in tools]
        if name not in names:
            raise ApiError(
                400, f"tool_choice names {name!r}, which is not in 'tools' {names}", "tool_choice"
            )
        return f'{block}<{DSML_TOKEN}invoke name="{name}">\n', True
    raise ApiError(
        400,
        "'tool_choice' must be 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


def _parse_tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = _typed(body, "tools", "list", [])
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (
            isinstance(t, dict)
            and t.get("type", "function") == "function"
            and isinstance(fn, dict)
            and isinstance(fn.get("name"), str)
            and fn["name"]
        ):
            raise ApiError(
                400,
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                "'parameters': {...}}}}",
                param=f"tools[{i}]",
            )
    return tools


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """`logprobs: true` and `top_logprobs: n` -> n top tokens per position (None: off)."""
    want = _typed(body, "logprobs", "bool", False)
    top = _typed(body, "top_logprobs", "int")
    if top is not None and not want:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(
            400, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs"
        )
    return (top or 0) if want else None


def _response_format(body: Mapping[str, Any]) -> None:
    """Only plain text: JSON modes would need constrained decoding, which this server does not
    do yet, and a JSON mode that is merely hoped for must not look like one that is enforced."""
    fmt = _typed(body, "response_format", "dict")
    kind = fmt.get("type", "text") if fmt else "text"
    if kind == "text":
        return
    if kind in ("json_object", "json_schema"):
        raise ApiError(
            400,
            f"'response_format' {kind!r} is not supported yet: this server cannot constrain "
            "the output to JSON; ask for JSON in the prompt and validate the reply",
            param="response_format",
            code="unsupported_parameter",
        )
    raise ApiError(
        400,
        f"'response_format'.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        param="response_format",
    )


def parse_chat_request(body: Mapping[str, Any], limits: Limits) -> ChatRequest:
    """Validate a /v1/chat/completions body (shape and types; the encoder checks the rest)."""
    check_model(body, limits)
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(raw_messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role: unknown role {role!r}; expected one of {list(ROLES)}",
                param=f"messages[{i}].role",
            )
        messages.append(dict(m))
    if messages[-1]["role"] not in ("user", "tool", "developer"):
        raise ApiError(
            400,
            f"the last message is from {messages[-1]['role']!r}; it must be from 'user' or "
            "'tool' (the reply continues the conversation)",
            param="messages",
        )
    thinking, effort = _parse_thinking(body)
    tools = _parse_tools(body)
    prefix, keep_tools = _tool_prefix(body.get("tool_choice"), tools, thinking)
    _response_format(body)
    extra: dict[str, Any] = {}
    if tools and keep_tools:
        extra["tools"] = tools
    if extra:
        # The official format carries tools on the system message; make one when there is none.
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        messages[0] = {**messages[0], **extra}
    stream, include_usage = _stream_flags(body)
    params = parse_gen_params(body, limits, None, logprobs=_chat_logprobs(body))
    return ChatRequest(messages, thinking, effort, prefix, params, stream, include_usage)


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]
    echo: bool
    params: GenParams
    stream: bool
    include_usage: bool


def parse_completion_request(body: Mapping[str, Any], limits: Limits) -> CompletionRequest:
    """Validate a legacy /v1/completions body: a prompt string or a list of token ids."""
    check_model(body, limits)
    vocab_size = limits.vocab_size if limits.vocab_size is not None else 2**31
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(
                400, f"'prompt': token id {bad[0]} is outside [0, {vocab_size})", "prompt"
            )
    elif not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids", "prompt")
    if body.get("suffix"):
        raise ApiError(400, "'suffix' is not supported", param="suffix")
    best_of = _typed(body, "best_of", "int", 1)
    if best_of != 1:
        raise ApiError(400, "'best_of' must be 1", param="best_of")
    echo = _typed(body, "echo", "bool", False)
    stream, include_usage = _stream_flags(body)
    logprobs = _typed(body, "logprobs", "int")  # the legacy form: how many top tokens
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(
            400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", "logprobs"
        )
    if logprobs is not None and stream and echo:
        # The prompt's logprobs are known only when the whole generation ends.
        raise ApiError(
            400, "'logprobs' with 'echo' is not supported when streaming", param="logprobs"
        )
    params = parse_gen_params(
        body,
        limits,
        16,  # OpenAI's legacy default
        logprobs=logprobs,
        prompt_logprobs=echo and logprobs is not None,
    )
    return CompletionRequest(prompt, echo, params, stream, include_usage)


@dataclass(frozen=True)
class Outcome:
    text: str  # the completion as generated (stop strings cut), without the reply prefix
    finish_reason: str  # the engine's: stop | length | tool_calls | cancelled
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    stats: dict[str, float]
    logprobs: list[Any] | None = None  # sampling.TokenLogprob per completion token, when asked
    prompt_logprobs: list[Any] | None = None  # per prompt token (None where unknown), when asked


# ------------------------------------------------------------------------------------------------
# Response building: completion text -> OpenAI objects (same machine for stream and non-stream)
# ------------------------------------------------------------------------------------------------

# Engine finish reasons -> OpenAI's. A generation cut short by shutdown is incomplete: "length".
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "length"}
# The legacy endpoint returns raw text: a tool-call block in it is just text.
TEXT_FINISH = {**_FINISH, "tool_calls": "stop"}


class ChatReply:
    """Completion text in, OpenAI chat deltas out; also the final message.

    Tool calls stream as the parser settles them: a delta with id and name, then argument
    pieces. A malformed tool-call block (the parser raises) degrades to plain text: the raw block
    becomes content and no tool call is reported in the message; a streaming client may already
    have seen the start of a call, which the final finish_reason "stop" then disowns.

    A forced tool call (`prefix`: tool_choice "required" or a named function) is different: the
    block's opening was written by the server, not the model, so a malformed or cut-off block is
    dropped instead of becoming content; the client gets no call, no DSML markup, and the
    finish_reason ("length" when cut off) says why.
    """

    def __init__(
        self, thinking: bool, new_call_id: Callable[[], str] | None = None, prefix: str = ""
    ) -> None:
        self.thinking = thinking
        self.parser = CompletionStream("thinking" if thinking else "chat", new_call_id)
        self.fed = ""
        self.raw = False  # after a malformed block: everything else is content
        self.forced = bool(prefix)  # the block was opened by the server: never shown as text
        self.closed = False
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self._prefix_deltas = self.feed(prefix) if prefix else []

    def take_prefix_deltas(self) -> list[dict[str, Any]]:
        out, self._prefix_deltas = self._prefix_deltas, []
        return out

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.closed or not text:
            return []
        if self.raw:
            return self._raw(text)
        self.fed += text
        try:
            events = self.parser.feed(text)
        except ValueError:
            return self._fallback()
        return self._deltas(events)

    def finish(self) -> list[dict[str, Any]]:
        if self.closed:
            return []
        self.closed = True
        if self.raw:
            return []
        try:
            events = self.parser.finish()
        except ValueError:
            return self._fallback()
        return self._deltas(events)

    def finish_reason(self, engine_reason: str) -> str:
        reason = _FINISH.get(engine_reason, "stop")
        if reason in ("stop", "tool_calls"):
            return "tool_calls" if self.calls and not self.raw else "stop"
        return reason

    def message(self) -> dict[str, Any]:
        calls = [] if self.raw else self.calls
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if self.content or not calls else None,
        }
        if self.thinking:
            msg["reasoning_content"] = "".join(self.reasoning)
        if calls:
            msg["tool_calls"] = calls
        return msg

    # -- machinery --

    def _deltas(self, events: Sequence[StreamEvent]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ev in events:
            if ev.kind in ("content", "reasoning"):
                key = "content" if ev.kind == "content" else "reasoning_content"
                (self.content if ev.kind == "content" else self.reasoning).append(ev.text)
                if out and list(out[-1]) == [key]:  # merge neighbours of one kind
                    out[-1][key] += ev.text
                else:
                    out.append({key: ev.text})
            elif ev.kind == "tool_call_start":
                fn = {"name": ev.name, "arguments": ""}
                self.calls.append({"id": ev.id, "type": "function", "function": dict(fn)})
                call = {"index": ev.index, "id": ev.id, "type": "function", "function": fn}
                out.append({"tool_calls": [call]})
            else:  # tool_call_args
                self.calls[ev.index]["function"]["arguments"] += ev.text
                out.append(
                    {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}
                )
        return out

    def _fallback(self) -> list[dict[str, Any]]:
        self.raw = True
        out: list[dict[str, Any]] = []
        # Events the parser settled in the call that raised are in its result, not returned.
        done = self.parser.result()
        for key, got in (("reasoning_content", self.reasoning), ("content", self.content)):
            missing = (done.get(key) or "")[len("".join(got)) :]
            if missing:
                got.append(missing)
                out.append({key: missing})
        start = self.fed.find(TOOL_CALLS_START)
        return out + self._raw(self.fed[start:] if start >= 0 else "")

    def _raw(self, text: str) -> list[dict[str, Any]]:
        cut = text.find(EOS_TOKEN)
        if cut >= 0:
            text, self.closed = text[:cut], True
        if not text or self.forced:
            return []
        self.content.append(text)
        return [{"content": text}]


def envelope(
    rid: str, obj: str, created: int, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """The fields every completion response and stream chunk opens with."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}


def usage_dict(o: Outcome) -> dict[str, Any]:
    return {
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": o.cached_tokens},
    }


# ------------------------------------------------------------------------------------------------
# Log-probabilities (homeseek.sampling.TokenLogprob: token_id, logprob, top) -> OpenAI shapes
# ------------------------------------------------------------------------------------------------


def chat_logprobs(lps: Sequence[Any], text_of: Callable[[int], str]) -> dict[str, Any]:
    """choices[].logprobs of a chat completion. Every generated token is listed, reasoning and
    tool-call markup included (the reply's text is built from all of them). A token that is
    part of a multi-byte character shows as U+FFFD; its `bytes` are those of that text."""

    def entry(tid: int, lp: float) -> dict[str, Any]:
        t = text_of(tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}

    content = [
        {**entry(x.token_id, x.logprob), "top_logprobs": [entry(i, v) for i, v in x.top]}
        for x in lps
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    ids: Sequence[int], lps: Sequence[Any], text_of: Callable[[int], str], offset: int = 0
) -> dict[str, Any]:
    """choices[].logprobs of a legacy completion; `lps[i]` None where no logprob is known (the
    first token of an echoed prompt). `offset`: where the first token's text starts."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    out["text_offset"] = []
    for tid, x in zip(ids, lps, strict=True):
        t = text_of(tid)
        out["tokens"].append(t)
        out["token_logprobs"].append(None if x is None else x.logprob)
        out["top_logprobs"].append(None if x is None else {text_of(i): v for i, v in x.top})
        out["text_offset"].append(offset)
        offset += len(t)
    return out
