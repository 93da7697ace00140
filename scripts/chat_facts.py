"""Question-form facts written with `memoir edit`, asked through `memoir serve` with the `openai` client.

    .venv/bin/python scripts/chat_facts.py --n 30 --formats raw,chat --out runs/chat_facts

For each --prompt-format: `memoir edit` writes the facts (default: `memoir make-edits --n N --seed S`, SYNTHETIC
invented subjects; or --edits FILE with prompt/target/rephrase/unrelated and no neighbours), `memoir serve`
serves the snapshot, and every question is asked greedily (24 new tokens) with memory on and off (vllm_xargs {"memoir": false}, the base answer) through chat completions (one user
message) and completions (the raw prompt). Reported per format and request form:

    edited / paraphrase / statement   the whole answer is the target (memoir_eval.metrics.answer_match:
                          SQuAD-normalised); statement: the fact as a sentence to complete ("The capital city of
                          Vorlandia is"), synthetic facts only
    unrelated, same subject other relation, same relation other subject   answer == base answer
    repeats               share of edited answers that repeat a 3-gram

Saves JSON to OUT/chat_facts.json (per-question answers too). Snapshots stay in OUT/<format> and are reused.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memoir_eval.metrics import answer_match, repeats  # noqa: E402
from memoir_eval.synthetic import make_edits  # noqa: E402
from memoir_vllm.edits import load_edits  # noqa: E402
from memoir_vllm.vllm.server_process import ServerProcess  # noqa: E402

log = logging.getLogger("chat_facts")
KINDS = {"edited": "prompt", "paraphrase": "rephrase", "statement": "cloze", "unrelated": "unrelated",
         "same_subject_other_relation": "neighbour_subject", "same_relation_other_subject": "neighbour_relation"}


def write_snapshot(facts_file: Path, out: Path, fmt: str, n: int, edit_args: list[str] | None = None) -> Path:
    """`memoir edit` of the facts with --prompt-format fmt (skipped when OUT already holds all of them)."""
    manifest = out / "LATEST"
    if manifest.exists():
        from memoir_vllm.snapshot import load_snapshot

        if load_snapshot(out).manifest["n_edits"] == n:
            log.info("%s: reusing %s", fmt, out)
            return out
    cmd = [sys.executable, "-m", "memoir_vllm.cli", "edit", "--edits", str(facts_file), "--out", str(out),
           "--prompt-format", fmt, "--resume", *(edit_args or [])]
    log.info("%s", " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    log.info("%s: %d edits in %.0f s", fmt, n, time.perf_counter() - t0)
    return out


def ask_all(srv: ServerProcess, questions: list[str], chat: bool, memoir: bool, max_tokens: int) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    extra = None if memoir else {"vllm_xargs": {"memoir": False}}

    def one(q: str) -> str:
        if chat:
            r = client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": q}],
                                               max_tokens=max_tokens, temperature=0, extra_body=extra)
            return r.choices[0].message.content or ""
        r = client.completions.create(model=srv.model, prompt=q, max_tokens=max_tokens, temperature=0,
                                      extra_body=extra)
        return r.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, questions))


def measure(facts: list[dict], srv: ServerProcess, max_tokens: int) -> dict:
    out: dict = {}
    for form, chat in (("chat", True), ("completion", False)):
        res, rows = {}, {}
        for kind, field in KINDS.items():
            qs = [f[field] for f in facts if f.get(field)]
            if not qs:
                continue
            on = ask_all(srv, qs, chat, True, max_tokens)
            off = ask_all(srv, qs, chat, False, max_tokens)
            if kind in ("edited", "paraphrase", "statement"):
                targets = [f["target"] for f in facts if f.get(field)]
                res[kind] = sum(answer_match(a, t) for a, t in zip(on, targets)) / len(qs)
                if kind == "edited":
                    res["repeats"] = sum(repeats(a) for a in on) / len(qs)
            else:
                res[kind + "_unchanged"] = sum(a == b for a, b in zip(on, off)) / len(qs)
            rows[kind] = [dict(question=q, answer=a, base=b) for q, a, b in zip(qs, on, off)]
        out[form] = dict(metrics=res, answers=rows)
        log.info("%s: %s", form, json.dumps(res))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edits", help="an edit file instead of the synthetic facts")
    ap.add_argument("--formats", default="raw,chat", help="comma-separated --prompt-format values")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", default="runs/chat_facts")
    ap.add_argument("--edit-args", default="", help="more `memoir edit` options, e.g. '--n-iter 60'")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.edits:
        facts_file = Path(args.edits)
        facts = [dict(prompt=e.prompt, target=e.target, rephrase=e.rephrase, unrelated=e.unrelated)
                 for e in load_edits(facts_file)][: args.n]
    else:
        facts = make_edits(args.n, args.seed)
        facts_file = out / "facts.jsonl"
        facts_file.write_text("".join(json.dumps(f) + "\n" for f in facts))
    results = dict(n=len(facts), seed=args.seed, edits=str(args.edits or "synthetic"), max_tokens=args.max_tokens,
                   edit_args=args.edit_args,
                   formats={})
    for fmt in args.formats.split(","):
        snap = write_snapshot(facts_file, out / fmt, fmt, len(facts), args.edit_args.split())
        with ServerProcess(snap, ["--max-model-len", "512", "--max-num-seqs", "8"], log_path=out / f"serve_{fmt}.log") as srv:
            results["formats"][fmt] = measure(facts, srv, args.max_tokens)
    path = out / "chat_facts.json"
    path.write_text(json.dumps(results, indent=1))
    for fmt, r in results["formats"].items():
        for form in ("chat", "completion"):
            print(fmt, form, json.dumps(r[form]["metrics"]))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
