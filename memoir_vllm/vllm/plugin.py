"""vLLM plugin entry point (`vllm.general_plugins: memoir = memoir_vllm.vllm.plugin:register`).

register() runs in every vLLM process (API server, engine core, workers). It only installs
pass-through patches (shim.py), once; they act only for an engine with a snapshot configured:

    MEMOIR_SNAPSHOT=/path/to/snapshot                                   (environment), or
    LLM(..., hf_overrides={"memoir_snapshot": "/path/to/snapshot"})

What a served request gets (the semantics, precisely):
- Routing is decided once per request from the mean of the layer-L down_proj input over ALL its
  prompt tokens, minus the background; TopHash; best active match; routed iff ratio >= tau.
  The decision is kept for every generated token, across preemption, until the request finishes.
- Whole prompt in one step (the usual case: prompt <= max_num_batched_tokens): exact reference
  semantics. The decision is made inside that forward, at the edited layer, before its output
  is used, so the memory term reaches every prompt token and every generated token.
- Chunked prefill (prompt split over steps): the decision still uses all prompt tokens (their
  activations are summed per request across chunks), but tokens of the earlier chunks already ran
  through the base layer; the memory reaches the final prompt chunk and all generated tokens.
  This is a documented variant, not the reference; raise max_num_batched_tokens to avoid it.
- Prefix caching: the plugin salts each request's block hashes with its whole prompt (and its
  opt-out flag), so cached KV is shared only between identical prompts, whose decision is the same
  and is remembered per prompt. A request that starts from cached blocks reuses that decision.
  (Shared system prompts are therefore not shared across different prompts: their KV at layers
  after L depends on the routing.)
- A store (MEMOIR_SNAPSHOT=STORE) is followed: when its LATEST moves, the new version is loaded in a
  thread and swapped in between steps (follow.py); requests in flight finish with the memory they were
  routed with, new ones use the new version, whose number is in the prefix-cache salt. A version
  directory is pinned.
- Unmatched and opted-out requests (SamplingParams.extra_args={"memoir": False}; over HTTP
  `vllm_xargs`) get exactly the base layer output (torch.where, no added zeros).
- Model Runner V2 is not supported: with a snapshot, register() sets VLLM_USE_V2_MODEL_RUNNER=0
  unless the user set it, and a V2 runner refuses to load.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_REGISTERED = False
_SALT_ACTIVE = False  # set in an engine core whose scheduler was built with a snapshot configured
_SALT_PATH = ""  # that snapshot (a followed store or a pinned version)
_SALT_IS_STORE = False  # whether _SALT_PATH is a store (versions under it) rather than one version
VERSION_ARG = "memoir_version"  # the version a request is served with, set by the engine core (extra_args)
_HASH_CACHE: dict[str, str] = {}


def register() -> None:
    """Install memoir's vLLM patches (idempotent). Nothing changes for an engine without a snapshot."""
    global _REGISTERED
    if _REGISTERED:
        return
    from . import shim

    snapshot = os.environ.get(shim.SNAPSHOT_ENV)
    try:
        shim.check_hook_points()
    except shim.MemoirVllmError:
        if snapshot:
            raise  # asked to serve a memory: never serve silently without it
        log.debug("memoir plugin inactive: vLLM is not the pinned version and no snapshot is configured")
        return
    if snapshot:
        _force_v1_runner()
    shim.patch_load_model(_after_load)
    shim.patch_v2_runner_refusal(_refuse_v2)
    shim.patch_prepare_inputs(_after_prepare)
    shim.patch_scheduler_init(_scheduler_seen)
    shim.patch_request_salt(_salt)
    shim.patch_block_extra_keys(split_salt)
    shim.patch_config_hash(_config_salt)
    _log_to_stderr()
    _REGISTERED = True


def _log_to_stderr() -> None:
    """Show memoir's INFO lines (the attachment, each request's candidates) in the server's output. vLLM's
    processes configure only vLLM's own logger, so without a handler of its own memoir's package would
    print warnings only (Python's last-resort handler)."""
    pkg = logging.getLogger("memoir_vllm")
    if pkg.handlers or logging.getLogger().handlers:
        return  # the application configured logging (memoir's CLI, a test runner): keep it
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s memoir [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False


def _force_v1_runner() -> None:
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value is not None and value.strip().lower() in ("1", "true"):
        raise RuntimeError("memoir serves with vLLM's V1 model runner only; unset VLLM_USE_V2_MODEL_RUNNER or set it to 0")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def _refuse_v2(runner: Any) -> None:
    from . import shim

    if shim.snapshot_of(shim.runner_config(runner)):
        raise RuntimeError("memoir: vLLM chose Model Runner V2, which memoir does not hook; "
                           "set VLLM_USE_V2_MODEL_RUNNER=0 (memoir serve and MEMOIR_SNAPSHOT do this for you)")


# -- engine core: prefix-cache salt ----------------------------------------------------------------


def _scheduler_seen(vllm_config: Any) -> None:
    from . import shim

    from ..snapshot import LATEST

    global _SALT_ACTIVE, _SALT_PATH, _SALT_IS_STORE
    path = shim.snapshot_of(vllm_config)
    _SALT_ACTIVE, _SALT_PATH = path is not None, str(path or "")
    _SALT_IS_STORE = path is not None and (Path(path) / LATEST).is_file()  # a store (its versions) or one version


def _salt(request: Any) -> str | None:
    """cache_salt of a request: the snapshot version it will be served with and its prompt identity (plus any
    user salt) when memoir is active. The version (a followed store's LATEST when the request arrives) also
    goes to the workers in the request's extra_args, and a worker swaps to it before admitting the request,
    so blocks hashed with a version hold KV computed with that version.

    The salt also names the request's first token that can get the memory term (memory_from: its routing span
    under memory_start "content", else 0); the prefix cache keys only the blocks that end past it with memoir's
    part (split_salt, shim.patch_block_extra_keys), so a system prompt before the content is shared."""
    if not _SALT_ACTIVE:
        return None
    from . import shim
    from .follow import version_of

    ids, params, user_salt = shim.engine_request_parts(request)
    if ids is None:
        return None
    version = version_of(_SALT_PATH)
    if params is not None:
        params.extra_args = {**(params.extra_args or {}), VERSION_ARG: version}
    key = shim.request_key(ids, shim.opted_out(params)).hex()
    first_on = _memory_from(ids, version)
    return f"{SALT_PREFIX}{first_on}:v{version}:{key}" + (f":{user_salt}" if user_salt else "")


SALT_PREFIX = "memoir:"


def split_salt(salt: str) -> tuple[int, str, str | None] | None:
    """A cache_salt written by _salt -> (first token with the memory term, memoir's part, the user's salt);
    None for any other salt."""
    if not salt.startswith(SALT_PREFIX):
        return None
    first_on, version, key, *user = salt[len(SALT_PREFIX):].split(":", 3)
    return int(first_on), f"{version}:{key}", user[0] if user else None


_GATES: dict[str, tuple[Any, str]] = {}  # version directory -> (its chat marks, its memory_start)


def _memory_from(ids: list[int], version: int) -> int:
    """memory.memory_from of a prompt under the served version's settings, read from its manifest once."""
    from ..chat import ChatMarks
    from ..config import MemoirConfig
    from ..memory import memory_from
    from ..snapshot import MANIFEST, version_name

    d = Path(_SALT_PATH) / version_name(version) if _SALT_IS_STORE else Path(_SALT_PATH)
    if str(d) not in _GATES:
        try:
            m = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            return 0  # unreadable now: salt every block (what the workers do is refused or loaded later)
        _GATES[str(d)] = (ChatMarks.from_dict(m.get("chat_marks")), MemoirConfig.from_dict(m["config"]).memory_start)
    return memory_from(ids, *_GATES[str(d)])


# -- compile cache salt ----------------------------------------------------------------------------


def snapshot_identity(path: str) -> str:
    """A short identity of a snapshot version: its manifest's version and file checksums."""
    from ..snapshot import MANIFEST, resolve_version

    if path not in _HASH_CACHE:
        d = resolve_version(path)
        m = json.loads((d / MANIFEST).read_text())
        _HASH_CACHE[path] = json.dumps({"version": m.get("version"), "files": m.get("files"), "tau": m.get("tau"),
                                        "module": m.get("module")}, sort_keys=True)
    return _HASH_CACHE[path]


def _config_salt(vllm_config: Any) -> str | None:
    from . import shim

    path = shim.snapshot_of(vllm_config)
    if path is None:
        return None
    try:
        return snapshot_identity(path)
    except Exception as e:  # a missing snapshot fails clearly at load; the hash must not crash first
        return f"unreadable:{path}:{e}"


# -- worker: attach and route ----------------------------------------------------------------------


def _after_load(runner: Any) -> None:
    from . import shim

    path = shim.snapshot_of(shim.runner_config(runner))
    if path is None:
        return
    attach_snapshot(runner, path)


def _loaded_for(runner: Any, path: str):
    """The snapshot at path, checked against the model this runner serves."""
    from ..snapshot import check_model, load_snapshot
    from . import shim

    snap = load_snapshot(path)
    check_model(snap.manifest, served_model_identity(shim.runner_config(runner)), snap.manifest["module"])
    return snap


def _serving_memory(runner: Any, path: str, like=None):
    """(snapshot, its memory ready to serve on this runner: device, dtype, encoder vectors). `like`: the
    attached memory, which a replacement must match (module, dimensions)."""
    from . import attachment, shim

    snap = _loaded_for(runner, path)
    if like is not None:
        if snap.manifest["module"] != like.name:
            raise ValueError(f"memoir: the new snapshot edits {snap.manifest['module']}, the attached one {like.name}")
        if (snap.memory.d_model, snap.memory.d_inner) != (like.memory.d_model, like.memory.d_inner):
            raise ValueError("memoir: the new snapshot has other dimensions than the attached one")
    dtype, device = shim.runner_dtype_device(runner)
    memory = attachment.for_serving(snap.memory, device, dtype)
    if memory.rule == "subject":
        memory.subjects.build()  # the automaton over every subject: here, not at the first request's admission
    if memory.rule == "subject" and memory.subject_check == "encoder":
        from ..routing.encoder import sentence_encoder

        sentence_encoder()  # loaded once per worker, not at the first request that names a subject
        memory.fill_vectors()
    return snap, memory


def _swap(att: Any, path: str, memory: Any) -> None:
    """Serve `memory` (version `path`) from the next step: Router.swap and the log line."""
    before = att.snapshot
    att.router.swap(memory)
    att.router.version = os.path.basename(str(path))
    att.snapshot = str(path)
    log.info("memoir: now serving %s (was %s): %d edits, %d active", path, before, memory.n_edits,
             memory.index.n_active)


def attach_snapshot(runner: Any, path: str) -> None:
    """Load a snapshot, check it against the served model, and wrap its layer's down_proj."""
    from ..hf import get_module
    from . import attachment, shim
    from .follow import StoreFollower, follows
    from .layer import MemoirDownProj
    from .routing import Router

    if shim.cuda_graphs_enabled(runner):
        raise RuntimeError("memoir on GPU runs without CUDA graphs for now (the per-step routing state would be "
                           "frozen into captured graphs): pass enforce_eager=True / --enforce-eager")
    snap, memory = _serving_memory(runner, path)
    module_path = snap.manifest["module"]
    parent_path, child = module_path.rsplit(".", 1)
    try:
        parent = get_module(shim.runner_model(runner), parent_path)
        current = getattr(parent, child)
    except (AttributeError, IndexError) as e:
        raise RuntimeError(f"memoir: the served model has no module {module_path} ({e}); "
                           "is the snapshot made for this architecture?") from e
    base = current.base_layer if isinstance(current, MemoirDownProj) else current
    shape = shim.partition_shape(base)
    if shape != (snap.memory.d_model, snap.memory.d_inner):
        raise RuntimeError(f"memoir: {module_path} maps {shape[1]} -> {shape[0]} features per partition, the snapshot "
                           f"expects {snap.memory.d_inner} -> {snap.memory.d_model}; tensor parallelism is not "
                           "supported (use tensor_parallel_size=1)")
    dtype, device = shim.runner_dtype_device(runner)
    router = Router(memory, *shim.runner_limits(runner), dtype, device,
                    text_of=shim.detokenizer(runner) if memory.rule == "subject" else None)
    wrapped = MemoirDownProj(base, module_path)
    setattr(parent, child, wrapped)
    att = attachment.Attachment(module_path, router, parent, child, wrapped, base, str(snap.path),
                                attachment.runner_ref(runner))
    router.version = snap.path.name
    if follows(path):
        att.follower = StoreFollower(path, str(snap.path), lambda v: _serving_memory(runner, v, att)[1])
        log.info("memoir: following %s (a new LATEST is loaded and served without a restart)", path)
    attachment.register(att)
    _block_empty_answers(shim.runner_model(runner), module_path)
    log.info("memoir: %s attached at %s (%d edits, %d active, %s rule, threshold %.3f)", snap.path, module_path,
             memory.n_edits, memory.index.n_active, memory.rule, memory.threshold)


def _block_empty_answers(model: Any, name: str) -> None:
    """Wrap the model's compute_logits (once) so the sampled logits go through Router.nonempty of the
    attachment `name`: a routed request's first token is no end token (config.nonempty_answers)."""
    from . import attachment

    if getattr(model.compute_logits, "memoir_wrapped", False):
        return
    inner = model.compute_logits

    def compute_logits(hidden_states, *args, **kwargs):
        logits = inner(hidden_states, *args, **kwargs)
        att = attachment.by_name(name)
        if logits is None or att is None or not att.enabled:
            return logits
        return att.router.nonempty(logits)

    compute_logits.memoir_wrapped = True
    model.compute_logits = compute_logits


def served_model_identity(vllm_config: Any) -> dict:
    """model identity (models.config_identity) of the served model: what a snapshot is bound to."""
    from ..models import config_identity
    from . import shim

    return config_identity(shim.hf_config_dict(vllm_config), shim.served_model_path(vllm_config))


def _after_prepare(runner: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> None:
    from . import attachment, shim

    att = attachment.of_runner(runner)
    if att is None or not att.enabled:
        return
    if att.follower is not None:
        # before admitting this step's new requests: the version the engine core salted them with, at least
        wanted = max([int((p.extra_args or {}).get(VERSION_ARG, 0)) for p in shim.new_request_params(scheduler_output)
                      if p is not None] or [0])
        ready = att.follower.take(wanted)
        if ready is not None:
            _swap(att, ready.path, ready.memory)
    router = att.router
    view = shim.batch_view(runner, num_scheduled_tokens, router.keys, router.admit)
    router.prepare(view.req_ids, view.num_computed, view.num_scheduled, view.num_prompt, view.opted_out,
                   view.prompt_keys, shim.live_request_ids(runner))


# -- runtime updates through collective_rpc ---------------------------------------------------------


class MemoirWorkerExtension:
    """Worker methods for `llm.collective_rpc("memoir_...", args=...)`; pass
    `worker_extension_cls="memoir_vllm.vllm.plugin.MemoirWorkerExtension"` to the engine.

    After an update, cached routing decisions are forgotten; call `llm.reset_prefix_cache()` too,
    so that no KV computed under the old memory is reused.
    """

    def _memoir_attachment(self, enabled: bool = True):
        from . import attachment

        att = attachment.of_runner(self.model_runner)
        if att is None:
            raise RuntimeError("memoir: this engine has no snapshot attached (set MEMOIR_SNAPSHOT or hf_overrides)")
        if enabled and not att.enabled:
            raise RuntimeError("memoir: the memory is switched off; call memoir_enable(True) first")
        return att

    def memoir_enable(self, enabled: bool) -> bool:
        """Switch the memory off (no routing runs, every token gets the base output) or on again.
        Returns the new state. Eager engines get vLLM's own down_proj back while off (plain vLLM's
        computation and cost); compiled ones keep the memoir op in their graph, where it returns at
        once (a compiled graph must not see its modules swapped). Switch while the engine is idle: a
        request that runs across a switch gets the memory only for its steps while it is on.
        Call `llm.reset_prefix_cache()` after switching, so no KV computed in the other state is reused."""
        from . import shim

        att = self._memoir_attachment(enabled=False)
        if not shim.model_is_compiled(self.model_runner):
            setattr(att.parent, att.child, att.wrapped if enabled else att.base)
        att.enabled = bool(enabled)
        return att.enabled

    def memoir_info(self) -> dict:
        """Snapshot path, edit counts and tau of the attached memory."""
        att = self._memoir_attachment()
        r = att.router
        follow = att.follower.counts if att.follower is not None else {}
        from ..snapshot import version_number

        return {"snapshot": att.snapshot, "version": version_number(os.path.basename(att.snapshot)),
                "n_edits": r.memory.n_edits, "n_active": r.memory.index.n_active,
                "tau": r.memory.threshold, "routing": r.memory.rule, "live_requests": len(r.states),
                "following": att.follower is not None, **r.counts, **follow}

    def memoir_set_tau(self, tau: float) -> float:
        r = self._memoir_attachment().router
        r.memory.set_threshold(tau)
        r.clear_decisions()
        return r.memory.threshold

    def memoir_set_active(self, edit_id: int, active: bool) -> int:
        r = self._memoir_attachment().router
        r.memory.index.set_active(int(edit_id), bool(active))
        r.clear_decisions()
        return r.memory.index.n_active

    def memoir_load_snapshot(self, path: str) -> dict:
        """Replace the attached memory by another snapshot for the same model and layer from the next step
        (requests in flight finish with the memory they were routed with; Router.swap). An eager engine
        started without a snapshot attaches this one now; a compiled one cannot (its graph has no memoir op)."""
        from . import attachment, shim

        if attachment.of_runner(self.model_runner) is None:
            if shim.model_is_compiled(self.model_runner):
                raise RuntimeError("memoir: this compiled engine was started without a snapshot, so its graph has "
                                   "no memoir op; start it with one (MEMOIR_SNAPSHOT or hf_overrides)")
            attach_snapshot(self.model_runner, path)
            return self.memoir_info()
        att = self._memoir_attachment()
        snap, memory = _serving_memory(self.model_runner, path, att)
        _swap(att, str(snap.path), memory)
        return self.memoir_info()

    def memoir_reload(self, path: str | None = None) -> dict:
        """Load now (POST /memoir/reload): `path` (a store, then followed; a version, then pinned), or with None the
        followed store's LATEST. Same swap as memoir_load_snapshot."""
        from .follow import StoreFollower, follows

        att = self._memoir_attachment()
        if path is None:
            if att.follower is None:
                raise ValueError("this server serves a pinned version: name the snapshot to load "
                                 '({"snapshot": "/path/to/store"})')
            path = str(att.follower.store)
        self.memoir_load_snapshot(path)
        if att.follower is not None:
            att.follower.stop()
            att.follower = None
        if follows(path):
            from . import shim

            runner = self.model_runner
            salted = os.path.realpath(path) == os.path.realpath(str(shim.snapshot_of(shim.runner_config(runner))))
            att.follower = StoreFollower(path, att.snapshot, lambda v: _serving_memory(runner, v, att)[1],
                                         salted=salted)  # another store's versions are not the salt's
        return self.memoir_info()
