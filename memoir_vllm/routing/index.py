"""MaskIndex: the stored TopHash masks, bit-packed, with batched best-match routing.

Bit layout (pinned by golden-bytes tests), as a reference loop:

    for j in range(D):
        if mask[j]:
            packed[j // 8] |= 1 << (j % 8)      # little-endian bits within each byte

so a mask over D entries costs ceil(D / 8) bytes.
"""
from __future__ import annotations

import torch
from torch import nn

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_HAS_INT_MM = hasattr(torch, "_int_mm")


def pack_masks(mask: torch.Tensor) -> torch.Tensor:
    """[N, D] bool -> [N, ceil(D/8)] uint8, layout in the module docstring."""
    n, d = mask.shape
    pad = (-d) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(n, -1, 8)  # [N, D/8, 8]
    return (m * _BITS.to(mask.device)).sum(-1, dtype=torch.uint8)  # [N, D/8]


def unpack_masks(packed: torch.Tensor, d_inner: int) -> torch.Tensor:
    """[N, ceil(D/8)] uint8 -> [N, D] bool; inverse of pack_masks."""
    bits = (packed.unsqueeze(-1) & _BITS.to(packed.device)) != 0  # [N, D/8, 8]
    return bits.flatten(1)[:, :d_inner]


class MaskIndex(nn.Module):
    """One mask per edit: packed masks, edit ids, active flags, shard ids and mask keys, all buffers.

    best_match() answers, for a batch of query masks, the stored mask with the largest overlap
    |M_q & M_i| among active edits, as (ratio = overlap / k, row). Ties go to the lowest row.

    dense_cache_bytes: the masks are also kept unpacked (int8 on CPU, float32 elsewhere) for the
    overlap GEMM while that takes at most this many bytes (default 2 GiB: 1.4M masks at D=1536 on
    CPU); beyond it every query batch unpacks the masks again, chunk by chunk (slower, no memory).
    """

    def __init__(self, d_inner: int, k: int, dense_cache_bytes: int = 2 << 30) -> None:
        super().__init__()
        self.d_inner, self.k = d_inner, k
        self.dense_cache_bytes = dense_cache_bytes
        nbytes = (d_inner + 7) // 8
        self.register_buffer("packed", torch.zeros(0, nbytes, dtype=torch.uint8))  # [N, D/8]
        self.register_buffer("edit_ids", torch.zeros(0, dtype=torch.int64))  # [N]
        self.register_buffer("active", torch.zeros(0, dtype=torch.bool))  # [N]
        self.register_buffer("shards", torch.zeros(0, dtype=torch.int64))  # [N]
        self.register_buffer("keys", torch.zeros(0, dtype=torch.int64))  # [N] mask key (ResidualMemory.keyed)
        self._dense: torch.Tensor | None = None  # [N, D] float cache of active masks for matmul

    def __len__(self) -> int:
        return self.packed.shape[0]

    @property
    def n_active(self) -> int:
        return int(self.active.sum())

    def add(self, masks: torch.Tensor, edit_ids: torch.Tensor, shards: torch.Tensor | None = None,
            keys: torch.Tensor | None = None) -> None:
        """Append masks [n, D] bool with their edit ids [n] (and shard ids [n] and mask keys [n], default 0)."""
        if masks.shape[-1] != self.d_inner:
            raise ValueError(f"mask width {masks.shape[-1]} != index width D={self.d_inner}")
        dev = self.packed.device
        n = masks.shape[0]
        shards = torch.zeros(n, dtype=torch.int64) if shards is None else shards
        self.packed = torch.cat([self.packed, pack_masks(masks.to(dev))])
        self.edit_ids = torch.cat([self.edit_ids, edit_ids.to(dev, torch.int64)])
        self.active = torch.cat([self.active, torch.ones(n, dtype=torch.bool, device=dev)])
        self.shards = torch.cat([self.shards, shards.to(dev, torch.int64)])
        keys = torch.zeros(n, dtype=torch.int64) if keys is None else keys
        self.keys = torch.cat([self.keys, keys.to(dev, torch.int64)])
        self._dense = None

    def row_of(self, edit_id: int) -> int:
        rows = (self.edit_ids == edit_id).nonzero().flatten()
        if rows.numel() == 0:
            raise KeyError(f"edit id {edit_id} is not in this memory (ids 0..{len(self) - 1})")
        return int(rows[0])

    def set_active(self, edit_id: int, active: bool) -> None:
        """Enable or disable one edit: a disabled edit is never matched."""
        self.active[self.row_of(edit_id)] = active
        self._dense = None

    def masks(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense bool masks [n, D] of the given rows."""
        return unpack_masks(self.packed[rows], self.d_inner)

    def _dense_masks(self, dtype: torch.dtype) -> torch.Tensor | None:
        nbytes = len(self) * self.d_inner * torch.empty(0, dtype=dtype).element_size()
        if nbytes > self.dense_cache_bytes:
            return None
        if self._dense is None or self._dense.dtype != dtype:
            dense = unpack_masks(self.packed, self.d_inner).to(dtype)
            self._dense = dense * self.active.unsqueeze(1).to(dtype)  # inactive rows never overlap
        return self._dense

    @torch.no_grad()
    def overlaps(self, query: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """|M_q & M_i| for every query and stored mask: query [B, D] bool -> [B, N] int32 (-1 if inactive).

        On CPU the masks are int8 and the product an exact int8 x int8 -> int32 GEMM (torch._int_mm): a quarter
        of the float32 cache's memory and ~3x faster; elsewhere float32 (exact: sums of 0/1 stay below 2^24).
        """
        on_cpu = self.packed.device.type == "cpu" and _HAS_INT_MM
        dtype = torch.int8 if on_cpu else torch.float32
        q = query.to(self.packed.device, dtype)  # [B, D]

        def product(masks: torch.Tensor) -> torch.Tensor:  # masks [n, D] -> [B, n]
            return torch._int_mm(q, masks.T) if on_cpu else (q @ masks.T).round().to(torch.int32)

        dense = self._dense_masks(dtype)
        if dense is not None:
            out = product(dense)  # [B, N]
        else:
            out = torch.cat(
                [product(unpack_masks(self.packed[s : s + chunk], self.d_inner).to(dtype)) for s in range(0, len(self), chunk)],
                dim=1,
            )
        return out.masked_fill(~self.active.unsqueeze(0), -1)

    @torch.no_grad()
    def best_match(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best active stored mask per query: query [B, D] bool -> (ratio [B] float32, row [B] int64).

        ratio is overlap / k; row is -1 (ratio 0) when the index holds no active edit.
        """
        b = query.shape[0]
        if self.n_active == 0:
            return torch.zeros(b), torch.full((b,), -1, dtype=torch.int64)
        best, row = self.overlaps(query).max(dim=1)  # [B], [B]; max returns the first maximum
        return best.float().cpu() / self.k, row.cpu()
