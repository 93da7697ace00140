"""Where capacity runs out: N synthetic facts written into one memory per setting, greedy answers by age.

    PYTHONPATH=. python scripts/capacity.py --n 1000 --variants one: budget100:shard_budget=100 \
        --state /tmp/capacity --resume --out runs/capacity_1000.json

Each variant is NAME:SETTING=VALUE,... (MemoirConfig fields; an empty list is today's defaults). The first N facts
of `memoir make-edits --n N --seed S` (SYNTHETIC invented subjects, several relation families) are written in
order with the transformers path; the store under --state/NAME is saved every --checkpoint-every edits, so a
killed run continues with --resume. Then every edit prompt and paraphrase is asked greedily (Memoir.ask) and
reported: the share of whole answers equal to the target (edit prompts, paraphrases, the fact as a statement to
complete) (SQuAD-normalised) per block of --block edits, oldest
first, and overall, by position in a full shard (what projects to a larger stream under free columns:
memoir_eval.age.by_shard_position), and the share routed to their own edit; paraphrases likewise; questions of the same relation about another subject, of another relation
about an edited subject, and unrelated questions answered as without the memory; edit seconds, shards and
bytes of W_m per edit.

--train SLICES (e.g. 0:100,900:1000) trains only those edits; the others are written for routing alone
(memoir_eval/sampled.py: mask and subject stored, no step, columns zero) and only the trained ones are asked.
Neighbour questions are those of the trained facts; one routed to an untrained edit counts as changed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memoir_eval.age import full_shards  # noqa: E402
from memoir_eval.greedy import answers_by_kind  # noqa: E402
from memoir_eval.sampled import edit_stream, parse_slices, unknown  # noqa: E402
from memoir_eval.synthetic import make_edits  # noqa: E402
from memoir_vllm.edits import EditRequest  # noqa: E402
from memoir_vllm.session import Memoir  # noqa: E402
from memoir_vllm.tokens import end_token_ids  # noqa: E402

log = logging.getLogger("capacity")
UNCHANGED = {"same_relation_unchanged": "neighbour_relation", "same_subject_unchanged": "neighbour_subject",
             "unrelated_unchanged": "unrelated"}


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:key=value,key=value' -> (NAME, settings); values parsed as JSON where they parse."""
    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def write(facts: list[dict], store: Path, settings: dict, resume: bool, every: int,
          train: set[int]) -> tuple[Memoir, float]:
    """The memory with every fact written (continuing a saved store under --resume), those in `train` trained;
    returns it and edit seconds."""
    m = Memoir.from_snapshot(store) if resume and (store / "LATEST").exists() else Memoir.create("default", **settings)
    done = m.memory.n_edits
    requests = [EditRequest(f["prompt"], f["target"], f["rephrase"], f["unrelated"], subject=(f["subject"],))
                for f in facts]
    log.info("%s: %d edits stored, %d to write (%d to train)", store.name, done, len(facts) - done,
             len(train - set(range(done))))

    def checkpoint(i: int, _res) -> None:
        if (i + 1) % every == 0 or i + 1 == len(facts):
            m.save(store, keep=2)

    t0 = time.perf_counter()
    edit_stream(m, requests, train, start=done, after_each=checkpoint)
    return m, time.perf_counter() - t0


def measure(m: Memoir, facts: list[dict], block: int, max_new_tokens: int, train: list[int]) -> dict:
    out = answers_by_kind(m, facts, block, max_new_tokens, only=train)
    trained = set(train)
    for name, field in UNCHANGED.items():
        answers = m.ask([facts[i][field] for i in train], max_new_tokens=max_new_tokens)
        out[name] = sum(a.answer == a.base_answer and not unknown(a.edit_id, trained) for a in answers) / len(answers)
        out[name.replace("unchanged", "routed")] = sum(a.edit_id is not None for a in answers) / len(answers)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["one:"], help="NAME:setting=value,... (see above)")
    ap.add_argument("--block", type=int, default=100, help="edits per age block")
    ap.add_argument("--state", default="runs/capacity_state", help="where each variant's store is kept")
    ap.add_argument("--resume", action="store_true", help="continue the stores under --state")
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nonempty", action="store_true", help="ask a store written before nonempty_answers existed "
                    "with it on (today's default): a routed answer never starts with an end token")
    ap.add_argument("--train", default=None, metavar="SLICES",
                    help="train only these edits, e.g. 0:100,900:1000 (default: all); see above")
    ap.add_argument("--out", default="runs/capacity.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    facts = make_edits(args.n, args.seed)
    train = parse_slices(args.train, args.n)  # (all n without --train)
    runs = []
    for name, settings in map(parse_variant, args.variants):
        m, edit_s = write(facts, Path(args.state) / name, settings, args.resume, args.checkpoint_every, set(train))
        mem = m.memory
        if args.nonempty and not mem.end_ids:
            mem.end_ids = end_token_ids(m.tok)
        r = {"variant": name, "settings": settings, "edit_s_this_run": round(edit_s, 1), "n_shards": mem.n_shards,
             "nonempty_answers": bool(mem.end_ids),
             "bytes_per_edit": mem.weight.numel() * mem.weight.element_size() / max(mem.n_edits, 1),
             "trained": args.train or "all", **measure(m, facts, args.block, args.max_new_tokens, train)}
        runs.append(r)
        log.info("%s: %s", name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "seed": args.seed, "block": args.block, "train": args.train,
                                          "runs": runs}, indent=1))
    print("| variant | edited | by age (oldest first) | paraphrase | paraphrase routed to its edit | same relation unchanged "
          "| same subject unchanged | unrelated unchanged | shards | bytes/edit | edited, full shards | paraphrase, full shards "
          "| statement |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        age = " ".join(f"{v:.2f}" for v in r["edited_by_age"])
        print(f"| {r['variant']} | {r['edited']:.3f} | {age} | {r['paraphrase']:.3f} | {r['paraphrase_routed']:.3f} "
              f"| {r['same_relation_unchanged']:.3f} "
              f"| {r['same_subject_unchanged']:.3f} | {r['unrelated_unchanged']:.3f} | {r['n_shards']} "
              f"| {r['bytes_per_edit'] / 1e3:.0f} kB | {full_shards(r['edited_by_shard_position'])} "
              f"| {full_shards(r['paraphrase_by_shard_position'])} | {r['cloze']:.3f} |")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
