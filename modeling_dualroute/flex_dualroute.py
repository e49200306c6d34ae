# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""Level 2, `flex` backend: `torch.nn.attention.flex_attention` driven by a `BlockMask` built from the routing plan.

Per query block routing maps one-to-one onto a BlockMask: query tile = query block, ``kv_indices`` = the selected key
blocks, ``kv_num_blocks`` = how many. Per token routing uses query tiles of one key block's size whose listed blocks are
the union of the tile's token selections. The BlockMask only says which blocks a kernel may skip; ``mask_mod`` states
the whole mask (routing, padding, the ragged last block, causality).

The kernel is compiled (eager FlexAttention materialises O(N^2) scores). On CPU, torch supports the compiled forward
only; a CPU call that needs gradients raises. Attention dropout is not supported by FlexAttention.
"""

from __future__ import annotations

import torch

from .gather_dualroute import tile_plan_from_routes
from .routing_dualroute import num_blocks


_COMPILED_FLEX = None


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as flex_module
    except ImportError:  # pragma: no cover - torch without FlexAttention
        return None
    return flex_module


FLEX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the compiled kernel takes (inductor's templates)


def check_flex_available(device: torch.device, *, dtype: torch.dtype, requires_grad: bool, raise_error: bool) -> bool:
    """Whether the `flex` backend can run here; with ``raise_error``, raises a `RuntimeError` saying why not."""
    reason = None
    if _flex_module() is None:
        reason = f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    elif device.type not in ("cuda", "cpu", "xpu"):
        reason = f"FlexAttention does not run on device type {device.type!r}"
    elif dtype not in FLEX_DTYPES:
        reason = (
            f"its compiled kernel takes float32, float16 or bfloat16 inputs, got {dtype}; use backend='gather' "
            "(any floating dtype)"
        )
    elif device.type == "cpu" and requires_grad:
        reason = (
            f"FlexAttention has no backward pass on CPU (torch {torch.__version__}); "
            "use backend='gather' for CPU training, or run under torch.no_grad()"
        )
    if reason and raise_error:
        raise RuntimeError(f"backend='flex' cannot run: {reason}.")
    return reason is None


FLEX_RECOMPILE_LIMIT = 64  # distinct (shape, dtype, GQA) signatures compiled before `flex` raises


def _compiled_flex_attention():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(_flex_module().flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_attention_from_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: torch.Tensor,
    *,
    per_token: bool,
    block_size: int,
    key_valid: torch.Tensor | None,
    causal: bool,
    query_offset: int,
    scale: float,
) -> torch.Tensor:
    """Runs FlexAttention over the blocks of ``plan``; same contract as `gather_attention`."""
    BlockMask = _flex_module().BlockMask
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    n_key_blocks = num_blocks(k_len, block_size)
    tiles = tile_plan_from_routes(
        plan, per_token=per_token, block_size=block_size, n_key_blocks=n_key_blocks, tile_size=block_size
    )
    kv_blocks = tiles.kv_blocks  # b hk nt slots
    if group > 1:
        kv_blocks = kv_blocks.repeat_interleave(group, dim=1)  # the BlockMask is per query head
    kv_tile = block_size
    if query.device.type == "cpu" and block_size % 16 == 8:
        # torch 2.13's CPU FlexAttention template returns wrong results for KV tiles of 8 (mod 16) tokens (measured:
        # 8, 24, 40, 56, 72 fail; 16, 32, 48, ... and sizes not divisible by 8 pass). Halve the tile instead.
        kv_tile = block_size // 2
        kv_blocks = _split_blocks(kv_blocks, 2, num_blocks(k_len, kv_tile))
    n_kv_tiles = num_blocks(k_len, kv_tile)
    # kv_indices lists every key tile per row: the selected ones first, the rest is ignored padding. A plan can have
    # more slots than there are key tiles (top_k above the block count of a short input; tiles split in two past the
    # ragged end), but the selected ones are distinct key tiles: sorted first, they fit in n_kv_tiles columns.
    listed = torch.where(kv_blocks < 0, n_kv_tiles, kv_blocks).sort(dim=-1).values[..., :n_kv_tiles]
    counts = (listed < n_kv_tiles).sum(-1).to(torch.int32)
    indices = torch.zeros(*kv_blocks.shape[:3], n_kv_tiles, dtype=torch.int32, device=query.device)
    indices[..., : listed.shape[-1]] = torch.where(listed < n_kv_tiles, listed, 0).to(torch.int32)

    # Every listed block goes in the partial set, checked by mask_mod: inductor's CPU template fails to compile a
    # BlockMask with full blocks in torch 2.13, and one code path keeps CPU and GPU results identical.
    mask_mod = _mask_mod(
        key_valid, causal, query_offset, plan, per_token, block_size, group, k_len, tiles.n_tiles * tiles.tile_size
    )
    block_mask = BlockMask.from_kv_blocks(
        counts, indices, BLOCK_SIZE=(tiles.tile_size, kv_tile), mask_mod=mask_mod, seq_lengths=(q_len, k_len)
    )
    if not torch.is_grad_enabled():  # torch's CPU check looks at requires_grad even under no_grad
        query, key, value = query.detach(), key.detach(), value.detach()
    # The kernel is compiled per shape (dynamic=False). Past dynamo's default of 8 recompiles torch would silently run
    # the eager FlexAttention, which materialises O(N^2) scores; allow more shapes and fail loudly past them instead.
    with torch._dynamo.config.patch(
        recompile_limit=max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT),
        fail_on_recompile_limit_hit=True,
    ):
        return _compiled_flex_attention()(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=group > 1)


def _split_blocks(kv_blocks: torch.Tensor, parts: int, n_tiles: int) -> torch.Tensor:
    """Key block j -> key tiles ``j * parts ... j * parts + parts - 1`` (those that exist), valid entries first."""
    tiles = kv_blocks[..., None] * parts + torch.arange(parts, device=kv_blocks.device)
    tiles = torch.where((kv_blocks[..., None] >= 0) & (tiles < n_tiles), tiles, n_tiles).flatten(-2)
    tiles = tiles.sort(dim=-1).values
    return torch.where(tiles == n_tiles, -1, tiles)


def _mask_mod(key_valid, causal, query_offset, plan, per_token, block_size, group, k_len, padded_q_len):
    """Token-level visibility (closures over index tensors, as FlexAttention expects).

    The mask_mod is the ground truth of the mask: the BlockMask only tells compiled kernels which blocks to skip, and
    eager or CPU FlexAttention evaluates mask_mod everywhere. So it checks the routing too, through a
    ``chosen[b, hk, row, key block]`` table (rows: query blocks or tokens). The tables are padded to whole tiles and
    blocks, because mask_mod is also evaluated on the padding of the last ones.
    """
    n_key_blocks = num_blocks(k_len, block_size)
    if key_valid is None:
        key_valid = torch.ones(plan.shape[0], k_len, dtype=torch.bool, device=plan.device)
    key_valid = torch.nn.functional.pad(key_valid, (0, n_key_blocks * block_size - k_len), value=False)
    batch, kv_heads, rows, _ = plan.shape
    padded_rows = padded_q_len if per_token else num_blocks(padded_q_len, block_size)
    padded = torch.nn.functional.pad(plan, (0, 0, 0, padded_rows - rows), value=-1)
    chosen = torch.zeros(batch, kv_heads, padded_rows, n_key_blocks + 1, dtype=torch.bool, device=plan.device)
    chosen.scatter_(-1, torch.where(padded < 0, n_key_blocks, padded), True)
    row_size = 1 if per_token else block_size

    def mask_mod(b, h, q_idx, kv_idx):
        visible = key_valid[b, kv_idx] & chosen[b, h // group, q_idx // row_size, kv_idx // block_size]
        if causal:
            visible = visible & (kv_idx <= q_idx + query_offset)
        return visible

    return mask_mod
