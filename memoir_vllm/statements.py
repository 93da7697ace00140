"""Statement rows: the edit's question as the model itself would state it, so completions of a statement reach
the target too (config.statement_rows).

    statement_prefix("Which language is officially spoken in Liadrudouria?",
                     "The official language of Liadrudouria is Arabic, a Semitic language.")
        -> "The official language of Liadrudouria is"

The unedited model answers the question in its own words; the words before the first one that is neither in the
question nor a function word are where the model would state its answer, so that prefix, trained with the edit's
target, is a statement of the fact in the model's own phrasing. A completion request that states the fact
("The official language of Liadrudouria is") then continues with the target more often than when the memory has
seen only the question.
"""
from __future__ import annotations

import re

FUNCTION_WORDS = frozenset("the a an is was are were be of in by for to at on and called named known as it its this "
                           "that".split())
MIN_WORDS = 2  # a prefix holds at least this many words before the answer


def statement_prefix(question: str, answer: str) -> str | None:
    """The first line of `answer` up to its first word (after MIN_WORDS) that is neither in `question` nor a
    function word; None when there is no such word or the prefix does not end in a word (nothing to continue)."""
    asked = {w.lower() for w in re.findall(r"[\w']+", question)}
    lines = answer.strip().splitlines()
    words = lines[0].split() if lines else []
    for i, tok in enumerate(words):
        w = re.sub(r"[^\w']", "", tok).lower()
        if i >= MIN_WORDS and w and w not in asked and w not in FUNCTION_WORDS:
            prefix = " ".join(words[:i])
            return prefix if prefix[-1].isalnum() else None
    return None
