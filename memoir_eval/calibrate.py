"""Calibrating the routing threshold tau (and comparing routing options) on data outside the eval stream.

Routing only, no training: masks depend only on the frozen model. The calibration set is
- stored edits:  ZsRE records >= 1000 (`src`), temporal-train `prompt`, hallucination-train `prompt`;
- paraphrases:   ZsRE >= 1000 `rephrase`, temporal-train `ood_rephrase` (each should match its own edit);
- unrelated:     the `loc` / `locality_prompt` of all three (should match nothing).

For each prompt: best overlap |M_q ∧ M_i| / k over all stored masks. tau is chosen as the
(1 - max_false) quantile of the unrelated prompts' best overlaps plus one mask entry (1/k), so at
most max_false of unrelated prompts get routed; the report says what fraction of paraphrases is
then routed to its own edit. A sweep over layer, k and feature shows the sensitivity.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from memoir_vllm.hf import down_proj_path, get_module
from memoir_vllm.session import builtin_background
from memoir_vllm.memory import ResidualMemory
from memoir_vllm.routing.tophash import Pooled, indices_to_mask, pool_prompt, tophash

from .data import STREAM_END, load_records

log = logging.getLogger(__name__)

FEATURES = ("mean_decentered", "mean", "last", "zscore")  # zscore: experimental, calibration-only


@dataclass
class CalibrationSet:
    stored: list[str]  # edit prompts; paraphrases[i] belongs to stored[para_owner[i]]
    paraphrases: list[str]
    para_owner: list[int]
    unrelated: list[str]


def calibration_set(zsre_from: int = STREAM_END, max_per_source: int | None = None) -> CalibrationSet:
    """The calibration prompts from ZsRE records >= zsre_from, temporal-train and hallucination-train
    (at most max_per_source records of each)."""
    stored, paras, owner, unrelated = [], [], [], []
    for name, offset in (("zsre", zsre_from), ("temporal-train", 0), ("hallucination-train", 0)):
        try:
            recs = load_records(name, offset=offset, limit=max_per_source)
        except FileNotFoundError as e:
            log.warning("calibration: skipping %s (%s)", name, e)
            continue
        for r in recs:
            if r.rephrase:
                paras.append(r.rephrase)
                owner.append(len(stored))
            stored.append(r.prompt)
            if r.loc_prompt:
                unrelated.append(r.loc_prompt)
    if not paras or not unrelated:
        raise FileNotFoundError("no calibration data: set MEMOIR_DATA to a folder with zsre/ and temporal/")
    return CalibrationSet(stored, paras, owner, unrelated)


@torch.no_grad()
def capture(model, tok, texts: list[str], layers: list[int], batch_size: int = 16,
            progress: bool = True) -> dict[int, list[torch.Tensor]]:
    """Per layer, per text: the activations [T, D] entering the down-projection (unedited model)."""
    acts: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    cur: dict[int, torch.Tensor] = {}
    hooks = []
    for li in layers:
        mod = get_module(model, down_proj_path(model, li))
        hooks.append(mod.register_forward_pre_hook(lambda _m, args, li=li: cur.__setitem__(li, args[0].detach())))
    try:
        for s in tqdm(range(0, len(texts), batch_size), desc="activations", disable=not progress):
            rows = [tok(t)["input_ids"] for t in texts[s : s + batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), tok.pad_token_id or 0)
            attn = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):  # right padding, as teacher-forced scoring routes
                ids[i, : len(r)] = torch.tensor(r)
                attn[i, : len(r)] = 1
            model(input_ids=ids, attention_mask=attn, use_cache=False)
            for li in layers:
                for i, r in enumerate(rows):
                    acts[li].append(cur[li][i, : len(r)].float())
    finally:
        for h in hooks:
            h.remove()
    return acts


def features(acts: list[torch.Tensor], memory: ResidualMemory, bg_std: torch.Tensor | None = None) -> torch.Tensor:
    """[N, D] routing features of whole-prompt activations [T, D] each, by the memory's own rule;
    bg_std divides them per unit ('zscore': mean_decentered / background std, calibration-only)."""
    pooled = [pool_prompt(a.unsqueeze(0), torch.ones(1, a.shape[0], dtype=torch.bool)) for a in acts]
    v = memory.feature_of(Pooled(*(torch.cat([getattr(p, f) for p in pooled]) for f in ("sum", "count", "last"))))
    return v / bg_std if bg_std is not None else v


def pick_tau(unrelated_best: torch.Tensor, k: int, max_false: float) -> float:
    """The smallest tau above the (1 - max_false) quantile of unrelated best overlaps (one mask entry up)."""
    q = torch.quantile(unrelated_best, 1.0 - max_false).item()
    return min(1.0, round(q + 1.0 / k, 4))


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    qs = torch.quantile(x, torch.tensor([0.05, 0.5, 0.95, 0.99]))
    return {f"q{int(p * 100):02d}": round(v, 4) for p, v in zip((0.05, 0.5, 0.95, 0.99), qs.tolist())} | {
        "max": round(x.max().item(), 4)}


def routing_memory(d_inner: int, kind: str, k: int, seed: int, background: torch.Tensor) -> ResidualMemory:
    """A memory that only routes (no W_m) for one calibration option; tau 0 so decide() reports every best match."""
    memory = ResidualMemory(0, d_inner, k, tau=0.0, seed=seed, feature="mean_decentered" if kind == "zscore" else kind)
    memory.background.copy_(background)
    return memory


def evaluate_option(acts: dict[str, list[torch.Tensor]], bg: list[torch.Tensor], cal: CalibrationSet,
                    kind: str, k: int, seed: int, max_false: float) -> dict[str, Any]:
    """Overlap distributions, the chosen tau and routing quality for one (layer's acts, feature, k)."""
    mean, std = bg[0], bg[1]
    d = mean.shape[0]
    memory = routing_memory(d, kind, k, seed, mean)
    std = std if kind == "zscore" else None

    def mask_idx(texts_acts):
        return tophash(features(texts_acts, memory, std), k, memory.perm)  # [N, k]

    stored = mask_idx(acts["stored"])
    memory.index.add(indices_to_mask(stored, d), torch.arange(len(stored)))
    para, unrel = memory.decide_masks(mask_idx(acts["paraphrases"])), memory.decide_masks(mask_idx(acts["unrelated"]))
    owner = torch.tensor(cal.para_owner)
    own = (indices_to_mask(para.mask_idx, d) & memory.index.masks(owner)).sum(1).float() / k
    tau = pick_tau(unrel.ratio, k, max_false)
    right = ((para.best == owner) & (para.ratio >= tau)).float().mean().item()
    return dict(
        feature=kind, k=k, tau=tau, para_best_is_own=round((para.best == owner).float().mean().item(), 4),
        para_routed_right=round(right, 4), unrelated_routed=round((unrel.ratio >= tau).float().mean().item(), 4),
        paraphrase_own_overlap=_quantiles(own), unrelated_best_overlap=_quantiles(unrel.ratio),
        chance=round(k / d, 4),
    )


def calibrate(m, layers: list[int] | None = None, ks: list[int] | None = None, feats: list[str] | None = None,
              max_false: float = 0.01, background: list[str] | None = None, progress: bool = True,
              max_per_source: int | None = None) -> dict[str, Any]:
    """Choose tau for m's (layer, k, feature) and sweep the alternatives.

    m: anything with .model, .tok and a resolved .cfg (a Memoir, or `base_model(...)` which skips the
    background and templates a Memoir builds).

    Returns {"chosen": {...tau...}, "sweep": [...], "n": sizes}; the chosen entry is m's own setting.
    """
    cfg = m.cfg
    layers = sorted(set(layers or [cfg.layer]) | {cfg.layer})
    ks = sorted(set(ks or [cfg.k]) | {cfg.k})
    feats = list(dict.fromkeys([cfg.feature, *(feats or [])]))
    cal = calibration_set(max_per_source=max_per_source)
    texts = background or builtin_background()[: cfg.n_background]
    bg_acts = capture(m.model, m.tok, texts, layers, progress=progress)
    sets = {name: capture(m.model, m.tok, getattr(cal, name), layers, progress=progress)
            for name in ("stored", "paraphrases", "unrelated")}
    sweep = []
    chosen = None
    for li in layers:
        means = torch.stack([a.mean(0) for a in bg_acts[li]])  # [n_bg, D] per-text mean activation
        bg = [means.mean(0), means.std(0).clamp_min(1e-6)]
        memory = getattr(m, "memory", None)
        if li == cfg.layer and memory is not None:  # a snapshot's own background mean, as it routes
            bg[0] = memory.background.float()
        acts = {name: sets[name][li] for name in sets}
        for kind, k in itertools.product(feats, ks):
            res = dict(layer=li, **evaluate_option(acts, bg, cal, kind, k, cfg.seed, max_false))
            sweep.append(res)
            if (li, kind, k) == (cfg.layer, cfg.feature, cfg.k):
                chosen = res
    return dict(chosen=chosen, max_false=max_false, sweep=sweep,
                n=dict(stored=len(cal.stored), paraphrases=len(cal.paraphrases), unrelated=len(cal.unrelated)))


def base_model(model: str = "default", **settings: Any):
    """The model, tokenizer and resolved config, without building a memory (enough for calibration)."""
    from types import SimpleNamespace

    from memoir_vllm.config import default_config
    from memoir_vllm.hf import model_dims
    from memoir_vllm.models import load_model

    hf_model, tok = load_model(model)
    n_layers, _, d_inner = model_dims(hf_model)
    cfg = default_config(hf_model.config.model_type, n_layers, d_inner, **settings).resolved(n_layers, d_inner)
    return SimpleNamespace(model=hf_model, tok=tok, cfg=cfg)
