"""Edit subjects: what an edit is about, and the gate that finds the edits a request names.

Every edit carries a subject, one or more aliases ("Norway", ["Lionel Messi", "Messi"]). Without one,
`auto_subject(prompt)` finds it by this rule (measured against ZsRE's own subjects, memoir_eval/README.md):

    words = runs of letters/digits (inner ' - . & kept: "O'Brien", "U.S.", "AT&T")
    a word is a name word if it is capitalised (a first word only if it is not a common function word),
        contains a digit, or is rare (Zipf frequency < 3.2 in English, from the `wordfreq` package)
    name words in a row form a run; "of", "the", "de", "and", ... between two name words join them
    the subject is the run with the rarest word (ties: the longer run); with no run, the rarest word

`SubjectGate` holds every edit's aliases in an Aho-Corasick automaton (`pyahocorasick`) and answers, for a
request text, the edits whose subject occurs in it: case- and whitespace-insensitive, on word boundaries
("Norway's" names Norway, "Norwayan" does not). The cost of a lookup depends on the text's length and the
number of hits, not on the number of edits.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any, Iterable, Sequence

import ahocorasick

RARE_ZIPF = 3.2  # a word rarer than this (per billion words: 10**3.2) counts as a name word
_WORD = re.compile(r"[^\W_](?:[\w'’.&\-]*[^\W_])?")
_FUNCTION = frozenset(
    "a an the of in on at to for from by with about as and or is are was were be been being do does did "
    "what which who whom whose when where why how that this these those it its there their his her "
    "name tell give list".split()
)
_JOINERS = frozenset("of the de del della di da du des la le von van der den and & y for on upon in".split())


def normalize(text: str) -> str:
    """The form subjects are matched in: NFKC, lower case, ’ as ', whitespace collapsed to one space."""
    text = unicodedata.normalize("NFKC", text).replace("’", "'").replace("‘", "'").lower()
    return " ".join(text.split())


@lru_cache(maxsize=65536)
def _zipf(word: str) -> float:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en")


def _is_name_word(word: str, first: bool) -> bool:
    low = word.lower()
    if any(c.isdigit() for c in word):
        return True
    if low in _FUNCTION:
        return False
    if word[0].isupper():
        return not first or _zipf(low) < 5.0  # a capitalised first word: only if not a common word
    return _zipf(low) < RARE_ZIPF


def auto_subject(prompt: str) -> str:
    """The subject of a prompt by the rule in the module docstring ("" only for a prompt without words)."""
    words = []
    for m in _WORD.finditer(prompt):
        w, start, end = m.group(), m.start(), m.end()
        if len(w) > 2 and w[-2:].lower() in ("'s", "’s"):  # possessive: "Norway's" -> "Norway"
            w, end = w[:-2], end - 2
        words.append((w, start, end))
    if not words:
        return ""
    name = [_is_name_word(w, i == 0) for i, (w, _, _) in enumerate(words)]
    runs: list[list[int]] = []
    i = 0
    while i < len(words):
        if not name[i]:
            i += 1
            continue
        run = [i]
        j = i + 1
        while j < len(words):
            if name[j]:
                run.append(j)
                j += 1
                continue
            # joiners between two name words ("Bank of America", "Battle of the Somme")
            k = j
            while k < len(words) and not name[k] and words[k][0].lower() in _JOINERS and k - j < 2:
                k += 1
            if k > j and k < len(words) and name[k] and words[k][0][0].isupper():
                run.extend(range(j, k + 1))
                j = k + 1
                continue
            break
        runs.append(run)
        i = j
    if not runs:
        rarest = min(range(len(words)), key=lambda n: _zipf(words[n][0].lower()))
        return words[rarest][0]

    def trimmed(run: list[int]) -> list[int]:
        """A run with a capitalised word loses the lower-case words at its ends ("afflicts Gerald Ganglbauer")."""
        if not any(words[n][0][0].isupper() for n in run):
            return run
        lower = [not (words[n][0][0].isupper() or words[n][0][0].isdigit()) for n in run]
        a, b = 0, len(run)
        while lower[a]:
            a += 1
        while lower[b - 1]:
            b -= 1
        return run[a:b]

    def rank(run: list[int]) -> tuple[float, int]:
        return (min(_zipf(words[n][0].lower()) for n in run if name[n]), -len(run))

    best = min((trimmed(r) for r in runs), key=rank)
    start, end = words[best[0]][1], words[best[-1]][2]
    if best[0] > 1 and words[best[0] - 1][0] == "The":  # a title inside the prompt: "in The Last Days"
        start = words[best[0] - 1][1]
    tail = re.match(r" ?\([^()]{1,24}\)", prompt[end:])  # a qualifier: "USS Wren (DD-568)"
    if tail:
        end += tail.end()
    elif prompt[start:end].count("(") > prompt[start:end].count(")") and prompt[end:end + 1] == ")":
        end += 1  # the run ended inside the qualifier: "USS Wren (DD-568"
    return prompt[start:end]


def as_aliases(subject: str | Sequence[str] | None) -> tuple[str, ...]:
    """A subject given as a string or a list of aliases -> a tuple of non-empty aliases (maybe empty)."""
    if subject is None:
        return ()
    if isinstance(subject, str):
        subject = [subject]
    if not isinstance(subject, (list, tuple)):
        raise ValueError(f"a subject must be a string or a list of strings, got {type(subject).__name__}: {subject!r}")
    out = []
    for s in subject:
        if not isinstance(s, str):
            raise ValueError(f"a subject alias must be a string, got {type(s).__name__}: {s!r}")
        if s.strip() and s.strip() not in out:
            out.append(s.strip())
    return tuple(out)


def mask_subject(text: str, aliases: Sequence[str], placeholder: str = "X") -> str:
    """text with every whole-word occurrence of an alias (any case, any spacing) replaced by `placeholder`:
    what the second stage compares, so that two questions about one subject differ only in what they ask."""
    for a in sorted(aliases, key=len, reverse=True):
        words = a.split()
        if words:
            pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
            text = re.sub(pattern, placeholder, text, flags=re.IGNORECASE)
    return text


def _boundary(text: str, start: int, end: int) -> bool:
    """text[start:end] is a whole word run: no letter or digit right before or right after it."""
    return (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum())


class SubjectGate:
    """The aliases of every edit (row i = index row i), an automaton that finds them in a text, and, for the
    encoder check, each edit's question vector (encoder.py; None where not computed)."""

    def __init__(self) -> None:
        self.aliases: list[tuple[str, ...]] = []  # row -> aliases as given
        self.prompts: list[str] = []  # row -> the edit's prompt (what its question vector is computed from)
        self.vectors: list[Any] = []  # row -> [384] unit vector of the prompt, subject masked; None: not yet
        self.missing: set[int] = set()  # rows whose vector is None (so finding them never scans every row)
        self._automaton: ahocorasick.Automaton | None = None

    def __len__(self) -> int:
        return len(self.aliases)

    def add(self, aliases: Iterable[str], prompt: str = "", vector: Any = None) -> int:
        """Append the next row's aliases and edit prompt (and its question vector); returns its row."""
        self.aliases.append(tuple(aliases))
        self.prompts.append(prompt)
        self.vectors.append(vector)
        if vector is None:
            self.missing.add(len(self.vectors) - 1)
        self._automaton = None
        return len(self.aliases) - 1

    def set(self, row: int, aliases: Iterable[str]) -> None:
        """Change one row's aliases (an edit's subject edited in place); its question vector is recomputed."""
        self.aliases[row] = tuple(aliases)
        self.vectors[row] = None
        self.missing.add(row)
        self._automaton = None

    def masked_prompt(self, row: int) -> str:
        """The edit prompt of `row` with its subject replaced by the placeholder (what the second stage reads)."""
        return mask_subject(self.prompts[row], self.aliases[row])

    def build(self) -> None:
        """Build the automaton now (it is otherwise built at the first lookup after a change): a server loading a
        new version does this beside the engine, not in the step that admits the first request."""
        self._built()

    def _built(self) -> ahocorasick.Automaton:
        if self._automaton is None:
            rows_of: dict[str, list[int]] = {}
            for row, aliases in enumerate(self.aliases):
                for a in aliases:
                    key = normalize(a)
                    if key:
                        rows_of.setdefault(key, []).append(row)
            auto = ahocorasick.Automaton()
            for key, rows in rows_of.items():
                auto.add_word(key, (len(key), tuple(rows)))
            if rows_of:
                auto.make_automaton()
            self._automaton = auto
        return self._automaton

    def rows_in(self, text: str) -> list[int]:
        """Rows whose subject (any alias) occurs in text on word boundaries, newest first."""
        auto = self._built()
        if len(auto) == 0:
            return []
        norm = normalize(text)
        hits: set[int] = set()
        for end, (n, rows) in auto.iter(norm):
            if _boundary(norm, end - n + 1, end + 1):
                hits.update(rows)
        return sorted(hits, reverse=True)
