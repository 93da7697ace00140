"""Routing cost of the subject rule per request on CPU, at up to 10^6 stored edits.

    python scripts/bench_gate.py --sizes 10000 1000000 --threads 1 --out runs/bench_gate.json

Builds a memory whose index holds N random TopHash masks (D=1536, k=439: the embedded model's shape) and
whose subject gate holds N invented subjects (memoir_eval.synthetic names), then times, per request:
  no candidate    the automaton lookup of a question that names no edited subject (the common case)
  candidates      a question naming one edited subject: lookup, encoder check (all-MiniLM-L6-v2) and
                  decide_masks among the candidate rows (what the vLLM op runs), no scan of the index
beside the mask rule's exact scan of the whole index (decide_masks without candidates). Prints and saves JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from memoir_vllm.memory import ResidualMemory
from memoir_vllm.routing.tophash import indices_to_mask


def _median_ms(fn, reps: int) -> float:
    fn()  # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(times), 3)


def bench(n: int, reps: int, d: int = 1536, k: int = 439, seed: int = 0) -> dict:
    from memoir_eval.synthetic import _name

    rng = random.Random(seed)
    mem = ResidualMemory(8, d, k, rule="subject", subject_check="encoder")
    g = torch.Generator().manual_seed(seed)
    chunk = 50_000
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        idx = torch.rand(m, d, generator=g).argsort(1)[:, :k]
        mem.index.add(indices_to_mask(idx, d), torch.arange(s, s + m))
    t0 = time.perf_counter()
    names = [f"{_name(rng, 'person')} {i}" for i in range(n)]
    for i, s in enumerate(names):
        mem.subjects.add((s,), f"Where was {s} born?", torch.nn.functional.normalize(torch.randn(384), dim=0))
    add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mem.subjects.rows_in("warm up")  # builds the automaton
    build_s = time.perf_counter() - t0
    target = names[n // 2]
    mem.subjects.set(n // 2, mem.subjects.aliases[n // 2])  # this edit's real vector, computed now
    mem.fill_vectors()
    miss_q, hit_q = "What is the capital city of Portugal?", f"In which city was {target} born?"
    query = torch.rand(1, d, generator=g).argsort(1)[:, :k]
    out = dict(n=n, gate_add_s=round(add_s, 2), automaton_build_s=round(build_s, 2))
    out["no_candidate_ms"] = _median_ms(lambda: mem.decide_masks(query, mem.candidates([miss_q])), reps)
    out["candidates_ms"] = _median_ms(lambda: mem.decide_masks(query, mem.candidates([hit_q])), reps)
    assert mem.candidates([hit_q]).tolist() == [[n // 2]], mem.candidate_scores([hit_q])
    mem.rule = "mask"
    out["mask_rule_scan_ms"] = _median_ms(lambda: mem.decide_masks(query), max(3, reps // 10))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_gate.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        rows.append(bench(n, args.reps))
        print(json.dumps(rows[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
