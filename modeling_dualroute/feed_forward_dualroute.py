# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""The feed-forward block ``fc2(act(fc1(x)))`` in training, with less memory: chunked, the activation recomputed.

Autograd keeps three tensors of a feed-forward block for the backward pass: ``fc1``'s input, the activation's input
``h`` and ``fc2``'s input ``act(h)``, the last two four times the hidden width; at long inputs they are the largest
activations a layer keeps (at 8k tokens and FFN 2048: 128 of the ~290 MB a 1-layer model keeps). The backward pass
then allocates the gradients of ``act(h)`` and ``h``, each as large again, while all of that is still held.

`feed_forward` computes the same function and the same gradients, but keeps only ``x`` and ``h``: ``act(h)`` is
recomputed in the backward pass (an elementwise op: a training step measured no slower), and both passes work through
the rows in chunks, so the block's temporaries are a chunk's, not the whole input's. The weight gradients accumulate
chunk by chunk (in float32 at least). `DualRouteFeedForward` uses it when autograd is recording through plain
linear layers (`can_chunk`).

`norm_then_feed_forward` takes the LayerNorm before the block in too, as post-LayerNorm encoder and decoder layers
run them (`norm_feed_forward_norm` in the model):
``h = norm(s)`` is both the block's input and the residual, so autograd would keep ``s`` (for the norm) and ``h``
(for ``fc1``); it keeps ``s`` and the norm's row statistics only and recomputes ``h`` chunk by chunk in the backward
pass (16 MB less per layer at 8k tokens, a training step measured no slower).

`feed_forward_inference` is the same block without autograd on CPU, also in chunks of rows (`can_chunk_inference`):
the whole input's ``h`` and ``act(h)`` would be two fresh tensors four times the hidden width (128 MB each at 16k
tokens), which the C allocator maps afresh and page-faults in at every call; a chunk's are 8 MB, reused from the heap.
Measured on the 2-core CPU, 1-layer forward, the two taking turns: 13% faster at 8k tokens and 22% at 16k.

`post_attention_inference` goes further for an encoder layer: everything after its attention (residual add,
LayerNorm, feed-forward block, residual add, LayerNorm) one chunk of rows at a time, so of the six hidden-wide tensors
those steps would allocate (32 MB each at 16k tokens, each mapped afresh and faulted in) only the result is left
(`can_run_post_attention_inference`). Measured the same way: 3-5% faster at 16k, the same at 4k and 8k (where tensors
this size are reused from the heap).

Anything else (adapters, hooks, autocast, ``torch.func`` transforms, activation dropout, mixed dtypes) takes the plain
module calls, which compute the same values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .linear_dualroute import DualRouteLinear, plain_weight_on


# Rows per chunk: each chunk's temporaries are chunk_rows x intermediate (8 MB at 1024 x 2048 in float32). A 1-layer
# training step at 8k tokens took the same time with 512, 1024 or 2048 rows as with the plain calls (within this
# machine's noise, alternating runs).
CHUNK_ROWS = 1024


class _ChunkedFeedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, chunk_rows):
        rows = x.reshape(-1, x.shape[-1])
        hidden = torch.nn.functional.linear(rows, fc1_weight, fc1_bias)  # kept for the backward pass
        out = _second_layer_by_chunks(hidden, activation, fc2_weight, fc2_bias, chunk_rows)
        ctx.save_for_backward(rows, hidden, fc1_weight, fc2_weight)
        ctx.activation, ctx.chunk_rows, ctx.input_shape = activation, chunk_rows, x.shape
        return out.view(*x.shape[:-1], fc2_weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rows, hidden, fc1_weight, fc2_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = rows.new_empty(rows.shape) if needs[0] else None
        sums = _feed_forward_sums(fc1_weight, fc2_weight, needs[1:4])
        grad_fc2_bias = grad_out.sum(0) if needs[4] else None
        for start in range(0, rows.shape[0], ctx.chunk_rows):
            chunk = slice(start, start + ctx.chunk_rows)
            out = grad_x[chunk] if grad_x is not None else None
            _backward_chunk(
                rows[chunk], hidden[chunk], grad_out[chunk], fc1_weight, fc2_weight, ctx.activation, sums, out,
                rows_grad=grad_x is not None,
            )  # fmt: skip
        grad_fc1_weight, grad_fc1_bias, grad_fc2_weight = _cast_sums(sums, (fc1_weight, fc1_weight, fc2_weight))
        if grad_x is not None:
            grad_x = grad_x.view(ctx.input_shape)
        return grad_x, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias, None, None


class _NormThenFeedForward(torch.autograd.Function):
    """``h = layer_norm(s)`` and ``fc2(activation(fc1(h)))``, both returned (``h`` feeds the residual): keeps ``s``, the
    norm's row statistics and ``fc1(h)``; ``h`` itself, which autograd would keep as ``fc1``'s input, is recomputed
    chunk by chunk in the backward pass from ``s`` (a LayerNorm of a chunk of rows)."""

    @staticmethod
    def forward(
        ctx, s, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, chunk_rows
    ):
        width = s.shape[-1]
        rows = s.reshape(-1, width)
        normed, mean, rstd = torch.native_layer_norm(rows, (width,), norm_weight, norm_bias, eps)
        hidden = torch.nn.functional.linear(normed, fc1_weight, fc1_bias)
        out = _second_layer_by_chunks(hidden, activation, fc2_weight, fc2_bias, chunk_rows)
        ctx.save_for_backward(rows, mean, rstd, hidden, norm_weight, norm_bias, fc1_weight, fc2_weight)
        ctx.eps, ctx.activation, ctx.chunk_rows, ctx.input_shape = eps, activation, chunk_rows, s.shape
        return normed.view(s.shape), out.view(*s.shape[:-1], fc2_weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_normed, grad_out):
        rows, mean, rstd, hidden, norm_weight, norm_bias, fc1_weight, fc2_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        width = rows.shape[-1]
        # autograd materialises the gradient of an output the loss does not reach as zeros: both are tensors
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_normed = grad_normed.reshape(-1, width)
        accumulate = torch.promote_types(fc1_weight.dtype, torch.float32)  # as in `_feed_forward_sums`
        grad_s = rows.new_empty(rows.shape) if needs[0] else None
        norm_sums = [torch.zeros(width, dtype=accumulate, device=rows.device) if needs[i] else None for i in (1, 2)]
        sums = _feed_forward_sums(fc1_weight, fc2_weight, needs[4:7])
        grad_fc2_bias = grad_out.sum(0) if needs[7] else None
        for start in range(0, rows.shape[0], ctx.chunk_rows):
            chunk = slice(start, start + ctx.chunk_rows)
            normed = torch.native_layer_norm(rows[chunk], (width,), norm_weight, norm_bias, ctx.eps)[0]  # recomputed
            grad_h = _backward_chunk(
                normed, hidden[chunk], grad_out[chunk], fc1_weight, fc2_weight, ctx.activation, sums, None,
                rows_grad=True,
            ).add_(grad_normed[chunk])  # fmt: skip
            mask = [grad_s is not None, norm_sums[0] is not None, norm_sums[1] is not None]
            grad_rows, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
                grad_h, rows[chunk], (width,), mean[chunk], rstd[chunk], norm_weight, norm_bias, mask
            )
            if grad_s is not None:
                grad_s[chunk] = grad_rows
            for total, part in zip(norm_sums, (grad_weight, grad_bias)):
                if total is not None:
                    total += part
        grad_norm_weight, grad_norm_bias = _cast_sums(norm_sums, (norm_weight, norm_bias))
        grad_fc1_weight, grad_fc1_bias, grad_fc2_weight = _cast_sums(sums, (fc1_weight, fc1_weight, fc2_weight))
        if grad_s is not None:
            grad_s = grad_s.view(ctx.input_shape)
        return (grad_s, grad_norm_weight, grad_norm_bias, None, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight,
                grad_fc2_bias, None, None)  # fmt: skip


def _second_layer_by_chunks(hidden, activation, fc2_weight, fc2_bias, chunk_rows: int) -> torch.Tensor:
    """``fc2(activation(hidden))``, ``chunk_rows`` rows at a time (a chunk's ``activation(hidden)`` is the only
    temporary four times the hidden width)."""
    out = hidden.new_empty(hidden.shape[0], fc2_weight.shape[0])
    for start in range(0, hidden.shape[0], chunk_rows):
        chunk = slice(start, start + chunk_rows)
        out[chunk] = torch.nn.functional.linear(activation(hidden[chunk]), fc2_weight, fc2_bias)
    return out


def _feed_forward_sums(fc1_weight, fc2_weight, needs) -> tuple:
    """Zeroed running sums for the fc1 weight, fc1 bias and fc2 weight gradients (``None`` where ``needs`` says no).
    They add up over the chunks in float32 at least, so that half-precision weights do not round the running sum at
    every chunk (the plain path rounds its single product once)."""
    accumulate = torch.promote_types(fc1_weight.dtype, torch.float32)
    shapes = (fc1_weight.shape, fc1_weight.shape[:1], fc2_weight.shape)
    return tuple(
        torch.zeros(shape, dtype=accumulate, device=fc1_weight.device) if need else None
        for shape, need in zip(shapes, needs, strict=True)
    )


def _backward_chunk(rows, hidden, grad_out, fc1_weight, fc2_weight, activation, sums, out, *, rows_grad: bool):
    """The feed-forward block's backward pass over one chunk of rows: adds the chunk's parameter gradients to
    ``sums`` (fc1 weight, fc1 bias, fc2 weight; ``None`` where not needed) and, with ``rows_grad``, returns the
    gradient of ``rows`` (written into ``out`` when given)."""
    grad_fc1_weight, grad_fc1_bias, grad_fc2_weight = sums
    with torch.enable_grad():
        hidden = hidden.detach().requires_grad_()
        activated = activation(hidden)  # recomputed instead of kept
    if grad_fc2_weight is not None:
        _accumulate(grad_fc2_weight, grad_out.T, activated)
    (grad_hidden,) = torch.autograd.grad(activated, hidden, grad_out @ fc2_weight)
    del activated
    if grad_fc1_weight is not None:
        _accumulate(grad_fc1_weight, grad_hidden.T, rows)
    if grad_fc1_bias is not None:
        grad_fc1_bias += grad_hidden.sum(0)
    return torch.mm(grad_hidden, fc1_weight, out=out) if rows_grad else None


def _cast_sums(sums, like) -> tuple:
    """The accumulated gradients in their parameters' dtypes (``None`` stays ``None``)."""
    return tuple(None if total is None else total.to(param.dtype) for total, param in zip(sums, like))


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b``, in place when the dtypes agree."""
    if total.dtype == a.dtype:
        total.addmm_(a, b)
    else:
        total += a @ b


def feed_forward(
    x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, activation: Callable, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """``fc2(activation(fc1(x)))``, keeping only ``x`` and ``fc1(x)`` for the backward pass (module docstring)."""
    return _ChunkedFeedForward.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation, chunk_rows)


def norm_then_feed_forward(
    s: torch.Tensor,
    norm: nn.LayerNorm,
    fc1: nn.Linear,
    fc2: nn.Linear,
    activation: Callable,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, fc2(activation(fc1(h))))`` with ``h = norm(s)``, keeping ``s`` instead of ``h`` for the backward pass (and
    what `feed_forward` keeps): in a post-LayerNorm layer ``h`` is the residual, used once more, never kept."""
    return _NormThenFeedForward.apply(
        s, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation, chunk_rows
    )


def feed_forward_inference(
    x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, activation: Callable, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """``fc2(activation(fc1(x)))`` without autograd, ``chunk_rows`` rows at a time (module docstring)."""
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty(rows.shape[0], fc2.weight.shape[0])
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = slice(start, start + chunk_rows)
        _feed_forward_rows(rows[chunk], fc1, fc2, activation, out=out[chunk])
    return out.view(*x.shape[:-1], fc2.weight.shape[0])


def post_attention_inference(
    attention_output: torch.Tensor,
    residual: torch.Tensor,
    attention_norm: nn.LayerNorm,
    fc1: nn.Linear,
    fc2: nn.Linear,
    activation: Callable,
    final_norm: nn.LayerNorm,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """The rest of a post-LayerNorm layer after its attention, without autograd, ``chunk_rows`` rows at a time:
    ``h = attention_norm(residual + attention_output)``, then ``final_norm(h + fc2(activation(fc1(h))))``."""
    width = attention_output.shape[-1]
    attended, skip = attention_output.reshape(-1, width), residual.reshape(-1, width)
    out = torch.empty_like(attended)
    for start in range(0, attended.shape[0], chunk_rows):
        chunk = slice(start, start + chunk_rows)
        normed = _layer_norm(skip[chunk] + attended[chunk], attention_norm)
        block = _feed_forward_rows(normed, fc1, fc2, activation)
        out[chunk] = _layer_norm(block.add_(normed), final_norm)
    return out.view(attention_output.shape)


def _feed_forward_rows(
    rows: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, activation: Callable, out: torch.Tensor | None = None
) -> torch.Tensor:
    hidden = activation(torch.nn.functional.linear(rows, fc1.weight, fc1.bias))
    if fc2.bias is None:
        return torch.mm(hidden, fc2.weight.T, out=out)
    return torch.addmm(fc2.bias, hidden, fc2.weight.T, out=out)


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def can_chunk(x: torch.Tensor, fc1: nn.Module, fc2: nn.Module, activation: Callable) -> bool:
    """Whether `feed_forward` may replace the plain calls ``fc2(activation(fc1(x)))``: autograd records this call
    through a plain block (`_plain_block`)."""
    return _records_autograd(x, fc1, fc2) and _plain_block(x, fc1, fc2, activation)


def can_norm_then_feed_forward(s: torch.Tensor, norm: nn.Module, feed_forward: nn.Module) -> bool:
    """Whether `norm_then_feed_forward` may replace ``h = norm(s)`` then ``feed_forward(h)``: the block could run
    `feed_forward` (`can_chunk`), the norm is a plain ``nn.LayerNorm`` over the last dimension with parameters in
    ``s``'s dtype and device, and neither module whose call it skips has a hook or a wrapped ``forward``. Activation
    dropout is the caller's to rule out."""
    if not can_chunk(s, feed_forward.fc1, feed_forward.fc2, feed_forward.activation):
        return False
    if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1 or not _unhooked(norm):
        return False
    if not _unhooked(feed_forward):
        return False
    return all(p.dtype == s.dtype and p.device == s.device for p in norm.parameters())


def can_chunk_inference(x: torch.Tensor, fc1: nn.Module, fc2: nn.Module, activation: Callable) -> bool:
    """Whether `feed_forward_inference` may replace the plain calls: no autograd, more than `CHUNK_ROWS` rows on
    CPU (where the fresh intermediate tensors page-fault; GPUs are not measured), one dtype, a plain block."""
    if x.device.type != "cpu" or x.numel() <= CHUNK_ROWS * x.shape[-1] or _records_autograd(x, fc1, fc2):
        return False
    return _plain_block(x, fc1, fc2, activation) and x.dtype == fc1.weight.dtype == fc2.weight.dtype


def can_run_post_attention_inference(
    attention_output: torch.Tensor,
    residual: torch.Tensor,
    attention_norm: nn.Module,
    feed_forward: nn.Module,
    final_norm: nn.Module,
) -> bool:
    """Whether `post_attention_inference` may replace the module calls of a layer's post-attention steps: the
    feed-forward block could run `feed_forward_inference` (`can_chunk_inference`), the residual matches, the norms
    are plain ``nn.LayerNorm`` in the same dtype recording no autograd, and no module whose call it skips (the norms,
    the feed-forward module) has a hook or a wrapped ``forward``. Dropout is the caller's to rule out."""
    fc1, fc2, activation = feed_forward.fc1, feed_forward.fc2, feed_forward.activation
    if not can_chunk_inference(attention_output, fc1, fc2, activation):
        return False
    if residual.shape != attention_output.shape or residual.dtype != attention_output.dtype:
        return False
    norms = (attention_norm, final_norm)
    if any(type(norm) is not nn.LayerNorm for norm in norms) or not all(map(_unhooked, (*norms, feed_forward))):
        return False
    parameters = [p for norm in norms for p in norm.parameters()]
    if any(p.dtype != attention_output.dtype or p.device != attention_output.device for p in parameters):
        return False
    return not (torch.is_grad_enabled() and (residual.requires_grad or any(p.requires_grad for p in parameters)))


def _records_autograd(x: torch.Tensor, fc1: nn.Module, fc2: nn.Module) -> bool:
    """Whether autograd records a call of the block on ``x``: enabled, and ``x`` or a parameter needs a gradient."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for layer in (fc1, fc2) for p in layer.parameters())


def _plain_block(x: torch.Tensor, fc1: nn.Module, fc2: nn.Module, activation: Callable) -> bool:
    """Outside ``torch.func`` transforms, compilation and autocast; both layers plain ``nn.Linear`` or
    `DualRouteLinear` (no adapter, quantization or wrapped ``forward``) with weights on ``x``'s device; and no hook
    registered on the layers, on the activation (when it is a module) or globally, since the chunked functions
    neither call the layers nor call the activation once on the whole input."""
    if autocast_enabled(x.device.type) or torch.compiler.is_compiling():
        return False
    modules = (fc1, fc2, activation) if isinstance(activation, nn.Module) else (fc1, fc2)
    if _global_hooks() or not all(map(_unhooked, modules)):
        return False
    for layer in (fc1, fc2):
        if type(layer) not in (nn.Linear, DualRouteLinear) or not plain_weight_on(layer, x.device):
            return False
    return not _functorch_wrapped(x, *fc1.parameters(), *fc2.parameters())


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; ``False`` for device types autocast does not know (``meta``), on
    which ``torch.is_autocast_enabled`` raises."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _unhooked(module: nn.Module) -> bool:
    """No hook registered on ``module`` and its own class's ``forward`` (not one patched onto the instance)."""
    return "forward" not in module.__dict__ and not any(getattr(module, hook) for hook in _MODULE_HOOKS)


def _global_hooks() -> bool:
    return any(getattr(nn.modules.module, f"_global{name}") for name in _MODULE_HOOKS)


def _functorch_wrapped(*tensors: torch.Tensor) -> bool:
    """Inside ``torch.func.grad`` / ``vmap`` the tensors are functorch wrappers; the function has no rules for those."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


__all__ = [
    "CHUNK_ROWS",
    "autocast_enabled",
    "can_chunk",
    "can_chunk_inference",
    "can_norm_then_feed_forward",
    "can_run_post_attention_inference",
    "feed_forward",
    "feed_forward_inference",
    "norm_then_feed_forward",
    "post_attention_inference",
]
