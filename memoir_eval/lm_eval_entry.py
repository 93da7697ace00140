"""`memoir lm-eval`: lm-eval's CLI with the memoir model type registered and the task pack on the path.

lm-eval 0.4.13 discovers neither external models (no entry-point scan) nor external tasks, so this
entry registers `memoir` (idempotently) and appends the packaged task pack (memoir_eval/tasks) to --include_path.
"""
from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the task pack ships with the package
SUBCOMMANDS = ("run", "ls", "list", "validate")


def register() -> None:
    """Register the `memoir` model type with lm-eval (idempotent)."""
    from lm_eval.api.registry import model_registry

    if len(model_registry) == 0:  # let lm-eval register its own models first
        import lm_eval.models  # noqa: F401
    import memoir_eval.lm_eval_model  # noqa: F401  (@register_model("memoir"))


def lm_eval_argv(argv: list[str]) -> list[str]:
    """lm-eval arguments with the defaults: the `run` subcommand, --model memoir, tasks/ on --include_path."""
    argv = list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        argv.insert(0, "run")
    if argv[0] == "run" and "--model" not in argv:
        argv += ["--model", "memoir"]
    if "--include_path" in argv:
        i = argv.index("--include_path") + 1
        if TASKS_DIR.resolve() not in {Path(p).resolve() for p in argv[i].split(":") if p}:
            argv[i] = f"{argv[i]}:{TASKS_DIR}"
    elif argv[0] != "run" or "--tasks" in argv or "-t" in argv:
        argv += ["--include_path", str(TASKS_DIR)]
    return argv


def run_lm_eval(argv: list[str]) -> None:
    """Run lm-eval's CLI with argv (see lm_eval_argv for the defaults added)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    register()
    setup_logging()
    sys.argv = ["lm-eval", *lm_eval_argv(argv)]
    cli = HarnessCLI()
    cli.execute(cli.parse_args())
