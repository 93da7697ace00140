"""Evaluation records from the ZsRE, hallucination and temporal benchmark files, or plain JSONL.

Every loader returns `EvalRecord`s with one shape whatever the schema:

    ZsRE:          prompt=src, target=alt, rephrase=rephrase, loc_prompt=loc, loc_answer=loc_ans
    hallucination: prompt, target=target_new, loc_prompt=locality_prompt, loc_answer=locality_ground_truth
    temporal:      as hallucination, rephrase=ood_rephrase
    plain (memoir schema, memoir_vllm.edits): prompt, target, rephrase, unrelated (+ unrelated_answer)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from memoir_vllm.edits import EditFileError, EditRequest, load_edits

REPO = Path(__file__).resolve().parents[1]
STREAM_END = 1000  # ZsRE records [0, 1000) are the evaluation stream; calibration uses the rest

# benchmark name -> (file under the data root, records that form the evaluation stream)
BENCHMARKS: dict[str, str] = {
    "zsre": "zsre/zsre_mend_edit.json",
    "hallucination": "hallucination/hallucination-edit.json",
    "hallucination-train": "hallucination/hallucination-train.json",
    "temporal": "temporal/temporal-edit.json",
    "temporal-train": "temporal/temporal-train.json",
}


@dataclass
class EvalRecord:
    """One edit with its evaluation prompts. Fields that a schema lacks are None."""

    prompt: str
    target: str
    rephrase: str | None = None
    loc_prompt: str | None = None
    loc_answer: str | None = None  # None or empty: no locality item for this record
    source: str = ""

    def edit_request(self) -> EditRequest:
        return EditRequest(self.prompt, self.target, self.rephrase, self.loc_prompt, self.source)

    @property
    def has_loc(self) -> bool:
        return bool(self.loc_prompt and self.loc_answer and self.loc_answer.strip())


def data_root() -> Path:
    """The benchmark folder: $MEMOIR_DATA, else ../shared/data next to the repository."""
    return Path(os.environ.get("MEMOIR_DATA", REPO.parent / "shared" / "data")).expanduser()


def resolve_data(name_or_path: str | Path) -> Path:
    """A benchmark name (zsre, hallucination, temporal, *-train) or a file path -> an existing file."""
    key = str(name_or_path)
    path = data_root() / BENCHMARKS[key] if key in BENCHMARKS else Path(key).expanduser()
    if not path.exists():
        hint = (f"set MEMOIR_DATA to a folder holding {BENCHMARKS[key]}" if key in BENCHMARKS
                else f"give an existing file or one of {sorted(BENCHMARKS)}")
        raise FileNotFoundError(f"evaluation data {path} not found: {hint}")
    return path


def _str(rec: dict, key: str) -> str | None:
    v = rec.get(key)
    if isinstance(v, list):  # some ZsRE dumps hold answers as lists
        v = v[0] if v else None
    return v if isinstance(v, str) and v.strip() else None


def parse_eval_record(rec: dict, where: str) -> EvalRecord:
    """One benchmark or plain record -> EvalRecord; errors name `where` and the missing field."""
    if not isinstance(rec, dict):
        raise EditFileError(f"{where}: expected an object, got {type(rec).__name__}")
    if "src" in rec and "alt" in rec:  # ZsRE
        return EvalRecord(rec["src"], _str(rec, "alt") or "", _str(rec, "rephrase"), _str(rec, "loc"),
                          _str(rec, "loc_ans"), where)
    if "prompt" in rec and "target_new" in rec:  # hallucination / temporal
        return EvalRecord(rec["prompt"], _str(rec, "target_new") or "", _str(rec, "rephrase") or _str(rec, "ood_rephrase"),
                          _str(rec, "locality_prompt"), _str(rec, "locality_ground_truth"), where)
    if "prompt" in rec and "target" in rec:  # memoir schema
        return EvalRecord(rec["prompt"], rec["target"], _str(rec, "rephrase"), _str(rec, "unrelated"),
                          _str(rec, "unrelated_answer"), where)
    raise EditFileError(f"{where}: no known schema (found {sorted(rec)}); use prompt/target, src/alt (ZsRE) "
                        "or prompt/target_new (hallucination, temporal)")


def load_records(name_or_path: str | Path, limit: int | None = None, offset: int = 0) -> list[EvalRecord]:
    """Records [offset, offset+limit) of a benchmark name or a .json/.jsonl/.parquet file, in file order."""
    path = resolve_data(name_or_path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    end = None if limit is None else offset + limit
    out = [parse_eval_record(r, f"{path.name}:record {offset + i}") for i, r in enumerate(rows[offset:end])]
    for r in out:
        if not r.target.strip() or not r.prompt.strip():
            raise EditFileError(f"{r.source}: empty prompt or target; every evaluated edit needs both")
    if not out:
        raise EditFileError(f"{path}: no records in [{offset}, {end})")
    return out


__all__ = ["EvalRecord", "BENCHMARKS", "data_root", "resolve_data", "load_records", "parse_eval_record", "load_edits"]
