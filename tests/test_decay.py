"""Weight decay: the reference preset keeps its exact trajectory (golden losses, pinned before the
decay rule became a setting); the default decoupled rule shrinks only the trained shard, by the same
factor whatever the learning rate."""
import pytest
import torch

from memoir_vllm.config import MemoirConfig, preset
from memoir_vllm.editor import decay_step

# the tiny test model (conftest.tiny_model_dir), reference preset, n_iter 5: the losses of the code
# before `decay` existed (torch SGD's own weight_decay), and sum / sum of squares of W_m after
GOLDEN_LOSSES = [
    [7.176463603973389, 7.140681266784668, 7.106846332550049, 7.075015544891357, 7.045185565948486],
    [5.360645771026611, 5.3364691734313965, 5.313177108764648, 5.29100227355957, 5.270106792449951],
    [7.219364643096924, 7.202381610870361, 7.185602188110352, 7.169050693511963, 7.152747631072998],
]
GOLDEN_W_SUM, GOLDEN_W_SQ = -1.0626555681228638, 1.7520536184310913


def one_step(lr: float, decay: str, wd: float = 0.1) -> torch.Tensor:
    """W_m of two shards after one zero-gradient step that trains shard 1 (as SequentialEditor.edit does)."""
    from memoir_vllm.memory import ResidualMemory

    mem = ResidualMemory(3, 4, 2, n_shards=2)
    with torch.no_grad():
        mem.weight.fill_(1.0)
    with mem.trainable(1) as w:
        w.grad = torch.zeros_like(w)
        opt = torch.optim.SGD([w], lr=lr)
        with decay_step(w, MemoirConfig(decay=decay, weight_decay=wd)):
            opt.step()
    return mem.weight.detach()


def test_decoupled_decay_shrinks_the_trained_shard_by_the_same_factor_at_any_lr():
    for lr in (1.0, 10.0):
        w = one_step(lr, "decoupled")
        assert torch.allclose(w[1], torch.full((3, 4), 0.9)) and torch.equal(w[0], torch.ones(3, 4))
    assert one_step(1.0, "decoupled", wd=0.0).eq(1.0).all()


def test_coupled_decay_is_the_optimizers_l2_term_and_grows_with_lr():
    assert torch.allclose(one_step(1.0, "coupled")[1], torch.full((3, 4), 0.9))
    w = one_step(5.0, "coupled")
    assert torch.allclose(w[1], torch.full((3, 4), 0.5)) and torch.equal(w[0], torch.ones(3, 4))


def test_presets_choose_their_decay_rule():
    assert preset("reference").decay == "coupled" and preset("reference").weight_decay == 1e-5
    assert MemoirConfig().decay == "decoupled"  # the generic rule for an unknown model carries no lr coupling
    assert MemoirConfig.from_dict({"lr": 10.0}).decay == "coupled"  # stored before the setting existed
    with pytest.raises(ValueError, match="decay"):
        MemoirConfig(decay="sometimes")
    with pytest.raises(ValueError, match="weight_decay"):
        MemoirConfig(weight_decay=1.5)


@pytest.mark.model
def test_reference_preset_trajectory_is_unchanged(reference_run):
    m, losses = reference_run
    for got, want in zip(losses, GOLDEN_LOSSES):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    w = m.memory.weight.detach()
    assert float(w.sum()) == pytest.approx(GOLDEN_W_SUM, rel=1e-5)
    assert float((w * w).sum()) == pytest.approx(GOLDEN_W_SQ, rel=1e-5)
