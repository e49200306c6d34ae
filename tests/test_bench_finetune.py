"""benchmarks/bench_finetune.py and bench_headlines.py: data preparation, key budgets, rendering, and one tiny
end-to-end training step each (real MiniLM, 64 tokens, one optimiser step). No accuracy is asserted."""

import json
import math

import pytest
import torch

from modeling_dualroute import DualRouteForConditionalGeneration, assets

from helpers import load_benchmark, tiny_seq2seq_config


@pytest.fixture(scope="module")
def finetune():
    return load_benchmark("bench_finetune")


@pytest.fixture(scope="module")
def headlines():
    return load_benchmark("bench_headlines")


@pytest.fixture(scope="module")
def news_rows(finetune):
    return finetune.task_rows("news")


@pytest.fixture
def few_news_articles(monkeypatch):
    """The first 20 articles of each outlet: the end-to-end runs then tokenize ~180 articles, not 3,824."""
    per_outlet = {}
    for article in assets.news_articles():
        per_outlet.setdefault(article["outlet"], []).append(article)
    subset = [article for articles in per_outlet.values() for article in articles[:20]]
    monkeypatch.setattr(assets, "news_articles", lambda: [dict(article) for article in subset])
    return subset


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def test_news_labels_cover_the_nine_outlets(finetune, news_rows):
    names = finetune.label_names(news_rows)
    assert len(names) == 9 and names == sorted(names)
    assert set(names) == {article["outlet"] for article in assets.news_articles()}
    assert len({row["text"].strip() for row in news_rows}) == len(news_rows)  # duplicates dropped


def test_news_splits_are_deterministic_disjoint_and_balanced(finetune, news_rows):
    train, evaluation = finetune.split_per_class(news_rows, train_per_class=10, eval_per_class=5)
    again_train, again_eval = finetune.split_per_class(list(news_rows), train_per_class=10, eval_per_class=5)
    assert (train, evaluation) == (again_train, again_eval)
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
    counts = {name: 0 for name in finetune.label_names(news_rows)}
    for row in evaluation:
        counts[row["label"]] += 1
    assert set(counts.values()) == {5} and len(train) == 90
    # the eval set is fixed: it does not depend on how much training data is drawn
    assert finetune.split_per_class(news_rows, train_per_class=3, eval_per_class=5)[1] == evaluation
    with pytest.raises(ValueError, match="fewer than eval_per_class"):
        finetune.split_per_class(news_rows, train_per_class=10_000, eval_per_class=5)


def test_rotten_tomatoes_rows_are_fresh_or_rotten(finetune):
    rows = finetune.task_rows("rotten_tomatoes")
    assert finetune.label_names(rows) == ["fresh", "rotten"]
    train, evaluation = finetune.split_per_class(rows, train_per_class=50, eval_per_class=20)
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}


def test_headline_split_is_deterministic_and_disjoint(headlines):
    rows = headlines.headline_rows()
    train, evaluation = headlines.split(rows, train_examples=100, eval_examples=20)
    assert (train, evaluation) == headlines.split(rows, train_examples=100, eval_examples=20)
    assert headlines.split(rows, train_examples=7, eval_examples=20)[1] == evaluation
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
    assert not {r["title"].lower() for r in train} & {r["title"].lower() for r in evaluation}
    assert headlines.lead("one two  three four", 2) == "one two"


# ---------------------------------------------------------------------------------------------------------------------
# Key budget
# ---------------------------------------------------------------------------------------------------------------------


def test_key_budget(finetune, headlines):
    news = finetune.TASKS["news"]
    assert finetune.key_share(news["block_size"], news["top_k"], news["max_length"]) == 0.25  # top-4 of 16 blocks
    assert finetune.key_share(32, 4, 100) == 1.0  # no more blocks than top-k: everything is read
    assert finetune.mean_key_share([512, 512], 32, 4, routed_layers=6, layers=6) == 0.25
    assert math.isclose(finetune.mean_key_share([512], 32, 4, routed_layers=5, layers=6), (5 * 0.25 + 1) / 6)
    assert finetune.mean_key_share([512], 32, 4, routed_layers=0, layers=6) == 1.0  # the dense twin
    rt = finetune.TASKS["rotten_tomatoes"]
    assert finetune.key_share(rt["block_size"], rt["top_k"], 24) == 0.25  # a 24-token snippet reads 6 keys
    assert finetune.parse_variant("dense", 0) == ("sdpa", 0)
    assert finetune.parse_variant("dualroute", 1) == ("dualroute", 1)
    assert finetune.parse_variant("dualroute-dl2", 0) == ("dualroute", 2)
    with pytest.raises(ValueError, match="unknown variant"):
        finetune.parse_variant("sparse", 0)
    block_32 = dict(headlines.CONFIG, block_size=32, top_k=4)
    shares = headlines.attention_shares(block_32, source_lengths=[512, 512], target_lengths=[12, 33])
    assert shares == {"encoder": 0.25, "cross": 0.25, "decoder_self": 1.0}  # titles fit in 2 blocks of 32
    shares = headlines.attention_shares(headlines.CONFIG, source_lengths=[128, 128], target_lengths=[12, 33])
    assert shares["encoder"] == shares["cross"] == 0.25 and shares["decoder_self"] < 1.0  # block 8: long titles route


# ---------------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_finetune_payload(finetune):
    runs = []
    for seed, (dense, routed) in enumerate([(0.80, 0.79), (0.82, 0.80), (0.78, 0.78)]):
        for variant, accuracy, share in (("dense", dense, 1.0), ("dualroute", routed, 0.25)):
            runs.append(
                {"task": "news", "variant": variant, "seed": seed, "key_share": share, "accuracy": accuracy,
                 "f1_macro": accuracy - 0.01, "train_s": 100.0 if variant == "dense" else 80.0, "eval_s": 5.0,
                 "peak_train_memory_mb": 900.0, "dense_last_layers": None if variant == "dense" else 0}
            )  # fmt: skip
    options = dict(finetune.TASKS["news"])
    info = {"options": options, "train_examples": 252, "eval_examples": 180, "eval_tokens_median": 512}
    config = {"model": finetune.MODEL, "seeds": [0, 1, 2], "quick": False}
    return {
        "config": config,
        "tasks": {"news": info},
        "runs": runs,
        "rows": finetune.summarise(runs, finetune.VARIANTS),
    }


def test_finetune_render(finetune):
    payload = synthetic_finetune_payload(finetune)
    rows = payload["rows"]
    assert [r["variant"] for r in rows] == ["dense", "dualroute"]
    assert math.isclose(rows[1]["accuracy_diff_points_mean"], -1.0) and rows[1]["within_target"]
    assert math.isclose(rows[1]["train_time_ratio"], 0.8)
    text = finetune.render(payload)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| task | variant | attention | keys read | accuracy | macro-F1 | Δ accuracy |")
    assert "| dense | all keys | 100% | 80.0 ± 2.0 |" in lines[2]
    assert "| dualroute | B=16, top-4 | 25% | 79.0 ± 1.0 |" in lines[3] and "-1.0 ± 1.0" in lines[3]
    assert "80 s (0.80×)" in lines[3]
    assert "252 train / 180 eval" in text and "Quick run" not in text
    payload["config"]["quick"] = True
    assert finetune.render(payload).startswith("**Quick run")


def test_rerunning_one_task_keeps_the_other_tasks_runs(finetune, tmp_path):
    """--keep-other-tasks: the runs and settings of the tasks not rerun come from a complete earlier result with the
    same model, variants, seeds and data seed; anything else is refused with the reason."""
    earlier = synthetic_finetune_payload(finetune)
    earlier["runs"] += [dict(run, task="rotten_tomatoes") for run in earlier["runs"]]
    earlier["tasks"]["rotten_tomatoes"] = {"options": dict(finetune.TASKS["rotten_tomatoes"])}
    earlier["config"].update(variants=finetune.VARIANTS, data_seed=finetune.DATA_SEED, max_steps=0)
    earlier["complete"] = True
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps(earlier))
    runs, tasks = finetune.kept_runs(path, ["rotten_tomatoes"], finetune.VARIANTS, [0, 1, 2])
    assert runs == [run for run in earlier["runs"] if run["task"] == "news"] and list(tasks) == ["news"]
    with pytest.raises(
        ValueError,
        match=r"same \['data_seed', 'max_steps', 'model', 'quick', 'seeds', 'variants'\].*differing: \{'seeds'",
    ):
        finetune.kept_runs(path, ["rotten_tomatoes"], finetune.VARIANTS, [0])
    with pytest.raises(ValueError, match=r"differing: \{'max_steps': 0\}"):
        finetune.kept_runs(path, ["rotten_tomatoes"], finetune.VARIANTS, [0, 1, 2], max_steps=5)
    path.write_text(json.dumps(dict(earlier, complete=False)))
    with pytest.raises(ValueError, match="is not a complete run"):
        finetune.kept_runs(path, ["rotten_tomatoes"], finetune.VARIANTS, [0, 1, 2])
    with pytest.raises(ValueError, match="there is no earlier result at"):
        finetune.kept_runs(tmp_path / "missing.json", ["news"], finetune.VARIANTS, [0, 1, 2])


def test_headlines_render(headlines):
    runs = [
        {"variant": v, "seed": 0, "rouge1": r1, "rouge2": 0.1, "rougeL": r1 - 0.02, "generated_words": 9.0,
         "train_s": t, "predict_s": 30.0, "peak_train_memory_mb": 1200.0}
        for v, r1, t in (("dense", 0.30, 600.0), ("dualroute", 0.29, 500.0))
    ]  # fmt: skip
    payload = {
        "config": dict(headlines.CONFIG, model=headlines.MODEL, seeds=[0], quick=False),
        "data": {"train_examples": 1200, "eval_examples": 200},
        "key_share": {"encoder": 0.25, "cross": 0.25, "decoder_self": 1.0},
        "lead_baseline": {"words": 9, "rouge1": 0.2, "rouge2": 0.08, "rougeL": 0.18},
        "runs": runs,
        "rows": headlines.summarise(runs, list(headlines.VARIANTS)),
    }
    lines = [line for line in headlines.render(payload).splitlines() if line.startswith("|")]
    assert lines[0] == "| variant | attention | ROUGE-1 | ROUGE-2 | ROUGE-L | train time | generate | memory |"
    assert lines[2].startswith("| dense | all keys | 30.0 | 10.0 | 28.0 | 600 s |")
    assert lines[3].startswith("| dualroute | B=8, top-4: encoder 25%, cross 25%, decoder 100% | 29.0 (-1.0) |")
    assert "500 s (0.83×)" in lines[3]
    assert lines[4].startswith("| lead-9 words | (no model) | 20.0 | 8.0 | 18.0 |")


# ---------------------------------------------------------------------------------------------------------------------
# One tiny training step per script
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_end_to_end_tiny(finetune, tmp_path, few_news_articles):
    out = tmp_path / "finetune.json"
    finetune.main(
        ["--tasks", "news", "--seeds", "0", "--max-steps", "1", "--in-process", "--threads", "1", "--out", str(out),
         "--news-train-per-class", "1", "--news-eval-per-class", "1", "--news-max-length", "64",
         "--news-min-tokens", "64", "--news-block-size", "4", "--news-batch-size", "8"]
    )  # fmt: skip
    payload = json.loads(out.read_text())
    assert [(r["variant"], r["steps"], r["train_examples"], r["eval_examples"]) for r in payload["runs"]] == [
        ("dense", 1, 9, 9),
        ("dualroute", 1, 9, 9),
    ]
    assert payload["complete"] and [r["key_share"] for r in payload["runs"]] == [1.0, 0.25]  # top-4 of 16 blocks of 4
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["peak_train_memory_mb"] >= 0 for r in payload["runs"])
    assert payload["tasks"]["news"]["label_names"] == sorted({a["outlet"] for a in few_news_articles})
    assert "| dualroute | B=4, top-4 | 25% |" in finetune.render(payload)


@pytest.mark.slow
def test_headlines_end_to_end_tiny(headlines, tmp_path, few_news_articles):
    out = tmp_path / "headlines.json"
    headlines.main(
        ["--seeds", "0", "--max-steps", "1", "--in-process", "--threads", "1", "--out", str(out), "--train-examples", "8",
         "--eval-examples", "2", "--max-source-length", "64", "--min-source-tokens", "64", "--block-size", "4",
         "--num-beams", "1", "--max-new-tokens", "4", "--batch-size", "8"]
    )  # fmt: skip
    payload = json.loads(out.read_text())
    assert [(r["variant"], r["steps"]) for r in payload["runs"]] == [("dense", 1), ("dualroute", 1)]
    for entry in payload["runs"]:
        assert len(entry["samples"]) == 2 and all(0.0 <= entry[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert payload["complete"] and payload["key_share"]["encoder"] == 0.25
    assert payload["data"]["eval_source_tokens_median"] == 64
    assert "lead-" in headlines.render(payload)


def test_cross_attention_starts_as_a_copy_of_self_attention(headlines):
    model = DualRouteForConditionalGeneration(tiny_seq2seq_config())
    headlines.init_cross_attention_from_self_attention(model)
    for layer in model.decoder.layers:
        for name, tensor in layer.self_attn.state_dict().items():
            assert torch.equal(layer.encoder_attn.state_dict()[name], tensor), name
        assert torch.equal(layer.encoder_attn_layer_norm.weight, layer.self_attn_layer_norm.weight)
        assert layer.encoder_attn.q_proj.weight.data_ptr() != layer.self_attn.q_proj.weight.data_ptr()  # copies
    with pytest.raises(SystemExit):
        headlines.main(["--cross-init", "zeros"])
