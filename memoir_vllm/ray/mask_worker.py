"""MaskWorker: TopHash masks and routing decisions for a batch of prompts, against one snapshot.

A prompt's mask depends only on the frozen model (its activations, the stored background mean and
permutation), never on W_m, so masks and routing parallelise freely, unlike training. A callable
class in the Ray Data style, runnable without a cluster:

    w = MaskWorker("out/job")                                  # any snapshot (one or S shards)
    w({"prompt": ["The capital of Freedonia is"]})
    # -> {"prompt": [...], "mask": [[k indices]], "edit_id": [id or -1], "shard": [s or -1], "ratio": [0.97]}

`compute_masks()` in memoir_vllm.ray.jobs fans it out over Ray actors.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..hf import routed
from ..session import Memoir
from ..tokens import encode_prompts


class MaskWorker:
    """Routes prompts through a snapshot's memory without generating: one forward pass per batch.

    Args:
        snapshot: a snapshot store or version directory.
        model: the model directory (default: the one recorded in the snapshot).
        threads: torch threads of this worker.
    """

    def __init__(self, snapshot: str | Path, model: str | None = None, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.memoir = Memoir.from_snapshot(snapshot, model=model)

    @torch.no_grad()
    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """{"prompt": [...]} -> the same plus mask (k indices, keyed as the matched edit's), matched edit_id /
        shard (-1: none) and ratio."""
        m = self.memoir
        prompts = list(batch["prompt"])
        # prompts in the form the edits were written in (chat rendering for a chat-format memory)
        b = encode_prompts(m.tok, prompts, getattr(m.model.config, "max_position_embeddings", None),
                           m.memory.marks, chat=m.memory.marks is not None)
        ids, attn = b.input_ids, b.attention_mask
        pos = (attn.cumsum(1) - 1).clamp_min(0)  # [B, T] positions under left padding
        with routed(m.layer, b.route_mask, m.memory.candidates(prompts)) as layer:
            m.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
            r = layer.routing
        index = m.memory.index
        rows = r.row.tolist()  # [B] matched index row, -1 = base model
        keys = torch.tensor([int(index.keys[x]) if x >= 0 else 0 for x in rows], dtype=torch.int64)
        return {
            **batch,
            "mask": m.memory.keyed(r.mask_idx, keys).tolist(),  # as compared with the matched edit's (mask_key)
            "edit_id": [int(index.edit_ids[x]) if x >= 0 else -1 for x in rows],
            "shard": [int(index.shards[x]) if x >= 0 else -1 for x in rows],
            "ratio": [round(float(x), 4) for x in r.ratio],
        }
