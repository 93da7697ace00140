"""The subject rule's candidate stage on question pairs, no model: the share of pairs whose edit stays a candidate.

    .venv/bin/python scripts/second_stage_pairs.py --untyped-taus 0 0.65 0.7

Pairs (edit question, another question about the same subject), the subject masked in both as the memory does:
synthetic paraphrases, questions of another relation and statements to complete (`memoir make-edits --n 1000`),
the paraphrases of all ZsRE records in ../shared/data, and the 40 held-out real-world questions of
second_stage_heldout.py. A pair is kept when answer types agree (answer_type.same_answer_type) and the encoder
cosine reaches check_tau, or untyped_tau where only one of the two names a kind of answer (the rule of
ResidualMemory.candidate_scores: answer_type.needed_cosine).
Saves runs/second_stage_pairs.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from memoir_eval.routing_only import load_json_records  # noqa: E402
from memoir_eval.synthetic import make_edits  # noqa: E402
from memoir_vllm.routing.answer_type import needed_cosine, same_answer_type  # noqa: E402
from memoir_vllm.routing.encoder import sentence_encoder  # noqa: E402
from memoir_vllm.routing.subjects import auto_subject, mask_subject  # noqa: E402
from second_stage_heldout import QUESTIONS  # noqa: E402


def scored_pairs(edits: list[str], others: list[str], subjects: list[str]) -> list[tuple[str, str, float]]:
    """(masked edit question, masked other question, encoder cosine) per pair."""
    a = [mask_subject(e, [s]) for e, s in zip(edits, subjects)]
    b = [mask_subject(o, [s]) for o, s in zip(others, subjects)]
    enc = sentence_encoder()
    return list(zip(a, b, (enc(a) * enc(b)).sum(-1).tolist()))


def kept(pairs: list[tuple[str, str, float]], check_tau: float, untyped_tau: float) -> float:
    ok = [same_answer_type(a, b) and c >= needed_cosine(a, b, check_tau, untyped_tau) for a, b, c in pairs]
    return round(sum(ok) / len(ok), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check-tau", type=float, default=0.6)
    p.add_argument("--untyped-taus", type=float, nargs="+", default=[0.0, 0.65, 0.7])
    p.add_argument("--out", default="runs/second_stage_pairs.json")
    args = p.parse_args()
    syn = make_edits(1000, 0)
    zsre = load_json_records("zsre")
    subject = [f["subject"] for f in syn]
    sets = {
        "synthetic paraphrase": scored_pairs([f["prompt"] for f in syn], [f["rephrase"] for f in syn], subject),
        "synthetic statement": scored_pairs([f["prompt"] for f in syn], [f["cloze"] for f in syn], subject),
        "synthetic other relation": scored_pairs([f["prompt"] for f in syn], [f["neighbour_subject"] for f in syn],
                                                 subject),
        "ZsRE paraphrase": scored_pairs([r["src"] for r in zsre], [r["rephrase"] for r in zsre],
                                        [r.get("subject") or auto_subject(r["src"]) for r in zsre]),
        "held-out paraphrase": scored_pairs([q[1] for q in QUESTIONS], [q[2] for q in QUESTIONS],
                                            [q[0] for q in QUESTIONS]),
        "held-out other relation": scored_pairs([q[1] for q in QUESTIONS], [q[3] for q in QUESTIONS],
                                                [q[0] for q in QUESTIONS]),
    }
    rows = [{"untyped_tau": u, **{name: kept(ps, args.check_tau, u) for name, ps in sets.items()}}
            for u in args.untyped_taus]
    print("| untyped_tau | " + " | ".join(sets) + " |\n" + "|---" * (len(sets) + 1) + "|")
    for r in rows:
        print(f"| {r['untyped_tau']} | " + " | ".join(f"{r[n]:.3f}" for n in sets) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"check_tau": args.check_tau, "n": {n: len(ps) for n, ps in sets.items()},
                                          "rows": rows}, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
