"""Score memoir's automatic subject rule (memoir_vllm.routing.subjects.auto_subject) against ZsRE's own subjects.

    .venv/bin/python scripts/subject_rule.py [--data ../shared/data/zsre/zsre_mend_edit.json] [--out FILE]

Prints and saves JSON: exact match with ZsRE's subject, one contains the other, the subject gate (word
boundaries) finds the record's auto subject in its paraphrase, and the share of unedited records (300..)
whose question names one of the auto subjects of records 0..299; plus the subjects found for a few
question-form facts.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memoir_vllm.routing.subjects import SubjectGate, auto_subject, normalize

QUESTIONS = ["What is the capital city of Norway?", "Who painted The Starry Night?",
             "Which club does Lionel Messi play for?", "The Eiffel Tower is located in the city of",
             "What language is spoken in Brazil?", "Who wrote Pride and Prejudice?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_edit.json")
    ap.add_argument("--n-edited", type=int, default=300)
    ap.add_argument("--out", default="runs/subject_rule.json")
    args = ap.parse_args()
    recs = json.loads(Path(args.data).read_text())
    t0 = time.perf_counter()
    subs = [auto_subject(r["src"]) for r in recs]
    dt = time.perf_counter() - t0
    n = len(recs)
    exact = sum(normalize(s) == normalize(r["subject"]) for s, r in zip(subs, recs)) / n
    contains = sum(bool(s) and (normalize(s) in normalize(r["subject"]) or normalize(r["subject"]) in normalize(s))
                   for s, r in zip(subs, recs)) / n
    in_rephrase = 0
    for s, r in zip(subs, recs):
        g = SubjectGate()
        g.add([s])
        in_rephrase += bool(g.rows_in(r["rephrase"]))
    gate = SubjectGate()
    for s in subs[: args.n_edited]:
        gate.add([s])
    unedited = recs[args.n_edited:]
    named = sum(bool(gate.rows_in(r["src"])) for r in unedited) / max(len(unedited), 1)
    out = dict(records=n, exact=round(exact, 4), contains=round(contains, 4), in_rephrase=round(in_rephrase / n, 4),
               unedited_naming_an_edited_subject=round(named, 4), n_edited=args.n_edited,
               ms_per_prompt=round(1000 * dt / n, 3), questions={q: auto_subject(q) for q in QUESTIONS})
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
