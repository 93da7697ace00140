"""MemoirConfig and the per-architecture table of edited modules.

One place for each fact: which module is the FFN down-projection of each supported
architecture lives in ARCHITECTURES, the measured per-model defaults in MODEL_PRESETS.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ArchSpec:
    """Where the edited FFN output projection sits in a transformers model of one family."""

    layers: str  # dotted path from the *CausalLM to the list of decoder blocks
    down_proj: str  # dotted path from one block to the FFN output projection
    final_norm: str  # dotted path from the *CausalLM to the final norm (fast editing)
    lm_head: str = "lm_head"
    # True when the block output is `residual + down_proj(...)`, so the memory term adds to
    # the residual stream unchanged (lets the fast editor cache the frozen prefix).
    residual_additive: bool = True


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "mistral": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "qwen2": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "qwen3": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    # Gemma 3 normalises the FFN output before the residual add (post_feedforward_layernorm)
    "gemma3_text": ArchSpec("model.layers", "mlp.down_proj", "model.norm", residual_additive=False),
    "gemma2": ArchSpec("model.layers", "mlp.down_proj", "model.norm", residual_additive=False),
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out", "transformer.ln_f"),
}


FEATURES = ("mean_decentered", "mean", "last")
ROUTING_RULES = ("subject", "mask")
SUBJECT_CHECKS = ("encoder", "none")
PROMPT_FORMATS = ("auto", "chat", "raw")
STOP_RULES = ("reference", "loss")
DECAY_RULES = ("coupled", "decoupled")
COLUMN_RULES = ("shared", "free")


def arch_spec(model_type: str) -> ArchSpec:
    """The ArchSpec of a transformers `config.model_type`, or a clear error listing the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {model_type!r}: memoir knows {sorted(ARCHITECTURES)}. "
            "Add an ArchSpec for it to memoir_vllm.config.ARCHITECTURES."
        ) from None


def _setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A MemoirConfig field a user may set; its help and choices become the CLI flag (cli_args.py)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class MemoirConfig:
    """Every setting of a MEMOIR memory and its editor. None means 'derive from the model'.

    Each field carries its own help text: the `memoir` flags are generated from these fields.
    """

    layer: int | None = _setting(None, "edited block (default ~0.85 of depth)")
    k: int | None = _setting(None, "ones per TopHash mask (default round(0.286*D))")
    tau: float = _setting(0.5, "routing threshold on overlap/k in [0, 1] (0.4 in the paper)")
    seed: int = _setting(0, "seed of the stored TopHash permutation")
    feature: str = _setting("mean_decentered", "prompt feature", FEATURES)
    routing: str = _setting("subject", "routing rule: subject (an edit is a candidate only for requests that name its "
                            "subject; among the candidates that pass the second stage the best mask overlap >= "
                            "subject_tau routes, or under free columns the first) or mask (the paper's: the best "
                            "overlap over all edits >= tau)", ROUTING_RULES)
    subject_tau: float = _setting(0.3, "routing threshold on overlap/k among the subject's candidates (routing=subject "
                                  "with shared columns; free columns read no overlap)")
    subject_check: str = _setting("encoder", "second stage of the subject rule: encoder (a candidate must also ask "
                                  "the edit's question: cosine of all-MiniLM-L6-v2 vectors of the request and the "
                                  "edit prompt, the subject masked in both, >= check_tau) or none", SUBJECT_CHECKS)
    check_tau: float = _setting(0.6, "threshold of the encoder check (cosine in [-1, 1]; calibrated with "
                                "answer_type on `memoir make-edits` same-subject questions, README Routing)")
    untyped_tau: float = _setting(0.65, "encoder cosine a candidate needs when only one of the two questions names a "
                                  "kind of answer (answer_type); the stricter of it and check_tau applies; 0: "
                                  "check_tau alone (older stores). Measured in README Routing")
    answer_type: bool = _setting(True, "second stage of the subject rule: a candidate must also ask for the same kind "
                                 "of answer as the request (who / when / where / how many, from English wh-words; "
                                 "a question with none agrees with every kind); --no-answer-type: the cosine alone")
    supersede: bool = _setting(True, "newest correction wins: a new edit that asks the same question as an active "
                               "edit (same subject, encoder cosine >= supersede_tau) retires the older one from "
                               "routing (undo: memoir snapshot disable --enable ID); --no-supersede keeps both")
    supersede_tau: float = _setting(0.7, "encoder cosine from which two edits of one subject ask the same question "
                                    "(with answer_type, also the same kind of answer)")
    prompt_format: str = _setting("auto", "how edits are written and prompts routed: chat (the edit is trained as a "
                                  "user message in the tokenizer's chat template with the target as the assistant's "
                                  "answer, plus raw rows (chat_raw_rows); every prompt routes from its last user "
                                  "message's content), raw (the reference: prompt text as is, routed from all its "
                                  "tokens) or auto (the default: chat when the tokenizer has a chat template, else raw)",
                                  PROMPT_FORMATS)
    chat_raw_rows: str = _setting("templated", "the raw rows a chat-format edit trains beside its chat rows: templated "
                                  "(the default: the prompt and its context-template rows, as the raw format trains "
                                  "them, so one store answers chat requests and completions of the raw prompt; 2x the "
                                  "rows) or plain (the prompt alone: chat paraphrases .933 against .833, completions "
                                  ".500 against .900)", ("plain", "templated"))
    statement_rows: str = _setting("none", "none (the reference) or self: an edit also trains, as a raw row, its "
                                   "question stated in the unedited model's own words (its greedy answer cut before "
                                   "the answer: memoir_vllm.statements), so completions that state the fact reach the "
                                   "target more often (30 chat-format synthetic facts through memoir serve: "
                                   "statements as completions .067 -> .167, as chat .833 -> .867, nothing worse; "
                                   "README); one greedy answer per edit", ("none", "self"))
    mask_key: str = _setting("subject", "under the subject rule, relabel each edit's TopHash mask by a key drawn "
                             "from its subject, so edits of one relation about different subjects train nearly "
                             "disjoint columns of W_m (routing decisions are unchanged: overlaps within a subject "
                             "are); none: the paper's masks", ("subject", "none"))
    memory_start: str = _setting("content", "where a routed request's memory term starts: content (at its routing "
                                 "span: in a chat rendering the last user message's content, so the system prompt and "
                                 "template header get none, their KV does not depend on the edit and a shared system "
                                 "prompt is prefix-cached across requests) or all (every token: the reference). The "
                                 "same for raw prompts, which route from their first token", ("content", "all"))
    answer_end: str = _setting("period_eos", "what an edit trains after its target so greedy answers stop: "
                               "period_eos ('.' and end-of-text), eos, newline, or none (the reference: the target "
                               "alone, answers then tend to repeat it)", ("period_eos", "eos", "newline", "none"))
    nonempty_answers: bool = _setting(True, "a routed request's first generated token is never an end token "
                                      "(end-of-text, the chat end of turn): an edit whose memory would end the "
                                      "answer before it starts (a paraphrase that reads like a finished answer) "
                                      "answers instead; False: the reference, any first token")
    shard_budget: int = _setting(0, "edits per W_m: when the newest shard holds this many edits, the next edit opens "
                                 "a new zero W_m, and full shards are never trained or shrunk again (more memory, "
                                 "less interference between old and new edits); 0: every edit in one W_m (the "
                                 "reference)")
    columns: str = _setting("shared", "which columns of W_m an edit writes: shared (the paper's: its TopHash mask, "
                            "which overlaps other edits' masks, so later edits retrain earlier ones' columns) or free "
                            "(routing=subject only: the k columns of largest |feature| that no other edit of its "
                            "shard wrote, a new shard opening when fewer than k are free; a request then takes its "
                            "best candidate by the second stage alone, so no edit changes another's answer; use a "
                            "small k, e.g. 64: a shard holds D // k edits)", COLUMN_RULES)
    # editor (reference: fresh SGD per edit, lr 1.0, wd 1e-5 coupled to lr, clip 1.0, n_iter 30, early stop)
    optimizer: str = _setting("sgd", "editor optimizer (sgd is the reference)", ("sgd", "adam"))
    lr: float = _setting(1.0, "editor learning rate")
    weight_decay: float = _setting(1e-5, "shrink of the trained memory per step (see --decay)")
    decay: str = _setting("decoupled", "how weight_decay shrinks the trained shard each step: coupled (the reference: "
                          "the optimizer's L2 term, a shrink of lr*wd) or decoupled (W *= 1 - wd, independent of lr)",
                          DECAY_RULES)
    grad_clip: float = _setting(1.0, "gradient-norm clip per step (0 disables)")
    n_iter: int = _setting(30, "max optimisation steps per edit")
    stop_loss: float = _setting(0.02, "early stop when the loss is at most this ...")
    stop_delta: float = _setting(1e-4, "... and (reference rule) changed by at most this")
    retries: int = _setting(0, "when an edit ends with its loss above half its first loss (it diverged or stalled: "
                            "learning rates near the edge of stability), train it again from its state before the "
                            "edit at half the learning rate, at most this many times; 0: the reference")
    plain_weight: float = _setting(0.0, "weight of an edit's rows without a template (what a request looks like) in "
                                   "its loss, added to the mean over all its rows: 1 makes them count as much as "
                                   "the eleven rows together; 0: the reference's mean")
    exact_steps: int = _setting(0, "an edit stops only once greedy decoding of its prompt gives the target (every "
                                "target token the teacher-forced argmax in its rows without a template), training up "
                                "to this many steps beyond n_iter for it; 0: the loss rule alone (the reference)")
    stop_rule: str = _setting("reference", "early stop: reference (loss <= stop_loss and change <= stop_delta; the "
                              "paper's) or loss (loss <= stop_loss; ~1.6x faster, less interference at T=1000)",
                              STOP_RULES)
    n_templates: int = _setting(10, "augmented context-template rows (the reference uses 10)")
    template_decoding: str = _setting("greedy", "how the context templates are generated, once per memory (stored "
                                      "in its snapshot): greedy from the seed words, model (the reference: under "
                                      "the model's own generation config, seeded by --seed; greedy where that "
                                      "config does not sample), or sample (temperature 1, top 50 tokens, seeded: "
                                      "fluent prefixes on a model whose config does not sample; not yet measured)",
                                      ("greedy", "model", "sample"))
    # cache the frozen prefix and run only the blocks after the edited one: the same loss as the
    # reference full forward within 1e-4, ~4x faster; fast=False is the reference computation
    fast: bool = _setting(True, "cached-prefix editing (same loss within 1e-4, ~4x faster); --no-fast is the "
                          "reference full forward")
    n_background: int = _setting(100, "unrelated prompts averaged into the background mean")

    def __post_init__(self) -> None:
        for name in ("tau", "subject_tau"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is outside [0, 1]: it is a fraction of the mask size k")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r}: use {' or '.join(choices)}")
        if not 0.0 <= self.weight_decay < 1.0:
            raise ValueError(f"weight_decay={self.weight_decay} must be in [0, 1): it is a shrink per step")
        if self.k is not None and self.k <= 0:
            raise ValueError(f"k={self.k} must be a positive number of mask entries")
        if self.shard_budget < 0:
            raise ValueError(f"shard_budget={self.shard_budget} must be 0 (one memory) or a number of edits per shard")
        if self.columns == "free" and self.routing != "subject":
            raise ValueError("columns='free' needs routing='subject': free columns are not a routing key, so the "
                             "mask rule cannot route by them; use routing='subject' or columns='shared'")
        if self.plain_weight < 0:
            raise ValueError(f"plain_weight={self.plain_weight} must be >= 0 (0: the reference's mean over rows)")
        if self.exact_steps < 0:
            raise ValueError(f"exact_steps={self.exact_steps} must be 0 (the reference) or a number of steps")
        if self.retries < 0:
            raise ValueError(f"retries={self.retries} must be 0 (the reference) or a number of retries")
        if self.n_iter < 1:
            raise ValueError(f"n_iter={self.n_iter} must be at least 1")

    def resolved(self, n_layers: int, d_inner: int) -> "MemoirConfig":
        """A copy with layer and k filled in for a model of n_layers blocks and FFN width d_inner."""
        layer = min(round(0.85 * n_layers), n_layers - 1) if self.layer is None else self.layer
        k = round(0.286 * d_inner) if self.k is None else self.k
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer={layer} is outside the model's {n_layers} blocks (0..{n_layers - 1})")
        if k > d_inner:
            raise ValueError(f"k={k} is larger than the FFN width D={d_inner}: choose k <= D (default 0.286*D)")
        return dataclasses.replace(self, layer=layer, k=k)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoirConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MemoirConfig keys {unknown}; known keys: {sorted(known)}")
        # stored before a setting existed: what ran then (the coupled decay, the mask-only routing, raw prompts)
        return cls(**{"decay": "coupled", "routing": "mask", "subject_check": "none", "supersede": False,
                      "prompt_format": "raw", "answer_end": "none", "memory_start": "all", "mask_key": "none",
                      "answer_type": False, "columns": "shared", "chat_raw_rows": "plain", "nonempty_answers": False,
                      "statement_rows": "none", "untyped_tau": 0.0,
                      **d})


# Named presets. "reference" is the paper's Llama-3-8B setting; per-model presets are measured
# on that model (evidence in docs/defaults.md) and picked by `default_config(model_type, n_layers, D)`.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": dict(tau=0.4, lr=1.0, n_iter=30, optimizer="sgd", grad_clip=1.0, fast=False, weight_decay=1e-5,
                      decay="coupled", routing="mask", supersede=False, prompt_format="raw", answer_end="none",
                      memory_start="all", mask_key="none", answer_type=False, untyped_tau=0.0, columns="shared",
                      template_decoding="model", nonempty_answers=False, statement_rows="none"),
    "llama3-8b": dict(layer=27, k=4096, tau=0.4, lr=1.0, n_iter=30),
    "gptj-6b": dict(layer=21, k=4096, tau=0.4, lr=1.0, n_iter=70),
    # SmolLM2-135M (30 blocks, D=1536), measured: see docs/defaults.md. Free columns of 64 (24 edits per W_m)
    # with lr 160, which is near the edge of stability: 1 of 79 synthetic edits diverged, so a failed edit is
    # retried at half the lr (README "Free columns"); its rows without a template weigh as much again in the loss
    # and an edit trains until greedy decoding gives its target, up to 30 more steps (README "Capacity");
    # "-shared" is its measured setting with the paper's shared columns (the mask rule needs it)
    "smollm2-135m": dict(layer=25, k=64, tau=0.5, lr=160.0, n_iter=30, stop_rule="loss", columns="free",
                         retries=2, exact_steps=30, plain_weight=1.0),
    "smollm2-135m-shared": dict(layer=25, k=439, tau=0.5, lr=10.0, n_iter=30, stop_rule="loss", columns="shared"),
}

# (model_type, num_hidden_layers, intermediate_size) -> preset name
MODEL_PRESETS: dict[tuple[str, int, int], str] = {
    ("llama", 30, 1536): "smollm2-135m",
    ("llama", 32, 14336): "llama3-8b",
    ("gptj", 28, 16384): "gptj-6b",
}


def preset(name: str, **overrides: Any) -> MemoirConfig:
    """A MemoirConfig from a named preset, with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return MemoirConfig(**{**PRESETS[name], **overrides})


def default_config(model_type: str, n_layers: int, d_inner: int, preset: str | None = None,
                   **overrides: Any) -> MemoirConfig:
    """The named `preset`, else the measured preset for a known model shape, else the generic defaults, with
    overrides. A model preset with free columns gives way to its "-shared" preset when the overrides ask for
    shared columns or the mask rule."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        return MemoirConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
    name = MODEL_PRESETS.get((model_type, n_layers, d_inner))
    if name and f"{name}-shared" in PRESETS and (overrides.get("columns") == "shared" or overrides.get("routing") == "mask"):
        name = f"{name}-shared"
    base = dict(PRESETS[name]) if name else {}
    return MemoirConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

