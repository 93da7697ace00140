"""Cost of one step's memory term against the number of shards: shared columns vs free columns.

    PYTHONPATH=. python scripts/bench_column_term.py --shards 1 10 100 417 --tokens 128 2048 \
        --out runs/bench_column_term.json

Shared columns (`ResidualMemory.memory_term`): one masked [T, D] x [D, d_model] matmul per shard that a step's
routed tokens are in. Free columns (`memory.column_term`): every token reads its own edit's k columns from the
weights its slot keeps, in one embedding bag, whatever the number of shards. Tokens are spread over 32
requests, each routed to an edit in its own shard (round-robin), as in a step of 32 requests routed to
different shards. Also the base down-projection on the same tokens. Median of --repeats calls, one process,
so compare the ratios. Prints and saves JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from memoir_vllm.memory import ResidualMemory, column_term

D_MODEL, D_INNER, K = 576, 1536, 64  # SmolLM2-135M at its free-columns k
REQUESTS = 32


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def bench(n_shards: int, n_tokens: int, repeats: int) -> dict:
    """Seconds of the base projection, the shared-columns term over the shards present, the free-columns term."""
    gen = torch.Generator().manual_seed(0)
    memory = ResidualMemory(D_MODEL, D_INNER, K, n_shards=n_shards)
    memory.weight.normal_(0, 0.02, generator=gen)
    base = torch.randn(D_MODEL, D_INNER, generator=gen)
    acts = torch.randn(n_tokens, D_INNER, generator=gen)
    req = torch.arange(n_tokens) * REQUESTS // n_tokens  # [T] the request of each token
    shard_of_req = torch.arange(REQUESTS) % n_shards  # [R] each request's edit in its own shard (round-robin)
    cols_of_req = torch.rand(REQUESTS, D_INNER, generator=gen).topk(K, dim=1).indices.sort(dim=1).values  # [R, k]
    masks = torch.zeros(REQUESTS, D_INNER).scatter_(1, cols_of_req, 1.0)[req]  # [T, D]
    shards = shard_of_req[req]  # [T]
    present = sorted(set(shard_of_req.tolist()))
    table = memory.weight[shard_of_req.unsqueeze(1), :, cols_of_req]  # [R, k, d_model], kept at decision time
    cols = cols_of_req[req]  # [T, k]
    shared = memory.memory_term(acts, masks, shards, present=present)
    free = column_term(acts, cols, table, req)
    assert torch.allclose(shared, free, atol=1e-4), (shared - free).abs().max()  # the same term
    res = {"shards": n_shards, "tokens": n_tokens, "shards_present": len(present),
           "base_s": timed(lambda: acts @ base.T, repeats),
           "shared_s": timed(lambda: memory.memory_term(acts, masks, shards, present=present), repeats),
           "free_s": timed(lambda: column_term(acts, cols, table, req), repeats)}
    res["shared_over_base"] = round(res["shared_s"] / res["base_s"], 3)
    res["free_over_base"] = round(res["free_s"] / res["base_s"], 3)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 10, 100, 417])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench_column_term.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for t in args.tokens:
        for s in args.shards:
            rows.append(bench(s, t, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
