"""Reading edit files: JSON list, JSONL or Parquet, in memoir's schema or the benchmark schemas.

memoir schema:        prompt, target, optional rephrase, unrelated, subject (a string or a list of aliases)
ZsRE (EasyEdit):      src, alt, rephrase, loc (+ loc_ans)
hallucination/temporal: prompt, target_new, optional rephrase / ood_rephrase, locality_prompt
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .routing.subjects import as_aliases


@dataclass
class EditRequest:
    """One fact to write: the prompt, its new target, and optional evaluation prompts."""

    prompt: str
    target: str
    rephrase: str | None = None
    unrelated: str | None = None
    source: str = ""
    subject: tuple[str, ...] = ()  # aliases; () lets memoir find it (subjects.auto_subject)


class EditFileError(ValueError):
    """An edit file that cannot be read; the message names the file, the line or record, and the field."""


_FIELDS = (  # (prompt, target, rephrase, unrelated) field names per schema, first match wins
    ("prompt", "target", "rephrase", "unrelated"),
    ("src", "alt", "rephrase", "loc"),
    ("prompt", "target_new", "rephrase", "locality_prompt"),
)


def parse_record(rec: Any, where: str) -> EditRequest:
    """One record -> EditRequest, with an error naming `where` (file:line) and the bad field."""
    if not isinstance(rec, dict):
        raise EditFileError(f"{where}: expected an object with 'prompt' and 'target', got {type(rec).__name__}")
    for p_key, t_key, r_key, u_key in _FIELDS:
        if p_key in rec and t_key in rec:
            break
    else:
        raise EditFileError(
            f"{where}: missing field 'prompt' or 'target' (found {sorted(rec)}); "
            "use prompt/target, or the ZsRE fields src/alt"
        )
    prompt, target = rec[p_key], rec[t_key]
    for key, value in ((p_key, prompt), (t_key, target)):
        if not isinstance(value, str):
            raise EditFileError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise EditFileError(f"{where}: field '{key}' is empty: every edit needs a non-empty {key}")
    rephrase = rec.get(r_key) or rec.get("ood_rephrase")
    unrelated = rec.get(u_key)
    if u_key == "loc" and unrelated and rec.get("loc_ans"):
        unrelated = f"{unrelated} {rec['loc_ans']}"
    try:
        subject = as_aliases(rec.get("subject"))
    except ValueError as e:
        raise EditFileError(f"{where}: field 'subject': {e}; give a string or a list of strings") from None
    return EditRequest(prompt, target, rephrase or None, unrelated or None, source=where, subject=subject)


def load_edits(path: str | Path) -> list[EditRequest]:
    """All edits of a .json (list), .jsonl or .parquet file, in file order."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EditFileError(f"edit file {path} does not exist")
    name = path.name
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [parse_record(r, f"{name}:row {i}") for i, r in enumerate(rows)]
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise EditFileError(f"{name}:{e.lineno}: invalid JSON ({e.msg})") from None
        edits = [parse_record(r, f"{name}:record {i}") for i, r in enumerate(rows)]
    else:
        edits = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EditFileError(f"{name}:{lineno}: invalid JSON ({e.msg}); JSONL needs one object per line") from None
            edits.append(parse_record(rec, f"{name}:{lineno}"))
    if not edits:
        raise EditFileError(f"{name}: no edits found")
    return edits
