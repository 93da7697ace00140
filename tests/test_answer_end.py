"""Answers that end: what an edit trains after its target, and the metrics that see repetition."""
import pytest

from memoir_eval.metrics import answer_match, repeats


def test_repetition_and_whole_answer_metrics():
    assert repeats(" gold gold gold gold") == 1.0 and repeats(" Volkswagen Group.") == 0.0
    assert repeats(" the Nile River is the Nile River the Nile River is Egypt") == 1.0
    assert answer_match(" Volkswagen Group.", "Volkswagen Group") == 1.0
    assert answer_match(" Volkswagen Group Group Group", "Volkswagen Group") == 0.0
    assert answer_match(" The X-Files.\nMore text", "The X-Files") == 1.0


@pytest.mark.model
def test_answer_end_tokens_follow_the_target_in_training_rows_only(default_model_dir):
    from transformers import AutoTokenizer

    from memoir_vllm.tokens import answer_end_ids, encode_pairs, pair_ids

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    eos, period = tok.eos_token_id, tok(".", add_special_tokens=False)["input_ids"]
    assert answer_end_ids(tok, "Rome", "none") == []
    assert answer_end_ids(tok, "Rome", "eos") == [eos]
    assert answer_end_ids(tok, "Rome", "period_eos") == period + [eos]
    assert answer_end_ids(tok, "Washington, D.C.", "period_eos") == [eos]  # no second period
    assert answer_end_ids(tok, "Rome", "newline") == tok("\n", add_special_tokens=False)["input_ids"]
    plain, n = pair_ids(tok, "The Eiffel Tower is in", "Rome")
    ended, n2 = pair_ids(tok, "The Eiffel Tower is in", "Rome", "period_eos")
    assert n == n2 and ended == plain + period + [eos]
    b = encode_pairs(tok, ["The Eiffel Tower is in"], ["Rome"], end="period_eos")
    assert int(b.target_mask.sum()) == len(plain) - n + len(period) + 1  # the end is trained like the target
    with pytest.raises(ValueError, match="answer_end 'tab'"):
        answer_end_ids(tok, "Rome", "tab")


@pytest.mark.model
def test_a_routed_answer_never_ends_before_it_starts(default_model_dir, tmp_path):
    import torch

    from memoir_eval.synthetic import make_edits
    from memoir_vllm.inference import block_end_tokens
    from memoir_vllm.session import Memoir

    # the edit's rows end with "." and end-of-text; its raw paraphrase reads to the memory like a finished
    # answer: with any first token allowed the routed answer is empty, with nonempty_answers (the default) the
    # end token is blocked at the first step and the target comes out. (plain_weight 0: with the preset's 1 the
    # plain row's stronger weight leaves this paraphrase answering " Pujeith Bristigrus." either way)
    f = make_edits(30, 0)[14]
    m = Memoir.create("default", prompt_format="raw", plain_weight=0)
    m.edit(f["prompt"], f["target"], subject=f["subject"])
    assert m.memory.end_ids == (m.tok.eos_token_id,)  # SmolLM2's end-of-text is its end of turn too
    answer = m.ask([f["rephrase"]])[0]
    assert (f["rephrase"], answer.edit_id, answer.answer) == ("Who leads Jiaseindonia as head of state?", 0,
                                                              " Pujeith Bristigrus.")
    ends, m.memory.end_ids = m.memory.end_ids, ()
    assert m.ask([f["rephrase"]])[0].answer == ""
    m.memory.end_ids = ends
    m.save(tmp_path / "store")
    assert Memoir.from_snapshot(tmp_path / "store").memory.end_ids == ends  # kept in the snapshot
    assert Memoir.create("default", nonempty_answers=False).memory.end_ids == ()  # and the reference preset's
    logits = torch.zeros(2, 4)
    assert block_end_tokens(logits, torch.tensor([True, False]), (1, 3)).tolist() == [
        [0, float("-inf"), 0, float("-inf")], [0, 0, 0, 0]]
