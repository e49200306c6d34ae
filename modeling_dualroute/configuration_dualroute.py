# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""DualRoute model configuration (no heavy imports: checkpoints load it before the modeling code)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math

import transformers.configuration_utils as configuration_utils
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import PreTrainedConfig


ROUTED_ATTENTION = (
    "dualroute_attention"  # a layer that routes (also the cache layer type that keeps block descriptors)
)
FULL_ATTENTION = "full_attention"  # a layer that stays dense
LAYER_TYPES = (ROUTED_ATTENTION, FULL_ATTENTION)
ROUTE_BACKENDS = ("auto", "reference", "gather", "flex")
SAVED_LAYER_TYPES = "route_layer_types"  # the name of `layer_types` in config.json and to_dict()

# transformers checks `layer_types` against this tuple, also where generic code builds a plain PreTrainedConfig from our
# config.json (Trainer's resume_from_checkpoint does). Register the routed layer type there, the way
# AttentionInterface.register adds the attention function.
if ROUTED_ATTENTION not in configuration_utils.ALLOWED_ATTN_LAYER_TYPES:
    configuration_utils.ALLOWED_ATTN_LAYER_TYPES += (ROUTED_ATTENTION,)
    configuration_utils.ALLOWED_LAYER_TYPES += (ROUTED_ATTENTION,)


@strict
class DualRouteConfig(PreTrainedConfig):
    r"""
    Configuration of a DualRoute encoder (`DualRouteModel`, `DualRouteForSequenceClassification`) or encoder-decoder
    (`DualRouteForConditionalGeneration`, with `is_encoder_decoder=True`). Standard transformers names are documented
    centrally; the fields below are DualRoute's own.

    Args:
        route_block_size (`int`, defaults to 64): tokens per key block (and per query block in the encoder).
        route_topk (`int`, defaults to 8): key blocks each query (block) attends to, forced blocks included.
        route_global_blocks (`int`, defaults to 1): the first blocks, always attended (CLS / attention-sink tokens).
        route_backend (`str`, defaults to `"auto"`): level-2 backend, one of `auto`, `reference`, `gather`, `flex`.
        route_before_rope (`bool`, defaults to `True`): with `position_embedding_type="rope"`, level 1 scores blocks
            with the queries and keys *before* the rotation, so routing follows content wherever it sits; level 2
            attends with the rotated ones as usual. A block mean of rotated keys mixes each key's position into its
            content: in the retrieval benchmark, routing on rotated keys found a planted fact 77/49/24% of the time
            at 1k/2k/4k tokens, routing before the rotation 99/100/99%. No effect with absolute positions.
        layer_types (`list[str]`, *optional*): per encoder layer, `"dualroute_attention"` (routed) or
            `"full_attention"` (dense). Defaults to every layer routed. Saved in config.json as `route_layer_types`
            (see `to_dict`); files with `layer_types` load too.
        position_embedding_type (`str`, defaults to `"absolute"`): `"absolute"` (learned, as in BERT, RoBERTa, BART;
            checkpoints convert exactly) or `"rope"` (rotary, for models trained from scratch).
        position_offset (`int`, defaults to 0): added to positions before the learned lookup (RoBERTa: `pad_token_id
            + 1`, BART: 2). Positions count real tokens only, so left padding does not shift them.
        type_vocab_size (`int`, defaults to 2): token-type (segment) vocabulary; 0 for none (BART).
        embedding_size (`int`, *optional*): width of the token embeddings when it differs from `hidden_size`
            (ELECTRA); a projection follows the embedding LayerNorm.
        scale_embedding (`bool`, defaults to `False`): multiply token embeddings by sqrt(hidden_size) (some BART).
        classifier_pooling (`str`, defaults to `"cls"`): `"cls"` (first token) or `"mean"` (mean of real tokens).
        classifier_activation (`str`, defaults to `"tanh"`): activation of the classifier's dense layer.
        decoder_layers (`int`, defaults to 0): decoder depth of the encoder-decoder.
        decoder_attention_heads, decoder_num_key_value_heads, decoder_intermediate_size,
        decoder_max_position_embeddings, decoder_layer_types: decoder counterparts of the encoder fields
            (default: the encoder's).
    """

    model_type = "dualroute"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "d_model": "hidden_size",
        "encoder_layers": "num_hidden_layers",
        "encoder_attention_heads": "num_attention_heads",
        "encoder_ffn_dim": "intermediate_size",
    }

    vocab_size: int = 30522
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    activation_dropout: float = 0.0
    max_position_embeddings: int = 4096
    position_embedding_type: str = "absolute"
    position_offset: int = 0
    rope_theta: float = 10000.0
    type_vocab_size: int = 2
    embedding_size: int | None = None
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    layer_types: list[str] | None = None

    route_block_size: int = 64
    route_topk: int = 8
    route_global_blocks: int = 1
    route_backend: str = "auto"
    route_before_rope: bool = True

    classifier_pooling: str = "cls"
    classifier_activation: str = "tanh"
    classifier_dropout: float | None = None

    is_encoder_decoder: bool = False
    decoder_layers: int = 0
    decoder_attention_heads: int | None = None
    decoder_num_key_value_heads: int | None = None
    decoder_intermediate_size: int | None = None
    decoder_max_position_embeddings: int | None = None
    decoder_layer_types: list[str] | None = None

    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        saved_layer_types = kwargs.pop(SAVED_LAYER_TYPES, None)  # config.json's name for `layer_types` (see to_dict)
        if saved_layer_types is not None:
            if self.layer_types is not None and list(self.layer_types) != list(saved_layer_types):
                raise ValueError(
                    f"`layer_types`={self.layer_types} and `{SAVED_LAYER_TYPES}`={saved_layer_types} disagree: they "
                    "are the same field (the second is its name in config.json); pass one."
                )
            self.layer_types = list(saved_layer_types)
        # the route_ prefix is DualRoute's own: an unknown route_ field is a typo (or a newer version's setting that
        # this code would silently ignore), not a custom attribute
        _check_route_names(kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = [ROUTED_ATTENTION] * self.num_hidden_layers
        if self.is_encoder_decoder:
            if self.decoder_attention_heads is None:
                self.decoder_attention_heads = self.num_attention_heads
            if self.decoder_num_key_value_heads is None:
                self.decoder_num_key_value_heads = self.decoder_attention_heads
            if self.decoder_intermediate_size is None:
                self.decoder_intermediate_size = self.intermediate_size
            if self.decoder_max_position_embeddings is None:
                self.decoder_max_position_embeddings = self.max_position_embeddings
            if self.decoder_layer_types is None:
                self.decoder_layer_types = [ROUTED_ATTENTION] * self.decoder_layers
        self.check_dualroute()
        super().__post_init__(**kwargs)

    def check_dualroute(self) -> None:
        """Raises a `ValueError` naming the field, its value and what is expected."""

        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        integers = (
            "route_block_size", "route_topk", "route_global_blocks", "hidden_size", "num_attention_heads",
            "num_key_value_heads", "num_hidden_layers", "vocab_size", "max_position_embeddings", "position_offset",
            "intermediate_size", "decoder_layers", "type_vocab_size",
        )  # fmt: skip
        optional_integers = (
            "embedding_size", "decoder_attention_heads", "decoder_num_key_value_heads", "decoder_intermediate_size",
            "decoder_max_position_embeddings", "pad_token_id", "decoder_start_token_id",
        )  # fmt: skip
        for name in integers + optional_integers:
            value = getattr(self, name)
            if (value is not None or name in integers) and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}.")
        numbers = ("hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout", "classifier_dropout",
                   "rope_theta", "layer_norm_eps", "initializer_range")  # fmt: skip
        for name in numbers:
            value = getattr(self, name)
            if (value is not None or name != "classifier_dropout") and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise TypeError(f"`{name}` must be a number, got {value!r} of type {type(value).__name__}.")
        for name in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "activation_dropout",
            "classifier_dropout",
        ):
            value = getattr(self, name)
            need(value is None or 0.0 <= value < 1.0, f"`{name}` must be a probability in [0, 1), got {value}.")
        for name in ("rope_theta", "layer_norm_eps"):
            value = getattr(self, name)
            need(value > 0 and math.isfinite(value), f"`{name}` must be a finite number > 0, got {value}.")
        need(self.initializer_range >= 0, f"`initializer_range` must be >= 0, got {self.initializer_range}.")
        for name in ("hidden_act", "classifier_activation"):
            value = getattr(self, name)
            need(
                value in _activation_names(),
                f"`{name}` must name one of transformers' activations ({', '.join(_activation_names())}), "
                f"got {value!r}.",
            )
        need(
            self.embedding_size is None or self.embedding_size >= 1,
            f"`embedding_size` must be >= 1 (or None: hidden_size), got {self.embedding_size}.",
        )
        need(
            self.type_vocab_size >= 0,
            f"`type_vocab_size` must be >= 0 (0: no token types), got {self.type_vocab_size}.",
        )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            need(
                value is None or 0 <= value < self.vocab_size,
                f"`{name}` must be a token id in [0, vocab_size={self.vocab_size}), got {value}.",
            )
        if not isinstance(self.route_before_rope, bool):
            raise TypeError(
                f"`route_before_rope` must be a bool, got {self.route_before_rope!r} of type "
                f"{type(self.route_before_rope).__name__}."
            )
        for name in (
            "route_block_size",
            "route_topk",
            "hidden_size",
            "num_attention_heads",
            "num_hidden_layers",
            "vocab_size",
            "max_position_embeddings",
            "intermediate_size",
            "decoder_intermediate_size",  # the decoder's sizes are None for an encoder-only config
            "decoder_max_position_embeddings",
        ):
            value = getattr(self, name)
            need(value is None or value >= 1, f"`{name}` must be >= 1, got {value}.")
        need(self.route_global_blocks >= 0, f"`route_global_blocks` must be >= 0, got {self.route_global_blocks}.")
        need(
            self.route_topk >= 1 + self.route_global_blocks,
            f"`route_topk`={self.route_topk} cannot hold the forced blocks (its own block + {self.route_global_blocks} "
            f"global); it must be >= 1 + route_global_blocks = {1 + self.route_global_blocks}.",
        )
        need(
            self.route_backend in ROUTE_BACKENDS,
            f"`route_backend` must be one of {ROUTE_BACKENDS}, got {self.route_backend!r}.",
        )
        need(
            self.position_embedding_type in ("absolute", "rope"),
            f"`position_embedding_type` must be 'absolute' or 'rope', got {self.position_embedding_type!r}.",
        )
        problem_types = ("regression", "single_label_classification", "multi_label_classification")
        need(
            self.problem_type is None or self.problem_type in problem_types,
            f"`problem_type` must be one of {problem_types} (or None: inferred from the labels), got {self.problem_type!r}.",
        )
        need(
            self.classifier_pooling in ("cls", "mean"),
            f"`classifier_pooling` must be 'cls' or 'mean', got {self.classifier_pooling!r}.",
        )
        need(self.position_offset >= 0, f"`position_offset` must be >= 0, got {self.position_offset}.")
        self._check_heads(
            "num_attention_heads", self.num_attention_heads, "num_key_value_heads", self.num_key_value_heads
        )
        self._check_layer_types("layer_types", self.layer_types, "num_hidden_layers", self.num_hidden_layers)
        if self.is_encoder_decoder:
            need(
                self.decoder_layers >= 1,
                f"`decoder_layers` must be >= 1 when is_encoder_decoder=True, got {self.decoder_layers}.",
            )
            self._check_heads(
                "decoder_attention_heads",
                self.decoder_attention_heads,
                "decoder_num_key_value_heads",
                self.decoder_num_key_value_heads,
            )
            self._check_layer_types(
                "decoder_layer_types", self.decoder_layer_types, "decoder_layers", self.decoder_layers
            )
            need(
                self.decoder_start_token_id is not None,
                "`decoder_start_token_id` must be set for an encoder-decoder (the token that starts every output).",
            )

    def _check_heads(self, heads_name: str, heads: int, kv_name: str, kv_heads: int) -> None:
        if heads < 1 or self.hidden_size % heads != 0:
            raise ValueError(f"`hidden_size` ({self.hidden_size}) must be a multiple of `{heads_name}` ({heads}).")
        if kv_heads < 1 or heads % kv_heads != 0:
            raise ValueError(f"`{heads_name}` ({heads}) must be a multiple of `{kv_name}` ({kv_heads}).")
        if self.position_embedding_type == "rope" and (self.hidden_size // heads) % 2:
            raise ValueError(
                f"rotary positions turn pairs of dimensions, so the head size `hidden_size` / `{heads_name}` = "
                f"{self.hidden_size} / {heads} = {self.hidden_size // heads} must be even with "
                "position_embedding_type='rope'."
            )

    @staticmethod
    def _check_layer_types(name: str, layer_types, count_name: str, count: int) -> None:
        if len(layer_types) != count:
            raise ValueError(f"`{name}` must have one entry per layer ({count_name}={count}), got {len(layer_types)}.")
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"`{name}` entries must be in {LAYER_TYPES}, got {unknown}.")

    # -- validators run by @strict at construction and by save_pretrained ------------------------------------------------

    def validate_layer_type(self):
        """Replaces the base check, which does not know the `dualroute_attention` layer type."""
        self._check_layer_types("layer_types", self.layer_types, "num_hidden_layers", self.num_hidden_layers)

    def validate_dualroute(self):
        self.check_dualroute()
        labels = self.num_labels
        if labels < 1:
            raise ValueError(f"`num_labels` must be >= 1, got {labels}.")

    @property
    def output_attentions(self) -> bool:
        """Whether the model returns its attention maps (with `dualroute`, the routed ones, from the reference
        backend)."""
        return self._output_attentions

    @output_attentions.setter
    def output_attentions(self, value: bool):
        # The base setter switches a config without an attention implementation yet to `eager` (as in
        # `from_pretrained(..., output_attentions=True)`), which would run this model densely; it stays routed here.
        self._check_output_attentions(value)
        self._output_attentions = value

    def validate_output_attentions(self):
        """`output_attentions` works with `dualroute` (reference backend) as well as with `eager`."""
        self._check_output_attentions(self.output_attentions)

    def _check_output_attentions(self, value: bool) -> None:
        if value and self._attn_implementation not in ("eager", "dualroute", None):
            raise ValueError(
                f"`output_attentions` needs attn_implementation 'eager' or 'dualroute', got {self._attn_implementation!r}."
            )

    def to_dict(self) -> dict:
        """As the base class, with `layer_types` stored as `route_layer_types`. Code that reads config.json without
        this package (transformers' fallback to a plain `PreTrainedConfig`, e.g. `AutoTokenizer.from_pretrained`
        without ``trust_remote_code``) checks `layer_types` against the layer types it knows, which
        `dualroute_attention` is not; under another name the file loads there too."""
        output = super().to_dict()
        if "layer_types" in output:
            output[SAVED_LAYER_TYPES] = output.pop("layer_types")
        return output

    @property
    def routed_layers(self) -> list[bool]:
        return [layer_type == ROUTED_ATTENTION for layer_type in self.layer_types]


def _check_route_names(names) -> None:
    """Raises a `ValueError` for names with DualRoute's ``route_`` prefix that are not its fields (typos)."""
    known = sorted(field.name for field in dataclasses.fields(DualRouteConfig) if field.name.startswith("route_"))
    unknown = sorted(name for name in names if name.startswith("route_") and name not in (*known, SAVED_LAYER_TYPES))
    if unknown:
        close = [difflib.get_close_matches(name, known, n=1) for name in unknown]
        hints = "".join(f" (did you mean `{match[0]}`?)" for match in close if match)
        raise ValueError(f"unknown DualRoute setting(s) {unknown}{hints}; the route_ fields are {known}.")


def _activation_names() -> list[str]:
    from transformers.activations import ACT2FN  # imports torch: only when a config is checked

    return sorted(ACT2FN)


def _with_standard_errors(method):
    """`@strict` reports bad fields with its own exception types; raise the standard `TypeError` / `ValueError`
    instead, at construction and when a config changed afterwards is validated (``validate()``, ``save_pretrained``)."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except StrictDataclassFieldValidationError as error:
            raise TypeError(f"DualRouteConfig: {error}") from None
        except StrictDataclassClassValidationError as error:
            raise ValueError(f"DualRouteConfig: {error}") from None

    return wrapped


def _from_dict_validated(from_dict):
    """`from_pretrained` builds the config from the file, then sets its keyword overrides (``route_topk=...``) as
    plain attributes, past the checks of construction: validate the result before any model is built from it.

    A depth override (``num_hidden_layers=1``: a truncated model) keeps the saved types of the layers that remain, or
    repeats the one type of a uniform stack; other layer-type mismatches raise, saying what to pass."""

    @functools.wraps(from_dict)
    def wrapped(cls, config_dict, **kwargs):
        _check_route_names(kwargs)  # an override with a typo would otherwise be dropped as an unused kwarg
        if SAVED_LAYER_TYPES in kwargs:  # the file's name for the field, as an override
            kwargs["layer_types"] = kwargs.pop(SAVED_LAYER_TYPES)
        result = from_dict.__func__(cls, config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        for depth, types in (("num_hidden_layers", "layer_types"), ("decoder_layers", "decoder_layer_types")):
            saved, count = getattr(config, types), getattr(config, depth)
            if depth in kwargs and types not in kwargs and saved is not None and len(saved) != count:
                if len(saved) > count or len(set(saved)) == 1:
                    setattr(config, types, (list(saved) + [saved[-1]] * count)[:count])
                else:
                    raise ValueError(
                        f"`{depth}={count}` was overridden but the saved `{types}` has {len(saved)} mixed entries: "
                        f"pass `{types}` (one per layer) too."
                    )
        config.validate()
        return result

    return classmethod(wrapped)


DualRouteConfig.__init__ = _with_standard_errors(DualRouteConfig.__init__)
DualRouteConfig.validate = _with_standard_errors(DualRouteConfig.validate)
DualRouteConfig.from_dict = _from_dict_validated(DualRouteConfig.from_dict)


__all__ = ["DualRouteConfig"]
