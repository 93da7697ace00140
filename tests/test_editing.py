"""MEMOIR on the real embedded model: edits are answered, unrelated prompts are untouched,
batches route each row like one-at-a-time, and snapshots reproduce outputs exactly."""
import pytest
import torch

from memoir_vllm.config import MemoirConfig
from memoir_vllm.editor import converged, edit_loss, target_loss
from memoir_vllm.hf import routed
from memoir_vllm.inference import generate, score
from memoir_vllm.session import Memoir
from memoir_vllm.tokens import encode_pairs

pytestmark = pytest.mark.model


def norm(s: str) -> str:
    return " ".join(s.lower().replace(".", " ").split())


def test_edits_are_answered_with_their_new_targets(edited):
    m, reqs, answered = edited
    # greedy answer right after each edit: 2 of 3. With masks keyed by subject (the default) record 0 stops at
    # loss .12 after 30 steps and answers "1998." for "2006"; single edits of ZsRE records 0-11 answer 11 of 12
    # keyed and 12 of 12 unkeyed (mean final loss .061 vs .055), while 60 edits in one memory keep .783 of
    # their answers keyed against .383 (scripts/mask_key_effect.py, README)
    right = [norm(a.answer).startswith(norm(r.target)) for a, r in zip(answered, reqs)]
    assert sum(right) >= 2, [(r.target, a.answer) for a, r in zip(answered, reqs)]
    for a in answered:
        assert a.edit_id is not None and a.overlap == 1.0
    # after all three, every edit still routes to itself and is recalled under teacher forcing
    after = score(m.model, m.tok, m.layer, [r.prompt for r in reqs], [r.target for r in reqs])
    assert after.routing.row.tolist() == [0, 1, 2]
    # mean >= .9 with the target alone (answer_end none); 0.6, 1.0, 1.0 with period_eos, the default,
    # whose two more trained tokens per edit move W_m more (the greedy answers above still start right)
    assert sum(after.token_acc) / 3 >= 0.85


def test_unrelated_prompts_give_bit_identical_logits(edited, zsre_records):
    m, _, _ = edited
    unrelated = [r["loc"] for r in zsre_records[500:504]]
    answers = [r["loc_ans"] for r in zsre_records[500:504]]
    b = encode_pairs(m.tok, unrelated, answers)
    with torch.no_grad(), routed(m.layer, b.prompt_mask) as layer:
        with_memory = m.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        assert (layer.routing.row == -1).all()
    with torch.no_grad(), routed(m.layer, None):
        base = m.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.equal(with_memory, base)


def test_padded_batch_routes_and_answers_like_one_at_a_time(edited, zsre_records):
    m, reqs, _ = edited
    prompts = [reqs[0].prompt, zsre_records[700]["loc"], reqs[1].rephrase, reqs[2].prompt + " Answer briefly."]
    batch_text, batch_routing = generate(m.model, m.tok, m.layer, prompts, max_new_tokens=6)
    for i, p in enumerate(prompts):
        text, routing = generate(m.model, m.tok, m.layer, [p], max_new_tokens=6)
        assert text[0] == batch_text[i]
        assert routing.row.item() == batch_routing.row[i].item()
        assert routing.ratio.item() == pytest.approx(batch_routing.ratio[i].item(), abs=1e-6)
    # teacher-forced scores agree too (right padding in a batch of different lengths)
    targets = ["Paris", "the answer", reqs[1].target, reqs[2].target]
    batch = score(m.model, m.tok, m.layer, prompts, targets)
    for i in range(len(prompts)):
        single = score(m.model, m.tok, m.layer, [prompts[i]], [targets[i]])
        assert single.pred_tokens[0] == batch.pred_tokens[i]


def test_snapshot_round_trip_gives_identical_outputs(edited, tmp_path, zsre_records):
    m, reqs, _ = edited
    prompts = [r.prompt for r in reqs] + [reqs[0].rephrase, zsre_records[600]["loc"]]
    targets = [r.target for r in reqs] + [reqs[0].target, zsre_records[600]["loc_ans"]]
    path = m.save(tmp_path / "snap")
    loaded = Memoir.from_snapshot(tmp_path / "snap")
    assert loaded.parent.path == path and len(loaded.edits) == 3
    a = score(m.model, m.tok, m.layer, prompts, targets, keep_logits=True)
    b = score(loaded.model, loaded.tok, loaded.layer, prompts, targets, keep_logits=True)
    assert torch.equal(a.routing.row, b.routing.row)
    for x, y in zip(a.target_logits, b.target_logits):
        assert torch.equal(x, y)
    assert [x.to_dict() for x in m.ask(prompts)] == [x.to_dict() for x in loaded.ask(prompts)]


def test_disabled_edit_routes_to_base_model(edited, tmp_path):
    m, reqs, _ = edited
    snap = tmp_path / "snap"
    m.save(snap)
    loaded = Memoir.from_snapshot(snap)
    loaded.set_active(0, False)
    a = loaded.ask([reqs[0].prompt, reqs[1].prompt], max_new_tokens=6)
    assert a[0].edit_id != 0  # a disabled edit is never routed to
    if a[0].edit_id is None:  # and a request routed nowhere is the base model's answer
        assert a[0].answer == a[0].base_answer
    assert a[1].edit_id == 1


def test_fast_editor_follows_the_reference_loss_within_1e4(default_model_dir, zsre_records):
    # the preset's loss (the mean over rows + plain_weight 1 x the mean over the plain rows) at lr 40, a stable
    # rate: at the preset's 160 this record's loss jumps (11.9, 12.7, 29.1, 15.9), and the paths' 1e-6 float
    # differences grow past 1e-4 by the fifth step (7.2144 vs 7.2102)
    m = Memoir.create("default", n_iter=6, lr=40.0, stop_rule="reference", retries=0, exact_steps=0,
                      plain_weight=1.0)  # six steps each
    r = zsre_records[1]
    trajectories = {}
    for fast in (False, True):
        fresh = m.with_state(m.state.fresh())  # the same edit into an empty memory (the same columns)
        fresh.editor.cfg = m.cfg.__class__(**{**m.cfg.to_dict(), "fast": fast})
        trajectories[fast] = fresh.editor.edit(r["src"], r["alt"]).losses
    ref, fast = trajectories[False], trajectories[True]
    assert len(ref) == len(fast) == 6
    assert max(abs(x - y) for x, y in zip(ref, fast)) < 1e-4


def test_reference_loss_normalises_by_n_target_plus_one():
    logits = torch.zeros(1, 3, 4)  # uniform: CE = log 4 at each position
    b = encode_pairs.__globals__["PairBatch"](
        torch.tensor([[0, 1, 2]]), torch.ones(1, 3), torch.tensor([[True, False, False]]), torch.tensor([[False, True, True]]),
        torch.tensor([[True, False, False]]),
    )
    assert target_loss(logits, b).item() == pytest.approx(2 * torch.log(torch.tensor(4.0)).item() / 3)
    # plain_weight adds the mean over the rows without a template (here row 0) to the mean over all rows
    assert edit_loss(torch.tensor([1.0, 3.0, 5.0]), [0], 0.0).item() == 3.0
    assert edit_loss(torch.tensor([1.0, 3.0, 5.0]), [0], 2.0).item() == 3.0 + 2 * 1.0



def test_early_stop_rules():
    reference, loss_only = MemoirConfig(), MemoirConfig(stop_rule="loss")
    assert not converged([0.5, 0.03], reference) and not converged([0.5, 0.03], loss_only)
    assert not converged([0.03, 0.019], reference)  # low enough, but still moving by more than 1e-4
    assert converged([0.03, 0.019], loss_only)
    assert converged([0.01905, 0.019], reference)
    with pytest.raises(ValueError, match="stop_rule"):
        MemoirConfig(stop_rule="never")


def test_a_failed_edit_is_trained_again_from_its_state_before_at_half_the_lr():
    # lr 1e4 is far past the edge of stability: three steps end above half the first loss, so the edit is
    # retried from the memory as it was before it (the same first loss) at lr 5e3, which converges enough
    m = Memoir.create("default", n_iter=3, lr=1e4, retries=2, prompt_format="raw", exact_steps=0,
                      plain_weight=0)  # golden: raw rows, the mean over rows
    losses = m.editor.edit("What is the capital city of Norway?", "Bergen").losses
    assert len(losses) == 6 and losses[3] == pytest.approx(losses[0], abs=1e-6)
    assert losses[2] > 0.5 * losses[0] and losses[5] < 0.5 * losses[0]
    assert losses == pytest.approx([3.754, 3.578, 4.558, 3.754, 4.374, 1.227], abs=2e-3)
    once = Memoir.create("default", n_iter=3, lr=1e4, retries=0, prompt_format="raw", exact_steps=0,
                         plain_weight=0)  # kept as failed
    assert once.editor.edit("What is the capital city of Norway?", "Bergen").losses == pytest.approx(losses[:3], abs=1e-5)


def test_an_edit_that_the_loss_rule_leaves_wrong_answers_with_exact_steps_or_plain_weight():
    # synthetic fact 424 alone, raw rows: the loss rule runs its 30 steps (loss .18, a mean over eleven rows) and the
    # answer is " )"; with exact_steps the edit goes on until every target token of its plain row is the argmax (39
    # steps); with plain_weight 1 the plain row weighs as much as all rows, and 30 steps answer
    from memoir_eval.synthetic import make_edits

    fact = make_edits(425, 0)[424]
    assert (fact["prompt"], fact["target"]) == ("When was The Teikox Garden painted?", "1868")
    steps, answers = {}, {}
    for exact_steps, plain_weight in ((0, 0.0), (30, 0.0), (0, 1.0)):
        m = Memoir.create("default", prompt_format="raw", exact_steps=exact_steps, plain_weight=plain_weight)
        steps[exact_steps, plain_weight] = m.edit(fact["prompt"], fact["target"], subject=fact["subject"]).steps
        answers[exact_steps, plain_weight] = m.ask([fact["prompt"]], max_new_tokens=8, chat=False)[0].answer
    assert steps == {(0, 0.0): 30, (30, 0.0): 39, (0, 1.0): 30}
    assert answers == {(0, 0.0): " )", (30, 0.0): " 1868.", (0, 1.0): " 1868."}


def test_when_every_attempt_fails_the_edit_keeps_the_one_that_ended_lowest():
    # lr 5e4, two steps: the first attempt ends at loss 7.92, its retry at lr 2.5e4 at 8.75 (both above half the
    # first loss): the memory keeps the first attempt's weights, not the last's
    runs = {r: Memoir.create("default", n_iter=2, lr=5e4, retries=r, prompt_format="raw", exact_steps=0, plain_weight=0)
            for r in (0, 1)}
    for m in runs.values():
        m.editor.edit("What is the capital city of Norway?", "Bergen")
    assert torch.equal(runs[1].memory.weight, runs[0].memory.weight)
