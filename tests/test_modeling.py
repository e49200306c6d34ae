"""The encoder and the classification head as transformers models."""

import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from modeling_dualroute import DualRouteConfig, DualRouteForSequenceClassification, DualRouteModel
from modeling_dualroute.modeling_dualroute import DualRouteRotaryEmbedding, apply_rotary, apply_rotary_reference
from modeling_dualroute.routing_dualroute import route_blocks

from helpers import random_batch, tiny_config


def eval_model(cls=DualRouteForSequenceClassification, **overrides):
    torch.manual_seed(0)
    return cls(tiny_config(**overrides)).eval()


# -- config ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(route_topk=0), ValueError, "`route_topk` must be >= 1, got 0"),
        (dict(route_topk=1, route_global_blocks=1), ValueError, "route_topk`=1 cannot hold the forced blocks"),
        (dict(route_block_size=0), ValueError, "`route_block_size` must be >= 1, got 0"),
        (dict(route_topk="8"), TypeError, "`route_topk` must be an int, got '8'"),
        (dict(route_backend="fast"), ValueError, "`route_backend` must be one of"),
        (dict(route_before_rope=1), TypeError, "`route_before_rope` must be a bool, got 1 of type int"),
        (dict(hidden_size=30), ValueError, "`hidden_size` (30) must be a multiple of `num_attention_heads` (4)"),
        (
            dict(num_key_value_heads=3),
            ValueError,
            "`num_attention_heads` (4) must be a multiple of `num_key_value_heads` (3)",
        ),
        (
            dict(hidden_size=36, position_embedding_type="rope"),
            ValueError,
            "`hidden_size` / `num_attention_heads` = 36 / 4 = 9 must be even",
        ),
        (dict(layer_types=["full_attention"]), ValueError, "`layer_types` must have one entry per layer"),
        (dict(layer_types=["x", "full_attention"]), ValueError, "`layer_types` entries must be in"),
        (dict(position_embedding_type="alibi"), ValueError, "`position_embedding_type` must be 'absolute' or 'rope'"),
        (dict(classifier_pooling="max"), ValueError, "`classifier_pooling` must be 'cls' or 'mean'"),
        (dict(is_encoder_decoder=True, decoder_layers=1), ValueError, "`decoder_start_token_id` must be set"),
        (
            dict(is_encoder_decoder=True, decoder_layers=1, decoder_start_token_id=500),
            ValueError,
            "`decoder_start_token_id` must be a token id in [0, vocab_size=99), got 500",
        ),
        (dict(pad_token_id=200), ValueError, "`pad_token_id` must be a token id in [0, vocab_size=99), got 200"),
        (dict(hidden_act="bogus"), ValueError, "`hidden_act` must name one of transformers' activations"),
        (dict(classifier_activation="bogus"), ValueError, "`classifier_activation` must name one of"),
        (dict(intermediate_size=-1), ValueError, "`intermediate_size` must be >= 1, got -1"),
        (dict(embedding_size=0), ValueError, "`embedding_size` must be >= 1 (or None: hidden_size), got 0"),
        (dict(type_vocab_size=-1), ValueError, "`type_vocab_size` must be >= 0 (0: no token types), got -1"),
        (dict(hidden_dropout_prob=1.5), ValueError, "`hidden_dropout_prob` must be a probability in [0, 1), got 1.5"),
        (dict(classifier_dropout=-0.1), ValueError, "`classifier_dropout` must be a probability in [0, 1), got -0.1"),
        (dict(rope_theta=0.0), ValueError, "`rope_theta` must be a finite number > 0, got 0.0"),
        (dict(rope_theta="abc"), TypeError, "`rope_theta` must be a number, got 'abc' of type str"),
        (dict(layer_norm_eps=-1.0), ValueError, "`layer_norm_eps` must be a finite number > 0, got -1.0"),
        (
            dict(is_encoder_decoder=True, decoder_layers=1, decoder_start_token_id=2, decoder_attention_heads=2.0),
            TypeError,
            "`decoder_attention_heads` must be an int, got 2.0 of type float",
        ),
        (
            dict(
                is_encoder_decoder=True, decoder_layers=1, decoder_start_token_id=2, decoder_max_position_embeddings=-3
            ),
            ValueError,
            "`decoder_max_position_embeddings` must be >= 1, got -3",
        ),
        (dict(num_labels=0), ValueError, "`num_labels` must be >= 1, got 0"),
        (dict(eos_token_id=99), ValueError, "`eos_token_id` must be a token id in [0, vocab_size=99), got 99"),
        (dict(bos_token_id=-1), ValueError, "`bos_token_id` must be a token id in [0, vocab_size=99), got -1"),
        (dict(route_topkk=4), ValueError, "unknown DualRoute setting(s) ['route_topkk'] (did you mean `route_topk`?)"),
        (dict(problem_type="foo"), ValueError, "`problem_type` must be one of ('regression', 'single_label_classification', 'multi_label_classification') (or None: inferred from the labels), got 'foo'"),
    ],
)  # fmt: skip
def test_bad_config_raises_at_construction(overrides, error, words):
    with pytest.raises(error, match=__import__("re").escape(words)):
        tiny_config(**overrides)


def test_a_config_changed_after_construction_is_checked_when_validated_or_saved(tmp_path):
    config = tiny_config()
    config.route_topk = 0
    with pytest.raises(ValueError, match="`route_topk` must be >= 1, got 0"):
        config.validate()
    with pytest.raises(ValueError, match="`route_topk` must be >= 1, got 0"):
        config.save_pretrained(tmp_path)


def test_from_pretrained_overrides_are_checked_at_loading(tmp_path):
    """Keyword overrides of `from_pretrained` are set after construction: they are validated before a model is built,
    so a bad `classifier_pooling` cannot silently pool another way."""
    DualRouteForSequenceClassification(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`route_topk` must be >= 1, got 0"):
        AutoConfig.from_pretrained(tmp_path, route_topk=0)
    with pytest.raises(ValueError, match="`classifier_pooling` must be 'cls' or 'mean', got 'max'"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, classifier_pooling="max")
    config, unused = AutoConfig.from_pretrained(tmp_path, route_topk=3, return_unused_kwargs=True, foo=1)
    assert config.route_topk == 3 and unused == {"foo": 1}


def test_from_pretrained_with_fewer_or_more_layers(tmp_path):
    """A depth override keeps the saved types of the remaining layers (a truncated model) or repeats a uniform stack's
    type; a mixed stack made deeper needs its layer types."""
    mixed = ["dualroute_attention", "full_attention", "dualroute_attention"]
    DualRouteModel(tiny_config(num_hidden_layers=3, layer_types=mixed)).save_pretrained(tmp_path / "mixed")
    DualRouteModel(tiny_config()).save_pretrained(tmp_path / "uniform")
    truncated = AutoModel.from_pretrained(tmp_path / "mixed", num_hidden_layers=2)
    assert truncated.config.layer_types == mixed[:2] and len(truncated.layers) == 2
    deeper = AutoConfig.from_pretrained(tmp_path / "uniform", num_hidden_layers=4)
    assert deeper.layer_types == ["dualroute_attention"] * 4
    with pytest.raises(ValueError, match="`num_hidden_layers=4` was overridden .* pass `layer_types`"):
        AutoConfig.from_pretrained(tmp_path / "mixed", num_hidden_layers=4)
    explicit = AutoConfig.from_pretrained(tmp_path / "mixed", num_hidden_layers=1, layer_types=["full_attention"])
    assert explicit.layer_types == ["full_attention"]
    same = AutoConfig.from_pretrained(tmp_path / "mixed", num_hidden_layers=1, route_layer_types=["full_attention"])
    assert same.layer_types == ["full_attention"]  # the field's name in config.json works as an override too
    with pytest.raises(
        ValueError, match=r"unknown DualRoute setting\(s\) \['route_top_k'\] \(did you mean `route_topk`"
    ):
        AutoConfig.from_pretrained(tmp_path / "mixed", route_top_k=2)  # not silently dropped as an unused kwarg


def test_pooling_set_after_construction_is_checked_when_used():
    model = eval_model(classifier_pooling="mean")
    model.config.classifier_pooling = "max"  # changed after construction, never validated
    with pytest.raises(ValueError, match="`classifier_pooling` must be 'cls' or 'mean', got 'max'"):
        model(torch.randint(4, 99, (1, 5)))


def test_config_round_trip_and_defaults(tmp_path):
    config = tiny_config(layer_types=["dualroute_attention", "full_attention"], num_labels=3)
    assert config.d_model == 32 and config.encoder_layers == 2
    config.save_pretrained(tmp_path)
    loaded = DualRouteConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.routed_layers == [True, False]
    # config.json names the field route_layer_types (transformers' plain config rejects unknown layer types)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "layer_types" not in saved and saved["route_layer_types"] == ["dualroute_attention", "full_attention"]
    saved["layer_types"] = saved.pop("route_layer_types")  # a file written before the rename
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert DualRouteConfig.from_pretrained(tmp_path).routed_layers == [True, False]
    with pytest.raises(ValueError, match="`layer_types`=.* and `route_layer_types`=.* disagree"):
        tiny_config(layer_types=["full_attention"] * 2, route_layer_types=["dualroute_attention"] * 2)


# -- forward and outputs -----------------------------------------------------------------------------------------------


def test_outputs_hidden_states_attentions_and_router_indices():
    model = eval_model(num_labels=3)
    input_ids, attention_mask = random_batch(model.config)
    out = model(
        input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        output_attentions=True,
        output_router_indices=True,
    )
    assert out.logits.shape == (3, 3)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (3, 13, 32)
    assert [a.shape for a in out.attentions] == [(3, 4, 13, 13)] * 2
    assert [r.shape for r in out.router_indices] == [(3, 4, 4, 2)] * 2  # 4 query blocks of 4 (ragged), top-2
    # the attention weights are zero outside the routed blocks, and sum to one
    weights, plan = out.attentions[0], out.router_indices[0]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 13))
    for block in range(4):
        kept = set(plan[0, 0, block].tolist()) - {-1}
        seen = {t // 4 for t in range(13) if weights[0, 0, block * 4, t] > 0}
        assert seen <= kept
    # a dense layer lists every key block
    dense_last = eval_model(num_labels=3, layer_types=["dualroute_attention", "full_attention"])
    out = dense_last(input_ids, attention_mask=attention_mask, output_router_indices=True)
    assert out.router_indices[0].shape == (3, 4, 4, 2)
    assert out.router_indices[1][0].tolist() == [[[0, 1, 2, 3]] * 4] * 4


def test_output_attentions_from_the_config_keeps_the_model_routed(tmp_path):
    """transformers' base config switches to `eager` when `output_attentions=True` comes before an attention
    implementation (``from_pretrained(..., output_attentions=True)``): this one stays routed and returns its maps."""
    model = eval_model(DualRouteModel)
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = random_batch(model.config)
    expected = model(input_ids, attention_mask=attention_mask, output_attentions=True)
    loaded = AutoModel.from_pretrained(tmp_path, output_attentions=True).eval()
    assert loaded.config._attn_implementation == "dualroute"
    out = loaded(input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    assert len(out.attentions) == 2
    for got, want in zip(out.attentions, expected.attentions):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (out.attentions[0] == 0).any()  # routed: weights outside the selected blocks are zero
    assert loaded(input_ids, attention_mask=attention_mask, output_attentions=False).attentions is None
    model.config.output_attentions = True  # on a live routed model too
    assert model(input_ids, attention_mask=attention_mask).attentions is not None


@pytest.mark.parametrize("before_rope", [True, False])
def test_rope_models_route_on_the_vectors_before_or_after_the_rotation(before_rope):
    """``route_before_rope``: level 1 scores blocks with the projections before RoPE (position-free content), or with
    the rotated ones that level 2 attends with."""
    model = eval_model(
        DualRouteModel, position_embedding_type="rope", route_before_rope=before_rope, max_position_embeddings=64
    )
    input_ids, attention_mask = random_batch(model.config, length=29)
    projections = {}
    for index, layer in enumerate(model.layers):
        for name in ("q_proj", "k_proj"):
            module = getattr(layer.self_attn, name)
            module.register_forward_hook(lambda m, args, out, key=(index, name): projections.__setitem__(key, out))
    out = model(input_ids, attention_mask=attention_mask, output_router_indices=True)
    positions = attention_mask.cumsum(-1) - 1  # positions count real tokens
    cos_sin = model.rotary(positions.clamp(min=0), torch.float32)
    config = model.config
    for index, plan in enumerate(out.router_indices):
        query, key = (
            projections[index, name].view(3, 29, config.num_attention_heads, -1).transpose(1, 2)
            for name in ("q_proj", "k_proj")
        )
        if not before_rope:
            query, key = apply_rotary(query, *cos_sin), apply_rotary(key, *cos_sin)
        expected = route_blocks(
            query,
            key,
            block_size=config.route_block_size,
            top_k=config.route_topk,
            key_padding_mask=attention_mask.bool(),
            query_padding_mask=attention_mask.bool(),
            global_blocks=config.route_global_blocks,
        )
        assert torch.equal(plan, expected)


@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    length=st.integers(1, 9),
    half=st.integers(1, 8),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rotary_equals_the_textbook_formula_in_output_and_gradient(batch, heads, length, half, transposed, seed):
    generator = torch.Generator().manual_seed(seed)
    if transposed:  # as the attention module passes it: a (b, l, h, d) projection viewed as (b, h, l, d)
        x = torch.randn(batch, length, heads, 2 * half, generator=generator).transpose(1, 2)
    else:
        x = torch.randn(batch, heads, length, 2 * half, generator=generator)
    positions = torch.randint(0, 10_000, (batch, length), generator=generator)
    rotary = DualRouteRotaryEmbedding(tiny_config(position_embedding_type="rope"), 2 * half)
    cos, sin = rotary(positions, torch.float32)
    grad = torch.randn(batch, heads, length, 2 * half, generator=generator)
    outputs, grads = [], []
    for rotate in (apply_rotary, apply_rotary_reference):
        leaf = x.detach().clone().requires_grad_()
        out = rotate(leaf, cos, sin)
        out.backward(grad)
        outputs.append(out)
        grads.append(leaf.grad)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotary_in_half_precision_equals_the_textbook_formula(dtype):
    x = torch.randn(2, 3, 11, 16).to(dtype)
    cos, sin = DualRouteRotaryEmbedding(tiny_config(position_embedding_type="rope"), 16)(torch.arange(11)[None], dtype)
    expected = apply_rotary_reference(x.float(), cos.float(), sin.float())
    torch.testing.assert_close(apply_rotary(x, cos, sin).float(), expected, atol=2e-2, rtol=1e-2)


def test_return_dict_false_gives_a_tuple():
    model = eval_model()
    input_ids, attention_mask = random_batch(model.config)
    as_dict = model(input_ids, attention_mask=attention_mask)
    as_tuple = model(input_ids, attention_mask=attention_mask, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)


@pytest.mark.parametrize("dense", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "variant",
    [dict(), dict(position_embedding_type="rope", num_key_value_heads=2), dict(type_vocab_size=0, embedding_size=16)],
)
def test_full_top_k_equals_the_dense_twin(dense, variant):
    """With top-k covering every block, attn_implementation='dualroute' is the same model as 'eager'/'sdpa'."""
    routed = eval_model(DualRouteModel, route_topk=8, **variant)
    input_ids, attention_mask = random_batch(routed.config)
    dense_model = eval_model(DualRouteModel, route_topk=8, **variant)
    dense_model.set_attn_implementation(dense)
    expected = dense_model(input_ids, attention_mask=attention_mask).last_hidden_state
    actual = routed(input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-5)


def test_routing_changes_the_output_when_top_k_is_small():
    model = eval_model(DualRouteModel, route_topk=2)
    input_ids, attention_mask = random_batch(model.config, padded=False, length=32)
    routed = model(input_ids, attention_mask=attention_mask).last_hidden_state
    model.set_attn_implementation("sdpa")
    dense = model(input_ids, attention_mask=attention_mask).last_hidden_state
    assert (routed - dense).abs().max() > 1e-3


def test_padding_and_batching_do_not_change_logits():
    model = eval_model(num_labels=2, classifier_pooling="mean")
    input_ids, attention_mask = random_batch(model.config, batch=3, length=21)
    batch_logits = model(input_ids, attention_mask=attention_mask).logits
    for b in range(3):
        length = int(attention_mask[b].sum())
        alone = model(input_ids[b : b + 1, :length]).logits
        torch.testing.assert_close(batch_logits[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_left_padding_keeps_positions():
    """Positions count real tokens, so left padding only changes block boundaries (documented), not positions."""
    model = eval_model(DualRouteModel, route_topk=8)  # every block: no routing difference
    ids = torch.randint(4, 99, (1, 9))
    left = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    alone = model(ids).last_hidden_state
    padded = model(left, attention_mask=mask).last_hidden_state[:, 4:]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equal_input_ids():
    model = eval_model(DualRouteModel)
    input_ids, attention_mask = random_batch(model.config)
    embeds = model.get_input_embeddings()(input_ids)
    torch.testing.assert_close(
        model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state,
        model(input_ids, attention_mask=attention_mask).last_hidden_state,
    )


def test_deterministic_in_eval_and_random_in_train():
    model = eval_model(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    input_ids, attention_mask = random_batch(model.config)
    assert torch.equal(
        model(input_ids, attention_mask=attention_mask).logits, model(input_ids, attention_mask=attention_mask).logits
    )
    model.train()
    assert not torch.equal(
        model(input_ids, attention_mask=attention_mask).logits, model(input_ids, attention_mask=attention_mask).logits
    )


def test_resize_token_embeddings():
    model = eval_model(DualRouteModel)
    model.resize_token_embeddings(120)
    assert model.get_input_embeddings().weight.shape == (120, 32) and model.config.vocab_size == 120
    assert model(torch.tensor([[2, 110, 119, 3]])).last_hidden_state.shape == (1, 4, 32)


# -- losses ------------------------------------------------------------------------------------------------------------


def test_losses_for_every_problem_type():
    input_ids, attention_mask = random_batch(tiny_config())
    model = eval_model(num_labels=3)
    out = model(input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 2, 1]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2, 1])))
    assert model.config.problem_type == "single_label_classification"
    model = eval_model(num_labels=3)
    labels = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]])
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels))
    model = eval_model(num_labels=1)
    out = model(input_ids, attention_mask=attention_mask, labels=torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(
        out.loss, torch.nn.functional.mse_loss(out.logits.view(-1), torch.tensor([0.5, -1.0, 2.0]))
    )


@pytest.mark.parametrize(
    "num_labels, labels, words",
    [
        (3, torch.ones(3, 2), "multi-label classification needs `labels` of shape (3, 3), got (3, 2)"),
        (
            3,
            torch.tensor([[0, 1, 2]]).repeat(3, 1),
            "single-label classification needs integer `labels` of shape (3,)",
        ),
        (2, torch.tensor([0, 1]), "single-label classification needs integer `labels` of shape (3,)"),
        (1, torch.tensor([0.5, 1.0]), "regression needs `labels` with 3 values"),
    ],
)
def test_labels_of_the_wrong_shape_raise(num_labels, labels, words):
    model = eval_model(num_labels=num_labels)
    input_ids, attention_mask = random_batch(model.config)
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        model(input_ids, attention_mask=attention_mask, labels=labels)


# -- errors ------------------------------------------------------------------------------------------------------------


def test_input_longer_than_absolute_positions_raises():
    model = eval_model(DualRouteModel, max_position_embeddings=16)
    with pytest.raises(ValueError, match="input length 20 exceeds max_position_embeddings=16"):
        model(torch.randint(4, 99, (1, 20)))
    rope = eval_model(DualRouteModel, max_position_embeddings=16, position_embedding_type="rope")
    assert rope(torch.randint(4, 99, (1, 20))).last_hidden_state.shape == (1, 20, 32)  # RoPE has no table to outgrow


def test_bad_inputs_raise():
    model = eval_model(DualRouteModel)
    with pytest.raises(ValueError, match="exactly one of `input_ids`"):
        model()
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \(batch, seq\) = \(1, 5\), got \(1, 4\)"):
        model(torch.randint(4, 99, (1, 5)), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"`input_ids` must have shape \(batch, seq\)"):
        model(torch.randint(4, 99, (5,)))


@pytest.mark.parametrize(
    "inputs, error, words",
    [
        (dict(input_ids=torch.rand(2, 9)), TypeError, "`input_ids` must hold integer ids (torch.long or torch.int), got a tensor of dtype torch.float32"),
        (dict(input_ids=torch.ones(2, 9, dtype=torch.uint8)), TypeError, "`input_ids` must hold integer ids (torch.long or torch.int), got a tensor of dtype torch.uint8"),
        (dict(input_ids=None, inputs_embeds=torch.randn(2, 9, 32, dtype=torch.float64)), TypeError, "`inputs_embeds` must have the model's dtype torch.float32 (or one that converts to it without loss), got torch.float64"),
        (dict(input_ids=torch.full((2, 9), 99)), ValueError, "`input_ids` must be in [0, vocab_size=99), got values from 99 to 99"),
        (dict(input_ids=torch.full((2, 9), -1)), ValueError, "`input_ids` must be in [0, vocab_size=99), got values from -1"),
        (dict(token_type_ids=torch.full((2, 9), 2)), ValueError, "`token_type_ids` must be in [0, type_vocab_size=2), got values from 2"),
        (dict(token_type_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError, "`token_type_ids` must have shape (batch, seq) = (2, 9) (or broadcast to it), got (2, 5)"),
        (dict(position_ids=torch.arange(9)[None] + 60), ValueError, "`position_ids` must be in [0, max_position_embeddings=64)"),
        (dict(position_ids=torch.arange(5)[None]), ValueError, "`position_ids` must have shape (batch, seq) = (2, 9) (or broadcast to it), got (1, 5)"),
        (dict(attention_mask=torch.full((2, 9), 2)), ValueError, "`attention_mask` must hold 1 for real tokens and 0 for padding, got the value 2"),
        (dict(attention_mask=torch.zeros(2, 9).masked_fill(torch.rand(2, 9) < 0.3, float("-inf"))), ValueError, "an additive mask (0 / -inf) is not a padding mask"),
        (dict(input_ids=None, inputs_embeds=torch.randn(2, 9, 16)), ValueError, "`inputs_embeds` must have width 32 (the token embeddings'), got 16"),
        (dict(input_ids=torch.zeros(0, 9, dtype=torch.long)), ValueError, "`input_ids` is empty: (batch, seq) = (0, 9)"),
        (dict(input_ids=[[5, 6, 7]]), TypeError, "`input_ids` must be a torch.Tensor, got list; tokenize with return_tensors='pt'"),
        (dict(input_ids=torch.randint(4, 99, (2, 9)).numpy()), TypeError, "`input_ids` must be a torch.Tensor, got ndarray"),
        (dict(attention_mask=[[1] * 9] * 2), TypeError, "`attention_mask` must be a torch.Tensor, got list"),
    ],
)  # fmt: skip
def test_bad_input_values_raise_naming_the_argument(inputs, error, words):
    model = eval_model(DualRouteModel, max_position_embeddings=64)
    arguments = {"input_ids": torch.randint(4, 99, (2, 9)), **inputs}
    with pytest.raises(error, match=__import__("re").escape(words)):
        model(**arguments)


def test_rotary_position_ids_are_checked_too():
    model = eval_model(DualRouteModel, position_embedding_type="rope", max_position_embeddings=16)
    input_ids = torch.randint(4, 99, (2, 9))
    with pytest.raises(ValueError, match=re.escape("`position_ids` must have shape (batch, seq) = (2, 9)")):
        model(input_ids, position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match=re.escape("`position_ids` must be >= 0, got values from -1 to 7")):
        model(input_ids, position_ids=torch.arange(9)[None] - 1)
    with pytest.raises(TypeError, match=re.escape("`position_ids` must hold integer ids")):
        model(input_ids, position_ids=torch.arange(9.0)[None])
    model(input_ids, position_ids=torch.arange(9)[None] + 100)  # rotary positions have no table to outgrow
    torch.testing.assert_close(  # (seq,) broadcasts over the batch, as with learned positions
        model(input_ids, position_ids=torch.arange(9) + 3).last_hidden_state,
        model(input_ids, position_ids=(torch.arange(9) + 3).expand(2, -1)).last_hidden_state,
    )


@pytest.mark.parametrize("position_embedding_type", ["absolute", "rope"])
def test_inputs_embeds_in_another_dtype(position_embedding_type):
    """A lossless cast (bf16 embeddings into a float32 model) is made; under autocast any cast is made; a lossy one
    outside autocast raises instead of failing inside LayerNorm."""
    model = eval_model(DualRouteModel, position_embedding_type=position_embedding_type)
    embeds = model.get_input_embeddings()(torch.randint(4, 99, (1, 6))).to(torch.bfloat16)
    torch.testing.assert_close(
        model(inputs_embeds=embeds).last_hidden_state, model(inputs_embeds=embeds.float()).last_hidden_state
    )
    half_model = eval_model(DualRouteModel, position_embedding_type=position_embedding_type).to(torch.bfloat16)
    with pytest.raises(TypeError, match="must have the model's dtype torch.bfloat16 .* got torch.float32"):
        half_model(inputs_embeds=embeds.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = half_model(inputs_embeds=embeds.float()).last_hidden_state
    assert out.shape == (1, 6, 32) and out.isfinite().all()


def test_classification_labels_out_of_range_raise_and_leave_the_problem_type_unset():
    model = eval_model(num_labels=3)
    input_ids = torch.randint(4, 99, (2, 6))
    with pytest.raises(
        ValueError, match=re.escape("`labels` must be class ids in [0, num_labels=3) or -100 (ignored), got 7")
    ):
        model(input_ids, labels=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="multi-label classification needs `labels` of shape"):
        model(input_ids, labels=torch.tensor([0.0, 1.0]))  # float labels by mistake: inferred multi-label, rejected
    assert model.config.problem_type is None  # a rejected call does not decide the problem type for later calls
    loss = model(input_ids, labels=torch.tensor([0, 2])).loss
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(model(input_ids, labels=torch.tensor([0, 2], dtype=torch.int32)).loss, loss)


def test_position_and_token_type_ids_that_broadcast_are_accepted():
    model = eval_model(DualRouteModel)
    input_ids = torch.randint(4, 99, (2, 9))
    expected = model(input_ids).last_hidden_state
    for extra in (dict(position_ids=torch.arange(9)), dict(position_ids=torch.arange(9)[None]),
                  dict(token_type_ids=torch.zeros(1, 9, dtype=torch.long))):  # fmt: skip
        torch.testing.assert_close(model(input_ids, **extra).last_hidden_state, expected)


def test_cls_pooling_reads_the_first_real_token_under_left_padding():
    """A left-padded row classifies like the same tokens alone (at full top-k: routing sees the same blocks)."""
    model = eval_model(route_topk=8, classifier_pooling="cls")
    tokens = torch.randint(4, 99, (1, 7))
    alone = model(tokens).logits
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    torch.testing.assert_close(model(padded, attention_mask=mask).logits, alone, atol=1e-5, rtol=1e-5)


def test_a_batch_whose_labels_are_all_ignored_has_zero_loss_not_nan():
    model = eval_model()
    input_ids, attention_mask = random_batch(model.config)
    loss = model(input_ids, attention_mask=attention_mask, labels=torch.full((3,), -100)).loss
    assert loss.item() == 0.0
    counted = model(input_ids, attention_mask=attention_mask, labels=torch.tensor([0, -100, 1])).loss
    logits = model(input_ids, attention_mask=attention_mask).logits
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 1]))
    torch.testing.assert_close(counted, expected)


def test_router_indices_under_dense_attention_raise():
    model = eval_model(DualRouteModel)
    model.set_attn_implementation("sdpa")
    with pytest.raises(
        ValueError, match="router indices come from routing, which runs with attn_implementation='dualroute'"
    ):
        model(torch.randint(4, 99, (1, 9)), output_router_indices=True)


def test_custom_4d_mask_with_dualroute_raises_clearly():
    from modeling_dualroute.attention_dualroute import dualroute_attention_forward

    model = eval_model(DualRouteModel)
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="expects a 2D padding mask"):
        dualroute_attention_forward(model.layers[0].self_attn, q, q, q, torch.zeros(1, 1, 8, 8))


# -- training machinery ------------------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients():
    input_ids, attention_mask = random_batch(tiny_config())
    labels = torch.tensor([0, 1, 1])

    def grads(checkpointing):
        model = eval_model(num_labels=2)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_gradients_reach_every_parameter():
    model = eval_model(num_labels=2)
    input_ids, attention_mask = random_batch(model.config, length=32)
    model(input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 1])).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == ["model.embeddings.token_type_embeddings.weight"] or missing == [], missing


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["absolute", "rope"])
def test_torch_compile_forward_matches_eager(positions):
    model = eval_model(num_labels=2, route_backend="gather", position_embedding_type=positions)
    input_ids, attention_mask = random_batch(model.config, length=24)
    expected = model(input_ids, attention_mask=attention_mask).logits
    compiled = torch.compile(model, fullgraph=True)  # one graph: routing takes no data-dependent Python branch
    torch.testing.assert_close(
        compiled(input_ids, attention_mask=attention_mask).logits, expected, atol=1e-5, rtol=1e-5
    )


def test_half_precision_forward_is_finite():
    model = eval_model(num_labels=2).to(torch.bfloat16)
    input_ids, attention_mask = random_batch(model.config)
    assert torch.isfinite(model(input_ids, attention_mask=attention_mask).logits).all()
