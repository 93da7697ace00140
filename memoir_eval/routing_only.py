"""Routing-only evaluation: where requests route, with edits stored as masks and no training.

Records 0..N-1 of a benchmark file are stored as edits (their prompt's TopHash mask and their subject:
the file's own `subject`, or memoir's automatic one), then routed through the memory's own rule
(ResidualMemory.candidates / decide_masks, what the transformers layer and the vLLM op call):

    para_own       a stored record's paraphrase routes to its own edit
    para_subject   ... to an edit of the same subject (the record's own, or another edit of that fact)
    neighbours     an unedited record of the same file (records N..) routes to some edit
    nq             a stored record's locality prompt (NQ in ZsRE) routes to some edit
    same_relation  (records with `neighbour_relation`, `memoir make-edits`) the same relation asked of an
                   unedited subject routes to some edit
    same_subject   (records with `neighbour_subject`) another relation of an edited subject routes to some edit

for the paper's mask rule (over tau) and the subject rule (over subject_tau) without and with the second
stage (answer types, the encoder check at the memory's check_tau, both; and with the memory's untyped_tau),
from one set of features.

    memoir eval-routing --data zsre --n 300
"""
from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from memoir_vllm.hf import capturing
from memoir_vllm.routing.subjects import auto_subject, normalize
from memoir_vllm.tokens import encode_prompts

from .data import resolve_data

TAUS = (0.2, 0.3, 0.4, 0.5, 0.6)


@torch.no_grad()
def prompt_masks(m, texts: list[str], batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """TopHash mask indices [N, k] of each text routed as a whole prompt (what the layer computes)."""
    out = []
    for s in tqdm(range(0, len(texts), batch_size), desc="features", unit="batch", disable=not progress):
        b = encode_prompts(m.tok, texts[s: s + batch_size])
        ids, attn = b.input_ids, b.attention_mask
        pos = (attn.cumsum(1) - 1).clamp_min(0)
        with capturing(m.layer):
            m.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        out.append(m.memory.masks_from_acts(m.layer.captured, attn.bool()))
    return torch.cat(out)


# rule, subject_check, check_tau, answer_type, columns, untyped_tau
Variant = tuple[str, str, float | None, bool, str, float]


def variants(check_taus: tuple[float, ...], untyped_tau: float = 0.0) -> dict[str, Variant]:
    """name -> (rule, subject_check, check_tau, answer_type, columns, untyped_tau) of the rules compared. Under free
    columns a request takes its first candidate (no mask overlap), so those variants have one row whatever tau.
    With untyped_tau > 0 each answer-type + encoder rule is also compared with it (a pair of questions of which
    only one names a kind of answer needs that cosine)."""
    out = {"mask": ("mask", "none", None, False, "shared", 0.0),
           "subject": ("subject", "none", None, False, "shared", 0.0),
           "subject+type": ("subject", "none", None, True, "shared", 0.0)}
    for c in check_taus:
        out[f"subject+encoder {c}"] = ("subject", "encoder", c, False, "shared", 0.0)
        out[f"subject+type+encoder {c}"] = ("subject", "encoder", c, True, "shared", 0.0)
        out[f"subject+type+encoder {c}, free columns"] = ("subject", "encoder", c, True, "free", 0.0)
        if untyped_tau > 0:
            out[f"subject+type+encoder {c}, untyped {untyped_tau}, free columns"] = (
                "subject", "encoder", c, True, "free", untyped_tau)
    return out


def evaluate_routing(m, records: list[dict[str, Any]], n: int, subjects: str = "given",
                     taus: tuple[float, ...] = TAUS, check_taus: tuple[float, ...] | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Routing-only metrics of records[:n] stored as edits; records[n:] are the neighbours.

    m: a fresh Memoir (its memory is used for routing only and left empty afterwards).
    records: dicts with src/prompt, rephrase, loc and optionally subject.
    subjects: "given" (the file's subject, auto where missing) or "auto".
    check_taus: encoder-check thresholds to compare (default: the memory's check_tau).
    """
    prompt = lambda r: r.get("src") or r["prompt"]  # noqa: E731
    stored, others = records[:n], records[n:]
    subs = [(r.get("subject") if subjects == "given" and r.get("subject") else auto_subject(prompt(r))) for r in stored]
    t0 = time.perf_counter()
    E = prompt_masks(m, [prompt(r) for r in stored], progress=progress)
    para_recs = [(i, r["rephrase"]) for i, r in enumerate(stored) if r.get("rephrase")]
    P = prompt_masks(m, [t for _, t in para_recs], progress=progress)
    Nb = prompt_masks(m, [prompt(r) for r in others], progress=progress)
    nq_texts = [r.get("loc") or r.get("unrelated") for r in stored if r.get("loc") or r.get("unrelated")]
    NQ = prompt_masks(m, nq_texts, progress=progress)
    extra = {key: [r[key] for r in stored if r.get(key)] for key in ("neighbour_relation", "neighbour_subject")}
    extra_masks = {key: prompt_masks(m, texts, progress=progress) for key, texts in extra.items() if texts}
    feature_s = time.perf_counter() - t0

    memory = m.memory.empty_like()
    from memoir_vllm.routing.tophash import indices_to_mask

    memory.index.add(indices_to_mask(E, memory.d_inner), torch.arange(n))
    for s, r in zip(subs, stored):
        memory.subjects.add((s,), prompt(r))
    owner = torch.tensor([i for i, _ in para_recs])
    norm_sub = [normalize(s) for s in subs]
    results: dict[str, Any] = {"n_stored": n, "n_neighbours": len(others), "n_paraphrases": len(para_recs),
                               "n_nq": len(nq_texts), "subjects": subjects, "feature_seconds": round(feature_s, 1),
                               "rules": {}}
    queries = {"para": (P, [t for _, t in para_recs]), "neighbours": (Nb, [prompt(r) for r in others]),
               "nq": (NQ, nq_texts), **{key: (M, extra[key]) for key, M in extra_masks.items()}}
    for name, (rule, check, ctau, atype, columns, untyped) in variants(check_taus or (m.memory.check_tau,),
                                                                       m.memory.untyped_tau).items():
        memory.rule, memory.subject_check, memory.answer_type, memory.columns = rule, check, atype, columns
        memory.untyped_tau = untyped
        memory.check_tau = ctau if ctau is not None else memory.check_tau
        t1 = time.perf_counter()
        cands = {q: memory.candidates(texts) for q, (_, texts) in queries.items()}  # do not depend on tau
        cand_ms = 1000 * (time.perf_counter() - t1) / sum(len(t) for _, t in queries.values())
        rows = []
        for tau in (taus if columns == "shared" else taus[:1]):
            memory.tau = memory.subject_tau = tau
            t1 = time.perf_counter()
            routed = {q: memory.decide_masks(M, cands[q]).row for q, (M, _) in queries.items()}
            route_ms = cand_ms + 1000 * (time.perf_counter() - t1) / sum(len(t) for _, t in queries.values())
            rp, rn, rq = routed["para"], routed["neighbours"], routed["nq"]
            kinds = {key.replace("neighbour_", "same_"): round(float((routed[key] >= 0).float().mean()), 4)
                     for key in extra_masks}
            same_sub = [bool(r >= 0 and norm_sub[int(r)] == norm_sub[int(o)]) for r, o in zip(rp, owner)]
            rows.append(dict(
                tau=tau if columns == "shared" else None,  # None: free columns read no overlap
                para_own=round(float((rp == owner).float().mean()), 4),
                para_subject=round(sum(same_sub) / max(len(same_sub), 1), 4),
                neighbours=round(float((rn >= 0).float().mean()), 4),
                nq=round(float((rq >= 0).float().mean()), 4), **kinds, ms_per_query=round(route_ms, 3),
            ))
        results["rules"][name] = rows
    return results


def load_json_records(data: str) -> list[dict[str, Any]]:
    import json

    path = resolve_data(data)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def markdown(results: dict[str, Any]) -> str:
    extra = [k for k in ("same_relation", "same_subject") if k in results["rules"]["mask"][0]]
    head = ["rule", "tau", "para→own", "para→same subject", "neighbours routed", "NQ/unrelated routed"] + \
        [f"{k.replace('_', ' ')} routed" for k in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule, rows in results["rules"].items():
        for r in rows:
            vals = [r["para_own"], r["para_subject"], r["neighbours"], r["nq"]] + [r[k] for k in extra]
            tau = "–" if r["tau"] is None else r["tau"]
            lines.append(f"| {rule} | {tau} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)
