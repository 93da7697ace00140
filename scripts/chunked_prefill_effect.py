"""What chunked prefill does to edited answers in vLLM: the documented variant vs exact semantics.

    PYTHONPATH=. python scripts/chunked_prefill_effect.py --snapshot runs/snap_zsre100 --n 100 \
        --budgets 8 16 --out runs/chunked_prefill.json

The snapshot must hold the first n ZsRE records as its edits, in order (`memoir edit --limit n`, or a
`memoir eval` chunk state). One engine per setting, each in its own process, with max_num_seqs=1
so that the split points are known: with max_num_batched_tokens = B every prompt longer than B
tokens runs in chunks of B, its first chunks through the base layer (the variant); the exact
engine (B = 4096) runs every prompt in one step. Greedy answers (target length + 2 tokens) of the
edit prompts, their paraphrases and the unrelated (loc) prompts; Loc compares each loc answer
with the same engine's opted-out answer (the base model). Prints and saves JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXACT_BUDGET = 4096
log = logging.getLogger("chunked_prefill_effect")


def child(snapshot: str, budget: int, prompts: list[str], max_tokens: list[int], opt_out: list[bool]) -> dict:
    from vllm import LLM, SamplingParams

    from memoir_vllm.models import default_model_dir

    llm = LLM(model=str(default_model_dir()), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              max_num_seqs=1, max_num_batched_tokens=budget, enable_chunked_prefill=True, enable_prefix_caching=False,
              hf_overrides={"memoir_snapshot": snapshot},
              worker_extension_cls="memoir_vllm.vllm.plugin.MemoirWorkerExtension")
    params = [SamplingParams(temperature=0, max_tokens=n, extra_args={"memoir": False} if off else None)
              for n, off in zip(max_tokens, opt_out)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {"texts": [o.outputs[0].text for o in outs], "info": llm.collective_rpc("memoir_info")[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot", required=True)
    ap.add_argument("--data", default="zsre")
    ap.add_argument("--n", type=int, default=100, help="the snapshot's edits are the data's first n records")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16], help="max_num_batched_tokens of the variant runs")
    ap.add_argument("--out", default="runs/chunked_prefill.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        print("RESULT " + json.dumps(child(args.snapshot, spec["budget"], spec["prompts"], spec["max_tokens"],
                                           spec["opt_out"])), flush=True)
        return

    from transformers import AutoTokenizer

    from memoir_eval.data import load_records
    from memoir_eval.metrics import exact_match
    from memoir_vllm.models import default_model_dir
    from memoir_vllm.snapshot import load_snapshot

    recs = load_records(args.data, limit=args.n)
    snap = load_snapshot(args.snapshot, verify=False)
    if [(e.prompt, e.target) for e in snap.edits[: args.n]] != [(r.prompt, r.target) for r in recs]:
        raise SystemExit(f"{args.snapshot}: its first edits are not the first {args.n} records of {args.data}")
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    n_tgt = [len(tok(" " + r.target)["input_ids"]) + 2 for r in recs]
    kinds = {"rel": [r.prompt for r in recs], "gen": [r.rephrase for r in recs],
             "loc": [r.loc_prompt for r in recs], "loc_base": [r.loc_prompt for r in recs]}
    n_loc = [min(len(tok(" " + r.loc_answer)["input_ids"]), 32) for r in recs]
    prompts = sum(kinds.values(), [])
    max_tokens = n_tgt + n_tgt + n_loc + n_loc
    opt_out = [False] * (3 * len(recs)) + [True] * len(recs)
    prompt_len = [len(tok(p)["input_ids"]) for p in prompts]
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("MEMOIR_SNAPSHOT", None)
    runs = {}
    for budget in [EXACT_BUDGET] + args.budgets:
        spec = Path(args.out).with_suffix(f".spec{budget}.json")
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps(dict(budget=budget, prompts=prompts, max_tokens=max_tokens, opt_out=opt_out)))
        res = subprocess.run([sys.executable, __file__, "--snapshot", args.snapshot, "--child", str(spec)], env=env,
                             capture_output=True, text=True)
        spec.unlink()
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode != 0 or not line:
            raise RuntimeError(f"budget {budget} engine failed:\n{res.stderr[-3000:]}")
        out = json.loads(line[0][7:])
        texts = out["texts"]
        n = len(recs)
        rel, gen, loc, base = texts[:n], texts[n: 2 * n], texts[2 * n: 3 * n], texts[3 * n:]
        runs[budget] = dict(
            texts=texts, info=out["info"],
            rel_em=sum(exact_match(t, r.target) for t, r in zip(rel, recs)) / n,
            gen_em=sum(exact_match(t, r.target) for t, r in zip(gen, recs)) / n,
            loc_em=sum(a == b for a, b in zip(loc, base)) / n,
            split_prompts=sum(L > budget for L in prompt_len[: 3 * n]),
        )
        log.info("budget %d: Rel EM %.3f, Gen EM %.3f, Loc %.3f; %d of %d prompts split; router %s", budget,
                 runs[budget]["rel_em"], runs[budget]["gen_em"], runs[budget]["loc_em"], runs[budget]["split_prompts"],
                 3 * n, out["info"])
    exact = runs[EXACT_BUDGET]["texts"]
    summary = {}
    for budget, r in runs.items():
        same = [a == b for a, b in zip(r["texts"], exact)]
        summary[str(budget)] = {k: r[k] for k in ("rel_em", "gen_em", "loc_em", "split_prompts")} | {
            "same_answer_as_exact": {k: sum(same[i * len(recs):(i + 1) * len(recs)]) / len(recs)
                                     for i, k in enumerate(("rel", "gen", "loc"))},
            "router": {k: r["info"][k] for k in ("decided", "routed", "chunked")},
        }
    report = dict(snapshot=args.snapshot, data=args.data, n=args.n, exact_budget=EXACT_BUDGET,
                  mean_prompt_tokens={k: sum(prompt_len[i * len(recs):(i + 1) * len(recs)]) / len(recs)
                                      for i, k in enumerate(("rel", "gen", "loc"))}, summary=summary)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
