"""The built-in `calculator` environment: arithmetic word problems with a calculator tool.

The model may call `calculator` ({"expression": "3 * (4 + 5)"}) with the text convention of
actors/generation/tool_calls.py; each call's result (or error) comes back as a `tool` message.
A reply without a tool call is the final answer: reward 1 if its final number equals the
reference's (math_exact_match), else 0, and the episode ends. One worked exchange (EXAMPLE) comes
before the question: from the tool description alone SmolLM2-135M never writes a call. The expression is parsed, never
eval'd: numbers, + - * / // % **, unary signs and parentheses, in exact fractions, with bounded
exponents and length, so no input can run code or exhaust memory.
"""

from __future__ import annotations

import ast
import json
import operator
from fractions import Fraction
from typing import Any

from rayrlhf.actors.generation.tool_calls import format_tool_call, with_tools
from rayrlhf.actors.rewards.math_answers import math_exact_match

TOOLS = [{"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluates an arithmetic expression with numbers, + - * / ( ) and returns the number.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}}]  # fmt: skip
INSTRUCTION = " Use the calculator tool for the arithmetic. Then answer with the final number."
EXAMPLE = [
    {"role": "user", "content": "Ana has 3 bags with 4 apples in each. How many apples does Ana have?"},
    {"role": "assistant", "content": format_tool_call("calculator", {"expression": "3 * 4"})},
    {"role": "tool", "content": "12"},
    {"role": "assistant", "content": "Ana has 12 apples. The answer is 12."},
]
"""A demonstration before the question (one-shot): SmolLM2-135M sampled no call in 80 replies to the tool
description alone, and well-formed ones after it (figures: benchmarks/README.md, the calculator section)."""
MAX_CHARS, MAX_EXPONENT, MAX_DIGITS = 200, 64, 100
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
_UNARY: dict[type, Any] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """An expression the calculator refuses; its text is what the model reads back."""


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and (right.denominator != 1 or abs(right) > MAX_EXPONENT):
            raise CalculatorError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        if len(str(result.numerator)) > MAX_DIGITS:
            raise CalculatorError("the result is too large")
        return Fraction(result)
    raise CalculatorError(f"only numbers, + - * / // % ** and parentheses are allowed (found {type(node).__name__})")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text (a whole number, or a decimal to 6 places)."""
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError("not an arithmetic expression") from None
    value = _value(tree.body)
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.6g}"


class Calculator:
    """One episode of a word problem (a row with a `reference` ending in its number, as the math task's).

    `call_reward`: paid once per episode, on the first call that returns a number. It makes the tool
    worth trying before it has been seen to pay (seed 2 of the 3-seed figures never called it again
    after its first calls failed); below 1, so only a right answer makes an episode a success.
    """

    tools = TOOLS

    def __init__(self, call_reward: float = 0.0) -> None:
        if not 0.0 <= call_reward < 1.0:
            raise ValueError(f"call_reward must be in [0, 1) (a right answer pays 1), got {call_reward}")
        self.call_reward, self.paid = call_reward, False

    def reset(self, row: dict[str, Any], seed: int) -> list[dict[str, Any]]:
        self.reference = row["reference"]
        return with_tools([*EXAMPLE, {"role": "user", "content": str(row["prompt"]) + INSTRUCTION}], TOOLS)

    def step(self, assistant: dict[str, Any]) -> tuple[list[dict[str, Any]], float, bool]:
        calls, invalid = assistant.get("tool_calls") or [], assistant.get("invalid_tool_calls") or []
        if not calls and not invalid:
            right = math_exact_match([None], [assistant["content"]], [self.reference])[0]
            return [], float(right or 0.0), True
        answers = [f"invalid tool call: {why}" for why in invalid] + [self._run(c["function"]) for c in calls]
        worked = any(not a.startswith(("error", "invalid")) for a in answers)
        reward = self.call_reward if worked and not self.paid else 0.0
        self.paid = self.paid or worked
        return [{"role": "tool", "content": a} for a in answers], reward, False

    @staticmethod
    def _run(function: dict[str, Any]) -> str:
        if function["name"] != "calculator":
            return f"error: no tool named {function['name']!r} (the tool is calculator)"
        expression = json.loads(function["arguments"]).get("expression")
        if not isinstance(expression, str):
            return 'error: calculator needs {"expression": "..."}'
        try:
            return calculate(expression)
        except CalculatorError as e:
            return f"error: {e}"
