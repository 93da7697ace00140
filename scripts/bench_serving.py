"""Serving throughput and TTFT of one vLLM engine with the memoir memory (1k / 10k edits) vs without.

    PYTHONPATH=. python scripts/bench_serving.py --batches 32 128 --edits 1000 10000 --max-tokens 32 \
        --out runs/bench_serving.json

The memory is synthesized, not trained: for the 25% of the benchmark prompts that should match,
their real TopHash masks (computed with the transformers model at the snapshot's layer), their ZsRE
subjects and their sentence-encoder question vectors are stored as edits; the other edits get random
k-of-D masks, invented subjects (`memoir make-edits` names, which no benchmark prompt names) and random
question vectors; W_m is small Gaussian noise. Under the subject rule (`--routing subject`, the default)
a matching request names its edit's subject, so the engine runs the automaton, the sentence encoder and
the candidate decision for it, as for trained edits (routing and the memory term do not depend on the
values); `--routing mask` measures the paper's rule (every request scans the whole index).
Each configuration runs in its own engine process (fresh, same settings: fp32, enforce_eager unless --compile,
prefix caching off so repeats measure compute); configurations alternate over --rounds and the best
round is kept (the machine is shared). Because engines started at different times see different
machine load, each memoir engine also measures itself with the memory switched off
(`memoir_enable(False)` puts vLLM's own down_proj back and stops routing) in ABBA order over
--repeats: `paired_throughput_ratio` is the median of those on/off ratios, the less noisy number. Output tokens/s = generated tokens / wall time of
generate() with every request submitted at once (max_num_seqs = batch); TTFT = wall time of the
same batch with max_tokens=1 (all requests arrive together, so this is every request's TTFT).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_serving")


def load_prompts(n: int) -> list[tuple[str, str]]:
    """n distinct ZsRE questions with their subjects ($MEMOIR_DATA/zsre), else the packaged background texts
    (subject: the automatic rule's)."""
    data = Path(os.environ.get("MEMOIR_DATA", REPO.parent / "shared" / "data")) / "zsre" / "zsre_mend_edit.json"
    if data.exists():
        seen, out = set(), []
        for r in json.loads(data.read_text()):
            if r["src"] not in seen and r.get("subject") and r["subject"].lower() in r["src"].lower():
                seen.add(r["src"])
                out.append((r["src"], r["subject"]))
            if len(out) == n:
                return out
    from memoir_vllm.session import builtin_background
    from memoir_vllm.routing.subjects import auto_subject

    texts = [t + f" ({i})" for i, t in enumerate(builtin_background())][:n]
    texts += [f"Background text {i}." for i in range(len(texts), n)]
    return [(t, auto_subject(t)) for t in texts]


def synth_snapshot(out: Path, n_edits: int, match: list[tuple[str, str]], tau: float, routing: str,
                   seed: int = 0, memory_start: str | None = None, n_shards: int = 1) -> Path:
    """A snapshot with n_edits edits: the real masks, subjects and question vectors of the `match` prompts
    first, random masks and vectors with invented subjects after. memory_start set: a chat-format memory (the
    tokenizer's chat marks; matched masks from each prompt's user message in the chat template) whose memory
    term starts at the content ("content") or at every token ("all"). n_shards > 1: edit i in shard i mod
    n_shards (round-robin, so the matched edits, the first ones, are spread over every shard)."""
    import torch

    from memoir_vllm.config import default_config
    from memoir_vllm.editor import compute_background
    from memoir_vllm.hf import attach, capturing, down_proj_path, model_dims
    from memoir_vllm.memory import empty_memory
    from memoir_vllm.models import load_model, model_identity
    from memoir_vllm.session import builtin_background
    from memoir_eval.synthetic import make_edits
    from memoir_vllm.snapshot import EditRecord, MemoryState, save_snapshot
    from memoir_vllm.tokens import encode_prompts

    model, tok = load_model("default")
    n_layers, d_model, d_inner = model_dims(model)
    chat = memory_start is not None
    cfg = default_config(model.config.model_type, n_layers, d_inner, tau=tau, routing=routing, memory_start=memory_start,
                         prompt_format="chat" if chat else "raw").resolved(n_layers, d_inner)
    from memoir_vllm.chat import chat_marks

    memory = empty_memory(d_model, d_inner, cfg, n_shards=n_shards, marks=chat_marks(tok) if chat else None)
    match_prompts = [p for p, _ in match]
    layer = attach(model, memory, cfg.layer)
    memory.background.copy_(compute_background(model, tok, layer, builtin_background()[: cfg.n_background]))
    masks = []
    for p in match_prompts:  # one at a time: no padding
        b = encode_prompts(tok, [p], marks=memory.marks, chat=chat)
        ids, attn = b.input_ids, b.attention_mask
        with capturing(layer), torch.no_grad():
            model(input_ids=ids, attention_mask=attn, use_cache=False)
        masks.append(memory.masks_from_acts(layer.captured, b.route_mask))  # [1, k]
    gen = torch.Generator().manual_seed(seed)
    n_rand = n_edits - len(masks)
    rand = torch.rand(n_rand, d_inner, generator=gen).topk(cfg.k, dim=1).indices.sort(dim=1).values  # [n, k]
    from memoir_vllm.routing.tophash import indices_to_mask

    all_idx = torch.cat(masks + [rand])  # [n_edits, k]
    memory.index.add(indices_to_mask(all_idx, d_inner), torch.arange(n_edits), torch.arange(n_edits) % n_shards)
    with torch.no_grad():
        memory.weight.normal_(0.0, 1e-3, generator=gen)
    invented = make_edits(n_rand, seed) if n_rand > 0 else []
    edits = [EditRecord(p, "x", "synthetic", subject=(s,)) for p, s in match]
    edits += [EditRecord(r["prompt"], "x", "synthetic", subject=(r["subject"],)) for r in invented]
    edits = edits[:n_edits]
    for e in edits:
        memory.subjects.add(e.subject, e.prompt)
    if routing == "subject" and cfg.subject_check == "encoder":  # the matched edits' real vectors, random for the rest
        for i in range(len(match_prompts), len(edits)):
            v = torch.randn(384, generator=gen)
            memory.subjects.vectors[i] = v / v.norm()
            memory.subjects.missing.discard(i)
        memory.fill_vectors()
    state = MemoryState(memory, edits, cfg, [], {**model_identity(model), "path": "default"},
                        down_proj_path(model, cfg.layer))
    return save_snapshot(out, state, keep=2)


def chat_prompts(questions: list[str], system_tokens: int) -> list[str]:
    """Each question as the user message of a chat rendering after one shared system prompt of about
    system_tokens tokens (the packaged background texts)."""
    from transformers import AutoTokenizer

    from memoir_vllm.models import default_model_dir
    from memoir_vllm.session import builtin_background

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    system, texts = "", iter(builtin_background())
    while len(tok(system)["input_ids"]) < system_tokens:
        system += next(texts) + " "
    return [tok.apply_chat_template([{"role": "system", "content": system.strip()}, {"role": "user", "content": q}],
                                    tokenize=False, add_generation_prompt=True) for q in questions]


def prefix_hit_rate(llm) -> float | None:
    """Share of prompt tokens served from the prefix cache so far (vLLM's counters), None without them."""
    vals = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    hits, queries = vals.get("vllm:prefix_cache_hits"), vals.get("vllm:prefix_cache_queries")
    return hits / queries if hits is not None and queries else None


def run_engine(snapshot: str | None, prompts: list[str], batches: list[int], max_tokens: int, repeats: int,
               compile: bool = False, prefix_caching: bool = False) -> dict:
    """(child process) one engine; every batch size: throughput and TTFT, best of `repeats`."""
    from vllm import LLM, SamplingParams

    from memoir_vllm.models import default_model_dir

    kw = dict(model=str(default_model_dir()), dtype="float32", max_model_len=1024 if prefix_caching else 256,
              enforce_eager=not compile, seed=0, max_num_seqs=max(batches), enable_prefix_caching=prefix_caching,
              max_num_batched_tokens=8192, disable_log_stats=not prefix_caching)  # stats: the prefix-cache hit rate
    if snapshot:
        kw.update(hf_overrides={"memoir_snapshot": snapshot},
                  worker_extension_cls="memoir_vllm.vllm.plugin.MemoirWorkerExtension")
    t0 = time.perf_counter()
    llm = LLM(**kw)
    init_s = time.perf_counter() - t0
    llm.generate(prompts[-4:], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    out: dict = {"init_s": init_s}

    served = [0]  # prompts handed out so far (with prefix caching every batch is new prompts)

    def fresh(batch: list[str]) -> list[str]:
        if not prefix_caching:
            return batch  # the same batch again: prefix caching is off, repeats measure compute
        start = served[0]
        served[0] += len(batch)
        return [prompts[(start + i) % len(prompts)] for i in range(len(batch))]

    def measure(batch: list[str]) -> tuple[float, float]:
        t0 = time.perf_counter()
        res = llm.generate(fresh(batch), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
        tps = sum(len(r.outputs[0].token_ids) for r in res) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        llm.generate(fresh(batch), SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        return tps, time.perf_counter() - t0

    for b in batches:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        if not snapshot:
            runs = [measure(batch) for _ in range(repeats)]
            out[str(b)] = {"tokens_per_s": max(x[0] for x in runs), "ttft_s": min(x[1] for x in runs)}
            continue
        # paired: the same engine with the memory on and switched off (memoir_enable), in ABBA order
        on, off = [], []
        for r in range(repeats):
            for enabled in ((True, False) if r % 2 == 0 else (False, True)):
                llm.collective_rpc("memoir_enable", args=(enabled,))
                (on if enabled else off).append(measure(batch))
        llm.collective_rpc("memoir_enable", args=(True,))
        ratios = [a[0] / o[0] for a, o in zip(on, off)]
        out[str(b)] = {"tokens_per_s": max(x[0] for x in on), "ttft_s": min(x[1] for x in on),
                       "off_tokens_per_s": max(x[0] for x in off), "off_ttft_s": min(x[1] for x in off),
                       "paired_throughput_ratios": ratios, "paired_throughput_ratio": statistics.median(ratios),
                       "paired_ttft_ratio": statistics.median(a[1] / o[1] for a, o in zip(on, off))}
    if snapshot:
        out["memoir_info"] = llm.collective_rpc("memoir_info")[0]
    out["prefix_cache_hit_rate"] = prefix_hit_rate(llm) if prefix_caching else None  # stats are on with caching
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--edits", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--match", type=float, default=0.25, help="fraction of requests whose prompt matches an edit")
    p.add_argument("--tau", type=float, default=0.6, help="the mask rule's threshold (--routing mask)")
    p.add_argument("--routing", choices=["subject", "mask"], default="subject",
                   help="routing rule of the synthesized snapshots (default: subject, the default for new memories)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4, help="paired on/off measurements per batch (ABBA order)")
    p.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (default: enforce_eager)")
    p.add_argument("--system-tokens", type=int, default=0,
                   help="N > 0: chat requests after one shared system prompt of ~N tokens, prefix caching on, and "
                        "chat-format memories whose memory term starts at the content and at every token "
                        "(memoir_content_E / memoir_all_E): what a shared system prompt costs")
    p.add_argument("--shards", type=int, nargs="+", default=[1],
                   help="W_m shards of each memory (edits round-robin over them); several values: one engine each")
    p.add_argument("--out", default="runs/bench_serving.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # with a system prompt (prefix caching on) every measured batch is new questions: 2 batches per measurement
    n_prompts = max(args.batches) * (4 * args.repeats + 1 if args.system_tokens else 1)
    pairs = load_prompts(n_prompts)  # (prompt, subject)
    prompts = [p for p, _ in pairs]
    if args.system_tokens:
        prompts = chat_prompts(prompts, args.system_tokens)
    if args.child:  # child: run one engine config and print JSON
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(run_engine(spec["snapshot"], prompts, args.batches, args.max_tokens,
                                                args.repeats, args.compile, bool(args.system_tokens))), flush=True)
        return
    work = Path(args.out).parent / "bench_serving_snaps"
    match = pairs[:: round(1 / args.match)]  # every 4th prompt matches at the default 25%
    snaps: dict[str, str | None] = {"base": None}
    for n in args.edits:
        for start in (("content", "all") if args.system_tokens else (None,)):
            for s in args.shards:
                t0 = time.perf_counter()
                name = (f"memoir_{start}_{n}" if start else f"memoir_{n}") + (f"_S{s}" if s > 1 else "")
                snaps[name] = str(synth_snapshot(work / name, n, match, args.tau, args.routing, memory_start=start,
                                                 n_shards=s))
                log.info("synthesized %s in %.1f s", name, time.perf_counter() - t0)
    env = dict(os.environ, VLLM_TARGET_DEVICE=os.environ.get("VLLM_TARGET_DEVICE", "cpu"),
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("MEMOIR_SNAPSHOT", None)
    results: dict[str, list[dict]] = {k: [] for k in snaps}
    for r in range(args.rounds):
        for name, snap in snaps.items():
            cmd = [sys.executable, __file__, "--child", json.dumps({"snapshot": snap}), "--batches",
                   *map(str, args.batches), "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats),
                   "--system-tokens", str(args.system_tokens)]
            cmd += ["--compile"] if args.compile else []
            t0 = time.perf_counter()
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode != 0 or not line:
                raise RuntimeError(f"{name} engine failed:\n{res.stderr[-3000:]}")
            results[name].append(json.loads(line[0][7:]))
            log.info("round %d %s (%.0f s): %s", r, name, time.perf_counter() - t0, line[0][7:300])
    summary = {}
    for b in map(str, args.batches):
        base_tps = max(x[b]["tokens_per_s"] for x in results["base"])
        base_ttft = min(x[b]["ttft_s"] for x in results["base"])
        row = {"base_tokens_per_s": base_tps, "base_ttft_s": base_ttft,
               "base_prefix_cache_hit_rate": results["base"][-1].get("prefix_cache_hit_rate")}
        for name in snaps:
            if name == "base":
                continue
            tps = max(x[b]["tokens_per_s"] for x in results[name])
            ttft = min(x[b]["ttft_s"] for x in results[name])
            # median over every paired on/off measurement of every round
            row[name] = {"tokens_per_s": tps, "ttft_s": ttft, "throughput_ratio": tps / base_tps, "ttft_ratio": ttft / base_ttft,
                         "paired_throughput_ratio": statistics.median(r for x in results[name] for r in x[b]["paired_throughput_ratios"]),
                         "paired_ttft_ratio": statistics.median(x[b]["paired_ttft_ratio"] for x in results[name]),
                         "memory_off_tokens_per_s": max(x[b]["off_tokens_per_s"] for x in results[name]),
                         "prefix_cache_hit_rate": results[name][-1].get("prefix_cache_hit_rate")}
        summary[b] = row
    report = {"args": vars(args), "n_matching_prompts": len(match), "summary": summary, "raw": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    for b, row in summary.items():
        for name, v in row.items():
            if isinstance(v, dict):
                log.info("batch %s %s: %.1f tok/s vs %.1f base engine (ratio %.3f), paired on/off ratio %.3f; "
                         "TTFT %.3f s vs %.3f (ratio %.3f), paired %.3f", b, name, v["tokens_per_s"],
                         row["base_tokens_per_s"], v["throughput_ratio"], v["paired_throughput_ratio"], v["ttft_s"],
                         row["base_ttft_s"], v["ttft_ratio"], v["paired_ttft_ratio"])


if __name__ == "__main__":
    main()
