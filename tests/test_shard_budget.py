"""A shard budget: a memory opens a new W_m when its newest shard holds `shard_budget` edits, and never trains
or shrinks a full shard again (Python API, `memoir edit --append`, stores merged from Ray streams)."""
import json

import pytest
import torch

FACTS = [(f"Who founded {s}?", f"{s} Founder", s) for s in ("Acme", "Globex", "Initech", "Umbrella", "Hooli",
                                                              "Vandelay", "Wonka")]


@pytest.mark.model
def test_full_shards_are_closed_and_new_edits_open_a_new_one(tiny_model_dir, tmp_path):
    from memoir_vllm.session import Memoir
    from memoir_vllm.snapshot import snapshot_info

    m = Memoir.create(tiny_model_dir, n_iter=2, shard_budget=2)
    for p, t, s in FACTS[:3]:
        m.edit(p, t, subject=s)
    closed = m.memory.weight[0].detach().clone()
    assert m.memory.n_shards == 2 and m.memory.shard_fill() == [2, 1]
    for p, t, s in FACTS[3:5]:
        m.edit(p, t, subject=s)
    assert m.memory.shard_fill() == [2, 2, 1]
    assert m.memory.index.shards.tolist() == [0, 0, 1, 1, 2]
    assert torch.equal(m.memory.weight[0], closed)  # trained no more, not even by weight decay
    assert m.memory.weight[2].abs().sum() > 0
    path = m.save(tmp_path / "store")
    info = snapshot_info(path)
    assert (info["n_shards"], info["shard_fill"], info["shard_budget"]) == (3, [2, 2, 1], 2)

    again = Memoir.from_snapshot(path)  # an appending session keeps the store's budget
    for p, t, s in FACTS[5:7]:
        again.edit(p, t, subject=s)
    assert again.memory.shard_fill() == [2, 2, 2, 1]
    routed = again.ask([FACTS[0][0]])[0]
    assert routed.edit_id == 0  # an edit in a closed shard still routes


@pytest.mark.model
def test_streams_with_several_shards_merge_one_after_another(tiny_model_dir, tmp_path):
    from memoir_vllm.session import Memoir
    from memoir_vllm.ray.shards import merge_memories
    from memoir_vllm.snapshot import load_snapshot

    snaps = []
    for s in range(2):  # two round-robin streams of 3 edits each, 2 edits per shard
        m = Memoir.create(tiny_model_dir, n_iter=2, shard_budget=2)
        for i in range(s, 6, 2):
            p, t, s = FACTS[i]
            m.edit(p, t, edit_id=i, subject=s)
        snaps.append(load_snapshot(m.save(tmp_path / f"stream{s}")))
    memory, records = merge_memories(snaps)
    assert memory.n_shards == 4 and memory.shard_fill() == [2, 1, 2, 1]
    assert memory.index.edit_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert memory.index.shards.tolist() == [0, 2, 0, 2, 1, 3]  # stream 1's shards follow stream 0's
    assert torch.equal(memory.weight[2], snaps[1].memory.weight[0])
    assert [r.prompt for r in records] == [p for p, _, _ in FACTS[:6]]


def test_a_negative_shard_budget_is_refused():
    from memoir_vllm.config import MemoirConfig

    with pytest.raises(ValueError, match="shard_budget"):
        MemoirConfig(shard_budget=-1)
    assert json.loads(json.dumps(MemoirConfig().to_dict()))["shard_budget"] == 0
