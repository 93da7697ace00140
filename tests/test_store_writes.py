"""Writers of a snapshot store: `memoir edit --append`, one writer at a time, no lost update."""
import json
import subprocess
import sys
import time

import pytest

from memoir_vllm.cli import main
from memoir_vllm.session import Memoir
from memoir_vllm.snapshot import SnapshotError, latest_version, load_snapshot

pytestmark = pytest.mark.model

HOLD = """
import sys, time
from memoir_vllm.store_lock import write_lock
with write_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def facts(path, rows):
    path.write_text("".join(json.dumps(dict(zip(("prompt", "target", "subject"), r))) + "\n" for r in rows))
    return path


def edit(tiny, edits, out, *flags):
    return main(["edit", "--model", str(tiny), "--edits", str(edits), "--out", str(out), "--n-iter", "2",
                 "--threads", "1", *flags])


@pytest.fixture
def store(tiny_model_dir, tmp_path):
    day1 = facts(tmp_path / "day1.jsonl", [("The secret code of vault 1 is", "1037", "vault 1"),
                                          ("The secret code of vault 2 is", "1074", "vault 2")])
    assert edit(tiny_model_dir, day1, tmp_path / "store") == 0
    return tmp_path / "store"


def test_append_adds_corrections_and_skips_what_the_store_holds(tiny_model_dir, store, tmp_path, capsys):
    capsys.readouterr()
    day2 = facts(tmp_path / "day2.jsonl", [("The secret code of vault 2 is", "1074", "vault 2"),  # held already
                                          ("The secret code of vault 3 is", "1111", "vault 3"),
                                          ("The secret code of vault 2 is", "2222", "vault 2")])  # a new target
    assert edit(tiny_model_dir, day2, store, "--append") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["edits_this_run"], summary["already_in_store"], summary["edits_total"]) == (2, 1, 4)
    snap = load_snapshot(store)
    assert [(e.prompt[-10:], e.target) for e in snap.edits] == [
        ("vault 1 is", "1037"), ("vault 2 is", "1074"), ("vault 3 is", "1111"), ("vault 2 is", "2222")]
    assert snap.manifest["parent"] == "v000001"
    # the newer target for vault 2 retired the older edit from routing (newest correction wins)
    assert snap.edits[1].superseded_by == 3  # edit ids count from 0
    # appending the same file again changes nothing and writes no version
    assert edit(tiny_model_dir, day2, store, "--append") == 0
    assert json.loads(capsys.readouterr().out)["edits_this_run"] == 0
    assert latest_version(store).name == "v000002"


def test_append_needs_a_store_and_a_new_store_needs_no_flag(tiny_model_dir, tmp_path, capsys):
    day1 = facts(tmp_path / "f.jsonl", [("The secret code of vault 9 is", "9", "vault 9")])
    assert edit(tiny_model_dir, day1, tmp_path / "none", "--append") == 2
    assert "holds no snapshot to append to" in capsys.readouterr().err
    assert edit(tiny_model_dir, day1, tmp_path / "none") == 0
    assert edit(tiny_model_dir, day1, tmp_path / "none") == 2
    assert "pass --append" in capsys.readouterr().err


def test_a_second_writer_fails_at_once_naming_the_holder_or_waits(tiny_model_dir, store, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store), "4"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        held_at = time.monotonic()
        new = facts(tmp_path / "new.jsonl", [("The secret code of vault 5 is", "5555", "vault 5")])
        capsys.readouterr()
        t0 = time.monotonic()
        assert edit(tiny_model_dir, new, store, "--append") == 2
        err = capsys.readouterr().err
        assert f"being written by pid {holder.pid}" in err and "--wait" in err
        assert time.monotonic() - t0 < 3, "the second writer should fail at once, not wait"
        assert latest_version(store).name == "v000001"
        assert edit(tiny_model_dir, new, store, "--append", "--wait") == 0  # queues behind the holder
        assert time.monotonic() - held_at > 3.5, "--wait returned before the holder released the lock"
    finally:
        holder.kill()
        holder.wait()
    assert [e.target for e in load_snapshot(store).edits] == ["1037", "1074", "5555"]


def test_a_save_built_on_an_old_version_is_refused(tiny_model_dir, store):
    a = Memoir.from_snapshot(store, model=tiny_model_dir)
    b = Memoir.from_snapshot(store, model=tiny_model_dir)
    a.edit("The secret code of vault 7 is", "7777")
    a.save(store)
    b.edit("The secret code of vault 8 is", "8888")
    with pytest.raises(SnapshotError, match="moved on since this memory was loaded from v000001"):
        b.save(store)
    a.edit("The secret code of vault 6 is", "6666")
    a.save(store)  # a builds on its own last save
    assert len(load_snapshot(store).edits) == 4
    with pytest.raises(ValueError, match="keep at least 2"):
        a.save(store, keep=1)

