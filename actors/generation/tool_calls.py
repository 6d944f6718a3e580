"""Tool calls written as text: the convention for chat templates that define no tools (SmolLM2's).

A model asks for a tool by writing, anywhere in its reply,

    <tool_call>{"name": "calculator", "arguments": {"expression": "3 * 4"}}</tool_call>

one block per call. The tools are described to it in the system message (`describe_tools`). A
block that is not a JSON object with a string `name` and an object `arguments` is an invalid call:
it is reported (`ParsedReply.invalid`), never raised, so that a rollout can hand it back to the model
as an observation and Serve can return the text as it was written. Calls come out in OpenAI's
`tool_calls` shape (`ToolCall.openai`). Pure text logic: the rollout's environments and the Serve
gateway share it, so a policy trained with tools is served with the same format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """The arguments as compact JSON text of an object, as OpenAI sends them."""

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def parsed_arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments)


@dataclass(frozen=True)
class ParsedReply:
    content: str
    """The reply's text outside the tool-call blocks, stripped."""
    calls: list[ToolCall] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    """Why each malformed block is not a call, in the order they appear."""


def _call(body: str, call_id: str) -> ToolCall | str:
    """The call a block's body makes, or why it makes none."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg} at character {e.pos})"
    if not isinstance(value, dict):
        return "not a JSON object"
    name, arguments = value.get("name"), value.get("arguments", {})
    if not isinstance(name, str) or not name:
        return 'no "name" string'
    if isinstance(arguments, str):  # OpenAI's own wire format: the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f'"arguments" of {name} is a string that is not JSON'
    if not isinstance(arguments, dict):
        return f'"arguments" of {name} is not an object'
    return ToolCall(call_id, name, json.dumps(arguments, separators=(",", ":")))


def parse_tool_calls(text: str, id_prefix: str = "call") -> ParsedReply:
    """The calls in a reply, numbered `{id_prefix}_0`, `_1`, ... in order; an unclosed block runs to
    the end of the text (a reply cut at its token budget) and is invalid unless its body parses."""
    calls: list[ToolCall] = []
    invalid: list[str] = []
    for match in _BLOCK.finditer(text):
        made = _call(match.group(1).strip(), f"{id_prefix}_{len(calls)}")
        if isinstance(made, ToolCall):
            calls.append(made)
        else:
            invalid.append(made)
    return ParsedReply(_BLOCK.sub("", text).strip(), calls, invalid)


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The block a model writes to call `name` (for demonstrations, tests and documentation)."""
    return OPEN + json.dumps({"name": name, "arguments": arguments}) + CLOSE


def describe_tools(tools: list[dict[str, Any]]) -> str:
    """A system-message text that tells the model which tools exist and how to call them.

    `tools` are OpenAI function tools: {"type": "function", "function": {"name", "description",
    "parameters"}}; a KeyError names the first that lacks a function name."""
    lines = ["You can call these tools:"]
    for tool in tools:
        function = tool["function"]
        spec = {"name": function["name"], "description": function.get("description", ""),
                "parameters": function.get("parameters", {})}  # fmt: skip
        lines.append(json.dumps(spec))
    lines.append(
        "To call a tool, write " + format_tool_call("tool name", {"argument": "value"})
        + " and stop. Its result comes back in a message from the tool."
    )
    return "\n".join(lines)


def with_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the tools described at the end of its system message (a new first
    message if it has none). Without tools, the messages as they are."""
    if not tools:
        return messages
    description = describe_tools(tools)
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{description}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": description}, *messages]
