"""Ray edit jobs on a real local Ray cluster (no mocks): shard streams, snapshots every N edits,
a killed worker, resume, the merged multi-shard snapshot, sharded serving and bad input.

The worker class (EditStream) is also tested on a local batch without a cluster."""
import json
import os
import signal
import time

import pytest
import torch

from memoir_vllm.cli import main
from memoir_vllm.edits import EditFileError
from memoir_vllm.hf import attach
from memoir_vllm.inference import score
from memoir_vllm.ray.jobs import RayJobError, compute_masks, connect, run_ray_job
from memoir_vllm.ray.mask_worker import MaskWorker
from memoir_vllm.session import Memoir
from memoir_vllm.ray.shards import merge_streams, shard_of, stream_dir, write_job_spec
from memoir_vllm.snapshot import SnapshotError, load_snapshot, read_manifest
from memoir_vllm.ray.stream import EditStream

pytestmark = [pytest.mark.ray, pytest.mark.model]

TINY = {"n_iter": 8}


def write_edits(path, n):
    rows = [{"prompt": f"The secret code of vault {i} is", "target": f"{1000 + 37 * i}"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def batch(ids):
    return {"edit_id": ids, "prompt": [f"The secret code of vault {i} is" for i in ids],
            "target": [f"{1000 + 37 * i}" for i in ids], "source": [f"v:{i}" for i in ids]}


@pytest.fixture(scope="module")
def cluster():
    import ray

    connect(None, num_cpus=2)
    yield
    ray.shutdown()


# -- the worker class, no cluster -------------------------------------------------------------------


def test_stream_worker_runs_a_local_batch_checkpoints_and_resumes(tiny_model_dir, tmp_path):
    store = tmp_path / "shard-000"
    s = EditStream(store, model=str(tiny_model_dir), settings=TINY, every=2, threads=1)
    out = s(batch([0, 3, 6]))
    assert out["edit_id"] == [0, 3, 6] and len(out["loss"]) == 3 and all(n >= 1 for n in out["steps"])
    assert read_manifest(store)["n_edits"] == 2  # a snapshot at 2 edits; the third is not saved yet
    assert s.finish().endswith("v000002") and read_manifest(store)["n_edits"] == 3
    with pytest.raises(ValueError, match="edit 3 comes after edit 6"):
        s(batch([3]))  # already applied: refused
    again = EditStream(store, model=str(tiny_model_dir), every=2, threads=1)  # resumes from the snapshot
    assert again.state()["edit_ids"] == [0, 3, 6]
    assert torch.equal(again.memoir.memory.weight, s.memoir.memory.weight)


def test_mask_worker_gives_each_edit_prompt_its_stored_mask(tiny_model_dir, tmp_path):
    store = tmp_path / "shard-000"
    stream = EditStream(store, model=str(tiny_model_dir), settings=TINY, every=10)
    stream(batch([0, 1, 2]))
    stream.finish()
    out = MaskWorker(store)({"prompt": [f"The secret code of vault {i} is" for i in range(3)] + ["Hello there"]})
    stored = load_snapshot(store).memory.index.masks(torch.arange(3))
    assert out["mask"][:3] == [m.nonzero().flatten().tolist() for m in stored]
    assert out["ratio"][:3] == [1.0, 1.0, 1.0] and out["edit_id"][0] == 0 and out["shard"][0] == 0


@pytest.fixture(scope="module")
def other_tiny_dir(tiny_model_dir, tmp_path_factory):
    """Another tiny random Llama (3 blocks): a different model for the mixing-models errors."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path_factory.mktemp("other-tiny")
    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.num_hidden_layers = 3
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    return other


def test_merge_refuses_streams_of_different_models(tiny_model_dir, other_tiny_dir, tmp_path):
    other = other_tiny_dir
    out = tmp_path / "job"
    write_job_spec(out, {"n_shards": 2})
    EditStream(stream_dir(out, 0), model=str(tiny_model_dir), settings={**TINY, "layer": 1}).finish()
    EditStream(stream_dir(out, 1), model=str(other), settings={**TINY, "layer": 1}).finish()
    with pytest.raises(SnapshotError, match="one job's streams must use one model"):
        merge_streams(out)
    assert not (out / "LATEST").exists()  # nothing half-written


# -- jobs on a local cluster ------------------------------------------------------------------------


def test_killed_worker_restarts_from_its_snapshot_and_equals_an_uninterrupted_run(cluster, tiny_model_dir, tmp_path):
    edits = write_edits(tmp_path / "vaults.jsonl", 16)
    killed = {}

    def kill_once(kind, shard, info):
        if kind == "open":
            killed.setdefault("pids", {})[shard] = info["pid"]
        if kind == "progress" and shard == 0 and info["done"] >= 4 and "at" not in killed:
            killed["at"] = info["done"]
            os.kill(killed["pids"][0], signal.SIGKILL)  # the actor process of shard 0, mid-stream

    job = dict(model=str(tiny_model_dir), workers=2, shards=2, every=3, chunk=1, settings=TINY, progress=False)
    summary = run_ray_job(edits, tmp_path / "killed", on_event=kill_once, **job)
    assert killed["at"] >= 4 and summary["restarts"] == {"0": 1}
    assert summary["per_shard"] == {"0": 8, "1": 8} and summary["edits_total"] == 16
    # the uninterrupted reference: each shard as a plain single-stream run in this process, then merged
    straight = tmp_path / "straight"
    write_job_spec(straight, {"n_shards": 2})
    threads = torch.get_num_threads()
    try:
        for s in range(2):
            stream = EditStream(stream_dir(straight, s), model=str(tiny_model_dir), settings=TINY, every=3, threads=1)
            stream(batch(list(range(s, 16, 2))))
            stream.finish()
    finally:
        torch.set_num_threads(threads)
    merge_streams(straight)
    a, b = load_snapshot(tmp_path / "killed"), load_snapshot(straight)
    # no edit lost or applied twice: every edit once, in file order, on its round-robin shard
    assert a.memory.index.edit_ids.tolist() == list(range(16))
    assert a.memory.index.shards.tolist() == [shard_of(i, 2) for i in range(16)]
    assert [e.prompt for e in a.edits] == [f"The secret code of vault {i} is" for i in range(16)]
    assert [(e.prompt, e.target) for e in a.edits] == [(e.prompt, e.target) for e in b.edits]
    assert a.memory.weight.shape[0] == 2 and torch.equal(a.memory.weight, b.memory.weight)
    assert torch.equal(a.memory.index.packed, b.memory.index.packed)
    # masks and routing of the edit prompts, computed in parallel against the merged snapshot
    routed = compute_masks(tmp_path / "killed", [f"The secret code of vault {i} is" for i in range(16)], workers=1,
                           batch_size=8)
    assert routed["mask"] == [m.nonzero().flatten().tolist() for m in a.memory.index.masks(torch.arange(16))]
    assert routed["ratio"] == [1.0] * 16
    # the merged shard s is exactly stream s's memory
    for s in range(2):
        stream = load_snapshot(stream_dir(tmp_path / "killed", s))
        assert torch.equal(stream.memory.weight[0], a.memory.weight[s])
        assert stream.memory.index.edit_ids.tolist() == list(range(s, 16, 2))


def test_cli_ray_job_resume_and_refusals(cluster, tiny_model_dir, other_tiny_dir, tmp_path, capsys):
    edits = write_edits(tmp_path / "v.jsonl", 4)
    out = tmp_path / "job"
    # more shards than workers: the shards run one after another on one actor at a time
    cmd = ["edit", "--ray", "--workers", "1", "--shards", "2", "--model", str(tiny_model_dir), "--edits", str(edits),
           "--out", str(out), "--checkpoint-every", "2", "--n-iter", "4"]
    assert main(cmd) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["per_shard"] == {"0": 2, "1": 2} and summary["edits_this_run"] == 4
    info = read_manifest(out)
    assert info["n_shards"] == 2 and info["n_edits"] == 4 and info["sharding"] == "round_robin"
    assert main(cmd) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(cmd[:5] + ["3"] + cmd[6:] + ["--resume"]) == 2  # --shards 3 for a 2-shard job
    assert "resume with --shards 2" in capsys.readouterr().err
    more = write_edits(tmp_path / "more.jsonl", 7)
    assert main([x if x != str(edits) else str(more) for x in cmd] + ["--resume"]) == 0  # 3 new edits
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_after"] == 4 and summary["edits_this_run"] == 3
    assert summary["per_shard"] == {"0": 4, "1": 3}
    assert read_manifest(out)["n_edits"] == 7 and read_manifest(out)["version"] == 2
    # resuming streams made with another model: refused by the workers, nothing written
    before = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())
    with pytest.raises(SnapshotError, match=r"made for model 'tiny-llama.*not for 'other-tiny"):
        run_ray_job(more, out, model=str(other_tiny_dir), workers=1, resume=True, progress=False)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()) == before


def test_bad_input_fails_fast_and_writes_nothing(cluster, tmp_path, capsys):
    edits = write_edits(tmp_path / "v.jsonl", 2)
    t0 = time.perf_counter()
    with pytest.raises(RayJobError, match="cannot reach the Ray cluster at 192.0.2.77:6379"):  # TEST-NET-1
        run_ray_job(edits, tmp_path / "a", address="192.0.2.77:6379", connect_timeout=1.0, progress=False)
    assert time.perf_counter() - t0 < 10
    assert main(["edit", "--ray", "--address", "127.0.0.1:1", "--edits", str(edits), "--out", str(tmp_path / "b")]) == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RayJobError, match="cannot write to --out .*afile/job"):
        run_ray_job(edits, afile / "job", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(EditFileError, match=r"bad\.jsonl:2: missing field"):
        run_ray_job(bad, tmp_path / "c", progress=False)
    for d in ("a", "b", "c"):
        assert not (tmp_path / d).exists()


def test_embedded_model_job_serves_each_prompt_from_its_shard(cluster, default_model_dir, zsre_records, tmp_path):
    recs = zsre_records[:4]
    edits = tmp_path / "zsre4.json"
    edits.write_text(json.dumps(recs))
    summary = run_ray_job(edits, tmp_path / "job", model="default", workers=2, shards=2, every=2,
                          settings={"n_background": 20}, progress=False)
    assert summary["per_shard"] == {"0": 2, "1": 2}
    merged = Memoir.from_snapshot(tmp_path / "job")
    assert merged.memory.n_shards == 2 and merged.memory.index.shards.tolist() == [0, 1, 0, 1]
    prompts, targets = [r["src"] for r in recs], [r["alt"] for r in recs]
    got = score(merged.model, merged.tok, merged.layer, prompts, targets, keep_logits=True)
    assert got.routing.row.tolist() == [0, 1, 2, 3]  # each prompt matches its own edit, on its own shard
    assert sum(got.token_acc) / 4 >= 0.75
    unrelated = score(merged.model, merged.tok, merged.layer, [recs[0]["loc"]], [recs[0]["loc_ans"]])
    assert unrelated.routing.row.tolist() == [-1]
    for s in range(2):  # logits equal those of the shard's own single-shard memory on the same model
        alone = attach(merged.model, load_snapshot(stream_dir(tmp_path / "job", s)).memory, merged.cfg.layer)
        mine = [i for i in range(4) if i % 2 == s]
        ref = score(merged.model, merged.tok, alone, [prompts[i] for i in mine], [targets[i] for i in mine],
                    keep_logits=True)
        for j, i in enumerate(mine):
            assert torch.allclose(got.target_logits[i], ref.target_logits[j], atol=1e-4)
