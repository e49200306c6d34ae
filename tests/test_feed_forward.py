"""The chunked feed-forward block (activation recomputed in the backward pass) and the chunked inference paths (the
block alone; an encoder layer's post-attention steps) against the plain module calls."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.activations import ACT2FN

from modeling_dualroute import DualRouteForConditionalGeneration, DualRouteModel
from modeling_dualroute import modeling_dualroute as modeling
from modeling_dualroute.feed_forward_dualroute import (
    CHUNK_ROWS,
    _ChunkedFeedForward,
    can_chunk,
    can_chunk_inference,
    can_norm_then_feed_forward,
    can_run_post_attention_inference,
    feed_forward,
    feed_forward_inference,
    norm_then_feed_forward,
    post_attention_inference,
)
from modeling_dualroute.linear_dualroute import DualRouteLinear

from helpers import tiny_config, tiny_seq2seq_config


# the shapes, chunk sizes and activations both chunked paths are checked over
BLOCK_CASES = dict(
    batch=st.integers(1, 3),
    seq=st.integers(1, 40),
    chunk_rows=st.integers(1, 50),
    activation=st.sampled_from(["gelu", "relu", "silu", "gelu_new", "quick_gelu"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)


def make_block(hidden, intermediate, bias, dtype=torch.float64):
    fc1, fc2 = nn.Linear(hidden, intermediate, bias=bias), nn.Linear(intermediate, hidden, bias=bias)
    return fc1.to(dtype), fc2.to(dtype)


def plain_and_chunked(x, fc1, fc2, activation, chunk_rows, grad_out):
    """Outputs and gradients (x, then every parameter) of the plain module calls and of `feed_forward`."""
    results = []
    for chunked in (False, True):
        for p in (*fc1.parameters(), *fc2.parameters()):
            p.grad = None
        leaf = x.detach().requires_grad_(x.requires_grad)
        out = feed_forward(leaf, fc1, fc2, activation, chunk_rows) if chunked else fc2(activation(fc1(leaf)))
        out.backward(grad_out)
        grads = [leaf.grad] + [p.grad for p in (*fc1.parameters(), *fc2.parameters())]
        results.append((out.detach(), grads))
    return results


@given(**BLOCK_CASES)
def test_chunked_feed_forward_equals_plain_forward_and_backward(batch, seq, chunk_rows, activation, bias, seed):
    torch.manual_seed(seed)
    fc1, fc2 = make_block(8, 24, bias)
    x = torch.randn(batch, seq, 8, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(batch, seq, 8, dtype=torch.float64)
    (plain_out, plain_grads), (out, grads) = plain_and_chunked(x, fc1, fc2, ACT2FN[activation], chunk_rows, grad_out)
    torch.testing.assert_close(out, plain_out)
    for got, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_only_the_gradients_asked_for_are_computed():
    fc1, fc2 = make_block(8, 24, bias=True)
    fc1.requires_grad_(False)  # a frozen first layer, an input without gradient
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    grad_out = torch.randn(2, 5, 8, dtype=torch.float64)
    (plain_out, plain_grads), (out, grads) = plain_and_chunked(x, fc1, fc2, ACT2FN["gelu"], 3, grad_out)
    torch.testing.assert_close(out, plain_out)
    assert grads[:3] == [None, None, None]
    for got, expected in zip(grads[3:], plain_grads[3:], strict=True):
        torch.testing.assert_close(got, expected)


def test_gradcheck():
    """Numerical against analytic gradients for every input: x, both weights and both biases, rows in 4 chunks."""
    fc1, fc2 = make_block(3, 5, bias=True)
    inputs = [torch.randn(7, 3, dtype=torch.float64)] + [
        p.detach() for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    ]
    inputs = [t.clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *args: _ChunkedFeedForward.apply(*args, ACT2FN["gelu"], 2), inputs)


def test_plain_calls_where_chunking_would_skip_something():
    fc1, fc2 = make_block(8, 24, bias=True, dtype=torch.float32)
    gelu = ACT2FN["gelu"]  # a module
    x = torch.randn(2, 5, 8, requires_grad=True)
    assert can_chunk(x, fc1, fc2, gelu)
    with torch.no_grad():
        assert not can_chunk(x, fc1, fc2, gelu)  # no autograd: `can_chunk_inference` decides
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not can_chunk(x, fc1, fc2, gelu)

    class Adapter(nn.Linear):  # e.g. a LoRA layer: its own forward must run
        pass

    assert not can_chunk(x, fc1, Adapter(24, 8), gelu)
    assert can_chunk(x, DualRouteLinear(8, 24), DualRouteLinear(24, 8), gelu)  # the model's own layers
    handle = fc2.register_forward_hook(lambda *args: None)
    assert not can_chunk(x, fc1, fc2, gelu)
    handle.remove()
    for register in (fc1.register_full_backward_hook, fc2.register_full_backward_pre_hook, gelu.register_forward_hook):
        handle = register(lambda *args: None)
        assert not can_chunk(x, fc1, fc2, gelu)  # a hook on either layer or on the activation must see its calls
        handle.remove()
    global_hooks = nn.modules.module
    for register in (global_hooks.register_module_forward_pre_hook, global_hooks.register_module_full_backward_hook):
        handle = register(lambda *args: None)
        assert not can_chunk(x, fc1, fc2, gelu)
        handle.remove()
    assert can_chunk(x, fc1, fc2, gelu)
    meta = [nn.Linear(8, 24, device="meta"), nn.Linear(24, 8, device="meta")]
    assert can_chunk(torch.empty(2, 8, device="meta", requires_grad=True), *meta, gelu)  # autocast knows no meta
    fc1.requires_grad_(False), fc2.requires_grad_(False)
    assert not can_chunk(x.detach(), fc1, fc2, gelu)  # nothing needs a gradient


def test_model_gradients_equal_the_plain_feed_forward(monkeypatch):
    config = tiny_config(num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = DualRouteModel(config).double().train()
    input_ids = torch.randint(5, config.vocab_size, (2, 48))

    def gradients():
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids).last_hidden_state.pow(2).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    calls = []
    spy = lambda *args: calls.append(1) or norm_then_feed_forward(*args)  # noqa: E731
    monkeypatch.setattr(modeling, "norm_then_feed_forward", spy)
    chunked = gradients()
    assert len(calls) == 2  # one per layer
    monkeypatch.setattr(modeling, "can_norm_then_feed_forward", lambda *args: False)
    calls.clear()
    monkeypatch.setattr(modeling, "feed_forward", lambda *args: calls.append(1) or feed_forward(*args))
    only_the_block = gradients()  # the feed-forward block alone chunked, the norm a module call
    assert len(calls) == 2
    monkeypatch.setattr(modeling, "can_chunk", lambda *args: False)
    plain = gradients()
    for name in plain:
        torch.testing.assert_close(only_the_block[name], plain[name], msg=name)
    assert chunked.keys() == plain.keys() and any(".mlp.fc1." in name for name in chunked)
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], msg=name)


def test_seq2seq_training_runs_every_layer_norm_then_feed_forward_with_equal_gradients(monkeypatch):
    config = tiny_seq2seq_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = DualRouteForConditionalGeneration(config).double().train()
    input_ids, labels = torch.randint(5, config.vocab_size, (2, 40)), torch.randint(5, config.vocab_size, (2, 9))

    def gradients():
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    calls = []
    spy = lambda *args: calls.append(1) or norm_then_feed_forward(*args)  # noqa: E731
    monkeypatch.setattr(modeling, "norm_then_feed_forward", spy)
    fused = gradients()
    assert len(calls) == config.num_hidden_layers + config.decoder_layers
    monkeypatch.setattr(modeling, "can_norm_then_feed_forward", lambda *args: False)
    plain = gradients()
    assert fused.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], msg=name)


def test_activation_dropout_takes_the_plain_path(monkeypatch):
    config = tiny_config(num_hidden_layers=1, activation_dropout=0.5)
    model = DualRouteModel(config).train()
    called = []
    monkeypatch.setattr(modeling, "feed_forward", lambda *args: called.append(1))
    monkeypatch.setattr(modeling, "norm_then_feed_forward", lambda *args: called.append(1))
    model(input_ids=torch.randint(5, config.vocab_size, (1, 16))).last_hidden_state.sum().backward()
    assert not called  # dropout between the two layers cannot be recomputed


@given(**BLOCK_CASES)
def test_inference_feed_forward_equals_plain_calls(batch, seq, chunk_rows, activation, bias, seed):
    torch.manual_seed(seed)
    fc1, fc2 = make_block(8, 24, bias)
    x = torch.randn(batch, seq, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = fc2(ACT2FN[activation](fc1(x)))
        out = feed_forward_inference(x, fc1, fc2, ACT2FN[activation], chunk_rows)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def test_inference_chunks_only_long_plain_inputs_without_autograd():
    fc1, fc2 = make_block(8, 24, bias=True, dtype=torch.float32)
    gelu = ACT2FN["gelu"]
    long, short = torch.randn(2, CHUNK_ROWS // 2 + 1, 8), torch.randn(2, CHUNK_ROWS // 2, 8)
    with torch.no_grad():
        assert can_chunk_inference(long, fc1, fc2, gelu)
        assert not can_chunk_inference(short, fc1, fc2, gelu)  # one chunk: nothing to gain
        assert not can_chunk_inference(long.double(), fc1, fc2, gelu)  # the plain call raises its own dtype error
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not can_chunk_inference(long, fc1, fc2, gelu)
        handle = gelu.register_forward_hook(lambda *args: None)
        assert not can_chunk_inference(long, fc1, fc2, gelu)
        handle.remove()
        meta = [nn.Linear(8, 24, device="meta"), nn.Linear(24, 8, device="meta")]
        assert not can_chunk_inference(long.to("meta"), *meta, gelu)  # CPU only: measured there
    assert not can_chunk_inference(long, fc1, fc2, gelu)  # autograd records: the training path's business
    assert can_chunk_inference(long, fc1.requires_grad_(False), fc2.requires_grad_(False), gelu)  # nothing to record


def make_norm(width, affine, bias, dtype=torch.float64):
    norm = nn.LayerNorm(width, eps=1e-5, elementwise_affine=affine, bias=bias).to(dtype)
    for p in norm.parameters():
        nn.init.normal_(p)  # not the identity: a swapped or skipped norm shows
    return norm


@given(**BLOCK_CASES, affine=st.booleans(), norm_bias=st.booleans())
def test_post_attention_inference_equals_the_module_calls(
    batch, seq, chunk_rows, activation, bias, seed, affine, norm_bias
):
    torch.manual_seed(seed)
    fc1, fc2 = make_block(8, 24, bias)
    attention_norm, final_norm = make_norm(8, affine, norm_bias), make_norm(8, affine, norm_bias)
    attended, residual = torch.randn(2, batch, seq, 8, dtype=torch.float64)
    act = ACT2FN[activation]
    with torch.no_grad():
        normed = attention_norm(residual + attended)
        expected = final_norm(normed + fc2(act(fc1(normed))))
        out = post_attention_inference(attended, residual, attention_norm, fc1, fc2, act, final_norm, chunk_rows)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def test_post_attention_inference_only_where_it_skips_nothing():
    config = tiny_config(num_hidden_layers=1)
    ffn = modeling.DualRouteFeedForward(config, config.intermediate_size).requires_grad_(False)
    attention_norm, final_norm = (nn.LayerNorm(config.hidden_size).requires_grad_(False) for _ in range(2))
    attended, residual = torch.randn(2, 2, CHUNK_ROWS // 2 + 1, config.hidden_size)
    with torch.no_grad():
        assert can_run_post_attention_inference(attended, residual, attention_norm, ffn, final_norm)
        assert not can_run_post_attention_inference(
            attended[:, :-1], residual[:, :-1], attention_norm, ffn, final_norm
        )
        assert not can_run_post_attention_inference(attended, residual[:1], attention_norm, ffn, final_norm)
        assert not can_run_post_attention_inference(attended, residual.double(), attention_norm, ffn, final_norm)
        rms = nn.RMSNorm(config.hidden_size)  # another norm: its own module call
        assert not can_run_post_attention_inference(attended, residual, rms, ffn, final_norm)
        half_norm = copy.deepcopy(final_norm).to(torch.bfloat16)
        assert not can_run_post_attention_inference(attended, residual, attention_norm, ffn, half_norm)
        for module in (attention_norm, ffn, final_norm, ffn.fc1):  # the calls it skips must not be watched
            handle = module.register_forward_hook(lambda *args: None)
            assert not can_run_post_attention_inference(attended, residual, attention_norm, ffn, final_norm)
            handle.remove()
    assert can_run_post_attention_inference(attended, residual, attention_norm, ffn, final_norm)  # nothing to record
    attention_norm.requires_grad_(True)
    assert not can_run_post_attention_inference(attended, residual, attention_norm, ffn, final_norm)
    assert not can_run_post_attention_inference(attended, residual.requires_grad_(), final_norm, ffn, final_norm)


@given(**BLOCK_CASES, affine=st.booleans(), norm_bias=st.booleans(), used=st.sampled_from(["both", "block", "norm"]))
def test_norm_then_feed_forward_equals_the_module_calls(
    batch, seq, chunk_rows, activation, bias, seed, affine, norm_bias, used
):
    """Outputs and every gradient, with the loss reaching both outputs or only one of them."""
    torch.manual_seed(seed)
    fc1, fc2 = make_block(8, 24, bias)
    norm = make_norm(8, affine, norm_bias)
    act = ACT2FN[activation]
    s = torch.randn(batch, seq, 8, dtype=torch.float64, requires_grad=True)
    grad_normed, grad_block = torch.randn(2, batch, seq, 8, dtype=torch.float64)
    params = [s, *norm.parameters(), *fc1.parameters(), *fc2.parameters()]
    results = []
    for fused in (False, True):
        if fused:
            normed, block = norm_then_feed_forward(s, norm, fc1, fc2, act, chunk_rows)
        else:
            normed = norm(s)
            block = fc2(act(fc1(normed)))
        loss = (normed * grad_normed).sum() if used != "block" else 0
        loss = loss + (block * grad_block).sum() if used != "norm" else loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((normed.detach(), block.detach(), grads))
    (normed, block, grads), (fused_normed, fused_block, fused_grads) = results
    torch.testing.assert_close(fused_normed, normed, rtol=0, atol=0)
    torch.testing.assert_close(fused_block, block)
    for got, expected in zip(fused_grads, grads, strict=True):
        if expected is None:  # the block's parameters when only the norm's output is used
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected)


def test_norm_then_feed_forward_only_where_it_skips_nothing():
    config = tiny_config(num_hidden_layers=1)
    ffn = modeling.DualRouteFeedForward(config, config.intermediate_size)
    norm = nn.LayerNorm(config.hidden_size)
    s = torch.randn(2, 5, config.hidden_size, requires_grad=True)
    assert can_norm_then_feed_forward(s, norm, ffn)
    assert not can_norm_then_feed_forward(s, nn.RMSNorm(config.hidden_size), ffn)  # another norm: its own call
    assert not can_norm_then_feed_forward(s, copy.deepcopy(norm).double(), ffn)
    for module in (norm, ffn, ffn.fc1):  # the calls it skips must not be watched
        handle = module.register_forward_hook(lambda *args: None)
        assert not can_norm_then_feed_forward(s, norm, ffn)
        handle.remove()
    with torch.no_grad():
        assert not can_norm_then_feed_forward(s, norm, ffn)  # nothing to record: the inference paths apply


def test_encoder_layer_keeps_fewer_tensors_for_backward(monkeypatch):
    """What autograd keeps of a training forward (distinct storages, counted through saved-tensor hooks): the normed
    states before the feed-forward block are no longer one of them."""
    config = tiny_config(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = DualRouteModel(config).train()
    input_ids = torch.randint(5, config.vocab_size, (1, 64))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes():
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=input_ids).last_hidden_state.sum().backward()
        return sum(storages.values())

    hidden_wide = 64 * config.hidden_size * 4  # one (tokens, hidden) float32 tensor
    fused = saved_bytes()
    monkeypatch.setattr(modeling, "can_norm_then_feed_forward", lambda *args: False)
    assert saved_bytes() - fused == hidden_wide


def test_model_inference_uses_the_chunked_paths_with_equal_outputs(monkeypatch):
    """Without autograd, an encoder layer runs its post-attention steps in chunks and a decoder layer (whose
    cross-attention comes between) its feed-forward block; the outputs equal those of the module calls."""
    config = tiny_seq2seq_config(max_position_embeddings=600)
    model = DualRouteForConditionalGeneration(config).eval()
    ids = torch.randint(5, config.vocab_size, (2, 600))  # 1200 rows: two chunks

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, decoder_input_ids=ids).logits

    calls = []
    for name, real in (("post_attention_inference", post_attention_inference), ("feed_forward_inference", None)):
        real = real or feed_forward_inference
        monkeypatch.setattr(modeling, name, lambda *args, name=name, real=real: calls.append(name) or real(*args))
    chunked = forward()
    layers = config.num_hidden_layers, config.decoder_layers
    assert (calls.count("post_attention_inference"), calls.count("feed_forward_inference")) == layers
    monkeypatch.setattr(modeling, "can_run_post_attention_inference", lambda *args: False)
    monkeypatch.setattr(modeling, "can_chunk_inference", lambda *args: False)
    torch.testing.assert_close(chunked, forward())
    assert len(calls) == sum(layers)


@pytest.mark.parametrize("dropout", ["hidden_dropout_prob", "activation_dropout"])
def test_dropout_between_the_post_attention_steps_takes_the_module_calls(monkeypatch, dropout):
    config = tiny_config(num_hidden_layers=1, max_position_embeddings=600, **{dropout: 0.1})
    model = DualRouteModel(config)
    calls = []
    monkeypatch.setattr(
        modeling, "post_attention_inference", lambda *args: calls.append(1) or post_attention_inference(*args)
    )
    with torch.no_grad():
        model.train()(input_ids=torch.randint(5, config.vocab_size, (2, 600)))
        assert not calls
        model.eval()(input_ids=torch.randint(5, config.vocab_size, (2, 600)))
        assert calls  # evaluation: no dropout


def test_lora_on_the_feed_forward_trains_its_adapters():
    from peft import LoraConfig, get_peft_model

    config = tiny_config(num_hidden_layers=1)
    model = get_peft_model(DualRouteModel(config), LoraConfig(r=4, target_modules=["fc1", "fc2"])).train()
    model(input_ids=torch.randint(5, config.vocab_size, (1, 16))).last_hidden_state.sum().backward()
    adapters = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(adapters) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def test_second_order_gradients_raise_torchs_error():
    config = tiny_config(num_hidden_layers=1)
    model = DualRouteModel(config).train()
    out = model(input_ids=torch.randint(5, config.vocab_size, (1, 16))).last_hidden_state
    (grad,) = torch.autograd.grad(out.pow(2).sum(), model.layers[0].mlp.fc1.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()  # documented in the README's Limitations


def test_torch_func_transforms_take_the_plain_calls():
    config = tiny_config(num_hidden_layers=1)
    model = DualRouteModel(config).train()
    input_ids = torch.randint(5, config.vocab_size, (1, 16))
    params = dict(model.named_parameters())

    def loss(params):
        return torch.func.functional_call(model, params, (input_ids,)).last_hidden_state.pow(2).sum()

    grads = torch.func.grad(loss)(params)
    loss(params).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_half_precision_weight_gradients_add_up_in_float32():
    torch.manual_seed(0)
    fc1, fc2 = make_block(16, 32, bias=True, dtype=torch.float64)
    x = torch.randn(4096, 16, dtype=torch.float64)
    grad_out = torch.randn(4096, 16, dtype=torch.float64)
    (_, exact), _ = plain_and_chunked(x, fc1, fc2, ACT2FN["gelu"], 4096, grad_out)
    half_fc1, half_fc2 = (copy.deepcopy(layer).bfloat16() for layer in (fc1, fc2))
    (_, plain), (_, chunked) = plain_and_chunked(
        x.bfloat16(), half_fc1, half_fc2, ACT2FN["gelu"], 64, grad_out.bfloat16()
    )
    for got, expected, reference in zip(chunked[1:], plain[1:], exact[1:], strict=True):
        assert got.dtype == torch.bfloat16
        error = (got.double() - reference).norm() / reference.norm()
        assert error <= 1.25 * (expected.double() - reference).norm() / reference.norm() + 1e-3
