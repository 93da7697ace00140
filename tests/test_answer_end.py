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
