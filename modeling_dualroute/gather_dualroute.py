# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""Level 2, `gather` backend: exact attention over the routed key blocks only, for CPU training and inference.

Queries are cut into tiles. Each tile lists the key blocks its queries may use (its *slots*); per query block
routing uses the query block as the tile, per token routing uses the union of the tile's token selections plus a
per-row slot mask. For a chunk of tiles at a time, the kernel gathers the slot blocks of K and V and runs masked
attention over them, each tile a batch entry of its own. Nothing of size ``q_len * k_len`` is ever built: the extra
memory is one chunk of scores, a fixed budget. Half-precision inputs are computed in float32.

Without dropout the attention of a chunk is PyTorch's fused CPU flash-attention kernel (forward and backward, the
ops behind `scaled_dot_product_attention`), which also returns the row log-sum-exp the backward pass needs; measured
10-25% faster here than softmax and matmuls of our own. It has no dropout, so with dropout the chunk runs as a
masked softmax with plain batched matmuls, and the backward pass is written out the same way. Either way the forward
saves only q, k, v (in the kernel's layout and compute dtype), the output and the row log-sum-exp, and the backward
recomputes each chunk's scores: the saved state is O(N * d), not the O(N * k * B * d) of the gathered blocks.
`reference` in `attention_dualroute.py` is the slow twin this is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linear_dualroute import cpu_vendor
from .routing_dualroute import indices_from_selection, num_blocks


# The fused CPU flash-attention kernel and its backward (what scaled_dot_product_attention runs on CPU); they take an
# additive float mask and return the log-sum-exp per query row. A row with no visible key gets output 0, lse 0.
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def score_elements_per_chunk_for(vendor: str) -> int:
    """Scores computed per chunk (float32 elements) on a CPU of ``vendor``, chosen by measurement on 2-core CPUs
    (benchmarks/README.md): a chunk whose gathered keys and values stay in cache, large enough that the kernel runs at
    full speed and its per-chunk dispatch (~0.2 ms of small ops) stays small. AMD EPYC: 2^19 (16 tiles of 64 queries x
    512 keys; 4 and 8 tiles were 10-25% slower, 32 the same or slower). Intel Xeon: 2^20, 32 tiles, 5-12% faster
    than 16 at 4k-16k tokens forward and forward+backward (within the noise at 1k; 64 tiles slower at 1k and 4k)."""
    return 1 << 20 if vendor == "GenuineIntel" else 1 << 19


SCORE_ELEMENTS_PER_CHUNK = score_elements_per_chunk_for(cpu_vendor())

# Query rows per tile when routing per token: tiles gather the union of their rows' blocks, so smaller tiles waste less
# work on blocks a row did not choose, larger tiles give larger matmuls.
PER_TOKEN_TILE_SIZE = 16


def workspace_view(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first elements of a flat workspace ``buffer`` (allocated once per pass, reused by every chunk: a fresh
    multi-megabyte tensor per chunk costs page faults), viewed as ``shape``."""
    return buffer[: math.prod(shape)].view(shape)


def select_into(source: torch.Tensor, index: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``source[index]`` (rows along dim 0), written into the workspace ``buffer``."""
    return torch.index_select(source, 0, index, out=workspace_view(buffer, index.numel(), *source.shape[1:]))


@dataclass
class TilePlan:
    """Which key blocks each query tile attends to.

    tile_size: query positions per tile.
    kv_blocks: ``(b, hk, n_tiles, slots)`` key-block index of each slot, ``-1`` for an empty slot.
    row_slots: ``(b, hk, n_tiles, tile_size, slots)`` bool, whether a query row of the tile uses the slot; ``None``
        when every row of a tile uses every slot (per query block routing).
    """

    tile_size: int
    kv_blocks: torch.Tensor
    row_slots: torch.Tensor | None

    @property
    def n_tiles(self) -> int:
        return self.kv_blocks.shape[2]


def tile_plan_from_routes(
    plan: torch.Tensor, *, per_token: bool, block_size: int, n_key_blocks: int, tile_size: int | None = None
) -> TilePlan:
    """Turns a routing plan into tiles. Per query block routing: one tile per query block, its selection as slots.

    Per token routing ``plan (b, hk, lq, k)``: tiles of ``tile_size`` tokens whose slots are the union of the tokens'
    selections, with a row-by-slot mask that keeps each token to its own blocks.
    """
    if not per_token:
        return TilePlan(tile_size=block_size, kv_blocks=plan, row_slots=None)
    batch, kv_heads, q_len, top_k = plan.shape
    tile_size = tile_size or min(PER_TOKEN_TILE_SIZE, q_len)  # one decoding query is a tile of one
    if tile_size == 1:  # a tile of one token: its slots are its own selection, nothing to merge or mask
        return TilePlan(tile_size=1, kv_blocks=plan, row_slots=None)
    n_tiles = num_blocks(q_len, tile_size)
    padded = torch.nn.functional.pad(plan, (0, 0, 0, n_tiles * tile_size - q_len), value=-1)
    # one-hot of each token's selection over key blocks; column n_key_blocks catches the -1 padding
    chosen = torch.zeros(batch, kv_heads, n_tiles * tile_size, n_key_blocks + 1, dtype=torch.bool, device=plan.device)
    chosen.scatter_(-1, torch.where(padded < 0, n_key_blocks, padded), True)
    chosen = chosen[..., :n_key_blocks].view(batch, kv_heads, n_tiles, tile_size, n_key_blocks)
    union = chosen.any(3)  # b hk nt nk
    if torch.compiler.is_compiling():  # a static bound instead of a data-dependent size
        slots = min(n_key_blocks, tile_size * top_k)
    else:
        slots = max(1, int(union.sum(-1).max()))
    kv_blocks = indices_from_selection(union, slots)  # b hk nt slots
    row_slots = chosen.gather(-1, kv_blocks.clamp(min=0)[:, :, :, None, :].expand(-1, -1, -1, tile_size, -1))
    row_slots &= (kv_blocks >= 0)[:, :, :, None, :]
    return TilePlan(tile_size=tile_size, kv_blocks=kv_blocks, row_slots=row_slots)


class _Layout:
    """Flattened views shared by the forward and backward passes.

    Rows of a tile are ``(group head, tile position)`` pairs: the query heads that share a key/value head share its
    routing, so their queries are stacked into one matmul against the same gathered keys. Key blocks are flattened over
    ``(batch, kv head, block)``; an empty slot points at the head's block 0 and is masked out.
    """

    def __init__(
        self,
        query_shape,
        key_shape,
        plan: TilePlan,
        block_size: int,
        key_valid,
        causal,
        query_offset,
        device,
        compute_dtype,
    ):
        self.batch, self.q_heads, self.q_len, self.dim = query_shape
        _, self.kv_heads, self.k_len, _ = key_shape
        self.compute_dtype = compute_dtype
        self.group = self.q_heads // self.kv_heads
        self.block_size = block_size
        self.tile_size = plan.tile_size
        self.n_tiles = plan.n_tiles
        self.n_key_blocks = num_blocks(self.k_len, block_size)
        self.slots = plan.kv_blocks.shape[-1]
        self.rows = self.group * self.tile_size  # query rows per tile
        self.keys_per_tile = self.slots * block_size
        self.n_flat_tiles = self.batch * self.kv_heads * self.n_tiles
        self.n_flat_blocks = self.batch * self.kv_heads * self.n_key_blocks
        self.causal = causal

        kv_blocks = plan.kv_blocks.reshape(self.batch * self.kv_heads, self.n_tiles, self.slots)
        head_base = torch.arange(self.batch * self.kv_heads, device=device)[:, None, None] * self.n_key_blocks
        self.flat_blocks = (kv_blocks.clamp(min=0) + head_base).reshape(self.n_flat_tiles, self.slots)
        empty_slots = kv_blocks < 0
        has_empty = torch.compiler.is_compiling() or bool(empty_slots.any())  # no data-dependent branch when traced
        self.slot_valid = ~empty_slots.reshape(self.n_flat_tiles, self.slots) if has_empty else None
        self.row_slots = None
        if plan.row_slots is not None:
            self.row_slots = plan.row_slots.reshape(self.n_flat_tiles, self.tile_size, self.slots)

        # Visibility of each key of each flat block: padding and the ragged tail of the last block.
        self.key_valid = None
        ragged = self.n_key_blocks * block_size != self.k_len
        if key_valid is not None or ragged:
            valid = (
                torch.ones(self.batch, self.k_len, dtype=torch.bool, device=device) if key_valid is None else key_valid
            )
            valid = torch.nn.functional.pad(valid, (0, self.n_key_blocks * block_size - self.k_len), value=False)
            valid = valid.view(self.batch, 1, self.n_key_blocks, block_size).expand(-1, self.kv_heads, -1, -1)
            self.key_valid = valid.reshape(self.n_flat_blocks, block_size)
        if causal:
            tile_index = torch.arange(self.n_flat_tiles, device=device) % self.n_tiles
            self.tile_start = query_offset + tile_index * self.tile_size  # key position of each tile's first query
            self.row_offset = torch.arange(self.tile_size, device=device).repeat(self.group)  # rows are (group, pos)
            self.block_start = (torch.arange(self.n_flat_blocks, device=device) % self.n_key_blocks) * block_size
            self.key_offset = torch.arange(block_size, device=device)
        self.tiles_per_chunk = max(
            1, min(self.n_flat_tiles, SCORE_ELEMENTS_PER_CHUNK // (self.rows * self.keys_per_tile))
        )

    # -- layout changes ------------------------------------------------------------------------------------------------

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, hq, lq, d)`` -> ``(flat tiles, group * tile_size, d)`` in the compute dtype (a view when possible)."""
        x = x.to(self.compute_dtype)
        pad = self.n_tiles * self.tile_size - self.q_len
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        x = x.view(self.batch, self.kv_heads, self.group, self.n_tiles, self.tile_size, self.dim)
        if self.group > 1:
            x = x.transpose(2, 3)
        return x.reshape(self.n_flat_tiles, self.rows, self.dim)

    def from_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_tiles` (keeps the compute dtype)."""
        x = x.view(self.batch, self.kv_heads, self.n_tiles, self.group, self.tile_size, self.dim)
        if self.group > 1:
            x = x.transpose(2, 3)
        x = x.reshape(self.batch, self.q_heads, self.n_tiles * self.tile_size, self.dim)
        return x[:, :, : self.q_len]

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, hk, lk, d)`` -> ``(flat blocks, block_size, d)`` in the compute dtype (a view when possible)."""
        x = x.to(self.compute_dtype)
        pad = self.n_key_blocks * self.block_size - self.k_len
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(self.n_flat_blocks, self.block_size, self.dim)

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(self.batch, self.kv_heads, self.n_key_blocks * self.block_size, self.dim)
        return x[:, :, : self.k_len]

    # -- the output, token-major ---------------------------------------------------------------------------------------
    # The output is written token-major, ``(b, padded lq, hq, d)``: the model's next step (heads merged, the output
    # projection) reads it as is, without a copy, and in training the projection saves the very tensor the backward
    # pass needs here. A chunk of flat tiles is then a strided view per (batch, kv head) of it, not one view.

    def empty_token_major(self) -> torch.Tensor:
        """An uninitialised output ``(b, hq, padded lq, d)`` in the compute dtype, stored token-major."""
        shape = (self.batch, self.n_tiles * self.tile_size, self.q_heads, self.dim)
        return torch.empty(shape, dtype=self.compute_dtype, device=self.flat_blocks.device).transpose(1, 2)

    def head_runs(self, chunk: slice):
        """The chunk's tiles split where the (batch, kv head) changes: ``(batch, kv head, first tile, end tile,
        position of the first tile in the chunk)``, tiles counted within the head."""
        start = chunk.start
        while start < chunk.stop:
            head, first = divmod(start, self.n_tiles)
            stop = min(chunk.stop, (head + 1) * self.n_tiles)
            yield (*divmod(head, self.kv_heads), first, first + stop - start, start - chunk.start)
            start = stop

    def _tiles_of(self, x: torch.Tensor, batch: int, kv_head: int, first: int, end: int) -> torch.Tensor:
        """Tiles ``first:end`` of one (batch, kv head) of ``x (b, hq, padded lq, d)``, any strides, as a
        ``(tiles, group, tile_size, d)`` view (a tile's rows are (group head, position) pairs, as in `to_tiles`)."""
        heads = slice(kv_head * self.group, (kv_head + 1) * self.group)
        rows = x[batch, heads, first * self.tile_size : end * self.tile_size]
        return rows.unflatten(1, (end - first, self.tile_size)).transpose(0, 1)

    def write_chunk(self, chunk: slice, tiles: torch.Tensor, x: torch.Tensor) -> None:
        """Copies the chunk's ``tiles (chunk tiles, rows, d)`` into their places in ``x (b, hq, padded lq, d)``."""
        for batch, kv_head, first, end, at in self.head_runs(chunk):
            part = tiles[at : at + end - first].reshape(end - first, self.group, self.tile_size, self.dim)
            self._tiles_of(x, batch, kv_head, first, end).copy_(part)

    def read_chunk(self, chunk: slice, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The chunk's tiles of ``x (b, hq, padded lq, d)``, any strides, as ``(chunk tiles, rows, d)`` in the
        workspace ``out`` (in the compute dtype)."""
        tiles = workspace_view(out, chunk.stop - chunk.start, self.rows, self.dim)
        for batch, kv_head, first, end, at in self.head_runs(chunk):
            part = tiles[at : at + end - first].view(end - first, self.group, self.tile_size, self.dim)
            part.copy_(self._tiles_of(x, batch, kv_head, first, end))
        return tiles

    def pad_queries(self, x: torch.Tensor) -> torch.Tensor:
        """``x (b, hq, lq, d)`` padded with zero rows to whole tiles (itself when nothing is missing)."""
        pad = self.n_tiles * self.tile_size - self.q_len
        return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x

    # -- per chunk ----------------------------------------------------------------------------------------------------

    def chunks(self):
        for start in range(0, self.n_flat_tiles, self.tiles_per_chunk):
            yield slice(start, min(start + self.tiles_per_chunk, self.n_flat_tiles))

    def block_index(self, chunk: slice) -> torch.Tensor:
        """Flat index of the chunk's slot blocks, ``(tiles * slots,)``."""
        return self.flat_blocks[chunk].reshape(-1)

    def gather(self, blocks: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The slot blocks ``index`` (`block_index`), ``(tiles, slots * block_size, d)``, written into ``out``."""
        return select_into(blocks, index, out).view(-1, self.keys_per_tile, self.dim)

    @property
    def masked(self) -> bool:
        """Whether any chunk has scores to mask (padding, empty slots, per-token rows, causality)."""
        return any(x is not None for x in (self.key_valid, self.slot_valid, self.row_slots)) or self.causal

    def mask(self, chunk: slice) -> torch.Tensor | None:
        """Visibility ``(tiles, rows | 1, slots * block_size)`` of the chunk's scores, or ``None`` when all visible."""
        mask = None
        index = self.flat_blocks[chunk]
        tiles = index.shape[0]
        if self.key_valid is not None:
            mask = self.key_valid[index]  # tiles slots block
        if self.slot_valid is not None:
            slots = self.slot_valid[chunk][:, :, None]
            mask = slots if mask is None else mask & slots
        if mask is not None:
            mask = mask.expand(tiles, self.slots, self.block_size).reshape(tiles, 1, self.keys_per_tile)
        if self.row_slots is not None:
            rows = self.row_slots[chunk][:, None, :, :, None].expand(-1, self.group, -1, -1, self.block_size)
            rows = rows.reshape(tiles, self.rows, self.keys_per_tile)
            mask = rows if mask is None else mask & rows
        if self.causal:
            key_position = (self.block_start[index][:, :, None] + self.key_offset).view(tiles, 1, -1)
            query_position = (self.tile_start[chunk][:, None] + self.row_offset).view(tiles, self.rows, 1)
            visible = key_position <= query_position
            mask = visible if mask is None else mask & visible
        return mask

    def additive_mask(self, chunk: slice, out: torch.Tensor | None) -> torch.Tensor | None:
        """The chunk's visibility as the flash kernel's float mask ``(tiles, 1, rows | 1, keys)``: 0 or ``-inf``;
        ``None`` when nothing is masked (then ``out``, the workspace, may be ``None``)."""
        mask = self.mask(chunk)
        if mask is None:
            return None
        bias = workspace_view(out, *mask.shape)
        bias.zero_().masked_fill_(~mask, float("-inf"))
        return bias[:, None]

    def scores(
        self, q: torch.Tensor, keys: torch.Tensor, chunk: slice, scale: float, out: torch.Tensor
    ) -> torch.Tensor:
        """Scaled, masked scores ``(tiles, rows, keys)`` of the chunk (masked entries ``-inf``), into ``out``."""
        queries = q[chunk]
        out = workspace_view(out, queries.shape[0], self.rows, self.keys_per_tile)
        torch.baddbmm(out, queries, keys.transpose(1, 2), beta=0.0, alpha=scale, out=out)
        mask = self.mask(chunk)
        if mask is not None:
            out.masked_fill_(~mask, float("-inf"))
        return out

    def workspace(self, *names: str) -> dict[str, torch.Tensor | None]:
        """Buffers for one chunk, allocated once per pass and reused (fresh large allocations cost page faults); the
        mask's ``"bias"`` only when something is masked."""
        sizes = {
            "keys": self.tiles_per_chunk * self.keys_per_tile * self.dim,
            "values": self.tiles_per_chunk * self.keys_per_tile * self.dim,
            "out": self.tiles_per_chunk * self.rows * self.dim,
            "grad_out": self.tiles_per_chunk * self.rows * self.dim,
            "scores": self.tiles_per_chunk * self.rows * self.keys_per_tile,
            "grad_probs": self.tiles_per_chunk * self.rows * self.keys_per_tile,
            "bias": self.tiles_per_chunk * self.rows * self.keys_per_tile,
        }
        device = self.key_valid.device if self.key_valid is not None else self.flat_blocks.device
        return {
            name: torch.empty(sizes[name], dtype=self.compute_dtype, device=device)
            if name != "bias" or self.masked
            else None
            for name in names
        }


def _dropout_keep(shape, p: float, seed: int, chunk_index: int, device) -> torch.Tensor:
    """The keep-mask of one chunk, reproducible from (seed, chunk) so the backward pass can regenerate it."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + chunk_index)
    return torch.rand(shape, generator=generator, device=device) >= p


class _GatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, layout: _Layout, scale: float, dropout: float, seed: int):
        q = layout.to_tiles(query)
        k = layout.to_blocks(key)
        v = layout.to_blocks(value)
        out = layout.empty_token_major()
        lse = torch.empty(q.shape[:2], dtype=q.dtype, device=q.device)
        if dropout:
            _forward_with_dropout(q, k, v, layout, scale, dropout, seed, out, lse)
        else:
            work = layout.workspace("keys", "values", "bias")
            for chunk in layout.chunks():
                index = layout.block_index(chunk)
                keys, values = layout.gather(k, index, work["keys"]), layout.gather(v, index, work["values"])
                chunk_out, chunk_lse = _flash_forward(
                    q[chunk].unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1),
                    attn_mask=layout.additive_mask(chunk, work["bias"]), scale=scale,
                )  # fmt: skip
                layout.write_chunk(chunk, chunk_out.squeeze(1), out)
                lse[chunk].copy_(chunk_lse.squeeze(1))
        # q, k, v are saved in the kernel's layout (copies of the inputs, which are then free): the backward pass
        # does not copy them again; the output is saved as returned (token-major, see `empty_token_major`)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.dropout, ctx.seed = layout, scale, dropout, seed
        ctx.input_dtypes = (query.dtype, key.dtype, value.dtype)
        return out[:, :, : layout.q_len].to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale, dropout, seed = ctx.layout, ctx.scale, ctx.dropout, ctx.seed
        grad_out = layout.pad_queries(grad_out)  # read chunk by chunk in whatever layout it comes
        # Gradients are written into three N x d buffers and returned as views of them: peak memory stays at what dense
        # SDPA's backward needs (its three gradients) plus one chunk's workspace.
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_k = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        if dropout:
            _backward_with_dropout(q, k, v, out, lse, grad_out, layout, scale, dropout, seed, grad_q, grad_k, grad_v)
        else:
            work = layout.workspace("keys", "values", "bias", "out", "grad_out")
            for chunk in layout.chunks():
                index = layout.block_index(chunk)
                keys, values = layout.gather(k, index, work["keys"]), layout.gather(v, index, work["values"])
                chunk_out = layout.read_chunk(chunk, out, work["out"])
                chunk_grad_out = layout.read_chunk(chunk, grad_out, work["grad_out"])
                chunk_grad_q, grad_keys, grad_values = _flash_backward(
                    chunk_grad_out[:, None], q[chunk][:, None], keys[:, None], values[:, None], chunk_out[:, None],
                    lse[chunk][:, None], 0.0, False, attn_mask=layout.additive_mask(chunk, work["bias"]), scale=scale,
                )  # fmt: skip
                grad_q[chunk] = chunk_grad_q[:, 0]
                _add_to_blocks(layout, index, grad_k, grad_keys, grad_v, grad_values)
        query_dtype, key_dtype, value_dtype = ctx.input_dtypes
        grad_query = layout.from_tiles(grad_q).to(query_dtype)
        grad_key = layout.from_blocks(grad_k).to(key_dtype)
        grad_value = layout.from_blocks(grad_v).to(value_dtype)
        return grad_query, grad_key, grad_value, None, None, None, None


def _add_to_blocks(layout: _Layout, index: torch.Tensor, grad_k, grad_keys, grad_v, grad_values) -> None:
    """Scatter-adds the gradients of the gathered slot blocks ``index`` back onto the key/value blocks."""
    grad_k.index_add_(0, index, grad_keys.reshape(-1, layout.block_size, layout.dim))
    grad_v.index_add_(0, index, grad_values.reshape(-1, layout.block_size, layout.dim))


def _forward_with_dropout(q, k, v, layout: _Layout, scale: float, dropout: float, seed: int, out, lse) -> None:
    """Forward with attention dropout: masked softmax and batched matmuls per chunk (the flash kernel has no dropout);
    fills ``out`` (token-major) and ``lse`` (``inf`` for a row with no visible key)."""
    work = layout.workspace("keys", "values", "scores", "out")
    for number, chunk in enumerate(layout.chunks()):
        index = layout.block_index(chunk)
        keys, values = layout.gather(k, index, work["keys"]), layout.gather(v, index, work["values"])
        probs = layout.scores(q, keys, chunk, scale, work["scores"])
        row_max = probs.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # rows with no visible key: 0
        probs.sub_(row_max).exp_()
        row_sum = probs.sum(-1, keepdim=True)
        probs.mul_(_dropout_keep(probs.shape, dropout, seed, number, probs.device)).mul_(1.0 / (1.0 - dropout))
        empty = row_sum == 0
        chunk_out = workspace_view(work["out"], probs.shape[0], layout.rows, layout.dim)
        torch.bmm(probs, values, out=chunk_out).div_(row_sum.masked_fill_(empty, 1.0))
        layout.write_chunk(chunk, chunk_out, out)
        lse[chunk] = (row_max + row_sum.log()).masked_fill_(empty, float("inf")).squeeze(-1)


def _backward_with_dropout(q, k, v, out, lse, grad_out, layout: _Layout, scale, dropout, seed, grad_q, grad_k, grad_v):
    """Backward of `_forward_with_dropout`: recomputes each chunk's probabilities from the saved log-sum-exp and
    regenerates its dropout mask from (seed, chunk)."""
    work = layout.workspace("keys", "values", "scores", "grad_probs", "out", "grad_out")
    for number, chunk in enumerate(layout.chunks()):
        index = layout.block_index(chunk)
        keys, values = layout.gather(k, index, work["keys"]), layout.gather(v, index, work["values"])
        chunk_out = layout.read_chunk(chunk, out, work["out"])
        grad_o = layout.read_chunk(chunk, grad_out, work["grad_out"])
        probs = layout.scores(q, keys, chunk, scale, work["scores"])
        probs.sub_(lse[chunk][:, :, None]).exp_()  # exact probabilities, from the saved log-sum-exp
        grad_probs = workspace_view(work["grad_probs"], *probs.shape)
        torch.bmm(grad_o, values.transpose(1, 2), out=grad_probs)
        keep = _dropout_keep(probs.shape, dropout, seed, number, probs.device).to(probs.dtype) / (1.0 - dropout)
        grad_values = torch.bmm((probs * keep).transpose(1, 2), grad_o)
        grad_probs.mul_(keep)
        delta = (grad_o * chunk_out).sum(-1, keepdim=True)  # rowsum(dO * O): softmax backward's correction
        grad_scores = grad_probs.sub_(delta).mul_(probs).mul_(scale)  # d(loss)/d(raw scores q.k)
        torch.bmm(grad_scores, keys, out=grad_q[chunk])
        grad_keys = torch.bmm(grad_scores.transpose(1, 2), q[chunk])
        _add_to_blocks(layout, index, grad_k, grad_keys, grad_v, grad_values)


def gather_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: TilePlan,
    *,
    block_size: int,
    key_valid: torch.Tensor | None,
    causal: bool,
    query_offset: int,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Block-sparse attention of ``query (b, hq, lq, d)`` over the key blocks of ``plan``; returns ``(b, hq, lq, d)``.

    ``key_valid (b, lk)`` marks real keys (``None``: all). With ``causal``, query ``i`` sits at key position
    ``query_offset + i`` and sees keys at or before it. A query with no visible key gets zeros.
    """
    compute_dtype = torch.promote_types(query.dtype, torch.float32)  # half inputs are computed in float32
    layout = _Layout(
        query.shape, key.shape, plan, block_size, key_valid, causal, query_offset, query.device, compute_dtype
    )
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout else 0
    return _GatherAttention.apply(query, key, value, layout, scale, dropout, seed)
