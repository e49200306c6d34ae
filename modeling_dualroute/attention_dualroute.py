# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""Level 2 of bi-level routing attention: exact softmax attention over the routed key blocks.

`routed_attention` routes (level 1, `routing_dualroute.py`) and attends (level 2) with one of several backends that
meet one contract: the output equals dense softmax attention under the mask
``M[q, t] = visible(q, t) and block(t) in selected(q)``; a query with no visible key outputs zeros.

| backend     | what                                                                 | when                          |
|-------------|----------------------------------------------------------------------|-------------------------------|
| `reference` | builds the dense mask M and runs a plain softmax; O(N^2)             | the oracle; attention weights |
| `gather`    | gathers the selected key blocks, chunked: per query tile (per-block   | CPU training and inference    |
|             | routing, dropout) or per key block (per-token routing); a single     |                               |
|             | decoding query indexes its selected tokens directly                  |                               |
| `flex`      | FlexAttention with a BlockMask built from the plan (see file)       | GPU; CPU inference            |
| `auto`      | the fastest exact choice for the call's shapes and options           | default                       |

`auto` decides from shapes and options only, never from earlier calls: dense SDPA when top-k covers every key block
(then M is the plain visibility mask) or when the input is small enough that dense is faster (then with M), otherwise
`flex` on CUDA and `gather` elsewhere. An explicit backend that cannot run raises instead of falling back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .decode_dualroute import decode_attention
from .flex_dualroute import check_flex_available, flex_attention_from_plan
from .gather_dualroute import gather_attention, tile_plan_from_routes
from .routing_dualroute import _check_tensor, _route_checked, check_routing_inputs, num_blocks, routes_per_token
from .token_gather_dualroute import token_gather_attention


BACKENDS = ("auto", "reference", "gather", "flex")

# `auto` runs dense attention with the routed mask M when there are at most this many keys: below it one masked dense
# call beats gathering blocks (crossover measured on a 2-core CPU at 8 heads, head_dim 64: 256 tokens). Above it, even
# a single decoding query gathers its k blocks rather than reading every key.
AUTO_DENSE_MAX_KEYS = 256


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")


def routed_mask(
    plan: torch.Tensor,
    *,
    per_token: bool,
    block_size: int,
    q_len: int,
    k_len: int,
    key_valid: torch.Tensor | None,
    causal: bool,
    query_offset: int,
) -> torch.Tensor:
    """The dense mask ``M (b, hk, q_len, k_len)`` of a plan: query sees key iff visible and its block is selected."""
    batch, kv_heads, rows, _ = plan.shape
    n_key_blocks = num_blocks(k_len, block_size)
    chosen = torch.zeros(batch, kv_heads, rows, n_key_blocks + 1, dtype=torch.bool, device=plan.device)
    chosen.scatter_(-1, torch.where(plan < 0, n_key_blocks, plan), True)
    chosen = chosen[..., :n_key_blocks]
    if not per_token:  # one row per query block: every query of the block shares it
        chosen = chosen.repeat_interleave(block_size, dim=2)[:, :, :q_len]
    mask = chosen.repeat_interleave(block_size, dim=3)[..., :k_len]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if causal:
        mask = mask & causal_visibility(q_len, k_len, query_offset, plan.device)
    return mask


def causal_visibility(q_len: int, k_len: int, query_offset: int, device) -> torch.Tensor:
    """``(q_len, k_len)`` bool: query i (at key position ``query_offset + i``) sees keys at or before it."""
    query_position = query_offset + torch.arange(q_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= query_position[:, None]


def _expand_kv_heads(mask: torch.Tensor, q_heads: int) -> torch.Tensor:
    kv_heads = mask.shape[1]
    return mask if kv_heads == q_heads else mask.repeat_interleave(q_heads // kv_heads, dim=1)


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention under a dense bool ``mask (b, hk or hq, lq, lk)``; returns ``(output, weights)``.

    Computed in float32 (float64 inputs stay float64). Rows with no visible key get zero weights and zero output.
    """
    compute = torch.promote_types(query.dtype, torch.float32)
    mask = _expand_kv_heads(mask, query.shape[1])
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scores = (query.to(compute) @ key.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    if dropout:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    return (weights @ value.to(compute)).to(query.dtype), weights.to(query.dtype)


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    dropout: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """`scaled_dot_product_attention` under ``mask (b, 1|hk, lq, lk)`` (``None``: all visible, or with ``is_causal``
    SDPA's own causal pattern); empty rows give zeros."""
    group = query.shape[1] // key.shape[1]
    if mask is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=is_causal, scale=scale, enable_gqa=group > 1
        )
    mask = _expand_kv_heads(mask, query.shape[1]) if mask.shape[1] != 1 else mask
    has_visible = mask.any(-1, keepdim=True)
    # SDPA gives NaN for a row with nothing visible: let such rows see everything, then zero them.
    mask = mask | ~has_visible
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=group > 1
    )
    return out * has_visible.to(out.dtype)


def choose_backend(
    backend: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    q_len: int,
    k_len: int,
    n_key_blocks: int,
    top_k: int,
    dropout: float,
    need_weights: bool,
    requires_grad: bool,
) -> str:
    """Resolves ``auto``. Depends only on the arguments (shapes and options), never on state."""
    if backend != "auto":
        return backend
    if need_weights:
        return "reference"
    if top_k >= n_key_blocks:
        return "dense"
    if k_len <= AUTO_DENSE_MAX_KEYS:
        return "dense_routed"
    if (
        device.type == "cuda"
        and not dropout
        and check_flex_available(device, dtype=dtype, requires_grad=requires_grad, raise_error=False)
    ):
        return "flex"
    return "gather"


def routed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    global_blocks: int = 0,
    scale: float | None = None,
    dropout: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Bi-level routing attention: route each query to ``top_k`` key blocks, then attend to their tokens exactly.

    Args:
        query: ``(batch, query_heads, q_len, head_dim)``.
        key, value: ``(batch, kv_heads, k_len, head_dim)``; ``query_heads`` a multiple of ``kv_heads`` (GQA).
        block_size, top_k, causal, cross, key_padding_mask, query_padding_mask, global_blocks: see `route_blocks`.
        scale: softmax scale, default ``head_dim ** -0.5``.
        dropout: attention dropout probability (applied to the attention weights).
        backend: ``"auto"``, ``"reference"``, ``"gather"`` or ``"flex"``.

    Returns:
        ``(batch, query_heads, q_len, head_dim)``.
    """
    output, _ = routed_attention_with_plan(
        query,
        key,
        value,
        need_plan=False,
        block_size=block_size,
        top_k=top_k,
        causal=causal,
        cross=cross,
        key_padding_mask=key_padding_mask,
        query_padding_mask=query_padding_mask,
        global_blocks=global_blocks,
        scale=scale,
        dropout=dropout,
        backend=backend,
    )
    return output


def routed_attention_with_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    global_blocks: int = 0,
    scale: float | None = None,
    dropout: float = 0.0,
    backend: str = "auto",
    need_weights: bool = False,
    need_plan: bool = True,
    key_descriptors: tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    routing_query: torch.Tensor | None = None,
    routing_key: torch.Tensor | None = None,
    key_blocks: torch.Tensor | Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """`routed_attention` that also returns ``info``: ``plan`` (the routing; ``None`` when top-k covers every block and
    ``need_plan`` is False, since dense attention then needs none), ``backend`` (what ran) and ``weights``
    (``(b, hq, lq, lk)`` when ``need_weights``, which runs the reference backend). ``routing_query`` /
    ``routing_key`` (shaped like ``query`` / ``key``): what level 1 routes on instead of ``query`` / ``key``, e.g.
    the vectors before a rotary position embedding; level 2 always attends with ``query`` and ``key``.
    ``key_descriptors``: see `route_blocks` (a cache passes its reader, so that a call that runs dense attention,
    e.g. over a decoder's first ``top_k`` blocks, never computes descriptors). ``key_blocks``: ``key`` block-major, or
    a reader that returns it (see `decode_attention`); a single decoding query may read it instead of ``key``."""
    check_backend(backend)
    _check_tensor("value", value, "(batch, kv_heads, k_len, head_dim)")  # route_blocks takes no value; attention does
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"`scale` must be a number (or None: head_dim ** -0.5), got {scale!r}.")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"`scale` must be a finite number > 0, got {scale}.")
    key_padding_mask, query_padding_mask = check_routing_inputs(
        query,
        key,
        value,
        block_size=block_size,
        top_k=top_k,
        causal=causal,
        cross=cross,
        key_padding_mask=key_padding_mask,
        query_padding_mask=query_padding_mask,
        global_blocks=global_blocks,
    )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")
    for name, routing, attended in (("routing_query", routing_query, query), ("routing_key", routing_key, key)):
        if routing is not None and (routing.shape != attended.shape or routing.device != attended.device):
            raise ValueError(
                f"`{name}` must have the shape and device of `{name.split('_')[1]}`, {tuple(attended.shape)} on "
                f"{attended.device}, got {tuple(routing.shape)} on {routing.device}."
            )
    if need_weights and backend not in ("auto", "reference"):
        raise ValueError(f"attention weights are only computed by the `reference` backend, got backend={backend!r}.")
    q_len, k_len = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    per_token = routes_per_token(causal, cross)
    query_offset = k_len - q_len if causal else 0
    n_key_blocks = num_blocks(k_len, block_size)
    requires_grad = _requires_grad(query, key, value)
    chosen = choose_backend(
        backend,
        device=query.device,
        dtype=query.dtype,
        q_len=q_len,
        k_len=k_len,
        n_key_blocks=n_key_blocks,
        top_k=top_k,
        dropout=dropout,
        need_weights=need_weights,
        requires_grad=requires_grad,
    )
    if chosen == "flex":  # fail before routing if flex cannot run here
        check_flex_available(query.device, dtype=query.dtype, requires_grad=requires_grad, raise_error=True)
        if dropout:
            raise ValueError(
                "the `flex` backend does not support attention dropout; use backend='gather' or dropout=0."
            )
    plan = None
    if chosen != "dense" or need_plan:
        plan = _route_checked(
            query if routing_query is None else routing_query,
            key if routing_key is None else routing_key,
            block_size=block_size,
            top_k=top_k,
            causal=causal,
            cross=cross,
            key_padding_mask=key_padding_mask,
            query_padding_mask=query_padding_mask,
            global_blocks=global_blocks,
            key_descriptors=key_descriptors,
        )
    info = {"plan": plan, "backend": chosen, "weights": None}
    geometry = dict(block_size=block_size, key_valid=key_padding_mask, causal=causal, query_offset=query_offset)
    if chosen in ("reference", "dense_routed"):
        mask = routed_mask(plan, per_token=per_token, q_len=q_len, k_len=k_len, **geometry)
        if chosen == "reference":
            output, info["weights"] = reference_attention(query, key, value, mask, scale=scale, dropout=dropout)
        else:
            output = dense_attention(query, key, value, mask, scale=scale, dropout=dropout)
    elif chosen == "dense":
        output = visible_attention(
            query, key, value, key_padding_mask, causal, query_offset, scale=scale, dropout=dropout
        )
    elif chosen == "gather" and per_token and q_len == 1 and not dropout:
        output = decode_attention(query, key, value, plan, scale=scale, key_blocks=key_blocks, **geometry)
    elif chosen == "gather" and per_token and not dropout:
        output = token_gather_attention(query, key, value, plan, scale=scale, **geometry)
    elif chosen == "gather":
        tiles = tile_plan_from_routes(plan, per_token=per_token, block_size=block_size, n_key_blocks=n_key_blocks)
        output = gather_attention(query, key, value, tiles, scale=scale, dropout=dropout, **geometry)
    else:
        output = flex_attention_from_plan(query, key, value, plan, per_token=per_token, scale=scale, **geometry)
    return output, info


def visible_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_valid: torch.Tensor | None,
    causal: bool,
    query_offset: int,
    *,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Dense attention under padding and causality only. A causal call without padding whose queries are all of its
    keys (a decoder's training or first forward pass) uses SDPA's ``is_causal``, which skips the masked half, instead
    of building a boolean mask (0-10% faster on CPU at 64-512 tokens)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if causal and key_valid is None and q_len == k_len > 1:
        return dense_attention(query, key, value, None, scale=scale, dropout=dropout, is_causal=True)
    mask = visibility_mask(key_valid, q_len, k_len, causal, query_offset, query.device)
    return dense_attention(query, key, value, mask, scale=scale, dropout=dropout)


def visibility_mask(
    key_valid: torch.Tensor | None, q_len: int, k_len: int, causal: bool, query_offset: int, device: torch.device
) -> torch.Tensor | None:
    """``(b|1, 1, lq, lk)`` bool mask of padding and causality, or ``None`` when everything is visible."""
    mask = None
    if key_valid is not None:
        mask = key_valid[:, None, None, :]
    if causal and query_offset < k_len - 1:  # otherwise every query sits at the last key (a decoding step): sees all
        visible = causal_visibility(q_len, k_len, query_offset, device)
        mask = visible[None, None] if mask is None else mask & visible
    return mask


def _requires_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------------------------------
# transformers integration: `attn_implementation="dualroute"`
# ---------------------------------------------------------------------------------------------------------------------


def dualroute_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function registered for ``dualroute``: the 2D padding mask ``(batch, kv_length)`` bool, or ``None``.

    Routing needs to know which keys are real, per key, not a dense ``(q, k)`` mask: building one would cost the
    O(N^2) memory routing avoids. Causality comes from the attention module (``is_causal``).
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function not in (None, causal_mask_function, bidirectional_mask_function):
        raise ValueError(
            "attn_implementation='dualroute' supports padding masks with causal or bidirectional attention only; this "
            "call asked for a custom mask pattern (packed sequences, sliding windows or an extra mask function). Use "
            "attn_implementation='eager' or 'sdpa' for it."
        )
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    if torch.compiler.is_compiling():  # no data-dependent branch in a traced graph
        return attention_mask
    return None if bool(attention_mask.all()) else attention_mask  # no padding: the kernels skip the mask


def dualroute_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``dualroute`` entry of transformers' `AttentionInterface`.

    Reads the routing settings from ``module.config`` (``route_block_size``, ``route_topk``, ``route_global_blocks``,
    ``route_backend``; defaults 64 / 8 / 1 / auto for models whose config lacks them), causality from
    ``module.is_causal`` and cross-attention from ``module.is_cross_attention``. A module with ``routed = False`` (a
    ``"full_attention"`` layer) attends to every block. Extra keyword arguments: ``key_descriptors`` and
    ``key_blocks`` (from the cache), ``routing_query`` / ``routing_key`` (what level 1 routes on, e.g. the vectors
    before RoPE) and ``router_info`` (a dict that receives the routing plan; for a dense layer, every candidate block).

    Returns ``(output (batch, q_len, heads, head_dim), weights or None)``; weights when ``output_attentions``.
    """
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(
            "attn_implementation='dualroute' expects a 2D padding mask (batch, k_len) or None, got a mask of shape "
            f"{tuple(attention_mask.shape)}; build masks with transformers.masking_utils (which call the registered "
            "'dualroute' mask function), or use attn_implementation='eager'/'sdpa' for custom 4D masks."
        )
    config = module.config
    block_size = getattr(config, "route_block_size", 64)
    global_blocks = getattr(config, "route_global_blocks", 1)
    causal = bool(getattr(module, "is_causal", False))
    cross = bool(getattr(module, "is_cross_attention", False))
    routed = getattr(module, "routed", True)
    top_k = getattr(config, "route_topk", 8)
    if not routed:  # a dense layer: every block, which `auto` runs as plain dense attention
        top_k = max(num_blocks(key.shape[2], block_size), global_blocks + 1)
    # asked for at call time, or else by the config (what transformers' output capturing collects)
    need_weights = bool(kwargs.get("output_attentions", getattr(config, "output_attentions", False)))
    router_info = kwargs.get("router_info")
    output, info = routed_attention_with_plan(
        query,
        key,
        value,
        block_size=block_size,
        top_k=top_k,
        causal=causal,
        cross=cross,
        key_padding_mask=attention_mask,
        query_padding_mask=attention_mask if not (causal or cross) else None,
        global_blocks=global_blocks,
        scale=scaling,
        dropout=dropout,
        # weights exist only in the reference backend: asking for them (output_attentions) is asking for it
        backend="reference" if need_weights else getattr(config, "route_backend", "auto") if routed else "auto",
        need_weights=need_weights,
        need_plan=router_info is not None,
        key_descriptors=kwargs.get("key_descriptors") if routed else None,
        routing_query=kwargs.get("routing_query") if routed else None,
        routing_key=kwargs.get("routing_key") if routed else None,
        key_blocks=kwargs.get("key_blocks") if routed else None,
    )
    if router_info is not None:
        router_info["plan"] = info["plan"]  # a dense layer's plan lists every candidate block
        router_info["backend"] = info["backend"]
    return output.transpose(1, 2).contiguous(), info["weights"]


def register_dualroute_attention() -> None:
    """Registers ``dualroute`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("dualroute", dualroute_attention_forward)
    AttentionMaskInterface.register("dualroute", dualroute_mask)


# Registration happens at import: under remote code this file is loaded as a sibling of the modeling file and no
# package __init__ runs.
register_dualroute_attention()
