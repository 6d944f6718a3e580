"""The gateway's additions to a response: tool calls, per-token log-probs, token ids.

Pure functions over the text and tokens a choice produced. Tool calls are read from the reply's
text in the `<tool_call>{json}</tool_call>` convention (actors/generation/tool_calls.py; Hermes-style
templates, e.g. Qwen's, use the same blocks natively). A stream must never show half a call, so
its text is held back from a block's opening on (`shown_end`) until the choice finishes and the
reply is parsed whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rayrlhf.actors.generation.tool_calls import OPEN, parse_tool_calls


def shown_end(text: str) -> int:
    """How much of a growing reply a stream may show: all of it up to a `<tool_call>` opening, or up
    to a trailing piece that may still become one ("...<tool")."""
    opened = text.find(OPEN)
    if opened >= 0:
        return opened
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return len(text) - size
    return len(text)


def tool_reply(text: str, id_prefix: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished reply: its calls in OpenAI's shape when it makes some and
    every block is well formed (content: the text outside them, None if blank); otherwise the text as
    written and no calls (a malformed call is returned as plain content)."""
    parsed = parse_tool_calls(text, id_prefix)
    if not parsed.calls or parsed.invalid:
        return text, []
    return parsed.content or None, [call.openai() for call in parsed.calls]


def chat_logprobs(ids: list[int], logprobs: list[float], token_text: Callable[[int], str]) -> dict[str, Any]:
    """The chat API's `logprobs`: one entry per sampled token, no alternatives (top_logprobs 0)."""
    content = []
    for token, logprob in zip(ids, logprobs):
        text = token_text(token)
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []})
    return {"content": content, "refusal": None}


def completion_logprobs(
    ids: list[int], logprobs: list[float], token_text: Callable[[int], str], offset: int = 0
) -> dict[str, Any]:
    """The completions API's `logprobs` (legacy shape); `offset`: characters of the choice already sent."""
    tokens = [token_text(token) for token in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}
