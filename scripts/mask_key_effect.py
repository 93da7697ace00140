"""Does keying each edit's mask by its subject (mask_key "subject") reduce interference between edits?

    PYTHONPATH=. python scripts/mask_key_effect.py --n 60 --out runs/mask_key_effect.json

Writes the first N synthetic facts (`memoir make-edits`, SYNTHETIC invented subjects, several relations each)
into one memory per setting with the transformers path, then asks every edit prompt and paraphrase greedily
(`Memoir.ask`). Reported per setting: the share of whole answers equal to the target (SQuAD-normalised), for
all edits and for the oldest and newest halves; the columns two edits of one relation share (mean |M_i & M_j| / k
over same-relation pairs); unrelated questions unchanged; edit seconds. Routing decisions are the same in both
settings by construction (tests/test_subjects.py), so any difference is interference in W_m.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memoir_eval.metrics import answer_match  # noqa: E402
from memoir_eval.synthetic import make_edits  # noqa: E402
from memoir_vllm.session import Memoir  # noqa: E402

log = logging.getLogger("mask_key_effect")


def shared_columns(m: Memoir, facts: list[dict]) -> float:
    """Mean |M_i & M_j| / k over pairs of edits of the same relation."""
    masks = m.memory.index.masks(torch.arange(len(facts)))
    vals = [float((masks[i] & masks[j]).sum()) / m.memory.k
            for i, j in itertools.combinations(range(len(facts)), 2) if facts[i]["relation"] == facts[j]["relation"]]
    return sum(vals) / max(len(vals), 1)


def run(facts: list[dict], mask_key: str, max_new_tokens: int) -> dict:
    m = Memoir.create("default", mask_key=mask_key)
    t0 = time.perf_counter()
    m.edit_many([_req(f) for f in facts], progress=True)
    edit_s = time.perf_counter() - t0
    half = len(facts) // 2
    out: dict = {"mask_key": mask_key, "edit_s": edit_s, "shared_columns_same_relation": shared_columns(m, facts)}
    for kind, field in (("edited", "prompt"), ("paraphrase", "rephrase")):
        answers = m.ask([f[field] for f in facts], max_new_tokens=max_new_tokens)
        ok = [answer_match(a.answer, f["target"]) for a, f in zip(answers, facts)]
        out[kind] = sum(ok) / len(ok)
        out[f"{kind}_oldest_half"] = sum(ok[:half]) / half
        out[f"{kind}_newest_half"] = sum(ok[half:]) / (len(ok) - half)
        out[f"{kind}_answers"] = [a.answer for a in answers]
    unrel = m.ask([f["unrelated"] for f in facts], max_new_tokens=max_new_tokens)
    out["unrelated_unchanged"] = sum(a.answer == a.base_answer for a in unrel) / len(unrel)
    log.info("%s: %s", mask_key, {k: round(v, 3) for k, v in out.items() if isinstance(v, float)})
    return out


def _req(f: dict):
    from memoir_vllm.edits import EditRequest

    return EditRequest(f["prompt"], f["target"], f["rephrase"], f["unrelated"], subject=(f["subject"],))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keys", default="none,subject", help="comma-separated mask_key settings")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/mask_key_effect.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    facts = make_edits(args.n, args.seed)
    results = {"n": args.n, "seed": args.seed, "runs": [run(facts, key, args.max_new_tokens)
                                                        for key in args.keys.split(",")]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    for r in results["runs"]:
        print(r["mask_key"], {k: round(v, 3) for k, v in r.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
