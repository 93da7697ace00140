"""MaskIndex.best_match latency per batch of 64 queries for 10^4..10^6 stored masks (D=1536, k=439).

    PYTHONPATH=. python scripts/bench_index.py --sizes 10000 100000 1000000 --threads 2 --out runs/bench_index.json

Stored masks are random TopHash-like masks (k random ones out of D), written straight into the
index in packed form; half of the queries are copies of stored masks (so a best match exists).
Reports the first call (which builds the dense cache when it fits) and the median of the next ones.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from memoir_vllm.routing.index import MaskIndex, pack_masks

log = logging.getLogger("bench_index")


def random_masks(n: int, d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[n, D] bool with exactly k ones per row."""
    idx = torch.rand(n, d, generator=gen).topk(k, dim=1).indices  # [n, k]
    return torch.zeros(n, d, dtype=torch.bool).scatter_(1, idx, True)


def build_index(n: int, d: int, k: int, seed: int = 0, chunk: int = 16384, cache_gib: float = 2.0) -> MaskIndex:
    gen = torch.Generator().manual_seed(seed)
    index = MaskIndex(d, k, dense_cache_bytes=int(cache_gib * 2**30))
    index.packed = torch.cat([pack_masks(random_masks(min(chunk, n - s), d, k, gen)) for s in range(0, n, chunk)])
    index.edit_ids = torch.arange(n)
    index.active = torch.ones(n, dtype=torch.bool)
    index.shards = torch.zeros(n, dtype=torch.int64)
    return index


def bench(n: int, d: int, k: int, batch: int, repeats: int, device: str = "cpu", cache_gib: float = 2.0) -> dict:
    t0 = time.perf_counter()
    index = build_index(n, d, k, cache_gib=cache_gib)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    query = random_masks(batch, d, k, gen)
    query[: batch // 2] = index.masks(torch.randint(0, n, (batch // 2,), generator=gen))
    index, query = index.to(device), query.to(device)  # best_match returns on CPU: its timing includes the sync
    t0 = time.perf_counter()
    ratio, row = index.best_match(query)
    first_s = time.perf_counter() - t0
    assert bool((ratio[: batch // 2] == 1.0).all()), "a stored mask must match itself"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.best_match(query)
        times.append(time.perf_counter() - t0)
    res = {"n_masks": n, "batch": batch, "first_call_s": first_s, "median_s": statistics.median(times),
           "min_s": min(times), "build_s": build_s, "packed_mb": index.packed.numel() / 2**20}
    log.info("%s", res)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--k", type=int, default=439)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--float32", action="store_true", help="the float32 GEMM path instead of CPU int8 (comparison)")
    p.add_argument("--cache-gib", type=float, default=2.0, help="MaskIndex dense_cache_bytes in GiB (its default: 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the index GEMM is float32)")
    p.add_argument("--out", default="runs/bench_index.json")
    args = p.parse_args()
    if args.float32:
        import memoir_vllm.routing.index

        memoir_vllm.routing.index._HAS_INT_MM = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    results = []
    for n in args.sizes:
        results.append(bench(n, args.d, args.k, args.batch, args.repeats, args.device, args.cache_gib))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"d": args.d, "k": args.k, "threads": args.threads, "device": args.device, "cache_gib": args.cache_gib,
                                              "path": "float32" if args.float32 or args.device != "cpu" else "int8",
                                              "torch": torch.__version__, "results": results}, indent=2))
    for r in results:
        log.info("%8d masks: %.4f s per %d-query batch (first call %.3f s)", r["n_masks"], r["median_s"], r["batch"],
                 r["first_call_s"])


if __name__ == "__main__":
    main()
