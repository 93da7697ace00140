"""The chat form (#22, prompt_format="chat"; the default stays "raw" until it is measured): the marks a chat
template puts around a user message, and the routing span, the last user message's content."""
import pytest

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def test_marks_of_the_smollm2_template(tok):
    from memoir_vllm.chat import chat_marks

    marks = chat_marks(tok)
    assert tok.decode(list(marks.open)) == "<|im_end|>\n<|im_start|>user\n"
    assert tok.decode(list(marks.close)) == "<|im_end|>\n"


def test_the_routing_span_is_the_last_user_message(tok):
    from memoir_vllm.chat import chat_marks, render_chat, routing_span

    marks = chat_marks(tok)
    q = "What is the capital city of Norway?"
    one = render_chat(tok, [{"role": "user", "content": q}])
    s, e = routing_span(one, marks)
    assert tok.decode(one[s:e]) == q
    turns = render_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": q}])
    s, e = routing_span(turns, marks)
    assert tok.decode(turns[s:e]) == q
    raw = tok(q)["input_ids"]
    assert routing_span(raw, marks) == (0, len(raw))  # a plain completion routes from all its tokens
    assert routing_span(one, None) == (0, len(one))  # a raw-format memory has no marks


def test_chat_rows_end_with_the_end_of_turn(tok):
    from memoir_vllm.chat import chat_marks
    from memoir_vllm.tokens import encode_pairs

    marks = chat_marks(tok)
    b = encode_pairs(tok, ["What is the capital city of Norway?"] * 2, ["Bergen"] * 2, marks=marks,
                     chat=[True, False], end="period_eos")
    chat_row = b.input_ids[0][b.attention_mask[0].bool()].tolist()
    assert tok.decode(chat_row).endswith("<|im_start|>assistant\nBergen<|im_end|>")
    assert tok.decode(b.input_ids[0][b.route_mask[0]].tolist()) == "What is the capital city of Norway?"
    assert tok.decode(b.input_ids[1][b.route_mask[1]].tolist()) == "What is the capital city of Norway?"
