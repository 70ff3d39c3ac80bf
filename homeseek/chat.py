"""DeepSeek-V4 chat format: prompt encoding, completion parsing and streaming parsing.

V4 ships no Jinja chat template; the reference is the hub release's `encoding/encoding_dsv4.py`.
`encode_messages` reproduces that encoder byte for byte (the official golden vectors in
tests/data/dsv4-encoding check it) and adds what a server needs on top: input validation with
errors that name the message and field, and OpenAI-style inputs (tool-call arguments as JSON
strings or dicts, text content parts).

The model side of the format (what a completion looks like):

    [reasoning</think>]content[\\n\\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>]<｜end▁of▁sentence｜>

The reasoning part exists only in thinking mode, where the prompt already ends with `<think>`.
`CompletionStream` splits that text incrementally into reasoning / content / tool-call events;
`parse_completion` is the same machine run over a whole completion, so streamed and non-streamed
answers can never disagree.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# ------------------------------------------------------------------------------------------------
# Special tokens. Text is what the encoder writes; ids are the checkpoint's
# (docs/architecture.md §5). They differ from V3/R1 (where `<think>` was 128798), so never borrow
# ids from an older DeepSeek tokenizer.
# ------------------------------------------------------------------------------------------------

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_START_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"
DSML_TOKEN = "｜DSML｜"
LATEST_REMINDER_TOKEN = "<｜latest_reminder｜>"
ACTION_TOKEN = "<｜action｜>"
QUERY_TOKEN = "<｜query｜>"
AUTHORITY_TOKEN = "<｜authority｜>"
DOMAIN_TOKEN = "<｜domain｜>"
TITLE_TOKEN = "<｜title｜>"
EXTRACTED_URL_TOKEN = "<｜extracted_url｜>"
READ_URL_TOKEN = "<｜read_url｜>"

BOS_ID = 0
EOS_ID = 1
USER_ID = 128803
ASSISTANT_ID = 128804
THINK_START_ID = 128821
THINK_END_ID = 128822
DSML_ID = 128825
LATEST_REMINDER_ID = 128828
ACTION_ID = 128829
QUERY_ID = 128830
AUTHORITY_ID = 128831
DOMAIN_ID = 128832
TITLE_ID = 128836
EXTRACTED_URL_ID = 128844
READ_URL_ID = 128845

# Every special token the V4 chat format uses, text -> id. The synthetic tokenizer registers
# exactly these at these ids, and tests compare the real tokenizer against this table.
SPECIAL_TOKEN_IDS: dict[str, int] = {
    BOS_TOKEN: BOS_ID,
    EOS_TOKEN: EOS_ID,
    USER_TOKEN: USER_ID,
    ASSISTANT_TOKEN: ASSISTANT_ID,
    THINK_START_TOKEN: THINK_START_ID,
    THINK_END_TOKEN: THINK_END_ID,
    DSML_TOKEN: DSML_ID,
    LATEST_REMINDER_TOKEN: LATEST_REMINDER_ID,
    ACTION_TOKEN: ACTION_ID,
    QUERY_TOKEN: QUERY_ID,
    AUTHORITY_TOKEN: AUTHORITY_ID,
    DOMAIN_TOKEN: DOMAIN_ID,
    TITLE_TOKEN: TITLE_ID,
    EXTRACTED_URL_TOKEN: EXTRACTED_URL_ID,
    READ_URL_TOKEN: READ_URL_ID,
}

# Quick-instruction tasks (`"task"` on a message) and the token each one appends.
# `extracted_url` is not a task: it is written inside user text, before each URL.
TASK_TOKENS: dict[str, str] = {
    "action": ACTION_TOKEN,
    "query": QUERY_TOKEN,
    "authority": AUTHORITY_TOKEN,
    "domain": DOMAIN_TOKEN,
    "title": TITLE_TOKEN,
    "read_url": READ_URL_TOKEN,
}

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
THINKING_MODES = ("chat", "thinking")
# "high" is accepted and adds nothing; only "max" changes the prompt.
REASONING_EFFORTS = (None, "high", "max")

# Where a tool-call block starts in model output. The blank line is part of the marker: the
# parser splits content from tool calls at the first occurrence of this exact string.
TOOL_CALLS_START = "\n\n<" + DSML_TOKEN + "tool_calls"

_TOOL_CALLS_OPEN = "<" + DSML_TOKEN + "tool_calls>"
_TOOL_CALLS_CLOSE = "</" + DSML_TOKEN + "tool_calls>"
_INVOKE_OPEN = "<" + DSML_TOKEN + "invoke"
_INVOKE_CLOSE = "</" + DSML_TOKEN + "invoke>"
_PARAM_OPEN = "<" + DSML_TOKEN + "parameter"
_PARAM_CLOSE = "</" + DSML_TOKEN + "parameter>"

# ------------------------------------------------------------------------------------------------
# Fixed protocol text. The model was trained on these exact bytes; the goldens check them.
# ------------------------------------------------------------------------------------------------

_REASONING_EFFORT_MAX_TEXT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

# The tools section is this head, one JSON schema per line, then the tail.
_TOOLS_HEAD = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools "
    'by writing a "<｜DSML｜tool_calls>" block like the following:\n\n'
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE'
    "</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.'
    "\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning "
    "inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
_TOOLS_TAIL = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls.\n"
)

_RESPONSE_FORMAT_HEAD = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)


def _to_json(value: Any) -> str:
    # Same settings as the official encoder: default separators, non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------


@dataclass
class _ToolCall:
    name: str
    arguments: dict[str, Any]
    call_id: str  # "" when the caller gave none; only used to order tool results


@dataclass
class _Block:
    """One piece of a user turn: its own text, or a tool result folded into it."""

    text: str
    is_tool_result: bool = False
    call_id: Any = ""


@dataclass
class _Turn:
    """A validated message. User turns carry `blocks`; everything else carries `content`."""

    role: str
    content: str = ""
    blocks: list[_Block] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    response_format: Any = None
    tool_calls: list[_ToolCall] = field(default_factory=list)
    reasoning: str = ""
    wo_eos: bool = False
    task: str | None = None


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str = "chat",
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    context: Sequence[Mapping[str, Any]] | None = None,
    add_bos: bool = True,
) -> str:
    """Render a conversation as the V4 prompt string (byte-identical to the official encoder).

    messages: OpenAI-style dicts with role system/user/assistant/tool/developer/latest_reminder.
      Extra keys the official encoder understands: `tools` and `response_format` (system and
      developer), `reasoning_content` and `wo_eos` (assistant), `task` (quick-instruction task),
      `tool_call_id` (tool).
    thinking_mode: "chat" (prompt ends `<｜Assistant｜></think>`) or "thinking" (ends `<think>`).
    drop_thinking: in thinking mode, omit reasoning of turns before the last user turn and drop
      developer turns before it. Ignored (treated as False) when any message carries tools.
    reasoning_effort: None, "high" (no change) or "max" (fixed paragraph before everything, thinking
      mode only).
    context: messages already encoded earlier (e.g. a cached prefix). They steer the rendering of
      `messages` but are not rendered themselves, and no BOS is written.
    add_bos: write BOS at the start (only when there is no context).

    Raises ValueError naming the message index and field for malformed input.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(
            f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}"
        )
    earlier = [_validate(m, f"context[{i}]") for i, m in enumerate(context or ())]
    new = [_validate(m, f"messages[{i}]") for i, m in enumerate(messages)]

    # Tool messages become user turns; each list is folded on its own (a context that ends in a
    # tool result does not absorb the first new message), but the tool-call order may come from
    # an assistant turn in the context.
    earlier = _fold_into_user_turns(earlier)
    new = _fold_into_user_turns(new)
    turns = earlier + new
    _order_tool_results(turns)

    thinking = thinking_mode == "thinking"
    # Tool use needs the reasoning of earlier steps, so tools anywhere switch dropping off.
    # (Tools given on a user message are ignored by the official encoder, here too.)
    drop = drop_thinking and not any(t.tools for t in turns)
    first = len(earlier)
    if thinking and drop:
        turns = _drop_old_reasoning(turns)
        # The official encoder counts what dropping leaves of the context on its own; when a
        # context ends before the conversation's last user turn, that count can differ from
        # the context's share of the dropped full list. Reproduced as is.
        first = len(_drop_old_reasoning(earlier))

    parts = [BOS_TOKEN] if add_bos and not earlier else []
    last_user = _last_user_index(turns)
    for i in range(first, len(turns)):
        parts.append(_render_turn(turns, i, last_user, thinking, drop, reasoning_effort))
    return "".join(parts)


def _validate(msg: Any, where: str) -> _Turn:
    """Check one input message and convert it to a `_Turn` (never mutates the input)."""
    if not isinstance(msg, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role: unknown role {role!r}; expected one of {ROLES}")
    where = f"{where} ({role})"
    turn = _Turn(role=role)

    task = msg.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise ValueError(
            f"{where}.task: unknown task {task!r}; expected one of {tuple(TASK_TOKENS)}"
        )
    turn.task = task
    turn.wo_eos = bool(msg.get("wo_eos", False))

    content = msg.get("content")
    if role == "tool":
        if content is None:
            raise ValueError(f"{where}: missing 'content' (the tool result)")
        turn.blocks = [_Block(_tool_result_text(content, where), True, msg.get("tool_call_id", ""))]
        return turn
    if role in ("user", "developer", "latest_reminder") and content is None:
        raise ValueError(f"{where}: missing 'content'")
    text = _content_text(content, f"{where}.content")
    if role == "developer" and not text:
        raise ValueError(f"{where}.content: must be non-empty")
    if role == "user":
        turn.blocks = [_Block(text)]
    else:
        turn.content = text

    tools = msg.get("tools")
    if tools:
        if not isinstance(tools, Sequence) or isinstance(tools, str):
            raise ValueError(f"{where}.tools: expected a list of tool definitions")
        # User tools are dropped by the official encoder (its merge step keeps only the text).
        if role != "user":
            turn.tools = [_tool_schema(t, f"{where}.tools[{j}]") for j, t in enumerate(tools)]
    if msg.get("response_format"):
        turn.response_format = msg["response_format"]
        _json_or_error(turn.response_format, f"{where}.response_format")

    if role == "assistant":
        reasoning = msg.get("reasoning_content")
        if reasoning is None:
            reasoning = msg.get("reasoning")  # the name some OpenAI-compatible clients send
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"{where}.reasoning_content: expected a string")
        turn.reasoning = reasoning or ""
        calls = msg.get("tool_calls") or []
        if not isinstance(calls, Sequence) or isinstance(calls, str):
            raise ValueError(f"{where}.tool_calls: expected a list")
        turn.tool_calls = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    return turn


def _content_text(content: Any, where: str) -> str:
    """Message content as text: a string, or OpenAI text parts joined by a blank line."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        # The official V4 encoder takes only strings here; "\n\n" follows how its successors
        # flatten text blocks and how tool-result parts are joined below.
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"{where}[{j}]: unsupported content part {kind!r} (text only)")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}[{j}].text: expected a string")
            texts.append(part["text"])
        return "\n\n".join(texts)
    raise ValueError(f"{where}: expected a string or a list of text parts")


def _tool_result_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        # As the official encoder does: text parts joined by a blank line, anything else as an
        # "[Unsupported <type>]" placeholder so the model still sees that something was there.
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise ValueError(f"{where}.content[{j}]: expected a dict content part")
            if part.get("type") == "text":
                if not isinstance(part.get("text", ""), str):
                    raise ValueError(f"{where}.content[{j}].text: expected a string")
                texts.append(part.get("text", ""))
            else:
                texts.append(f"[Unsupported {part.get('type')}]")
        return "\n\n".join(texts)
    raise ValueError(f"{where}.content: expected a string or a list of content parts")


def _tool_schema(tool: Any, where: str) -> dict[str, Any]:
    """The function schema out of an OpenAI tool (`{"type": "function", "function": {...}}`)."""
    if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
        schema = tool["function"]
    elif isinstance(tool, Mapping) and "name" in tool:
        schema = tool  # already a bare function schema
    else:
        raise ValueError(f"{where}: expected {{'type': 'function', 'function': {{'name': ...}}}}")
    if not isinstance(schema.get("name"), str) or not schema["name"]:
        raise ValueError(f"{where}.function.name: missing or not a string")
    _json_or_error(schema, where)
    return dict(schema)


def _tool_call(call: Any, where: str) -> _ToolCall:
    """Accept OpenAI form `{"id", "type", "function": {"name", "arguments"}}` or flat form."""
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: expected a dict")
    fn = call.get("function")
    if isinstance(fn, Mapping):
        loc = f"{where}.function"
    else:
        fn, loc = call, where
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{loc}.name: missing or not a string")
    if "arguments" not in fn:
        raise ValueError(f"{loc}.arguments: missing")
    raw = fn["arguments"]
    if isinstance(raw, str):
        if not raw.strip():
            args: Any = {}  # some clients send "" for a call without parameters
        else:
            try:
                args = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{loc}.arguments: not valid JSON ({e}): {raw[:200]!r}") from e
    else:
        args = raw
    if not isinstance(args, Mapping):
        raise ValueError(f"{loc}.arguments: must be a JSON object, got {type(args).__name__}")
    _json_or_error(args, f"{loc}.arguments")
    call_id = call.get("id") or (fn.get("id") if fn is not call else "") or ""
    return _ToolCall(name=name, arguments=dict(args), call_id=call_id)


def _json_or_error(value: Any, where: str) -> None:
    try:
        _to_json(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: not JSON-serialisable ({e})") from e


def _fold_into_user_turns(turns: list[_Turn]) -> list[_Turn]:
    """V4 has no tool role: tool results become `<tool_result>` blocks of user turns.

    Consecutive tool results share one user turn, and a user message right after a user turn
    joins it as another block unless that turn carries a task (the official merge rule; the
    joining message's own task and wo_eos are lost, as there).
    """
    out: list[_Turn] = []
    for t in turns:
        if t.role == "tool":
            if out and out[-1].role == "user":
                out[-1].blocks.extend(t.blocks)
            else:
                out.append(_Turn(role="user", blocks=list(t.blocks)))
        elif t.role == "user":
            if out and out[-1].role == "user" and out[-1].task is None:
                out[-1].blocks.extend(t.blocks)
            else:
                out.append(_Turn(role="user", blocks=list(t.blocks), task=t.task, wo_eos=t.wo_eos))
        else:
            out.append(copy.copy(t))
    return out


def _order_tool_results(turns: list[_Turn]) -> None:
    """Reorder tool results in each user turn to follow the latest assistant's tool_calls.

    Results whose id the assistant did not use rank as position 0 (official behaviour); the sort
    is stable and only permutes the tool-result slots, text blocks stay where they are.
    """
    order: dict[Any, int] = {}
    for t in turns:
        if t.role == "assistant" and t.tool_calls:
            order = {c.call_id: k for k, c in enumerate(t.tool_calls) if c.call_id}
        elif t.role == "user" and order:
            slots = [k for k, b in enumerate(t.blocks) if b.is_tool_result]
            if len(slots) > 1:
                results = sorted(
                    (t.blocks[k] for k in slots), key=lambda b: order.get(b.call_id, 0)
                )
                for k, b in zip(slots, results, strict=True):
                    t.blocks[k] = b


def _last_user_index(turns: list[_Turn]) -> int:
    # Developer turns count as user turns; so do folded tool results.
    for i in range(len(turns) - 1, -1, -1):
        if turns[i].role in ("user", "developer"):
            return i
    return -1


def _drop_old_reasoning(turns: list[_Turn]) -> list[_Turn]:
    """Thinking-mode history compaction: before the last user turn, assistant turns lose their
    reasoning and developer turns (search-agent instructions) disappear."""
    last_user = _last_user_index(turns)
    out = []
    for i, t in enumerate(turns):
        if i >= last_user or t.role in ("user", "system", "latest_reminder"):
            out.append(t)
        elif t.role == "assistant":
            stripped = copy.copy(t)
            stripped.reasoning = ""
            out.append(stripped)
    return out


def _render_turn(
    turns: list[_Turn],
    i: int,
    last_user: int,
    thinking: bool,
    drop: bool,
    reasoning_effort: str | None,
) -> str:
    t = turns[i]
    out: list[str] = []
    if i == 0 and thinking and reasoning_effort == "max":
        out.append(_REASONING_EFFORT_MAX_TEXT)

    if t.role in ("system", "developer"):
        if t.role == "developer":
            out.append(USER_TOKEN)
        out.append(t.content)
        if t.tools:
            out.append("\n\n" + _TOOLS_HEAD + "\n".join(map(_to_json, t.tools)) + _TOOLS_TAIL)
        if t.response_format:
            out.append("\n\n" + _RESPONSE_FORMAT_HEAD + _to_json(t.response_format))
    elif t.role == "user":
        out.append(USER_TOKEN)
        out.append(
            "\n\n".join(
                f"<tool_result>{b.text}</tool_result>" if b.is_tool_result else b.text
                for b in t.blocks
            )
        )
    elif t.role == "latest_reminder":
        out.append(LATEST_REMINDER_TOKEN + t.content)
    else:  # assistant
        # A turn answering a task (e.g. the action label) never has a reasoning part. The
        # `<think>` opener is not part of the turn: the preceding user turn's transition wrote it.
        after_task = i > 0 and turns[i - 1].task is not None
        if thinking and not after_task and (not drop or i > last_user):
            out.append(t.reasoning + THINK_END_TOKEN)
        out.append(t.content)
        if t.tool_calls:
            invokes = "\n".join(_dsml_invoke(c) for c in t.tool_calls)
            out.append(f"\n\n{_TOOL_CALLS_OPEN}\n{invokes}\n{_TOOL_CALLS_CLOSE}")
        if not t.wo_eos:
            out.append(EOS_TOKEN)

    # What comes after the turn depends on the next one: before a user/system/developer turn
    # nothing; before an assistant turn, a reminder or the end, the generation header.
    nxt = turns[i + 1].role if i + 1 < len(turns) else None
    if nxt is None or nxt in ("assistant", "latest_reminder"):
        if t.task is not None:
            if t.task == "action":
                out.append(ASSISTANT_TOKEN)
                out.append(THINK_START_TOKEN if thinking else THINK_END_TOKEN)
            out.append(TASK_TOKENS[t.task])
        elif t.role in ("user", "developer"):
            out.append(ASSISTANT_TOKEN)
            # Open a reasoning block where the following assistant turn keeps its reasoning.
            keep = thinking and (not drop or i >= last_user)
            out.append(THINK_START_TOKEN if keep else THINK_END_TOKEN)
    return "".join(out)


def _dsml_invoke(call: _ToolCall) -> str:
    """One `<｜DSML｜invoke>`: strings raw with string="true", everything else as JSON."""
    params = []
    for key, value in call.arguments.items():
        if isinstance(value, str):
            is_str, text = "true", value
        else:
            is_str, text = "false", _to_json(value)
        params.append(f'{_PARAM_OPEN} name="{key}" string="{is_str}">{text}{_PARAM_CLOSE}')
    body = "\n".join(params)
    return f'{_INVOKE_OPEN} name="{call.name}">\n{body}\n{_INVOKE_CLOSE}'


# ------------------------------------------------------------------------------------------------
# Parsing model output
# ------------------------------------------------------------------------------------------------

StreamEventKind = Literal["reasoning", "content", "tool_call_start", "tool_call_args"]


@dataclass(frozen=True)
class StreamEvent:
    """One increment of a completion.

    reasoning / content: `text` is the next piece of reasoning_content / content.
    tool_call_start: a call at position `index` begins; `id` and `name` are final.
    tool_call_args: `text` is the next piece of call `index`'s arguments JSON string.
    """

    kind: StreamEventKind
    text: str = ""
    index: int = -1
    id: str = ""
    name: str = ""


def _random_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _partial_marker_start(text: str, markers: Sequence[str]) -> int:
    """Index where the longest suffix of `text` that is a proper prefix of a marker starts."""
    longest = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), longest, -1):
            if text.endswith(m[:n]):
                longest = n
                break
    return len(text) - longest


def _earliest(text: str, markers: Sequence[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for m in markers:
        p = text.find(m)
        if p >= 0 and (best is None or p < best[0]):
            best = (p, m)
    return best


_WS = " \t\r\n"
# A tag head ends at the first `">` (invoke) or `" string="...">` (parameter); what precedes it
# is `name="..."`, the name taken verbatim (quotes included, as the official parser allows).
_INVOKE_HEAD_END_RE = re.compile(r'"\s*>')
_PARAM_HEAD_END_RE = re.compile(r'"\s+string="(true|false)"\s*>')
_NAME_ATTR_RE = re.compile(r'\s*name="(.*)', re.DOTALL)

# Parser states.
_REASONING, _CONTENT = "reasoning", "content"
_BLOCK_OPEN, _BETWEEN_CALLS, _CALL_HEAD, _CALL_BODY = "block", "calls", "call_head", "call"
_PARAM_HEAD, _PARAM_VALUE, _AFTER_BLOCK = "param_head", "param", "after"


class CompletionStream:
    """Incremental parser for V4 completions (the model's text after the prompt).

    feed(delta) returns the events that are certain so far; text that could still turn out to be
    the start of `</think>`, of the tool-call block or of EOS is held back until the next delta
    (or `finish()`) settles it. Everything after EOS is ignored.

    Tool-call arguments stream as the JSON object string the official parser builds:
    `{"key": value, ...}` where string parameters are JSON-escaped as they arrive and
    non-string parameters are passed through verbatim once complete (a value that is not valid
    JSON is sent as a JSON string instead, so arguments stay parseable).

    Tolerated: a missing EOS and text cut anywhere (generation hit max_tokens) - a truncated
    call keeps its incomplete arguments; `</think>` missing in thinking mode (all text is
    reasoning). Raised as ValueError: a tool-call block whose structure is wrong (unknown tag,
    text between tags, bad attributes, duplicate parameter, text after the block).
    """

    def __init__(
        self, thinking_mode: str = "chat", new_call_id: Callable[[], str] | None = None
    ) -> None:
        if thinking_mode not in THINKING_MODES:
            raise ValueError(
                f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}"
            )
        self._thinking = thinking_mode == "thinking"
        self._new_call_id = new_call_id or _random_call_id
        self._state = _REASONING if self._thinking else _CONTENT
        self._eos_tail = ""  # may be the start of EOS
        self._buf = ""  # EOS-free text the state machine has not consumed yet
        self._closed = False
        self._events: list[StreamEvent] = []
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[tuple[str, str, list[str]]] = []  # (id, name, argument pieces)
        self._params: set[str] = set()
        self._param_is_str = False
        self._value: list[str] = []  # a non-string parameter value being collected

    # ---- public -------------------------------------------------------------------------------

    def feed(self, text: str) -> list[StreamEvent]:
        """Consume the next piece of completion text; return the events it settles."""
        if self._closed or not text:
            return self._drain()
        text = self._eos_tail + text
        cut = text.find(EOS_TOKEN)
        if cut >= 0:
            self._eos_tail = ""
            self._run(text[:cut], final=True)
            self._closed = True
        else:
            keep = _partial_marker_start(text, (EOS_TOKEN,))
            self._eos_tail = text[keep:]
            self._run(text[:keep], final=False)
        return self._drain()

    def finish(self) -> list[StreamEvent]:
        """End of generation without (or after) EOS: release everything held back."""
        if not self._closed:
            tail, self._eos_tail = self._eos_tail, ""
            if self._state not in (_REASONING, _CONTENT, _PARAM_VALUE):
                tail = ""  # between DSML tags it can only be a cut-off EOS, not text
            self._run(tail, final=True)
            self._closed = True
        return self._drain()

    def result(self) -> dict[str, Any]:
        """Everything parsed so far, in the `parse_completion` shape."""
        return {
            "content": "".join(self._content),
            "reasoning_content": "".join(self._reasoning) if self._thinking else None,
            "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": "".join(a)}}
                for cid, name, a in self._calls
            ],
        }

    # ---- machinery ----------------------------------------------------------------------------

    def _drain(self) -> list[StreamEvent]:
        events, self._events = self._events, []
        return events

    def _run(self, text: str, final: bool) -> None:
        self._buf += text
        steps = {
            _REASONING: self._step_text,
            _CONTENT: self._step_text,
            _BLOCK_OPEN: self._step_block_open,
            _BETWEEN_CALLS: self._step_between_calls,
            _CALL_HEAD: self._step_call_head,
            _CALL_BODY: self._step_call_body,
            _PARAM_HEAD: self._step_param_head,
            _PARAM_VALUE: self._step_param_value,
            _AFTER_BLOCK: self._step_after_block,
        }
        while steps[self._state](final):
            pass
        if final:
            # Whatever is left is an unfinished tag of a truncated block: nothing to report.
            self._buf = ""

    def _text(self, kind: Literal["reasoning", "content"], text: str) -> None:
        if text:
            (self._reasoning if kind == "reasoning" else self._content).append(text)
            self._events.append(StreamEvent(kind, text))

    def _args(self, text: str) -> None:
        if text:
            self._calls[-1][2].append(text)
            self._events.append(StreamEvent("tool_call_args", text, index=len(self._calls) - 1))

    def _error(self, expected: str) -> ValueError:
        return ValueError(f"malformed tool-call block: expected {expected}, got {self._buf[:80]!r}")

    def _expect_tag(self, tags: Sequence[str]) -> str | None:
        """Skip whitespace, then match one of `tags`; None while the buffer is a tag's prefix."""
        self._buf = self._buf.lstrip(_WS)
        if not self._buf:
            return None
        for tag in tags:
            if self._buf.startswith(tag):
                self._buf = self._buf[len(tag) :]
                return tag
        if any(tag.startswith(self._buf) for tag in tags):
            return None
        raise self._error(" or ".join(repr(t) for t in tags))

    def _tag_head(self, end_re: re.Pattern[str], expected: str) -> tuple[str, re.Match[str]] | None:
        """Consume `name="NAME" ...>` of an invoke/parameter tag: (NAME, match of the head's end),
        or None while the head is incomplete."""
        # A head never contains a DSML tag, so one showing up first means it is malformed; cutting
        # the search there also keeps the outcome independent of how the text was chunked.
        found = (self._buf.find("<" + DSML_TOKEN), self._buf.find("</" + DSML_TOKEN))
        tag_at = min((p for p in found if p >= 0), default=len(self._buf))
        region = self._buf[:tag_at]
        end = end_re.search(region)
        if end is None:
            if tag_at < len(self._buf):
                raise self._error(expected)
            return None
        name = _NAME_ATTR_RE.fullmatch(region[: end.start()])
        if name is None:
            raise self._error(expected)
        self._buf = self._buf[end.end() :]
        return name.group(1), end

    # Each step consumes what it can and returns True when the state changed (run again).

    def _step_text(self, final: bool) -> bool:
        reasoning = self._state == _REASONING
        # Reasoning also stops at a tool-call block: the official parser stops there too (and then
        # rejects the text); here the block is parsed and the content is empty.
        markers = (THINK_END_TOKEN, TOOL_CALLS_START) if reasoning else (TOOL_CALLS_START,)
        kind: Literal["reasoning", "content"] = "reasoning" if reasoning else "content"
        hit = _earliest(self._buf, markers)
        if hit is not None:
            pos, marker = hit
            self._text(kind, self._buf[:pos])
            self._buf = self._buf[pos + len(marker) :]
            self._state = _CONTENT if marker == THINK_END_TOKEN else _BLOCK_OPEN
            return True
        keep = len(self._buf) if final else _partial_marker_start(self._buf, markers)
        self._text(kind, self._buf[:keep])
        self._buf = self._buf[keep:]
        return False

    def _step_block_open(self, final: bool) -> bool:
        if not self._buf:
            return False
        if not self._buf.startswith(">"):
            raise self._error(f"'>' closing {_TOOL_CALLS_OPEN!r}")
        self._buf = self._buf[1:]
        self._state = _BETWEEN_CALLS
        return True

    def _step_between_calls(self, final: bool) -> bool:
        tag = self._expect_tag((_INVOKE_OPEN, _TOOL_CALLS_CLOSE))
        if tag is None:
            return False
        self._state = _CALL_HEAD if tag == _INVOKE_OPEN else _AFTER_BLOCK
        return True

    def _step_call_head(self, final: bool) -> bool:
        head = self._tag_head(_INVOKE_HEAD_END_RE, 'name="..."> after ' + repr(_INVOKE_OPEN))
        if head is None:
            return False
        name = head[0]
        call_id = self._new_call_id()
        self._calls.append((call_id, name, []))
        self._params = set()
        self._events.append(
            StreamEvent("tool_call_start", index=len(self._calls) - 1, id=call_id, name=name)
        )
        self._args("{")
        self._state = _CALL_BODY
        return True

    def _step_call_body(self, final: bool) -> bool:
        tag = self._expect_tag((_PARAM_OPEN, _INVOKE_CLOSE))
        if tag is None:
            return False
        if tag == _INVOKE_CLOSE:
            self._args("}")
            self._state = _BETWEEN_CALLS
        else:
            self._state = _PARAM_HEAD
        return True

    def _step_param_head(self, final: bool) -> bool:
        head = self._tag_head(_PARAM_HEAD_END_RE, 'name="..." string="true|false"> in a parameter')
        if head is None:
            return False
        key, is_str = head[0], head[1].group(1) == "true"
        if key in self._params:
            raise ValueError(f"malformed tool-call block: duplicate parameter {key!r}")
        sep = ", " if self._params else ""
        self._params.add(key)
        self._param_is_str = is_str
        self._value = []
        self._args(f"{sep}{_to_json(key)}: " + ('"' if is_str else ""))
        self._state = _PARAM_VALUE
        return True

    def _step_param_value(self, final: bool) -> bool:
        end = self._buf.find(_PARAM_CLOSE)
        done = end >= 0
        if not done:
            end = len(self._buf) if final else _partial_marker_start(self._buf, (_PARAM_CLOSE,))
        piece, self._buf = self._buf[:end], self._buf[end + (len(_PARAM_CLOSE) if done else 0) :]
        if self._param_is_str:
            # JSON escaping is per character, so escaping pieces equals escaping the whole.
            self._args(_to_json(piece)[1:-1])
        else:
            self._value.append(piece)
        if done:
            if self._param_is_str:
                self._args('"')
            else:
                self._args(_json_value_text("".join(self._value)))
            self._state = _CALL_BODY
            return True
        if final and not self._param_is_str:
            self._args("".join(self._value))  # truncated: pass on what there is
        return False

    def _step_after_block(self, final: bool) -> bool:
        self._buf = self._buf.lstrip(_WS)
        if self._buf:
            raise ValueError(
                f"malformed completion: text after the tool-call block: {self._buf[:80]!r}"
            )
        return False


def _json_value_text(raw: str) -> str:
    """A string="false" value as it goes into the arguments JSON: verbatim when it is JSON."""
    try:
        json.loads(raw)
    except json.JSONDecodeError:
        return _to_json(raw)
    return raw


def parse_completion(
    text: str, thinking_mode: str = "chat", new_call_id: Callable[[], str] | None = None
) -> dict[str, Any]:
    """Split a completion into `{"content", "reasoning_content", "tool_calls"}`.

    reasoning_content is None in chat mode. tool_calls are OpenAI-format dicts
    `{"id": "call_...", "type": "function", "function": {"name", "arguments": <JSON string>}}`.
    thinking_mode must match the prompt: "thinking" when it ended with `<think>`; a reply to an
    `action` task (prompt ending `<｜action｜>`) has no reasoning, so parse it in "chat" mode.
    Same tolerance and errors as `CompletionStream`, which this runs once over the whole text.
    """
    stream = CompletionStream(thinking_mode, new_call_id)
    stream.feed(text)
    stream.finish()
    return stream.result()
