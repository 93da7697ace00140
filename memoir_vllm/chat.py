"""Chat-format prompts and the routing span: which prompt tokens a request is routed from.

One rule for every path (the editor, `memoir ask`, evaluation, the vLLM op, which sees only token ids):

    routing_span(ids, marks) = the content of the LAST user message when ids hold a chat-template
                               rendering (found by the template's own marker tokens), else all of ids

A memory made in the raw format (the reference: no chat) has no marks, so every prompt routes from all
its tokens, as in the paper. A memory made in the chat format stores the marks its tokenizer's template
renders (`chat_marks`), so the raw question, its chat form and a multi-turn chat ending in it route
from the same content tokens, not from the template's system prompt and role headers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatMarks:
    """The token sequences a chat template puts around a user message's content.

    For SmolLM2 (ChatML): open = `<|im_end|>\\n<|im_start|>user\\n`, close = `<|im_end|>\\n`.
    """

    open: tuple[int, ...]  # tokens right before a user message's content
    close: tuple[int, ...]  # tokens right after it (end of turn)

    def to_dict(self) -> dict[str, list[int]]:
        return {"open": list(self.open), "close": list(self.close)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ChatMarks | None":
        if not d:
            return None
        return cls(tuple(int(x) for x in d["open"]), tuple(int(x) for x in d["close"]))


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _ids(rendered: Any) -> list[int]:
    """apply_chat_template's token ids, whatever container this transformers version returns."""
    if isinstance(rendered, list):
        return [int(x) for x in rendered]
    return [int(x) for x in rendered["input_ids"]]


def render_chat(tok, messages: list[dict[str, str]], generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template."""
    return _ids(tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True))


def chat_prompt_ids(tok, text: str) -> list[int]:
    """Token ids of `text` as one user message, ready for the assistant's answer (what
    /v1/chat/completions sends the model for a one-message chat)."""
    return render_chat(tok, [{"role": "user", "content": text}])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix(a: list[int], b: list[int]) -> int:
    return _common_prefix(a[::-1], b[::-1])


def chat_marks(tok) -> ChatMarks | None:
    """The marks of the tokenizer's chat template, found by rendering probe chats; None without a template.

    The content of a one-message chat is where the renderings of two different contents differ; `open`
    is what precedes a user message both as the first and as a later turn, `close` what follows one
    both with and without the generation prompt and before the assistant's turn.
    """
    if not has_chat_template(tok):
        return None

    def user(text: str) -> dict[str, str]:
        return {"role": "user", "content": text}

    a, b = render_chat(tok, [user("a")]), render_chat(tok, [user("b")])
    p, s = _common_prefix(a, b), _common_suffix(a, b)
    if p + s >= len(a):
        raise ValueError("could not find the user content in this tokenizer's chat template: use prompt_format='raw'")
    turns = [user("a"), {"role": "assistant", "content": "b"}]
    three_c, three_d = render_chat(tok, turns + [user("c")]), render_chat(tok, turns + [user("d")])
    p3 = _common_prefix(three_c, three_d)
    opened = _common_suffix(a[:p], three_c[:p3])
    after = a[len(a) - s:]
    after_plain = render_chat(tok, [user("a")], generation_prompt=False)[p + 1:]
    after_turn = three_c[p + 1:]  # the first user message "a" is one token at p in both renderings
    closed = min(_common_prefix(after, after_plain), _common_prefix(after, after_turn))
    if opened == 0 or closed == 0:
        raise ValueError("this tokenizer's chat template has no marker tokens around user messages: use "
                         "prompt_format='raw'")
    return ChatMarks(tuple(a[p - opened:p]), tuple(after[:closed]))


def _find_last(ids: list[int], seq: tuple[int, ...], end: int) -> int:
    """Start of the last occurrence of seq in ids[:end], or -1."""
    n = len(seq)
    for i in range(end - n, -1, -1):
        if tuple(ids[i:i + n]) == seq:
            return i
    return -1


def _find_first(ids: list[int], seq: tuple[int, ...], start: int) -> int:
    n = len(seq)
    for i in range(start, len(ids) - n + 1):
        if tuple(ids[i:i + n]) == seq:
            return i
    return len(ids)


def routing_span(ids: list[int], marks: ChatMarks | None) -> tuple[int, int]:
    """[start, end) of the prompt tokens that route: the last user message's content in a chat rendering,
    else the whole prompt."""
    if marks is None or not ids:
        return 0, len(ids)
    at = _find_last(ids, marks.open, len(ids))
    if at < 0:
        return 0, len(ids)
    start = at + len(marks.open)
    end = _find_first(ids, marks.close, start)
    if end <= start:  # an empty user message: route from the whole prompt
        return 0, len(ids)
    return start, end
