"""Fidelity of routing on a real pretrained model: how much of dense attention DualRoute keeps, and what it costs the
sentence embedding. No training: the pretrained all-MiniLM-L6-v2 is converted weight for weight and then routed.

    python benchmarks/bench_fidelity.py                     # 24 articles, writes results/fidelity_minilm.{json,png}
    python benchmarks/bench_fidelity.py --articles 4 --block-sizes 32    # a quick look

Inputs: news articles (title, subtitle, text) that are at least 512 MiniLM tokens long, truncated to exactly 512, so no
input is padded; taken round-robin across the outlets (so no single outlet's style dominates), in corpus order.

For every block size B (16, 32, 64), every key budget top-k from 1 block to all blocks, and 0 or 1 global block
(top-k must hold the query's own block plus the global ones, so with a global block the smallest k is 2):

- **cosine**: cosine similarity between the routed and the dense model's sentence embeddings (mean-pooled
  ``last_hidden_state``, L2-normalised, as all-MiniLM-L6-v2 is used); mean and minimum over articles.
- **recall**: the share of dense attention mass that falls inside the key blocks DualRoute reads. For each layer,
  head and query, the mass the *dense* model (``eager``, the oracle) puts on the key blocks that the routed model
  selected for that query's block; averaged over queries, heads, layers and articles (per layer too). The routes come
  from the routed model's own forward (``output_router_indices``), i.e. what it actually reads, while the attention it
  is scored against is the dense model's: the routed model's hidden states drift from the dense ones in later layers,
  and the question is how much of what the dense model attends to the routed model still sees. Two references, both
  scored against the same dense attention:
  - **recall_dense_routes**: routes that `route_blocks` picks from the *dense* model's own queries and keys (captured
    with hooks on the projections) — the router alone, without the drift of the layers below;
  - **recall_best**: the k key blocks with the most dense mass per query block — the best any choice of k blocks per
    query block can do (no forced blocks), an upper bound.
- **key_share**: the key budget as a share of the sequence, ``k·B / 512``.

The dense forward (embeddings, attention mass per block, queries and keys) runs once per batch of articles and is
reused by every setting; routed forwards run under ``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections import defaultdict

import torch
from transformers import AutoTokenizer

from modeling_dualroute import assets, route_blocks
from modeling_dualroute.conversion import convert

from common import machine, markdown_table, write_json


CONFIG = dict(
    model="sentence-transformers/all-MiniLM-L6-v2",
    tokens=512,
    articles=24,
    block_sizes=[16, 32, 64],
    global_blocks=[0, 1],
    batch_size=4,
    dtype="float32",
)
README_SHARES = (0.25, 0.5)  # key budgets shown in the README table


# ---------------------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------------------


def load_model_and_tokenizer():
    """The pretrained MiniLM converted to a `DualRouteModel` (routing settings are changed per call later)."""
    model, _ = convert(str(assets.minilm_dir()), None, task="base", block_size=32, topk=4, global_blocks=1)
    tokenizer = AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
    return model.eval(), tokenizer


def article_text(article: dict) -> str:
    return "\n".join(part for part in (article["title"], article["subtitle"], article["text"]) if part)


def long_articles(tokenizer, count: int, tokens: int) -> list[dict]:
    """``count`` articles with at least ``tokens`` tokens, round-robin over the outlets, each in corpus order."""
    by_outlet = defaultdict(list)
    for article in assets.news_articles():
        by_outlet[article["outlet"]].append(article)

    def long_enough(article: dict) -> bool:
        # truncating to `tokens` and checking the length tells "long enough" without tokenizing whole texts and
        # without the tokenizer's warning about inputs longer than the model
        return len(tokenizer(article_text(article), truncation=True, max_length=tokens)["input_ids"]) == tokens

    streams = {outlet: filter(long_enough, articles) for outlet, articles in sorted(by_outlet.items())}
    chosen = []
    while streams and len(chosen) < count:
        for outlet in list(streams):
            article = next(streams[outlet], None)
            if article is None:
                del streams[outlet]
            elif len(chosen) < count:
                chosen.append(article)
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} articles have {tokens} tokens or more; asked for {count}.")
    return chosen


def encode(tokenizer, articles: list[dict], tokens: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        [article_text(a) for a in articles], truncation=True, max_length=tokens, padding=True, return_tensors="pt"
    )
    # Recall averages over queries and assumes no padding; `long_articles` guarantees it.
    assert bool(enc["attention_mask"].all()), "every input must be exactly `tokens` long (no padding)"
    return dict(enc)


def budgets(n_blocks: int, global_blocks: int) -> list[int]:
    """Top-k values 1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to all blocks; at least the forced own + global blocks."""
    ks = {n_blocks}
    power = 1
    while power < n_blocks:
        ks |= {power, power + power // 2}
        power *= 2
    return sorted(k for k in ks if 1 + global_blocks <= k <= n_blocks)


def settings_for(length: int, block_sizes: list[int], global_options: list[int]) -> list[dict]:
    return [
        dict(block_size=block_size, top_k=k, global_blocks=g)
        for block_size in block_sizes
        for g in global_options
        for k in budgets(math.ceil(length / block_size), g)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalised: how all-MiniLM-L6-v2 embeds sentences."""
    mask = attention_mask[..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def block_mass(attention: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(b, h, q, k)`` probabilities -> ``(b, h, query blocks, key blocks)``: attention mass summed over the queries
    of each query block and the keys of each key block (the last block may be ragged)."""
    batch, heads, q_len, k_len = attention.shape
    nq, nk = math.ceil(q_len / block_size), math.ceil(k_len / block_size)
    padded = torch.nn.functional.pad(attention, (0, nk * block_size - k_len, 0, nq * block_size - q_len))
    return padded.view(batch, heads, nq, block_size, nk, block_size).sum(dim=(3, 5))


@torch.no_grad()
def dense_reference(model, enc: dict, block_sizes: list[int]) -> dict:
    """One dense (eager) forward: sentence embeddings, dense attention mass per (query block, key block) for every
    block size, and every layer's queries and keys (for routes chosen on the dense model's own activations)."""
    captured = defaultdict(dict)
    hooks = []
    for index, layer in enumerate(model.layers):
        attention = layer.self_attn
        for name in ("q_proj", "k_proj"):

            def keep(module, inputs, output, index=index, name=name, head_dim=attention.head_dim):
                batch, length, _ = output.shape
                captured[index][name] = output.view(batch, length, -1, head_dim).transpose(1, 2)

            hooks.append(getattr(attention, name).register_forward_hook(keep))
    model.set_attn_implementation("eager")
    try:
        out = model(**enc, output_attentions=True)
    finally:
        model.set_attn_implementation("dualroute")
        for hook in hooks:
            hook.remove()
    return {
        "embedding": sentence_embedding(out.last_hidden_state, enc["attention_mask"]),
        # per block size: (layers, batch, heads, query blocks, key blocks); kept instead of the probabilities, which
        # would take 6 x 12 x 512 x 512 floats per article
        "mass": {b: torch.stack([block_mass(a.float(), b) for a in out.attentions]) for b in block_sizes},
        "queries_keys": [(captured[i]["q_proj"], captured[i]["k_proj"]) for i in range(len(model.layers))],
        "queries": enc["input_ids"].shape[1],
    }


def recall_of_plans(mass: torch.Tensor, plans: list[torch.Tensor], queries: int) -> torch.Tensor:
    """Share of dense mass inside the selected blocks, ``(batch, layers)``, averaged over heads and queries.

    ``mass``: ``(layers, b, heads, nq, nk)`` summed over queries; ``plans``: per layer ``(b, kv_heads, nq, k)``, -1
    padded (query heads sharing a key/value head share its plan).
    """
    recalls = []
    for layer_mass, plan in zip(mass, plans):
        n_key_blocks = layer_mass.shape[-1]
        chosen = torch.zeros(*plan.shape[:-1], n_key_blocks + 1, dtype=layer_mass.dtype)
        chosen.scatter_(-1, torch.where(plan < 0, n_key_blocks, plan), 1.0)  # -1 padding lands in a dropped column
        chosen = chosen[..., :n_key_blocks].repeat_interleave(layer_mass.shape[1] // plan.shape[1], dim=1)
        recalls.append((layer_mass * chosen).sum(dim=(-1, -2)).mean(dim=1) / queries)
    return torch.stack(recalls, dim=1)


def best_recall(mass: torch.Tensor, top_k: int, queries: int) -> torch.Tensor:
    """Recall of the ``top_k`` key blocks with the most dense mass per query block, ``(batch, layers)``."""
    best = mass.topk(min(top_k, mass.shape[-1]), dim=-1).values.sum(dim=(-1, -2)).mean(dim=2) / queries
    return best.transpose(0, 1)


@torch.no_grad()
def measure_setting(model, enc: dict, dense: dict, setting: dict) -> dict:
    """One routed forward with ``setting``; per article: cosine to dense and the three recalls per layer."""
    model.config.route_block_size = setting["block_size"]
    model.config.route_topk = setting["top_k"]
    model.config.route_global_blocks = setting["global_blocks"]
    out = model(**enc, output_router_indices=True)
    embedding = sentence_embedding(out.last_hidden_state, enc["attention_mask"])
    mass = dense["mass"][setting["block_size"]]
    n_query_blocks = mass.shape[-2]
    plans = list(out.router_indices)
    if any(plan.shape[2] != n_query_blocks for plan in plans):
        raise AssertionError("expected one route per query block (bidirectional self-attention)")
    dense_plans = [route_blocks(q, k, **setting) for q, k in dense["queries_keys"]]
    return {
        "cosine": (embedding * dense["embedding"]).sum(-1),
        "recall": recall_of_plans(mass, plans, dense["queries"]),
        "recall_dense_routes": recall_of_plans(mass, dense_plans, dense["queries"]),
        "recall_best": best_recall(mass, setting["top_k"], dense["queries"]),
    }


def measure(model, enc: dict, settings: list[dict], batch_size: int, progress=None) -> list[dict]:
    """Every setting on every input; returns one row per setting with per-article raw numbers and their means."""
    original = {k: getattr(model.config, k) for k in ("route_block_size", "route_topk", "route_global_blocks")}
    block_sizes = sorted({s["block_size"] for s in settings})
    n_inputs, length = enc["input_ids"].shape
    parts = defaultdict(lambda: defaultdict(list))  # setting index -> measure -> per-batch tensors
    try:
        for start in range(0, n_inputs, batch_size):
            batch = {name: tensor[start : start + batch_size] for name, tensor in enc.items()}
            dense = dense_reference(model, batch, block_sizes)
            for index, setting in enumerate(settings):
                for name, value in measure_setting(model, batch, dense, setting).items():
                    parts[index][name].append(value)
            if progress:
                progress(min(start + batch_size, n_inputs), n_inputs)
    finally:
        for name, value in original.items():
            setattr(model.config, name, value)
    rows = []
    for index, setting in enumerate(settings):
        values = {name: torch.cat(chunks) for name, chunks in parts[index].items()}
        row = dict(setting)
        row["n_blocks"] = math.ceil(length / setting["block_size"])
        row["key_share"] = min(1.0, setting["top_k"] * setting["block_size"] / length)
        row["cosine_mean"] = values["cosine"].mean().item()
        row["cosine_min"] = values["cosine"].min().item()
        for name in ("recall", "recall_dense_routes", "recall_best"):
            row[name] = values[name].mean().item()
            row[f"{name}_per_layer"] = _rounded(values[name].mean(0))
        row["per_article"] = {"cosine": _rounded(values["cosine"]), "recall_per_layer": _rounded(values["recall"])}
        rows.append(row)
    return rows


def _rounded(tensor: torch.Tensor, digits: int = 6):
    """Raw numbers for the JSON, rounded so that it stays readable (float32 noise is ~1e-7 anyway)."""
    values = tensor.tolist()
    if isinstance(values, float):
        return round(values, digits)
    return [_rounded(torch.tensor(v), digits) if isinstance(v, list) else round(v, digits) for v in values]


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def render(payload: dict, shares: tuple[float, ...] = README_SHARES) -> str:
    """The README table: per block size and key budget (share of the sequence), with and without a global block."""
    config = payload["config"]
    table = []
    for block_size in config["block_sizes"]:
        for share in shares:
            for g in sorted(config["global_blocks"], reverse=True):
                row = _find(payload["rows"], block_size, g, share)
                if row is None:
                    continue
                table.append(
                    [
                        block_size,
                        row["top_k"],
                        f"{share:.0%}",
                        "yes" if g else "no",
                        f"{row['recall']:.3f}",
                        f"{row['cosine_mean']:.4f}",
                        f"{row['cosine_min']:.4f}",
                    ]
                )
    intro = (
        f"{config['model']} converted as is (no training), {config['articles']} news articles of {config['tokens']} "
        "tokens. Recall: share of the dense model's attention mass inside the key blocks the routed model reads "
        "(mean over layers, heads, queries, articles). Cosine: routed vs dense sentence embedding."
    )
    header = ["block", "top-k", "keys read", "global block", "recall", "mean cosine", "min cosine"]
    return intro + "\n\n" + markdown_table(header, table)


def _find(rows: list[dict], block_size: int, global_blocks: int, share: float) -> dict | None:
    for row in rows:
        if (row["block_size"], row["global_blocks"]) == (block_size, global_blocks):
            if math.isclose(row["key_share"], share):
                return row
    return None


def plot(payload: dict, path) -> None:
    """Recall and mean cosine against the key budget: one colour per block size, solid with a global block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = dict(zip(payload["config"]["block_sizes"], ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    rows = payload["rows"]
    for (block_size, g), group in itertools.groupby(
        sorted(rows, key=lambda r: (r["block_size"], -r["global_blocks"], r["top_k"])),
        key=lambda r: (r["block_size"], r["global_blocks"]),
    ):
        group = list(group)
        style = dict(color=colours[block_size], linestyle="-" if g else "--", marker="o" if g else "x", markersize=4)
        label = f"B={block_size}, {'1 global block' if g else 'no global block'}"
        shares = [r["key_share"] for r in group]
        axes[0].plot(shares, [r["recall"] for r in group], label=label, **style)
        axes[1].plot(shares, [r["cosine_mean"] for r in group], label=label, **style)
    for axis, title in zip(axes, ("recall of dense attention mass", "cosine to dense sentence embedding (mean)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1])
        axis.set_xticklabels(["3%", "6%", "12.5%", "25%", "50%", "100%"])
        axis.set_xlabel("key budget (share of the 512 tokens read per query)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[1].legend(fontsize=8, loc="lower right")
    config = payload["config"]
    fig.suptitle(f"DualRoute on pretrained all-MiniLM-L6-v2, no training ({config['articles']} news articles)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_progress(done: int, total: int) -> None:
    print(f"  {done}/{total} articles", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=CONFIG["articles"])
    parser.add_argument("--tokens", type=int, default=CONFIG["tokens"])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=CONFIG["block_sizes"])
    parser.add_argument("--batch-size", type=int, default=CONFIG["batch_size"])
    parser.add_argument("--out", default="fidelity_minilm.json")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer()
    articles = long_articles(tokenizer, args.articles, args.tokens)
    enc = encode(tokenizer, articles, args.tokens)
    settings = settings_for(args.tokens, args.block_sizes, CONFIG["global_blocks"])
    print(f"{len(articles)} articles x {len(settings)} settings", flush=True)
    rows = measure(model, enc, settings, args.batch_size, progress=report_progress)
    full = [r for r in rows if r["top_k"] >= r["n_blocks"]]
    # top-k covering every block must reproduce dense attention: a check that the comparison itself is sound
    if any(abs(r["recall"] - 1.0) > 1e-5 or r["cosine_min"] < 0.9999 for r in full):
        raise AssertionError(f"full budget differs from dense: {[(r['recall'], r['cosine_min']) for r in full]}")

    config = dict(CONFIG, articles=len(articles), tokens=args.tokens, block_sizes=args.block_sizes)
    config["batch_size"] = args.batch_size
    payload = {
        "benchmark": "fidelity",
        "machine": machine(),
        "config": config,
        "articles": [{"title": a["title"], "outlet": a["outlet"]} for a in articles],
        "runtime_s": time.perf_counter() - started,
        "rows": rows,
    }
    path = write_json(args.out, payload)
    plot(payload, path.with_suffix(".png"))
    print(render(payload))
    print(f"wrote {path} and {path.with_suffix('.png')} in {payload['runtime_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
