# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""DualRoute models for transformers: BERT/BART-shaped transformers whose attention routes (see DESIGN.md).

Top to bottom: embeddings -> rotary -> attention -> layers -> pre-trained base -> encoder -> heads. The architecture
is post-LayerNorm with learned absolute positions by default, the shape of BERT, RoBERTa, ELECTRA and BART, so their
checkpoints convert weight for weight (`conversion.py`); RoPE is available for models trained from scratch.

`attn_implementation="dualroute"` (the default) routes; `"eager"` and `"sdpa"` run the same weights densely.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, _active_collector, capture_outputs

from .attention_dualroute import register_dualroute_attention
from .cache_dualroute import DualRouteCacheLayer
from .configuration_dualroute import ROUTED_ATTENTION, DualRouteConfig
from .feed_forward_dualroute import (
    autocast_enabled,
    can_chunk,
    can_chunk_inference,
    can_norm_then_feed_forward,
    can_run_post_attention_inference,
    feed_forward,
    feed_forward_inference,
    norm_then_feed_forward,
    post_attention_inference,
)
from .linear_dualroute import DualRouteLinear
from .pipeline_dualroute import custom_pipeline_entry  # imported so that checkpoints carry the seq2seq pipeline
from .routing_dualroute import non_binary_value


register_dualroute_attention()


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DualRouteModelOutput(BaseModelOutput):
    """`BaseModelOutput` plus ``router_indices``: per layer, the routing plan ``(batch, kv_heads, rows, top_k)`` (key
    blocks per query block, ascending, ``-1``-padded), when ``output_router_indices=True`` with the ``dualroute``
    implementation. A dense (``full_attention``) layer lists every key block."""

    router_indices: tuple[torch.Tensor | None, ...] | None = None


@dataclass
class DualRouteSequenceClassifierOutput(SequenceClassifierOutput):
    router_indices: tuple[torch.Tensor | None, ...] | None = None


@dataclass
class DualRouteDecoderOutput(BaseModelOutput):
    """Decoder output: ``cache`` (an `EncoderDecoderCache`), cross-attentions, and the routing of the decoder's
    self-attention (``router_indices``: per token, ``(batch, kv_heads, q_len, top_k)``) and cross-attention
    (``cross_router_indices``: per token, over encoder key blocks)."""

    cache: Cache | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    router_indices: tuple[torch.Tensor | None, ...] | None = None
    cross_router_indices: tuple[torch.Tensor | None, ...] | None = None


@dataclass
class DualRouteSeq2SeqLMOutput(Seq2SeqLMOutput):
    encoder_router_indices: tuple[torch.Tensor | None, ...] | None = None
    decoder_router_indices: tuple[torch.Tensor | None, ...] | None = None
    cross_router_indices: tuple[torch.Tensor | None, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings and positions
# ---------------------------------------------------------------------------------------------------------------------


def padding_aware_positions(
    attention_mask: torch.Tensor | None, length: int, past_length: int, device
) -> torch.Tensor:
    """Position of each token counting real tokens only, so that left padding does not shift positions.

    Without a mask (or with a cache) positions are ``past_length + arange(length)``.
    """
    if attention_mask is None or past_length:
        return torch.arange(past_length, past_length + length, device=device)[None, :]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_ids(
    name: str, ids: torch.Tensor, size: int | None, size_name: str = "", shape: tuple[int, int] | None = None
) -> None:
    """Integer ids in ``[0, size)`` (``size=None``: any id >= 0) and, given ``shape``, broadcastable to it: a clear
    error instead of an index or broadcasting error deep inside ``nn.Embedding``. One host sync (none when
    compiling)."""
    if ids.dtype not in (torch.long, torch.int):  # what nn.Embedding takes
        raise TypeError(
            f"`{name}` must hold integer ids (torch.long or torch.int), got a tensor of dtype {ids.dtype}."
        )
    if shape is not None and (ids.ndim > 2 or _broadcast(ids.shape, shape) != shape):
        raise ValueError(
            f"`{name}` must have shape (batch, seq) = {shape} (or broadcast to it), got {tuple(ids.shape)}."
        )
    if torch.compiler.is_compiling() or ids.numel() == 0:
        return
    low, high = torch.aminmax(ids)
    if size is None and bool(low < 0):
        raise ValueError(f"`{name}` must be >= 0, got values from {int(low)} to {int(high)}.")
    if size is not None and bool((low < 0) | (high >= size)):
        raise ValueError(f"`{name}` must be in [0, {size_name}={size}), got values from {int(low)} to {int(high)}.")


def _broadcast(a, b):
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        return None


class DualRouteEmbeddings(nn.Module):
    """Token (+ learned absolute position) (+ token type) embeddings, LayerNorm, dropout; the BERT/BART layout."""

    def __init__(self, config: DualRouteConfig, max_positions: int):
        super().__init__()
        width = config.embedding_size or config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        self.max_positions = max_positions
        self.position_offset = config.position_offset
        self.position_embeddings = None
        if config.position_embedding_type == "absolute":
            self.position_embeddings = nn.Embedding(max_positions + config.position_offset, width)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, width) if config.type_vocab_size > 0 else None
        )
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.project = nn.Linear(width, config.hidden_size) if width != config.hidden_size else None

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        position_ids: torch.LongTensor,
        token_type_ids: torch.LongTensor | None = None,
        prefix: str = "",
    ) -> torch.Tensor:
        """``position_ids`` are the model's own (checked by the caller when a user passed them); ``prefix`` names the
        arguments in errors (``"decoder_"`` for the decoder)."""
        if inputs_embeds is None:
            check_ids(f"{prefix}input_ids", input_ids, self.word_embeddings.num_embeddings, "vocab_size")
            inputs_embeds = self.word_embeddings(input_ids)
        elif inputs_embeds.shape[-1] != self.word_embeddings.embedding_dim:
            raise ValueError(
                f"`{prefix}inputs_embeds` must have width {self.word_embeddings.embedding_dim} (the token "
                f"embeddings'), got {inputs_embeds.shape[-1]}."
            )
        else:
            inputs_embeds = _in_model_dtype(f"{prefix}inputs_embeds", inputs_embeds, self.word_embeddings.weight.dtype)
        embeddings = inputs_embeds * self.embed_scale if self.embed_scale != 1.0 else inputs_embeds
        shape = tuple(embeddings.shape[:2])
        if self.token_type_embeddings is not None:  # without token types (BART) a tokenizer's zeros are ignored
            if token_type_ids is None:
                token_type_ids = torch.zeros(shape, dtype=torch.long, device=embeddings.device)
            else:
                size = self.token_type_embeddings.num_embeddings
                check_ids("token_type_ids", token_type_ids, size, "type_vocab_size", shape)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids + self.position_offset)
        embeddings = self.dropout(self.LayerNorm(embeddings))
        return self.project(embeddings) if self.project is not None else embeddings


def _in_model_dtype(name: str, embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """User embeddings in the model's dtype: a lossless cast (bf16 into a float32 model) or any cast under autocast is
    made here; a lossy one (float64 into float32, float32 into a bf16 model outside autocast) raises instead of
    failing later inside LayerNorm with a mixed-dtype error."""
    if embeds.dtype == dtype:
        return embeds
    autocast = autocast_enabled(embeds.device.type)
    if embeds.is_floating_point() and (autocast or torch.promote_types(embeds.dtype, dtype) == dtype):
        return embeds.to(dtype)
    raise TypeError(
        f"`{name}` must have the model's dtype {dtype} (or one that converts to it without loss), got {embeds.dtype}: "
        "cast it (inputs_embeds.to(model.dtype)) or run under torch.autocast."
    )


class DualRouteRotaryEmbedding(nn.Module):
    """Rotary position embedding (cos, sin) for ``position_embedding_type="rope"``."""

    def __init__(self, config: DualRouteConfig, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.theta = config.rope_theta
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # b l d/2
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x (b, h, l, d)`` rotated by ``cos``/``sin`` ``(b, l, d)``: each pair (x[i], x[i + d/2]) turns by its angle.

    Equal to `apply_rotary_reference`, in two passes over ``x`` instead of about six (the reference's ``rotate_half``
    copies ``x`` twice before three full-size products and sums); at long N the rotation of q and k is memory-bound
    and cost as much as a tenth of a layer's forward. The output has ``x``'s dtype.
    """
    if torch.compiler.is_compiling():  # the compiler fuses the textbook formula into one pass (and cannot trace out=)
        return apply_rotary_reference(x, cos, sin).to(x.dtype)
    return _Rotary.apply(x, cos, sin)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The textbook formula (the oracle of `apply_rotary`): ``x * cos + rotate_half(x) * sin``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos/sin repeat their first half (the angles are cat([freqs, freqs])), so the half-size views are all it needs
    half = x.shape[-1] // 2
    cos, sin = cos[:, None, :, :half], sin[:, None, :, :half]
    first, second = x[..., :half], x[..., half:]
    # a (b, h, l, d) view of a (b, l, h, d) projection comes out contiguous per head, the layout attention kernels copy
    # it into otherwise
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_first, out_second = out[..., :half], out[..., half:]
    torch.mul(first, cos, out=out_first).addcmul_(second, sin, value=-1)
    torch.mul(second, cos, out=out_second).addcmul_(first, sin)
    return out


class _Rotary(torch.autograd.Function):
    """`_rotate` with its gradient: a rotation's transpose is the rotation by the opposite angles."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with an additive 4D mask (the `eager` implementation, a baseline)."""
    key = key.repeat_interleave(module.num_key_value_groups, dim=1)
    value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class DualRouteAttention(nn.Module):
    """Multi-head (grouped-query) attention: self-attention (bidirectional or causal) or cross-attention.

    With ``attn_implementation="dualroute"`` the attention function routes; ``routed=False`` (a ``full_attention``
    layer) attends densely. Returns ``(output, weights, router_indices)``.
    """

    def __init__(
        self,
        config: DualRouteConfig,
        *,
        num_heads: int,
        num_key_value_heads: int,
        is_causal: bool = False,
        is_cross_attention: bool = False,
        routed: bool = True,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = num_heads // num_key_value_heads
        self.head_dim = config.hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_probs_dropout_prob
        self.is_causal = is_causal
        self.is_cross_attention = is_cross_attention
        self.routed = routed
        self.layer_idx = layer_idx
        self.q_proj = DualRouteLinear(config.hidden_size, num_heads * self.head_dim)
        self.k_proj = DualRouteLinear(config.hidden_size, num_key_value_heads * self.head_dim)
        self.v_proj = DualRouteLinear(config.hidden_size, num_key_value_heads * self.head_dim)
        self.out_proj = DualRouteLinear(num_heads * self.head_dim, config.hidden_size)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``key_value_states``: the encoder's hidden states (cross-attention). ``attention_mask``: with the
        ``dualroute`` implementation the 2D key padding mask (or ``None``), else transformers' 4D mask."""
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        routing = self.routed and self.config._attn_implementation == "dualroute"
        key_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        layer_cache = None
        if self.is_cross_attention:
            cross_cache = cache.cross_attention_cache if isinstance(cache, EncoderDecoderCache) else None
            if cross_cache is not None and cache.is_updated.get(self.layer_idx):  # encoder keys cached at step one
                layer_cache = cross_cache.layers[self.layer_idx]
                key, value = layer_cache.keys, layer_cache.values
            else:
                kv_shape = (*key_value_states.shape[:-1], -1, self.head_dim)
                key = self.k_proj(key_value_states).view(kv_shape).transpose(1, 2)
                value = self.v_proj(key_value_states).view(kv_shape).transpose(1, 2)
                if cross_cache is not None:
                    key, value = cross_cache.update(key, value, self.layer_idx, key_mask=key_mask, write_once=True)
                    cache.is_updated[self.layer_idx] = True
                    layer_cache = cross_cache.layers[self.layer_idx]
        else:
            key = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
            value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
            if position_embeddings is not None:
                if routing and self.config.route_before_rope:  # level 1 routes on content, level 2 sees positions
                    kwargs["routing_query"], kwargs["routing_key"] = query, key
                query, key = apply_rotary(query, *position_embeddings), apply_rotary(key, *position_embeddings)
            if cache is not None:
                self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
                new_key_mask = None if key_mask is None else key_mask[:, -input_shape[1] :]
                routing_key = kwargs.pop("routing_key", None)
                key, value = self_cache.update(
                    key, value, self.layer_idx, key_mask=new_key_mask, routing_keys=routing_key
                )
                layer_cache = self_cache.layers[self.layer_idx]
                if routing_key is not None and not isinstance(layer_cache, DualRouteCacheLayer):
                    raise ValueError(
                        f"routing before RoPE (route_before_rope=True) needs the cache to keep the unrotated keys, "
                        f"but self-attention cache layer {self.layer_idx} is a {type(layer_cache).__name__}; pass "
                        "DynamicCache(config=model.config) (generate() builds it), or set route_before_rope=False."
                    )
        if routing and isinstance(layer_cache, DualRouteCacheLayer):
            # no re-reading of cached keys; asked for only if this call routes
            kwargs["key_descriptors"] = functools.partial(layer_cache.key_descriptors, self.config.route_block_size)
            if layer_cache.write_once:  # the encoder's keys: kept block-major too, a decoding step reads them in place
                kwargs["key_blocks"] = functools.partial(layer_cache.block_major_keys, self.config.route_block_size)
        return self._attend(query, key, value, attention_mask, input_shape, **kwargs)

    def _attend(self, query, key, value, attention_mask, input_shape, **kwargs):
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        router_info = {} if _router_indices_requested() else None  # the plan costs routing work in dense layers
        if router_info is not None and self.config._attn_implementation != "dualroute":
            raise ValueError(
                "router indices come from routing, which runs with attn_implementation='dualroute' only; this model "
                f"runs {self.config._attn_implementation!r}: call model.set_attn_implementation('dualroute') or drop "
                "output_router_indices."
            )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            router_info=router_info,
            **kwargs,
        )
        output = self.out_proj(output.reshape(*input_shape, -1).contiguous())
        return output, weights, router_info.get("plan") if router_info is not None else None


def _router_indices_requested() -> bool:
    """Whether the running forward records ``router_indices`` / ``cross_router_indices`` (transformers' output
    capturing keeps the requested outputs of the current ``capture_outputs`` call in a context variable)."""
    return any(name.endswith("router_indices") for name in _active_collector.get() or ())


# ---------------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------------


class DualRouteFeedForward(nn.Module):
    def __init__(self, config: DualRouteConfig, intermediate_size: int):
        super().__init__()
        self.fc1 = DualRouteLinear(config.hidden_size, intermediate_size)
        self.fc2 = DualRouteLinear(intermediate_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.activation_dropout = config.activation_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        no_activation_dropout = not (self.training and self.activation_dropout)
        if no_activation_dropout and can_chunk(hidden_states, self.fc1, self.fc2, self.activation):
            return feed_forward(hidden_states, self.fc1, self.fc2, self.activation)  # same values, less memory
        if no_activation_dropout and can_chunk_inference(hidden_states, self.fc1, self.fc2, self.activation):
            return feed_forward_inference(hidden_states, self.fc1, self.fc2, self.activation)  # same, fewer faults
        hidden_states = self.activation(self.fc1(hidden_states))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        return self.fc2(hidden_states)


def norm_feed_forward_norm(layer: nn.Module, hidden_states: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The end of a post-LayerNorm layer (``layer.mlp``, ``layer.dropout``, ``layer.final_layer_norm``):
    ``h = norm(hidden_states); final_layer_norm(h + dropout(mlp(h)))``. In training, the norm and the feed-forward
    block run as one chunked function (`norm_then_feed_forward`) when nothing would be skipped: same values, ``h``
    recomputed in the backward pass instead of kept."""
    mlp = layer.mlp
    plain_block = type(mlp) is DualRouteFeedForward and not (mlp.training and mlp.activation_dropout)
    if plain_block and can_norm_then_feed_forward(hidden_states, norm, mlp):
        normed, hidden_states = norm_then_feed_forward(hidden_states, norm, mlp.fc1, mlp.fc2, mlp.activation)
    else:
        normed = norm(hidden_states)
        hidden_states = mlp(normed)
    hidden_states = nn.functional.dropout(hidden_states, p=layer.dropout, training=layer.training)
    return layer.final_layer_norm(normed + hidden_states)


class DualRouteEncoderLayer(GradientCheckpointingLayer):
    """Post-LayerNorm block: ``x = LN(x + attn(x)); x = LN(x + ffn(x))`` (BERT / BART)."""

    def __init__(self, config: DualRouteConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DualRouteAttention(
            config,
            num_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            routed=config.layer_types[layer_idx] == ROUTED_ATTENTION,
            layer_idx=layer_idx,
        )
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DualRouteFeedForward(config, config.intermediate_size)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout_prob

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _, _ = self.self_attn(hidden_states, attention_mask, position_embeddings, **kwargs)
        if self._can_run_post_attention_inference(hidden_states, residual):  # same values, fewer page faults
            mlp = self.mlp
            return post_attention_inference(
                hidden_states,
                residual,
                self.self_attn_layer_norm,
                mlp.fc1,
                mlp.fc2,
                mlp.activation,
                self.final_layer_norm,
            )
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        return norm_feed_forward_norm(self, residual + hidden_states, self.self_attn_layer_norm)

    def _can_run_post_attention_inference(self, attention_output: torch.Tensor, residual: torch.Tensor) -> bool:
        dropout = self.training and (self.dropout or self.mlp.activation_dropout)
        if dropout or type(self.mlp) is not DualRouteFeedForward:
            return False
        skipped = (self.self_attn_layer_norm, self.mlp, self.final_layer_norm)
        return can_run_post_attention_inference(attention_output, residual, *skipped)


class DualRouteDecoderLayer(GradientCheckpointingLayer):
    """Post-LayerNorm decoder block: causal self-attention, cross-attention over the encoder, feed-forward (BART)."""

    def __init__(self, config: DualRouteConfig, layer_idx: int):
        super().__init__()
        routed = config.decoder_layer_types[layer_idx] == ROUTED_ATTENTION
        heads = dict(num_heads=config.decoder_attention_heads, num_key_value_heads=config.decoder_num_key_value_heads)
        self.self_attn = DualRouteAttention(config, **heads, is_causal=True, routed=routed, layer_idx=layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder_attn = DualRouteAttention(
            config, **heads, is_cross_attention=True, routed=routed, layer_idx=layer_idx
        )
        self.encoder_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DualRouteFeedForward(config, config.decoder_intermediate_size)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout_prob

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _, _ = self.self_attn(hidden_states, attention_mask, position_embeddings, cache=cache, **kwargs)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)
        residual = hidden_states
        hidden_states, _, _ = self.encoder_attn(
            hidden_states, encoder_attention_mask, key_value_states=encoder_hidden_states, cache=cache, **kwargs
        )
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        return norm_feed_forward_norm(self, residual + hidden_states, self.encoder_attn_layer_norm)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class DualRoutePreTrainedModel(PreTrainedModel):
    config: DualRouteConfig
    config_class = DualRouteConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DualRouteEncoderLayer", "DualRouteDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """``dualroute`` unless another implementation is asked for (``eager``/``sdpa``: the dense twins)."""
        register_dualroute_attention()
        return super().get_correct_attn_implementation(requested_attention or "dualroute", is_init_check)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves as usual, with an ``auto_map`` naming every DualRoute head, so one checkpoint folder loads through
        each Auto class with ``trust_remote_code=True`` where the package is not installed."""
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear, Embedding (padding row zero), LayerNorm with initializer_range
        if isinstance(module, DualRouteRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, DualRouteForConditionalGeneration):
            init.zeros_(module.final_logits_bias)


class DualRouteModel(DualRoutePreTrainedModel):
    """The DualRoute encoder: embeddings and a stack of routed (or dense) post-LN layers."""

    _can_record_outputs = {
        "hidden_states": DualRouteEncoderLayer,
        "attentions": OutputRecorder(DualRouteAttention, index=1),
        "router_indices": OutputRecorder(DualRouteAttention, index=2),
    }

    def __init__(self, config: DualRouteConfig):
        super().__init__(config)
        self.embeddings = DualRouteEmbeddings(config, config.max_position_embeddings)
        self.rotary = None
        if config.position_embedding_type == "rope":
            self.rotary = DualRouteRotaryEmbedding(config, config.hidden_size // config.num_attention_heads)
        self.layers = nn.ModuleList([DualRouteEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DualRouteModelOutput:
        r"""
        input_ids / inputs_embeds: ``(batch, seq)`` token ids or ``(batch, seq, embedding width)`` embeddings; exactly
            one. attention_mask: ``(batch, seq)``, 1 for real tokens (pad on the right: blocks are absolute positions).
        token_type_ids, position_ids: optional, as in BERT; positions default to counting real tokens.
        """
        batch, length = check_inputs(input_ids, inputs_embeds, attention_mask)
        if self.embeddings.position_embeddings is not None and length > self.embeddings.max_positions:
            raise ValueError(
                f"input length {length} exceeds max_position_embeddings={self.embeddings.max_positions} of this "
                "model's learned absolute positions; truncate the input (tokenizer truncation=True, max_length="
                f"{self.embeddings.max_positions}) or convert the checkpoint with a larger --max-position-embeddings."
            )
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if position_ids is None:
            position_ids = padding_aware_positions(attention_mask, length, 0, device).expand(batch, -1)
        elif self.embeddings.position_embeddings is not None:
            check_ids(
                "position_ids", position_ids, self.embeddings.max_positions, "max_position_embeddings", (batch, length)
            )
        else:  # rotary positions: any position >= 0
            check_ids("position_ids", position_ids, None, shape=(batch, length))
        position_ids = position_ids.expand(batch, length)  # (seq,) and (1, seq) broadcast
        hidden_states = self.embeddings(input_ids, inputs_embeds, position_ids, token_type_ids)
        position_embeddings = self.rotary(position_ids, hidden_states.dtype) if self.rotary is not None else None
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, position_embeddings, **kwargs)
        return DualRouteModelOutput(last_hidden_state=hidden_states)


def check_inputs(input_ids, inputs_embeds, attention_mask, prefix: str = "") -> tuple[int, int]:
    """Exactly one of ids / embeddings, with a matching mask; returns ``(batch, seq)``. ``prefix`` names the
    arguments in errors (``"decoder_"`` for the decoder)."""
    ids, embeds = f"{prefix}input_ids", f"{prefix}inputs_embeds"
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"pass exactly one of `{ids}` (batch, seq) or `{embeds}` (batch, seq, width).")
    for name, value in ((ids, input_ids), (embeds, inputs_embeds), ("attention_mask", attention_mask)):
        if value is not None and not isinstance(value, torch.Tensor):  # a list or an array (tokenizer without "pt")
            raise TypeError(
                f"`{name}` must be a torch.Tensor, got {type(value).__name__}; tokenize with return_tensors='pt' or "
                "wrap it in torch.tensor(...)."
            )
    if input_ids is not None and input_ids.ndim != 2:
        raise ValueError(f"`{ids}` must have shape (batch, seq), got {tuple(input_ids.shape)}.")
    if inputs_embeds is not None and inputs_embeds.ndim != 3:
        raise ValueError(f"`{embeds}` must have shape (batch, seq, width), got {tuple(inputs_embeds.shape)}.")
    batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    if batch == 0 or length == 0:
        raise ValueError(f"`{ids if input_ids is not None else embeds}` is empty: (batch, seq) = ({batch}, {length}).")
    check_padding_mask("attention_mask", attention_mask, batch, length)
    return batch, length


def check_padding_mask(
    name: str, mask: torch.Tensor | None, batch: int, length: int, length_name: str = "seq"
) -> None:
    """A ``(batch, length)`` mask of 1 (real token) and 0 (padding), as tokenizers return it; ``length_name`` says
    in errors what the length counts."""
    if mask is None:
        return
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"`{name}` must have shape (batch, {length_name}) = ({batch}, {length}), got {tuple(mask.shape)}."
        )
    other = non_binary_value(mask)
    if other is not None:
        raise ValueError(
            f"`{name}` must hold 1 for real tokens and 0 for padding, got the value {other}; an additive mask "
            "(0 / -inf) is not a padding mask: pass (mask == 0) instead."
        )


class DualRouteDecoder(DualRoutePreTrainedModel):
    """The decoder of `DualRouteForConditionalGeneration`: causal self-attention routed per token, cross-attention
    routed per token over the encoder's key blocks; both stay sparse in cached decoding."""

    _can_record_outputs = {
        "hidden_states": DualRouteDecoderLayer,
        "attentions": OutputRecorder(DualRouteAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(DualRouteAttention, index=1, layer_name="encoder_attn"),
        "router_indices": OutputRecorder(DualRouteAttention, index=2, layer_name="self_attn"),
        "cross_router_indices": OutputRecorder(DualRouteAttention, index=2, layer_name="encoder_attn"),
    }

    def __init__(self, config: DualRouteConfig):
        super().__init__(config)
        self.embeddings = DualRouteEmbeddings(config, config.decoder_max_position_embeddings)
        self.rotary = None
        if config.position_embedding_type == "rope":
            self.rotary = DualRouteRotaryEmbedding(config, config.hidden_size // config.decoder_attention_heads)
        self.layers = nn.ModuleList([DualRouteDecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DualRouteDecoderOutput:
        batch, length = check_inputs(input_ids, inputs_embeds, None, prefix="decoder_")
        if encoder_hidden_states is None:
            raise ValueError("the decoder needs `encoder_hidden_states` (batch, source_len, hidden).")
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        past_length = cache.get_seq_length() if cache is not None else 0
        check_padding_mask("decoder_attention_mask", attention_mask, batch, past_length + length, "past + seq")
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"the decoder inputs (`decoder_input_ids` / `decoder_inputs_embeds`, or `labels`) have batch size "
                f"{batch} but the encoder output (`input_ids` / `encoder_outputs`) has "
                f"{encoder_hidden_states.shape[0]}: pass one target per input."
            )
        if self.embeddings.position_embeddings is not None and past_length + length > self.embeddings.max_positions:
            raise ValueError(
                f"decoder length {past_length + length} exceeds decoder_max_position_embeddings="
                f"{self.embeddings.max_positions}; generate fewer tokens (max_new_tokens) or use a larger table."
            )
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        position_ids = torch.arange(past_length, past_length + length, device=device)[None, :].expand(batch, -1)
        hidden_states = self.embeddings(input_ids, inputs_embeds, position_ids, prefix="decoder_")
        position_embeddings = self.rotary(position_ids, hidden_states.dtype) if self.rotary is not None else None
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, cache=self_cache
        )
        encoder_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=encoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        )
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                mask,
                encoder_hidden_states,  # positional: differentiable inputs of checkpointed layers must be
                encoder_attention_mask=encoder_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                **kwargs,
            )
        return DualRouteDecoderOutput(last_hidden_state=hidden_states, cache=cache)


def shift_tokens_right(
    input_ids: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None
) -> torch.Tensor:
    """Labels -> decoder inputs: prepend the start token, drop the last token, replace -100 by the pad token."""
    if decoder_start_token_id is None:
        raise ValueError("`config.decoder_start_token_id` must be set to build decoder inputs from labels.")
    if pad_token_id is None:
        raise ValueError("`config.pad_token_id` must be set to build decoder inputs from labels.")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------


class DualRouteClassificationHead(nn.Module):
    """``out_proj(dropout(act(dense(dropout(pooled)))))``: BERT's pooler + classifier, RoBERTa's and ELECTRA's head."""

    def __init__(self, config: DualRouteConfig):
        super().__init__()
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.classifier_activation]
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.activation(self.dense(self.dropout(pooled)))))


def pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, method: str) -> torch.Tensor:
    if method == "cls":  # the first real token: position 0 unless the batch is padded on the left
        if attention_mask is None:
            return hidden_states[:, 0]
        first = attention_mask.int().argmax(-1)  # argmax returns the first 1 (0 for a row without any)
        return hidden_states[torch.arange(hidden_states.shape[0], device=first.device), first]
    if method != "mean":  # the config checks it at construction and loading; not if it was set afterwards
        raise ValueError(f"`classifier_pooling` must be 'cls' or 'mean', got {method!r}.")
    if attention_mask is None:
        return hidden_states.mean(1)
    mask = attention_mask.to(hidden_states.dtype)[..., None]
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def check_labels(labels: torch.Tensor, size: int, what: str) -> None:
    """``labels`` in ``[0, size)`` or -100 (ignored); ``what`` names the range in the error. One host sync (none when
    compiling)."""
    out_of_range = (labels != -100) & ((labels < 0) | (labels >= size))
    if not torch.compiler.is_compiling() and bool(out_of_range.any()):
        raise ValueError(f"`labels` must be {what}{size}) or -100 (ignored), got {labels[out_of_range][0].item()}.")


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, config: DualRouteConfig, num_items_in_batch=None
) -> torch.Tensor:
    """Cross-entropy (single label), BCE (multi-label) or MSE (regression), as transformers' heads infer them.

    With ``num_items_in_batch`` (the Trainer's gradient accumulation) the loss is a sum divided by the items of the
    whole accumulated batch, so accumulated gradients equal those of one large batch for every problem type.
    """
    batch, num_labels = logits.shape
    problem_type = config.problem_type
    if problem_type is None:  # recorded in the config only once the labels passed the checks below
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    if problem_type == "single_label_classification":
        if labels.shape not in ((batch,), (batch, 1)) or labels.is_floating_point():
            raise ValueError(
                f"single-label classification needs integer `labels` of shape ({batch},), got {labels.dtype} "
                f"labels of shape {tuple(labels.shape)}; for multi-label pass float labels of shape ({batch}, {num_labels})."
            )
        check_labels(labels, num_labels, "class ids in [0, num_labels=")
        loss = nn.functional.cross_entropy(logits, labels.view(-1).long(), ignore_index=-100, reduction="sum")
        if num_items_in_batch is None:  # the mean over counted labels; 0, not NaN, when every label is -100
            loss = loss / (labels != -100).sum().clamp(min=1)
    elif problem_type == "multi_label_classification":
        if labels.shape != (batch, num_labels):
            raise ValueError(
                f"multi-label classification needs `labels` of shape ({batch}, {num_labels}), got {tuple(labels.shape)}."
            )
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction=reduction)
    else:
        if labels.numel() != batch * num_labels:
            raise ValueError(
                f"regression needs `labels` with {batch * num_labels} values ({batch}, {num_labels}), got {tuple(labels.shape)}."
            )
        loss = nn.functional.mse_loss(logits, labels.view(batch, num_labels).to(logits.dtype), reduction=reduction)
    config.problem_type = problem_type
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class DualRouteForSequenceClassification(DualRoutePreTrainedModel):
    """DualRoute encoder + a classification head on the pooled (CLS or mean) representation."""

    def __init__(self, config: DualRouteConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DualRouteModel(config)
        self.classifier = DualRouteClassificationHead(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DualRouteSequenceClassifierOutput:
        r"""
        labels: ``(batch,)`` class indices (single label), ``(batch, num_labels)`` floats (multi-label), or floats
            (regression, ``num_labels=1``). ``problem_type`` is inferred from them unless set in the config.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self.classifier(pool(outputs.last_hidden_state, attention_mask, self.config.classifier_pooling))
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(logits, labels, self.config, num_items_in_batch)
        return DualRouteSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_indices=outputs.router_indices,
        )


class DualRouteForConditionalGeneration(DualRoutePreTrainedModel, GenerationMixin):
    """Encoder-decoder with a language-modelling head: long input in, text out. ``model`` is the encoder (the base
    model shared with the other heads), ``decoder`` the decoder; input, decoder and output embeddings are tied."""

    _tied_weights_keys = {
        "decoder.embeddings.word_embeddings.weight": "model.embeddings.word_embeddings.weight",
        "lm_head.weight": "model.embeddings.word_embeddings.weight",
    }
    _keys_to_ignore_on_load_missing = ["final_logits_bias"]

    def __init__(self, config: DualRouteConfig):
        if not config.is_encoder_decoder:
            raise ValueError(
                "DualRouteForConditionalGeneration needs an encoder-decoder config: set is_encoder_decoder=True, "
                "decoder_layers and decoder_start_token_id (see configuration/small-seq2seq.json)."
            )
        super().__init__(config)
        self.model = DualRouteModel(config)
        self.decoder = DualRouteDecoder(config)
        self.lm_head = DualRouteLinear(config.hidden_size, config.vocab_size, bias=False)
        self.final_logits_bias = nn.Buffer(torch.zeros(1, config.vocab_size))
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also records the ``dualroute-text2text`` pipeline, whose file is saved with the code."""
        self.config.custom_pipelines = custom_pipeline_entry()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _prepare_static_cache(self, cache_implementation: str, *args, **kwargs):
        """`generate(cache_implementation=...)` naming a static cache would fail deep in transformers: its fixed
        layers cannot hold the block descriptors that routing keeps next to the keys."""
        raise ValueError(
            f"cache_implementation={cache_implementation!r} is not supported by DualRoute: a static cache has no "
            "layer type that keeps the routing's block descriptors. Use the default dynamic cache "
            "(cache_implementation=None)."
        )

    def get_encoder(self, modality: str | None = None) -> DualRouteModel:
        return self.model

    def get_decoder(self) -> DualRouteDecoder:
        return self.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings.word_embeddings = value
        self.decoder.embeddings.word_embeddings = value

    def resize_token_embeddings(
        self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True
    ) -> nn.Embedding:
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        old, new = self.final_logits_bias.shape[-1], embeddings.weight.shape[0]
        bias = (
            self.final_logits_bias[:, :new]
            if new <= old
            else nn.functional.pad(self.final_logits_bias, (0, new - old))
        )
        self.final_logits_bias = nn.Buffer(bias)
        return embeddings

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple | BaseModelOutput | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DualRouteSeq2SeqLMOutput:
        r"""
        labels: ``(batch, target_len)`` token ids; ``-100`` is ignored. Decoder inputs default to the labels shifted
            right behind ``decoder_start_token_id``.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if kwargs.get("output_router_indices"):
            kwargs["output_cross_router_indices"] = True
        if labels is not None:
            use_cache = False
            check_labels(labels, self.config.vocab_size, "token ids in [0, vocab_size=")
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if encoder_outputs is None:
            encoder_outputs = self.model(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )
        else:
            if not isinstance(encoder_outputs, BaseModelOutput):
                encoder_outputs = DualRouteModelOutput(*encoder_outputs)
            # the mask describes the encoder's tokens: it must match the hidden states handed over (checked at the
            # first step; generate() hands the same mask to every later one)
            if cache is None or cache.get_seq_length() == 0:
                check_padding_mask("attention_mask", attention_mask, *encoder_outputs.last_hidden_state.shape[:2])
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(decoder_outputs.last_hidden_state) + self.final_logits_bias.to(self.lm_head.weight.dtype)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(
                    f"`labels` must have shape (batch, target_len) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}."
                )
            # a sum over tokens divided by the tokens of the whole accumulated batch under the Trainer
            # (num_items_in_batch), else by this batch's tokens (at least 1: no NaN when every label is -100)
            labels = labels.to(logits.device, torch.long)  # cross-entropy takes long targets (int32 labels too)
            if num_items_in_batch is None:
                num_items_in_batch = (labels != -100).sum().clamp(min=1)
            loss = fixed_cross_entropy(
                logits.view(-1, logits.shape[-1]).float(), labels.reshape(-1), num_items_in_batch=num_items_in_batch
            )
        return DualRouteSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            encoder_router_indices=getattr(encoder_outputs, "router_indices", None),
            decoder_router_indices=decoder_outputs.router_indices,
            cross_router_indices=decoder_outputs.cross_router_indices,
        )


# Every save writes the flat code files (`register_for_auto_class`) and this map. Done here, at import of the modeling
# file, so that it also holds for classes loaded as remote code, where no package __init__ runs.
AUTO_MAP = {
    "AutoConfig": "configuration_dualroute.DualRouteConfig",
    "AutoModel": "modeling_dualroute.DualRouteModel",
    "AutoModelForSequenceClassification": "modeling_dualroute.DualRouteForSequenceClassification",
    "AutoModelForSeq2SeqLM": "modeling_dualroute.DualRouteForConditionalGeneration",
}
DualRouteConfig.register_for_auto_class()
DualRouteModel.register_for_auto_class("AutoModel")
DualRouteForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
DualRouteForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")


__all__ = [
    "DualRouteDecoder",
    "DualRouteForConditionalGeneration",
    "DualRouteForSequenceClassification",
    "DualRouteModel",
    "DualRoutePreTrainedModel",
]
