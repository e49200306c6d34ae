# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""Level 2, `gather` backend for one query per sequence (cached decoding): gather the selected tokens, one softmax.

A decoding step has ``q_len == 1``: each (batch, key/value head) routes one query to ``top_k`` key blocks, so level 2
is a single attention row over ``top_k * block_size`` keys. The tile and piece kernels (`gather_dualroute.py`,
`token_gather_dualroute.py`) are built for thousands of queries; for one query their set-up (tile tables, padding the
keys to whole blocks, chunk loops) costs more than the attention itself, and padding a ragged key length copies every
cached key at every step. Here the selected tokens are indexed straight out of the (possibly strided) cache, so a step
reads ``top_k * block_size`` keys and values per head and nothing else. Plain differentiable ops: autograd gives the
backward. `reference` in `attention_dualroute.py` is the slow twin this is tested against.

Every step gathers the same amount (1 MB of keys and 1 MB of values per sequence at 8 heads, top-8 of 64-token
blocks), and on CPU a fresh allocation of that size is mapped afresh by the C allocator and page-faults in at every
step: at 16k encoder tokens and 4 beams that was ~12,000 page faults per step, most of the step's time. When no input
needs a gradient (autograd would keep the gathered keys and values) the gathers on CPU therefore go into scratch
buffers kept per thread and reused, up to `SCRATCH_MAX_ELEMENTS` each.

Copying the selected keys and values out and reading them again in two matrix products still costs three passes
over them. When the cache also keeps its keys block-major (`block_major_keys`: each block transposed, ``(d, B)``, as
a write-once cross-attention cache layer does), a step reads each selected key and value once instead
(`_attend_block_major`): every score row of a block is ``sum_c q_c * K_block[c, :]``, a weighted sum of the
block's ``d`` rows, and the output is ``sum_t p_t * V[t]``, a weighted sum of the selected values, and both are one
`embedding_bag` (gather and weighted sum fused). At 16k encoder tokens and a batch of 8 that took a decoding step
from 42.5 to 38.0 ms (the 6 layers' cross-attention gathers and products 12.6 ms, the two bags 5.6 ms).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .gather_dualroute import select_into
from .routing_dualroute import num_blocks


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: torch.Tensor,
    *,
    block_size: int,
    key_valid: torch.Tensor | None,
    causal: bool,
    query_offset: int,
    scale: float,
    key_blocks: torch.Tensor | Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of a single query per sequence over its routed key blocks.

    Args:
        query: ``(b, hq, 1, d)``.
        key, value: ``(b, hk, lk, d)``, any strides.
        plan: ``(b, hk, 1, top_k)`` per-token routing plan, ``-1`` for an empty slot.
        key_valid: ``(b, lk)`` bool, ``True`` = real key; ``None``: all real.
        causal: the query sits at key position ``query_offset`` and sees keys at or before it.
        key_blocks: the same keys block-major (`block_major_keys`), or a function that returns them (a cache layer's
            reader, called only when this call uses them): on CPU, outside autograd and compilation, float32/64
            keys and values and a contiguous ``value`` read them instead of gathering blocks of ``key``.

    Returns:
        ``(b, hq, 1, d)``; zeros where no selected key is visible.
    """
    batch, q_heads, _, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    compute_dtype = torch.promote_types(query.dtype, torch.float32)  # half inputs are computed in float32
    # autograd keeps the gathered keys and values (for the query's gradient too): scratch only outside it
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    scratch = query.device.type == "cpu" and not needs_grad and not torch.compiler.is_compiling()

    selected = plan[:, :, 0]  # b hk k
    top_k = selected.shape[-1]
    # Known from the shapes alone: with no padding and at least top_k candidate blocks, every key of a selected block is
    # visible (a causal decoding query is the last key, so causality hides nothing from it), but for the ragged tail.
    candidates = num_blocks(query_offset + 1 if causal else k_len, block_size)
    last_key = causal and query_offset == k_len - 1
    all_visible = key_valid is None and candidates >= top_k and (last_key or not causal)
    ragged = k_len % block_size != 0
    if (
        key_blocks is not None
        and query.device.type == "cpu"  # measured there; elsewhere the keys are gathered as before
        and not needs_grad
        and not torch.compiler.is_compiling()
        and query.dtype == key.dtype == value.dtype
        and query.dtype in (torch.float32, torch.float64)
        and value.is_contiguous()
    ):
        key_blocks = key_blocks() if callable(key_blocks) else key_blocks
        expected = (batch, kv_heads, num_blocks(k_len, block_size), dim, block_size)
        if key_blocks.shape != expected or key_blocks.dtype != key.dtype or key_blocks.device != key.device:
            raise ValueError(
                f"`key_blocks` must be `key` block-major, shape {expected}, {key.dtype} on {key.device}; got "
                f"{tuple(key_blocks.shape)}, {key_blocks.dtype} on {key_blocks.device}."
            )
        # an empty slot (a block with NaN scores is never chosen) or the ragged tail reads what is not a key
        masked = not all_visible or ragged or bool((selected < 0).any())
        token, visible = _selected_tokens(selected, block_size, k_len, key_valid, causal, query_offset, masked)
        q = query.reshape(batch, kv_heads, group, dim) * scale
        return _attend_block_major(q, key_blocks, value, selected, token, visible).reshape(batch, q_heads, 1, dim)

    # The step reads whole blocks (`_select_whole_blocks`) when all are visible, masking only what it reads that is not
    # a selected key. A ragged length is read through an overlapping view, whose gradient would be B times the size of
    # the keys: only outside autograd. Anything else takes the token-level path with a visibility mask.
    windows_ok = k_len >= block_size and key.is_contiguous() and value.is_contiguous() and not needs_grad
    needs_mask = not (all_visible and (not ragged or windows_ok))
    if needs_mask:
        token, visible = _selected_tokens(selected, block_size, k_len, key_valid, causal, query_offset, True)
        keys, values = _select_tokens(token, key, value, scratch=scratch)  # b hk k*B d
    else:
        (keys, values), left_out = _select_whole_blocks(selected, block_size, key, value, scratch=scratch)
        visible = None if left_out is None else ~left_out
    keys, values = keys.to(compute_dtype), values.to(compute_dtype)

    q = query.reshape(batch, kv_heads, group, dim).to(compute_dtype) * scale  # the group's heads share the routing
    probs = _masked_softmax(torch.matmul(q, keys.transpose(-1, -2)), visible)  # b hk g k*B
    output = torch.matmul(probs, values)  # b hk g d
    return output.reshape(batch, q_heads, 1, dim).to(query.dtype)


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of ``scores`` ``(b, hk, g, n)`` where ``visible`` ``(b, hk, n)`` (``None``: all);
    hidden entries get probability 0. A finite fill keeps a row without visible keys finite (uniform, then zeroed),
    forward and backward."""
    if visible is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~visible[:, :, None, :], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * visible[:, :, None, :]


def block_major_keys(key: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(b, hk, n_blocks, d, B)``: each key block of ``key`` ``(b, hk, lk, d)`` transposed, the ragged last block
    padded with zeros (its padding is never visible: `_selected_tokens` masks positions past ``lk``)."""
    batch, heads, length, dim = key.shape
    blocks = num_blocks(length, block_size)
    if length % block_size:
        key = F.pad(key, (0, 0, 0, blocks * block_size - length))
    return key.reshape(batch, heads, blocks, block_size, dim).transpose(-1, -2).contiguous()


def _selected_tokens(
    selected: torch.Tensor,
    block_size: int,
    k_len: int,
    key_valid: torch.Tensor | None,
    causal: bool,
    query_offset: int,
    need_visible: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(token, visible)``, both ``(b, hk, k*B)``: the key position of each token of the selected blocks, and
    (when ``need_visible``, else ``None``) whether it is a visible key. The ragged tail and empty slots (``-1``) are
    not visible and read a real key (the last one, or block 0's), so that gathering them needs no bounds check."""
    offsets = torch.arange(block_size, device=selected.device)
    token = (selected.clamp(min=0)[..., None] * block_size + offsets).flatten(2)
    visible = None
    if need_visible:
        visible = (selected >= 0)[..., None].expand(-1, -1, -1, block_size).flatten(2) & (token < k_len)
        if causal:
            visible &= token <= query_offset
    token = token.clamp(max=k_len - 1)
    if need_visible and key_valid is not None:
        visible &= torch.gather(key_valid[:, None, :].expand(-1, selected.shape[1], -1), 2, token)
    return token, visible


def _attend_block_major(
    q: torch.Tensor,
    key_blocks: torch.Tensor,
    value: torch.Tensor,
    selected: torch.Tensor,
    token: torch.Tensor,
    visible: torch.Tensor | None,
) -> torch.Tensor:
    """``(b, hk, g, d)`` attention of the scaled queries ``q`` ``(b, hk, g, d)`` over the blocks ``selected``
    ``(b, hk, k)`` (tokens ``token``, visibility ``visible`` or ``None`` for all: `_selected_tokens`), reading
    block-major keys and contiguous values in place: two `embedding_bag` calls of fixed-length bags.

    Scores: one bag per (query, selected block), the block's ``d`` rows of ``key_blocks`` weighted by the query's
    ``d`` features, giving the block's ``B`` scores. Output: one bag per query, the selected tokens' value rows
    weighted by their probabilities (zero where not visible)."""
    batch, kv_heads, group, dim = q.shape
    n_blocks, block_size = key_blocks.shape[2], key_blocks.shape[-1]
    k_len, top_k = value.shape[2], selected.shape[-1]
    head = torch.arange(batch * kv_heads, device=q.device).view(batch, kv_heads, 1)
    key_rows = (head * n_blocks + selected.clamp(min=0))[..., None] * dim + torch.arange(dim, device=q.device)
    scores = F.embedding_bag(
        key_rows[:, :, None].expand(-1, -1, group, -1, -1).reshape(-1, dim),  # b hk g k, d
        key_blocks.view(-1, block_size),
        mode="sum",
        per_sample_weights=q[:, :, :, None, :].expand(-1, -1, -1, top_k, -1).reshape(-1, dim),
    ).view(batch, kv_heads, group, top_k * block_size)
    probs = _masked_softmax(scores, visible)
    value_rows = (head * k_len + token)[:, :, None].expand(-1, -1, group, -1)  # b hk g k*B
    output = F.embedding_bag(
        value_rows.reshape(-1, top_k * block_size),
        value.view(-1, dim),
        mode="sum",
        per_sample_weights=probs.reshape(-1, top_k * block_size),
    )
    return output.view(batch, kv_heads, group, dim)


def _select_whole_blocks(
    selected: torch.Tensor, block_size: int, *tensors: torch.Tensor, scratch: bool
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The keys of blocks ``selected[b, h]`` as ``(b, h, k*B, d)`` for each ``x``, one `index_select` of ``B * d``
    values per block (a plain copy) instead of one per token; and ``left_out`` ``(b, h, k*B)``, the gathered positions
    that are not keys of a selected block, or ``None`` when there are none.

    Whole blocks are rows of ``x.view(-1, B * d)``. When the length is not a whole number of blocks, the ``B`` rows
    from any token on are one row of an overlapping view of the (contiguous) keys, and the ragged last block is read
    as the window of its head's last ``B`` keys: its first ``nk * B - length`` positions belong to the block before
    and are left out. A slot without a block (``-1``: a block whose scores were NaN is never chosen) reads block 0 and
    is left out. Other layouts (whole blocks only) go through `_select_tokens`.
    """
    batch, heads, length, dim = tensors[0].shape
    first_key = selected.clamp(min=0) * block_size
    left_out = None
    if not all(x.is_contiguous() for x in tensors):
        offsets = torch.arange(block_size, device=selected.device)
        gathered = _select_tokens((first_key[..., None] + offsets).flatten(2), *tensors, scratch=scratch)
    else:
        shape = (batch, heads, selected.shape[-1] * block_size, dim)
        head_start = length * torch.arange(batch * heads, device=selected.device).view(batch, heads, 1)
        if length % block_size == 0:
            sources = [x.view(-1, block_size * dim) for x in tensors]
            rows = ((first_key + head_start) // block_size).view(-1)
        else:
            window_start = first_key.clamp(max=length - block_size)
            sources = [x.as_strided((x.numel() // dim - block_size + 1, block_size * dim), (dim, 1)) for x in tensors]
            rows = (window_start + head_start).view(-1)
            offsets = torch.arange(block_size, device=selected.device)
            left_out = (offsets < (first_key - window_start)[..., None]).flatten(2)  # > 0 only for the last block
        gathered = tuple(
            _index_rows(source, rows, slot if scratch else None).view(shape) for slot, source in enumerate(sources)
        )
    empty = selected < 0
    if torch.compiler.is_compiling() or bool(empty.any()):
        empty = empty[..., None].expand(-1, -1, -1, block_size).flatten(2)
        left_out = empty if left_out is None else left_out | empty
    return gathered, left_out


def _select_tokens(token: torch.Tensor, *tensors: torch.Tensor, scratch: bool) -> tuple[torch.Tensor, ...]:
    """``x[b, h, token[b, h, j]]`` as ``(b, h, j, d)`` for each ``x``. A cache's keys are contiguous: one row
    `index_select` over the flattened keys (4x faster on CPU than advanced indexing); other layouts are indexed in
    place rather than copied."""
    batch, heads, length, dim = tensors[0].shape
    rows = None
    out = []
    for x in tensors:
        if x.is_contiguous():
            if rows is None:
                rows = (token + length * torch.arange(batch * heads, device=x.device).view(batch, heads, 1)).view(-1)
            out.append(_index_rows(x.view(-1, dim), rows, len(out) if scratch else None).view(*token.shape, dim))
        else:
            batch_index = torch.arange(batch, device=x.device)[:, None, None]
            head_index = torch.arange(heads, device=x.device)[None, :, None]
            out.append(x[batch_index, head_index, token])
    return tuple(out)


_scratch = threading.local()  # per thread: two generate() calls in two threads never share a buffer

# A scratch buffer larger than this (64 MB in float32) is not kept: such a batch pays the page faults.
SCRATCH_MAX_ELEMENTS = 1 << 24


def _index_rows(source: torch.Tensor, rows: torch.Tensor, slot: int | None) -> torch.Tensor:
    """``source[rows]`` (a 2D ``source``), written into this thread's scratch buffer ``slot`` (0: keys, 1: values;
    ``None``: a fresh tensor), which the next call reuses."""
    numel = rows.numel() * source.shape[1]
    if slot is None or numel > SCRATCH_MAX_ELEMENTS:
        return source.index_select(0, rows)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((slot, source.dtype))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buffer = buffers[(slot, source.dtype)] = torch.empty(numel, dtype=source.dtype, device=source.device)
    return select_into(source, rows, buffer)


__all__ = ["block_major_keys", "decode_attention"]
