"""Which answer end stops greedy edited answers: the first N ZsRE records edited into one memory per
`answer_end` setting, then greedy answers of 24 new tokens to each edit prompt and paraphrase.

    python scripts/answer_end.py --n 10 --ends none eos period_eos newline --out runs/answer_end.json

Per setting: answers that repeat a word 3-gram, whole answer = target (answer_match), the target's words
first (exact_match, the Rel/Gen EM of `memoir eval`), for edit prompts and paraphrases; seconds per edit.
Prints and saves JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memoir_eval.data import load_records
from memoir_eval.metrics import answer_match, exact_match, repeats
from memoir_vllm.session import Memoir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--ends", nargs="+", default=["none", "eos", "period_eos", "newline"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/answer_end.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recs = [r for r in load_records("zsre", limit=args.n)]
    rows = []
    for end in args.ends:
        m = Memoir.create("default", answer_end=end, supersede=False)
        t0 = time.perf_counter()
        for r in recs:
            m.edit(r.prompt, r.target, subject=None)
        per_edit = (time.perf_counter() - t0) / len(recs)
        asked = m.ask([r.prompt for r in recs] + [r.rephrase for r in recs], max_new_tokens=24)
        rel, gen = asked[: len(recs)], asked[len(recs):]

        def share(fn, answers):
            return round(sum(fn(a.answer, r.target) for a, r in zip(answers, recs)) / len(recs), 3)

        row = dict(answer_end=end, seconds_per_edit=round(per_edit, 2),
                   rel_repeats=round(sum(repeats(a.answer) for a in rel) / len(recs), 3),
                   gen_repeats=round(sum(repeats(a.answer) for a in gen) / len(recs), 3),
                   rel_answer=share(answer_match, rel), gen_answer=share(answer_match, gen),
                   rel_em=share(exact_match, rel), gen_em=share(exact_match, gen),
                   examples=[a.answer for a in rel[:4]])
        rows.append(row)
        print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
