# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""Level 1 of bi-level routing attention: route every query to its top-k key blocks.

Shapes follow transformers: ``(batch, heads, seq, head_dim)``; masks are ``(batch, seq)`` with ``True`` = real token.

Legend for the shape comments:
    b  batch            hq  query heads        hk  key/value heads      g  query heads per key/value head
    lq query length     lk  key length         d   head dim
    nq query blocks     nk  key blocks         r   routing rows (query blocks or query tokens)    k  top-k

The plan this file produces is a tensor of key-block indices, ``(b, hk, rows, top_k)``, sorted ascending and
right-padded with ``-1``. ``rows`` is the number of query blocks for bidirectional self-attention (all queries of a
block share one selection) and the number of query tokens for causal self-attention and cross-attention (a block mean
would let a token's route depend on later tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


# ---------------------------------------------------------------------------------------------------------------------
# Input checks shared by the router and every level-2 backend
# ---------------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def _check_tensor(name: str, tensor, expected: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {expected}, got {type(tensor).__name__}.")
    if tensor.ndim != 4:
        raise ValueError(f"`{name}` must have shape {expected} (4 dims), got shape {tuple(tensor.shape)}.")
    if not tensor.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor, got dtype {tensor.dtype}.")


def _normalize_padding_mask(name: str, mask, batch: int, length: int, device: torch.device):
    """Validates a ``(batch, length)`` padding mask and returns it as bool (``None`` stays ``None``)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape (batch, seq) = ({batch}, {length}), got {type(mask).__name__}."
        )
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"`{name}` must be a bool (or 0/1 integer) tensor with True = real token, got dtype {mask.dtype}; "
            "additive float masks are not accepted."
        )
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"`{name}` must have shape (batch, seq) = ({batch}, {length}), got {tuple(mask.shape)}.")
    if mask.device != device:
        raise ValueError(f"`{name}` is on {mask.device} but the attention inputs are on {device}.")
    if mask.dtype == torch.bool:
        return mask
    other = non_binary_value(mask)
    if other is not None:
        raise ValueError(f"`{name}` must hold 1 (or True) for real tokens and 0 for padding, got the value {other}.")
    return mask != 0


def non_binary_value(mask: torch.Tensor):
    """The first value of ``mask`` that is neither 0 nor 1, or ``None`` (always ``None`` while compiling: a
    data-dependent check would break the graph)."""
    if mask.dtype == torch.bool or torch.compiler.is_compiling():
        return None
    other = (mask != 0) & (mask != 1)
    return mask[other][0].item() if bool(other.any()) else None


def check_routing_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None = None,
    *,
    block_size: int,
    top_k: int,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    global_blocks: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Raises a `TypeError`/`ValueError` naming the offending argument; returns the masks as bool tensors."""
    _check_tensor("query", query, "(batch, query_heads, q_len, head_dim)")
    _check_tensor("key", key, "(batch, kv_heads, k_len, head_dim)")
    tensors = {"query": query, "key": key}
    if value is not None:
        _check_tensor("value", value, "(batch, kv_heads, k_len, head_dim)")
        tensors["value"] = value
        if value.shape != key.shape:
            raise ValueError(f"`value` must have the shape of `key` {tuple(key.shape)}, got {tuple(value.shape)}.")
    for name, tensor in tensors.items():
        if tensor.dtype != query.dtype:
            raise TypeError(f"`{name}` has dtype {tensor.dtype} but `query` has dtype {query.dtype}; they must match.")
        if tensor.device != query.device:
            raise ValueError(f"`{name}` is on {tensor.device} but `query` is on {query.device}; they must match.")
    batch, q_heads, q_len, head_dim = query.shape
    _, kv_heads, k_len, _ = key.shape
    if key.shape[0] != batch:
        raise ValueError(f"`key` has batch size {key.shape[0]} but `query` has {batch}.")
    if key.shape[-1] != head_dim:
        raise ValueError(f"`key` has head_dim {key.shape[-1]} but `query` has {head_dim}.")
    if head_dim == 0 or kv_heads == 0:
        raise ValueError(f"`query` and `key` need at least one head of head_dim >= 1, got {tuple(key.shape)}.")
    if q_heads % kv_heads != 0:
        raise ValueError(
            f"`query` heads ({q_heads}) must be a multiple of `key`/`value` heads ({kv_heads}) for grouped-query attention."
        )
    if q_len == 0 or k_len == 0:
        raise ValueError(f"`query` and `key` must hold at least one position, got q_len={q_len}, k_len={k_len}.")
    _check_int("block_size", block_size, 1)
    _check_int("top_k", top_k, 1)
    _check_int("global_blocks", global_blocks, 0)
    if causal and cross:
        raise ValueError("`causal=True` and `cross=True` cannot be combined: cross-attention is never causal.")
    forced = global_blocks if cross else 1 + global_blocks
    if top_k < forced:
        kind = "cross-attention" if cross else "self-attention"
        raise ValueError(
            f"`top_k`={top_k} cannot hold the forced blocks of {kind}: it needs top_k >= "
            f"{'global_blocks' if cross else '1 + global_blocks'} = {forced}."
        )
    if not cross and not causal and q_len != k_len:
        raise ValueError(
            f"bidirectional self-attention needs q_len == k_len, got q_len={q_len}, k_len={k_len}; "
            "pass `cross=True` for attention over another sequence."
        )
    if causal and q_len > k_len:
        raise ValueError(
            f"causal self-attention needs q_len <= k_len (queries are the last positions), got {q_len} > {k_len}."
        )
    key_padding_mask = _normalize_padding_mask("key_padding_mask", key_padding_mask, batch, k_len, query.device)
    query_padding_mask = _normalize_padding_mask("query_padding_mask", query_padding_mask, batch, q_len, query.device)
    return key_padding_mask, query_padding_mask


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------------


def num_blocks(length: int, block_size: int) -> int:
    return math.ceil(length / block_size)


def routes_per_token(causal: bool, cross: bool) -> bool:
    """Bidirectional self-attention routes per query block; causal and cross-attention route per query token."""
    return causal or cross


def block_sums(
    x: torch.Tensor, block_size: int, padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 sums and counts of the visible rows of each block of ``x``.

    Returns ``sums`` of shape ``(b, h, n_blocks, d)`` and ``counts`` of shape ``(b, n_blocks)`` (int64).
    """
    batch, heads, length, dim = x.shape
    n = num_blocks(length, block_size)
    pad = n * block_size - length
    x32 = x.float()
    if padding_mask is not None:
        x32 = x32 * padding_mask[:, None, :, None]
        counts = padding_mask.long()
    else:
        counts = torch.ones(batch, length, dtype=torch.long, device=x.device)
    if pad:
        x32 = torch.nn.functional.pad(x32, (0, 0, 0, pad))
        counts = torch.nn.functional.pad(counts, (0, pad))
    sums = x32.view(batch, heads, n, block_size, dim).sum(3)  # b h n d
    return sums, counts.view(batch, n, block_size).sum(-1)  # b n


def block_descriptors(
    x: torch.Tensor, block_size: int, padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mean of the visible rows of each block (zeros for a block with none) and the visible counts."""
    sums, counts = block_sums(x, block_size, padding_mask)
    return sums / counts.clamp(min=1)[:, None, :, None].to(sums.dtype), counts


def group_query_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Mean over the query heads that share a key/value head: ``(b, hq, r, d) -> (b, hk, r, d)``.

    The routing score with GQA is the mean of ``q_h . k`` over the group, which equals ``mean_h(q_h) . k``.
    """
    batch, q_heads, rows, dim = x.shape
    if q_heads == kv_heads:
        return x
    return x.view(batch, kv_heads, q_heads // kv_heads, rows, dim).mean(2)


def indices_from_selection(selected: torch.Tensor, width: int) -> torch.Tensor:
    """Turns a boolean selection ``(..., n)`` into ascending indices ``(..., width)`` right-padded with ``-1``.

    At most ``width`` entries per row may be set.
    """
    n = selected.shape[-1]
    slot = torch.where(selected, selected.long().cumsum(-1) - 1, width)  # unselected entries go to a spare column
    out = torch.full((*selected.shape[:-1], width + 1), -1, dtype=torch.long, device=selected.device)
    positions = torch.arange(n, device=selected.device).expand_as(selected)
    out.scatter_(-1, slot, torch.where(selected, positions, -1))
    return out[..., :width]


def top_k_lowest_index_ties(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean mask of the ``top_k`` highest scores per row; ties go to the lower index; ``-inf`` is never chosen.

    ``torch.topk`` does not promise which of several equal values it returns, so ties at the k-th value are broken
    explicitly by index. This is the exact rule; `top_k_indices` uses it only for rows that have such a tie.
    """
    k = min(top_k, scores.shape[-1])
    kth = scores.topk(k, dim=-1).values[..., -1:]  # the k-th largest value of each row
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(-1, keepdim=True)  # how many tied entries still fit
    take_tied = tied & (tied.long().cumsum(-1) <= room)
    return (above | take_tied) & (scores > float("-inf"))


def top_k_indices(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Ascending indices ``(..., top_k)`` of the ``top_k`` highest scores per row, ``-1``-padded; ties go to the lower
    index and ``-inf`` entries are never chosen.

    Fast path: ``torch.topk`` picks the right *set* whenever the k-th and (k+1)-th values differ. Only rows with a tie
    across that boundary go through the exact rule; a row with fewer than k choosable entries is one of them (its k-th
    and (k+1)-th values are both ``-inf``), so the fast path never returns a ``-inf`` entry.
    """
    n = scores.shape[-1]
    k = min(top_k, n)
    if k == n:  # every choosable entry
        indices = indices_from_selection(scores > float("-inf"), k)
    else:
        top = scores.topk(k + 1, dim=-1)
        indices = top.indices[..., :k].sort(dim=-1).values
        boundary_tie = top.values[..., k - 1] == top.values[..., k]
        if torch.compiler.is_compiling():  # a traced graph takes no data-dependent branch: exact rule on every row
            exact = indices_from_selection(top_k_lowest_index_ties(scores, k), k)
            indices = torch.where(boundary_tie[..., None], exact, indices)
        elif boundary_tie.any():
            rows = boundary_tie.nonzero(as_tuple=True)
            indices[rows] = indices_from_selection(top_k_lowest_index_ties(scores[rows], k), k)
    if top_k > k:
        indices = torch.nn.functional.pad(indices, (0, top_k - k), value=-1)
    return indices


# ---------------------------------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------------------------------


def route_scores(
    query: torch.Tensor,
    key_descriptors: torch.Tensor,
    *,
    block_size: int,
    per_token: bool,
    query_padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Float32 routing scores ``(b, hk, rows, nk)``: query (block) descriptor . key-block descriptor."""
    kv_heads = key_descriptors.shape[1]
    if per_token:
        query_descriptors = query.float()  # b hq lq d
    else:
        query_descriptors, _ = block_descriptors(query, block_size, query_padding_mask)  # b hq nq d
    query_descriptors = group_query_heads(query_descriptors, kv_heads)  # b hk r d
    return query_descriptors @ key_descriptors.transpose(-1, -2)  # b hk r nk


def select_blocks(
    scores: torch.Tensor,
    key_counts: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    causal: bool,
    cross: bool,
    global_blocks: int,
    query_offset: int,
    row_offset: int = 0,
) -> torch.Tensor:
    """Applies candidates, forced blocks and top-k to routing scores; returns the plan ``(b, hk, rows, top_k)``.
    Overwrites ``scores`` (the router's own matmul output: copying it cost as much as the top-k at 16k tokens).

    ``key_counts`` ``(b, nk)`` holds the visible keys per block. ``query_offset`` is the key position of query 0
    (``k_len - q_len`` with a cache). ``row_offset`` is the index of the first row of ``scores`` (for chunking).
    """
    batch, kv_heads, rows, n_key_blocks = scores.shape
    device = scores.device
    if rows == 1:  # one row (cached decoding): the rules as slices at known positions, a few ops instead of masks
        scores[..., :global_blocks] = float("inf")
        if routes_per_token(causal, cross):
            if causal:
                own = (query_offset + row_offset) // block_size
                scores[..., own] = float("inf")
                scores[..., own + 1 :] = float("-inf")  # blocks that start after the query
        else:
            scores[..., row_offset] = float("inf")
        # last, so that a forced block without a visible key is not chosen either
        scores.masked_fill_((key_counts == 0)[:, None, None, :], float("-inf"))
        return top_k_indices(scores, top_k)
    block = torch.arange(n_key_blocks, device=device)
    candidate = (key_counts > 0)[:, None, None, :]  # b 1 1 nk: a block with no visible key is never a candidate
    forced = (block < global_blocks)[None, None, None, :]
    if routes_per_token(causal, cross):
        if causal:
            position = query_offset + row_offset + torch.arange(rows, device=device)  # key position of each query
            candidate = candidate & (block[None, :] * block_size <= position[:, None])[None, None]
            forced = forced | (block[None, :] == (position // block_size)[:, None])[None, None]
    else:
        own = row_offset + torch.arange(rows, device=device)  # query block i sits over key block i
        forced = forced | (block[None, :] == own[:, None])[None, None]
    scores.masked_fill_(~candidate, float("-inf")).masked_fill_(forced & candidate, float("inf"))
    return top_k_indices(scores, top_k)  # b hk r top_k


def route_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    global_blocks: int = 0,
    key_descriptors: tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.LongTensor:
    """Level 1: selects, for every query block (bidirectional) or query token (causal / cross), ``top_k`` key blocks.

    Args:
        query: ``(batch, query_heads, q_len, head_dim)``.
        key: ``(batch, kv_heads, k_len, head_dim)``; ``query_heads`` must be a multiple of ``kv_heads``.
        block_size: tokens per key block (and per query block when bidirectional); the last block may be ragged.
        top_k: blocks kept per query, forced blocks included.
        causal: causal self-attention; the ``q_len`` queries are the last ``q_len`` of the ``k_len`` keys.
        cross: cross-attention (queries over another sequence); no own block is forced.
        key_padding_mask / query_padding_mask: ``(batch, len)`` bool, ``True`` = real token.
        global_blocks: the first blocks, always kept (CLS / attention-sink tokens).
        key_descriptors: precomputed ``(means (b, hk, nk, d) float32, counts (b, nk))``, e.g. from a cache, or a
            function of no arguments that returns them (called only if routing runs).

    Returns:
        ``(batch, kv_heads, n_query_blocks, top_k)`` for bidirectional self-attention, else
        ``(batch, kv_heads, q_len, top_k)``; ascending key-block indices, ``-1`` where fewer than ``top_k`` blocks
        are candidates.
    """
    key_padding_mask, query_padding_mask = check_routing_inputs(
        query,
        key,
        block_size=block_size,
        top_k=top_k,
        causal=causal,
        cross=cross,
        key_padding_mask=key_padding_mask,
        query_padding_mask=query_padding_mask,
        global_blocks=global_blocks,
    )
    return _route_checked(
        query,
        key,
        block_size=block_size,
        top_k=top_k,
        causal=causal,
        cross=cross,
        key_padding_mask=key_padding_mask,
        query_padding_mask=query_padding_mask,
        global_blocks=global_blocks,
        key_descriptors=key_descriptors,
    )


# Per-token routing of long inputs builds a (rows, n_key_blocks) score matrix; cap its size per step.
_MAX_SCORE_ELEMENTS_PER_STEP = 1 << 24
# Causal rows see no block that starts after them, so a step's scores need only the blocks up to its last row: routing
# long causal inputs in 4 steps of rows skips 3/8 of the score matrix (its matmul, masks and top-k).
_CAUSAL_STEPS = 4
_MIN_ROWS_PER_STEP = 512


def _route_checked(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    causal: bool,
    cross: bool,
    key_padding_mask: torch.Tensor | None,
    query_padding_mask: torch.Tensor | None,
    global_blocks: int,
    key_descriptors: tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.LongTensor:
    """`route_blocks` without the input checks (the caller has run `check_routing_inputs`)."""
    with torch.no_grad():  # the discrete choice is not differentiated
        if key_descriptors is None:
            key_descriptors = block_descriptors(key, block_size, key_padding_mask)
        elif callable(key_descriptors):  # a cache's reader, asked only now that routing runs
            key_descriptors = key_descriptors()
        key_means, key_counts = key_descriptors
        expected = (key.shape[0], key.shape[1], num_blocks(key.shape[2], block_size), key.shape[3])
        if tuple(key_means.shape) != expected or tuple(key_counts.shape) != (expected[0], expected[2]):
            raise ValueError(
                f"`key_descriptors` must be (means {expected}, counts {(expected[0], expected[2])}) for these keys and "
                f"block_size={block_size}, got means {tuple(key_means.shape)}, counts {tuple(key_counts.shape)}."
            )
        per_token = routes_per_token(causal, cross)
        query_offset = key.shape[2] - query.shape[2] if causal else 0
        common = dict(block_size=block_size, top_k=top_k, causal=causal, cross=cross, global_blocks=global_blocks)
        if not per_token:
            scores = route_scores(
                query, key_means, block_size=block_size, per_token=False, query_padding_mask=query_padding_mask
            )
            return select_blocks(scores, key_counts, query_offset=0, **common)
        batch, kv_heads, n_key_blocks = key_means.shape[:3]
        q_len = query.shape[2]
        rows_per_step = max(1, _MAX_SCORE_ELEMENTS_PER_STEP // max(1, batch * kv_heads * n_key_blocks))
        if causal:
            rows_per_step = min(rows_per_step, max(_MIN_ROWS_PER_STEP, -(-q_len // _CAUSAL_STEPS)))
        plans = []
        for start in range(0, q_len, rows_per_step):
            stop = min(start + rows_per_step, q_len)
            # the blocks a step's rows may choose: all, or when causal those that start at or before its last row
            width = min(n_key_blocks, (query_offset + stop - 1) // block_size + 1) if causal else n_key_blocks
            scores = route_scores(
                query[:, :, start:stop],
                key_means[:, :, :width],
                block_size=block_size,
                per_token=True,
                query_padding_mask=None,
            )
            step = select_blocks(scores, key_counts[:, :width], query_offset=query_offset, row_offset=start, **common)
            plans.append(step)
        return plans[0] if len(plans) == 1 else torch.cat(plans, dim=2)
