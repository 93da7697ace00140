"""Every architecture in the table: the memory attaches to the right module, the fast editor follows
the reference loss, an edit routes to itself, and an empty memory leaves the logits bit-identical."""
import pytest
import torch
import transformers as tf

from memoir_vllm.config import ARCHITECTURES
from memoir_vllm.hf import MemoirLayer, get_module, routed
from memoir_vllm.session import Memoir
from memoir_vllm.tokens import encode_pairs

TINY = {
    "llama": (tf.LlamaConfig, dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": (tf.MistralConfig, dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": (tf.Qwen2Config, dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "gemma3_text": (tf.Gemma3TextConfig, dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=8)),
    "gpt2": (tf.GPT2Config, dict(n_embd=32, n_head=4, n_positions=256)),
    "gptj": (tf.GPTJConfig, dict(n_embd=32, n_head=4, rotary_dim=4, n_positions=256)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(default_model_dir):
    return default_model_dir


def make_model(kind, tokenizer_dir, path):
    cls, kw = TINY[kind]
    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    n_layers = {"gpt2": "n_layer", "gptj": "n_layer"}.get(kind, "num_hidden_layers")
    cfg = cls(vocab_size=len(tok), **{n_layers: 3}, **kw)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_table_covers_the_required_families():
    assert {"llama", "mistral", "qwen2", "gemma3_text", "gpt2", "gptj"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_attach_edit_and_route(kind, tokenizer_dir, tmp_path):
    # the editor is driven directly below (no edit records, so no subjects): route by the paper's mask rule
    m = Memoir.create(make_model(kind, tokenizer_dir, tmp_path / kind), n_iter=3, stop_loss=-1.0, lr=1.0,
                      routing="mask")
    spec = ARCHITECTURES[kind]
    assert isinstance(get_module(m.model, f"{spec.layers}.{m.cfg.layer}.{spec.down_proj}"), MemoirLayer)
    prompts, targets = ["The color of the sky is", "Paris is the capital of"], ["green", "France"]
    b = encode_pairs(m.tok, prompts, targets)
    with torch.no_grad(), routed(m.layer, b.prompt_mask):
        empty = m.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    with torch.no_grad(), routed(m.layer, None):
        base = m.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.equal(empty, base)
    losses = {}
    for fast in (False, True):
        m.memory.weight.data.zero_()
        m.editor.cfg = m.cfg.__class__(**{**m.cfg.to_dict(), "fast": fast})
        losses[fast] = m.editor.edit(prompts[0], targets[0]).losses
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) < 1e-4
    assert m.memory.weight.abs().sum() > 0
    answer = m.ask([prompts[0]], max_new_tokens=2)[0]
    assert answer.edit_id is not None and answer.overlap == 1.0
