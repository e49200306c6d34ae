# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""Convert dense pretrained checkpoints to DualRoute.

The router has no parameters, so a dense checkpoint's weights carry over unchanged, the way Longformer and LED were
made from RoBERTa and BART:

- BERT-family encoders (``bert``, ``roberta``, ``xlm-roberta``, ``electra``; MiniLM-style BERTs included) become
  `DualRouteModel` or `DualRouteForSequenceClassification` (BERT's pooler, or RoBERTa's / ELECTRA's classification
  head, become the classifier's dense layer);
- BART-family encoder-decoders (``bart``) become `DualRouteForConditionalGeneration`;
- an encoder-only checkpoint warm-starts both sides of `DualRouteForConditionalGeneration` (the BERT2BERT recipe:
  encoder and decoder copied from it, cross-attention newly initialised, output embeddings tied to the input ones).

Learned positions can be extended to a longer maximum by copying the pretrained table (the Longformer recipe). Every
conversion reports which weights were copied, which are new and which source weights were not used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch


ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra")
SEQ2SEQ_FAMILIES = ("bart",)
SUPPORTED = ENCODER_FAMILIES + SEQ2SEQ_FAMILIES
TASKS = ("auto", "base", "sequence-classification", "seq2seq")


@dataclass
class ConversionReport:
    source: str
    source_type: str
    target_class: str
    copied: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    extended_positions: tuple[int, int] | None = None

    def __str__(self) -> str:
        lines = [f"converted {self.source} ({self.source_type}) -> {self.target_class}"]
        if self.extended_positions:
            lines.append(
                f"  positions extended from {self.extended_positions[0]} to {self.extended_positions[1]} by copying"
            )
        lines.append(f"  copied: {len(self.copied)} tensors")
        lines.append(f"  new (initialised): {len(self.new)} tensors" + _preview(self.new))
        lines.append(f"  unused source tensors: {len(self.unused)}" + _preview(self.unused))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "source_type": self.source_type,
            "target_class": self.target_class,
            "copied": self.copied,
            "new": self.new,
            "unused": self.unused,
            "extended_positions": self.extended_positions,
        }


def _preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return ""
    shown = ", ".join(_compress(names)[:limit])
    return f" ({shown}{', ...' if len(_compress(names)) > limit else ''})"


def _compress(names: list[str]) -> list[str]:
    """Collapses per-layer names: ``decoder.layers.{0..5}.encoder_attn.q_proj.weight``."""
    groups: dict[str, list[str]] = {}
    for name in names:
        key = re.sub(r"\.(\d+)\.", ".{i}.", name)
        groups.setdefault(key, []).append(name)
    return [key if len(members) > 1 else members[0] for key, members in groups.items()]


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def _encoder_config_fields(source, family: str) -> dict:
    """DualRoute fields of an encoder that reproduces a BERT-family model."""
    offset = source.pad_token_id + 1 if family in ("roberta", "xlm-roberta") else 0
    fields = dict(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        intermediate_size=source.intermediate_size,
        hidden_act=source.hidden_act,
        hidden_dropout_prob=source.hidden_dropout_prob,
        attention_probs_dropout_prob=source.attention_probs_dropout_prob,
        max_position_embeddings=source.max_position_embeddings - offset,
        position_offset=offset,
        type_vocab_size=source.type_vocab_size,
        layer_norm_eps=source.layer_norm_eps,
        initializer_range=source.initializer_range,
        pad_token_id=source.pad_token_id,
        classifier_activation="gelu" if family == "electra" else "tanh",
        classifier_dropout=getattr(source, "classifier_dropout", None),
    )
    if family == "electra" and source.embedding_size != source.hidden_size:
        fields["embedding_size"] = source.embedding_size
    return fields


def _bart_config_fields(source) -> dict:
    return dict(
        vocab_size=source.vocab_size,
        hidden_size=source.d_model,
        num_hidden_layers=source.encoder_layers,
        num_attention_heads=source.encoder_attention_heads,
        intermediate_size=source.encoder_ffn_dim,
        hidden_act=source.activation_function,
        hidden_dropout_prob=source.dropout,
        attention_probs_dropout_prob=source.attention_dropout,
        activation_dropout=source.activation_dropout,
        max_position_embeddings=source.max_position_embeddings,
        position_offset=2,  # BART's learned positions start at row 2
        type_vocab_size=0,
        scale_embedding=source.scale_embedding,
        layer_norm_eps=1e-5,
        initializer_range=source.init_std,
        classifier_dropout=getattr(source, "classifier_dropout", None),
        is_encoder_decoder=True,
        decoder_layers=source.decoder_layers,
        decoder_attention_heads=source.decoder_attention_heads,
        decoder_intermediate_size=source.decoder_ffn_dim,
        decoder_max_position_embeddings=source.max_position_embeddings,
        pad_token_id=source.pad_token_id,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        decoder_start_token_id=source.decoder_start_token_id,
        forced_eos_token_id=getattr(source, "forced_eos_token_id", None),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Weight maps: target name -> source name
# ---------------------------------------------------------------------------------------------------------------------


def _bert_encoder_map(n_layers: int, source_prefix: str, target_prefix: str) -> dict[str, str]:
    names = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight": "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias": "embeddings.LayerNorm.bias",
        "embeddings.project.weight": "embeddings_project.weight",  # ELECTRA
        "embeddings.project.bias": "embeddings_project.bias",
    }
    layer = {
        "self_attn.q_proj": "attention.self.query",
        "self_attn.k_proj": "attention.self.key",
        "self_attn.v_proj": "attention.self.value",
        "self_attn.out_proj": "attention.output.dense",
        "self_attn_layer_norm": "attention.output.LayerNorm",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
        "final_layer_norm": "output.LayerNorm",
    }
    for i in range(n_layers):
        for target, source in layer.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{target}.{kind}"] = f"encoder.layer.{i}.{source}.{kind}"
    return {target_prefix + t: source_prefix + s for t, s in names.items()}


def _bart_map(config) -> dict[str, str]:
    names = {
        "model.embeddings.word_embeddings.weight": "model.shared.weight",
        "model.embeddings.position_embeddings.weight": "model.encoder.embed_positions.weight",
        "model.embeddings.LayerNorm.weight": "model.encoder.layernorm_embedding.weight",
        "model.embeddings.LayerNorm.bias": "model.encoder.layernorm_embedding.bias",
        "decoder.embeddings.word_embeddings.weight": "model.shared.weight",
        "decoder.embeddings.position_embeddings.weight": "model.decoder.embed_positions.weight",
        "decoder.embeddings.LayerNorm.weight": "model.decoder.layernorm_embedding.weight",
        "decoder.embeddings.LayerNorm.bias": "model.decoder.layernorm_embedding.bias",
        "lm_head.weight": "lm_head.weight",
        "final_logits_bias": "final_logits_bias",
    }
    common = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "self_attn_layer_norm",
        "final_layer_norm",
    ]
    for side, target_side, count, extra in (
        ("encoder", "model", config.num_hidden_layers, []),
        ("decoder", "decoder", config.decoder_layers, ["encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj", "encoder_attn_layer_norm"]),
    ):  # fmt: skip
        for i in range(count):
            for module in common + extra:
                for kind in ("weight", "bias"):
                    names[f"{target_side}.layers.{i}.{module}.{kind}"] = f"model.{side}.layers.{i}.{module}.{kind}"
            for ffn in ("fc1", "fc2"):
                for kind in ("weight", "bias"):
                    names[f"{target_side}.layers.{i}.mlp.{ffn}.{kind}"] = f"model.{side}.layers.{i}.{ffn}.{kind}"
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Loading the source
# ---------------------------------------------------------------------------------------------------------------------


def _load_source(src: str):
    """The source config and every tensor of its checkpoint (through transformers, so shards and formats work)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, BartForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(src)
    except OSError as error:
        raise OSError(
            f"cannot read a checkpoint at {src!r}: pass a local folder with config.json and weights, or a Hub name "
            f"that is cached or reachable (HF_HUB_OFFLINE is honoured). Original error: {error}"
        ) from error
    family = config.model_type
    if family not in SUPPORTED:
        raise ValueError(
            f"cannot convert model_type {family!r} from {src!r}; supported: BERT-family encoders {ENCODER_FAMILIES} "
            f"(MiniLM-style BERTs included) and BART-family encoder-decoders {SEQ2SEQ_FAMILIES}."
        )
    if family == "bart":
        model = BartForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    elif any(name.endswith("ForSequenceClassification") for name in (config.architectures or [])):
        model = AutoModelForSequenceClassification.from_pretrained(src, dtype=torch.float32)
    else:
        model = AutoModel.from_pretrained(src, dtype=torch.float32)
    return config, model.state_dict()


def _strip_prefix(state: dict[str, torch.Tensor], family: str) -> tuple[dict[str, torch.Tensor], str]:
    """BERT-family task models keep the encoder under ``bert.`` / ``roberta.`` / ``electra.``; base models do not."""
    prefix = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.", "electra": "electra."}[family]
    if any(name.startswith(prefix) for name in state):
        return state, prefix
    return state, ""


def _extend_positions(table: torch.Tensor, offset: int, old_max: int, new_max: int) -> torch.Tensor:
    """Longformer recipe: the first ``offset`` rows stay; the pretrained position rows repeat up to ``new_max``."""
    rows = table[offset : offset + old_max]
    repeats = -(-new_max // old_max)
    return torch.cat([table[:offset], rows.repeat(repeats, 1)[:new_max]])


# ---------------------------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------------------------


def convert(
    src: str,
    out: str | Path | None = None,
    *,
    task: str = "auto",
    block_size: int = 64,
    topk: int = 8,
    global_blocks: int = 1,
    max_position_embeddings: int | None = None,
    layer_types: list[str] | None = None,
    dense_last_layers: int = 0,
    num_labels: int | None = None,
    copy_tokenizer: bool = True,
):
    """Converts a dense checkpoint; returns ``(model, report)`` and saves both model and tokenizer to ``out``.

    Args:
        src: a local checkpoint folder or a Hub name.
        out: where to save (``None``: do not save).
        task: ``"base"`` (`DualRouteModel`), ``"sequence-classification"``, ``"seq2seq"``
            (`DualRouteForConditionalGeneration`; from an encoder-only source this is the BERT2BERT warm start), or
            ``"auto"``: seq2seq for BART, sequence classification for checkpoints that have a classifier or when
            ``num_labels`` is given, else base.
        block_size, topk, global_blocks: routing settings (``route_block_size``, ``route_topk``,
            ``route_global_blocks``).
        max_position_embeddings: extend learned positions to this many by copying (Longformer recipe).
        layer_types: per encoder layer, ``"dualroute_attention"`` or ``"full_attention"``.
        dense_last_layers: keep the last N encoder layers dense (a shortcut for ``layer_types``; MoBA's recipe for
            fine-tuning with loss on few positions).
        num_labels: classifier size for ``sequence-classification`` (default: the source's, else 2).
    """
    from .configuration_dualroute import DualRouteConfig
    from .modeling_dualroute import DualRouteForSequenceClassification, DualRouteModel
    from .routing_dualroute import _check_int

    DualRouteForConditionalGeneration = _seq2seq_class()

    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
    routing = dict(route_block_size=block_size, route_topk=topk, route_global_blocks=global_blocks)
    DualRouteConfig(**routing)  # bad routing settings fail here, before the source checkpoint is read
    _check_int("dense_last_layers", dense_last_layers, 0)
    for name, value in (("max_position_embeddings", max_position_embeddings), ("num_labels", num_labels)):
        if value is not None:
            _check_int(name, value, 1)
    source_config, state = _load_source(src)
    family = source_config.model_type
    has_classifier = any(name.endswith("ForSequenceClassification") for name in (source_config.architectures or []))
    if task == "auto":
        classifier = has_classifier or num_labels is not None  # asking for labels is asking for a classifier
        task = "seq2seq" if family == "bart" else "sequence-classification" if classifier else "base"
    if family == "bart" and task != "seq2seq":
        raise ValueError(f"a BART checkpoint converts to task='seq2seq', got task={task!r}.")

    if num_labels is not None and task != "sequence-classification":
        raise ValueError(
            f"`num_labels` sets a classifier's size: it needs task='sequence-classification', got {task!r}."
        )
    if family == "bart":
        fields = _bart_config_fields(source_config)
    else:
        fields = _encoder_config_fields(source_config, family)
    old_max = fields["max_position_embeddings"]
    new_max = old_max if max_position_embeddings is None else max_position_embeddings
    if new_max < old_max:
        raise ValueError(f"`max_position_embeddings` ({new_max}) must be >= the source's ({old_max}).")
    fields["max_position_embeddings"] = new_max
    if layer_types is not None and dense_last_layers:
        raise ValueError("pass `layer_types` or `dense_last_layers`, not both.")
    if dense_last_layers:
        n = fields["num_hidden_layers"]
        if not 0 <= dense_last_layers <= n:
            raise ValueError(
                f"`dense_last_layers` must be in [0, {n}] (the encoder's layers), got {dense_last_layers}."
            )
        layer_types = ["dualroute_attention"] * (n - dense_last_layers) + ["full_attention"] * dense_last_layers
    if layer_types is not None:
        fields["layer_types"] = list(layer_types)

    if task == "sequence-classification":
        labels = num_labels if num_labels is not None else source_config.num_labels if has_classifier else 2
        fields["num_labels"] = labels
        if has_classifier and labels == source_config.num_labels:
            fields.update(id2label=source_config.id2label, label2id=source_config.label2id)
            fields["problem_type"] = source_config.problem_type
        target_class = DualRouteForSequenceClassification
    elif task == "seq2seq":
        target_class = DualRouteForConditionalGeneration
        if family != "bart":  # BERT2BERT
            fields.update(
                is_encoder_decoder=True,
                decoder_layers=fields["num_hidden_layers"],
                decoder_attention_heads=fields["num_attention_heads"],
                decoder_intermediate_size=fields["intermediate_size"],
                decoder_max_position_embeddings=old_max,
                decoder_start_token_id=_special_token(src, "cls_token_id", source_config, "bos_token_id"),
                bos_token_id=_special_token(src, "cls_token_id", source_config, "bos_token_id"),
                eos_token_id=_special_token(src, "sep_token_id", source_config, "eos_token_id"),
            )
    else:
        target_class = DualRouteModel
    config = DualRouteConfig(**fields, **routing)
    model = target_class(config)

    target_state = model.state_dict()
    source_state, prefix = _strip_prefix(state, family) if family != "bart" else (state, "")
    if family == "bart":
        mapping = _bart_map(config)
    else:
        target_prefix = "" if task == "base" else "model."
        mapping = _bert_encoder_map(config.num_hidden_layers, prefix, target_prefix)
        if task == "seq2seq":  # BERT2BERT: the decoder's embeddings, self-attention and feed-forward, from the encoder
            mapping.update(_bert_encoder_map(config.decoder_layers, prefix, "decoder."))
        if task == "sequence-classification":
            mapping.update(_classifier_map(source_state, prefix, config.num_labels))

    report = ConversionReport(source=str(src), source_type=family, target_class=target_class.__name__)
    new_state = {}
    used_sources = set()
    for target, source in mapping.items():
        if target not in target_state or source not in source_state:
            continue
        tensor = source_state[source]
        if (
            target.endswith("position_embeddings.weight")
            and target.startswith(("model.", "embeddings."))
            and new_max != old_max
        ):
            tensor = _extend_positions(tensor, config.position_offset, old_max, new_max)
            report.extended_positions = (old_max, new_max)
        if tuple(tensor.shape) != tuple(target_state[target].shape):
            raise ValueError(
                f"shape mismatch for {target}: source {source} has {tuple(tensor.shape)}, target needs {tuple(target_state[target].shape)}"
            )
        new_state[target] = tensor
        used_sources.add(source)
    missing = model.load_state_dict(new_state, strict=False).missing_keys
    tied = {name for name in missing if _is_tied(model, name)}
    report.copied = sorted(new_state)
    report.new = sorted(set(missing) - tied)
    used_storage = {source_state[name].data_ptr() for name in used_sources}  # tied aliases share storage
    report.unused = sorted(
        name
        for name, tensor in source_state.items()
        if name not in used_sources and tensor.data_ptr() not in used_storage and not name.endswith("position_ids")
    )
    model.tie_weights()
    if task == "seq2seq" and family == "bart":
        _copy_generation_config(src, model)
    model.eval()
    if out is not None:
        out = Path(out)
        model.save_pretrained(out)
        if copy_tokenizer:
            _copy_tokenizer(src, out, new_max)
        (out / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return model, report


def _seq2seq_class():
    from . import modeling_dualroute

    return getattr(modeling_dualroute, "DualRouteForConditionalGeneration", None)


def _classifier_map(source_state: dict, prefix: str, num_labels: int) -> dict[str, str]:
    """BERT: pooler + classifier; RoBERTa / ELECTRA: classifier.dense + classifier.out_proj."""
    names = {}
    if f"{prefix}pooler.dense.weight" in source_state:
        names["classifier.dense.weight"] = f"{prefix}pooler.dense.weight"
        names["classifier.dense.bias"] = f"{prefix}pooler.dense.bias"
    if "classifier.dense.weight" in source_state:
        names["classifier.dense.weight"] = "classifier.dense.weight"
        names["classifier.dense.bias"] = "classifier.dense.bias"
    out_proj = "classifier.out_proj" if "classifier.out_proj.weight" in source_state else "classifier"
    if f"{out_proj}.weight" in source_state and source_state[f"{out_proj}.weight"].shape[0] == num_labels:
        names["classifier.out_proj.weight"] = f"{out_proj}.weight"
        names["classifier.out_proj.bias"] = f"{out_proj}.bias"
    return names


def _is_tied(model, name: str) -> bool:
    return name in getattr(model, "all_tied_weights_keys", {}) or name == "lm_head.weight"


def _special_token(src: str, tokenizer_attribute: str, config, config_attribute: str) -> int:
    from transformers import AutoTokenizer

    try:
        value = getattr(AutoTokenizer.from_pretrained(src), tokenizer_attribute)
    except Exception:  # noqa: BLE001 - a source without a tokenizer falls back to its config
        value = None
    value = value if value is not None else getattr(config, config_attribute, None)
    if value is None:
        raise ValueError(
            f"cannot find {tokenizer_attribute} for the BERT2BERT decoder in {src!r}; add a tokenizer to the checkpoint."
        )
    return value


def _copy_generation_config(src: str, model) -> None:
    """BART checkpoints carry generation defaults (forced EOS, beams, lengths) that define how they generate."""
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(src)
    except OSError:  # no generation_config.json: the defaults derived from the config stay
        pass


def _copy_tokenizer(src: str, out: Path, max_positions: int) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as error:  # noqa: BLE001 - report, do not fail the conversion
        print(f"warning: no tokenizer copied from {src!r} ({type(error).__name__}: {error})")
        return
    tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(out)
