"""`memoir export`: a snapshot and its model as a Hugging Face directory that plain transformers loads
(`trust_remote_code=True`), answering batched, left-padded `generate` calls exactly as `memoir ask`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def exported(edited, tmp_path_factory) -> Path:
    from memoir_vllm.export import export

    m, _, _ = edited
    tmp = tmp_path_factory.mktemp("export")
    m.save(tmp / "store")
    return export(tmp / "store", tmp / "hf")


def test_the_directory_holds_safetensors_the_snapshot_and_an_auto_map(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_memoir.MemoirForCausalLM"}
    assert config["architectures"] == ["LlamaForCausalLM"]  # vLLM still serves it as the base model
    assert (exported / "memoir" / "LATEST").read_text().strip() == config["memoir_export"]["version"]
    weights = {p.suffix for p in exported.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")}
    assert weights == {".safetensors"}


def test_batched_left_padded_generate_routes_each_row_like_memoir_ask(edited, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m, reqs, _ = edited
    prompts = [r.prompt for r in reqs] + [r.rephrase for r in reqs if r.rephrase]
    prompts += ["The Colosseum is located in the city of", "Who wrote the novel Dracula?"]  # unrelated: no edit
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    processors = []  # generate() adds the memory's answer processors (nonempty_answers), as memoir ask does
    add = model.memoir_router.generate_kwargs
    model.memoir_router.generate_kwargs = lambda a, kw: processors.append(add(a, kw)["logits_processor"]) or add(a, kw)
    tok = AutoTokenizer.from_pretrained(exported, padding_side="left")
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()  # rows of different lengths: the routing must skip the padding
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    got = [tok.decode(row, skip_special_tokens=True) for row in out[:, batch.input_ids.shape[1]:]]
    want = m.ask(prompts, max_new_tokens=8, chat=False)  # completions of the raw prompts, as generate() does
    assert got == [a.answer for a in want]
    assert [type(p).__name__ for p in processors[0]] == ["NonemptyAnswers"]
    ratio = model.memoir_router.layer.routing.ratio.tolist()  # each row's mask overlap, from its own tokens only
    assert ratio == pytest.approx([a.overlap for a in want], abs=1e-4)
    assert sum(a.edit_id is not None for a in want) >= len(reqs)  # the edits fire: not a comparison of base answers
    assert all(a.edit_id is None for a in want[-2:])


def test_export_refuses_an_existing_directory(exported):
    res = subprocess.run([str(Path(sys.executable).parent / "memoir"), "export", "--snapshot",
                          str(exported / "memoir"), "--out", str(exported)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "exists: choose another --out or pass --overwrite" in res.stderr
