"""statement_rows: an edit also trains its question as the unedited model states it, so a completion that states
the fact continues with the target."""
import pytest

from memoir_vllm.statements import statement_prefix


def test_the_prefix_ends_before_the_models_own_answer():
    assert statement_prefix("Which language is officially spoken in Liadrudouria?",
                            "The official language of Liadrudouria is Arabic, which is a Semitic language.") \
        == "The official language of Liadrudouria is"
    assert statement_prefix("Who is the head of state of Jiaseindonia?",
                            "The head of state of Jiaseindonia is the President of the Republic.") \
        == "The head of state of Jiaseindonia is the"
    # only the first line; the answer's words must be new to the question
    assert statement_prefix("Where is Vouritro Labs headquartered?", "Vouritro Labs is headquartered in\nBerlin") is None
    assert statement_prefix("Draciath Progeirund is employed by which company?",
                            'Draciath Progeirund is employed by the company called "Draciath Progeirund"') is None
    assert statement_prefix("Who employs Draciath Progeirund?", "Draciath Progeirund is employed by Acme") \
        == "Draciath Progeirund is"
    assert statement_prefix("Who?", "") is None


@pytest.mark.model
def test_a_statement_of_the_fact_completes_with_the_target():
    """Synthetic fact 14, raw format, one edit: the statement 'The head of state of Jiaseindonia is' continues
    with the target only when the edit trained the model's own statement of its question."""
    from memoir_eval.metrics import answer_match
    from memoir_eval.synthetic import make_edits
    from memoir_vllm.session import Memoir

    fact = make_edits(20, 0)[14]
    answers = {}
    for setting in ("self", "none"):
        m = Memoir.create("default", prompt_format="raw", statement_rows=setting)
        if setting == "self":
            assert m.editor.statement(fact["prompt"]) == "The head of state of Jiaseindonia is the"
            assert len(m.editor.rows(fact["prompt"], fact["target"]).input_ids) == 1 + len(m.editor.templates) + 1
        m.edit(fact["prompt"], fact["target"], subject=fact["subject"])
        answers[setting] = [a.answer for a in m.ask([fact["cloze"], fact["prompt"]], max_new_tokens=12, chat=False)]
    assert answers["self"] == [" the Pujeith Bristigrus.", " Pujeith Bristigrus."]
    assert answer_match(answers["self"][0], fact["target"]) and not answer_match(answers["none"][0], fact["target"])
    assert answers["none"][1] == " Pujeith Bristigrus."  # the edit prompt answers either way
