# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""A cache layer that keeps block descriptors next to the keys, so cached decoding routes without re-reading keys.

`DualRouteCacheLayer` is a transformers `DynamicLayer` registered for the layer type ``"dualroute_attention"``:
`DynamicCache(config=...)` builds it for every routed decoder layer (self-attention and cross-attention caches
alike). Besides keys and values it keeps, per key block, the float32 sum of the visible keys and their count. They
are computed when routing first asks for them (`key_descriptors`), and from then on only where keys changed:

- decoder self-attention: each step only the block being filled (the open block) is recomputed; closed blocks stay
  frozen. While the decoder holds at most ``top_k`` blocks, `auto` runs its attention dense and asks for none;
- cross-attention: the encoder's descriptors are computed once, at the first routed step, and reused at every
  generated token.

With ``routing_keys`` (RoPE models that route before the rotation, ``route_before_rope``) the descriptors are means of
those instead of the attended keys; the layer keeps them next to the keys, so the open block and a crop can be
recomputed. Beam search reordering, cropping (assisted decoding) and batch selection/repetition (contrastive search)
apply to the descriptors and routing keys exactly as to the keys, so what `key_descriptors` returns always equals
descriptors recomputed from the cached (routing) keys (the stored ``block_sums`` may lag behind until it is called).

Cross-attention keys are written once (``write_once=True``) and are the same for every beam of an input: beam search
expands the encoder output per beam. transformers reorders every cache layer at every step, which for cross-attention
copies all encoder keys and values (at 16k tokens and 4 beams, 270 MB per layer per step) to put identical rows where
identical rows already are. A write-once layer finds, once, which of its rows are identical, and skips a reorder that
only swaps identical rows; any other reorder is carried out in full. This serves dense and routed attention alike.

On CPU, a write-once layer that routes single float32/float64 decoding queries also keeps its keys block-major
(`block_major_keys`, built at the first such step), which lets each step read the selected keys in place instead of
copying them out (`decode_dualroute.py`). That copy costs the memory of the keys once more (the cross-attention cache
grows by half: 6 layers x 16k tokens x 512 x 4 B = 200 MB per sequence), for a decoding step ~10% faster at 16k
encoder tokens.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .configuration_dualroute import ROUTED_ATTENTION
from .decode_dualroute import block_major_keys
from .routing_dualroute import block_sums


class DualRouteCacheLayer(DynamicLayer):
    _layer_type = ROUTED_ATTENTION

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._clear_descriptors()

    def _clear_descriptors(self) -> None:
        self.block_size: int | None = None
        # (batch, kv_heads, blocks, head_dim) float32; up to date only up to `stale_from` (`key_descriptors` refreshes)
        self.block_sums: torch.Tensor | None = None
        self.block_counts: torch.Tensor | None = None  # (batch, blocks) visible keys per block
        self.stale_from: int | None = None  # the blocks from the one holding this key position on are out of date
        self._means: tuple = (
            None,
            None,
        )  # (the block_sums they were computed from, means): cross-attention reuses them
        self.key_mask: torch.Tensor | None = None  # (batch, seq) bool; None while every cached key is visible
        self.routing_keys: torch.Tensor | None = None  # (batch, kv_heads, seq, head_dim): what descriptors average
        self.write_once = False  # cross-attention: the encoder's keys, written at the first step, never appended to
        self.row_classes: torch.Tensor | None = None  # write-once layer: lowest index of the row each row equals
        self.key_blocks: torch.Tensor | None = None  # the keys block-major (b, hk, blocks, d, B), once asked for

    # -- writing -------------------------------------------------------------------------------------------------------

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args,
        key_mask: torch.Tensor | None = None,
        write_once: bool = False,
        routing_keys: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends keys/values (and their padding mask, ``True`` = real); marks the blocks they touch out of date.

        ``write_once``: these are all the keys the layer will ever hold (cross-attention), which lets beam search
        skip reorders that change nothing. ``routing_keys`` (shaped like ``key_states``): the vectors descriptors
        average instead of the keys; given at every update or never.
        """
        old_length = self.get_seq_length()
        if old_length and (routing_keys is None) != (self.routing_keys is None):
            raise ValueError(
                "`routing_keys` must be given at every update of a cache layer or at none: this layer holds "
                f"{old_length} keys {'with' if self.routing_keys is not None else 'without'} routing keys."
            )
        if routing_keys is not None and routing_keys.shape != key_states.shape:
            raise ValueError(
                f"`routing_keys` must have the shape of `key_states` {tuple(key_states.shape)}, "
                f"got {tuple(routing_keys.shape)}."
            )
        self.write_once, self.row_classes, self.key_blocks = write_once and old_length == 0, None, None
        keys, values = super().update(key_states, value_states)
        if routing_keys is not None:
            self.routing_keys = (
                routing_keys if self.routing_keys is None else torch.cat([self.routing_keys, routing_keys], dim=-2)
            )
        self._append_mask(key_mask, old_length, key_states.shape[-2], key_states.shape[0])
        self._mark_stale(old_length)
        return keys, values

    def _mark_stale(self, position: int) -> None:
        self.stale_from = position if self.stale_from is None else min(self.stale_from, position)

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
        self.stale_from = None
        start = first_block * block_size
        mask = None if self.key_mask is None else self.key_mask[:, start:]
        averaged = self.keys if self.routing_keys is None else self.routing_keys
        sums, counts = block_sums(averaged[:, :, start:], block_size, mask)
        if first_block:
            sums = torch.cat([self.block_sums[:, :, :first_block], sums], dim=2)
            counts = torch.cat([self.block_counts[:, :first_block], counts], dim=1)
        self.block_size, self.block_sums, self.block_counts = block_size, sums, counts

    # -- reading -------------------------------------------------------------------------------------------------------

    def key_descriptors(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means (b, hk, blocks, d) float32, counts (b, blocks))`` of the cached keys, as the router expects."""
        if self.block_size != block_size or self.block_sums is None:
            self._refresh(block_size, first_changed=0)
        elif self.stale_from is not None:
            self._refresh(block_size, first_changed=self.stale_from)
        cached_for, means = self._means
        if cached_for is not self.block_sums:  # sums are replaced, never changed in place: identity means unchanged
            means = self.block_sums / self.block_counts.clamp(min=1)[:, None, :, None].to(self.block_sums.dtype)
            self._means = (self.block_sums, means)
        return means, self.block_counts

    def block_major_keys(self, block_size: int) -> torch.Tensor:
        """The cached keys block-major, ``(b, hk, blocks, d, block_size)`` (`decode_dualroute.block_major_keys`),
        computed at the first call and kept until the keys change."""
        if self.key_blocks is None or self.key_blocks.shape[-1] != block_size:
            self.key_blocks = block_major_keys(self.keys, block_size)
        return self.key_blocks

    def key_padding_mask(self) -> torch.Tensor | None:
        return self.key_mask

    # -- generation's cache operations ---------------------------------------------------------------------------------

    def _apply_to_descriptors(self, operation) -> None:
        if self.routing_keys is not None:
            self.routing_keys = operation(self.routing_keys)
        if self.block_sums is not None:
            self.block_sums, self.block_counts = operation(self.block_sums), operation(self.block_counts)
        if self.key_mask is not None:
            self.key_mask = operation(self.key_mask)
        if self.key_blocks is not None:
            self.key_blocks = operation(self.key_blocks)

    def _identical_rows(self) -> torch.Tensor:
        """``(batch,)``: for each row the lowest index of a row with equal keys, values and mask (computed once)."""
        if self.row_classes is None:
            rows = self.keys.shape[0]
            classes = list(range(rows))
            for row in range(rows):
                for earlier in range(row):
                    if classes[earlier] == earlier and self._rows_equal(row, earlier):
                        classes[row] = earlier
                        break
            self.row_classes = torch.tensor(classes)
        return self.row_classes

    def _rows_equal(self, a: int, b: int) -> bool:
        tensors = [self.keys, self.values] + ([self.key_mask] if self.key_mask is not None else [])
        return all(torch.equal(t[a], t[b]) for t in tensors)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() == 0:
            return super().reorder_cache(beam_idx)
        if self.write_once:
            classes = self._identical_rows()
            reordered_classes = classes[beam_idx.cpu()]
            if torch.equal(reordered_classes, classes):  # every row is replaced by a row equal to it: nothing moves
                return
            self.row_classes = reordered_classes
        super().reorder_cache(beam_idx)
        self._apply_to_descriptors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.row_classes = None
        if self.get_seq_length() > 0:
            self._apply_to_descriptors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.row_classes = None
        if self.get_seq_length() > 0:
            self._apply_to_descriptors(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.row_classes = None
        if tokens_to_remove:
            self.key_blocks = None
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        length = self.get_seq_length()
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :length]
        if self.routing_keys is not None:
            self.routing_keys = self.routing_keys[:, :, :length]
        self._mark_stale(length)  # the block holding the new end is recomputed from the kept keys

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
