"""Bad input gets a clear error naming the problem and the fix."""
import json

import pytest

from memoir_vllm.cli import main
from memoir_vllm.config import MemoirConfig
from memoir_vllm.edits import EditFileError, load_edits
from memoir_vllm.models import load_model
from memoir_vllm.session import Memoir
from memoir_vllm.snapshot import SnapshotError, load_snapshot


def write(path, text):
    path.write_text(text)
    return path


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.jsonl", '{"prompt": "a", "target": "b"}\n{"prompt": "c", "target": \n')
    with pytest.raises(EditFileError, match=r"bad\.jsonl:2: invalid JSON"):
        load_edits(f)


def test_missing_and_empty_fields_are_named(tmp_path):
    f = write(tmp_path / "e.jsonl", '{"prompt": "a", "target": "b"}\n{"prompt": "c", "answer": "d"}\n')
    with pytest.raises(EditFileError, match=r"e\.jsonl:2: missing field 'prompt' or 'target'"):
        load_edits(f)
    f = write(tmp_path / "e.json", json.dumps([{"prompt": "a", "target": "b"}, {"prompt": "c", "target": "  "}]))
    with pytest.raises(EditFileError, match=r"e\.json:record 1: field 'target' is empty"):
        load_edits(f)


def test_zsre_schema_is_accepted(zsre_path):
    edits = load_edits(zsre_path)
    assert len(edits) == 1037 and edits[0].target == "2006" and edits[0].rephrase and edits[0].unrelated


def test_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"tau=1.5 is outside \[0, 1\]"):
        MemoirConfig(tau=1.5)
    with pytest.raises(ValueError, match="k=2000 is larger than the FFN width D=1536"):
        MemoirConfig(k=2000).resolved(30, 1536)
    with pytest.raises(ValueError, match="layer=40 is outside the model's 30 blocks"):
        MemoirConfig(layer=40).resolved(30, 1536)


def test_missing_model_dir_and_unknown_architecture(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: pass a local Hugging Face model directory"):
        load_model(tmp_path / "nope")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=100)).save_pretrained(tmp_path / "neox")
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt_neox': memoir knows \[.*'llama'"):
        Memoir.create(tmp_path / "neox")


@pytest.mark.model
def test_prompt_longer_than_context_and_empty_target(tiny_model_dir):
    m = Memoir.create(tiny_model_dir)
    with pytest.raises(ValueError, match="longer than the model's context of 256"):
        m.edit("word " * 400, "x")
    with pytest.raises(ValueError, match="empty target"):
        m.edit("The sky is", "")


def test_unknown_or_missing_device_is_refused(tmp_path, monkeypatch, capsys):
    import torch

    from memoir_vllm.models import default_device

    monkeypatch.setenv("MEMOIR_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="not a torch device: use cpu, cuda or cuda:N"):
        default_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("MEMOIR_DEVICE", "cuda")
        with pytest.raises(ValueError, match="sees no CUDA GPU: use --device cpu"):
            default_device()
    f = write(tmp_path / "e.jsonl", '{"prompt": "a", "target": "b"}\n')
    assert main(["edit", "--ray", "--device", "cpu", "--edits", str(f), "--out", str(tmp_path / "s")]) == 2
    assert "--device is not passed to Ray workers" in capsys.readouterr().err


@pytest.mark.model
def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    f = write(tmp_path / "e.jsonl", '{"prompt": "a"}\n')
    assert main(["edit", "--edits", str(f), "--out", str(tmp_path / "s")]) == 2
    assert "e.jsonl:1: missing field" in capsys.readouterr().err
    assert main(["ask", "--snapshot", str(tmp_path / "none"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.model
def test_snapshot_for_another_model_or_corrupt_is_refused(tiny_model_dir, default_model_dir, tmp_path):
    m = Memoir.create(tiny_model_dir, n_iter=2)
    m.edit("The sky is", "green")
    snap = m.save(tmp_path / "s")
    with pytest.raises(SnapshotError, match=r"made for model 'tiny-llama.*not for 'SmolLM2"):
        Memoir.from_snapshot(tmp_path / "s", model=default_model_dir)
    weights = snap / "memory.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip one byte of the stored tensors
    weights.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="does not match its checksum"):
        load_snapshot(tmp_path / "s")
