"""A tiny snapshot's contents, pinned: the reference run of tests/conftest.py (3 edits on the tiny
model, reference preset, n_iter 5) saved and loaded back. Tensor checksums and table values, not file
bytes (manifests carry timestamps; Parquet bytes depend on the pyarrow version)."""
import json

import pyarrow.parquet as pq
import pytest
import torch

from conftest import GOLDEN_FACTS
from test_decay import GOLDEN_W_SQ, GOLDEN_W_SUM

pytestmark = pytest.mark.model

# sum of each stored mask's column indices (k = 37 of D = 128) and their first five columns
GOLDEN_MASK_SUMS = [2400, 2511, 2507]
GOLDEN_MASK_HEADS = [[1, 9, 10, 15, 16], [0, 7, 8, 9, 13], [4, 7, 11, 13, 19]]
GOLDEN_BACKGROUND_SUM, GOLDEN_BACKGROUND_SQ = 0.03427489101886749, 0.0018835586961358786
GOLDEN_PERM_HEAD = [44, 94, 121, 13, 31, 116, 71, 84]  # torch.randperm(128) under seed 0


@pytest.fixture(scope="module")
def saved(reference_run, tmp_path_factory):
    m, _ = reference_run
    return m.save(tmp_path_factory.mktemp("golden") / "store")


def test_snapshot_tensors_match_their_golden_checksums(saved):
    from memoir_vllm.snapshot import load_snapshot

    mem = load_snapshot(saved).memory
    assert float(mem.weight.detach().sum()) == pytest.approx(GOLDEN_W_SUM, rel=1e-5)
    assert float((mem.weight.detach() ** 2).sum()) == pytest.approx(GOLDEN_W_SQ, rel=1e-5)
    assert float(mem.background.sum()) == pytest.approx(GOLDEN_BACKGROUND_SUM, rel=1e-4)
    assert float((mem.background ** 2).sum()) == pytest.approx(GOLDEN_BACKGROUND_SQ, rel=1e-4)
    assert mem.perm[:8].tolist() == GOLDEN_PERM_HEAD
    masks = mem.index.masks(torch.arange(3))
    assert [int(r.nonzero().sum()) for r in masks] == GOLDEN_MASK_SUMS


def test_snapshot_table_and_manifest_hold_the_golden_values(saved):
    table = pq.read_table(saved / "edits.parquet").to_pydict()
    assert table["edit_id"] == [0, 1, 2] and table["shard"] == [0, 0, 0] and table["active"] == [True] * 3
    assert list(zip(table["prompt"], table["target"])) == GOLDEN_FACTS
    assert [len(m) for m in table["mask"]] == [37] * 3 and [m[:5] for m in table["mask"]] == GOLDEN_MASK_HEADS
    assert [sum(m) for m in table["mask"]] == GOLDEN_MASK_SUMS
    manifest = json.loads((saved / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("version", "parent", "layer", "d_model", "d_inner", "dtype", "k", "seed",
                                     "tau", "feature", "n_shards", "n_edits", "n_active", "module")} == {
        "version": 1, "parent": None, "layer": 1, "d_model": 64, "d_inner": 128, "dtype": "float32", "k": 37,
        "seed": 0, "tau": 0.4, "feature": "mean_decentered", "n_shards": 1, "n_edits": 3, "n_active": 3,
        "module": "model.layers.1.mlp.down_proj"}
    assert manifest["config"]["decay"] == "coupled" and manifest["config"]["weight_decay"] == 1e-5
