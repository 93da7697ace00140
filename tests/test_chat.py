"""The chat form (#22, prompt_format="chat", what "auto", the default, picks for a chat model): the marks a chat
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


def test_the_memory_starts_at_the_content_so_a_system_prompt_is_the_base_models(default_model_dir):
    """memory_start "content" (the default): a routed chat request's system prompt and template header get no
    memory term (their outputs, and so their KV, are the base model's: a shared system prompt is prefix-cached
    across requests in vLLM), and the edit, trained the same way, still answers. "all" (the reference) differs."""
    import torch

    from memoir_vllm.chat import render_chat, routing_span
    from memoir_vllm.hf import routed
    from memoir_vllm.session import Memoir

    m = Memoir.create("default", prompt_format="chat")
    assert m.cfg.memory_start == "content" and m.memory.gates_content
    q = "What is the capital city of Australia?"
    m.edit(q, "Melbourne", subject="Australia")
    assert "Melbourne" in m.ask([q], max_new_tokens=8, chat=True)[0].answer

    ids = render_chat(m.tok, [{"role": "system", "content": "You are a terse geography assistant."},
                              {"role": "user", "content": q}])
    start, end = routing_span(ids, m.memory.marks)
    x = torch.tensor([ids])
    span = torch.zeros_like(x, dtype=torch.bool)
    span[0, start:end] = True

    def logits(on: bool) -> torch.Tensor:
        with torch.no_grad(), routed(m.layer, span if on else None, m.memory.candidates([q]) if on else None):
            return m.model(input_ids=x).logits[0]

    base, edited = logits(False), logits(True)
    assert int(m.layer.routing.row[0]) == 0  # routed to the edit
    assert torch.equal(edited[:start], base[:start])  # before the content: exactly the base model
    assert not torch.allclose(edited[start:], base[start:])
    m.memory.memory_start = "all"  # the reference: the memory term at every token
    assert not torch.allclose(logits(True)[:start], base[:start])


@pytest.mark.model
def test_a_chat_format_edit_trains_its_chat_rows_and_the_raw_rows_asked_for(tiny_model_dir):
    from memoir_vllm.session import Memoir

    for raw_rows, n_raw in (("plain", 1), ("templated", 11)):
        m = Memoir.create(tiny_model_dir, prompt_format="chat", chat_raw_rows=raw_rows, n_iter=1)
        b = m.editor.rows("Who painted the Starry Night?", "Claude Monet")
        chat_rows = [m.tok.decode(r).count("<|im_start|>user") == 1 for r in b.input_ids]
        assert chat_rows == [True] * 11 + [False] * n_raw, raw_rows
