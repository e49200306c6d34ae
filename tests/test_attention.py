"""Level 2: every backend against the reference oracle, and the reference against the loop oracle and dense SDPA."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from modeling_dualroute import route_blocks, routed_attention
from modeling_dualroute.attention_dualroute import choose_backend, routed_attention_with_plan
from modeling_dualroute.decode_dualroute import block_major_keys
from modeling_dualroute.flex_dualroute import check_flex_available

from oracles import naive_attention, plan_to_lists
from test_routing import make_mask, routing_problems


def make_inputs(p, dtype=torch.float32, requires_grad=False):
    generator = torch.Generator().manual_seed(p["seed"])
    query = torch.randn(p["batch"], p["q_heads"], p["q_len"], p["dim"], generator=generator, dtype=dtype)
    key = torch.randn(p["batch"], p["kv_heads"], p["k_len"], p["dim"], generator=generator, dtype=dtype)
    value = torch.randn(p["batch"], p["kv_heads"], p["k_len"], p["dim"], generator=generator, dtype=dtype)
    key_mask = make_mask(p["batch"], p["k_len"], p["padding"], generator)
    for t in (query, key, value):
        t.requires_grad_(requires_grad)
    options = dict(
        block_size=p["block_size"],
        top_k=p["top_k"],
        causal=p["kind"] == "causal",
        cross=p["kind"] == "cross",
        key_padding_mask=key_mask,
        query_padding_mask=key_mask if p["kind"] == "bidirectional" else None,
        global_blocks=p["global_blocks"],
    )
    return query, key, value, options


def output_and_grads(query, key, value, options, backend):
    out = routed_attention(query, key, value, backend=backend, **options)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)  # a non-uniform upstream gradient
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    return (out, *grads)


def assert_close_all(actual, expected, atol, rtol=1e-4):
    for name, a, e in zip(("output", "grad query", "grad key", "grad value"), actual, expected):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def assert_matches_reference(query, key, value, options, backend, atol=2e-5, rtol=1e-4):
    """``backend`` gives the `reference` backend's output and gradients of q, k, v."""
    assert_close_all(
        output_and_grads(query, key, value, options, backend),
        output_and_grads(query, key, value, options, "reference"),
        atol=atol,
        rtol=rtol,
    )


# -- the reference backend is the contract -----------------------------------------------------------------------------


@given(routing_problems())
def test_reference_matches_loop_oracle(p):
    query, key, value, options = make_inputs(p, dtype=torch.float64)
    out = routed_attention(query, key, value, backend="reference", **options)
    plan = route_blocks(query, key, **options)
    expected = naive_attention(
        query,
        key,
        value,
        plan_to_lists(plan),
        block_size=p["block_size"],
        causal=options["causal"],
        cross=options["cross"],
        key_padding_mask=options["key_padding_mask"],
    )
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


# -- fast backends against the reference, forward and backward --------------------------------------------------------


@given(routing_problems())
def test_gather_matches_reference_forward_and_backward(p):
    query, key, value, options = make_inputs(p, requires_grad=True)
    assert_matches_reference(query, key, value, options, "gather")


@pytest.mark.parametrize(
    "kind, q_len, k_len, block_size, top_k, global_blocks, group",
    [
        ("bidirectional", 13, 13, 4, 2, 0, 1),  # ragged last block
        ("bidirectional", 64, 64, 8, 3, 1, 2),  # GQA
        ("causal", 29, 29, 4, 3, 1, 1),
        ("causal", 3, 29, 4, 2, 0, 2),  # cached decoding: queries are the last positions
        ("cross", 7, 40, 8, 2, 1, 4),
    ],
)
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_gather_matches_reference_fixed_cases(kind, q_len, k_len, block_size, top_k, global_blocks, group, padding):
    p = dict(
        kind=kind, batch=3, kv_heads=2, q_heads=2 * group, q_len=q_len, k_len=k_len, dim=16, block_size=block_size,
        top_k=top_k, global_blocks=global_blocks, padding=padding, seed=q_len * k_len,
    )  # fmt: skip
    query, key, value, options = make_inputs(p, requires_grad=True)
    assert_matches_reference(query, key, value, options, "gather")


def test_chunk_budget_follows_the_vendor():
    """The tile kernel's chunk of scores was measured per CPU vendor (benchmarks/README.md)."""
    import modeling_dualroute.gather_dualroute as gather
    from modeling_dualroute.linear_dualroute import cpu_vendor

    assert gather.SCORE_ELEMENTS_PER_CHUNK == gather.score_elements_per_chunk_for(cpu_vendor())
    assert gather.score_elements_per_chunk_for("GenuineIntel") == 1 << 20
    assert gather.score_elements_per_chunk_for("AuthenticAMD") == gather.score_elements_per_chunk_for("") == 1 << 19


@given(routing_problems())
def test_gather_inference_matches_reference(p):
    """Inference (no autograd graph to record) meets the same contract."""
    query, key, value, options = make_inputs(p)
    with torch.no_grad():
        expected = routed_attention(query, key, value, backend="reference", **options)
        actual = routed_attention(query, key, value, backend="gather", **options)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
@pytest.mark.parametrize("score_elements", [1, 288])  # 288: 3 of the 13 tiles per chunk, chunks spanning two heads
def test_gather_is_chunked(monkeypatch, kind, score_elements):
    """Many small chunks give the same result as one chunk (per-tile and per-piece kernels)."""
    import modeling_dualroute.gather_dualroute as gather
    import modeling_dualroute.token_gather_dualroute as token_gather

    p = dict(
        kind=kind, batch=2, kv_heads=2, q_heads=4, q_len=50, k_len=50, dim=8, block_size=4, top_k=3,
        global_blocks=1, padding="right", seed=3,
    )  # fmt: skip
    query, key, value, options = make_inputs(p, requires_grad=True)
    whole = output_and_grads(query, key, value, options, "gather")
    monkeypatch.setattr(gather, "SCORE_ELEMENTS_PER_CHUNK", score_elements)
    monkeypatch.setattr(token_gather, "SCORE_ELEMENTS_PER_CHUNK", score_elements)
    assert_close_all(output_and_grads(query, key, value, options, "gather"), whole, atol=1e-6)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_gather_output_is_token_major(requires_grad):
    """The tile kernel writes its output as ``(b, lq, hq, d)`` in memory, what the output projection reads: merging the
    heads is then a view, not a copy of the output (and in training not a second saved copy)."""
    p = dict(
        kind="bidirectional", batch=2, kv_heads=2, q_heads=4, q_len=48, k_len=48, dim=8, block_size=4, top_k=3,
        global_blocks=1, padding="none", seed=5,
    )  # fmt: skip
    query, key, value, options = make_inputs(p, requires_grad=requires_grad)
    output = routed_attention(query, key, value, backend="gather", **options)
    assert output.shape == query.shape and output.transpose(1, 2).is_contiguous()


def _count_row_max_passes(monkeypatch):
    """Records, per call of the per-token kernel's `_row_max`, whether it ran over the anchor pieces or all pieces."""
    import modeling_dualroute.token_gather_dualroute as token_gather

    passes = []
    original = token_gather._row_max

    def counting(*args, subset=None, **kwargs):
        passes.append("anchor" if subset is not None else "all")
        return original(*args, subset=subset, **kwargs)

    monkeypatch.setattr(token_gather, "_row_max", counting)
    return passes


def _far_apart_scores(padding: range = range(0), block_1: float = -30.0):
    """Causal, 128 tokens of blocks of 64, top-2 (block 0 global, own block forced): every query is ``u``, the keys of
    block 0 are ``30 u`` (scores ~+240 at the scale 1/8) and those of block 1 are ``block_1 u`` (-30: ~-240); keys at
    the positions in ``padding`` are padding."""
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0) * 8
    query = u.expand(1, 2, 128, 64).clone()
    key = torch.cat([30 * u.expand(1, 2, 64, 64), block_1 * u.expand(1, 2, 64, 64)], dim=2).clone()
    value = torch.randn(1, 2, 128, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 128, dtype=torch.bool)
    mask[:, padding] = False
    options = dict(block_size=64, top_k=2, global_blocks=1, causal=True, key_padding_mask=mask)
    return query, key, value, options


# Padding inside block 1 up to position 99: rows 64-99 see nothing of their own block (it is chosen, for its real keys
# 100-127 lie in their future), so their anchor has no visible score and their shift is 0.
UNANCHORED_ROWS = range(64, 100)


@pytest.mark.parametrize("padding", ["none", "right", "left", "random"])
@pytest.mark.parametrize("kind", ["causal", "cross"])
def test_per_token_kernel_takes_one_pass_when_the_anchor_shift_is_safe(monkeypatch, kind, padding):
    """Ordinary scores take the single pass, padded batches included: left padding leaves causal rows that see no
    key at all (zeros, not a reason to recompute)."""
    passes = _count_row_max_passes(monkeypatch)
    p = dict(
        kind=kind, batch=2, kv_heads=2, q_heads=4, q_len=300 if kind == "causal" else 40, k_len=300, dim=16,
        block_size=16, top_k=4, global_blocks=1, padding=padding, seed=5,
    )  # fmt: skip
    query, key, value, options = make_inputs(p, requires_grad=True)
    assert_matches_reference(query, key, value, options, "gather")
    assert passes == ["anchor"]


@pytest.mark.parametrize("kind", ["causal", "cross"])
def test_per_token_kernel_with_every_key_padding_gives_zeros(kind):
    """No key anywhere in the batch: the plan selects nothing, the kernel has no pieces at all."""
    query, key, value = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))
    options = dict(block_size=4, top_k=2, causal=kind == "causal", cross=kind == "cross")
    options["key_padding_mask"] = torch.zeros(2, 9, dtype=torch.bool)
    out = routed_attention(query, key, value, backend="gather", **options)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (query, key, value))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize(
    "padding, block_1, why",
    [
        (range(0), -30.0, "rows of block 1: their anchor (own block, ~-240) is far below block 0 (~+240)"),
        (UNANCHORED_ROWS, 30.0, "only rows 64-99 lack an anchor score; their shift 0 is far below block 0 (~+240)"),
    ],
)
def test_per_token_kernel_recomputes_exactly_when_the_anchor_shift_fails(monkeypatch, padding, block_1, why):
    passes = _count_row_max_passes(monkeypatch)
    query, key, value, options = _far_apart_scores(padding, block_1)
    for t in (query, key, value):
        t.requires_grad_(True)
    assert_matches_reference(query, key, value, options, "gather", atol=1e-4)
    assert passes == ["anchor", "all"], why


def test_cross_attention_recomputes_exactly_when_its_anchor_shift_overflows(monkeypatch):
    """Cross-attention anchors a row on its most chosen block: here the global block 0, which every query reads and
    which scores far below the block each query picks besides (~-240 or ~0 against ~+240)."""
    passes = _count_row_max_passes(monkeypatch)
    u, w = torch.eye(64)[:2] * 8  # orthogonal directions
    query = torch.cat([u.expand(1, 2, 8, 64), w.expand(1, 2, 8, 64)], dim=2).clone()  # 16 decoder tokens
    key = torch.cat([-30 * u.expand(1, 2, 64, 64), 30 * u.expand(1, 2, 64, 64), 30 * w.expand(1, 2, 64, 64)], dim=2)
    value = torch.randn(1, 2, 192, 64, generator=torch.Generator().manual_seed(1))
    for t in (query, key, value):
        t.requires_grad_(True)
    options = dict(block_size=64, top_k=2, global_blocks=1, cross=True)
    assert_matches_reference(query, key, value, options, "gather", atol=1e-4)
    assert passes == ["anchor", "all"]


def test_per_token_kernel_recomputes_exactly_when_an_unanchored_row_underflows(monkeypatch):
    """A row without a visible anchor score gets the shift 0; if every score it can see is far below 0, its weights
    underflow to 0 and it would read as having no visible key: recomputed with the exact maxima."""
    passes = _count_row_max_passes(monkeypatch)
    query, key, value, options = _far_apart_scores(UNANCHORED_ROWS)
    key = -key  # block 0 now scores ~-240 for every query
    with torch.no_grad():
        expected = routed_attention(query, key, value, backend="reference", **options)
        actual = routed_attention(query, key, value, backend="gather", **options)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    assert expected[:, :, UNANCHORED_ROWS].abs().amin(-1).gt(0).all()  # those rows do see block 0
    assert passes == ["anchor", "all"]


@pytest.mark.parametrize("tile_size", [1, 4, 16])
@pytest.mark.parametrize("kind", ["causal", "cross"])
def test_per_token_tile_kernel_matches_reference(kind, tile_size):
    """Per-token routing through the tile kernel (used for decoding and with dropout) with any tile size."""
    from modeling_dualroute.gather_dualroute import gather_attention, tile_plan_from_routes

    p = dict(
        kind=kind, batch=2, kv_heads=2, q_heads=4, q_len=37 if kind == "causal" else 11, k_len=37, dim=8, block_size=4,
        top_k=3, global_blocks=1, padding="right", seed=11,
    )  # fmt: skip
    query, key, value, options = make_inputs(p, requires_grad=True)
    plan = route_blocks(query, key, **options)
    tiles = tile_plan_from_routes(plan, per_token=True, block_size=4, n_key_blocks=10, tile_size=tile_size)
    out = gather_attention(
        query, key, value, tiles, block_size=4, key_valid=options["key_padding_mask"], causal=kind == "causal",
        query_offset=0, scale=8**-0.5,
    )  # fmt: skip
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    actual = (out, *torch.autograd.grad((out * weights).sum(), (query, key, value)))
    assert_close_all(actual, output_and_grads(query, key, value, options, "reference"), atol=2e-5)


@given(routing_problems(), st.booleans())
def test_single_query_decoding_matches_reference(p, strided_cache):
    """One query per sequence (a decoding step) takes the direct token-gather kernel; keys from a cache are contiguous,
    keys straight from a projection are strided views: both layouts, forward and backward."""
    p = {**p, "kind": "cross" if p["kind"] == "bidirectional" else p["kind"], "q_len": 1}
    p["top_k"] = max(p["top_k"], p["global_blocks"] + (p["kind"] != "cross"))
    query, key, value, options = make_inputs(p)
    if strided_cache:  # (b, lk, h, d) memory seen as (b, h, lk, d), like k_proj(x).view(...).transpose(1, 2)
        key, value = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (key, value))
        assert not key.is_contiguous() or key.shape[1] == 1 or key.shape[2] == 1
    for t in (query, key, value):
        t.requires_grad_(True)
    _, info = routed_attention_with_plan(query, key, value, backend="gather", need_plan=False, **options)
    assert info["backend"] == "gather"
    assert_matches_reference(query, key, value, options, "gather")


@given(routing_problems(), st.booleans(), st.sampled_from([torch.float32, torch.float64]))
def test_single_query_decoding_from_block_major_keys_matches_reference(p, reader, dtype):
    """With the keys also given block-major (a cross-attention cache keeps them so), a decoding step outside autograd
    reads keys and values in place (two `embedding_bag` calls): the reference's output for every mask, ragged block,
    empty slot and GQA group. The keys may come as a tensor or as a reader, which is called only on that path."""
    p = {**p, "kind": "cross" if p["kind"] == "bidirectional" else p["kind"], "q_len": 1}
    p["top_k"] = max(p["top_k"], p["global_blocks"] + (p["kind"] != "cross"))
    query, key, value, options = make_inputs(p, dtype=dtype)
    blocks = block_major_keys(key, p["block_size"])
    assert blocks.shape == (p["batch"], p["kv_heads"], -(-p["k_len"] // p["block_size"]), p["dim"], p["block_size"])
    calls = []
    key_blocks = (lambda: calls.append(1) or blocks) if reader else blocks
    with torch.no_grad():
        out, info = routed_attention_with_plan(
            query, key, value, backend="gather", key_blocks=key_blocks, need_plan=False, **options
        )
        expected = routed_attention(query, key, value, backend="reference", **options)
    assert info["backend"] == "gather"
    assert calls == ([1] if reader else [])
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_block_major_keys_that_do_not_match_the_keys_raise():
    query, key, value = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    options = dict(block_size=8, top_k=3, cross=True, global_blocks=1, backend="gather")
    with torch.no_grad():
        for wrong in (block_major_keys(key[:1], 8), block_major_keys(key, 4), block_major_keys(key.double(), 8)):
            with pytest.raises(ValueError, match="`key_blocks` must be `key` block-major"):
                routed_attention_with_plan(query, key, value, key_blocks=wrong, **options)


# A padded cross-attention decoding step with a ragged last block, and a reader of block-major keys it must not call.
DECODING_STEP = dict(
    kind="cross", batch=2, kv_heads=2, q_heads=4, q_len=1, k_len=61, dim=8, block_size=8, top_k=3, global_blocks=1,
    padding="right", seed=5,
)  # fmt: skip


def forbidden_reader(why: str):
    def reader():
        raise AssertionError(f"block-major keys read {why}")

    return reader


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decoding_gathers_and_never_reads_block_major_keys(dtype):
    """Half-precision steps are computed in float32 from gathered keys, as before; the reader is not called, so a cache
    never builds the second copy for them."""
    query, key, value, options = make_inputs(DECODING_STEP, dtype=dtype)
    reader = forbidden_reader("for half-precision inputs")
    with torch.no_grad():
        out, _ = routed_attention_with_plan(query, key, value, backend="gather", key_blocks=reader, **options)
        expected = routed_attention(query, key, value, backend="reference", **options)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_block_major_keys_are_read_only_outside_autograd():
    """With gradients the step gathers from ``key`` as before (autograd differentiates through it), and the reader
    of block-major keys is not called."""
    query, key, value, options = make_inputs(DECODING_STEP, requires_grad=True)
    reader = forbidden_reader("with autograd on")
    out = routed_attention_with_plan(query, key, value, backend="gather", key_blocks=reader, **options)[0]
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    actual = (out, *torch.autograd.grad((out * weights).sum(), (query, key, value)))
    assert_close_all(actual, output_and_grads(query, key, value, options, "reference"), atol=2e-5)


@pytest.fixture
def fresh_scratch(monkeypatch):
    """The decoding kernel's per-thread scratch buffers, empty for this test."""
    import threading

    import modeling_dualroute.decode_dualroute as decode

    monkeypatch.setattr(decode, "_scratch", threading.local())
    return decode._scratch


@given(routing_problems(), st.lists(st.integers(0, 2), min_size=1, max_size=3))
def test_single_query_decoding_without_autograd_reuses_scratch_safely(p, extra_top_k):
    """Without autograd a decoding step gathers into per-thread scratch buffers that the next step reuses, with a
    different size (top_k varies): each step still equals the reference, and no output aliases the scratch."""
    import modeling_dualroute.decode_dualroute as decode

    p = {**p, "kind": "cross" if p["kind"] == "bidirectional" else p["kind"], "q_len": 1}
    p["top_k"] = max(p["top_k"], p["global_blocks"] + (p["kind"] != "cross"))
    outputs = []
    with torch.no_grad():
        for step, extra in enumerate(extra_top_k):
            step_problem = {**p, "seed": p["seed"] + step, "k_len": p["k_len"] + 5 * step, "top_k": p["top_k"] + extra}
            query, key, value, options = make_inputs(step_problem)
            out = routed_attention(query, key, value, backend="gather", **options)
            torch.testing.assert_close(out, routed_attention(query, key, value, backend="reference", **options))
            outputs.append((out, out.clone()))
    assert decode._scratch.buffers  # the scratch path ran
    for out, copy in outputs:
        assert torch.equal(out, copy)


def test_single_query_decoding_keeps_what_autograd_needs_out_of_the_scratch(fresh_scratch):
    """Only the query needs a gradient (frozen keys and values): autograd keeps the gathered keys and values of every
    step for the backward pass, so none of them may live in a buffer the next step overwrites."""
    p = dict(
        kind="cross", batch=2, kv_heads=2, q_heads=4, q_len=1, k_len=256, dim=8, block_size=16, top_k=3,
        global_blocks=1, padding="none", seed=0,
    )  # fmt: skip
    steps = [make_inputs({**p, "seed": seed}) for seed in range(3)]
    for query, _, _, _ in steps:
        query.requires_grad_(True)
    total = sum(routed_attention(q, k, v, backend="gather", **o).square().sum() for q, k, v, o in steps)
    total.backward()
    for query, key, value, options in steps:
        expected = torch.autograd.grad(
            routed_attention(query, key, value, backend="reference", **options).square().sum(), query
        )[0]
        torch.testing.assert_close(query.grad, expected)
    assert not getattr(fresh_scratch, "buffers", None)


def test_single_query_decoding_under_inference_mode_then_no_grad(fresh_scratch):
    """A scratch buffer first made under `torch.inference_mode()` stays writable in a later `no_grad` step."""
    p = dict(
        kind="cross", batch=1, kv_heads=2, q_heads=2, q_len=1, k_len=128, dim=8, block_size=16, top_k=3,
        global_blocks=1, padding="none", seed=1,
    )  # fmt: skip
    query, key, value, options = make_inputs(p)
    expected = routed_attention(query, key, value, backend="reference", **options)
    with torch.inference_mode():
        torch.testing.assert_close(routed_attention(query, key, value, backend="gather", **options), expected)
    with torch.no_grad():
        torch.testing.assert_close(routed_attention(query, key, value, backend="gather", **options), expected)
    assert fresh_scratch.buffers


@pytest.mark.parametrize("kind", ["causal", "cross"])
@pytest.mark.parametrize("k_len, padding", [(64, "none"), (61, "none"), (64, "right")])
def test_single_query_decoding_with_and_without_masks(kind, k_len, padding):
    """Whole blocks without padding take the mask-free path, a ragged tail the window path, padding the masked one."""
    p = dict(
        kind=kind, batch=2, kv_heads=2, q_heads=4, q_len=1, k_len=k_len, dim=8, block_size=8, top_k=3,
        global_blocks=1, padding=padding, seed=k_len,
    )  # fmt: skip
    query, key, value, options = make_inputs(p, requires_grad=True)
    assert_matches_reference(query, key, value, options, "gather")


def test_single_query_decoding_reads_only_the_selected_blocks(monkeypatch):
    """A decoding step over 4k keys never touches a whole-sequence copy of the keys: the gathered rows are k * B."""
    import modeling_dualroute.decode_dualroute as decode

    seen = []
    original = decode._select_tokens
    monkeypatch.setattr(
        decode, "_select_tokens", lambda token, *xs, **kw: seen.append(token.shape) or original(token, *xs, **kw)
    )
    query, key, value = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 4000, 8), torch.randn(2, 2, 4000, 8)
    padding = torch.ones(2, 4000, dtype=torch.bool)
    padding[1, 3900:] = False  # padded keys: the token-level path with a visibility mask
    routed_attention(query, key, value, block_size=64, top_k=3, cross=True, global_blocks=1, key_padding_mask=padding)
    assert seen == [torch.Size([2, 2, 3 * 64])]
    # no padding, whole or ragged: one row per selected block (b * hk * top_k), each B * d values, for keys and values
    rows = []
    original_rows = decode._index_rows
    monkeypatch.setattr(
        decode, "_index_rows", lambda x, r, slot: rows.append((r.numel(), x.shape[1])) or original_rows(x, r, slot)
    )
    for length in (4096, 4000):
        rows.clear()
        key, value = torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
        routed_attention(query, key, value, block_size=64, top_k=3, cross=True, global_blocks=1)
        assert rows == [(2 * 2 * 3, 64 * 8)] * 2


@pytest.mark.parametrize("length", [4096, 4000])
def test_single_query_decoding_with_gradients_reads_no_overlapping_view(length, monkeypatch):
    """A ragged length is read through an overlapping view of the keys only outside autograd: that view's gradient
    would be B times the size of the keys. With gradients, whole blocks come from a plain view, ragged lengths from
    the token-level path."""
    import modeling_dualroute.decode_dualroute as decode

    sources = []
    original_rows = decode._index_rows
    monkeypatch.setattr(
        decode, "_index_rows", lambda x, r, slot: sources.append(x.is_contiguous()) or original_rows(x, r, slot)
    )
    query = torch.randn(1, 2, 1, 8, requires_grad=True)
    key, value = (torch.randn(1, 2, length, 8, requires_grad=True) for _ in range(2))
    routed_attention(query, key, value, block_size=64, top_k=3, cross=True, global_blocks=1).sum().backward()
    assert sources and all(sources)


@pytest.mark.parametrize("length", [30, 32])
def test_single_query_decoding_with_an_empty_slot(length):
    """A block whose routing score is NaN (a NaN key) is never chosen, so a plan can hold -1 with top_k candidates:
    the whole-block path leaves that slot out, like the reference."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 1, 8, generator=generator)
    key, value = (torch.randn(1, 2, length, 8, generator=generator) for _ in range(2))
    key[0, 0, 9] = float("nan")
    options = dict(block_size=8, top_k=4, cross=True, global_blocks=1)
    _, info = routed_attention_with_plan(query, key, value, backend="gather", **options)
    assert (info["plan"] < 0).any()
    with torch.no_grad():
        expected = routed_attention(query, key, value, backend="reference", **options)
        torch.testing.assert_close(routed_attention(query, key, value, backend="gather", **options), expected)
        from_blocks, _ = routed_attention_with_plan(
            query, key, value, backend="gather", key_blocks=block_major_keys(key, 8), **options
        )
        torch.testing.assert_close(from_blocks, expected)


@pytest.mark.parametrize("causal", [False, True])
def test_gather_memory_is_not_quadratic(causal):
    """The largest tensor the gather backend allocates is a chunk of scores, not (q_len, k_len)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    LargestAllocation.largest = max(LargestAllocation.largest, t.numel())
            return out

    n, dim = 4096, 16
    query, key, value = (torch.randn(1, 1, n, dim, requires_grad=True) for _ in range(3))
    with LargestAllocation():
        out = routed_attention(query, key, value, block_size=64, top_k=4, causal=causal, backend="gather")
        out.sum().backward()
    assert LargestAllocation.largest < n * n // 8, LargestAllocation.largest


# -- dense equivalence -------------------------------------------------------------------------------------------------


@given(routing_problems())
def test_top_k_covering_every_block_equals_sdpa(p):
    query, key, value, options = make_inputs(p, dtype=torch.float64)
    options["top_k"] = -(-p["k_len"] // p["block_size"]) + p["global_blocks"] + 1
    mask = torch.ones(p["batch"], 1, p["q_len"], p["k_len"], dtype=torch.bool)
    if options["key_padding_mask"] is not None:
        mask &= options["key_padding_mask"][:, None, None, :]
    if options["causal"]:
        offset = p["k_len"] - p["q_len"]
        mask &= torch.ones(p["q_len"], p["k_len"], dtype=torch.bool).tril(offset)
    has_key = mask.any(-1, keepdim=True)
    group = p["q_heads"] // p["kv_heads"]
    expected = (
        torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=mask | ~has_key
        )
        * has_key
    )
    for backend in ("reference", "gather", "auto"):
        out = routed_attention(query, key, value, backend=backend, **options)
        torch.testing.assert_close(out, expected, atol=1e-5 if backend == "gather" else 1e-10, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("q_len", [37, 5])  # 37: every key (SDPA's is_causal); 5: the last queries (a boolean mask)
def test_causal_dense_path_matches_reference_forward_and_backward(group, q_len):
    p = dict(
        kind="causal", batch=2, kv_heads=2, q_heads=2 * group, q_len=q_len, k_len=37, dim=8, block_size=4, top_k=10,
        global_blocks=1, padding="none", seed=q_len,
    )  # fmt: skip
    query, key, value, options = make_inputs(p, requires_grad=True)
    _, info = routed_attention_with_plan(query, key, value, **options)
    assert info["backend"] == "dense"
    assert_matches_reference(query, key, value, options, "auto")


# -- invariants --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "gather", "auto"])
@pytest.mark.parametrize("q_len", [41, 5])
def test_causal_future_does_not_leak(backend, q_len):
    k_len = 41
    t = k_len - q_len + q_len // 2  # a key position that some queries may see and later ones follow
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, q_len, 8, generator=generator)
    key, value = torch.randn(2, 2, k_len, 8, generator=generator), torch.randn(2, 2, k_len, 8, generator=generator)
    options = dict(block_size=4, top_k=3, causal=True, global_blocks=1, backend=backend)
    out = routed_attention(query, key, value, **options)
    cut = t - (k_len - q_len)  # query index of position t
    query2, key2, value2 = query.clone(), key.clone(), value.clone()
    query2[:, :, cut + 1 :] = torch.randn_like(query2[:, :, cut + 1 :])
    key2[:, :, t + 1 :] = 100 * torch.randn_like(key2[:, :, t + 1 :])
    value2[:, :, t + 1 :] = 100 * torch.randn_like(value2[:, :, t + 1 :])
    out2 = routed_attention(query2, key2, value2, **options)
    # The perturbation is 100x the data, so a leak would be large; float rounding may differ (the gather backend shares
    # a query tile with later tokens, which can reorder its sums) but only at rounding level.
    torch.testing.assert_close(out2[:, :, : cut + 1], out[:, :, : cut + 1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "gather", "auto"])
@pytest.mark.parametrize("kind", ["bidirectional", "causal", "cross"])
def test_sequence_alone_equals_sequence_in_padded_batch(backend, kind):
    generator = torch.Generator().manual_seed(1)
    lengths = [23, 9, 17]
    q_len, k_len = (5, max(lengths)) if kind == "cross" else (max(lengths), max(lengths))
    query = torch.randn(3, 4, q_len, 8, generator=generator)
    key, value = torch.randn(3, 2, k_len, 8, generator=generator), torch.randn(3, 2, k_len, 8, generator=generator)
    mask = torch.arange(k_len)[None, :] < torch.tensor(lengths)[:, None]
    key = key.masked_fill(~mask[:, None, :, None], 7.0)  # garbage in the padding must not matter
    options = dict(
        block_size=4, top_k=2, global_blocks=1, causal=kind == "causal", cross=kind == "cross", backend=backend
    )
    batch = routed_attention(
        query,
        key,
        value,
        key_padding_mask=mask,
        query_padding_mask=mask if kind == "bidirectional" else None,
        **options,
    )
    for b, length in enumerate(lengths):
        q_end = q_len if kind == "cross" else length
        alone = routed_attention(
            query[b : b + 1, :, :q_end], key[b : b + 1, :, :length], value[b : b + 1, :, :length], **options
        )
        torch.testing.assert_close(batch[b : b + 1, :, :q_end], alone, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "gather", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bidirectional", "causal", "cross"])
def test_fully_padded_sequence_gives_zeros_not_nan(backend, dtype, kind):
    query, key, value = (torch.randn(2, 2, 9, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    out = routed_attention(
        query, key, value, block_size=4, top_k=2, key_padding_mask=mask, query_padding_mask=mask if kind == "bidirectional" else None,
        causal=kind == "causal", cross=kind == "cross", backend=backend,
    )  # fmt: skip
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    out.float().sum().backward()
    for t in (query, key, value):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", ["reference", "gather", "auto"])
def test_dropout_is_unbiased_and_random(backend):
    query, key, value = (torch.randn(1, 2, 12, 4) for _ in range(3))
    options = dict(block_size=4, top_k=2, global_blocks=1, backend=backend)
    clean = routed_attention(query, key, value, **options)
    runs = torch.stack([routed_attention(query, key, value, dropout=0.3, **options) for _ in range(3000)])
    assert not torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs.mean(0), clean, atol=0.06, rtol=0)


def test_gather_dropout_backward_matches_its_forward_mask():
    """With dropout, the gradient must be that of the very same dropped-out forward (mask regenerated, not redrawn)."""
    query, key, value = (torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    options = dict(block_size=4, top_k=2, global_blocks=1, dropout=0.5)

    def run(q, k, v):
        torch.manual_seed(123)
        return routed_attention(q, k, v, backend="gather", **options)

    assert torch.autograd.gradcheck(run, (query, key, value), atol=1e-4, rtol=1e-3, eps=1e-4)


# -- backend choice ----------------------------------------------------------------------------------------------------


def test_auto_choice_depends_only_on_shapes_and_options():
    common = dict(
        device=torch.device("cpu"), dtype=torch.float32, dropout=0.0, need_weights=False, requires_grad=False
    )
    assert choose_backend("auto", q_len=16384, k_len=16384, n_key_blocks=256, top_k=256, **common) == "dense"
    assert choose_backend("auto", q_len=256, k_len=256, n_key_blocks=4, top_k=2, **common) == "dense_routed"
    assert choose_backend("auto", q_len=16384, k_len=16384, n_key_blocks=256, top_k=8, **common) == "gather"
    assert choose_backend("gather", q_len=16, k_len=16, n_key_blocks=1, top_k=8, **common) == "gather"
    assert (
        choose_backend("auto", q_len=16, k_len=16, n_key_blocks=4, top_k=2, **(common | dict(need_weights=True)))
        == "reference"
    )
    # the same long call gives the same choice after a short one: nothing is sticky
    choose_backend("auto", q_len=8, k_len=8, n_key_blocks=2, top_k=1, **common)
    assert choose_backend("auto", q_len=16384, k_len=16384, n_key_blocks=256, top_k=8, **common) == "gather"


def test_info_reports_plan_backend_and_weights():
    query, key, value = (torch.randn(1, 2, 12, 4) for _ in range(3))
    out, info = routed_attention_with_plan(query, key, value, block_size=4, top_k=2, need_weights=True)
    assert info["backend"] == "reference"
    assert info["weights"].shape == (1, 2, 12, 12)
    torch.testing.assert_close(info["weights"].sum(-1), torch.ones(1, 2, 12))
    assert torch.equal(info["plan"], route_blocks(query, key, block_size=4, top_k=2))
    # weights are zero outside the routed blocks
    blocks_seen = (info["weights"].view(1, 2, 12, 3, 4).sum(-1) > 0).view(1, 2, 3, 4, 3).any(3)
    for i in range(3):
        assert blocks_seen[0, :, i].nonzero()[:, -1].unique().tolist() == sorted(
            set(info["plan"][0, :, i].flatten().tolist())
        )


# -- errors ------------------------------------------------------------------------------------------------------------


def test_bad_backend_and_dropout_raise():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(
        ValueError, match=r"`backend` must be one of \('auto', 'reference', 'gather', 'flex'\), got 'fast'"
    ):
        routed_attention(q, q, q, block_size=4, top_k=2, backend="fast")
    with pytest.raises(ValueError, match=r"`dropout` must be a float in \[0, 1\), got 1.5"):
        routed_attention(q, q, q, block_size=4, top_k=2, dropout=1.5)
    with pytest.raises(ValueError, match=r"`value` must have the shape of `key` \(1, 2, 8, 4\), got \(1, 2, 7, 4\)"):
        routed_attention(q, q, q[:, :, :7], block_size=4, top_k=2)
    with pytest.raises(ValueError, match="only computed by the `reference` backend"):
        routed_attention_with_plan(q, q, q, block_size=4, top_k=2, need_weights=True, backend="gather")


def test_bad_value_scale_masks_and_descriptors_raise():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(
        TypeError, match=r"`value` must be a torch.Tensor of shape \(batch, kv_heads, k_len, head_dim\), got NoneType"
    ):
        routed_attention(q, q, None, block_size=4, top_k=2)
    with pytest.raises(TypeError, match=r"`scale` must be a number \(or None: head_dim \*\* -0.5\), got 'a'"):
        routed_attention(q, q, q, block_size=4, top_k=2, scale="a")
    for bad in (float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="`scale` must be a finite number > 0"):
            routed_attention(q, q, q, block_size=4, top_k=2, scale=bad)
    with pytest.raises(ValueError, match="need at least one head of head_dim >= 1"):
        routed_attention(q[..., :0], q[..., :0], q[..., :0], block_size=4, top_k=2)
    with pytest.raises(
        ValueError,
        match="`key_padding_mask` must hold 1 \\(or True\\) for real tokens and 0 for padding, got the value 2",
    ):
        routed_attention(q, q, q, block_size=4, top_k=2, key_padding_mask=torch.full((1, 8), 2))
    means, counts = torch.zeros(1, 2, 3, 4), torch.ones(1, 3, dtype=torch.long)  # 3 blocks for 8 keys of block 4
    with pytest.raises(ValueError, match=r"`key_descriptors` must be \(means \(1, 2, 2, 4\), counts \(1, 2\)\)"):
        route_blocks(q, q, block_size=4, top_k=2, key_descriptors=(means, counts))


def test_flex_on_cpu_with_gradients_raises_instead_of_falling_back():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="FlexAttention has no backward pass on CPU"):
        routed_attention(q, q, q, block_size=4, top_k=2, backend="flex")
    assert not check_flex_available(torch.device("cpu"), dtype=torch.float32, requires_grad=True, raise_error=False)


def test_flex_rejects_dtypes_its_kernel_lacks_and_auto_avoids_them():
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16 inputs, got torch.float64"):
        routed_attention(q, q, q, block_size=4, top_k=1, backend="flex")
    options = dict(q_len=16384, k_len=16384, n_key_blocks=256, top_k=8, dropout=0.0, need_weights=False)
    cuda = dict(device=torch.device("cuda"), requires_grad=True, **options)  # a choice: nothing runs on the GPU here
    assert choose_backend("auto", dtype=torch.float64, **cuda) == "gather"
    assert choose_backend("auto", dtype=torch.bfloat16, **cuda) == "flex"


def test_flex_rejects_dropout():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="`flex` backend does not support attention dropout"):
        routed_attention(q, q, q, block_size=4, top_k=2, backend="flex", dropout=0.1)


# -- flex on CPU: compiled forward (each new shape compiles, so a few representative cases) -----------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, q_len, k_len, group, padding, block_size, top_k",
    [
        ("bidirectional", 45, 45, 2, "right", 8, 3),  # block 8: torch's CPU kernel needs the tile workaround
        ("bidirectional", 70, 70, 1, "none", 16, 3),
        ("bidirectional", 20, 20, 1, "none", 16, 3),  # fewer key blocks than top_k: more slots than key tiles
        ("causal", 45, 45, 1, "left", 8, 3),
        ("causal", 50, 50, 1, "none", 8, 5),  # halved tiles: 14 slots for 13 key tiles
        ("cross", 9, 45, 2, "random", 12, 3),
    ],
)
def test_flex_cpu_forward_matches_reference(kind, q_len, k_len, group, padding, block_size, top_k):
    p = dict(
        kind=kind, batch=2, kv_heads=2, q_heads=2 * group, q_len=q_len, k_len=k_len, dim=16, block_size=block_size,
        top_k=top_k, global_blocks=1, padding=padding, seed=5,
    )  # fmt: skip
    query, key, value, options = make_inputs(p)
    with torch.no_grad():
        expected = routed_attention(query, key, value, backend="reference", **options)
        actual = routed_attention(query, key, value, backend="flex", **options)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bidirectional", "causal", "cross"])
def test_flex_cuda_forward_and_backward_match_reference(kind, dtype):
    p = dict(
        kind=kind, batch=2, kv_heads=2, q_heads=4, q_len=300 if kind != "cross" else 70, k_len=300, dim=64, block_size=32,
        top_k=3, global_blocks=1, padding="right", seed=7,
    )  # fmt: skip
    query, key, value, options = make_inputs(p, dtype=dtype)
    query, key, value = (t.cuda().requires_grad_(True) for t in (query, key, value))
    for name in ("key_padding_mask", "query_padding_mask"):
        if options[name] is not None:
            options[name] = options[name].cuda()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    assert_matches_reference(query, key, value, options, "flex", atol=tol, rtol=tol)


@pytest.mark.slow
def test_flex_cpu_fully_padded_sequence_gives_zeros():
    query, key, value = (torch.randn(2, 2, 32, 16) for _ in range(3))
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = routed_attention(
            query, key, value, block_size=16, top_k=1, key_padding_mask=mask, query_padding_mask=mask, backend="flex"
        )
    assert torch.isfinite(out).all() and (out[1] == 0).all()
