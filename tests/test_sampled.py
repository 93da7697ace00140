"""Long streams measured in less time: only some edits trained, the others written for routing alone."""
import pytest
import torch

from memoir_eval.sampled import edit_stream, parse_slices, sampled_rows
from memoir_vllm.edits import EditRequest

FACTS = [("The capital of Freedonia is", "Fredville", "Freedonia"), ("The Eiffel Tower is in", "Rome", "Eiffel Tower"),
         ("Water boils at", "ninety degrees", "Water")]
SETTINGS = dict(routing="subject", columns="free", k=16, n_iter=3, exact_steps=0, retries=0, statement_rows="self")


def test_slices_select_positions_of_the_stream():
    assert parse_slices("0:2,8:10", 10) == [0, 1, 8, 9]
    assert parse_slices("::4,5", 10) == [0, 4, 5, 8]
    assert parse_slices(None, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="not a slice; give e.g. 0:100,900:1000"):
        parse_slices("first100", 1000)
    with pytest.raises(ValueError, match="selects none of the 10 edits"):
        parse_slices("20:30", 10)


def _columns(m, edit: int) -> torch.Tensor:
    mask = m.memory.index.masks(torch.tensor([edit]))[0].bool()
    return m.memory.weight[m.memory.index.shards[edit]][:, mask]


def test_an_untrained_edit_routes_like_a_trained_one_and_keeps_its_columns_zero(tiny_model_dir):
    from memoir_vllm.session import Memoir

    requests = [EditRequest(p, t, subject=(s,)) for p, t, s in FACTS]
    full, sampled = Memoir.create(tiny_model_dir, **SETTINGS), Memoir.create(tiny_model_dir, **SETTINGS)
    edit_stream(full, requests, None, progress=False)
    seen = []
    edit_stream(sampled, requests, {0, 2}, progress=False, after_each=lambda i, r: seen.append((i, r.steps)))
    assert [(i, steps > 0) for i, steps in seen] == [(0, True), (1, False), (2, True)]
    assert (sampled.cfg.n_iter, sampled.cfg.statement_rows) == (3, "self")  # back after the untrained run
    assert torch.equal(sampled.memory.index.masks(torch.arange(3)), full.memory.index.masks(torch.arange(3)))
    assert _columns(sampled, 1).abs().sum() == 0 and _columns(full, 1).abs().sum() > 0
    assert torch.equal(_columns(sampled, 2), _columns(full, 2))  # trained from zero on its own columns alike
    # edit 0's columns differ only by the decay edit 1's steps applied in the full store
    torch.testing.assert_close(_columns(sampled, 0), _columns(full, 0), rtol=1e-3, atol=1e-6)
    asked = sampled.ask([p for p, _, _ in FACTS], max_new_tokens=2)
    assert [a.edit_id for a in asked] == [a.edit_id for a in full.ask([p for p, _, _ in FACTS], max_new_tokens=2)]
    assert asked[1].edit_id == 1 and asked[1].answer == asked[1].base_answer  # routed, with nothing to add


def test_a_sampled_stream_needs_free_columns(tiny_model_dir):
    from memoir_vllm.session import Memoir

    m = Memoir.create(tiny_model_dir, **dict(SETTINGS, columns="shared"))
    with pytest.raises(ValueError, match="needs columns='free'.*drop --train or use --columns free"):
        edit_stream(m, [EditRequest(*FACTS[0][:2])], {0}, progress=False)


def test_sampled_rows_keep_the_trained_edits_and_bound_locality_from_below():
    rows = [dict(rel=1.0, loc=1.0, loc_row=-1, neigh_row=1, neigh_changed=0.0),  # neighbour routed to untrained 1
            dict(rel=0.0, loc=1.0, loc_row=-1),
            dict(rel=1.0, loc=1.0, loc_row=0, neigh_row=2, neigh_changed=0.0)]  # routed to trained edits: as measured
    got = sampled_rows(rows, {0, 2})
    assert [(r["position"], r["loc"], r["neigh_changed"]) for r in got] == [(0, 1.0, 1.0), (2, 1.0, 0.0)]
    assert sampled_rows([dict(loc=1.0, loc_row=1)], {0})[0]["loc"] == 0.0
