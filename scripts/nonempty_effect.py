"""What `nonempty_answers` changes: one store's edit prompts and paraphrases answered greedily with and without it.

    PYTHONPATH=. python scripts/nonempty_effect.py --store runs/cap1000r/free --data synthetic --out runs/nonempty_syn.json
    PYTHONPATH=. python scripts/nonempty_effect.py --store runs/zsre_auto/state/T100-c0 --data zsre --forms raw chat

The store's edits are matched, in order, to the first N facts of the data they were written from (`memoir
make-edits --seed S`'s SYNTHETIC facts, or a `memoir eval --data` set's records). No editing: the same memory
is asked twice (edit prompts, paraphrases and, for synthetic facts, the fact as a statement to complete), with
the end tokens a routed answer may not start with (the store's own, or the tokenizer's for an older store) and
with none (any first token, the reference). Reported per request form: the share of whole answers equal to the
target (memoir_eval.metrics.answer_match; also per --block edits, oldest first, and per position in a full
shard with the mean over full shards: memoir_eval.age.by_shard_position, what projects to a larger stream under
free columns), of empty answers, and of requests routed to their own edit. Only routed requests can differ: an
unrouted one is the base model either way.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memoir_eval.age import full_shards  # noqa: E402
from memoir_eval.data import load_records  # noqa: E402
from memoir_eval.greedy import answers_by_kind  # noqa: E402
from memoir_eval.synthetic import make_edits  # noqa: E402
from memoir_vllm.session import Memoir  # noqa: E402
from memoir_vllm.tokens import end_token_ids  # noqa: E402

log = logging.getLogger("nonempty_effect")


def facts_of(data: str, n: int, seed: int) -> list[dict]:
    if data == "synthetic":
        return [{"prompt": f["prompt"], "target": f["target"], "rephrase": f["rephrase"], "cloze": f["cloze"]}
                for f in make_edits(n, seed)]
    return [{"prompt": r.prompt, "target": r.target, "rephrase": r.rephrase} for r in load_records(data, limit=n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a snapshot store or version")
    ap.add_argument("--data", default="synthetic", help="synthetic (memoir make-edits) or a memoir eval --data set")
    ap.add_argument("--seed", type=int, default=0, help="make-edits seed (synthetic)")
    ap.add_argument("--forms", nargs="+", default=["raw"], choices=["raw", "chat"], help="request forms to ask in")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--block", type=int, default=100, help="edits per age block (oldest first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/nonempty_effect.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    m = Memoir.from_snapshot(args.store)
    facts = facts_of(args.data, m.memory.n_edits, args.seed)
    mismatch = [i for i, (e, f) in enumerate(zip(m.edits, facts)) if (e.prompt, e.target) != (f["prompt"], f["target"])]
    if mismatch:
        raise SystemExit(f"edit {mismatch[0]} of {args.store} is not fact {mismatch[0]} of {args.data}: give the data "
                         "(and --seed) the store was written from")
    ends = m.memory.end_ids or end_token_ids(m.tok)
    runs = []
    for form in args.forms:
        for name, end_ids in (("any first token", ()), ("nonempty_answers", ends)):
            m.memory.end_ids = end_ids
            r = {"form": form, "setting": name,
                 **answers_by_kind(m, facts, args.block, args.max_new_tokens, chat=form == "chat")}
            log.info("%s", r)
            runs.append(r)
    result = {"store": str(args.store), "data": args.data, "n": len(facts), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{len(facts)} edits of {args.store}\n| form | first token | edit prompt = target | paraphrase = target "
          "| paraphrase empty | paraphrase routed to its edit | edit prompts by age | paraphrases by age "
          "| edit prompts, full shards | paraphrases, full shards | statement = target | statement routed to its edit |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        age = {k: " ".join(f"{v:.2f}" for v in r[f"{k}_by_age"]) for k in ("edited", "paraphrase")}
        cloze = f"{r['cloze']:.3f} | {r['cloze_routed']:.3f}" if "cloze" in r else " | "
        print(f"| {r['form']} | {r['setting']} | {r['edited']:.3f} | {r['paraphrase']:.3f} | {r['paraphrase_empty']:.3f} "
              f"| {r['paraphrase_routed']:.3f} | {age['edited']} | {age['paraphrase']} "
              f"| {full_shards(r['edited_by_shard_position'])} | {full_shards(r['paraphrase_by_shard_position'])} "
              f"| {cloze} |")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
