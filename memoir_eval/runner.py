"""`memoir eval`: run the protocol over several T and write results.json, results.md and plots."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from memoir_vllm.atomic import write_text_atomic
from memoir_vllm.config import MemoirConfig

from .age import age_markdown, by_age, conflict_split, plot_by_age
from .data import load_records, resolve_data
from .protocol import Evaluator, PreEdit, chunk_positions, summarize
from .report import markdown_table, plot, write_json
from .sampled import parse_slices

log = logging.getLogger(__name__)


def is_perplexity_task(data: str) -> bool:
    """Hallucination reports reliability as perplexity (long targets); the others as token accuracy."""
    return "hallucination" in str(data)


def run_eval(
    model: str | Path, data: str, Ts: list[int], out: str | Path, limit: int | None = None,
    chunks: int | None = None, settings: dict[str, Any] | None = None, generative: bool = True,
    batch_size: int = 16, background: list[str] | None = None, progress: bool = True,
    evaluator: Evaluator | None = None, resume: bool = False, checkpoint_every: int = 50, train: str | None = None,
) -> dict[str, Any]:
    """Run the sequential-editing protocol for each T and write the results under out.

    Args:
        model: 'default' or a local HF model directory.
        data: zsre | hallucination | temporal | a file of one of their schemas or memoir's.
        Ts: numbers of sequential edits per chunk.
        limit: use only the first `limit` records of the file.
        chunks: run at most this many chunks per T (reported as run/total).
        settings: MemoirConfig overrides.
        resume: continue the run in `out`: finished chunks are kept, an interrupted chunk continues
            from its last state (saved every `checkpoint_every` edits under out/state/).
        train: slices of chunk positions to train (memoir_eval.sampled.parse_slices, e.g. '0:100,900:1000'); the
            other edits are written for routing alone and left out of the metrics. None: every edit.
    Returns the results dict also written to out/results.json.

    The largest T runs first; a smaller T whose first chunk is its prefix (T=100's records 0..99 are
    the first 100 edits of T=1000's chunk) is evaluated on the way instead of being edited again.
    """
    out = Path(out)
    if (out / "results.json").exists() and not resume:
        raise ValueError(f"{out} already holds results.json: pass --resume to continue that run, or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(data, limit=limit)
    ppl = is_perplexity_task(data)
    ev = evaluator or Evaluator(model, settings, background, batch_size, generative)
    plans = {T: chunk_positions(len(records), T, chunks) for T in sorted(set(Ts), reverse=True)}
    used = sorted({i for chunks_, _ in plans.values() for c in chunks_ for i in c})
    results: dict[str, Any] = dict(
        model=str(model), data=str(data), data_file=str(resolve_data(data)), n_records=len(records),
        config=ev.cfg.to_dict(), generative=generative, train=train, runs={},
    )
    done: dict[int, list[list[dict[str, Any]]]] = {T: [] for T in plans}
    if resume and (out / "results.json").exists():
        results, done = _resumed(out, results, plans)
    pre, results["pre_edit_s"] = _pre_edit(ev, records, used, ppl, out)
    timings = {T: dict(edit_s=results["runs"].get(str(T), {}).get("edit_s", 0.0),
                       eval_s=results["runs"].get(str(T), {}).get("eval_s", 0.0)) for T in plans}

    def record(T: int, rows: list[dict[str, Any]], times: dict[str, float]) -> None:
        chunk_list, total = plans[T]
        done[T].append(rows)
        timings[T]["edit_s"] += times["edit_s"]
        timings[T]["eval_s"] += times["eval_s"]
        results["runs"][str(T)] = dict(  # rewritten after every chunk: an interrupted run keeps its chunks
            T=len(chunk_list[0]), chunks_run=len(done[T]), chunks_total=total,
            n_edits=sum(len(r) for r in done[T]), **timings[T], metrics=summarize(done[T]),
            **_age_report(done[T], records, chunk_list),
        )
        write_json(out / "results.json", results)
        _write_rows(out / f"records_T{T}.jsonl", done[T])
        log.info("T=%d chunk %d/%d: %s", T, len(done[T]), len(chunk_list),
                 json.dumps({k: round(v["mean"], 4) for k, v in results["runs"][str(T)]["metrics"].items()}))

    for T, (chunk_list, _total) in plans.items():
        for c in range(len(done[T]), len(chunk_list)):
            positions = chunk_list[c]
            # smaller T whose next chunk to run is this chunk's prefix
            prefixes = {len(p[0][len(done[t])]): (lambda rows, times, t=t: record(t, rows, times))
                        for t, p in plans.items()
                        if t < T and len(done[t]) < len(p[0]) and positions[: len(p[0][len(done[t])])] == p[0][len(done[t])]}
            log.info("T=%d: chunk %d/%d (records %d..%d)%s", T, c + 1, len(chunk_list), positions[0], positions[-1],
                     f", evaluating T={sorted(prefixes)} on the way" if prefixes else "")
            rows, times = ev.run_chunk(records, positions, pre, ppl=ppl, progress=progress,
                                       state=out / "state" / f"T{T}-c{c}", every=checkpoint_every, prefixes=prefixes,
                                       train=None if train is None else set(parse_slices(train, len(positions))))
            record(T, rows, times)
    overlaps = {str(T): {
        "edit prompts": [r["edit_overlap"] for rows in done[T] for r in rows],
        "paraphrases": [r["para_overlap"] for rows in done[T] for r in rows if "para_overlap" in r],
        "unrelated": [r["loc_overlap"] for rows in done[T] for r in rows if "loc_overlap" in r],
    } for T in sorted(plans)}
    results["runs"] = {str(T): {**results["runs"][str(T)], **_age_report(done[T], records, plans[T][0])}
                       for T in sorted(plans)}  # (again: a resumed run written before the age report gains it)
    write_json(out / "results.json", results)
    write_json(out / "overlaps.json", overlaps)
    ages = "".join("\n" + age_markdown(r["by_age"], int(T)) for T, r in results["runs"].items() if r["by_age"])
    write_text_atomic(out / "results.md", markdown_table(results) + ages)
    plot(results, overlaps, out)
    for T, r in results["runs"].items():
        if r["by_age"]:
            plot_by_age(r["by_age"], int(T), results["data"], out / f"rel_by_age_T{T}.png")
    return results


def _age_report(chunks: list[list[dict[str, Any]]], records, chunk_list: list[list[int]]) -> dict[str, Any]:
    """by_age (per block of 100 edits, oldest first) and conflicts (edits whose question is edited again later
    in the chunk, against the others) of one T's finished chunks."""
    return dict(by_age=by_age(chunks), conflicts=conflict_split(chunks, records, chunk_list[: len(chunks)]))


def _resumed(out: Path, fresh: dict[str, Any], plans: dict) -> tuple[dict[str, Any], dict[int, list]]:
    """The results and per-chunk rows of an interrupted run in out, checked against this run's setup."""
    old = json.loads((out / "results.json").read_text())
    # a run saved before a setting existed has that setting's default
    old["config"] = MemoirConfig.from_dict(old.get("config", {})).to_dict()
    for key in ("data_file", "n_records", "config", "generative", "train"):
        if old.get(key) != fresh.get(key):
            raise ValueError(f"cannot resume {out}: its {key} was {old.get(key)!r}, this run's is {fresh.get(key)!r}. "
                             "Resume with the same data and settings, or choose a new --out")
    done: dict[int, list[list[dict[str, Any]]]] = {T: [] for T in plans}
    for T in plans:
        path = out / f"records_T{T}.jsonl"
        if str(T) in old["runs"] and path.exists():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            n = old["runs"][str(T)]["chunks_run"]
            done[T] = [[{k: v for k, v in r.items() if k != "chunk"} for r in rows if r["chunk"] == c] for c in range(n)]
    fresh["runs"] = {k: v for k, v in old["runs"].items() if int(k) in plans}
    log.info("resuming %s: chunks done %s", out, {T: len(v) for T, v in done.items()})
    return fresh, done


def _pre_edit(ev: Evaluator, records, used: list[int], ppl: bool, out: Path) -> tuple[PreEdit, float]:
    """Unedited outputs for the used records, cached in out/pre_edit.json for resumed runs."""
    path = out / "pre_edit.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["positions"] == used:
            fields = {k: {int(i): v for i, v in d.items()} for k, d in saved["pre"].items()}
            return PreEdit(**fields), saved["seconds"]
    t0 = time.perf_counter()
    pre = ev.pre_edit(records, used, ppl=ppl)
    seconds = time.perf_counter() - t0
    log.info("pre-edit outputs for %d records in %.1f s", len(used), seconds)
    write_json(path, dict(positions=used, seconds=seconds, pre=dataclasses.asdict(pre)))
    return pre, seconds


def _write_rows(path: Path, chunks: list[list[dict[str, Any]]]) -> None:
    """records_T*.jsonl: one line per record, tagged with its chunk."""
    lines = (json.dumps({"chunk": c, **r}) + "\n" for c, rows in enumerate(chunks) for r in rows)
    write_text_atomic(path, "".join(lines))
