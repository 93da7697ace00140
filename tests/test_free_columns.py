"""Free columns (columns="free"): each edit writes k columns of W_m that no other edit of its shard wrote, a new
shard opens when fewer than k are free, and a request takes its subject's best candidate with no mask overlap,
so no edit retrains another's columns."""
import pytest
import torch

FACTS = [(f"Who founded {s}?", f"{s} Founder", s) for s in ("Acme", "Globex", "Initech", "Umbrella", "Hooli")]


def free_memory(d_inner: int = 16, k: int = 6):
    from memoir_vllm.memory import ResidualMemory

    return ResidualMemory(8, d_inner, k, rule="subject", columns="free")


def test_an_edit_takes_the_free_columns_its_feature_ranks_first():
    mem = free_memory()
    v = torch.arange(16, dtype=torch.float32).view(1, -1) - 3.5  # |v| largest at the last positions
    first = mem.free_columns_for(v, shard=0)[0]
    assert first.tolist() == sorted(mem.perm[10:].tolist())  # TopHash's choice when every column is free
    mem.add_edit(first)
    second = mem.free_columns_for(v, shard=0)[0]
    assert not set(second.tolist()) & set(first.tolist())  # the next best columns, none shared
    assert sorted(mem.perm[[9, 8, 0, 7, 1, 6]].tolist()) == second.tolist()  # |v| 5.5, 4.5, 3.5, 3.5, 2.5, 2.5
    mem.add_edit(second)
    assert mem.n_free(0) == 4 and mem.n_free(1) == 16
    with pytest.raises(ValueError, match="4 free columns.*open a new shard"):
        mem.free_columns_for(v, shard=0)


def test_free_columns_need_the_subject_rule():
    from memoir_vllm.config import MemoirConfig
    from memoir_vllm.memory import ResidualMemory

    with pytest.raises(ValueError, match="columns='free' needs routing='subject'"):
        MemoirConfig(routing="mask", columns="free")
    with pytest.raises(ValueError, match="subject rule"):
        ResidualMemory(8, 16, 6, rule="mask", columns="free")
    assert MemoirConfig.from_dict({}).columns == "shared"  # stores written before the setting


def test_a_request_takes_its_first_candidate_without_a_mask_overlap():
    mem = free_memory()
    mem.add_edit(torch.tensor([0, 1, 2, 3, 4, 5]))
    mem.add_edit(torch.tensor([6, 7, 8, 9, 10, 11]))
    query = torch.tensor([[10, 11, 12, 13, 14, 15]])  # overlaps only edit 1, and only by 2 of 6
    d = mem.decide_masks(query, torch.tensor([[0, 1]]))
    assert d.row.tolist() == [0] and d.mask[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    mem.index.set_active(0, False)
    assert mem.decide_masks(query, torch.tensor([[0, 1]])).row.tolist() == [1]
    assert mem.decide_masks(query, torch.tensor([[-1, -1]])).row.tolist() == [-1]


def test_a_threshold_changes_nothing_under_free_columns_and_says_so(caplog):
    mem = free_memory()
    mem.add_edit(torch.tensor([0, 1, 2, 3, 4, 5]))
    query = torch.tensor([[10, 11, 12, 13, 14, 15]])  # no overlap with edit 0
    mem.set_threshold(1.0)
    assert "changes nothing under free columns" in caplog.text
    assert mem.decide_masks(query, torch.tensor([[0]])).row.tolist() == [0]


@pytest.mark.model
def test_edits_share_no_column_and_full_shards_open_new_ones(tiny_model_dir, tmp_path):
    from memoir_vllm.session import Memoir
    from memoir_vllm.snapshot import snapshot_info

    m = Memoir.create(tiny_model_dir, n_iter=2, columns="free", k=64)  # D = 128: two edits per shard
    for p, t, s in FACTS[:3]:
        m.edit(p, t, subject=s)
    masks = m.memory.index.masks(torch.arange(3))
    assert m.memory.index.shards.tolist() == [0, 0, 1]
    assert not (masks[0] & masks[1]).any()  # one shard, no shared column
    closed = m.memory.weight[0].detach().clone()
    again = Memoir.from_snapshot(m.save(tmp_path / "store"))  # the setting travels with the store
    assert again.cfg.columns == "free" and snapshot_info(tmp_path / "store")["shard_fill"] == [2, 1]
    for p, t, s in FACTS[3:5]:
        again.edit(p, t, subject=s)
    assert again.memory.index.shards.tolist() == [0, 0, 1, 1, 2]
    assert torch.equal(again.memory.weight[0], closed)
    assert [a.edit_id for a in again.ask([FACTS[0][0], FACTS[3][0], "Who founded Oracle?"])] == [0, 3, None]


def test_the_embedded_models_preset_writes_free_columns_unless_shared_ones_are_asked_for():
    from memoir_vllm.config import default_config

    shape = ("llama", 30, 1536)  # SmolLM2-135M
    free = default_config(*shape)
    assert (free.columns, free.k, free.lr) == ("free", 64, 160.0)
    for ask in (dict(columns="shared"), dict(routing="mask")):
        shared = default_config(*shape, **ask)
        assert (shared.columns, shared.k, shared.lr) == ("shared", 439, 10.0)
    assert default_config(*shape, k=32).k == 32  # an explicit setting still wins
    assert default_config("llama", 32, 14336).columns == "shared"  # no measurement on other models yet
