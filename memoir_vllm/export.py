"""`memoir export`: an edited model as a Hugging Face directory that plain transformers and lm-eval load.

    memoir export --snapshot STORE --out DIR
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks ...

DIR holds the base model's config (plus an `auto_map` naming the custom class), its weights and tokenizer
(safetensors only), the snapshot version under DIR/memoir, and `modeling_memoir.py`: a subclass of the base
architecture's class that attaches the memory when loaded and routes every new sequence (a forward with an
empty cache) per batch row from its own tokens, left or right padding alike, by the snapshot's rule.
Decode steps of `generate()` keep their row's decision. The routing itself is memoir's (this module and
`ResidualMemory`), so loading DIR needs the memoir package installed; the modeling file only wires it in.

The `architectures` entry stays the base model's, so vLLM serves DIR as the base model and memoir's vLLM
plugin routes it with `MEMOIR_SNAPSHOT=DIR/memoir`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

from .hf import MemoirLayer, attach, detach
from .inference import answer_processors
from .memory import candidate_rows
from .models import config_identity
from .snapshot import LATEST, check_model, load_snapshot, resolve_version

log = logging.getLogger(__name__)

EXPORT_KEY = "memoir_export"  # config.json entry: {"snapshot": "memoir", "version": "v000001", "n_edits": N}
MODELING = "modeling_memoir.py"
CLASS = "MemoirForCausalLM"

_MODELING_TEMPLATE = '''"""An edited {base} written by `memoir export` (memoir_vllm/export.py): the base model plus memoir's
residual memory at {module}, routed per sequence. Needs the memoir package (pip install memoir-vllm)."""
from transformers import {base} as _Base


class {cls}(_Base):
    """{base} with the memory in ./memoir attached at load; each new sequence is routed from its own tokens."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        from memoir_vllm.export import attach_exported

        attach_exported(model, pretrained_model_name_or_path)
        return model

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        router = getattr(self, "memoir_router", None)
        if router is not None:
            router.before_forward(input_ids, attention_mask, past_key_values)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                               **kwargs)

    def generate(self, *args, **kwargs):
        router = getattr(self, "memoir_router", None)
        return super().generate(*args, **(router.generate_kwargs(args, kwargs) if router is not None else kwargs))
'''


class ExportRouter:
    """Sets a MemoirLayer's routing from the token ids of each new sequence (what `generate` and lm-eval send).

    A forward with an empty cache starts new sequences: each batch row routes from its own non-padding tokens
    (the memory's routing span of them: the last user message in a chat rendering), its subject-rule
    candidates read from that span's decoded text, as the vLLM router does. A forward with a cache continues
    the sequences and keeps their decisions.
    """

    def __init__(self, layer: MemoirLayer, tok) -> None:
        self.layer, self.tok = layer, tok

    def before_forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                       past_key_values: Any) -> None:
        if input_ids is None:  # inputs_embeds only: no tokens to route from, so the base model answers
            self.layer.prompt_mask, self.layer.candidates, self.layer.routing = None, None, None
            return
        if not _is_fresh(past_key_values):
            return
        attn = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        memory = self.layer.memory
        rmask = torch.zeros(input_ids.shape, dtype=torch.bool)
        texts = []
        for i in range(input_ids.shape[0]):
            pos = attn[i].nonzero().flatten().cpu()
            ids = input_ids[i, pos].tolist()
            start, end = memory.routing_span(ids)
            rmask[i, pos[start:end]] = True
            texts.append(self.tok.decode(ids[start:end], skip_special_tokens=True))
        cands = candidate_rows(memory.candidate_scores(texts)) if memory.rule == "subject" else None
        device = input_ids.device
        self.layer.prompt_mask = rmask.to(device)
        self.layer.candidates = cands.to(memory.perm.device) if cands is not None else None
        self.layer.routing = None  # decided at this forward, from the rows' routing tokens

    def generate_kwargs(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """generate()'s keyword arguments plus the memory's answer processors (a routed answer's first token is
        no end token: config.nonempty_answers), as `memoir ask` generates."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        ours = answer_processors(self.layer, ids.shape[1]) if isinstance(ids, torch.Tensor) else []
        if not ours:
            return kwargs
        procs = LogitsProcessorList(kwargs.get("logits_processor") or [])
        procs.extend(ours)
        return {**kwargs, "logits_processor": procs}


def _is_fresh(past: Any) -> bool:
    """True when a forward starts new sequences (no cache, or an empty one)."""
    if past is None:
        return True
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length()) == 0
    return len(past) == 0 or past[0][0].shape[-2] == 0  # legacy tuple cache


def attach_exported(model, directory: str | os.PathLike) -> ExportRouter:
    """Attach the memory of an exported directory to its loaded model and route every forward (modeling_memoir)."""
    from transformers import AutoTokenizer

    d = Path(directory)
    config = model.config.to_dict()
    snap = load_snapshot(d / (config.get(EXPORT_KEY) or {}).get("snapshot", "memoir"))
    base_config = {k: v for k, v in config.items() if k not in (EXPORT_KEY, "auto_map")}
    module = snap.manifest["module"]
    check_model(snap.manifest, config_identity(base_config, snap.manifest["model"].get("name")), module)
    memory = snap.state.memory
    memory.subjects.build()
    layer = attach(model, memory, snap.config.layer)  # on the layer's device
    router = ExportRouter(layer, AutoTokenizer.from_pretrained(d))
    model.memoir_router = router
    log.info("memoir: %s routes %d edits (%s rule) at %s", d, memory.n_edits, memory.rule, module)
    return router


def export(snapshot: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike | None = None,
           overwrite: bool = False) -> Path:
    """Write snapshot (a store's LATEST or a version) and its model as a Hugging Face directory `out`.

    model: the snapshot's model directory (default: the path it records). The directory is written beside
    `out` and renamed into place at the end, so an interrupted export leaves no half-written `out`.
    """
    from .session import Memoir

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
    version = resolve_version(snapshot)
    m = Memoir.from_snapshot(version, model=model)
    hf_model, tok = m.model, m.tok
    base = type(hf_model).__name__
    if not base.endswith("ForCausalLM"):
        raise ValueError(f"memoir export writes causal LMs; the snapshot's model is a {base}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        detach(hf_model)  # the base weights only: the memory travels as the snapshot
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.copytree(version, tmp / "memoir" / version.name)
        (tmp / "memoir" / LATEST).write_text(version.name + "\n")
        config = json.loads((tmp / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": f"{Path(MODELING).stem}.{CLASS}"}
        config[EXPORT_KEY] = {"snapshot": "memoir", "version": version.name, "n_edits": m.memory.n_edits}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / MODELING).write_text(_MODELING_TEMPLATE.format(base=base, cls=CLASS, module=m.module))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%d edits) on %s to %s", version, m.memory.n_edits, base, out)
    return out


__all__ = ["export", "attach_exported", "ExportRouter"]
