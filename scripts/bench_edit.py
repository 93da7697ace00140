"""Seconds per edit on a model: the reference path (full forward each step) vs the fast path
(frozen prefix cached, only the blocks after the edited one run, logits only at target positions).

    python scripts/bench_edit.py --model default --n 5 --threads 2 --out runs/bench_edit.json

Both modes edit the same ZsRE records (outside the first-1000 evaluation stream) into fresh memories,
interleaved record by record so machine noise hits both alike; the loss trajectories are compared step
by step. Prints and saves JSON (speedup = reference seconds / fast seconds).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path

import torch

from memoir_vllm.config import default_config
from memoir_vllm.edits import load_edits
from memoir_vllm.editor import SequentialEditor, compute_background, generate_templates
from memoir_vllm.hf import attach, model_dims
from memoir_vllm.memory import empty_memory
from memoir_vllm.models import load_model
from memoir_vllm.session import builtin_background

log = logging.getLogger("bench_edit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/zsre/zsre_mend_edit.json"))
    ap.add_argument("--start", type=int, default=1000)
    ap.add_argument("--n", type=int, default=5, help="edits per mode")
    ap.add_argument("--n-iter", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default="runs/bench_edit.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device=args.device)
    n_layers, d_model, d_inner = model_dims(model)
    reqs = load_edits(args.data)[args.start : args.start + args.n]
    cfgs = {fast: default_config(model.config.model_type, n_layers, d_inner, fast=fast, n_iter=args.n_iter,
                                 stop_loss=-1.0).resolved(n_layers, d_inner) for fast in (False, True)}
    probe = empty_memory(d_model, d_inner, cfgs[True])
    background = compute_background(model, tok, attach(model, probe, cfgs[True].layer), builtin_background())
    templates = generate_templates(model, tok)
    seconds: dict[str, list[float]] = {"reference": [], "fast": []}
    max_dloss = 0.0
    for r in reqs:
        losses = {}
        for fast, name in ((False, "reference"), (True, "fast")):
            mem = empty_memory(d_model, d_inner, cfgs[fast])
            mem.background.copy_(background)
            res = SequentialEditor(model, tok, mem, cfgs[fast], templates).edit(r.prompt, r.target)
            seconds[name].append(res.seconds)
            losses[name] = res.losses
        max_dloss = max(max_dloss, max(abs(a - b) for a, b in zip(losses["reference"], losses["fast"])))
        log.info("%s: reference %.2fs fast %.2fs", r.prompt[:50], seconds["reference"][-1], seconds["fast"][-1])
    ref, fast = statistics.mean(seconds["reference"]), statistics.mean(seconds["fast"])
    out = {
        "model": args.model, "layer": cfgs[True].layer, "n_layers": n_layers, "k": cfgs[True].k, "edits": args.n,
        "steps_per_edit": args.n_iter, "rows_per_step": 1 + len(templates), "threads": args.threads,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": args.device,
        "reference_s_per_edit": round(ref, 3), "fast_s_per_edit": round(fast, 3), "speedup": round(ref / fast, 2),
        "max_abs_loss_diff": max_dloss, "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, args.out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
