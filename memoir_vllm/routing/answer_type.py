"""The kind of answer an English question asks for, from its wh-words: part of the subject rule's second stage.

Questions about one subject that the sentence encoder finds alike often differ in what they ask for: "Who
painted X?" and "When was X painted?", "In which city is X?" and "Who founded X?". A request is kept as an
edit's candidate only if the two do not ask for different kinds of answer:

    answer_type("When was the Starry Night painted?")   # "time"
    answer_type("Which artist painted it?")             # None: no rule says (the encoder decides alone)
    same_answer_type("Who painted X?", "When was X painted?")   # False
    one_kind_named("In which museum is X displayed?", "Who painted X?")   # True: such a pair needs untyped_tau
    needed_cosine("In which museum is X displayed?", "Who painted X?", 0.6, 0.65)   # 0.65

The first rule that matches a whole phrase, in this order, gives the kind: time (when, what/which/in what year,
date, century), person (who, whom, whose), place (where, what/which city, country, town, place), number (how many,
how much, how tall/long/far/big/old/high/large). A question none of them names, or not in English, has kind None
and agrees with every kind. Measured in README (Routing): on `memoir make-edits` questions and 40 hand-written
real-world ones.
"""
from __future__ import annotations

import re
from functools import lru_cache

_PHRASES = (  # (kind, alternatives), first match wins
    ("time", r"when|(?:what|which) (?:year|date|decade|century|day|month)|what time"),
    ("person", r"who|whom|whose"),
    ("place", r"where|(?:what|which) (?:city|country|town|place|continent|state|region)"),
    ("number", r"how (?:many|much|tall|long|far|big|old|high|large)"),
)
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(rf"\b(?:{alts})\b", re.IGNORECASE)) for kind, alts in _PHRASES)


@lru_cache(maxsize=65536)
def answer_type(question: str) -> str | None:
    """The kind of answer `question` asks for ("time", "person", "place", "number"), or None."""
    for kind, pattern in KINDS:
        if pattern.search(question):
            return kind
    return None


def same_answer_type(a: str, b: str) -> bool:
    """False only when both questions name a kind of answer and the kinds differ."""
    ka, kb = answer_type(a), answer_type(b)
    return ka is None or kb is None or ka == kb


def one_kind_named(a: str, b: str) -> bool:
    """True when exactly one of the two questions names a kind of answer: weaker agreement, which the subject
    rule answers with a higher cosine (untyped_tau). one_kind_named("In which museum is X?", "Who painted X?")"""
    return (answer_type(a) is None) != (answer_type(b) is None)


def needed_cosine(a: str, b: str, min_cos: float, untyped_tau: float) -> float:
    """The encoder cosine two questions need to ask the same thing: min_cos, or the stricter of it and untyped_tau
    when only one of them names a kind of answer (0: min_cos alone)."""
    return max(min_cos, untyped_tau) if one_kind_named(a, b) else min_cos
