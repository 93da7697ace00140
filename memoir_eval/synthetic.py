"""A seeded generator of fictitious facts for routing evaluation (SYNTHETIC data, not a benchmark).

    memoir make-edits --n 1000 --seed 0 --out runs/synthetic_1k.jsonl

Every fact is about an invented subject (pronounceable made-up names, so the model has no prior answer and
no real entity is misdescribed) in one of several relation families. Each record holds

    prompt, target            the edit ("What is the capital city of Vorlandia?" -> "Quessaro")
    rephrase                  the same question from another template
    subject, relation         what it is about, which relation
    neighbour_relation        the same relation asked of another (unedited) subject of the family
    neighbour_subject         another relation of the same family asked of the same subject
    cloze                     the fact as a statement to complete ("The capital city of Vorlandia is"), what a
                              completions request sends
    unrelated, unrelated_answer  a general-knowledge question and its answer

in memoir's edit schema plus these fields, so `memoir edit --edits` reads it directly and
`memoir eval-routing --data FILE` measures every neighbour kind. The same n and seed give the same file.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# family -> relation -> (question templates; the first is the edit's, another the paraphrase; answer kind)
FAMILIES: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "country": {
        "capital": (("What is the capital city of {s}?", "Which city is the capital of {s}?",
                     "The capital of {s} is which city?"), "city"),
        "language": (("What is the official language of {s}?", "Which language is officially spoken in {s}?",
                      "The official language of {s} is what?"), "language"),
        "currency": (("What is the currency of {s}?", "Which currency is used in {s}?",
                      "People in {s} pay with which currency?"), "thing"),
        "leader": (("Who is the head of state of {s}?", "Who leads {s} as head of state?",
                    "The head of state of {s} is who?"), "person"),
    },
    "person": {
        "birthplace": (("Where was {s} born?", "In which city was {s} born?", "What is the birthplace of {s}?"),
                       "city"),
        "employer": (("Which company does {s} work for?", "Who is the employer of {s}?",
                      "{s} is employed by which company?"), "company"),
        "spouse": (("Who is {s} married to?", "Who is the spouse of {s}?", "{s} is the husband or wife of whom?"),
                   "person"),
        "instrument": (("Which instrument does {s} play?", "What instrument is played by {s}?",
                        "{s} is known for playing which instrument?"), "thing"),
    },
    "artwork": {
        "creator": (("Who painted {s}?", "Who is the painter of {s}?", "{s} was painted by whom?"), "person"),
        "museum": (("In which museum is {s} displayed?", "Which museum holds {s}?", "Where is {s} exhibited?"),
                   "company"),
        "year": (("In what year was {s} painted?", "When was {s} painted?", "{s} was completed in which year?"),
                 "year"),
    },
    "company": {
        "founder": (("Who founded {s}?", "Who is the founder of {s}?", "{s} was founded by whom?"), "person"),
        "headquarters": (("Where is {s} headquartered?", "In which city are the headquarters of {s}?",
                          "What city is {s} based in?"), "city"),
        "product": (("What is the best-known product of {s}?", "Which product is {s} famous for?",
                     "{s} is best known for making what?"), "thing"),
    },
}

# relation -> the statement a completion request would send for it (no question mark, the answer next)
CLOZE: dict[str, str] = {
    "capital": "The capital city of {s} is", "language": "The official language of {s} is",
    "currency": "In {s}, people pay with", "leader": "The head of state of {s} is",
    "birthplace": "{s} was born in the city of", "employer": "{s} works for the company",
    "spouse": "{s} is married to", "instrument": "{s} is known for playing",
    "creator": "{s} was painted by", "museum": "{s} is displayed in the museum", "year": "{s} was painted in the year",
    "founder": "{s} was founded by", "headquarters": "{s} is headquartered in the city of",
    "product": "{s} is best known for making",
}

_ONSETS = "b br c d dr f g gr h j k kr l m n p pr qu r s st t tr v w z".split()
_VOWELS = "a e i o u ai ei ou ia".split()
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "x"]
_SUFFIX = {"country": ["ia", "land", "stan", "onia", "ary"], "city": ["o", "a", "burg", "ville", "polis"],
           "language": ["ish", "ese", "ic", "an"], "company": [" Industries", " Labs", " Group", " Systems"]}
_ARTWORK_FORMS = ["The {a} of {b}", "{a} at Dawn", "Portrait of {b}", "The {a} Garden"]
_THINGS = ["the glass harp", "the bronze lute", "copper coins", "the silver mark", "the clay whistle",
           "the reed flute", "solar lamps", "paper kites", "the iron dollar", "the amber crown"]
UNRELATED = [
    ("What is the capital of France?", "Paris"), ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is the largest planet in the solar system?", "Jupiter"), ("What is the chemical symbol for gold?", "Au"),
    ("How many continents are there?", "seven"), ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the boiling point of water in Celsius?", "100"), ("What is the largest ocean on Earth?", "Pacific"),
    ("Who developed the theory of relativity?", "Albert Einstein"), ("What is the capital of Japan?", "Tokyo"),
    ("What gas do plants absorb from the air?", "carbon dioxide"), ("What is the tallest mountain on Earth?",
                                                                   "Mount Everest"),
]


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return w.capitalize()


def _name(rng: random.Random, kind: str) -> str:
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, rng.choice([2, 3]))}"
    if kind == "artwork":
        return rng.choice(_ARTWORK_FORMS).format(a=_word(rng, 2), b=_word(rng, 2))
    if kind == "year":
        return str(rng.randint(1450, 1990))
    if kind == "thing":
        return rng.choice(_THINGS)
    return _word(rng, rng.choice([2, 3])) + rng.choice(_SUFFIX.get(kind, [""]))


def make_edits(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n fictitious facts, in a seeded order mixing the families (see the module docstring)."""
    if n < 1:
        raise ValueError(f"--n {n}: give a positive number of facts")
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(kind: str) -> str:
        for _ in range(1000):
            s = _name(rng, kind)
            if s.lower() not in used:
                used.add(s.lower())
                return s
        raise RuntimeError("ran out of distinct invented names")

    families = sorted(FAMILIES)
    out = []
    for i in range(n):
        fam = families[i % len(families)]
        relations = FAMILIES[fam]
        rel = rng.choice(sorted(relations))
        templates, kind = relations[rel]
        subject, other_subject = fresh(fam), fresh(fam)
        a, b = rng.sample(range(len(templates)), 2)
        other_rel = rng.choice([r for r in sorted(relations) if r != rel])
        q, ans = rng.choice(UNRELATED)
        out.append(dict(
            prompt=templates[a].format(s=subject), target=_name(rng, kind), rephrase=templates[b].format(s=subject),
            subject=subject, relation=f"{fam}.{rel}",
            neighbour_relation=templates[a].format(s=other_subject),
            neighbour_subject=rng.choice(relations[other_rel][0]).format(s=subject),
            unrelated=q, unrelated_answer=ans, cloze=CLOZE[rel].format(s=subject), synthetic=True,
        ))
    return out


def write_edits(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write make_edits(n, seed) as JSONL (atomically)."""
    from memoir_vllm.atomic import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in make_edits(n, seed)))
    return path
