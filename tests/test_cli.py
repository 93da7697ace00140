"""The `memoir` command end to end: edit, ask --json, snapshot info/disable, kill and --resume."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from memoir_vllm.cli import main
from memoir_vllm.snapshot import load_snapshot, read_manifest

pytestmark = pytest.mark.model


def write_edits(path, n):
    rows = [{"prompt": f"The secret code of vault {i} is", "target": f"{1000 + 37 * i}"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_edit_ask_info_disable(default_model_dir, tmp_path, capsys):
    edits = tmp_path / "facts.json"
    edits.write_text(json.dumps([
        {"prompt": "The Eiffel Tower is located in the city of", "target": "Rome"},
        {"prompt": "The author of the Harry Potter books is", "target": "Stephen King"},
    ]))
    out = tmp_path / "snap"
    assert main(["edit", "--edits", str(edits), "--out", str(out), "--threads", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["edits_total"] == 2 and summary["edits_this_run"] == 2
    assert summary["subjects_found"] == 2 and summary["subjects_found_first"][1]["subject"] == ["Harry Potter"]
    assert main(["ask", "--snapshot", str(out), "--json", "The Eiffel Tower is located in the city of",
                 "The capital of Japan is"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert set(lines[0]) == {"prompt", "answer", "base_answer", "edit_id", "overlap", "candidates"}
    assert lines[0]["answer"].strip().startswith("Rome") and lines[0]["edit_id"] == 0
    assert [(c["edit_id"], c["subject"], c["cosine"]) for c in lines[0]["candidates"]] == [(0, ["Eiffel Tower"], 1.0)]
    assert lines[1]["candidates"] == []  # names no edited subject: the base model, for a reason
    assert lines[1]["edit_id"] is None and lines[1]["answer"] == lines[1]["base_answer"]
    assert main(["snapshot", "disable", str(out), "0"]) == 0
    capsys.readouterr()
    assert main(["snapshot", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == 2 and info["n_edits"] == 2 and info["n_active"] == 1
    assert main(["ask", "--snapshot", str(out), "--json", "The Eiffel Tower is located in the city of"]) == 0
    assert json.loads(capsys.readouterr().out)["edit_id"] != 0


def test_killed_job_keeps_its_last_snapshot_and_resume_applies_no_edit_twice(tiny_model_dir, tmp_path):
    edits = write_edits(tmp_path / "vaults.jsonl", 24)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "memoir_vllm.cli", "edit", "--model", str(tiny_model_dir), "--edits", str(edits),
           "--out", str(out), "--checkpoint-every", "3", "--threads", "1", "--n-iter", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        latest = out / "LATEST"
        if latest.exists() and latest.read_text().strip() >= "v000002":
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    snap = load_snapshot(out)  # the last complete version loads and verifies
    done = len(snap.edits)
    assert 0 < done < 24 and done % 3 == 0
    assert main(["edit", "--model", str(tiny_model_dir), "--edits", str(edits), "--out", str(out), "--resume",
                 "--threads", "1"]) == 0
    resumed = load_snapshot(out)
    assert [e.prompt for e in resumed.edits] == [f"The secret code of vault {i} is" for i in range(24)]
    assert resumed.manifest["parent"] is not None
    # the same job without interruption writes the same memory
    straight = tmp_path / "straight"
    assert main(["edit", "--model", str(tiny_model_dir), "--edits", str(edits), "--out", str(straight),
                 "--threads", "1", "--n-iter", "20"]) == 0
    assert torch.allclose(load_snapshot(straight).memory.weight, resumed.memory.weight, atol=1e-6)
    assert read_manifest(straight)["n_edits"] == 24


def test_existing_store_needs_resume(tiny_model_dir, tmp_path, capsys):
    edits = write_edits(tmp_path / "v.jsonl", 2)
    out = tmp_path / "s"
    assert main(["edit", "--model", str(tiny_model_dir), "--edits", str(edits), "--out", str(out), "--n-iter", "2"]) == 0
    assert main(["edit", "--model", str(tiny_model_dir), "--edits", str(edits), "--out", str(out)]) == 2
    assert "pass --append" in capsys.readouterr().err
    other = write_edits(tmp_path / "o.jsonl", 3)
    other.write_text(other.read_text().replace("vault 0", "vault X"))
    assert main(["edit", "--edits", str(other), "--out", str(out), "--resume"]) == 2
    assert "differs from the edit file's record 0" in capsys.readouterr().err



def test_a_named_preset_from_the_command_line(tiny_model_dir, tmp_path):
    """`--preset reference` writes the paper's rule and editor; other flags still override the preset."""
    from memoir_vllm.config import default_config

    edits = write_edits(tmp_path / "v.jsonl", 1)
    out = tmp_path / "s"
    assert main(["edit", "--model", str(tiny_model_dir), "--edits", str(edits), "--out", str(out), "--n-iter", "2",
                 "--preset", "reference"]) == 0
    cfg = load_snapshot(out).config
    assert (cfg.routing, cfg.columns, cfg.lr, cfg.fast, cfg.decay, cfg.n_iter) == ("mask", "shared", 1.0, False, "coupled", 2)
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        default_config("llama", 30, 1536, preset="paper")
