"""False and true supersedes of the encoder rule on synthetic facts (encoder only, no language model).

    python scripts/supersede_pairs.py --n 1000 --seed 0 --out runs/supersede_pairs.json

For each fact of `memoir make-edits`: its paraphrase is the same question (a true supersede if edited
again), its same-subject other-relation question is not (a false supersede). Prints and saves the share of
each whose cosine with the fact's prompt, subject masked in both (what Memoir.same_question compares), is
at least each threshold; `*_typed`: with answer types too (answer_type.py: both questions ask for the same kind
of answer, as under the default answer_type setting).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memoir_eval.synthetic import make_edits
from memoir_vllm.routing.answer_type import same_answer_type
from memoir_vllm.routing.encoder import sentence_encoder
from memoir_vllm.routing.subjects import mask_subject


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])
    ap.add_argument("--out", default="runs/supersede_pairs.json")
    args = ap.parse_args()
    facts = make_edits(args.n, args.seed)
    enc = sentence_encoder()

    def masked(key):
        return [mask_subject(f[key], [f["subject"]]) for f in facts]

    def typed(key):
        return torch.tensor([same_answer_type(a, b) for a, b in zip(masked("prompt"), masked(key))])

    def share(x):
        return round(float(x.float().mean()), 4)

    p = enc(masked("prompt"))
    same, other = (p * enc(masked("rephrase"))).sum(1), (p * enc(masked("neighbour_subject"))).sum(1)
    same_t, other_t = typed("rephrase"), typed("neighbour_subject")
    rows = [dict(supersede_tau=t, paraphrase_supersedes=share(same >= t), other_relation_supersedes=share(other >= t),
                 paraphrase_supersedes_typed=share((same >= t) & same_t),
                 other_relation_supersedes_typed=share((other >= t) & other_t)) for t in args.taus]
    for r in rows:
        print(json.dumps(r))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
