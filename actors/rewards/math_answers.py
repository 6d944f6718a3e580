"""The built-in `math_exact_match` reward: the answer's final number against the reference's.

GSM8K writes the solution's result after `####` ("... so she has 72 apples.\\n#### 72"); a reference
without that marker is read by its last number. An answer is read the same way (its `####` number,
else its last number). Numbers may carry thousands separators, a sign, a decimal part or a `$`.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_MARKER = "####"


def final_number(text: str | None) -> Fraction | None:
    """The number a text ends on (after `####` if present), exactly; None if it has none."""
    if not text:
        return None
    if _MARKER in text:
        found = _NUMBER.search(text.rsplit(_MARKER, 1)[1])  # the number right after the marker
        return _parse(found.group(0)) if found else None
    matches = _NUMBER.findall(text)
    return _parse(matches[-1]) if matches else None


def _parse(token: str) -> Fraction | None:
    token = token.replace(",", "").rstrip(".")
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def math_exact_match(
    prompts: list[Any], completions: list[str], references: list[str | None], **_: Any
) -> list[float | None]:
    """1.0 when the answer's final number equals the reference's, else 0.0; None (not applicable)
    for rows whose reference has no number."""
    out: list[float | None] = []
    for completion, reference in zip(completions, references):
        want = final_number(reference)
        if want is None:
            out.append(None)
        else:
            out.append(1.0 if final_number(completion) == want else 0.0)
    return out
