# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""A cache layer that keeps block descriptors next to the keys, so cached decoding routes without re-reading keys.

`DualRouteCacheLayer` is a transformers `DynamicLayer` registered for the layer type ``"dualroute_attention"``:
`DynamicCache(config=...)` builds it for every routed decoder layer (self-attention and cross-attention caches
alike). Besides keys and values it keeps, per key block, the float32 sum of the visible keys and their count:

- decoder self-attention: each step only the block being filled (the open block) is recomputed; closed blocks stay
  frozen;
- cross-attention: the encoder's descriptors are computed once, when the encoder keys enter the cache, and reused at
  every generated token.

Beam search reordering, cropping (assisted decoding) and batch selection/repetition (contrastive search) apply to the
descriptors exactly as to the keys, so they always equal descriptors recomputed from the cached keys.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .configuration_dualroute import ROUTED_ATTENTION
from .routing_dualroute import block_sums, num_blocks


class DualRouteCacheLayer(DynamicLayer):
    _layer_type = ROUTED_ATTENTION

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._clear_descriptors()

    def _clear_descriptors(self) -> None:
        self.block_size: int | None = None
        self.block_sums: torch.Tensor | None = None  # (batch, kv_heads, blocks, head_dim) float32
        self.block_counts: torch.Tensor | None = None  # (batch, blocks) visible keys per block
        self.key_mask: torch.Tensor | None = None  # (batch, seq) bool; None while every cached key is visible

    # -- writing -------------------------------------------------------------------------------------------------------

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args,
        block_size: int | None = None,
        key_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends keys/values (and their padding mask, ``True`` = real); refreshes the blocks they touched.

        Without ``block_size`` (dense attention) the layer behaves like a plain `DynamicLayer`; descriptors are then
        computed on demand by `key_descriptors`.
        """
        old_length = self.get_seq_length()
        keys, values = super().update(key_states, value_states)
        self._append_mask(key_mask, old_length, key_states.shape[-2], key_states.shape[0])
        if block_size is not None:
            self._refresh(block_size, first_changed=old_length)
        return keys, values

    def _append_mask(self, key_mask, old_length: int, new_length: int, batch: int) -> None:
        if key_mask is None and self.key_mask is None:
            return
        device = self.keys.device
        if key_mask is None:
            key_mask = torch.ones(batch, new_length, dtype=torch.bool, device=device)
        if self.key_mask is None:
            self.key_mask = torch.ones(batch, old_length, dtype=torch.bool, device=device)
        self.key_mask = torch.cat([self.key_mask, key_mask.to(device=device, dtype=torch.bool)], dim=1)

    def _refresh(self, block_size: int, first_changed: int) -> None:
        """Recomputes the blocks from the one holding position ``first_changed`` on; earlier blocks are frozen."""
        first_block = (
            first_changed // block_size if self.block_size == block_size and self.block_sums is not None else 0
        )
        start = first_block * block_size
        mask = None if self.key_mask is None else self.key_mask[:, start:]
        sums, counts = block_sums(self.keys[:, :, start:], block_size, mask)
        if first_block:
            sums = torch.cat([self.block_sums[:, :, :first_block], sums], dim=2)
            counts = torch.cat([self.block_counts[:, :first_block], counts], dim=1)
        self.block_size, self.block_sums, self.block_counts = block_size, sums, counts

    # -- reading -------------------------------------------------------------------------------------------------------

    def key_descriptors(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means (b, hk, blocks, d) float32, counts (b, blocks))`` of the cached keys, as the router expects."""
        stale = self.block_size != block_size or self.block_sums is None
        if stale or self.block_sums.shape[2] != num_blocks(self.get_seq_length(), block_size):
            self._refresh(block_size, first_changed=0)
        means = self.block_sums / self.block_counts.clamp(min=1)[:, None, :, None].to(self.block_sums.dtype)
        return means, self.block_counts

    def key_padding_mask(self) -> torch.Tensor | None:
        return self.key_mask

    # -- generation's cache operations ---------------------------------------------------------------------------------

    def _apply_to_descriptors(self, operation) -> None:
        if self.block_sums is not None:
            self.block_sums, self.block_counts = operation(self.block_sums), operation(self.block_counts)
        if self.key_mask is not None:
            self.key_mask = operation(self.key_mask)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.get_seq_length() > 0:
            self._apply_to_descriptors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.get_seq_length() > 0:
            self._apply_to_descriptors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.get_seq_length() > 0:
            self._apply_to_descriptors(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        length = self.get_seq_length()
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :length]
        if self.block_size is not None:  # blocks up to the new end are recomputed from the kept keys
            self._refresh(self.block_size, first_changed=length)

    def reset(self) -> None:
        super().reset()
        self._clear_descriptors()

    def offload(self) -> None:
        super().offload()
        self._apply_to_descriptors(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        super().prefetch()
        if self.is_initialized:
            self._apply_to_descriptors(lambda t: t.to(self.device, non_blocking=True))


__all__ = ["DualRouteCacheLayer"]
