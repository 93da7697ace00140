"""`memoir eval`: run the protocol over several T and write results.json, results.md and plots."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from .data import load_records, resolve_data
from .protocol import Evaluator, chunk_positions, summarize
from .report import markdown_table, plot, write_json, write_text

log = logging.getLogger(__name__)


def is_perplexity_task(data: str) -> bool:
    """Hallucination reports reliability as perplexity (long targets); the others as token accuracy."""
    return "hallucination" in str(data)


def run_eval(
    model: str | Path, data: str, Ts: list[int], out: str | Path, limit: int | None = None,
    chunks: int | None = None, settings: dict[str, Any] | None = None, generative: bool = True,
    batch_size: int = 16, background: list[str] | None = None, progress: bool = True,
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    """Run the sequential-editing protocol for each T and write the results under out.

    Args:
        model: 'default' or a local HF model directory.
        data: zsre | hallucination | temporal | a file of one of their schemas or memoir's.
        Ts: numbers of sequential edits per chunk.
        limit: use only the first `limit` records of the file.
        chunks: run at most this many chunks per T (reported as run/total).
        settings: MemoirConfig overrides.
    Returns the results dict also written to out/results.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(data, limit=limit)
    ppl = is_perplexity_task(data)
    ev = evaluator or Evaluator(model, settings, background, batch_size, generative)
    plans = {T: chunk_positions(len(records), T, chunks) for T in Ts}
    used = sorted({i for chunks_, _ in plans.values() for c in chunks_ for i in c})
    t0 = time.perf_counter()
    pre = ev.pre_edit(records, used, ppl=ppl)
    pre_s = time.perf_counter() - t0
    log.info("pre-edit outputs for %d records in %.1f s", len(used), pre_s)
    results: dict[str, Any] = dict(
        model=str(model), data=str(data), data_file=str(resolve_data(data)), n_records=len(records),
        config=ev.cfg.to_dict(), generative=generative, pre_edit_s=pre_s, runs={},
    )
    overlaps: dict[str, dict[str, list[float]]] = {}
    for T, (chunk_list, total) in plans.items():
        all_rows, edit_s, eval_s = [], 0.0, 0.0
        for c, positions in enumerate(chunk_list):
            log.info("T=%d: chunk %d/%d (records %d..%d)", T, c + 1, len(chunk_list), positions[0], positions[-1])
            rows, times = ev.run_chunk(records, positions, pre, ppl=ppl, progress=progress)
            all_rows.append(rows)
            edit_s += times["edit_s"]
            eval_s += times["eval_s"]
            results["runs"][str(T)] = dict(  # rewritten after every chunk: an interrupted run keeps its chunks
                T=len(chunk_list[0]), chunks_run=len(all_rows), chunks_total=total,
                n_edits=sum(len(r) for r in all_rows), edit_s=edit_s, eval_s=eval_s, metrics=summarize(all_rows),
            )
            write_json(out / "results.json", results)
            _write_rows(out / f"records_T{T}.jsonl", all_rows)
        overlaps[str(T)] = {
            "edit prompts": [r["edit_overlap"] for rows in all_rows for r in rows],
            "paraphrases": [r["para_overlap"] for rows in all_rows for r in rows if "para_overlap" in r],
            "unrelated": [r["loc_overlap"] for rows in all_rows for r in rows if "loc_overlap" in r],
        }
        log.info("T=%d done: %s", T, json.dumps({k: round(v["mean"], 4) for k, v in results["runs"][str(T)]["metrics"].items()}))
    write_json(out / "overlaps.json", overlaps)
    write_text(out / "results.md", markdown_table(results))
    plot(results, overlaps, out)
    return results


def _write_rows(path: Path, chunks: list[list[dict[str, Any]]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for c, rows in enumerate(chunks):
            for r in rows:
                f.write(json.dumps({"chunk": c, **r}) + "\n")
    tmp.replace(path)
