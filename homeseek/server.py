"""OpenAI-compatible HTTP server on the standard library (`homeseek serve`).

Threads and who owns what:

* HTTP threads (`ThreadingHTTPServer`, one per connection) parse and validate requests, render and
  tokenize prompts, write responses (SSE when streaming) and notice when a client goes away.
* One engine worker takes jobs from a bounded queue and runs `Engine.generate` one at a time: the
  engine holds one set of weights and one expert cache, so requests are served in turn. A full
  queue answers 429 with Retry-After instead of letting latency grow without bound.
* The main thread waits for SIGINT/SIGTERM, then stops listening, drains the queue (up to a
  deadline, then cancels) and exits 0.

Prefix reuse (`PrefixCache`): agents resend the whole conversation every turn, and the new prompt
starts with the previous prompt plus the previous completion. The worker keeps the sessions of
recent sequences with every id they consumed; a prompt that extends one of them is fed only its new
tail. Decode state cannot be rewound, so a prompt that diverges inside a cached sequence starts a
fresh session. The match is tried on token ids and on text (the completion may re-tokenize
differently from the ids the model produced; the produced ids are then spliced in).

Request parsing and response bodies live in `homeseek.protocol`; this module serves them. It
knows no torch: it talks to the engine through `generate`, `tokenizer`, `cfg`, `rt` and
`session()`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TextIO

from homeseek.chat import BOS_TOKEN, THINK_START_TOKEN, encode_messages
from homeseek.protocol import (
    TEXT_FINISH,
    ApiError,
    ChatReply,
    ChatRequest,
    GenParams,
    Limits,
    Outcome,
    chat_logprobs,
    completion_logprobs,
    envelope,
    model_not_found,
    parse_chat_request,
    parse_completion_request,
    usage_dict,
)

if TYPE_CHECKING:  # typing only: importing the engine pulls in torch
    from homeseek.engine import Engine, GenerationResult, Session

MiB = 2**20


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default: the API has no rate limits or accounts
    port: int = 8000  # 0 = any free port (the banner names it)
    api_key: str | None = None  # when set, every route but /health needs `Bearer <key>`
    model_name: str = "homeseek"  # the id /v1/models lists and responses carry
    max_queue: int = 16  # requests waiting behind the running one; more get 429
    max_body_bytes: int = 32 * MiB  # a 1M-token prompt is ~4 MB of text
    prefix_sessions: int = 1  # sequences whose decode state is kept for prefix reuse
    drain_timeout_s: float = 30.0  # on SIGTERM: time given to running and queued requests
    log_requests: bool = True
    # Browser origins that may call the API (CORS); empty: no CORS headers at all; "*": any.
    allowed_origins: tuple[str, ...] = ()
    max_tokens_default: int | None = None  # for requests that set none (None: until EOS)
    max_tokens_cap: int | None = None  # requests asking for more are refused with 400

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.prefix_sessions < 1:
            raise ValueError(f"prefix_sessions must be >= 1, got {self.prefix_sessions}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        for name in ("max_tokens_default", "max_tokens_cap"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        cap, default = self.max_tokens_cap, self.max_tokens_default
        if cap is not None and default is not None and default > cap:
            raise ValueError(f"max_tokens_default {default} exceeds max_tokens_cap {cap}")
        for o in self.allowed_origins:
            if o != "*" and not o.startswith(("http://", "https://")):
                raise ValueError(f"allowed origin {o!r} must be '*' or start with http(s)://")


# ------------------------------------------------------------------------------------------------
# Prefix cache
# ------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    session: Session
    ids: list[int]  # the whole sequence: session.tokens, then ids sampled but not yet consumed
    text: str | None  # what `ids` decode to (None when the prompt came as ids)


@dataclass(frozen=True)
class Lease:
    """A session handed to one request: `ids` is its full prompt, `tail` what is left to feed."""

    session: Session
    ids: list[int]
    tail: list[int]
    reused: int  # prompt tokens whose state the session already holds


class PrefixCache:
    """Sessions of recent sequences, matched against new prompts (worker thread only).

    At most `capacity` sessions ever exist (each preallocates decode state for max_context): a
    miss with a full cache resets the least recently used one. A leased session is out of the
    cache until `release`, so a failed request can never leave half-updated state behind.
    """

    def __init__(
        self,
        new_session: Callable[[], Session],
        encode: Callable[[str], list[int]] | None,
        capacity: int = 1,
    ) -> None:
        self.new_session = new_session
        self.encode = encode
        self.capacity = capacity
        self.entries: list[_Entry] = []  # least recently used first
        self.free: list[Session] = []  # sessions with nothing worth keeping

    def _match(self, e: _Entry, text: str | None, ids: list[int]) -> list[int] | None:
        done = e.session.tokens
        n = len(done)
        if n == 0:
            return None
        if len(ids) > n and ids[:n] == done:
            return ids
        # Text match: the client sent back the completion as text, which may tokenize
        # differently from the ids the model produced; keep the produced ids.
        if (
            self.encode is not None
            and text is not None
            and e.text is not None
            and len(text) > len(e.text)
            and text.startswith(e.text)
        ):
            spliced = e.ids + self.encode(text[len(e.text) :])
            if len(spliced) > n and spliced[:n] == done:
                return spliced
        return None

    def acquire(self, text: str | None, ids: list[int], reuse: bool = True) -> Lease:
        """A session for `ids`: the cached one it extends, else a fresh one (also when `reuse`
        is False: a request that needs the logits of its whole prompt)."""
        best: tuple[int, _Entry, list[int]] | None = None
        for e in self.entries if reuse else ():
            full = self._match(e, text, ids)
            if full is not None and (best is None or len(e.session.tokens) > best[0]):
                best = (len(e.session.tokens), e, full)
        if best is not None:
            n, e, full = best
            self.entries.remove(e)
            return Lease(e.session, full, full[n:], n)
        if self.free:
            sess = self.free.pop()
        elif len(self.entries) >= self.capacity:
            sess = self.entries.pop(0).session
            sess.reset()
        else:
            sess = self.new_session()
        return Lease(sess, list(ids), list(ids), 0)

    def release(self, lease: Lease, out_ids: list[int] | None, text: str | None) -> None:
        """Put a leased session back: with the sequence it now holds, or reset (out_ids None)."""
        sess = lease.session
        ids = lease.ids + (out_ids or [])
        if out_ids is None or sess.tokens != ids[: len(sess.tokens)]:
            sess.reset()
            self.free.append(sess)
            return
        self.entries.append(_Entry(sess, ids, text))

    def clear(self) -> None:
        for e in self.entries:
            e.session.reset()
            self.free.append(e.session)
        self.entries.clear()


# ------------------------------------------------------------------------------------------------
# Core: prompts and generation, no HTTP (the chat CLI runs it in-process too)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    text: str | None  # the rendered prompt (None when given as ids)
    ids: list[int]
    thinking: bool  # parse the reply in thinking mode: the prompt ended with `<think>`
    reply_prefix: str = ""  # part of the prompt that belongs to the reply (forced tool call)
    param: str = "messages"  # the request field a context error names


@dataclass
class Job:
    prompt: Prompt
    params: GenParams
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    # worker -> HTTP thread: ("text", str) | ("done", Outcome) | ("error", ApiError)
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    sink: Callable[[str], None] | None = None  # in-process streaming: text goes here instead

    def on_text(self, delta: str) -> None:
        if self.sink is not None:
            self.sink(delta)
        else:
            self.events.put(("text", delta))

    def on_logprobs(self, entries: list[Any]) -> None:
        """Streamed generated tokens' logprobs (HTTP streaming only; a sink takes text only)."""
        if self.sink is None:
            self.events.put(("logprobs", entries))


class Core:
    """Prompt rendering, the prefix cache and one generation at a time (no threads, no HTTP)."""

    def __init__(self, engine: Engine, prefix_sessions: int = 1) -> None:
        self.engine = engine
        self.max_context: int = engine.rt.max_context
        self.tokenizer = engine.tokenizer
        encode = self.tokenizer.encode if self.tokenizer is not None else None
        self.cache = PrefixCache(engine.session, encode, prefix_sessions)
        # Allocate every session's decode state now: running out of memory must happen at
        # startup, not in the middle of serving (each holds state for max_context tokens).
        self.cache.free = [engine.session() for _ in range(prefix_sessions)]
        # No token decodes to more characters than the longest vocabulary entry (byte-level
        # entries are one character per byte), so a text longer than max_context times that
        # cannot fit: refused before spending seconds tokenizing it (x2: normalizer slack).
        self.max_prompt_chars: int | None = None
        if self.tokenizer is not None:
            vocab = self.tokenizer.backend.get_vocab(with_added_tokens=True)
            self.max_prompt_chars = 2 * self.max_context * max(map(len, vocab), default=1)

    # -- prompts (any thread) --

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ApiError(
                400,
                f"the model at {self.engine.path} has no tokenizer.json: only /v1/completions "
                "with a prompt of token ids works",
            )
        return self.tokenizer

    def chat_prompt(self, req: ChatRequest) -> Prompt:
        tok = self._need_tokenizer()
        mode = "thinking" if req.thinking else "chat"
        try:
            text = encode_messages(
                req.messages, thinking_mode=mode, reasoning_effort=req.reasoning_effort
            )
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        # Thinking mode renders `<think>` only where a reply may reason (not after a task).
        thinking = text.endswith(THINK_START_TOKEN)
        text += req.reply_prefix
        self._check_chars(text, "messages")
        return self._checked(Prompt(text, tok.encode(text), thinking, req.reply_prefix))

    def completion_prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, list):
            return self._checked(Prompt(None, list(prompt), False, param="prompt"))
        tok = self._need_tokenizer()
        # The released tokenizer adds BOS; a raw prompt that already has it keeps one.
        text = prompt if prompt.startswith(BOS_TOKEN) else BOS_TOKEN + prompt
        self._check_chars(text, "prompt")
        return self._checked(Prompt(text, tok.encode(text), False, param="prompt"))

    def _check_chars(self, text: str, param: str) -> None:
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise ApiError(
                400,
                f"the prompt is {len(text)} characters, more than the {self.max_prompt_chars} "
                f"that could fit in this server's context of {self.max_context} tokens: "
                "shorten it or restart the server with a larger --max-context",
                param=param,
                code="context_length_exceeded",
            )

    def _checked(self, p: Prompt) -> Prompt:
        if len(p.ids) >= self.max_context:
            raise ApiError(
                400,
                f"the prompt is {len(p.ids)} tokens; this server's context is {self.max_context} "
                "(prompt plus at least one generated token): shorten the conversation or restart "
                "the server with a larger --max-context",
                param=p.param,
                code="context_length_exceeded",
            )
        return p

    # -- generation (worker thread) --

    def run(self, job: Job) -> Outcome:
        from homeseek.engine import ContextError

        started = time.perf_counter()
        p = job.params
        # Prompt logprobs need the logits of every prompt position: no cached prefix.
        lease = self.cache.acquire(job.prompt.text, job.prompt.ids, reuse=not p.prompt_logprobs)
        res: GenerationResult | None = None
        try:
            room = self.max_context - len(lease.ids)
            if room < 1:
                raise ContextError(f"prompt of {len(lease.ids)} tokens fills the context")
            res = self.engine.generate(
                prompt_ids=lease.tail,
                session=lease.session,
                max_tokens=min(p.max_tokens or room, room),
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k,
                seed=p.seed,
                thinking=job.prompt.thinking,
                stop=p.stop,
                stream=job.on_text if job.stream else None,
                stream_logprobs=(
                    job.on_logprobs if job.stream and p.logprobs is not None else None
                ),
                cancel=job.cancelled.is_set,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                logit_bias=p.logit_bias,
                logprobs=p.logprobs,
                prompt_logprobs=p.prompt_logprobs,
            )
        except ContextError as e:
            raise ApiError(
                400, str(e), param=job.prompt.param, code="context_length_exceeded"
            ) from None
        finally:
            out_text = None
            if res is not None and job.prompt.text is not None and self.tokenizer is not None:
                out_text = job.prompt.text + self.tokenizer.decode(res.token_ids)
            self.cache.release(lease, res.token_ids if res is not None else None, out_text)
        return Outcome(
            text=res.text,
            finish_reason=res.finish_reason,
            prompt_tokens=len(lease.ids),
            completion_tokens=len(res.token_ids),
            cached_tokens=lease.reused,
            stats=_request_stats(res.stats, lease, job, started),
            logprobs=res.logprobs,
            prompt_logprobs=res.prompt_logprobs,
        )


MTP_STATS = ("mtp_drafted", "mtp_accepted", "mtp_acceptance", "mtp_tokens_per_step")


def _request_stats(
    s: Mapping[str, float], lease: Lease, job: Job, started: float
) -> dict[str, float]:
    queue_s = started - job.created
    lookups = float(s.get("expert_lookups", 0.0))
    return {
        "queue_s": round(queue_s, 6),
        "ttft_s": round(queue_s + float(s.get("ttft_s", 0.0)), 6),  # as the client sees it
        "prefill_s": round(float(s.get("prefill_s", 0.0)), 6),  # this request's prefill
        "prefill_tok_s": round(float(s.get("prefill_tok_s", 0.0)), 3),
        "decode_tok_s": round(float(s.get("decode_tok_s", 0.0)), 3),
        "prompt_tokens": float(len(lease.ids)),
        "cached_tokens": float(lease.reused),  # prefix reuse: state already held
        "prefill_tokens": float(len(lease.tail)),  # what this request actually prefilled
        "total_s": round(time.perf_counter() - job.created, 6),
        "expert_lookups": lookups,
        # Stores without a miss path (everything resident) hit on every lookup.
        "expert_hit_rate": round(float(s.get("expert_hit_rate", 1.0 if lookups else 0.0)), 6),
        **{k: round(float(s[k]), 6) for k in MTP_STATS if k in s},  # speculative decoding
        "expert_bytes_moved": float(s.get("expert_bytes_h2d", 0.0))
        + float(s.get("expert_bytes_disk", 0.0)),
    }


# ------------------------------------------------------------------------------------------------
# Metrics (Prometheus text format)
# ------------------------------------------------------------------------------------------------


class Metrics:
    """Counters and gauges behind one lock; rendered as Prometheus text on /metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.c: dict[str, float] = {
            k: 0.0
            for k in (
                "prompt_tokens",
                "completion_tokens",
                "cached_prompt_tokens",
                "prefix_cache_hits",
                "prefix_cache_misses",
                "rejected",
                "cancelled",
                "engine_errors",
                "generation_seconds",
                "expert_lookups",
                "expert_cache_hits",
                "expert_bytes_moved",
                "mtp_drafted",
                "mtp_accepted",
            )
        }
        self.last_decode_tok_s = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def add(self, name: str, value: float = 1.0) -> None:
        with self.lock:
            self.c[name] += value

    def outcome(self, o: Outcome) -> None:
        s = o.stats
        with self.lock:
            self.c["prompt_tokens"] += o.prompt_tokens
            self.c["completion_tokens"] += o.completion_tokens
            self.c["cached_prompt_tokens"] += o.cached_tokens
            self.c["prefix_cache_hits" if o.cached_tokens else "prefix_cache_misses"] += 1
            self.c["generation_seconds"] += s.get("total_s", 0.0) - s.get("queue_s", 0.0)
            lookups = s.get("expert_lookups", 0.0)
            self.c["expert_lookups"] += lookups
            self.c["expert_cache_hits"] += lookups * s.get("expert_hit_rate", 0.0)
            self.c["expert_bytes_moved"] += s.get("expert_bytes_moved", 0.0)
            self.c["mtp_drafted"] += s.get("mtp_drafted", 0.0)
            self.c["mtp_accepted"] += s.get("mtp_accepted", 0.0)
            if s.get("decode_tok_s"):
                self.last_decode_tok_s = s["decode_tok_s"]

    def render(self, queue_depth: int, queue_capacity: int, running: int) -> str:
        help_ = {
            "prompt_tokens": "Prompt tokens of answered requests.",
            "completion_tokens": "Generated tokens.",
            "cached_prompt_tokens": "Prompt tokens served from a cached session (prefix reuse).",
            "prefix_cache_hits": "Requests that continued a cached session.",
            "prefix_cache_misses": "Requests that prefilled from scratch.",
            "rejected": "Requests refused with 429 because the queue was full.",
            "cancelled": "Requests cancelled (client disconnect or shutdown).",
            "engine_errors": "Requests that failed inside the engine (500).",
            "generation_seconds": "Engine time spent generating.",
            "expert_lookups": "Routed-expert lookups.",
            "expert_cache_hits": "Routed-expert lookups served by the GPU slot pool.",
            "expert_bytes_moved": "Expert bytes copied into the slot pool (host and disk).",
            "mtp_drafted": "Draft tokens the MTP block proposed (speculative decoding).",
            "mtp_accepted": "Draft tokens the main model accepted.",
        }
        lines = [
            "# HELP homeseek_requests_total HTTP requests answered, by endpoint and status.",
            "# TYPE homeseek_requests_total counter",
        ]
        with self.lock:
            for (ep, status), n in sorted(self.requests.items()):
                lines.append(f'homeseek_requests_total{{endpoint="{ep}",status="{status}"}} {n}')
            for k, v in self.c.items():
                name = f"homeseek_{k}_total"
                lines += [f"# HELP {name} {help_[k]}", f"# TYPE {name} counter", f"{name} {v:g}"]
            last = self.last_decode_tok_s
        gauges = {
            "queue_depth": ("Requests waiting for the engine.", queue_depth),
            "queue_capacity": ("Most requests that may wait.", queue_capacity),
            "requests_running": ("Requests being generated (0 or 1).", running),
            "decode_tokens_per_second": ("Decode speed of the last request.", last),
        }
        for k, (h, v) in gauges.items():
            lines += [
                f"# HELP homeseek_{k} {h}",
                f"# TYPE homeseek_{k} gauge",
                f"homeseek_{k} {v:g}",
            ]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Engine worker
# ------------------------------------------------------------------------------------------------


class EngineWorker:
    """One thread that runs jobs from a bounded queue through `run` (normally `Core.run`)."""

    def __init__(
        self,
        run: Callable[[Job], Outcome],
        metrics: Metrics,
        max_queue: int,
        log: TextIO | None = None,
    ) -> None:
        self.run = run
        self.metrics = metrics
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.capacity = max_queue
        self.running: Job | None = None
        self.accepting = True
        self.log = log or sys.stderr
        self.avg_job_s = 1.0  # moving average, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="homeseek-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if not self.accepting:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.metrics.add("rejected")
            wait = max(1, min(60, math.ceil(self.avg_job_s * (self.capacity + 1))))
            raise ApiError(
                429,
                f"the server is busy: {self.capacity} requests are already waiting; "
                f"retry in about {wait} s",
                code="queue_full",
                type="rate_limit_error",
                headers={"Retry-After": str(wait)},
            ) from None

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def idle(self) -> bool:
        return self.running is None and self.queue.empty()

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                self._serve(job)
            except Exception:  # noqa: BLE001 - the one engine thread must outlive any bug
                traceback.print_exc(file=self.log)
                job.events.put(("error", ApiError(500, "internal error (see the server log)")))

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():  # the client left while it waited
            self.metrics.add("cancelled")
            job.events.put(("cancelled", None))
            return
        self.running = job
        t0 = time.perf_counter()
        try:
            out = self.run(job)
        except ApiError as e:
            job.events.put(("error", e))
        except Exception as e:  # noqa: BLE001 - any engine failure is a 500, not a dead server
            self.metrics.add("engine_errors")
            print(f"homeseek: engine error: {type(e).__name__}: {e}", file=self.log)
            traceback.print_exc(file=self.log)
            job.events.put(
                (
                    "error",
                    ApiError(500, f"engine error: {type(e).__name__}: {e}", code="engine"),
                )
            )
        else:
            self.metrics.outcome(out)
            if out.finish_reason == "cancelled":
                self.metrics.add("cancelled")
            job.events.put(("done", out))
        finally:
            self.running = None
            self.avg_job_s = 0.8 * self.avg_job_s + 0.2 * (time.perf_counter() - t0)

    def drain(self, timeout_s: float) -> bool:
        """Stop taking jobs, let queued and running ones finish for up to timeout_s, then cancel
        the rest. True when everything finished in time."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        finished = self.idle()
        if not finished:
            while True:  # queued jobs: answered "shutting down" by their HTTP threads
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.cancelled.set()
                    job.events.put(("cancelled", None))
            running = self.running
            if running is not None:
                running.cancelled.set()  # the engine polls this once per token
            end = time.monotonic() + 10
            while self.running is not None and time.monotonic() < end:
                time.sleep(0.02)
        self.queue.put(None)
        self.thread.join(timeout=5)
        return finished


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------


def _now() -> str:
    """UTC wall-clock time with milliseconds, as access logs carry it."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class ClientGone(Exception):
    """The client closed the connection."""


_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/metrics",
)


@contextlib.contextmanager
def _cancel_on_error(job: Job) -> Iterator[None]:
    """Whatever ends an HTTP thread early (client gone, write error) also ends its job, so the
    engine does not keep generating for nobody."""
    try:
        yield
    except BaseException:
        job.cancelled.set()
        raise


class App:
    """What the HTTP handlers share: the core, the worker, metrics and settings."""

    def __init__(self, engine: Engine, cfg: ServerConfig, log: TextIO | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.log = log or sys.stderr
        self.core = Core(engine, cfg.prefix_sessions)
        self.metrics = Metrics()
        self.worker = EngineWorker(self.core.run, self.metrics, cfg.max_queue, self.log)
        self.created = int(time.time())
        self.draining = False
        self.in_flight = 0
        self.lock = threading.Lock()
        self.log_lock = threading.Lock()  # one access-log line at a time: lines never interleave
        self.limits = Limits(
            max_context=self.core.max_context,
            vocab_size=engine.cfg.vocab_size,
            model_name=cfg.model_name,
            max_tokens_default=cfg.max_tokens_default,
            max_tokens_cap=cfg.max_tokens_cap,
        )

    def write_log(self, line: str) -> None:
        """One line in one write under the lock, so concurrent requests never interleave."""
        with self.log_lock:
            self.log.write(line + "\n")
            self.log.flush()

    def token_text(self, tid: int) -> str:
        tok = self.core.tokenizer
        return tok.decode([tid]) if tok is not None else f"<{tid}>"

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.cfg.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "homeseek",
            "max_model_len": self.core.max_context,
        }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: agents send many requests per connection
    server_version = "homeseek"
    app: App  # set on the subclass `make_server` builds

    # -- plumbing --

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # The stdlib's own messages (malformed request lines, timeouts); requests are logged by
        # `_access_log` instead (the stdlib's line has no latency and no token counts).
        if self.app.cfg.log_requests:
            self.app.write_log(f"{_now()} {self.address_string()} - {format % args}")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._status = int(code) if str(code).isdigit() else 0

    def _access_log(self, started: float) -> None:
        """`<UTC time> <client> "<METHOD> <path>" <status> <seconds>s prompt=<n> completion=<n>
        cached=<n> cancelled=<0|1>`; token fields are `-` for requests that generate nothing."""
        if not self.app.cfg.log_requests:
            return
        out, job = self._outcome, self._job
        toks = "prompt=- completion=- cached=-"
        if out is not None:
            toks = (
                f"prompt={out.prompt_tokens} completion={out.completion_tokens} "
                f"cached={out.cached_tokens}"
            )
        cancelled = int(
            (job is not None and job.cancelled.is_set())
            or (out is not None and out.finish_reason == "cancelled")
        )
        path = self.path.split("?", 1)[0]
        self.app.write_log(
            f'{_now()} {self.client_address[0]} "{self.command} {path}" {self._status} '
            f"{time.perf_counter() - started:.3f}s {toks} cancelled={cancelled}"
        )

    def end_headers(self) -> None:
        self._cors_headers()
        super().end_headers()

    def _allowed_origin(self) -> str | None:
        """The Access-Control-Allow-Origin value for this request, None when it gets none."""
        origins = self.app.cfg.allowed_origins
        origin = self.headers.get("Origin")
        if not origins or origin is None:
            return None
        if "*" in origins:
            return "*"
        return origin if origin in origins else None

    def _cors_headers(self) -> None:
        allow = self._allowed_origin()
        if allow is None:
            return
        self.send_header("Access-Control-Allow-Origin", allow)
        if allow != "*":
            self.send_header("Vary", "Origin")  # caches must not hand one origin's answer on
        self.send_header("Access-Control-Expose-Headers", "Retry-After")

    def _endpoint(self) -> str:
        path = self.path.split("?", 1)[0]
        if path.startswith("/v1/models/"):
            return "/v1/models"
        return path if path in _ENDPOINTS else "other"

    def _send_json(
        self,
        status: int,
        obj: Any,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.app.metrics.request(self._endpoint(), status)

    def _send_error(self, e: ApiError, close: bool = False) -> None:
        self._send_json(e.status, e.body(), e.headers, close=close)

    def _send_text(self, status: int, text: str, ctype: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.app.metrics.request(self._endpoint(), status)

    def _read_json(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "send the body with a Content-Length (chunked is not supported)")
        length = self.headers.get("Content-Length")
        try:
            n = int(length) if length is not None else -1
        except ValueError:
            n = -1
        if n < 0:
            raise ApiError(411, "a JSON body with a valid Content-Length is required")
        limit = self.app.cfg.max_body_bytes
        if n > limit:
            # Read (up to a bound) what the client is sending so it sees the 413, not a reset.
            if n <= 4 * limit:
                while n > 0:
                    chunk = self.rfile.read(min(n, MiB))
                    if not chunk:
                        break
                    n -= len(chunk)
            raise ApiError(
                413,
                f"request body of {length} bytes exceeds the limit of {limit} bytes "
                "(--max-body-mb)",
                code="body_too_large",
            )
        raw = self.rfile.read(n)
        self._body_read = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object", code="invalid_json")
        return body

    def _authorized(self) -> bool:
        key = self.app.cfg.api_key
        if key is None or self._endpoint() == "/health":
            return True
        got = self.headers.get("Authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(
            got[len("Bearer ") :].encode(), key.encode()
        )

    def _client_gone(self) -> bool:
        """True when the peer closed its end (EOF readable) while we were waiting."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- dispatch --

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_HEAD(self) -> None:  # noqa: N802 - answered as GET, headers only
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802 - CORS preflight
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        app = self.app
        self._body_read = False
        self._status = 0
        self._job: Job | None = None
        self._outcome: Outcome | None = None
        started = time.perf_counter()
        with app.lock:
            app.in_flight += 1
        try:
            self._route(method)
        except ApiError as e:
            # A body we did not read would be taken for the next request: close instead.
            unread = not self._body_read and self.headers.get("Content-Length", "0") != "0"
            self._send_error(e, close=unread or e.status in (411, 413))
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a handler bug must not kill the connection thread
            traceback.print_exc(file=app.log)
            try:
                self._send_error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
            except OSError:
                self.close_connection = True
        finally:
            with app.lock:
                app.in_flight -= 1
            self._access_log(started)

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        routes: dict[str, tuple[str, Callable[[], None]]] = {
            "/health": ("GET", self._health),
            "/metrics": ("GET", self._metrics),
            "/v1/models": ("GET", self._models),
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._completions),
        }
        if path.startswith("/v1/models/"):
            routes[path] = ("GET", self._model)
        if path not in routes:
            raise ApiError(404, f"no route {method} {path}", code="not_found")
        want, fn = routes[path]
        if method == "OPTIONS":  # before the key check: browsers send preflights without it
            self._preflight(want)
            return
        if method == "HEAD" and want == "GET":
            method = "GET"  # the same answer; the senders skip the body
        if method != want:
            raise ApiError(405, f"{path} takes {want}, not {method}", code="method_not_allowed")
        if not self._authorized():
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                           code="invalid_api_key")  # fmt: skip
        if self.app.draining and path != "/health":
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        fn()

    # -- routes --

    def _preflight(self, method: str) -> None:
        """OPTIONS: 204 with Allow; with CORS headers when the Origin is allowed (otherwise the
        browser, finding none, refuses the real request, as it should)."""
        self.send_response(204)
        allowed = f"{method}, HEAD, OPTIONS" if method == "GET" else f"{method}, OPTIONS"
        self.send_header("Allow", allowed)
        if self._allowed_origin() is not None:
            self.send_header("Access-Control-Allow-Methods", allowed)
            asked = self.headers.get("Access-Control-Request-Headers")
            # Echo what the client asks for (the JS SDKs send their own x-stainless-* headers).
            self.send_header("Access-Control-Allow-Headers", asked or "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.app.metrics.request(self._endpoint(), 204)

    def _health(self) -> None:
        app = self.app
        status = 503 if app.draining else 200
        self._send_json(
            status,
            {
                "status": "draining" if app.draining else "ok",
                "model": app.cfg.model_name,
                "queue_depth": app.worker.depth,
                "running": app.worker.running is not None,
            },
        )

    def _metrics(self) -> None:
        w = self.app.worker
        text = self.app.metrics.render(w.depth, w.capacity, int(w.running is not None))
        self._send_text(200, text, "text/plain; version=0.0.4; charset=utf-8")

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self.app.model_card()]})

    def _model(self) -> None:
        name = urllib.parse.unquote(self.path.split("?", 1)[0][len("/v1/models/") :])
        if name != self.app.cfg.model_name:
            raise model_not_found(name, self.app.cfg.model_name)
        self._send_json(200, self.app.model_card())

    def _chat(self) -> None:
        app = self.app
        body = self._read_json()
        req = parse_chat_request(body, app.limits)
        prompt = app.core.chat_prompt(req)
        job = self._job = Job(prompt, req.params, stream=req.stream)
        reply = ChatReply(prompt.thinking, prefix=prompt.reply_prefix)
        rid = "chatcmpl-" + uuid.uuid4().hex
        app.worker.submit(job)
        with _cancel_on_error(job):
            if req.stream:
                self._stream_chat(job, reply, rid, req.include_usage)
                return
            out = self._wait(job)
        reply.feed(out.text)
        reply.finish()
        lps = None if out.logprobs is None else chat_logprobs(out.logprobs, app.token_text)
        choice = {
            "index": 0,
            "message": reply.message(),
            "logprobs": lps,
            "finish_reason": reply.finish_reason(out.finish_reason),
        }
        self._send_json(
            200,
            envelope(rid, "chat.completion", int(time.time()), app.cfg.model_name, [choice])
            | {"usage": usage_dict(out), "stats": out.stats},
        )

    def _completions(self) -> None:
        app = self.app
        body = self._read_json()
        req = parse_completion_request(body, app.limits)
        prompt = app.core.completion_prompt(req.prompt)
        job = self._job = Job(prompt, req.params, stream=req.stream)
        rid = "cmpl-" + uuid.uuid4().hex
        echo = ""
        if req.echo:  # a prompt of ids echoes as its text (nothing without a tokenizer)
            tok = app.core.tokenizer
            echo = (
                req.prompt if isinstance(req.prompt, str) else tok.decode(req.prompt) if tok else ""
            )
        app.worker.submit(job)
        with _cancel_on_error(job):
            if req.stream:
                self._stream_completion(job, rid, echo, req.include_usage)
                return
            out = self._wait(job)
        lps = None
        if out.logprobs is not None:
            ids, per = [x.token_id for x in out.logprobs], list(out.logprobs)
            if out.prompt_logprobs is not None:  # echo: the prompt's tokens first
                # Without the BOS this server put in front, which the echoed text lacks too.
                skip = int(isinstance(req.prompt, str) and not req.prompt.startswith(BOS_TOKEN))
                ids = prompt.ids[skip:] + ids
                per = list(out.prompt_logprobs)[skip:] + per
            lps = completion_logprobs(ids, per, app.token_text)
        choice = {
            "index": 0,
            "text": echo + out.text,
            "logprobs": lps,
            "finish_reason": TEXT_FINISH.get(out.finish_reason, "stop"),
        }
        self._send_json(
            200,
            envelope(rid, "text_completion", int(time.time()), app.cfg.model_name, [choice])
            | {"usage": usage_dict(out), "stats": out.stats},
        )

    # -- waiting and streaming --

    def _next_event(self, job: Job) -> tuple[str, Any]:
        """The worker's next event; cancels the job and raises ClientGone if the client left."""
        while True:
            try:
                return job.events.get(timeout=0.05)
            except queue.Empty:
                if self._client_gone():
                    job.cancelled.set()
                    raise ClientGone from None

    def _wait(self, job: Job) -> Outcome:
        while True:
            kind, val = self._next_event(job)
            if kind == "done":
                self._outcome = val
                return val
            if kind == "error":
                raise val
            if kind == "cancelled":
                raise ApiError(503, "the server is shutting down", code="shutting_down")

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        # No Content-Length: the stream ends when the connection closes.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.app.metrics.request(self._endpoint(), 200)

    def _sse(self, obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        try:
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
        except OSError as e:
            raise ClientGone from e

    def _stream_events(
        self,
        job: Job,
        on_text: Callable[[str], None],
        on_logprobs: Callable[[list[Any]], None],
    ) -> Outcome | None:
        """Feed streamed text to on_text and token logprobs to on_logprobs until the job ends;
        None after an error or shutdown."""
        while True:
            kind, val = self._next_event(job)
            if kind == "text":
                on_text(val)
            elif kind == "logprobs":
                on_logprobs(val)
            elif kind == "done":
                self._outcome = val
                return val
            elif kind == "error":
                self._sse(val.body())
                return None
            else:  # cancelled while queued (shutdown)
                self._sse(ApiError(503, "the server is shutting down").body())
                return None

    def _stream_chat(self, job: Job, reply: ChatReply, rid: str, include_usage: bool) -> None:
        created, model = int(time.time()), self.app.cfg.model_name

        def chunk(
            delta: dict[str, Any], finish: str | None = None, lps: Any = None
        ) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}
            c = envelope(rid, "chat.completion.chunk", created, model, [choice])
            if include_usage:
                c["usage"] = None  # as OpenAI: only the last chunk carries usage
            return c

        self._start_sse()
        self._sse(chunk({"role": "assistant", "content": ""}))
        for d in reply.take_prefix_deltas():
            self._sse(chunk(d))

        def on_text(text: str) -> None:
            for d in reply.feed(text):
                self._sse(chunk(d))

        def on_logprobs(entries: list[Any]) -> None:  # after the text they belong to
            self._sse(chunk({}, lps=chat_logprobs(entries, self.app.token_text)))

        out = self._stream_events(job, on_text, on_logprobs)
        if out is not None:
            for d in reply.finish():
                self._sse(chunk(d))
            last = chunk({}, reply.finish_reason(out.finish_reason))
            last["stats"] = out.stats
            if include_usage:
                self._sse(last)
                self._sse({**chunk({}), "choices": [], "usage": usage_dict(out)})
            else:
                last["usage"] = usage_dict(out)  # usage always, even unasked
                self._sse(last)
        self._sse("[DONE]")

    def _stream_completion(self, job: Job, rid: str, echo: str, include_usage: bool) -> None:
        created, model = int(time.time()), self.app.cfg.model_name

        def chunk(text: str, finish: str | None = None, lps: Any = None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": finish}
            c = envelope(rid, "text_completion", created, model, [choice])
            if include_usage:
                c["usage"] = None
            return c

        self._start_sse()
        if echo:
            self._sse(chunk(echo))
        offset = 0  # text_offset of the next token, in the completion's text

        def on_logprobs(entries: list[Any]) -> None:
            nonlocal offset
            ids = [x.token_id for x in entries]
            lps = completion_logprobs(ids, entries, self.app.token_text, offset)
            offset += sum(len(t) for t in lps["tokens"])
            self._sse(chunk("", lps=lps))

        out = self._stream_events(job, lambda t: self._sse(chunk(t)), on_logprobs)
        if out is not None:
            last = chunk("", TEXT_FINISH.get(out.finish_reason, "stop"))
            last["stats"] = out.stats
            if include_usage:
                self._sse(last)
                self._sse({**chunk(""), "choices": [], "usage": usage_dict(out)})
            else:
                last["usage"] = usage_dict(out)
                self._sse(last)
        self._sse("[DONE]")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up exit
    request_queue_size = 128  # listen backlog: bursts of agent requests


def make_server(cfg: ServerConfig, app: App | None = None) -> ThreadingHTTPServer:
    """Bind and listen (port 0 = any free port); requests are served once an app is attached.

    `homeseek serve` binds before loading the weights, so a busy port fails in a second, not
    after minutes of loading; clients that connect meanwhile wait in the listen backlog.
    """
    cls = _HTTPServer
    if ":" in cfg.host:  # an IPv6 literal such as ::1
        cls = type("_HTTPServer6", (_HTTPServer,), {"address_family": socket.AF_INET6})
    try:
        httpd = cls((cfg.host, cfg.port), Handler)
    except OSError as e:
        raise ValueError(
            f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}; is another server "
            "running there? choose another --port"
        ) from None
    if app is not None:
        attach(httpd, app)
    return httpd


def attach(httpd: ThreadingHTTPServer, app: App) -> None:
    httpd.RequestHandlerClass = type("BoundHandler", (Handler,), {"app": app})


# ------------------------------------------------------------------------------------------------
# Startup banner and the serve loop
# ------------------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def banner_lines(engine: Engine, cfg: ServerConfig) -> list[str]:
    """Where the weights and state live, as the engine actually placed them (docs/engine.md §1)."""
    from homeseek import plan

    mc, rt = engine.cfg, engine.rt
    act = {"torch.float32": 4}.get(str(rt.dtype), 2)
    p = plan.memory_plan(mc, 0.0, 0.0, rt.max_context, act_bytes=act)
    store = engine.experts
    n_total = p.n_experts
    slots = min(int(getattr(store, "n_slots", n_total)), n_total)
    host = int(getattr(store, "n_host", 0))
    disk = max(n_total - slots - host, 0)
    budget = f", GPU budget {rt.gpu_mem_gb:g} GiB" if rt.gpu_mem_gb is not None else ""
    return [
        f"model {cfg.model_name} ({engine.path}), device {rt.device}{budget}, "
        f"max_context {rt.max_context}, tokenizer {'yes' if engine.tokenizer else 'NO (ids only)'}",
        f"memory: dense weights {_size(p.dense)} on {rt.device}; decode state "
        f"{_size(p.state)} per session x {cfg.prefix_sessions} kept for prefix reuse",
        f"routed experts: {n_total} x {_size(p.record)} = {_size(n_total * p.record)}; "
        f"{slots} in the slot pool on {rt.device} ({_size(slots * p.record)}), "
        f"{host} in the host cache ({_size(host * p.record)}), {disk} read from disk on demand",
        f"prefill: chunks of {rt.prefill_chunk} tokens"
        + (
            f", layer by layer in groups of {rt.prefill_group}"
            if (rt.prefill_group or 0) > rt.prefill_chunk
            else ""
        )
        + (f", workspace {_size(engine.plan.workspace)}" if getattr(engine, "plan", None) else ""),
        f"requests: one at a time, queue {cfg.max_queue}, body limit "
        f"{_size(cfg.max_body_bytes)}, API key {'required' if cfg.api_key else 'off'}",
    ]


def serve(
    engine: Engine,
    cfg: ServerConfig,
    httpd: ThreadingHTTPServer | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the server until SIGINT/SIGTERM, then drain and return the exit code (0).

    Must run on the main thread (signal handlers). `httpd` is a socket bound by `make_server`.
    """
    out = out or sys.stdout
    app = App(engine, cfg)
    if httpd is None:
        httpd = make_server(cfg)
    attach(httpd, app)
    host, port = httpd.server_address[:2]
    for line in banner_lines(engine, cfg):
        print(line, file=out)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"warning: listening on {cfg.host} without --api-key", file=out)
    shown = f"[{host}]" if ":" in str(host) else host
    print(
        f"listening on http://{shown}:{port} (OpenAI base URL http://{shown}:{port}/v1)", file=out
    )
    out.flush()

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: stop waiting for the drain
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2})
    thread.start()
    try:
        while not stop.wait(0.5):  # a timed wait keeps signal handlers running promptly
            pass
        busy = app.worker.depth + (app.worker.running is not None)
        print(
            f"shutting down: {busy} request(s) running or queued, up to "
            f"{cfg.drain_timeout_s:g} s to finish",
            file=out,
            flush=True,
        )
        httpd.shutdown()
        httpd.server_close()  # refuse new connections now; open ones finish below
        app.draining = True
        finished = app.worker.drain(cfg.drain_timeout_s)
        deadline = time.monotonic() + 5  # let HTTP threads write their last bytes
        while app.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        print("stopped" + ("" if finished else " (cancelled what was left)"), file=out, flush=True)
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if thread.is_alive():
            httpd.shutdown()
