"""DualRouteForConditionalGeneration: routed decoder and cross-attention, sparse cached decoding, generate()."""

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, pipeline

import modeling_dualroute.attention_dualroute as attention_module
from modeling_dualroute import DualRouteForConditionalGeneration, DualRouteText2TextPipeline
from modeling_dualroute.cache_dualroute import DualRouteCacheLayer
from modeling_dualroute.decode_dualroute import block_major_keys
from modeling_dualroute.modeling_dualroute import apply_rotary
from modeling_dualroute.routing_dualroute import block_sums

from helpers import make_tokenizer, random_batch, run_python_without_package, tiny_seq2seq_config


def make_model(**overrides):
    torch.manual_seed(0)
    options = dict(initializer_range=0.3)  # large weights: the tiny model generates varied tokens
    options.update(overrides)
    return DualRouteForConditionalGeneration(tiny_seq2seq_config(**options)).eval()


# RoPE models route on the keys before the rotation: their cache layers keep those routing keys as well
POSITIONS = ["absolute", "rope"]


def source(model, length=23):
    return random_batch(model.config, batch=2, length=length)


def test_forward_shapes_loss_and_routing_outputs():
    model = make_model()
    input_ids, attention_mask = source(model)
    labels = torch.randint(4, 99, (2, 7))
    labels[1, 5:] = -100
    out = model(input_ids, attention_mask=attention_mask, labels=labels, output_router_indices=True)
    assert out.logits.shape == (2, 7, 99)
    manual = torch.nn.functional.cross_entropy(out.logits.view(-1, 99), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    assert [r.shape for r in out.encoder_router_indices] == [(2, 4, 6, 2)] * 2  # per query block
    assert [r.shape for r in out.decoder_router_indices] == [(2, 4, 7, 2)] * 2  # per decoder token
    assert [r.shape for r in out.cross_router_indices] == [(2, 4, 7, 2)] * 2  # per decoder token, encoder blocks


def test_labels_are_shifted_behind_the_start_token():
    model = make_model()
    labels = torch.tensor([[10, 11, -100]])
    assert model.prepare_decoder_input_ids_from_labels(labels).tolist() == [[2, 10, 11]]


def test_decoder_is_causal():
    model = make_model()
    input_ids, attention_mask = source(model)
    decoder = torch.randint(4, 99, (2, 12))
    logits = model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder).logits
    changed = decoder.clone()
    changed[:, 7:] = torch.randint(4, 99, (2, 5))
    logits2 = model(input_ids, attention_mask=attention_mask, decoder_input_ids=changed).logits
    torch.testing.assert_close(logits2[:, :7], logits[:, :7], atol=1e-5, rtol=1e-5)
    assert (logits2[:, 7:] - logits[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("positions", POSITIONS)
def test_cached_step_by_step_logits_equal_one_full_forward(positions):
    model = make_model(position_embedding_type=positions)
    input_ids, attention_mask = source(model)
    decoder = torch.randint(4, 99, (2, 19))  # 19 tokens: the decoder's last block is open
    full = model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder).logits
    encoder_outputs = model.get_encoder()(input_ids, attention_mask=attention_mask)
    cache, steps = None, []
    for t in range(decoder.shape[1]):
        out = model(
            encoder_outputs=encoder_outputs,
            attention_mask=attention_mask,
            decoder_input_ids=decoder[:, t : t + 1],
            cache=cache,
            use_cache=True,
        )
        cache, steps = out.cache, steps + [out.logits]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert isinstance(cache.self_attention_cache.layers[0], DualRouteCacheLayer)
    assert isinstance(cache.cross_attention_cache.layers[0], DualRouteCacheLayer)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("options", [dict(do_sample=False), dict(num_beams=3, do_sample=False)])
def test_generate_with_and_without_cache_gives_the_same_sequences(options, positions):
    model = make_model(position_embedding_type=positions)
    input_ids, attention_mask = source(model)
    # no token twice: a tiny RoPE model would otherwise repeat one token, whose unrotated keys all tie in routing
    common = dict(max_new_tokens=18, min_new_tokens=18, no_repeat_ngram_size=1, **options)
    cached = model.generate(input_ids, attention_mask=attention_mask, **common)
    uncached = model.generate(input_ids, attention_mask=attention_mask, use_cache=False, **common)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0].tolist())) == cached.shape[1]


def test_sampling_and_num_return_sequences():
    model = make_model()
    input_ids, attention_mask = source(model)
    torch.manual_seed(1)
    out = model.generate(
        input_ids, attention_mask=attention_mask, do_sample=True, num_return_sequences=3, max_new_tokens=8
    )
    assert out.shape[0] == 6


def assert_descriptors_match_keys(layer: DualRouteCacheLayer, model=None):
    """Descriptors equal those recomputed from the cached keys (RoPE: from the routing keys, which must rotate into
    the cached keys at positions 0, 1, ...)."""
    averaged = layer.keys
    if layer.routing_keys is not None:
        averaged = layer.routing_keys
        positions = torch.arange(layer.keys.shape[2])[None].expand(layer.keys.shape[0], -1)
        rotated = apply_rotary(averaged, *model.decoder.rotary(positions, averaged.dtype))
        torch.testing.assert_close(rotated, layer.keys, atol=1e-5, rtol=1e-5)
    block_size = model.config.route_block_size if model is not None else 4  # the direct cache tests use 4
    means, counts = layer.key_descriptors(block_size)  # brings out-of-date blocks up to date, and only those
    expected_sums, expected_counts = block_sums(averaged, block_size, layer.key_mask)
    torch.testing.assert_close(layer.block_sums, expected_sums, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(means * counts.clamp(min=1)[:, None, :, None], expected_sums, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", POSITIONS)
def test_descriptors_follow_beam_reordering_crop_and_batch_selection(positions):
    model = make_model(position_embedding_type=positions)
    input_ids, attention_mask = source(model)
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        num_beams=3,
        max_new_tokens=14,
        min_new_tokens=14,
        return_dict_in_generate=True,
    )
    cache = out.cache
    for layer in cache.self_attention_cache.layers + cache.cross_attention_cache.layers:
        assert layer.block_sums is not None
        assert_descriptors_match_keys(layer, model)
    assert all(
        (layer.routing_keys is not None) == (positions == "rope") for layer in cache.self_attention_cache.layers
    )
    # the cross-attention descriptors cover the padded encoder keys with their mask
    cross = cache.cross_attention_cache.layers[0]
    assert cross.key_mask.shape == (6, 23) and cross.block_counts[-1].tolist() == [4, 4, 4, 4, 4, 0]  # 20 real tokens
    length = cache.self_attention_cache.layers[0].keys.shape[2]
    cache.crop(-5)
    cache.batch_select_indices(torch.tensor([0, 2, 5]))
    cache.batch_repeat_interleave(2)
    cache.reorder_cache(torch.tensor([5, 4, 3, 2, 1, 0]))
    for layer in cache.self_attention_cache.layers + cache.cross_attention_cache.layers:
        assert layer.keys.shape[0] == 6
        assert_descriptors_match_keys(layer, model)
    assert cache.self_attention_cache.layers[0].keys.shape[2] == length - 5


def test_beam_search_does_not_copy_the_encoder_keys_it_would_only_swap(monkeypatch):
    """Cross-attention keys are the same for every beam of an input; reordering beams leaves them where they are."""
    from transformers.cache_utils import DynamicLayer

    copied = []
    original = DynamicLayer.reorder_cache
    monkeypatch.setattr(
        DynamicLayer,
        "reorder_cache",
        lambda layer, beam_idx: copied.append(layer.write_once) or original(layer, beam_idx),
    )
    model = make_model()
    input_ids, attention_mask = source(model)
    model.generate(input_ids, attention_mask=attention_mask, num_beams=3, max_new_tokens=6, min_new_tokens=6)
    assert copied and not any(copied)  # only self-attention caches were reordered


def test_write_once_layer_skips_only_reorders_between_identical_rows():
    layer = DualRouteCacheLayer()
    keys = torch.randn(2, 2, 10, 4).repeat_interleave(2, dim=0)  # rows 0 = 1 and 2 = 3, like 2 inputs x 2 beams
    values = torch.randn(2, 2, 10, 4).repeat_interleave(2, dim=0)
    layer.update(keys, values, write_once=True)
    layer.key_descriptors(4)  # descriptors exist before the reorders, which must carry them along
    assert layer.block_major_keys(4) is layer.block_major_keys(4)  # computed once; reorders must carry it too
    stored = layer.keys
    layer.reorder_cache(torch.tensor([1, 0, 3, 2]))
    assert layer.keys is stored  # nothing moved
    layer.reorder_cache(torch.tensor([2, 2, 0, 1]))  # rows really change: carried out in full
    assert torch.equal(layer.keys, keys[[2, 2, 0, 1]]) and torch.equal(layer.values, values[[2, 2, 0, 1]])
    assert_descriptors_match_keys(layer)
    stored = layer.keys
    layer.reorder_cache(torch.tensor([1, 0, 3, 2]))  # identical rows after the move: skipped again
    assert layer.keys is stored
    layer.reorder_cache(torch.tensor([0, 0, 0, 3]))
    assert torch.equal(layer.keys, keys[[2, 2, 2, 1]])
    assert_descriptors_match_keys(layer)
    assert torch.equal(layer.block_major_keys(4), block_major_keys(layer.keys, 4))
    layer.update(keys, values)  # new keys: the block-major copy is recomputed
    assert torch.equal(layer.block_major_keys(4), block_major_keys(layer.keys, 4))


def test_block_major_keys_are_dropped_or_moved_with_the_keys():
    """Whatever changes a layer's keys drops its block-major copy (recomputed when next asked for) or applies the same
    change to it: update, crop, reset; offload and prefetch move it with the keys."""
    layer = DualRouteCacheLayer()
    keys, values = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)
    layer.update(keys, values, write_once=True)
    layer.block_major_keys(4)
    layer.offload()
    assert layer.key_blocks.device.type == "cpu"
    layer.prefetch()
    assert torch.equal(layer.block_major_keys(4), block_major_keys(layer.keys, 4))
    layer.update(keys[:, :, :3], values[:, :, :3])  # appended: no longer write-once
    assert layer.key_blocks is None and not layer.write_once
    assert torch.equal(layer.block_major_keys(4), block_major_keys(layer.keys, 4))
    layer.crop(-5)
    assert layer.key_blocks is None
    assert layer.block_major_keys(4).shape == (2, 2, 2, 4, 4)  # 8 keys left: two blocks
    layer.reset()
    assert layer.key_blocks is None


def test_descriptors_are_computed_only_for_calls_that_route():
    """While the decoder holds at most top_k (2) blocks its self-attention is dense: its cache computes no
    descriptors. The encoder's 6 blocks are routed from the first step."""
    model = make_model()
    input_ids, attention_mask = source(model)
    out = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True
    )
    assert all(layer.block_sums is None for layer in out.cache.self_attention_cache.layers)  # 7 keys: 2 blocks
    assert all(layer.block_sums is not None for layer in out.cache.cross_attention_cache.layers)


def test_a_broken_reorder_is_caught():
    """The descriptor check above can fail: descriptors not reordered with the keys no longer match them."""
    model = make_model()
    input_ids, attention_mask = source(model)
    out = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=12, min_new_tokens=12, return_dict_in_generate=True
    )
    layer = out.cache.self_attention_cache.layers[0]
    assert layer.block_sums is not None  # 3 blocks > top_k: decoding routed, with the cache's descriptors
    layer.keys = layer.keys.flip(0)  # keys reordered, descriptors not
    with pytest.raises(AssertionError):
        assert_descriptors_match_keys(layer)


def test_decoding_reads_only_the_selected_blocks(monkeypatch):
    """Each decode step gathers k blocks (k * B keys) for self- and cross-attention, not the whole sequence."""
    model = make_model(
        route_block_size=16, route_topk=3, max_position_embeddings=1024, decoder_max_position_embeddings=512
    )
    input_ids = torch.randint(4, 99, (1, 800))
    calls = []
    original = attention_module.decode_attention

    def spy(query, key, value, plan, **kwargs):
        calls.append((query.shape[2], key.shape[2], plan.shape[-1]))
        return original(query, key, value, plan, **kwargs)

    original_dense = attention_module.dense_attention

    def no_dense(query, key, value, mask, **kwargs):
        if key.shape[2] > 3 * 16:  # more keys than top-k blocks hold: routing should have gathered them
            raise AssertionError(f"dense attention over {key.shape[2]} keys during decoding")
        return original_dense(query, key, value, mask, **kwargs)

    monkeypatch.setattr(attention_module, "decode_attention", spy)
    monkeypatch.setattr(attention_module, "AUTO_DENSE_MAX_KEYS", 32)  # route the decoder's self-attention early
    model.generate(input_ids, max_new_tokens=3, min_new_tokens=3)  # warm-up
    calls.clear()
    monkeypatch.setattr(attention_module, "dense_attention", no_dense)
    out = model.generate(input_ids, max_new_tokens=80, min_new_tokens=80, return_dict_in_generate=True)
    decode_calls = [c for c in calls if c[0] == 1]
    cross = [c for c in decode_calls if c[1] == 800]
    self_attention = [c for c in decode_calls if c[1] != 800]
    assert len(cross) == 2 * 80  # 2 layers, every step
    assert len(self_attention) == 2 * (80 - 48)  # from the step where the keys outgrow the 3 blocks
    assert all(slots == 3 for _, _, slots in cross + self_attention)
    assert out.sequences.shape[1] == 81


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_cross_attention_reads_block_major_keys(monkeypatch, num_beams):
    """Every routed cross-attention step of `generate` reads the cache's block-major keys in place, which follow beam
    reordering and batch selection like the keys; the logits equal one full forward pass, which builds none."""
    import modeling_dualroute.decode_dualroute as decode

    calls = []
    original = decode._attend_block_major
    monkeypatch.setattr(decode, "_attend_block_major", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setattr(attention_module, "AUTO_DENSE_MAX_KEYS", 0)  # 23 encoder keys: gather, not masked dense
    model = make_model()
    input_ids, attention_mask = source(model)  # padded: the steps mask the padding they read
    options = dict(max_new_tokens=5, min_new_tokens=5, num_beams=num_beams, return_dict_in_generate=True)
    out = model.generate(input_ids, attention_mask=attention_mask, output_logits=True, **options)
    assert len(calls) == model.config.decoder_layers * 5
    cache = out.cache
    block_size = model.config.route_block_size
    for operation in (
        lambda: None,
        lambda: cache.reorder_cache(torch.arange(2 * num_beams).flip(0)),
        lambda: cache.batch_select_indices(torch.tensor([0, 1])),
        lambda: cache.batch_repeat_interleave(2),
    ):
        operation()
        for layer in cache.cross_attention_cache.layers:
            assert torch.equal(layer.key_blocks, block_major_keys(layer.keys, block_size))
    if num_beams == 1:
        calls.clear()
        with torch.no_grad():
            logits = model(input_ids, attention_mask=attention_mask, decoder_input_ids=out.sequences[:, :-1]).logits
        assert not calls
        torch.testing.assert_close(torch.stack(out.logits, dim=1), logits, atol=1e-4, rtol=1e-4)
    uncached = model.generate(input_ids, attention_mask=attention_mask, use_cache=False, **options)
    assert torch.equal(out.sequences, uncached.sequences)


def test_layers_that_run_dense_route_only_when_router_indices_are_requested(monkeypatch):
    """Decoder self-attention over fewer blocks than top-k runs dense; its plan ("every block") is built only when the
    caller asks for router indices."""
    model = make_model()
    input_ids, attention_mask = source(model)
    decoder = torch.randint(4, 99, (2, 5))  # 5 decoder tokens: one block, fewer than top-k
    routed_lengths = []
    original = attention_module._route_checked
    monkeypatch.setattr(
        attention_module,
        "_route_checked",
        lambda q, k, **kw: routed_lengths.append(k.shape[2]) or original(q, k, **kw),
    )
    model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder)
    assert 5 not in routed_lengths  # no routing for the dense decoder self-attention
    routed_lengths.clear()
    out = model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder, output_router_indices=True)
    assert 5 in routed_lengths and all(plan is not None for plan in out.decoder_router_indices)


def test_full_top_k_equals_the_dense_twin():
    routed = make_model(route_topk=16)
    input_ids, attention_mask = source(routed)
    decoder = torch.randint(4, 99, (2, 9))
    expected_model = make_model(route_topk=16)
    expected_model.set_attn_implementation("sdpa")
    expected = expected_model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder).logits
    actual = routed(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(
        routed.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10),
        expected_model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10),
    )


def test_tied_embeddings_and_save_load(tmp_path):
    model = make_model()
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.word_embeddings.weight.data_ptr()
    assert (
        model.decoder.embeddings.word_embeddings.weight.data_ptr()
        == model.model.embeddings.word_embeddings.weight.data_ptr()
    )
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embeddings.word_embeddings.weight.data_ptr()
    input_ids, attention_mask = source(model)
    assert torch.equal(
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6),
        loaded.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6),
    )
    model.resize_token_embeddings(110)
    assert model.final_logits_bias.shape == (1, 110) and model.lm_head.weight.shape == (110, 32)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="needs an encoder-decoder config"):
        DualRouteForConditionalGeneration(tiny_seq2seq_config(is_encoder_decoder=False))
    model = make_model(decoder_max_position_embeddings=16)
    input_ids, attention_mask = source(model)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(batch, target_len\) = \(2, 5\)"):
        model(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=torch.ones(2, 5, dtype=torch.long),
            labels=torch.ones(2, 4, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="decoder length 20 exceeds decoder_max_position_embeddings=16"):
        model(input_ids, attention_mask=attention_mask, decoder_input_ids=torch.ones(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`decoder_attention_mask` must have shape"):
        model(input_ids, decoder_input_ids=torch.ones(2, 5, dtype=torch.long), decoder_attention_mask=torch.ones(2, 4))
    additive = torch.zeros(2, 5).masked_fill(torch.tensor([False] * 4 + [True]), float("-inf"))
    for implementation in ("dualroute", "sdpa"):  # the dense twin takes the same checks
        model.set_attn_implementation(implementation)
        with pytest.raises(
            ValueError,
            match="`decoder_attention_mask` must hold 1 for real tokens and 0 for padding, got the value -inf",
        ):
            model(input_ids, decoder_input_ids=torch.ones(2, 5, dtype=torch.long), decoder_attention_mask=additive)
        with pytest.raises(
            ValueError, match=r"the decoder inputs .* have batch size 1 but the encoder output .* has 2"
        ):
            model(input_ids, attention_mask=attention_mask, labels=torch.ones(1, 5, dtype=torch.long))
    model.set_attn_implementation("dualroute")
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported by DualRoute"):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=2, cache_implementation="static")
    # the mask describes the encoder's tokens, also when the encoder ran before (encoder_outputs)
    encoder_outputs = model.get_encoder()(input_ids, attention_mask=attention_mask)
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \(batch, seq\) = \(2, 23\), got \(5, 3\)"):
        model(
            encoder_outputs=encoder_outputs,
            attention_mask=torch.ones(5, 3),
            decoder_input_ids=torch.ones(2, 5, dtype=torch.long),
        )


def test_bad_decoder_inputs_name_the_decoder_argument():
    model = make_model()
    input_ids, attention_mask = source(model)
    with pytest.raises(ValueError, match=r"`decoder_input_ids` must be in \[0, vocab_size=99\), got values from 500"):
        model(input_ids, attention_mask=attention_mask, decoder_input_ids=torch.full((2, 4), 500))
    labels = torch.randint(4, 99, (2, 4))
    labels[0, 1] = -1
    with pytest.raises(
        ValueError, match=r"`labels` must be token ids in \[0, vocab_size=99\) or -100 \(ignored\), got -1"
    ):
        model(input_ids, attention_mask=attention_mask, labels=labels)
    labels[0, 1] = 5
    torch.testing.assert_close(  # int32 labels (cross-entropy takes long targets)
        model(input_ids, attention_mask=attention_mask, labels=labels.int()).loss,
        model(input_ids, attention_mask=attention_mask, labels=labels).loss,
    )
    with pytest.raises(ValueError, match=r"`decoder_inputs_embeds` must have width 32"):
        model(input_ids, attention_mask=attention_mask, decoder_inputs_embeds=torch.randn(2, 4, 16))


def test_a_batch_whose_labels_are_all_ignored_has_zero_loss_not_nan():
    model = make_model()
    input_ids, attention_mask = source(model)
    loss = model(input_ids, attention_mask=attention_mask, labels=torch.full((2, 5), -100)).loss
    assert loss.item() == 0.0
    labels = torch.randint(4, 99, (2, 5))
    labels[1, 2:] = -100
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits.view(-1, 99), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_seq2seq_pipeline(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    generate = pipeline("dualroute-text2text", model=str(tmp_path), trust_remote_code=True)
    results = generate(["good film about a king", "the river"], max_new_tokens=5)
    # a list of texts with one sequence each: one dict per text, as in transformers 4's text2text pipeline
    assert len(results) == 2 and all(isinstance(r["generated_text"], str) for r in results)
    tokenizer = make_tokenizer()
    expected = model.generate(**tokenizer("the river", return_tensors="pt").to(torch.device("cpu")), max_new_tokens=5)
    assert results[1]["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)
    several = generate(["good film", "the river"], max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert [len(r) for r in several] == [2, 2]  # several sequences per text: a list per text
    assert len(generate("the river", max_new_tokens=3, num_beams=2, num_return_sequences=2)) == 2
    # as in transformers 4's text2text pipeline, `max_length` limits the output; `max_input_length` truncates the input
    calls = []
    original = generate.model.generate
    generate.model.generate = lambda **kwargs: calls.append(kwargs) or original(**kwargs)
    long_text = " ".join(["the river runs past the king"] * 6)
    generate(long_text, max_length=4)
    generate(long_text, max_input_length=8, max_new_tokens=2)
    assert calls[0]["max_length"] == 4 and calls[0]["input_ids"].shape[1] == len(tokenizer(long_text)["input_ids"])
    assert calls[1]["input_ids"].shape[1] == 8 and "max_input_length" not in calls[1]
    # installed use: the package's pipeline class, no remote code
    installed = pipeline("dualroute-text2text", model=str(tmp_path), pipeline_class=DualRouteText2TextPipeline)
    assert installed("the river", max_new_tokens=5) == [results[1]]


@pytest.mark.slow
def test_remote_code_generate_and_pipeline_without_the_package(tmp_path):
    model = make_model()
    folder = tmp_path / "seq2seq"
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    input_ids, attention_mask = source(model)
    expected = model.generate(input_ids, attention_mask=attention_mask, num_beams=2, max_new_tokens=8)
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask, "expected": expected}, tmp_path / "io.pt")
    out = run_python_without_package(
        f"""
        import torch
        from transformers import AutoModelForSeq2SeqLM, pipeline
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModelForSeq2SeqLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules")
        out = model.generate(io["input_ids"], attention_mask=io["attention_mask"], num_beams=2, max_new_tokens=8, return_dict_in_generate=True)
        assert torch.equal(out.sequences, io["expected"])
        assert type(out.cache.self_attention_cache.layers[0]).__name__ == "DualRouteCacheLayer"
        generate = pipeline("dualroute-text2text", model={str(folder)!r}, trust_remote_code=True)
        print("PIPELINE", generate("the river", max_new_tokens=4))
        print("OK")
        """,
        tmp_path,
    )
    assert "OK" in out and "PIPELINE" in out


def copy_task(n, seed, tokenizer):
    """Output the first three words of the input: learnable by a tiny model in a few hundred steps."""
    import random

    from helpers import WORDS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:40]) for _ in range(rng.randrange(6, 14))]
        rows.append(
            {
                "input_ids": tokenizer(" ".join(words))["input_ids"],
                "labels": tokenizer(" ".join(words[:3]))["input_ids"][1:],
            }
        )
    return rows


@pytest.mark.slow
def test_seq2seq_trainer_with_predict_with_generate(tmp_path):
    import numpy as np
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = DualRouteForConditionalGeneration(
        tiny_seq2seq_config(hidden_size=64, num_attention_heads=4, intermediate_size=128, route_topk=3, eos_token_id=3)
    )
    model.generation_config.max_new_tokens = 6
    train, evaluation = copy_task(384, 0, tokenizer), copy_task(32, 1, tokenizer)

    def exact_match(prediction):
        predictions, labels = prediction
        labels = np.where(labels == -100, tokenizer.pad_token_id, labels)
        decoded = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        expected = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {"exact_match": float(np.mean([p.strip() == e.strip() for p, e in zip(decoded, expected)]))}

    trainer = Seq2SeqTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            num_train_epochs=12,
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            predict_with_generate=True,
            disable_tqdm=True,
            logging_steps=10,
            seed=0,
        ),  # fmt: skip
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=exact_match,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.3 * losses[0], losses
    metrics = trainer.evaluate()
    assert metrics["eval_exact_match"] >= 0.8, metrics


def test_seq2seq_gradient_accumulation_matches_one_batch():
    """The loss honours num_items_in_batch: accumulated micro-batch gradients equal the large batch's."""
    from transformers import DataCollatorForSeq2Seq

    tokenizer = make_tokenizer()
    rows = copy_task(8, 3, tokenizer)
    model = make_model(initializer_range=0.02)
    collate = DataCollatorForSeq2Seq(tokenizer, model=model)
    whole = collate(rows)
    items = (whole["labels"] != -100).sum()
    model(**whole, num_items_in_batch=items).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for half in (rows[:4], rows[4:]):
        model(**collate(half), num_items_in_batch=items).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-4, msg=name)
