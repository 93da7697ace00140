"""Python behind the lm-eval task pack in memoir_eval/tasks/: offline datasets and per-document metrics.

The YAML files name these through `!function utils.<name>`; each tasks/<task>/utils.py re-exports
this module so the logic lives in one place.

Data location (no network): `dataset_kwargs.data_file` is relative to the data root, which is
`--metadata '{"data_dir": DIR}'`, else $MEMOIR_DATA, else ../shared/data next to the repository.
Records are read with memoir_eval.data, in file order, exactly as `memoir eval` reads them, so
`--limit N` scores the same first N records.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .data import data_root, load_records

FIELDS = ("prompt", "target", "rephrase", "loc_prompt", "loc_answer")


def load(data_file: str, data_dir: str | None = None, **_: Any):
    """custom_dataset hook: a DatasetDict with one 'test' split of normalised records."""
    import datasets

    path = Path(data_file)
    if not path.is_absolute():
        path = (Path(data_dir).expanduser() if data_dir else data_root()) / path
    if not path.exists():
        raise FileNotFoundError(f"memoir task data {path} not found: pass --metadata '{{\"data_dir\": \"DIR\"}}' "
                                "or set MEMOIR_DATA to the folder holding zsre/, hallucination/, temporal/")
    rows = [{f: getattr(r, f) or "" for f in FIELDS} for r in load_records(path)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def with_rephrase(docs):
    """process_docs: records that have a paraphrase (generalization)."""
    return docs.filter(lambda d: bool(d["rephrase"]))


def with_locality(docs):
    """process_docs: records that have a locality prompt and a non-empty answer."""
    return docs.filter(lambda d: bool(d["loc_prompt"]) and bool(d["loc_answer"].strip()))


def _token_acc(result) -> float:
    # memoir's model type returns an LLResult with the teacher-forced token accuracy; any other
    # model only says whether the whole continuation is greedy
    return float(getattr(result, "token_acc", result[1]))


def rel_results(doc: dict, results: list) -> dict[str, float]:
    """Reliability: teacher-forced token accuracy of the target after the edit prompt."""
    return {"rel": _token_acc(results[0])}


def gen_results(doc: dict, results: list) -> dict[str, float]:
    """Generalization: teacher-forced token accuracy of the target after the paraphrase."""
    return {"gen": _token_acc(results[0])}


def loc_results(doc: dict, results: list) -> dict[str, float]:
    """Locality: agreement of the argmax on the locality answer with the unedited model's argmax.

    Only the memoir model type knows the unedited model's argmax (it scores with the memory off
    too); any other model is its own unedited model, so its locality is 1.0 by definition.
    """
    return {"loc": float(getattr(results[0], "agreement", 1.0))}


def ppl_results(doc: dict, results: list) -> dict[str, float]:
    """Hallucination reliability: perplexity of target_new given the prompt (per record; mean over records).

    Without memoir's token count (other model types), perplexity per whitespace word is reported.
    """
    r = results[0]
    ppl = getattr(r, "ppl", None)
    if ppl is None:
        ppl = math.exp(-r[0] / max(1, len(doc["target"].split())))
    return {"ppl": float(ppl), "rel": _token_acc(r)}


def greedy_results(doc: dict, results: list) -> dict[str, float]:
    """Greedy answers (generate_until tasks): `em` the answer starts with the target's words, `answer` the whole
    first line is the target (it stopped); both SQuAD-normalised (memoir_eval.metrics)."""
    from .metrics import answer_match, exact_match

    return {"em": exact_match(results[0], doc["target"]), "answer": answer_match(results[0], doc["target"])}
