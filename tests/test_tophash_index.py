"""TopHash masks and the MaskIndex: known overlaps, bit packing, disable."""
import pytest
import torch

from memoir_vllm.routing.index import MaskIndex, pack_masks, unpack_masks
from memoir_vllm.memory import ResidualMemory
from memoir_vllm.routing.tophash import indices_to_mask, make_permutation, prompt_feature, tophash


def mask_of(indices, d=16):
    return indices_to_mask(torch.tensor([indices]), d)


def test_pack_layout_is_little_endian_bits_golden_bytes():
    m = mask_of([0, 3, 8, 15])  # bits 0 and 3 of byte 0, bits 0 and 7 of byte 1
    assert pack_masks(m).tolist() == [[0b00001001, 0b10000001]]


def test_pack_unpack_round_trip_with_ragged_width():
    torch.manual_seed(0)
    masks = torch.rand(50, 1531) < 0.3  # D not a multiple of 8
    packed = pack_masks(masks)
    assert packed.shape == (50, 192) and packed.dtype == torch.uint8
    assert torch.equal(unpack_masks(packed, 1531), masks)


def test_best_match_returns_known_overlaps():
    index = MaskIndex(d_inner=16, k=4)
    index.add(torch.cat([mask_of([0, 1, 2, 3]), mask_of([4, 5, 6, 7]), mask_of([0, 1, 6, 7])]), torch.tensor([10, 11, 12]))
    query = torch.cat([mask_of([0, 1, 2, 9]), mask_of([6, 7, 4, 12]), mask_of([12, 13, 14, 15])])
    assert index.overlaps(query).tolist() == [[3, 0, 2], [0, 3, 2], [0, 0, 0]]
    ratio, row = index.best_match(query)
    assert ratio.tolist() == [0.75, 0.75, 0.0]
    assert row.tolist()[:2] == [0, 1]


def test_disabled_edit_is_never_matched():
    index = MaskIndex(d_inner=16, k=4)
    index.add(torch.cat([mask_of([0, 1, 2, 3]), mask_of([0, 1, 6, 7])]), torch.tensor([0, 1]))
    index.set_active(0, False)
    ratio, row = index.best_match(mask_of([0, 1, 2, 3]))
    assert row.item() == 1 and ratio.item() == 0.5
    index.set_active(1, False)
    ratio, row = index.best_match(mask_of([0, 1, 2, 3]))
    assert row.item() == -1 and ratio.item() == 0.0


def test_chunked_overlaps_equal_dense_cache():
    torch.manual_seed(1)
    stored = torch.rand(300, 64) < 0.25
    query = torch.rand(5, 64) < 0.25
    dense = MaskIndex(64, 16)
    chunked = MaskIndex(64, 16, dense_cache_bytes=0)
    for idx in (dense, chunked):
        idx.add(stored, torch.arange(300))
    assert torch.equal(dense.overlaps(query), chunked.overlaps(query, chunk=7))


def test_tophash_uses_abs_topk_then_the_stored_permutation():
    perm = make_permutation(8, seed=0)
    v = torch.tensor([[0.1, -5.0, 0.2, 3.0, 0.0, 0.0, -0.3, 0.05]])
    idx = tophash(v, 2, perm)
    assert sorted(idx[0].tolist()) == sorted([perm[1].item(), perm[3].item()])
    assert torch.equal(make_permutation(8, seed=0), perm)  # seeded: reproducible
    assert not torch.equal(make_permutation(1000, seed=1), make_permutation(1000, seed=0))


def test_feature_excludes_padding_and_subtracts_background():
    acts = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # last position is padding
    pm = torch.tensor([[True, True, False]])
    bg = torch.tensor([1.0, 1.0])
    assert prompt_feature(acts, pm, bg, "mean_decentered").tolist() == [[1.0, 2.0]]
    assert prompt_feature(acts, pm, None, "last").tolist() == [[3.0, 4.0]]


def test_memory_routes_by_tau_and_rejects_bad_settings():
    mem = ResidualMemory(d_model=4, d_inner=16, k=4, tau=0.6)
    mem.add_edit(torch.tensor([0, 1, 2, 3]))
    row, best, ratio = mem.route(torch.tensor([[0, 1, 2, 9], [0, 1, 8, 9]]))
    assert row.tolist() == [0, -1] and best.tolist() == [0, 0] and ratio.tolist() == [0.75, 0.5]
    with pytest.raises(ValueError, match="larger than the FFN width"):
        ResidualMemory(4, 16, k=17)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        ResidualMemory(4, 16, k=4, tau=1.5)
