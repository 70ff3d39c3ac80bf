"""V4 chat format: official goldens, every encoding rule, completion parsing, streaming parser."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from homeseek.chat import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    TASK_TOKENS,
    THINK_END_TOKEN,
    THINK_START_TOKEN,
    USER_TOKEN,
    CompletionStream,
    encode_messages,
    parse_completion,
)

DATA = Path(__file__).parent / "data" / "dsv4-encoding"
A, U, EOS, BOS = ASSISTANT_TOKEN, USER_TOKEN, EOS_TOKEN, BOS_TOKEN
THINK, END_THINK = THINK_START_TOKEN, THINK_END_TOKEN

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def _golden(case: int) -> tuple[list[dict], str, str]:
    raw = json.loads((DATA / f"test_input_{case}.json").read_text(encoding="utf-8"))
    if isinstance(raw, dict):  # case 1 keeps the tools next to the messages
        messages = raw["messages"]
        messages[0]["tools"] = raw["tools"]
    else:
        messages = raw
    mode = "chat" if case == 4 else "thinking"
    return messages, mode, (DATA / f"test_output_{case}.txt").read_text(encoding="utf-8")


def _call(name: str, args: dict | str, call_id: str | None = None) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(args, dict):
        call["function"]["arguments"] = json.dumps(args, ensure_ascii=False)
    if call_id is not None:
        call["id"] = call_id
    return call


def _completion(prompt: str, thinking: bool) -> str:
    """The last assistant turn of an encoded conversation = what the model would generate."""
    marker = A + (THINK if thinking else END_THINK)
    return prompt[prompt.rfind(marker) + len(marker) :]


# ------------------------------------------------------------------------------------------------
# Official goldens
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_official_golden(case: int) -> None:
    messages, mode, expected = _golden(case)
    before = copy.deepcopy(messages)
    assert encode_messages(messages, thinking_mode=mode) == expected
    assert messages == before, "encode_messages must not mutate its input"


def test_golden_completions_parse_back() -> None:
    prompt = _golden(1)[2]
    first = prompt[prompt.find(A + THINK) + len(A + THINK) : prompt.find(U, prompt.find(A))]
    parsed = parse_completion(first, "thinking")
    assert parsed["reasoning_content"].startswith("The user wants to know the weather")
    assert parsed["content"] == ""
    (call,) = parsed["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}

    last = parse_completion(_completion(prompt, True), "thinking")
    assert last["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in last["content"] and last["tool_calls"] == []

    prompt2 = _golden(2)[2]
    parsed2 = parse_completion(_completion(prompt2, True), "thinking")
    assert parsed2 == {
        "content": "The capital of France is Paris.",
        "reasoning_content": "The user asks about the capital of France. It is Paris.",
        "tool_calls": [],
    }
    assert "The user said hello" not in prompt2  # dropped reasoning of the earlier turn


# ------------------------------------------------------------------------------------------------
# Roles and prompt endings
# ------------------------------------------------------------------------------------------------


def test_chat_and_thinking_prompt_endings() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert encode_messages(msgs) == f"{BOS}S{U}Hi{A}{END_THINK}"
    assert encode_messages(msgs, "thinking") == f"{BOS}S{U}Hi{A}{THINK}"
    assert encode_messages(msgs, add_bos=False) == f"S{U}Hi{A}{END_THINK}"
    assert encode_messages([]) == BOS


def test_multi_turn_chat() -> None:
    msgs = [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "2", "reasoning_content": "hidden in chat mode"},
        {"role": "user", "content": "3"},
    ]
    assert encode_messages(msgs) == f"{BOS}{U}1{A}{END_THINK}2{EOS}{U}3{A}{END_THINK}"


def test_system_without_content_and_with_response_format() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}
    msgs = [{"role": "system", "response_format": fmt}, {"role": "user", "content": "q"}]
    expected_fmt = (
        "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        + json.dumps(fmt, ensure_ascii=False)
    )
    assert encode_messages(msgs) == f"{BOS}{expected_fmt}{U}q{A}{END_THINK}"


def test_tools_block_text() -> None:
    msgs = [
        {"role": "system", "content": "S", "tools": [WEATHER_TOOL], "response_format": {"a": 1}},
        {"role": "user", "content": "q"},
    ]
    prompt = encode_messages(msgs)
    head, tail = prompt.split("### Available Tool Schemas\n\n")
    assert head.startswith(f"{BOS}S\n\n## Tools\n\nYou have access to a set of tools")
    assert '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">' in head
    assert "If thinking_mode is enabled (triggered by <think>), you MUST output" in head
    schema = json.dumps(WEATHER_TOOL["function"], ensure_ascii=False)
    assert tail.startswith(
        schema + "\n\nYou MUST strictly follow the above defined tool name and parameter "
        "schemas to invoke tool calls.\n\n\n## Response Format:"
    )
    assert tail.endswith('{"a": 1}' + f"{U}q{A}{END_THINK}")


def test_tools_one_schema_per_line_bare_schema_accepted() -> None:
    bare = {"name": "ping", "parameters": {}}  # not wrapped in {"type": "function", ...}
    prompt = encode_messages(
        [{"role": "system", "tools": [WEATHER_TOOL, bare]}, {"role": "user", "content": "x"}]
    )
    lines = prompt.split("### Available Tool Schemas\n\n")[1].split("\n")
    assert json.loads(lines[0]) == WEATHER_TOOL["function"] and json.loads(lines[1]) == bare


def test_developer_and_latest_reminder() -> None:
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "latest_reminder", "content": "2026-01-01"},
        {"role": "developer", "content": "D", "tools": [WEATHER_TOOL]},
    ]
    prompt = encode_messages(msgs, "thinking")
    assert prompt.startswith(f"{BOS}S<｜latest_reminder｜>2026-01-01{U}D\n\n## Tools\n\n")
    assert prompt.endswith(f"tool calls.\n{A}{THINK}")


def test_latest_reminder_after_user_gets_the_generation_header_first() -> None:
    msgs = [{"role": "user", "content": "u"}, {"role": "latest_reminder", "content": "r"}]
    assert encode_messages(msgs) == f"{BOS}{U}u{A}{END_THINK}<｜latest_reminder｜>r"


def test_openai_content_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert encode_messages([{"role": "user", "content": parts}]) == f"{BOS}{U}a\n\nb{A}{END_THINK}"


def test_consecutive_user_messages_merge() -> None:
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert encode_messages(msgs) == f"{BOS}{U}a\n\nb{A}{END_THINK}"


def test_wo_eos_leaves_the_assistant_turn_open() -> None:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "par", "wo_eos": 1}]
    assert encode_messages(msgs) == f"{BOS}{U}q{A}{END_THINK}par"


# ------------------------------------------------------------------------------------------------
# Tool calls and tool results
# ------------------------------------------------------------------------------------------------


def test_dsml_string_and_non_string_parameters() -> None:
    args = {"city": "北京", "days": 3, "ratio": 0.5, "flag": True, "none": None, "tags": ["a", 1]}
    args["opts"] = {"unit": "°C"}
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ok", "tool_calls": [_call("get_weather", args)]},
    ]
    expected_params = "\n".join(
        [
            '<｜DSML｜parameter name="city" string="true">北京</｜DSML｜parameter>',
            '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>',
            '<｜DSML｜parameter name="ratio" string="false">0.5</｜DSML｜parameter>',
            '<｜DSML｜parameter name="flag" string="false">true</｜DSML｜parameter>',
            '<｜DSML｜parameter name="none" string="false">null</｜DSML｜parameter>',
            '<｜DSML｜parameter name="tags" string="false">["a", 1]</｜DSML｜parameter>',
            '<｜DSML｜parameter name="opts" string="false">{"unit": "°C"}</｜DSML｜parameter>',
        ]
    )
    block = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        f"{expected_params}\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    )
    assert encode_messages(msgs) == f"{BOS}{U}q{A}{END_THINK}ok{block}{EOS}"


def test_tool_call_forms_are_equivalent() -> None:
    """OpenAI form with a JSON string, a dict, the flat form, and an escaped-ASCII JSON string."""
    args = {"city": "北京", "n": 2}
    forms = [
        _call("f", args),
        {"type": "function", "function": {"name": "f", "arguments": args}},
        {"name": "f", "arguments": json.dumps(args)},
        {"id": "x", "function": {"name": "f", "arguments": json.dumps(args, ensure_ascii=True)}},
    ]
    prompts = {
        encode_messages(
            [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [tc]}]
        )
        for tc in forms
    }
    assert len(prompts) == 1


def test_tool_call_without_parameters_and_several_calls() -> None:
    calls = [_call("a", {}), _call("b", ""), _call("c", {"x": "y"})]
    prompt = encode_messages(
        [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": calls}]
    )
    assert (
        '<｜DSML｜invoke name="a">\n\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="b">\n\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="c">\n'
        '<｜DSML｜parameter name="x" string="true">y</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
    ) in prompt
    parsed = parse_completion(_completion(prompt, False))
    assert [c["function"]["arguments"] for c in parsed["tool_calls"]] == ["{}", "{}", '{"x": "y"}']


def test_empty_tool_calls_list_renders_nothing() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "tool_calls": []},
    ]
    assert encode_messages(msgs) == f"{BOS}{U}q{A}{END_THINK}a{EOS}"


def test_tool_results_merge_and_follow_call_order() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "tool_calls": [
                _call("f", {"i": 1}, "c1"),
                _call("f", {"i": 2}, "c2"),
                _call("g", {}, "c3"),
            ],
        },
        {"role": "tool", "tool_call_id": "c3", "content": "R3"},
        {"role": "tool", "tool_call_id": "c1", "content": "R1"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "R2"}]},
        {"role": "user", "content": "and?"},
    ]
    prompt = encode_messages(msgs)
    results = "\n\n".join(f"<tool_result>R{i}</tool_result>" for i in (1, 2, 3))
    assert prompt.endswith(f"{EOS}{U}{results}\n\nand?{A}{END_THINK}")
    assert prompt.count(U) == 2  # the three results and the follow-up share one user turn


def test_tool_result_ordering_quirks() -> None:
    """Unknown ids rank first (official behaviour); text blocks keep their slots."""
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [_call("f", {}, "a"), _call("f", {}, "b")]},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "zz", "content": "Z"},
        {"role": "tool", "content": "N"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
    ]
    tail = encode_messages(msgs).split(EOS)[-1]
    order = [s.split("</tool_result>")[0] for s in tail.split("<tool_result>")[1:]]
    assert order == ["Z", "N", "A", "B"]


def test_tool_result_parts_non_text_placeholder() -> None:
    content = [{"type": "text", "text": "t"}, {"type": "image_url", "image_url": {"url": "x"}}]
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [_call("f", {}, "a")]},
        {"role": "tool", "tool_call_id": "a", "content": content},
    ]
    assert "<tool_result>t\n\n[Unsupported image_url]</tool_result>" in encode_messages(msgs)


# ------------------------------------------------------------------------------------------------
# Thinking: drop_thinking, reasoning_content, reasoning effort
# ------------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
]


def test_drop_thinking_on() -> None:
    prompt = encode_messages(HISTORY, "thinking")
    assert prompt == f"{BOS}S{U}u1{A}{END_THINK}a1{EOS}{U}u2{A}{THINK}r2{END_THINK}a2{EOS}"


def test_drop_thinking_off_keeps_past_reasoning_content() -> None:
    prompt = encode_messages(HISTORY, "thinking", drop_thinking=False)
    assert prompt == (
        f"{BOS}S{U}u1{A}{THINK}r1{END_THINK}a1{EOS}{U}u2{A}{THINK}r2{END_THINK}a2{EOS}"
    )


def test_tools_disable_drop_thinking() -> None:
    with_tools = [{**HISTORY[0], "tools": [WEATHER_TOOL]}, *HISTORY[1:]]
    assert f"{A}{THINK}r1{END_THINK}a1" in encode_messages(with_tools, "thinking")


def test_chat_mode_never_shows_reasoning() -> None:
    prompt = encode_messages(HISTORY, "chat", drop_thinking=False)
    assert "r1" not in prompt and "r2" not in prompt
    assert prompt.endswith(f"{U}u2{A}{END_THINK}a2{EOS}")


def test_new_turn_after_history_in_thinking_mode() -> None:
    prompt = encode_messages([*HISTORY, {"role": "user", "content": "u3"}], "thinking")
    assert prompt.endswith(f"{U}u2{A}{END_THINK}a2{EOS}{U}u3{A}{THINK}")


def test_reasoning_content_alias() -> None:
    msgs = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a", "reasoning": "r"},
    ]
    assert encode_messages(msgs, "thinking").endswith(f"{THINK}r{END_THINK}a{EOS}")


def test_developer_before_last_user_dropped_in_thinking_mode() -> None:
    msgs = [
        {"role": "developer", "content": "D"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "u"},
    ]
    assert encode_messages(msgs, "thinking") == f"{BOS}a{EOS}{U}u{A}{THINK}"
    assert encode_messages(msgs, "chat").startswith(f"{BOS}{U}D{A}{END_THINK}a{EOS}")


def test_reasoning_effort() -> None:
    msgs = [{"role": "user", "content": "u"}]
    max_prompt = encode_messages(msgs, "thinking", reasoning_effort="max")
    assert max_prompt.startswith(
        BOS + "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very "
    )
    assert max_prompt.endswith(
        "to ensure absolutely no assumption is left unchecked.\n\n" + f"{U}u{A}{THINK}"
    )
    assert encode_messages(msgs, "thinking", reasoning_effort="high") == f"{BOS}{U}u{A}{THINK}"
    assert encode_messages(msgs, "chat", reasoning_effort="max") == f"{BOS}{U}u{A}{END_THINK}"
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages(msgs, "thinking", reasoning_effort="low")


# ------------------------------------------------------------------------------------------------
# Task tokens
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_action_task(mode: str) -> None:
    msgs = [{"role": "user", "content": "q", "task": "action"}]
    opener = THINK if mode == "thinking" else END_THINK
    assert encode_messages(msgs, mode) == f"{BOS}{U}q{A}{opener}<｜action｜>"
    # The answer to a task has no reasoning part, even in thinking mode.
    answered = encode_messages([*msgs, {"role": "assistant", "content": "Search"}], mode)
    assert answered == f"{BOS}{U}q{A}{opener}<｜action｜>Search{EOS}"


@pytest.mark.parametrize("task", ["query", "authority", "domain", "read_url"])
def test_tasks_appended_after_user_text(task: str) -> None:
    msgs = [{"role": "user", "content": "q", "task": task}]
    assert encode_messages(msgs) == f"{BOS}{U}q{TASK_TOKENS[task]}"


def test_title_task_after_assistant() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "r", "task": "title"},
        {"role": "assistant", "content": "Title"},
    ]
    assert encode_messages(msgs, "thinking") == (
        f"{BOS}{U}q{A}{THINK}r{END_THINK}a{EOS}<｜title｜>Title{EOS}"
    )


def test_task_not_followed_by_assistant_adds_nothing() -> None:
    msgs = [{"role": "user", "content": "q", "task": "query"}, {"role": "user", "content": "x"}]
    # A user message after a task turn starts a new turn (merging only joins task-less turns).
    assert encode_messages(msgs) == f"{BOS}{U}q{U}x{A}{END_THINK}"


# ------------------------------------------------------------------------------------------------
# Context (already-encoded prefix)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_context_continues_the_prompt(mode: str) -> None:
    convo = [
        *HISTORY,
        {"role": "user", "content": "u3"},
        {"role": "assistant", "content": "a3", "reasoning_content": "r3"},
    ]
    full = encode_messages(convo, mode, drop_thinking=False)
    for cut in (2, 4, 6):
        prefix = encode_messages(convo[:cut], mode, drop_thinking=False)
        rest = encode_messages(convo[cut:], mode, drop_thinking=False, context=convo[:cut])
        assert not rest.startswith(BOS)
        assert prefix + rest == full


def test_context_suppresses_effort_prefix_and_bos() -> None:
    ctx = [{"role": "system", "content": "S"}]
    out = encode_messages(
        [{"role": "user", "content": "u"}], "thinking", reasoning_effort="max", context=ctx
    )
    assert out == f"{U}u{A}{THINK}"


def test_context_orders_tool_results_of_new_messages() -> None:
    ctx = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [_call("f", {}, "a"), _call("f", {}, "b")]},
    ]
    new = [
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
    ]
    out = encode_messages(new, context=ctx)
    assert out == f"{U}<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>{A}{END_THINK}"


# ------------------------------------------------------------------------------------------------
# Malformed input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role: unknown role 'robot'"),
        (["hello"], r"messages\[0\]: expected a dict"),
        ([{"content": "x"}], r"messages\[0\]\.role: unknown role None"),
        ([{"role": "user"}], r"messages\[0\] \(user\): missing 'content'"),
        ([{"role": "user", "content": None}], r"messages\[0\] \(user\): missing 'content'"),
        ([{"role": "user", "content": 5}], r"messages\[0\] \(user\)\.content: expected a string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            r"messages\[0\] \(user\)\.content\[0\]: unsupported content part 'image_url'",
        ),
        ([{"role": "developer", "content": ""}], r"messages\[0\] \(developer\)\.content"),
        ([{"role": "latest_reminder"}], r"messages\[0\] \(latest_reminder\): missing 'content'"),
        ([{"role": "tool", "tool_call_id": "a"}], r"messages\[0\] \(tool\): missing 'content'"),
        (
            [{"role": "user", "content": "q", "task": "summarise"}],
            r"messages\[0\] \(user\)\.task: unknown task 'summarise'",
        ),
        (
            [{"role": "assistant", "tool_calls": [_call("f", "{not json")]}],
            r"messages\[0\] \(assistant\)\.tool_calls\[0\]\.function\.arguments: not valid JSON",
        ),
        (
            [{"role": "assistant", "tool_calls": [_call("f", "[1, 2]")]}],
            r"tool_calls\[0\]\.function\.arguments: must be a JSON object",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
            r"tool_calls\[0\]\.function\.name: missing",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
            r"tool_calls\[0\]\.function\.arguments: missing",
        ),
        (
            [{"role": "assistant", "tool_calls": [_call("f", {"x": 1}), "call"]}],
            r"tool_calls\[1\]: expected a dict",
        ),
        (
            [{"role": "system", "tools": [{"type": "function"}]}],
            r"messages\[0\] \(system\)\.tools\[0\]",
        ),
        (
            [{"role": "assistant", "content": "a", "reasoning_content": 3}],
            r"\.reasoning_content: expected a string",
        ),
    ],
)
def test_malformed_messages(messages: list, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        encode_messages(messages)


def test_malformed_index_points_at_the_message() -> None:
    msgs = [
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "ok"},
        {"role": "x"},
    ]
    with pytest.raises(ValueError, match=r"messages\[2\]"):
        encode_messages(msgs)
    with pytest.raises(ValueError, match=r"context\[0\]"):
        encode_messages(msgs[:2], context=[{"role": "user"}])
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages(msgs[:1], thinking_mode="deep")


# ------------------------------------------------------------------------------------------------
# parse_completion
# ------------------------------------------------------------------------------------------------


def _ids(prefix: str = "call_"):
    counter = iter(range(10**6))
    return lambda: f"{prefix}{next(counter)}"


def test_parse_chat_content() -> None:
    out = parse_completion("Hello there." + EOS)
    assert out == {"content": "Hello there.", "reasoning_content": None, "tool_calls": []}


def test_parse_thinking() -> None:
    out = parse_completion("Let me think.</think>Answer." + EOS, "thinking")
    assert out["reasoning_content"] == "Let me think." and out["content"] == "Answer."


def test_parse_missing_eos_and_truncation() -> None:
    assert parse_completion("Partial answ")["content"] == "Partial answ"
    cut = parse_completion("still reasoning", "thinking")
    assert cut == {"content": "", "reasoning_content": "still reasoning", "tool_calls": []}
    # A completion that stopped right inside a marker keeps the text.
    assert parse_completion("a\n\n<｜DSML｜tool")["content"] == "a\n\n<｜DSML｜tool"
    assert parse_completion("r</thi", "thinking")["reasoning_content"] == "r</thi"
    assert parse_completion("abc<｜end▁of")["content"] == "abc<｜end▁of"


def test_parse_ignores_text_after_eos() -> None:
    assert parse_completion("a" + EOS + "junk</think>")["content"] == "a"


def test_parse_tool_calls_round_trip() -> None:
    calls = [
        _call("get_weather", {"city": 'Paris\n"France"', "days": 2}),
        _call("search", {"q": "<b>x</b> & y", "opts": {"n": [1, 2]}, "on": False}),
    ]
    msgs = [
        {"role": "system", "tools": [WEATHER_TOOL]},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "reasoning_content": "plan",
            "content": "Checking.",
            "tool_calls": calls,
        },
    ]
    completion = _completion(encode_messages(msgs, "thinking"), True)
    out = parse_completion(completion, "thinking", new_call_id=_ids())
    assert out["reasoning_content"] == "plan" and out["content"] == "Checking."
    assert [c["id"] for c in out["tool_calls"]] == ["call_0", "call_1"]
    for got, sent in zip(out["tool_calls"], calls, strict=True):
        assert got["type"] == "function"
        assert got["function"]["name"] == sent["function"]["name"]
        assert json.loads(got["function"]["arguments"]) == json.loads(sent["function"]["arguments"])
    # The arguments string is exactly what the official parser builds.
    assert out["tool_calls"][0]["function"]["arguments"] == (
        '{"city": "Paris\\n\\"France\\"", "days": 2}'
    )


def test_parse_tool_calls_tolerates_whitespace_and_missing_eos() -> None:
    text = (
        'Sure.\n\n<｜DSML｜tool_calls>\n\n  <｜DSML｜invoke  name="f" >\n'
        '<｜DSML｜parameter name="a"  string="false" >1</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n"
    )
    out = parse_completion(text)
    assert out["content"] == "Sure."
    assert out["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'


def test_parse_non_json_non_string_value_becomes_a_string() -> None:
    text = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="a" string="false">not json</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
    )
    assert parse_completion(text)["tool_calls"][0]["function"]["arguments"] == '{"a": "not json"}'


def test_parse_truncated_tool_call() -> None:
    text = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="cmd" string="true">rm -rf /tm'
    )
    (call,) = parse_completion(text)["tool_calls"]
    # Left visibly incomplete (invalid JSON) rather than closed into a runnable command.
    assert call["function"]["arguments"] == '{"cmd": "rm -rf /tm'
    assert parse_completion(text[: text.index("name=")])["tool_calls"] == []


def test_parse_tool_block_right_after_reasoning() -> None:
    text = (
        'r\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls>" + EOS
    )
    out = parse_completion(text, "thinking")
    assert out["reasoning_content"] == "r" and out["content"] == ""
    assert out["tool_calls"][0]["function"]["arguments"] == "{}"


def test_parse_inverts_encode_randomized() -> None:
    """Whatever assistant turn the encoder writes, the parser reads back (official arg format)."""
    rng = random.Random(99)
    texts = ["", "ok", "多行\n文本", "a <b> c", "trailing\n", " </th", 'quote"q', "\\"]
    values = ["s", "", "中文", "<x>", "a\nb", 0, -1.5, True, None, [1, "x"], {"k": ["v"]}]
    for _ in range(300):
        mode = rng.choice(["chat", "thinking"])
        turn: dict = {"role": "assistant", "content": rng.choice(texts)}
        if mode == "thinking":
            turn["reasoning_content"] = rng.choice(texts)
        args_list = [
            {
                k: rng.choice(values)
                for k in rng.sample(["a", "b", "城市", "x y"], rng.randint(0, 3))
            }
            for _ in range(rng.randint(0, 3))
        ]
        if args_list:
            turn["tool_calls"] = [_call(rng.choice(["f", "g_2"]), a) for a in args_list]
        prompt = encode_messages([{"role": "user", "content": "q"}, turn], mode)
        out = parse_completion(_completion(prompt, mode == "thinking"), mode)
        assert out["content"] == turn["content"]
        assert out["reasoning_content"] == turn.get("reasoning_content")
        got = [json.loads(c["function"]["arguments"]) for c in out["tool_calls"]]
        assert got == args_list
        names = [c["function"]["name"] for c in out["tool_calls"]]
        assert names == [c["function"]["name"] for c in turn.get("tool_calls", [])]


@pytest.mark.parametrize(
    "block",
    [
        "X",  # the block tag is not closed by '>'
        ">\nhello",  # text between tags
        '>\n<｜DSML｜invoke nam="f">\n',  # bad invoke head
        '>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a">1</｜DSML｜parameter>',
        '>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">1'
        '</｜DSML｜parameter>\n<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>',
        '>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>trailing',
        '>\n<｜DSML｜invoke name="f">\n</｜DSML｜tool_calls>',  # block closed inside an invoke
    ],
)
def test_parse_malformed_tool_block_raises(block: str) -> None:
    text = "c\n\n<｜DSML｜tool_calls" + block + EOS
    with pytest.raises(ValueError, match="malformed"):
        parse_completion(text)
    # Same verdict however the text is streamed.
    stream = CompletionStream()
    with pytest.raises(ValueError, match="malformed"):
        for ch in text:
            stream.feed(ch)
        stream.finish()


# ------------------------------------------------------------------------------------------------
# Streaming parser
# ------------------------------------------------------------------------------------------------


def _stream(text: str, mode: str, cuts: list[int]) -> tuple[dict, list]:
    stream = CompletionStream(mode, new_call_id=_ids())
    events, last = [], 0
    for cut in [*cuts, len(text)]:
        events += stream.feed(text[last:cut])
        last = cut
    events += stream.finish()
    assert stream.finish() == []  # idempotent
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    calls: list[dict] = []
    for e in events:
        if e.kind == "tool_call_start":
            assert e.index == len(calls)
            calls.append(
                {"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}}
            )
        elif e.kind == "tool_call_args":
            calls[e.index]["function"]["arguments"] += e.text
    result = {
        "content": "".join(e.text for e in events if e.kind == "content"),
        "reasoning_content": reasoning if mode == "thinking" else None,
        "tool_calls": calls,
    }
    return result, events


def _stream_corpus() -> list[tuple[str, str]]:
    convo = [
        {"role": "system", "tools": [WEATHER_TOOL]},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "reasoning_content": "I should call </thi the tool\n\n<｜DSML｜x",
            "content": "Calling\n",
            "tool_calls": [
                _call("get_weather", {"city": "北京 </｜DSML｜param", "days": [1, {"a": "</"}]}),
                _call("noop", {}),
            ],
        },
    ]
    texts = [
        (_completion(encode_messages(convo, "thinking"), True), "thinking"),
        (_completion(encode_messages(convo, "chat"), False), "chat"),
        ("plain answer with a < sign and \n\n newlines\n\n" + EOS, "chat"),
        ("reason</think>answer <｜DSML｜ inline \n\n<｜DSML｜tool_callz", "thinking"),
        ("no end of reasoning", "thinking"),
        ("😀 emoji and 中文 " + EOS + "ignored", "chat"),
    ]
    full = texts[0][0]
    # Truncations at every kind of position (max_tokens).
    texts += [(full[:k], "thinking") for k in range(0, len(full), 7)]
    return texts


def test_stream_matches_parse_completion_under_random_chunking() -> None:
    rng = random.Random(1234)
    for text, mode in _stream_corpus():
        expected = parse_completion(text, mode, new_call_id=_ids())
        for _ in range(25):
            n = rng.randint(0, min(len(text), 40))
            cuts = sorted(rng.sample(range(len(text) + 1), n))
            got, _ = _stream(text, mode, cuts)
            assert got == expected, (text, cuts)
        # One character at a time, too.
        assert _stream(text, mode, list(range(len(text))))[0] == expected


def test_stream_holds_back_possible_markers() -> None:
    s = CompletionStream("thinking")
    assert [e.text for e in s.feed("abc</th")] == ["abc"]
    assert s.feed("ink>") == []
    assert [e.text for e in s.feed("x\n")] == ["x"]
    assert [e.text for e in s.feed("\n")] == []
    assert [e.text for e in s.feed("<｜DSML｜tool_ca")] == []
    assert [(e.kind, e.text) for e in s.feed("lls>\n")] == []
    assert s.feed('<｜DSML｜invoke name="f"') == []
    ev = s.feed(">\n")
    assert [(e.kind, e.name) for e in ev][0] == ("tool_call_start", "f")
    assert [e.text for e in ev if e.kind == "tool_call_args"] == ["{"]
    ev = s.feed('<｜DSML｜parameter name="k" string="true">ab</｜DSML｜par')
    assert "".join(e.text for e in ev) == '"k": "ab'
    assert "".join(e.text for e in s.feed("ameter>\n</｜DSML｜invoke>")) == '"}'
    assert s.feed("\n</｜DSML｜tool_calls><｜end") == []
    assert s.feed("▁of▁sentence｜>") == []
    assert s.feed("more") == []  # after EOS
    assert s.result()["tool_calls"][0]["function"]["arguments"] == '{"k": "ab"}'


def test_stream_emits_content_promptly() -> None:
    s = CompletionStream()
    assert [e.text for e in s.feed("Hello")] == ["Hello"]
    assert [e.text for e in s.feed(" world<")] == [" world"]  # '<' may start EOS
    assert [e.text for e in s.feed("b>")] == ["<b>"]
    assert [e.text for e in s.finish()] == []


def test_stream_rejects_bad_mode() -> None:
    with pytest.raises(ValueError, match="thinking_mode"):
        CompletionStream("fast")
