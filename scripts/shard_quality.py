"""Quality of S = 1, 2, 4 shard memories at equal edit counts on ZsRE, written by Ray edit jobs.

    python scripts/shard_quality.py --n 60 --shards 1 2 4 --workers 2 --out runs/shard_quality.json

The first N ZsRE records are edited by `run_ray_job` into S shards (edit i -> shard i mod S), then
the merged snapshot is evaluated with all N edits in place (the sequential protocol's "evaluate at
the end"): reliability and generalization as teacher-forced token accuracy of `alt` after `src` /
`rephrase`, locality as argmax agreement with the unedited model on `loc loc_ans`. Routing and
overlap columns explain the numbers: more shards means fewer edits share one W_m, so less column
overlap between the edits written into the same weights. Prints a table and saves JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from memoir_vllm.edits import load_edits
from memoir_vllm.hf import attach
from memoir_vllm.inference import score
from memoir_vllm.ray.jobs import connect, run_ray_job
from memoir_vllm.session import Memoir
from memoir_vllm.snapshot import load_snapshot

log = logging.getLogger("shard_quality")
DATA = Path(os.environ.get("MEMOIR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def batched_score(m: Memoir, prompts: list[str], targets: list[str], use_memory: bool = True, bs: int = 16):
    accs, preds, rows = [], [], []
    for s in range(0, len(prompts), bs):
        r = score(m.model, m.tok, m.layer, prompts[s : s + bs], targets[s : s + bs], use_memory=use_memory)
        accs += r.token_acc
        preds += r.pred_tokens
        rows += r.routing.row.tolist() if r.routing is not None else [-1] * len(r.token_acc)
    return accs, preds, rows


def shard_overlap(memory) -> dict[str, float]:
    """Mean over edits of the largest mask overlap |M_i & M_j| / k with another edit in the same shard,
    and the mean number of same-shard edits writing each used W_m column."""
    idx = memory.index
    masks = idx.masks(torch.arange(len(idx))).float()  # [N, D]
    shards = idx.shards
    same = shards.unsqueeze(0) == shards.unsqueeze(1)  # [N, N]
    ov = masks @ masks.T / idx.k  # [N, N]
    ov.fill_diagonal_(-1)
    ov = ov.masked_fill(~same, -1)
    best = ov.max(1).values
    best = best[best >= 0]
    per_col = [masks[shards == s].sum(0) for s in shards.unique()]  # [D] edits per column, per shard
    writers = torch.cat([c[c > 0] for c in per_col])
    return {"max_overlap_same_shard": round(float(best.mean()), 4) if best.numel() else 0.0,
            "edits_per_used_column": round(float(writers.mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--edits", default=str(DATA / "zsre" / "zsre_mend_edit.json"))
    ap.add_argument("--n", type=int, default=60, help="edits (the first N records)")
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--jobs", default="runs/shard_quality", help="where the job directories go")
    ap.add_argument("--out", default="runs/shard_quality.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    reqs = load_edits(args.edits)[: args.n]
    connect(None, num_cpus=args.workers)
    results = {"model": args.model, "n_edits": len(reqs), "edits": args.edits, "workers": args.workers, "rows": []}
    evaluator: Memoir | None = None
    base_loc: list[list[int]] | None = None
    raw = json.loads(Path(args.edits).read_text())[: args.n]  # ZsRE records: loc and loc_ans apart
    for S in args.shards:
        job = Path(args.jobs) / f"S{S}-n{len(reqs)}"
        if (job / "summary.json").exists():
            log.info("reusing %s", job)
            summary = json.loads((job / "summary.json").read_text())
        else:
            summary = run_ray_job(args.edits, job, model=args.model, workers=args.workers, shards=S, every=args.every,
                                  limit=args.n, progress=False, resume=job.exists())  # an interrupted run resumes
            (job / "summary.json").write_text(json.dumps(summary, indent=2))
        snap = load_snapshot(job)
        if evaluator is None:
            evaluator = Memoir.from_snapshot(job)
        m = evaluator
        m.memory = snap.memory
        m.layer = attach(m.model, snap.memory, snap.config.layer)
        rel, _, rel_rows = batched_score(m, [r.prompt for r in reqs], [r.target for r in reqs])
        gen, _, gen_rows = batched_score(m, [r.rephrase for r in reqs], [r.target for r in reqs])
        # locality: 'loc' prompt, 'loc_ans' continuation; agreement with the unedited model's argmax
        lp_, la_ = [r["loc"] for r in raw], [r["loc_ans"] for r in raw]
        if base_loc is None:
            _, base_loc, _ = batched_score(m, lp_, la_, use_memory=False)
        _, loc_pred, loc_rows = batched_score(m, lp_, la_)
        loc = [sum(int(a == b) for a, b in zip(p, q)) / max(len(p), 1) for p, q in zip(loc_pred, base_loc)]
        n = len(reqs)
        row = {
            "shards": S,
            "reliability": round(sum(rel) / n, 4),
            "generalization": round(sum(gen) / n, 4),
            "locality": round(sum(loc) / n, 4),
            "routed_to_own_edit": round(sum(int(r == i) for i, r in enumerate(rel_rows)) / n, 4),
            "rephrase_routed_to_own_edit": round(sum(int(r == i) for i, r in enumerate(gen_rows)) / n, 4),
            "loc_routed_to_any_edit": round(sum(int(r >= 0) for r in loc_rows) / n, 4),
            **shard_overlap(snap.memory),
            "edit_seconds": summary["seconds"],
            "edits_per_s_warm": summary.get("edits_per_s_warm"),
            "per_shard": summary["per_shard"],
        }
        results["rows"].append(row)
        log.info("S=%d: %s", S, row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    cols = ["shards", "reliability", "generalization", "locality", "routed_to_own_edit", "rephrase_routed_to_own_edit",
            "loc_routed_to_any_edit", "max_overlap_same_shard", "edits_per_used_column"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in results["rows"]:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
