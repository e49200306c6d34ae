"""Slow, loop-based twins of the router and of routed attention, written from DESIGN.md section 1 line by line.

They share no code with the package, so a test that compares against them checks the semantics, not the code.
"""

from __future__ import annotations

import math

import torch


def naive_select(scores_row, *, candidates, forced, top_k):
    """One row of level 1: forced candidates first, then the best remaining candidates, ties to the lower index."""
    chosen = [j for j in dict.fromkeys(forced) if j in candidates]
    rest = [j for j in candidates if j not in chosen]
    rest.sort(key=lambda j: (-scores_row[j], j))
    chosen += rest[: max(0, top_k - len(chosen))]
    return sorted(chosen)


def naive_route(
    query,
    key,
    *,
    block_size,
    top_k,
    causal=False,
    cross=False,
    key_padding_mask=None,
    query_padding_mask=None,
    global_blocks=0,
):
    """Returns a nested list plan[b][h][row] = sorted list of key blocks (rows: query blocks or tokens)."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    n_key_blocks = math.ceil(k_len / block_size)
    n_query_blocks = math.ceil(q_len / block_size)
    kpm = key_padding_mask if key_padding_mask is not None else torch.ones(batch, k_len, dtype=torch.bool)
    qpm = query_padding_mask if query_padding_mask is not None else torch.ones(batch, q_len, dtype=torch.bool)
    q64, k64 = query.double(), key.double()
    per_token = causal or cross
    plan = []
    for b in range(batch):
        plan_b = []
        for h in range(kv_heads):
            key_means = {}
            for j in range(n_key_blocks):
                visible = [t for t in range(j * block_size, min(k_len, (j + 1) * block_size)) if kpm[b, t]]
                if visible:
                    key_means[j] = torch.stack([k64[b, h, t] for t in visible]).mean(0)
            rows = []
            for row in range(q_len if per_token else n_query_blocks):
                heads = range(h * group, (h + 1) * group)
                if per_token:
                    descriptor = torch.stack([q64[b, g, row] for g in heads]).mean(0)
                    position = k_len - q_len + row if causal else None
                else:
                    visible = [t for t in range(row * block_size, min(q_len, (row + 1) * block_size)) if qpm[b, t]]
                    if visible:
                        descriptor = torch.stack(
                            [torch.stack([q64[b, g, t] for t in visible]).mean(0) for g in heads]
                        ).mean(0)
                    else:
                        descriptor = torch.zeros(query.shape[-1], dtype=torch.float64)
                    position = None
                scores = {j: float(descriptor @ m) for j, m in key_means.items()}
                candidates = [j for j in key_means if position is None or j * block_size <= position]
                forced = list(range(global_blocks))
                if not cross:
                    forced.append(position // block_size if per_token else row)
                rows.append(naive_select(scores, candidates=candidates, forced=forced, top_k=top_k))
            plan_b.append(rows)
        plan.append(plan_b)
    return plan


def plan_to_lists(plan: torch.Tensor):
    return [[[[j for j in row.tolist() if j >= 0] for row in head] for head in batch] for batch in plan]


def naive_attention(
    query, key, value, plan_lists, *, block_size, causal=False, cross=False, key_padding_mask=None, scale=None
):
    """Loops over every (batch, head, query): softmax over the visible keys of its selected blocks, zeros if none."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    kpm = key_padding_mask if key_padding_mask is not None else torch.ones(batch, k_len, dtype=torch.bool)
    out = torch.zeros(batch, q_heads, q_len, dim, dtype=torch.float64)
    per_token = causal or cross
    for b in range(batch):
        for hq in range(q_heads):
            h = hq // group
            for t in range(q_len):
                blocks = plan_lists[b][h][t if per_token else t // block_size]
                position = k_len - q_len + t
                keys = [
                    s
                    for j in blocks
                    for s in range(j * block_size, min(k_len, (j + 1) * block_size))
                    if kpm[b, s] and (not causal or s <= position)
                ]
                if not keys:
                    continue
                scores = torch.stack([query[b, hq, t].double() @ key[b, h, s].double() for s in keys]) * scale
                weights = torch.softmax(scores, 0)
                out[b, hq, t] = sum(w * value[b, h, s].double() for w, s in zip(weights, keys))
    return out
