"""Cost of the memory op: a down-projection with MEMOIR's routed memory term vs the plain down-projection.

    PYTHONPATH=. python scripts/bench_memory_op.py --device cuda --out runs/bench_memory_op.json

For each shape (SmolLM2-135M: d 576, D 1536; Llama-3-8B: d 4096, D 14336) and dtype, on B requests of
T prompt tokens, with N edits stored, two implementations of the op are timed against the base alone
(nn.Linear D -> d_model on the same tokens):
- hf: the transformers path (MemoirLayer, used by the editor and `memoir eval`), on [B, T, D];
- serving: vLLM's custom op `memoir::memory_term` on flattened tokens [B*T, D], its Router buffers
  prepared as the plugin prepares them each engine step (prepare time reported apart: host work).
Phases: prefill (the step that routes: prompt features, TopHash, best match over N masks, memory term)
and decode (one token per request, routing reused). "routed" = every request matched an edit (tau 0,
the most work); "unrouted" = none did (tau 1: the routing cost alone).
Prints and saves JSON; compare the ratios (memoir / base) measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import numpy as np

from memoir_vllm.hf import MemoirLayer, routed
from memoir_vllm.memory import ResidualMemory
from memoir_vllm.vllm import attachment
from memoir_vllm.vllm.layer import memory_term
from memoir_vllm.vllm.routing import Router

log = logging.getLogger("bench_memory_op")
SHAPES = {"smollm2-135m": (576, 1536), "llama-3-8b": (4096, 14336)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_layer(d_model: int, d_inner: int, n_masks: int, dtype: torch.dtype, device: torch.device) -> MemoirLayer:
    """A random down-projection with a memory holding n_masks random TopHash-like masks (k = 0.286 D)."""
    k = round(0.286 * d_inner)
    memory = ResidualMemory(d_model, d_inner, k, dtype=dtype)
    nn.init.normal_(memory.weight, std=0.02)
    idx = torch.rand(n_masks, d_inner).topk(k, dim=1).indices
    memory.index.add(torch.zeros(n_masks, d_inner, dtype=torch.bool).scatter_(1, idx, True), torch.arange(n_masks))
    base = nn.Linear(d_inner, d_model, bias=False, dtype=dtype)
    return MemoirLayer(base, memory).to(device).eval()


@torch.no_grad()
def bench_serving(layer: MemoirLayer, batch: int, tokens: int, repeats: int, device: torch.device) -> dict:
    """The vLLM op on flattened tokens, its router prepared per step as the plugin does."""
    mem, base = layer.memory, layer.base_layer
    dtype = base.weight.dtype
    router = Router(mem, max_reqs=batch, max_tokens=batch * tokens, dtype=dtype, device=device)
    name = f"bench.{id(router)}"
    attachment.standalone(name, router)
    prefill_a = torch.randn(batch * tokens, mem.d_inner, dtype=dtype, device=device)
    decode_a = prefill_a[:batch].clone()
    ones = np.ones(batch, dtype=np.int64)
    counter = iter(range(1 << 30))
    res: dict = {}

    def step(a: torch.Tensor, ids: list[str], computed: np.ndarray, scheduled: np.ndarray) -> tuple[float, float]:
        t0 = time.perf_counter()
        router.prepare(ids, computed, scheduled, np.full(batch, tokens), [False] * batch, [i.encode() for i in ids],
                       set(ids))
        _sync(device)
        t1 = time.perf_counter()
        out = base(a)
        memory_term(a, out, name)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    def run(phase: str) -> tuple[float, float]:
        prep, op = [], []
        for r in range(repeats + 2):
            ids = [f"req{next(counter)}" for _ in range(batch)]  # fresh requests: their prompts are routed now
            p, o = step(prefill_a, ids, 0 * ones, tokens * ones)
            if phase == "decode":
                p, o = step(decode_a, ids, tokens * ones, ones)  # routing decided in the step before
            if r >= 2:
                prep.append(p)
                op.append(o)
        return statistics.median(prep), statistics.median(op)

    res["base_prefill_s"] = timed(lambda: base(prefill_a), device, repeats)
    res["base_decode_s"] = timed(lambda: base(decode_a), device, repeats)
    for label, tau in (("routed", 0.0), ("unrouted", 1.0)):
        mem.tau = tau
        for phase in ("prefill", "decode"):
            prep, op = run(phase)
            res[f"{label}_{phase}_s"] = op
            res[f"{label}_{phase}_prepare_s"] = prep
            res[f"{label}_{phase}_ratio"] = round(op / res[f"base_{phase}_s"], 3)
    attachment.remove(name)
    return res


@torch.no_grad()
def bench_shape(name: str, dtype_name: str, batch: int, tokens: int, n_masks: int, repeats: int,
                device: torch.device) -> dict:
    d_model, d_inner = SHAPES[name]
    dtype = DTYPES[dtype_name]
    layer = make_layer(d_model, d_inner, n_masks, dtype, device)
    prefill_a = torch.randn(batch, tokens, d_inner, dtype=dtype, device=device)
    decode_a = torch.randn(batch, 1, d_inner, dtype=dtype, device=device)
    prompt_mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    res = dict(shape=name, d_model=d_model, d_inner=d_inner, dtype=dtype_name, batch=batch, tokens=tokens,
               n_masks=n_masks, k=layer.memory.k)
    res["base_prefill_s"] = timed(lambda: layer.base_layer(prefill_a), device, repeats)
    res["base_decode_s"] = timed(lambda: layer.base_layer(decode_a), device, repeats)
    hf: dict = dict(base_prefill_s=res.pop("base_prefill_s"), base_decode_s=res.pop("base_decode_s"))
    for label, tau in (("routed", 0.0), ("unrouted", 1.0)):
        layer.memory.tau = tau

        def prefill() -> None:
            with routed(layer, prompt_mask):
                layer(prefill_a)

        hf[f"{label}_prefill_s"] = timed(prefill, device, repeats)
        with routed(layer, prompt_mask):
            layer(prefill_a)  # decide the routing once, as a request's prefill does
            hf[f"{label}_decode_s"] = timed(lambda: layer(decode_a), device, repeats)
        for phase in ("prefill", "decode"):
            hf[f"{label}_{phase}_ratio"] = round(hf[f"{label}_{phase}_s"] / hf[f"base_{phase}_s"], 3)
    res["hf"] = hf
    res["serving"] = bench_serving(layer, batch, tokens, repeats, device)
    log.info("%s %s: hf %s | serving %s", name, dtype_name,
             {k: v for k, v in res["hf"].items() if k.endswith("ratio")},
             {k: v for k, v in res["serving"].items() if k.endswith("ratio")})
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                   help="default: float32 on CPU, float32 and bfloat16 on CUDA")
    p.add_argument("--batch", type=int, default=32, help="rows (requests) per batch")
    p.add_argument("--tokens", type=int, default=64, help="prompt tokens per row at prefill")
    p.add_argument("--masks", type=int, default=10_000, help="edits stored in the index")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench_memory_op.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    results = [bench_shape(s, dt, args.batch, args.tokens, args.masks, args.repeats, device)
               for s in args.shapes for dt in dtypes]
    out = dict(device=str(device), device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__, threads=args.threads, cpu_count=os.cpu_count(), results=results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, args.out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
