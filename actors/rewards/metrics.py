"""Text reward functions: word-frequency fluency, BLEU and ROUGE-L. Pure Python, no model.

All three work on the same tokens, `words(text)` (wordfreq's English tokenizer, lower-cased,
punctuation dropped), so the components agree on what a word is.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import wordfreq

FREQ_FLOOR = 1e-8
"""Frequency given to words wordfreq does not know: each word scores log10 in [-8, 0]."""


def words(text: str) -> list[str]:
    return wordfreq.tokenize(text, "en")


def freq_reward(text: str, mode: Literal["mean", "sum"]) -> float:
    """log10 word frequency of the text's words, summed (the seed's Σ log p(y_i)) or averaged.

    "sum" rewards short answers: the empty answer scores 0, the maximum. "mean" scores fluency per
    word. Text with no words returns 0.0 in both modes; the scorer guards that case.
    """
    logs = [math.log10(wordfreq.word_frequency(w, "en", minimum=FREQ_FLOOR)) for w in words(text)]
    if not logs:
        return 0.0
    if mode == "sum":
        return sum(logs)
    if mode == "mean":
        return sum(logs) / len(logs)
    raise ValueError(f"freq_mode must be 'mean' or 'sum', got {mode!r}")


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypothesis: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU with add-one smoothing of the n>1 precisions (Lin & Och 2004).

    Unigram precision is not smoothed, so a response sharing no word with the reference scores 0.
    """
    hyp, ref = words(hypothesis), words(reference)
    if not hyp or not ref:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        matches = sum(min(c, r[g]) for g, c in h.items())
        total = max(len(hyp) - n + 1, 0)
        if n == 1:
            if matches == 0:
                return 0.0
            log_p += math.log(matches / total)
        else:
            log_p += math.log((matches + 1) / (total + 1))
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_p / max_n)


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1: harmonic mean of LCS/len(hypothesis) and LCS/len(reference)."""
    hyp, ref = words(hypothesis), words(reference)
    if not hyp or not ref:
        return 0.0
    lcs = _lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
