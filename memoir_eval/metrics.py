"""Pure metric functions of the evaluation protocol (memoir-method.md section 5).

Token lists in, floats out; no model here.
"""
from __future__ import annotations

import math
import re
import string
from typing import Sequence


def token_accuracy(pred: Sequence[int], target: Sequence[int]) -> float:
    """Teacher-forced token accuracy: fraction of target positions whose argmax equals the target token."""
    if len(pred) != len(target) or not target:
        raise ValueError(f"token_accuracy needs equal, non-empty lengths (got {len(pred)} and {len(target)})")
    return sum(int(p == t) for p, t in zip(pred, target)) / len(target)


def locality(post: Sequence[int], pre: Sequence[int]) -> float:
    """Locality: fraction of answer positions whose post-edit argmax equals the PRE-edit argmax (not the gold)."""
    return token_accuracy(post, pre)


def perplexity(nll: Sequence[float]) -> float:
    """Perplexity of one target from its per-token negative log-likelihoods (nats): exp(mean NLL)."""
    if not nll:
        raise ValueError("perplexity of an empty target")
    return math.exp(sum(nll) / len(nll))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(generated: str, target: str) -> float:
    """Normalised exact match of a greedy continuation against the target.

    The continuation is generated for the target's token count (+2), so it is cut to the target's
    normalised word count before comparing: 1.0 when the first words equal the target's words.
    """
    gold = normalize_answer(target).split()
    if not gold:
        raise ValueError("exact_match needs a non-empty target")
    first_line = generated.strip().split("\n")[0]
    return float(normalize_answer(first_line).split()[: len(gold)] == gold)


def answer_match(generated: str, target: str) -> float:
    """1.0 when the whole greedy answer (its first line, normalised; a final period is punctuation) is the
    target: the answer stopped after it instead of going on."""
    return float(normalize_answer(generated.strip().split("\n")[0]) == normalize_answer(target))


def repeats(generated: str, n: int = 3) -> float:
    """1.0 when the answer repeats a word n-gram ("gold gold gold gold" repeats "gold gold gold")."""
    words = re.findall(r"\w+", generated.lower())
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    return float(len(grams) != len(set(grams)))


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)
