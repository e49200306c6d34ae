"""DualRouteLinear: a decoding step's few rows as weight @ x^T on CPU, nn.Linear's values, gradients and interfaces."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modeling_dualroute import DualRouteForConditionalGeneration, DualRouteModel
from modeling_dualroute.linear_dualroute import DualRouteLinear, cpu_vendor, product_policy_for

from helpers import tiny_config, tiny_seq2seq_config


DEFAULT_POLICY = (DualRouteLinear.PRODUCT_ROWS, DualRouteLinear.PRODUCT_MIN_OUTPUTS)  # before the fixture sets it


def twins(in_features, out_features, bias, dtype):
    fast = DualRouteLinear(in_features, out_features, bias=bias).to(dtype)
    plain = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


@pytest.fixture(autouse=True)
def few_rows_path(monkeypatch):
    """Which calls take the product depends on the CPU: the tests take it for 1-16 rows of any layer on any machine,
    so it is checked wherever they run."""
    monkeypatch.setattr(DualRouteLinear, "PRODUCT_ROWS", range(1, 17))
    monkeypatch.setattr(DualRouteLinear, "PRODUCT_MIN_OUTPUTS", 0)


def test_product_policy_follows_the_vendor():
    """MKL's few-row ``linear`` is slow on AMD; on Intel it is fast but for 8-16 rows of a vocabulary-wide layer
    (module docstring)."""
    assert DEFAULT_POLICY == product_policy_for(cpu_vendor())
    assert product_policy_for("AuthenticAMD") == (range(1, 17), 0)
    assert product_policy_for("GenuineIntel") == (range(8, 17), 8192)
    assert product_policy_for("") == product_policy_for("ARM") == (range(0), 0)  # not measured: never
    assert isinstance(cpu_vendor(), str)


@pytest.mark.parametrize(
    "rows, out_features, product",
    [(8, 8192, True), (16, 8192, True), (4, 8192, False), (17, 8192, False), (8, 8191, False), (1, 512, False)],
)
def test_product_only_where_the_policy_says(rows, out_features, product, monkeypatch):
    monkeypatch.setattr(DualRouteLinear, "PRODUCT_ROWS", range(8, 17))
    monkeypatch.setattr(DualRouteLinear, "PRODUCT_MIN_OUTPUTS", 8192)
    torch.manual_seed(0)
    fast, plain = twins(16, out_features, False, torch.float32)
    x = torch.randn(rows, 16)
    calls = count_linear_calls(monkeypatch)
    out = fast(x)
    assert len(calls) == (not product)
    monkeypatch.undo()
    torch.testing.assert_close(out, plain(x))


def count_linear_calls(monkeypatch):
    calls = []
    original = nn.functional.linear
    monkeypatch.setattr(nn.functional, "linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize(
    "shape, bias, dtype",
    [
        ((1, 1), True, torch.float32),  # greedy: one row, taken as two columns
        ((1,), False, torch.float32),
        ((4, 1), False, torch.float32),  # a 4-beam decoding step
        ((2, 3), True, torch.float32),
        ((16,), False, torch.float32),
        ((17,), False, torch.float32),  # past PRODUCT_ROWS: nn.Linear itself
        ((2, 20), True, torch.float32),
        ((0, 1), False, torch.float32),
        ((1, 1), True, torch.bfloat16),
        ((3, 2), True, torch.bfloat16),
    ],
)
def test_equals_nn_linear(shape, bias, dtype, monkeypatch):
    """Output and gradients (input, weight, bias) equal nn.Linear's for batched, strided and half inputs; up to
    16 rows torch's linear is not called, more rows go through nn.Linear itself."""
    torch.manual_seed(0)
    fast, plain = twins(24, 50, bias, dtype)
    x = torch.randn(*shape, 48, dtype=dtype)[..., ::2].requires_grad_(True)  # a strided input
    calls = count_linear_calls(monkeypatch)
    out = fast(x)
    assert len(calls) == (x[..., 0].numel() not in DualRouteLinear.PRODUCT_ROWS)
    monkeypatch.undo()
    expected = plain(x)
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, expected, **tolerance)
    assert out.shape == expected.shape and out.is_contiguous() and out.dtype == expected.dtype
    if out.numel():
        weights = torch.randn_like(out)
        parameters = [fast.weight] + [fast.bias] * bias
        got = torch.autograd.grad((out * weights).sum(), [x, *parameters])
        want = torch.autograd.grad((expected * weights).sum(), [x, plain.weight] + [plain.bias] * bias)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **tolerance)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    bias=st.booleans(),
)
def test_equals_nn_linear_over_shapes(rows, in_features, out_features, bias):
    torch.manual_seed(rows)
    fast, plain = twins(in_features, out_features, bias, torch.float64)
    x = torch.randn(rows, in_features, dtype=torch.float64, requires_grad=True)
    out, expected = fast(x), plain(x)
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out.sum(), (x, fast.weight))
    torch.testing.assert_close(got, torch.autograd.grad(expected.sum(), (x, plain.weight)))


def test_mismatched_dtype_raises_like_nn_linear():
    fast, plain = twins(8, 4, True, torch.float32)
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError) as fast_error:
        fast(x)
    with pytest.raises(RuntimeError) as plain_error:
        plain(x)
    assert str(fast_error.value) == str(plain_error.value)


@pytest.mark.parametrize("rows", [1, 4])
def test_hooks_fire_on_the_few_rows_path(rows):
    model = DualRouteForConditionalGeneration(tiny_seq2seq_config())
    fired = []
    model.lm_head.register_forward_hook(lambda module, args, out: fired.append(("forward", out.shape)))
    model.lm_head.register_full_backward_hook(lambda module, grad_in, grad_out: fired.append(("backward", None)))
    hidden = torch.randn(rows, 1, model.config.hidden_size, requires_grad=True)
    model.lm_head(hidden).sum().backward()
    assert fired == [("forward", (rows, 1, model.config.vocab_size)), ("backward", None)]


def test_models_use_it_with_nn_linear_state_dict_keys():
    """Every projection of attention, feed-forward and the LM head is a DualRouteLinear (so an isinstance check for
    nn.Linear, as in PEFT and quantizers, still finds them); the state dict is nn.Linear's."""
    model = DualRouteForConditionalGeneration(tiny_seq2seq_config())
    names = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "lm_head")
    layers = {name: m for name, m in model.named_modules() if name.split(".")[-1] in names}
    assert layers and all(type(m) is DualRouteLinear and isinstance(m, nn.Linear) for m in layers.values())
    assert {name.split(".")[-1] for name in layers} == set(names)
    plain = nn.Linear(4, 4)
    assert DualRouteLinear(4, 4).state_dict().keys() == plain.state_dict().keys()
    encoder = DualRouteModel(tiny_config())
    assert type(encoder.layers[0].mlp.fc1) is DualRouteLinear
