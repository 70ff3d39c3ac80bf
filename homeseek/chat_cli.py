"""`homeseek chat`: an interactive chat in the terminal.

Talks to a running `homeseek serve` over its OpenAI-compatible API (stdlib HTTP, streamed), or
runs the engine in-process (`--model`) through the same core the server uses, prefix cache
included. Either way the whole conversation is sent every turn, as an OpenAI client does; the
server's prefix cache turns that into prefilling only the new turn.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from homeseek.engine import Engine

# on_delta(kind, text): kind is "reasoning" or "content".
DeltaSink = Callable[[str, str], None]

HELP = """commands:
  /think   toggle thinking mode (the model reasons before it answers)
  /stats   token counts, cache reuse and speed of the last reply
  /clear   forget the conversation (the system prompt stays)
  /help    this list
  /quit    leave (also /exit or Ctrl-D)
Ctrl-C while a reply is being written stops it."""


class ChatError(Exception):
    """The backend refused or failed a request; the message is for the user."""


@dataclass
class Reply:
    content: str = ""
    reasoning: str = ""
    finish_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def add(self, delta: dict[str, Any], on_delta: DeltaSink) -> None:
        """Append a chat delta's reasoning and content text, passing each piece on."""
        if delta.get("reasoning_content"):
            self.reasoning += delta["reasoning_content"]
            on_delta("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            self.content += delta["content"]
            on_delta("content", delta["content"])


class Backend(Protocol):
    def describe(self) -> str: ...

    def chat(
        self,
        messages: list[dict[str, Any]],
        thinking: bool,
        max_tokens: int | None,
        temperature: float,
        on_delta: DeltaSink,
    ) -> Reply: ...


def _request_body(
    messages: list[dict[str, Any]], thinking: bool, max_tokens: int | None, temperature: float
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": messages,
        "temperature": temperature,
        "thinking": thinking,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


class HttpBackend:
    """A homeseek (or any OpenAI-compatible) server, streamed over plain urllib."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        # As OpenAI clients do: the key from the environment when none is given.
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.model = "homeseek"

    def _request(
        self, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=timeout_s)
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = e.reason
            raise ChatError(f"server answered {e.code}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ChatError(
                f"cannot reach {self.base} ({reason}); start a server with `homeseek serve` "
                "or chat in-process with --model"
            ) from None

    def connect(self) -> None:
        """Ask the server for its model name (also checks that it is there)."""
        with self._request("/models", timeout_s=10) as resp:
            data = json.loads(resp.read())["data"]
        if data:
            self.model = data[0]["id"]

    def describe(self) -> str:
        return f"{self.model} at {self.base}"

    def chat(
        self,
        messages: list[dict[str, Any]],
        thinking: bool,
        max_tokens: int | None,
        temperature: float,
        on_delta: DeltaSink,
    ) -> Reply:
        body = _request_body(messages, thinking, max_tokens, temperature)
        body |= {"model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        reply = Reply()
        # No timeout: a long prompt may prefill for minutes, and Ctrl-C is there. Leaving this
        # block (also on Ctrl-C) closes the connection, and the server then cancels.
        with self._request("/chat/completions", body) as resp:
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(f"server error: {chunk['error'].get('message')}")
                for choice in chunk.get("choices") or ():
                    reply.add(choice.get("delta") or {}, on_delta)
                    if choice.get("finish_reason"):
                        reply.finish_reason = choice["finish_reason"]
                if chunk.get("usage"):
                    reply.usage = chunk["usage"]
                if chunk.get("stats"):
                    reply.stats = chunk["stats"]
        return reply


class LocalBackend:
    """The engine in this process, through the server's core (same prompts, same prefix cache)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        from homeseek.server import Core

        self.core = Core(engine)
        self.model_name = model_name

    def describe(self) -> str:
        return f"{self.model_name} in-process ({self.core.engine.rt.device})"

    def chat(
        self,
        messages: list[dict[str, Any]],
        thinking: bool,
        max_tokens: int | None,
        temperature: float,
        on_delta: DeltaSink,
    ) -> Reply:
        from homeseek.protocol import ApiError, ChatReply, Limits, parse_chat_request, usage_dict
        from homeseek.server import Job

        body = _request_body(messages, thinking, max_tokens, temperature)
        try:
            req = parse_chat_request(body, Limits(self.core.max_context))
            prompt = self.core.chat_prompt(req)
        except ApiError as e:
            raise ChatError(e.message) from None
        parser = ChatReply(prompt.thinking, prefix=prompt.reply_prefix)
        reply = Reply()

        def emit(deltas: list[dict[str, Any]]) -> None:
            for d in deltas:
                reply.add(d, on_delta)

        job = Job(prompt, req.params, stream=True, sink=lambda text: emit(parser.feed(text)))
        # Ctrl-C asks the engine to stop after the current token, which keeps the session (and
        # its cached prefix) consistent; a second Ctrl-C interrupts outright.
        in_main = threading.current_thread() is threading.main_thread()
        old = None
        if in_main:

            def on_sigint(signum: int, frame: Any) -> None:
                if job.cancelled.is_set():
                    raise KeyboardInterrupt
                job.cancelled.set()

            old = signal.signal(signal.SIGINT, on_sigint)
        try:
            out = self.core.run(job)
        except ApiError as e:
            raise ChatError(e.message) from None
        finally:
            if in_main:
                signal.signal(signal.SIGINT, old)
        if out.finish_reason == "cancelled":
            raise KeyboardInterrupt
        emit(parser.finish())
        reply.finish_reason = parser.finish_reason(out.finish_reason)
        reply.usage = usage_dict(out)
        reply.stats = out.stats
        return reply


# ------------------------------------------------------------------------------------------------
# The REPL
# ------------------------------------------------------------------------------------------------

_DIM, _RESET = "\033[2m", "\033[0m"


def format_stats(reply: Reply | None) -> str:
    """The /stats text for one reply."""
    if reply is None:
        return "no reply yet"
    u, s = reply.usage, reply.stats
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    lines = [
        f"finish: {reply.finish_reason}",
        f"tokens: {u.get('prompt_tokens', '?')} prompt ({cached} reused from the cache) + "
        f"{u.get('completion_tokens', '?')} completion",
    ]
    if s:  # homeseek's extra `stats` object (other servers do not send it)
        lines.append(
            f"speed: TTFT {s.get('ttft_s', 0) * 1000:.0f} ms, prefill "
            f"{s.get('prefill_tok_s', 0):.1f} tok/s over {s.get('prefill_tokens', 0):.0f} "
            f"tokens, decode {s.get('decode_tok_s', 0):.1f} tok/s"
        )
        lines.append(
            f"experts: {s.get('expert_lookups', 0):.0f} lookups, hit rate "
            f"{100 * s.get('expert_hit_rate', 0):.1f}%, "
            f"{s.get('expert_bytes_moved', 0) / 2**20:.1f} MiB moved"
        )
    return "\n".join(lines)


class Repl:
    """Reads lines, keeps the history, streams replies. I/O streams are parameters (tests)."""

    def __init__(
        self,
        backend: Backend,
        system: str | None = None,
        thinking: bool = False,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        color: bool | None = None,
    ) -> None:
        self.backend = backend
        self.system = system
        self.thinking = thinking
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.interactive = self.stdin.isatty() and self.out.isatty()
        self.color = self.out.isatty() if color is None else color
        self.history: list[dict[str, Any]] = []
        self.last: Reply | None = None

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _read(self, prompt: str) -> str | None:
        if self.interactive:
            try:
                return input(prompt)  # readline editing and history when available
            except EOFError:
                return None
        self._write(prompt)
        line = self.stdin.readline()
        if not line:
            return None
        self._write(line if line.endswith("\n") else line + "\n")  # echo: transcripts read well
        return line.rstrip("\n")

    def run(self) -> int:
        if self.interactive:
            try:
                import readline  # noqa: F401 - importing it enables line editing in input()
            except ImportError:
                pass
        mode = "on" if self.thinking else "off"
        self._write(
            f"homeseek chat - {self.backend.describe()}; thinking {mode}. /help for commands.\n"
        )
        while True:
            try:
                line = self._read("you> ")
            except KeyboardInterrupt:
                self._write("\n")
                continue
            if line is None:
                self._write("\n")
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.turn(line)

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        cmd = line.split()[0].lower()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            self._write(HELP + "\n")
        elif cmd == "/think":
            self.thinking = not self.thinking
            self._write(f"thinking mode {'on' if self.thinking else 'off'}\n")
        elif cmd == "/stats":
            self._write(format_stats(self.last) + "\n")
        elif cmd == "/clear":
            self.history.clear()
            self.last = None
            self._write("conversation cleared\n")
        else:
            self._write(f"unknown command {cmd}; /help lists them\n")
        return True

    def turn(self, text: str) -> None:
        user = {"role": "user", "content": text}
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            *self.history,
            user,
        ]
        state = {"reasoning": False}

        def on_delta(kind: str, piece: str) -> None:
            if kind == "reasoning":
                if not state["reasoning"]:
                    state["reasoning"] = True
                    self._write((_DIM if self.color else "") + "(thinking) ")
                self._write(piece)
                return
            if state["reasoning"]:
                state["reasoning"] = False
                self._write((_RESET if self.color else "") + "\n")
            self._write(piece)

        self._write("assistant> ")
        try:
            reply = self.backend.chat(
                messages, self.thinking, self.max_tokens, self.temperature, on_delta
            )
        except KeyboardInterrupt:
            self._write((_RESET if self.color else "") + "\n(stopped; not kept in the history)\n")
            return
        except ChatError as e:
            self._write(f"\nerror: {e}\n")
            return
        finally:
            if state["reasoning"] and self.color:
                self._write(_RESET)
        self._write("\n")
        assistant: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning:
            # Sent back as the API returned it; the V4 encoder decides what the model sees.
            assistant["reasoning_content"] = reply.reasoning
        self.history += [user, assistant]
        self.last = reply
        if reply.finish_reason == "length":
            self._write("(cut at max_tokens)\n")
