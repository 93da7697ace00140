"""Edit throughput of Ray edit jobs with 1 vs 2 workers on this machine.

    python scripts/bench_ray.py --n 24 --workers 1 2 --out runs/bench_ray.json

Each run edits the same N ZsRE records with `workers` actors and as many shards (one torch thread
per actor), on a local Ray cluster started once. Reported per run: total seconds (actor start-up
included), start-up seconds (until every actor has loaded its model), edits/s overall and edits/s
after start-up. The load average is recorded too: on a shared machine other jobs take cores.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

from memoir_vllm.ray.jobs import connect, run_ray_job

DATA = Path(os.environ.get("MEMOIR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--edits", default=str(DATA / "zsre" / "zsre_mend_edit.json"))
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--out", default="runs/bench_ray.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    connect(None, num_cpus=max(args.workers))
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "model": args.model,
              "n_edits": args.n, "every": args.every, "runs": []}
    for w in args.workers:
        job = Path(tempfile.mkdtemp(prefix=f"bench-ray-w{w}-", dir="runs"))
        shutil.rmtree(job)
        load0 = os.getloadavg()
        summary = run_ray_job(args.edits, job, model=args.model, workers=w, shards=w, every=args.every, limit=args.n,
                              progress=False)
        run = {"workers": w, "shards": w, "loadavg_before": [round(x, 2) for x in load0],
               "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               **{k: summary[k] for k in ("seconds", "startup_s", "edits_per_s", "edits_per_s_warm", "per_shard")}}
        result["runs"].append(run)
        logging.info("workers=%d: %s", w, run)
        shutil.rmtree(job, ignore_errors=True)
    base = result["runs"][0]
    for run in result["runs"][1:]:
        if base["edits_per_s_warm"] and run["edits_per_s_warm"]:
            run["speedup_warm_vs_first"] = round(run["edits_per_s_warm"] / base["edits_per_s_warm"], 2)
        run["speedup_total_vs_first"] = round(run["edits_per_s"] / base["edits_per_s"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
