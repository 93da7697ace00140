"""False and true supersedes of the encoder rule on synthetic facts (encoder only, no language model).

    python scripts/supersede_pairs.py --n 1000 --seed 0 --out runs/supersede_pairs.json

For each fact of `memoir make-edits`: its paraphrase is the same question (a true supersede if edited
again), its same-subject other-relation question is not (a false supersede). Prints and saves the share of
each whose cosine with the fact's prompt, subject masked in both (what Memoir.same_question compares), is
at least each threshold.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from memoir_eval.synthetic import make_edits
from memoir_vllm.encoder import sentence_encoder
from memoir_vllm.subjects import mask_subject


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.7, 0.75, 0.8, 0.85, 0.9])
    ap.add_argument("--out", default="runs/supersede_pairs.json")
    args = ap.parse_args()
    facts = make_edits(args.n, args.seed)
    enc = sentence_encoder()

    def vec(key):
        return enc([mask_subject(f[key], [f["subject"]]) for f in facts])

    p = vec("prompt")
    same, other = (p * vec("rephrase")).sum(1), (p * vec("neighbour_subject")).sum(1)
    rows = [dict(supersede_tau=t, paraphrase_supersedes=round(float((same >= t).float().mean()), 4),
                 other_relation_supersedes=round(float((other >= t).float().mean()), 4)) for t in args.taus]
    for r in rows:
        print(json.dumps(r))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
