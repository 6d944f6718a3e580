"""The text convention for tool calls (actors/generation/tool_calls.py), checked against hand-written replies."""

import json

from rayrlhf.actors.generation.tool_calls import describe_tools, format_tool_call, parse_tool_calls, with_tools

CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluates arithmetic.",
                                         "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}


def test_one_call_and_its_text():
    reply = 'Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "3 * 4"}}</tool_call>'
    parsed = parse_tool_calls(reply, id_prefix="chatcmpl-1")
    assert parsed.content == "Let me compute."
    assert parsed.invalid == []
    assert [c.openai() for c in parsed.calls] == [{
        "id": "chatcmpl-1_0", "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression":"3 * 4"}'},
    }]
    assert parsed.calls[0].parsed_arguments() == {"expression": "3 * 4"}


def test_arguments_as_json_text_and_missing_arguments():
    reply = ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
             '<tool_call>{"name": "b"}</tool_call>')
    parsed = parse_tool_calls(reply)
    assert [(c.id, c.name, c.arguments) for c in parsed.calls] == [("call_0", "a", '{"x":1}'), ("call_1", "b", "{}")]
    assert parsed.content == ""


def test_malformed_blocks_are_reported_not_raised():
    reply = ("x <tool_call>{not json}</tool_call> y <tool_call>[1, 2]</tool_call>"
             '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "f", "arguments": 3}</tool_call>'
             '<tool_call>{"name": "g", "arguments": "nope"}</tool_call>')
    parsed = parse_tool_calls(reply)
    assert parsed.calls == []
    assert parsed.content == "x  y"
    assert parsed.invalid[0].startswith("not JSON")
    assert parsed.invalid[1:] == ["not a JSON object", 'no "name" string', '"arguments" of f is not an object',
                                  '"arguments" of g is a string that is not JSON']


def test_unclosed_block_runs_to_the_end():
    cut = parse_tool_calls('Sure. <tool_call>{"name": "calculator", "argum')
    assert cut.calls == [] and len(cut.invalid) == 1 and cut.content == "Sure."
    whole = parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {}}')
    assert [c.name for c in whole.calls] == ["calculator"] and whole.invalid == []


def test_no_blocks_is_plain_text():
    parsed = parse_tool_calls("  The answer is 12.  ")
    assert (parsed.content, parsed.calls, parsed.invalid) == ("The answer is 12.", [], [])


def test_the_format_round_trips():
    block = format_tool_call("calculator", {"expression": "1+1"})
    assert parse_tool_calls(block).calls[0].parsed_arguments() == {"expression": "1+1"}


def test_tools_go_into_the_system_message():
    text = describe_tools([CALC])
    spec = json.loads(text.splitlines()[1])
    assert spec["name"] == "calculator" and spec["parameters"]["properties"] == {"expression": {"type": "string"}}
    assert "<tool_call>" in text.splitlines()[-1]
    user = [{"role": "user", "content": "2+2?"}]
    added = with_tools(user, [CALC])
    assert added[0] == {"role": "system", "content": text} and added[1:] == user
    kept = with_tools([{"role": "system", "content": "Be brief."}, *user], [CALC])
    assert kept[0]["content"] == "Be brief.\n\n" + text and kept[1:] == user
    assert with_tools(user, []) is user
