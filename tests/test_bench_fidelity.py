"""benchmarks/bench_fidelity.py on a small scale: the real MiniLM, two news articles cut to 128 tokens, block 16."""

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def measured():
    bench = load_benchmark("bench_fidelity")
    model, tokenizer = bench.load_model_and_tokenizer()
    enc = bench.encode(tokenizer, bench.long_articles(tokenizer, count=2, tokens=128), tokens=128)
    settings = [dict(block_size=16, top_k=k, global_blocks=g) for g in (0, 1) for k in (2, 4, 8)]
    rows = bench.measure(model, enc, settings, batch_size=2)
    return bench, model, rows


def test_recall_and_cosine_are_sound(measured):
    _, model, rows = measured
    assert model.config.route_topk == 4 and model.config.route_block_size == 32  # restored after measuring
    for row in rows:
        assert row["n_blocks"] == 8
        for name in ("recall", "recall_dense_routes", "recall_best"):
            assert 0.0 <= row[name] <= 1.0 + 1e-6, (name, row)
            assert all(0.0 <= value <= 1.0 + 1e-6 for value in row[f"{name}_per_layer"])
        assert len(row["recall_per_layer"]) == 6 and len(row["per_article"]["cosine"]) == 2
        # no routing choice beats the best k blocks per query block
        assert row["recall"] <= row["recall_best"] + 1e-6
        if row["top_k"] == row["n_blocks"]:  # every block: dense attention
            assert row["key_share"] == 1.0
            assert abs(row["recall"] - 1.0) < 1e-5 and abs(row["recall_dense_routes"] - 1.0) < 1e-5
            assert row["cosine_min"] >= 0.9999


def test_recall_grows_with_the_budget(measured):
    _, _, rows = measured
    for g in (0, 1):
        series = sorted((r for r in rows if r["global_blocks"] == g), key=lambda r: r["top_k"])
        for name in ("recall", "recall_dense_routes", "recall_best"):
            values = [r[name] for r in series]
            assert all(a <= b + 1e-6 for a, b in zip(values, values[1:])), (g, name, values)


def test_render_builds_the_readme_table(measured):
    bench, _, rows = measured
    payload = {"config": dict(bench.CONFIG, articles=2, tokens=128, block_sizes=[16]), "rows": rows}
    text = bench.render(payload)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| block | top-k | keys read | global block | recall | mean cosine | min cosine |"
    # 25% and 50% of 128 tokens at block 16 are top-2 and top-4, each with and without the global block
    assert [line.split(" | ")[1:4] for line in lines[2:]] == [
        ["2", "25%", "yes"],
        ["2", "25%", "no"],
        ["4", "50%", "yes"],
        ["4", "50%", "no"],
    ]
    assert "2 news articles of 128 tokens" in text


def test_budgets_cover_one_block_to_all():
    bench = load_benchmark("bench_fidelity")
    assert bench.budgets(16, 0) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert bench.budgets(16, 1) == [2, 3, 4, 6, 8, 12, 16]
    assert bench.budgets(8, 0) == [1, 2, 3, 4, 6, 8]
    assert bench.budgets(32, 0)[-3:] == [16, 24, 32]
