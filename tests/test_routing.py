"""Level 1: the router against hand-computed cases and the loop oracle."""

import math
import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from modeling_dualroute import route_blocks
from modeling_dualroute.routing_dualroute import block_descriptors, select_blocks, top_k_indices

from oracles import naive_route, naive_select, plan_to_lists


def unit_keys(batch, heads, blocks, block_size, dim, directions):
    """Keys whose block j is the constant vector e_{directions[j]} (so block means are exact)."""
    key = torch.zeros(batch, heads, blocks * block_size, dim)
    for j, direction in enumerate(directions):
        key[:, :, j * block_size : (j + 1) * block_size, direction] = 1.0
    return key


# -- hand-computed cases ----------------------------------------------------------------------------------------------


def test_bidirectional_picks_own_block_then_best_scores():
    # 4 key blocks of 2 tokens; block j's keys point along axis j; block i's queries point along axis 3.
    key = unit_keys(1, 1, 4, 2, 4, [0, 1, 2, 3])
    query = torch.zeros(1, 1, 8, 4)
    query[..., 3] = 1.0
    query[..., 1] = 0.5
    plan = route_blocks(query, key, block_size=2, top_k=2)
    # every query block: its own block (forced) + block 3 (score 1.0); block 3 itself adds block 1 (score 0.5)
    assert plan.tolist() == [[[[0, 3], [1, 3], [2, 3], [1, 3]]]]


def test_global_blocks_are_forced_and_counted_in_budget():
    key = unit_keys(1, 1, 4, 2, 4, [0, 1, 2, 3])
    query = torch.zeros(1, 1, 8, 4)
    query[..., 2] = 1.0
    plan = route_blocks(query, key, block_size=2, top_k=3, global_blocks=1)
    # exact expectation: forced {0, own}; remaining slot to block 2 (score 1), ties among the others to lower index
    assert plan.tolist() == [[[[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 2, 3]]]]


def test_ties_go_to_the_lower_block_index():
    key = torch.zeros(1, 1, 10, 2)  # five identical blocks of 2: every score ties
    query = torch.ones(1, 1, 10, 2)
    plan = route_blocks(query, key, block_size=2, top_k=3)
    assert plan.tolist() == [[[[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 3], [0, 1, 4]]]]


def test_all_padding_blocks_are_never_chosen():
    key = unit_keys(1, 1, 4, 2, 4, [0, 1, 2, 3])
    query = torch.ones(1, 1, 8, 4)
    mask = torch.tensor([[True, True, False, False, True, False, False, False]])
    plan = route_blocks(query, key, block_size=2, top_k=3, key_padding_mask=mask, query_padding_mask=mask)
    # blocks 1 and 3 hold no real key: only 0 and 2 are candidates, so every row keeps just those two
    for row in plan[0, 0].tolist():
        assert [j for j in row if j >= 0] == [0, 2]
        assert row[-1] == -1


def test_fewer_candidates_than_top_k_keeps_all_candidates():
    query, key = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    plan = route_blocks(query, key, block_size=2, top_k=6)  # 3 key blocks
    assert plan.shape == (2, 2, 3, 6)
    assert (plan[..., :3] == torch.arange(3)).all() and (plan[..., 3:] == -1).all()


def test_causal_routes_per_token_over_past_blocks_only():
    key = unit_keys(1, 1, 3, 2, 3, [0, 1, 2])
    query = torch.zeros(1, 1, 6, 3)
    query[..., 2] = 1.0  # everyone prefers block 2, which only tokens 4 and 5 may see
    query[..., 1] = 0.5
    plan = route_blocks(query, key, block_size=2, top_k=2, causal=True)
    assert plan.shape == (1, 1, 6, 2)
    assert plan[0, 0].tolist() == [[0, -1], [0, -1], [0, 1], [0, 1], [1, 2], [1, 2]]


def test_causal_with_cache_queries_are_the_last_positions():
    key = unit_keys(1, 1, 3, 2, 3, [0, 1, 2])
    query = torch.zeros(1, 1, 1, 3)
    query[..., 0] = 1.0
    plan = route_blocks(query, key[:, :, :5], block_size=2, top_k=2, causal=True)  # query at position 4
    assert plan.tolist() == [[[[0, 2]]]]


def test_cross_attention_has_no_own_block():
    key = unit_keys(1, 1, 3, 2, 3, [0, 1, 2])
    query = torch.zeros(1, 1, 2, 3)
    query[0, 0, 0, 2] = 1.0
    query[0, 0, 1, 1] = 1.0
    plan = route_blocks(query, key, block_size=2, top_k=1, cross=True)
    assert plan.tolist() == [[[[2], [1]]]]
    plan = route_blocks(query, key, block_size=2, top_k=1, cross=True, global_blocks=1)
    assert plan.tolist() == [[[[0], [0]]]]


def test_gqa_scores_average_over_the_group():
    # two query heads share one key head: head 0 prefers block 1 strongly, head 1 prefers block 2 weakly
    key = unit_keys(1, 1, 3, 1, 3, [0, 1, 2])
    query = torch.zeros(1, 2, 1, 3)
    query[0, 0, 0, 1] = 2.0
    query[0, 1, 0, 2] = 1.0
    plan = route_blocks(query, key, block_size=1, top_k=1, cross=True)
    assert plan.tolist() == [[[[1]]]]


def test_ragged_last_block_descriptor_is_mean_of_its_real_keys():
    key = torch.arange(5.0).view(1, 1, 5, 1)
    means, counts = block_descriptors(key, 2, None)
    assert means.flatten().tolist() == [0.5, 2.5, 4.0]
    assert counts.tolist() == [[2, 2, 1]]
    mask = torch.tensor([[True, False, True, True, False]])
    means, counts = block_descriptors(key, 2, mask)
    assert means.flatten().tolist() == [0.0, 2.5, 0.0]
    assert counts.tolist() == [[1, 2, 0]]


def test_descriptors_are_float32_for_half_inputs():
    key = torch.randn(1, 2, 7, 4, dtype=torch.bfloat16)
    means, _ = block_descriptors(key, 3, None)
    assert means.dtype == torch.float32


def test_plan_is_independent_of_other_sequences_in_the_batch():
    query, key = torch.randn(3, 2, 11, 4), torch.randn(3, 2, 11, 4)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    plan = route_blocks(query, key, block_size=3, top_k=2, key_padding_mask=mask, query_padding_mask=mask)
    alone = route_blocks(query[1:2, :, :7], key[1:2, :, :7], block_size=3, top_k=2)
    assert torch.equal(plan[1:2, :, : alone.shape[2]], alone)


# -- selection logic against the loop oracle, on planted ties and -inf ------------------------------------------------


@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 9),
    top_k=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_top_k_indices_matches_naive_selection_with_ties(rows, n, top_k, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(-2, 3, (rows, n), generator=generator).float()  # many exact ties
    scores[scores == -2] = float("-inf")
    got = top_k_indices(scores, top_k)
    for r in range(rows):
        candidates = [j for j in range(n) if scores[r, j] > float("-inf")]
        want = naive_select(scores[r].tolist(), candidates=candidates, forced=[], top_k=top_k)
        assert got[r].tolist() == want + [-1] * (top_k - len(want))


@given(
    q_blocks=st.integers(1, 5),
    n_key_blocks=st.integers(1, 6),
    top_k=st.integers(2, 6),
    global_blocks=st.integers(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_select_blocks_forced_and_candidates(q_blocks, n_key_blocks, top_k, global_blocks, seed):
    q_blocks = min(q_blocks, n_key_blocks)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (1, 1, q_blocks, n_key_blocks), generator=generator).float()
    counts = torch.randint(0, 2, (1, n_key_blocks), generator=generator)
    plan = select_blocks(
        scores.clone(),  # it overwrites its scores
        counts,
        block_size=4,
        top_k=top_k,
        causal=False,
        cross=False,
        global_blocks=global_blocks,
        query_offset=0,
    )
    for i in range(q_blocks):
        candidates = [j for j in range(n_key_blocks) if counts[0, j] > 0]
        want = naive_select(
            scores[0, 0, i].tolist(), candidates=candidates, forced=list(range(global_blocks)) + [i], top_k=top_k
        )
        assert plan[0, 0, i].tolist() == want + [-1] * (top_k - len(want))


@given(
    kind=st.sampled_from(["bidirectional", "causal", "cross"]),
    rows=st.integers(2, 6),
    n_key_blocks=st.integers(2, 7),
    extra_top_k=st.integers(0, 3),
    global_blocks=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_row_routed_alone_equals_the_row_routed_with_others(
    kind, rows, n_key_blocks, extra_top_k, global_blocks, seed
):
    """`select_blocks` on one row (a decoding step) takes its own path: slices at known positions instead of masks.
    The multi-row path is its oracle, with many exact ties and blocks without visible keys."""
    block_size = 3
    causal, cross = kind == "causal", kind == "cross"
    top_k = max(1, global_blocks + (not cross)) + extra_top_k  # room for the forced blocks, as `route_blocks` requires
    if kind == "bidirectional":
        rows = min(rows, n_key_blocks)
    query_offset = n_key_blocks * block_size - rows if causal else 0  # causal rows: the last positions (rows <= 6)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (2, 2, rows, n_key_blocks), generator=generator).float()
    counts = torch.randint(0, 2, (2, n_key_blocks), generator=generator)
    options = dict(block_size=block_size, top_k=top_k, causal=causal, cross=cross, global_blocks=global_blocks)
    together = select_blocks(scores.clone(), counts, query_offset=query_offset, **options)
    for row in range(rows):
        alone = select_blocks(
            scores[:, :, row : row + 1].clone(), counts, query_offset=query_offset, row_offset=row, **options
        )
        assert torch.equal(alone, together[:, :, row : row + 1])


# -- end to end against the loop oracle --------------------------------------------------------------------------------


@st.composite
def routing_problems(draw):
    kind = draw(st.sampled_from(["bidirectional", "causal", "cross"]))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, 2))
    block_size = draw(st.integers(1, 5))
    k_len = draw(st.integers(1, 17))
    if kind == "bidirectional":
        q_len = k_len
    elif kind == "causal":
        q_len = draw(st.integers(1, k_len))
    else:
        q_len = draw(st.integers(1, 9))
    global_blocks = draw(st.integers(0, 2))
    forced = global_blocks + (kind != "cross")
    top_k = draw(st.integers(max(1, forced), forced + 4))
    padding = draw(st.sampled_from(["none", "right", "left", "random"]))
    return dict(
        kind=kind,
        batch=draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        q_heads=kv_heads * group,
        q_len=q_len,
        k_len=k_len,
        dim=draw(st.sampled_from([2, 4])),
        block_size=block_size,
        top_k=top_k,
        global_blocks=global_blocks,
        padding=padding,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_mask(batch, length, padding, generator):
    if padding == "none":
        return None
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b in range(batch):
        n_pad = int(torch.randint(0, length, (1,), generator=generator))
        if padding == "right":
            mask[b, length - n_pad :] = False
        elif padding == "left":
            mask[b, :n_pad] = False
        else:
            mask[b] = torch.rand(length, generator=generator) > 0.3
    return mask


@given(routing_problems())
def test_route_blocks_matches_loop_oracle(p):
    generator = torch.Generator().manual_seed(p["seed"])
    query = torch.randn(p["batch"], p["q_heads"], p["q_len"], p["dim"], generator=generator)
    key = torch.randn(p["batch"], p["kv_heads"], p["k_len"], p["dim"], generator=generator)
    key_mask = make_mask(p["batch"], p["k_len"], p["padding"], generator)
    query_mask = key_mask if p["kind"] == "bidirectional" else None
    options = dict(
        block_size=p["block_size"],
        top_k=p["top_k"],
        causal=p["kind"] == "causal",
        cross=p["kind"] == "cross",
        key_padding_mask=key_mask,
        query_padding_mask=query_mask,
        global_blocks=p["global_blocks"],
    )
    plan = route_blocks(query, key, **options)
    rows = math.ceil(p["q_len"] / p["block_size"]) if p["kind"] == "bidirectional" else p["q_len"]
    assert plan.shape == (p["batch"], p["kv_heads"], rows, p["top_k"])
    assert plan_to_lists(plan) == naive_route(query, key, **options)
    # sorted ascending, -1 only as right padding
    valid = plan >= 0
    assert (valid[..., 1:] <= valid[..., :-1]).all()
    big = torch.where(valid, plan, 10**9)
    assert (big[..., 1:] > big[..., :-1])[valid[..., 1:]].all()


@given(routing_problems(), st.integers(1, 3), st.integers(2, 3))
def test_per_token_routing_in_steps_equals_one_step(p, min_rows, steps):
    """Long per-token inputs are routed a few rows at a time: causal rows in a few steps, each scoring only the blocks
    up to its last row, and any per-token input in steps of a score budget. Either way the plan is the one routed in
    one step."""
    import modeling_dualroute.routing_dualroute as routing

    assume(p["kind"] != "bidirectional" and p["q_len"] > 1)
    generator = torch.Generator().manual_seed(p["seed"])
    query = torch.randn(p["batch"], p["q_heads"], p["q_len"], p["dim"], generator=generator)
    key = torch.randn(p["batch"], p["kv_heads"], p["k_len"], p["dim"], generator=generator)
    options = dict(
        block_size=p["block_size"], top_k=p["top_k"], causal=p["kind"] == "causal", cross=p["kind"] == "cross",
        key_padding_mask=make_mask(p["batch"], p["k_len"], p["padding"], generator), global_blocks=p["global_blocks"],
    )  # fmt: skip
    whole = route_blocks(query, key, **options)
    with pytest.MonkeyPatch.context() as patch:  # causal steps of several rows
        patch.setattr(routing, "_MIN_ROWS_PER_STEP", min_rows)
        patch.setattr(routing, "_CAUSAL_STEPS", steps)
        assert torch.equal(route_blocks(query, key, **options), whole)
    with pytest.MonkeyPatch.context() as patch:  # a score budget of two rows per step
        n_key_blocks = math.ceil(p["k_len"] / p["block_size"])
        patch.setattr(routing, "_MAX_SCORE_ELEMENTS_PER_STEP", 2 * p["batch"] * p["kv_heads"] * n_key_blocks)
        assert torch.equal(route_blocks(query, key, **options), whole)


# -- errors -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(block_size=0), ValueError, "`block_size` must be >= 1"),
        (dict(block_size=2.0), TypeError, "`block_size` must be an int"),
        (dict(top_k=0), ValueError, "`top_k` must be >= 1"),
        (dict(top_k=1, global_blocks=1), ValueError, "top_k >= 1 + global_blocks = 2"),
        (dict(causal=True, cross=True), ValueError, "cannot be combined"),
        (dict(global_blocks=-1), ValueError, "`global_blocks` must be >= 0"),
    ],
)
def test_bad_options_raise_naming_the_argument(kwargs, error, words):
    options = dict(block_size=2, top_k=2) | kwargs
    with pytest.raises(error, match=re.escape(words)):
        route_blocks(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), **options)


def test_bad_shapes_raise_naming_the_argument_and_expected_shape():
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match=r"`query` must have shape \(batch, query_heads, q_len, head_dim\)"):
        route_blocks(q[0], q, block_size=2, top_k=2)
    with pytest.raises(ValueError, match=r"`key` has head_dim 3 but `query` has 4"):
        route_blocks(q, torch.randn(1, 2, 6, 3), block_size=2, top_k=2)
    with pytest.raises(ValueError, match=r"heads \(2\) must be a multiple of `key`/`value` heads \(3\)"):
        route_blocks(q, torch.randn(1, 3, 6, 4), block_size=2, top_k=2)
    with pytest.raises(ValueError, match="q_len == k_len"):
        route_blocks(q, torch.randn(1, 2, 7, 4), block_size=2, top_k=2)
    with pytest.raises(
        ValueError, match=r"`key_padding_mask` must have shape \(batch, seq\) = \(1, 6\), got \(1, 5\)"
    ):
        route_blocks(q, q, block_size=2, top_k=2, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="`key_padding_mask` must be a bool"):
        route_blocks(q, q, block_size=2, top_k=2, key_padding_mask=torch.zeros(1, 6))
    with pytest.raises(TypeError, match="`key` has dtype torch.float64 but `query` has dtype torch.float32"):
        route_blocks(q, q.double(), block_size=2, top_k=2)
    with pytest.raises(TypeError, match="`query` must be a torch.Tensor"):
        route_blocks([1, 2], q, block_size=2, top_k=2)


def test_integer_padding_masks_are_accepted():
    q = torch.randn(1, 2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert torch.equal(
        route_blocks(q, q, block_size=2, top_k=2, key_padding_mask=mask, query_padding_mask=mask),
        route_blocks(q, q, block_size=2, top_k=2, key_padding_mask=mask.bool(), query_padding_mask=mask.bool()),
    )
