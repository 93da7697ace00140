"""The evaluation subcommands of `memoir`: eval (more are added by calibrate/retention/lm-eval modules).

Each maps its flags onto one library function and holds no logic.
"""
from __future__ import annotations

import argparse
import json

from memoir_vllm.cli_args import add_device, add_settings, set_device, set_threads, settings


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--T {text!r}: give comma-separated integers, e.g. 1,10,100") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--T {text!r}: every T must be a positive integer")
    return vals


def cmd_eval(args: argparse.Namespace) -> int:
    from memoir_vllm.edit_job import read_background

    from .report import markdown_table
    from .runner import run_eval

    set_threads(args.threads)
    set_device(args.device)
    # the paper's protocol edits each record once and scores every edit afterwards: no supersede unless asked
    results = run_eval(
        model=args.model, data=args.data, Ts=args.T, out=args.out, limit=args.limit, chunks=args.chunks,
        settings={"supersede": False, **settings(args)}, generative=not args.no_generative, batch_size=args.batch_size,
        background=read_background(args.background), resume=args.resume, checkpoint_every=args.checkpoint_every,
        train=args.train,
    )
    print(markdown_table(results))
    print(f"results: {args.out}/results.json")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="the paper's sequential-editing protocol on ZsRE / hallucination / temporal",
                       description="Pre-edit outputs first; then for each T the first 1000 records are cut into chunks "
                       "of T, each edited from a fresh memory and evaluated after its T edits; metrics are averaged "
                       "over chunks. The largest T runs first and smaller T whose first chunk is its prefix are evaluated on the way "
                       "(T=100's first chunk is the first 100 edits of T=1000's). Writes results.json, results.md, "
                       "records_T*.jsonl and plots to --out.")
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M) or a local HF model directory")
    p.add_argument("--data", required=True, help="zsre | hallucination | temporal | a JSON/JSONL/Parquet file")
    p.add_argument("--T", type=_ints, default=[1, 10, 100], help="comma-separated edits per chunk (default 1,10,100)")
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--chunks", type=int, help="run at most N chunks per T (reported as run/total)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-generative", action="store_true", help="skip greedy-decoding metrics")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--background", help="text file of unrelated prompts for the background mean")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: finished chunks are kept, an interrupted chunk continues from "
                   "its last saved state")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="save each chunk's memory every N edits under --out/state (default 50)")
    p.add_argument("--train", metavar="SLICES",
                   help="train only these positions of each chunk, e.g. 0:100,900:1000 (the oldest and newest 100 of "
                   "T=1000); the others are written for routing alone (mask and subject, no step) and left out of the "
                   "metrics; locality is then a lower bound (memoir_eval/sampled.py). Default: every edit")
    p.add_argument("--threads", type=int)
    add_device(p)
    add_settings(p)
    p.set_defaults(func=cmd_eval)


# -- routing only ------------------------------------------------------------------------------------


def cmd_eval_routing(args: argparse.Namespace) -> int:
    from memoir_vllm.session import Memoir

    from .report import write_json
    from .routing_only import evaluate_routing, load_json_records, markdown

    set_threads(args.threads)
    records = load_json_records(args.data)
    if not 0 < args.n < len(records):
        raise ValueError(f"--n {args.n}: give 1..{len(records) - 1} (the file has {len(records)} records; the rest "
                         "are the neighbours)")
    given = settings(args)
    # the prompts' masks are TopHash masks of the shared-columns k (what the mask rule and the overlap stage read)
    m = Memoir.create(args.model, **{**given, "columns": given.get("columns") or "shared"})
    results = evaluate_routing(m, records, args.n, subjects=args.subjects, check_taus=args.check_taus)
    print(markdown(results))
    if args.out:
        write_json(args.out, results)
        print(f"results: {args.out}")
    return 0


def add_eval_routing(sub) -> None:
    from . import routing_only

    p = sub.add_parser("eval-routing", help="routing only (no training): paraphrases, neighbours and NQ under the "
                       "mask and subject rules", description=routing_only.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M) or a local HF model directory")
    p.add_argument("--data", default="zsre", help="zsre or a JSON/JSONL file with src|prompt, rephrase, loc, subject")
    p.add_argument("--n", type=int, default=300, help="records stored as edits (the rest are neighbours)")
    p.add_argument("--subjects", choices=("given", "auto"), default="given",
                   help="the file's own subject field (given) or memoir's automatic subject (auto)")
    p.add_argument("--check-taus", type=lambda s: tuple(float(x) for x in s.split(",")),
                   help="comma-separated encoder-check thresholds to compare (default: the setting's check_tau)")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--threads", type=int)
    add_settings(p)
    p.set_defaults(func=cmd_eval_routing)


def cmd_make_edits(args: argparse.Namespace) -> int:
    from .synthetic import write_edits

    path = write_edits(args.out, args.n, args.seed)
    print(f"{args.n} synthetic facts (seed {args.seed}): {path}")
    return 0


def add_make_edits(sub) -> None:
    from . import synthetic

    p = sub.add_parser("make-edits", help="write N seeded fictitious facts with paraphrases and neighbours (synthetic)",
                       description=synthetic.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, required=True, help="number of facts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.set_defaults(func=cmd_make_edits)


EVAL_SUBCOMMANDS = [add_eval, add_eval_routing, add_make_edits]


# -- lm-eval ---------------------------------------------------------------------------------------


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from .lm_eval_entry import run_lm_eval

    set_threads(args.threads)
    run_lm_eval(args.lm_eval_args)
    return 0


def add_lm_eval(sub) -> None:
    p = sub.add_parser("lm-eval", help="run lm-eval with the memoir model type and the memoir task pack registered",
                       description="Passes every argument to lm-eval's CLI after registering the `memoir` model type "
                       "and adding the packaged task pack (memoir_eval/tasks) to --include_path. Defaults: `run`, --model memoir. "
                       "Example: memoir lm-eval --model_args snapshot=SNAP --tasks memoir_zsre --limit 10",
                       prefix_chars="+")  # so that lm-eval's own --flags pass through untouched
    p.add_argument("++threads", type=int, help="torch threads")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval arguments")
    p.set_defaults(func=cmd_lm_eval)


EVAL_SUBCOMMANDS.append(add_lm_eval)


def cmd_tasks_path(args: argparse.Namespace) -> int:
    from .lm_eval_entry import TASKS_DIR

    print(TASKS_DIR)
    return 0


def add_tasks_path(sub) -> None:
    p = sub.add_parser("tasks-path", help="print the directory of memoir's lm-eval task pack (for --include_path)",
                       description="lm_eval --model vllm --model_args pretrained=M --tasks memoir_zsre_greedy "
                       "--include_path $(memoir tasks-path)")
    p.set_defaults(func=cmd_tasks_path)


EVAL_SUBCOMMANDS.append(add_tasks_path)


# -- calibrate -------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_calibrate(args: argparse.Namespace) -> int:
    from memoir_vllm.session import Memoir

    from .calibrate import base_model, calibrate
    from .report import write_json

    set_threads(args.threads)
    if args.snapshot:
        m = Memoir.from_snapshot(args.snapshot, model=None if args.model == "default" else args.model)
    else:
        m = base_model(args.model, **settings(args))
    result = calibrate(m, layers=_int_list(args.sweep_layers) if args.sweep_layers else None,
                       ks=_int_list(args.sweep_k) if args.sweep_k else None,
                       feats=args.sweep_features.split(",") if args.sweep_features else None, max_false=args.max_false,
                       max_per_source=args.max_per_source)
    if args.snapshot and args.write:
        m.set_tau(result["chosen"]["tau"])
        result["snapshot"] = str(m.save(_snapshot_root(args.snapshot)))
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result if args.full else {"chosen": result["chosen"], "n": result["n"],
                                                "snapshot": result.get("snapshot")}, indent=2))
    return 0


def _snapshot_root(path: str):
    from memoir_vllm.snapshot import resolve_version

    return resolve_version(path).parent


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="pick tau from overlap distributions on data outside the eval stream",
                       description="Routing only (no training): best overlaps of paraphrases (ZsRE records >= 1000, "
                       "temporal-train) and unrelated prompts against the calibration edits' masks; tau = the "
                       "(1 - max_false) quantile of unrelated best overlaps + 1/k. Prints JSON.")
    p.add_argument("--model", default="default", help="'default' or a local HF model directory")
    p.add_argument("--snapshot", help="calibrate this snapshot's setting (its model, layer, k, feature)")
    p.add_argument("--write", action="store_true", help="with --snapshot: save a new version with the chosen tau")
    p.add_argument("--max-false", type=float, default=0.01, help="largest fraction of unrelated prompts routed")
    p.add_argument("--sweep-layers", help="comma-separated layers to compare, e.g. 20,23,25,27")
    p.add_argument("--sweep-k", help="comma-separated k values to compare, e.g. 220,439,768")
    p.add_argument("--sweep-features", help="comma-separated features: mean_decentered,mean,last,zscore")
    p.add_argument("--max-per-source", type=int, help="at most N records from each calibration file")
    p.add_argument("--out", help="write the full JSON here")
    p.add_argument("--full", action="store_true", help="print the sweep too")
    p.add_argument("--threads", type=int)
    add_settings(p)
    p.set_defaults(func=cmd_calibrate)


# -- retention -------------------------------------------------------------------------------------


def cmd_retention(args: argparse.Namespace) -> int:
    from memoir_vllm.session import Memoir

    from .report import write_json
    from .retention import retention

    set_threads(args.threads)
    m = Memoir.from_snapshot(args.snapshot, model=args.model)
    result = retention(m, limit=args.limit, batch_size=args.batch_size)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


def add_retention(sub) -> None:
    p = sub.add_parser("retention", help="offline capability retention: NQ accuracy and unrelated-text PPL, memory on vs off")
    p.add_argument("--snapshot", required=True, help="snapshot store or version")
    p.add_argument("--model", help="model directory (default: the snapshot's)")
    p.add_argument("--limit", type=int, help="first N items of each set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_retention)


EVAL_SUBCOMMANDS += [add_calibrate, add_retention]
