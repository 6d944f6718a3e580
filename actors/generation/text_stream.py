"""Serve's text of a row, streamed safely while the row grows (the decode loop's only text work).

A delta never contains part of a stop string that may still complete, nor half of a multi-byte
character; a stop string ends the row and is never streamed. Only requests that stream text pay
for this (GenerationRequest.text): the rollout's batches skip it.
"""

from __future__ import annotations


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index where the earliest stop string begins in text[start:], or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def safe_end(text: str, emitted: int, stops: tuple[str, ...], finished: bool) -> tuple[int, bool]:
    """How far `text` (the row's whole text so far, `emitted` characters of it already sent) may be
    streamed, and whether a stop string ends it there. A finished row sends all it has."""
    longest = max((len(s) for s in stops), default=0)
    cut = find_stop(text, stops, max(0, emitted - longest)) if stops else None
    if cut is not None:
        return max(cut, emitted), True
    end = len(text)
    if not finished:
        end -= held_back(text, stops)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            end = min(end, len(text) - 1)
    return end, False
