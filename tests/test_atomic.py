"""memoir_vllm.atomic: whole-file replacement, no leftovers after a failure, umask-honouring modes."""
import os
import stat

import pytest

from memoir_vllm.atomic import atomic_dir, sha256_file, write_bytes_atomic, write_json_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "LATEST"
    path.write_text("v000001\n" + "x" * 1000)
    write_text_atomic(path, "v000002\n")
    assert path.read_text() == "v000002\n"
    assert os.listdir(tmp_path) == ["LATEST"]  # no temporary file left next to it


def test_json_and_bytes(tmp_path):
    write_json_atomic(tmp_path / "job.json", {"n_shards": 2})
    assert (tmp_path / "job.json").read_text() == '{\n  "n_shards": 2\n}'
    write_bytes_atomic(tmp_path / "blob", b"abc")
    assert sha256_file(tmp_path / "blob") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})  # fails before anything is written
    with pytest.raises(TypeError):
        write_bytes_atomic(path, "not bytes")  # fails inside the temporary file
    assert path.read_text() == '{\n  "ok": 1\n}' and os.listdir(tmp_path) == ["results.json"]


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    with atomic_dir(tmp_path / "v000001") as tmp:
        (tmp / "manifest.json").write_text("{}")
        assert not (tmp_path / "v000001").exists()
    assert (tmp_path / "v000001" / "manifest.json").read_text() == "{}"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(tmp_path / "v000002") as tmp:
            (tmp / "memory.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ["v000001"]  # the temporary directory is gone


def test_written_files_get_mode_666_minus_umask(tmp_path, umask_022):
    write_text_atomic(tmp_path / "LATEST", "v000001\n")  # mkstemp alone would give 0600
    with atomic_dir(tmp_path / "v000001") as tmp:
        (tmp / "memory.safetensors").touch(mode=0o600)  # as safetensors' own temporary file leaves it
    assert mode(tmp_path / "LATEST") == umask_022
    assert mode(tmp_path / "v000001" / "memory.safetensors") == umask_022


def test_a_snapshot_version_honours_the_umask(tmp_path, umask_022):
    from memoir_vllm.config import MemoirConfig
    from memoir_vllm.memory import ResidualMemory
    from memoir_vllm.snapshot import MemoryState, load_snapshot, save_snapshot

    memory = ResidualMemory(d_model=8, d_inner=16, k=4)
    version = save_snapshot(tmp_path, MemoryState(memory, [], MemoirConfig(), [], {"name": "toy"}, "mlp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".write.holder", ".write.lock", "LATEST", "v000001"]
    assert {p.name: mode(p) for p in version.iterdir()} == {
        "manifest.json": 0o644, "memory.safetensors": 0o644, "edits.parquet": 0o644}
    assert mode(tmp_path / "LATEST") == 0o644 and load_snapshot(tmp_path).memory.n_edits == 0


def test_a_store_under_a_file_is_refused_before_anything_is_written(tmp_path):
    from memoir_vllm.atomic import writable_dir
    from memoir_vllm.config import MemoirConfig
    from memoir_vllm.memory import ResidualMemory
    from memoir_vllm.snapshot import MemoryState, SnapshotError, save_snapshot

    assert writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and not any((tmp_path / "a" / "b").iterdir())
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError):
        writable_dir(tmp_path / "afile" / "store")
    state = MemoryState(ResidualMemory(d_model=8, d_inner=16, k=4), [], MemoirConfig(), [], {"name": "toy"}, "mlp")
    with pytest.raises(SnapshotError, match="cannot write snapshots to .*afile/store"):
        save_snapshot(tmp_path / "afile" / "store", state)
