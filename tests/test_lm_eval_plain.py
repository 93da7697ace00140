"""The plain `lm_eval` command on an edited model, no memoir wrapper: lm-eval's own `vllm` model with memoir's
vLLM plugin (MEMOIR_SNAPSHOT), lm-eval's `hf` model on a `memoir export` directory, and lm-eval's
`local-completions` against `memoir serve`, on the packaged generate_until task, agree with memoir's model type."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.model]
pytest.importorskip("vllm")

BIN = Path(sys.executable).parent


def scores(out: Path) -> dict[str, dict]:
    (results,) = list(out.rglob("results_*.json"))
    return json.loads(results.read_text())["results"]


def test_lm_eval_vllm_model_with_the_plugin_agrees_with_memoir_lm_eval(edited, default_model_dir, zsre_path, tmp_path):
    from test_vllm_serving import _env

    m, reqs, _ = edited
    snap = m.save(tmp_path / "snap").parent
    tasks = subprocess.run([str(BIN / "memoir"), "tasks-path"], capture_output=True, text=True, check=True).stdout.strip()
    common = ["--tasks", "memoir_zsre_greedy", "--include_path", tasks, "--limit", str(len(reqs)),
              "--metadata", json.dumps({"data_dir": str(zsre_path.parents[1])})]
    env = {**_env(), "MEMOIR_SNAPSHOT": str(snap), "HF_DATASETS_OFFLINE": "1"}
    plain = subprocess.run([str(BIN / "lm_eval"), "--model", "vllm", "--model_args",
                            f"pretrained={default_model_dir},max_model_len=512,enforce_eager=True,dtype=float32",
                            "--output_path", str(tmp_path / "plain"), *common], env=env, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-4000:]
    env.pop("MEMOIR_SNAPSHOT")
    native = subprocess.run([str(BIN / "memoir"), "lm-eval", "--model_args", f"snapshot={snap}",
                             "--output_path", str(tmp_path / "native"), *common], env=env, capture_output=True, text=True)
    assert native.returncode == 0, native.stderr[-4000:]
    got, want = scores(tmp_path / "plain"), scores(tmp_path / "native")
    for task in ("memoir_zsre_rel_greedy", "memoir_zsre_gen_greedy"):
        for metric in ("em,none", "answer,none"):
            assert got[task][metric] == pytest.approx(want[task][metric], abs=0.02), (task, metric)
    assert want["memoir_zsre_rel_greedy"]["em,none"] > 0.5  # the edits answer: the comparison is not of zeros

    # lm-eval's own `hf` model on the directory `memoir export` writes (auto_map modeling code)
    exported = subprocess.run([str(BIN / "memoir"), "export", "--snapshot", str(snap), "--out", str(tmp_path / "hf")],
                              capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr[-4000:]
    hf = subprocess.run([str(BIN / "lm_eval"), "--model", "hf", "--model_args",
                         f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
                         "--output_path", str(tmp_path / "hf_out"), *common], env=env, capture_output=True, text=True)
    assert hf.returncode == 0, hf.stderr[-4000:]
    got = scores(tmp_path / "hf_out")
    for task in ("memoir_zsre_rel_greedy", "memoir_zsre_gen_greedy"):
        for metric in ("em,none", "answer,none"):
            assert got[task][metric] == pytest.approx(want[task][metric], abs=0.02), (task, metric)

    # lm-eval's local-completions model against `memoir serve` of the same snapshot: what lm-eval users run
    from memoir_vllm.vllm.server_process import ServerProcess

    with ServerProcess(snap, ["--max-model-len", "512"], log_path=tmp_path / "serve.log", env=_env()) as srv:
        served = subprocess.run([str(BIN / "lm_eval"), "--model", "local-completions", "--model_args",
                                 f"model=memoir,base_url={srv.url}/v1/completions,num_concurrent=1,max_retries=1,"
                                 f"tokenized_requests=False,tokenizer_backend=huggingface,tokenizer={default_model_dir}",
                                 "--output_path", str(tmp_path / "served"), *common], env=env, capture_output=True,
                                text=True)
    assert served.returncode == 0, served.stderr[-4000:]
    got = scores(tmp_path / "served")
    for task in ("memoir_zsre_rel_greedy", "memoir_zsre_gen_greedy"):
        assert got[task]["em,none"] == pytest.approx(want[task]["em,none"], abs=0.02), task
