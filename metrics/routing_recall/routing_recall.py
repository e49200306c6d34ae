"""Routing recall: how much of the dense attention mass a DualRoute routing plan keeps, as a local `evaluate` module.

DualRoute's level 1 keeps, for every query block (bidirectional self-attention) or query token (causal and
cross-attention), ``top_k`` key blocks; level 2 attends only inside them. Routing is good when the kept blocks hold
most of the attention mass that dense attention would have spent: this metric measures that fraction. Feed it the
dense attention probabilities of a layer (e.g. the same model run with ``attn_implementation="eager"`` and
``output_attentions=True``) and the plan of that layer (``output_router_indices=True`` or ``route_blocks``).

Load it with ``evaluate.load("metrics/routing_recall", block_size=64)`` from the repository root (or with the
folder's absolute path). The module is self-contained (numpy only): `evaluate` copies the script alone into its
module cache, so it must not import the project's package.
"""

import math

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Routing recall is the share of dense attention mass that falls inside the routed key blocks.

For one example with dense attention probabilities A (heads, q_len, k_len) and a routing plan P
(kv_heads, rows, top_k) of key-block indices (-1 = no block), query head h reads the selection of key/value head
h // (heads // kv_heads) (grouped-query attention), query q reads row q // block_size (per_token=False: one row per
query block) or row q (per_token=True: one row per query token), and key t lies in key block t // block_size.
The recall of query row (h, q) is

    recall(h, q) = sum of A[h, q, t] over keys t whose block is selected  /  sum of A[h, q, t] over all keys t

(the denominator is 1 for softmax probabilities; dividing by it keeps rounding out of the result). An example's
recall is the mean over its heads and real query rows (rows where `query_mask` is True and the row has attention
mass; a query that sees no key has none). The result is the mean over examples, so every example counts once
whatever its length. 1.0 means the routing keeps every bit of the dense attention; with uniform attention it equals
the fraction of key blocks kept.
"""

_KWARGS_DESCRIPTION = """
Init or compute keyword arguments (compute overrides init):
    block_size (`int`, required): tokens per key block (`route_block_size`, or `block_size=` of route_blocks).
    per_token (`bool`, defaults to `False`): `False` when plan rows are query blocks (bidirectional
        self-attention, e.g. the encoder), `True` when they are query tokens (causal self-attention and
        cross-attention).

Inputs, one entry per example (`add`, `add_batch` or `compute`):
    attention: dense attention probabilities of one layer, shape `(heads, q_len, k_len)`. A batch may be a
        `(batch, heads, q_len, k_len)` numpy array or torch tensor (e.g. `outputs.attentions[layer]`), or a list
        of per-example nested lists / arrays / tensors; examples may differ in `q_len` and `k_len`. Torch tensors
        of any floating dtype (bfloat16 included) are converted to float32 numpy arrays; values are stored as
        float32.
    plan: the routing plan of the same layer, shape `(kv_heads, rows, top_k)`, key-block indices with -1 for
        padding, as returned by `route_blocks` or `outputs.router_indices[layer]` (batched: `(batch, kv_heads,
        rows, top_k)`). `heads` must be a multiple of `kv_heads`; rows = ceil(q_len / block_size) when
        `per_token=False`, rows = q_len when `per_token=True`.
    query_mask (optional): `(q_len,)` booleans, True = real query; False rows (padding) are left out. Omit it, or
        give an empty list for an example, to count every row. Batched: `(batch, q_len)` or a list.

Returns:
    routing_recall (`float`): between 0 and 1; the mean over examples of the mean over heads and real query rows
        of the fraction of attention mass inside the routed blocks (NaN if no example has a real query row).

Examples:
    >>> recall = evaluate.load("metrics/routing_recall", block_size=2)
    >>> attention = [[[0.5, 0.25, 0.25, 0.0]]]  # one head, one query, four keys: key blocks {0, 1} and {2, 3}
    >>> recall.compute(attention=[attention], plan=[[[[0]]]], per_token=True)
    {'routing_recall': 0.75}
"""

_CITATION = """
@misc{dualroute,
  title={DualRoute: bi-level routing attention for Hugging Face transformers},
  author={The DualRoute Authors},
  year={2025}
}
"""


def _to_numpy(value):
    """Torch tensors (or lists of them) to numpy, floating ones as float32; anything else is returned as is.

    `datasets` can store torch tensors itself but not bfloat16 ones (numpy has no bfloat16), which is what models
    often return; converting here makes every floating dtype work. torch is never imported.
    """
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    if isinstance(value, (list, tuple)):
        return [_to_numpy(item) for item in value]
    return value


def example_recall(attention, plan, query_mask, *, block_size: int, per_token: bool) -> float | None:
    """Mean recall over the heads and real query rows of one example, or None if it has no real row.

    Args:
        attention: ``(heads, q_len, k_len)`` attention probabilities.
        plan: ``(kv_heads, rows, top_k)`` selected key-block indices, ``-1`` = none.
        query_mask: ``(q_len,)`` bool (True = real query), or empty for all rows.
        block_size: tokens per key block (and per query block when ``per_token`` is False).
        per_token: whether plan rows are query tokens (True) or query blocks (False).
    """
    attention = np.asarray(attention, dtype=np.float64)
    plan = np.asarray(plan, dtype=np.int64)
    if attention.ndim != 3:
        raise ValueError(f"attention must be (heads, q_len, k_len) per example, got shape {attention.shape}")
    if plan.ndim != 3:
        raise ValueError(f"plan must be (kv_heads, rows, top_k) per example, got shape {plan.shape}")
    heads, q_len, k_len = attention.shape
    kv_heads, rows, _ = plan.shape
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"attention heads ({heads}) must be a multiple of the plan's kv heads ({kv_heads})")
    n_key_blocks = math.ceil(k_len / block_size)
    expected_rows = q_len if per_token else math.ceil(q_len / block_size)
    if rows != expected_rows:
        raise ValueError(
            f"plan has {rows} rows but q_len={q_len}, block_size={block_size}, per_token={per_token} needs "
            f"{expected_rows}; is per_token (query tokens vs query blocks) or block_size right?"
        )
    if plan.size and (plan.min() < -1 or plan.max() >= n_key_blocks):
        raise ValueError(f"plan holds block indices outside [-1, {n_key_blocks}) for k_len={k_len}")
    query_mask = np.asarray(query_mask, dtype=bool)
    if query_mask.size == 0:
        query_mask = np.ones(q_len, dtype=bool)
    elif query_mask.shape != (q_len,):
        raise ValueError(f"query_mask has shape {query_mask.shape}, expected ({q_len},)")
    if q_len == 0 or k_len == 0:
        return None

    # Attention mass per key block: (heads, q_len, n_key_blocks).
    block_mass = np.add.reduceat(attention, np.arange(0, k_len, block_size), axis=-1)
    # Selected blocks as a bool table; -1 entries land in a spare last column that is dropped.
    chosen = np.zeros((kv_heads, rows, n_key_blocks + 1), dtype=bool)
    np.put_along_axis(chosen, np.where(plan < 0, n_key_blocks, plan), True, axis=-1)
    query_row = np.arange(q_len) if per_token else np.arange(q_len) // block_size
    chosen = np.repeat(chosen[:, query_row, :n_key_blocks], heads // kv_heads, axis=0)  # (heads, q_len, blocks)

    inside = np.sum(block_mass * chosen, axis=-1)
    total = attention.sum(axis=-1)
    counted = query_mask[None, :] & (total > 0)
    if not counted.any():
        return None
    return float(np.mean(inside[counted] / total[counted]))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RoutingRecall(evaluate.Metric):
    """Share of dense attention mass inside the key blocks a DualRoute plan selects (1.0 = nothing lost)."""

    def __init__(self, block_size: int | None = None, per_token: bool = False, **kwargs):
        # `evaluate.load(path, block_size=..., per_token=...)` passes its extra keywords here; the base class would
        # silently drop them.
        self.block_size = block_size
        self.per_token = per_token
        super().__init__(**kwargs)

    def _info(self):
        # Nested sequences, not datasets.Array3D: examples differ in q_len / k_len, and Array3D needs fixed shapes.
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "attention": datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32")))),
                    "plan": datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("int32")))),
                    "query_mask": datasets.Sequence(datasets.Value("bool")),
                }
            ),
        )

    def add_batch(self, *, attention=None, plan=None, query_mask=None, **kwargs):
        """Adds a batch of examples (see the inputs below); `query_mask` may be omitted."""
        if attention is None or plan is None:
            raise ValueError("routing_recall needs both `attention` and `plan`")
        attention, plan = _to_numpy(attention), _to_numpy(plan)
        if len(attention) != len(plan):
            raise ValueError(f"attention has {len(attention)} examples but plan has {len(plan)}")
        query_mask = [[] for _ in range(len(attention))] if query_mask is None else _to_numpy(query_mask)
        return super().add_batch(attention=attention, plan=plan, query_mask=query_mask, **kwargs)

    def add(self, *, attention=None, plan=None, query_mask=None, **kwargs):
        """Adds one example (see the inputs below); `query_mask` may be omitted."""
        if attention is None or plan is None:
            raise ValueError("routing_recall needs both `attention` and `plan`")
        query_mask = [] if query_mask is None else _to_numpy(query_mask)
        return super().add(attention=_to_numpy(attention), plan=_to_numpy(plan), query_mask=query_mask, **kwargs)

    def _compute(self, attention, plan, query_mask, block_size=None, per_token=None):
        block_size = self.block_size if block_size is None else block_size
        per_token = self.per_token if per_token is None else per_token
        if block_size is None or int(block_size) < 1:
            raise ValueError("routing_recall needs a positive block_size (at load or at compute)")
        recalls = [
            example_recall(a, p, m, block_size=int(block_size), per_token=bool(per_token))
            for a, p, m in zip(attention, plan, query_mask)
        ]
        recalls = [value for value in recalls if value is not None]
        return {"routing_recall": float(np.mean(recalls)) if recalls else float("nan")}
