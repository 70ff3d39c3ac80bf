"""`homeseek chat`: the REPL against a real `homeseek serve --model tiny`, and in-process."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeseek.chat_cli import ChatError, HttpBackend, LocalBackend, Repl

SCRIPT = """/help
Hello there
Tell me more.
/stats
/think
Why?
/clear
/stats
/bogus
/quit
never read
"""


@pytest.fixture(scope="module")
def server_url(_model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("chat-serve") / "server.log"
    cmd = [sys.executable, "-m", "homeseek", "serve", "--model", "tiny", "--threads", "1"]
    cmd += ["--port", "0", "--max-context", "2048", "--quiet"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=os.environ.copy()
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    url, deadline = None, time.monotonic() + 180
    while url is None and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            url = m.group(1)
        elif line == "":
            break
    if url is None:
        proc.kill()
        raise RuntimeError(f"server did not start: {log.read_text()}")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def _run(backend: HttpBackend | LocalBackend, script: str = SCRIPT) -> tuple[Repl, str]:
    out = io.StringIO()
    repl = Repl(backend, max_tokens=6, temperature=0, stdin=io.StringIO(script), stdout=out)
    assert repl.run() == 0
    return repl, out.getvalue()


def _check_transcript(text: str) -> None:
    assert text.startswith("homeseek chat - ")
    assert "/think   toggle thinking mode" in text  # /help
    assert text.count("assistant> ") == 3
    assert "thinking mode on" in text and "(thinking) " in text  # the third reply reasons
    # /stats after the second turn: the first turn's tokens came from the server's cache.
    first_stats = text.split("you> /stats\n", 1)[1]
    m = re.search(r"tokens: (\d+) prompt \((\d+) reused from the cache\)", first_stats)
    assert m and int(m.group(2)) > 0 and int(m.group(2)) < int(m.group(1))
    assert "decode" in first_stats and "hit rate" in first_stats
    assert "conversation cleared" in text and "no reply yet" in text  # /clear then /stats
    assert "unknown command /bogus" in text
    assert "never read" not in text  # /quit stopped the loop


def test_repl_against_server(server_url: str) -> None:
    backend = HttpBackend(server_url)
    backend.connect()
    assert backend.describe() == f"tiny at {server_url}/v1"
    repl, text = _run(backend)
    _check_transcript(text)
    assert repl.history == []  # cleared


def test_repl_keeps_history_and_reasoning(server_url: str) -> None:
    backend = HttpBackend(server_url)
    backend.connect()
    repl, _ = _run(backend, "first\n/think\nsecond\n")
    roles = [m["role"] for m in repl.history]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert "reasoning_content" in repl.history[3] and repl.last is not None
    assert repl.last.usage["prompt_tokens"] > 10


def test_repl_in_process(_model_cache: Path) -> None:
    import homeseek

    backend = LocalBackend(homeseek.load("tiny", max_context=2048), "tiny")
    assert "in-process" in backend.describe()
    _, text = _run(backend)
    _check_transcript(text)


def test_unreachable_server_is_a_clear_error() -> None:
    backend = HttpBackend("http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ChatError, match="cannot reach .*homeseek serve"):
        backend.connect()


def test_homeseek_chat_command(server_url: str) -> None:
    """The real command with piped input, as in the transcript of the note."""
    r = subprocess.run(
        [sys.executable, "-m", "homeseek", "chat", "--url", server_url, "--max-tokens", "6"],
        input="Hi!\n/stats\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "you> Hi!\nassistant> " in r.stdout and "tokens:" in r.stdout
    dead = subprocess.run(
        [sys.executable, "-m", "homeseek", "chat", "--url", "http://127.0.0.1:9"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 1 and "cannot reach" in dead.stderr
