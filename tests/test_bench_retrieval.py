"""benchmarks/bench_retrieval.py on a small scale: the data generator, the sliding-window attention, the model builders
and the README table. No model is trained to any accuracy here."""

import random

import pytest
import torch

from modeling_dualroute.attention_dualroute import reference_attention, routed_mask

from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_retrieval")


@pytest.fixture(scope="module")
def tokenizer(bench):
    return bench.load_tokenizer()


@pytest.fixture(scope="module")
def documents(bench, tokenizer):
    articles = bench.assets.news_articles()[:40]
    return bench.tokenize_articles(tokenizer, [a["text"] for a in articles])


def occurrences(sequence: list[int], pattern: list[int]) -> list[int]:
    return [i for i in range(len(sequence) - len(pattern) + 1) if sequence[i : i + len(pattern)] == pattern]


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def test_names_and_codes_are_single_distinct_tokens(bench, tokenizer, documents):
    task = bench.RetrievalTask(tokenizer, documents)
    assert len(task.code_ids) == len(bench.CODES) == 16
    assert len(set(task.name_ids)) == len(bench.NAMES)
    assert not set(task.name_ids) & set(task.code_ids)
    assert tokenizer.decode(task.fact_ids(2, 3)) == f"the code of {bench.NAMES[2]} is {bench.CODES[3]}."
    assert tokenizer.decode(task.question_ids(5)) == f"what is the code of {bench.NAMES[5]}?"


def test_split_is_disjoint_and_seeded(bench):
    train, held_out = bench.split_articles(100, 0.2, seed=0)
    assert len(held_out) == 20 and len(train) == 80
    assert not set(train) & set(held_out) and set(train) | set(held_out) == set(range(100))
    assert bench.split_articles(100, 0.2, seed=0) == (train, held_out)
    assert bench.split_articles(100, 0.2, seed=1) != (train, held_out)


@pytest.mark.parametrize("insert", ["sentence", "token"])
@pytest.mark.parametrize("length", [256, 1024])
def test_one_fact_at_the_requested_depth(bench, tokenizer, documents, insert, length):
    task = bench.RetrievalTask(tokenizer, documents, insert=insert)
    rng = random.Random(0)
    for depth in (0.0, 0.13, 0.5, 0.87, 1.0):
        example = task.example(rng, length, depth)
        ids = example["input_ids"]
        assert len(ids) == length
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert 0 <= example["label"] < len(bench.CODES)
        fact = task.fact_ids(example["name"], example["label"])
        assert occurrences(ids, fact) == [example["fact_start"]]
        # exactly one planted fact: "the code of <any name> is" occurs once
        prefix = fact[: fact.index(task.name_ids[example["name"]])]
        planted = [i for i in occurrences(ids, prefix) if ids[i + len(prefix)] in task.name_ids]
        assert len(planted) == 2  # the fact, and "the code of <name>" inside the question
        # the question comes first and names the fact's entity
        question = task.question_ids(example["name"])
        assert ids[1 : 1 + len(question)] == question and ids[1 + len(question)] == tokenizer.sep_token_id
        # depth: the fact's place in the text, near the requested one (sentence boundaries are ~25 tokens apart)
        body_start = 2 + len(question)
        text_length = length - body_start - 1 - len(fact)
        assert example["depth"] == pytest.approx((example["fact_start"] - body_start) / text_length)
        tolerance = (0.5 if insert == "token" else 64) / text_length + 1e-9
        assert abs(example["depth"] - depth) <= tolerance
        if insert == "sentence" and 0 < example["fact_start"] - body_start < text_length:
            assert ids[example["fact_start"] - 1] in task.sentence_ends


def test_generator_is_deterministic(bench, tokenizer, documents):
    task = bench.RetrievalTask(tokenizer, documents)
    first = [task.example(random.Random(7), 512) for _ in range(2)]
    assert first[0] == first[1]
    assert task.batch(random.Random(3), 512, 4)["input_ids"].equal(task.batch(random.Random(3), 512, 4)["input_ids"])
    assert not task.batch(random.Random(3), 512, 4)["input_ids"].equal(
        task.batch(random.Random(4), 512, 4)["input_ids"]
    )
    held_out = bench.eval_examples(task, 512, 10, seed=0)
    assert held_out == bench.eval_examples(task, 512, 10, seed=0)
    # depths are stratified: one example per tenth of [0, 1] (up to the snap to a sentence boundary)
    assert [round(e["depth"] * 10 - 0.5) for e in held_out] == pytest.approx(list(range(10)), abs=1)


def test_distractors_and_question_at_the_end(bench, tokenizer, documents):
    task = bench.RetrievalTask(tokenizer, documents, distractors=3)
    example = task.example(random.Random(1), 512, 0.4)
    fact = task.fact_ids(example["name"], example["label"])
    assert occurrences(example["input_ids"], fact) == [example["fact_start"]]
    code_of = fact[:3]  # "the code of"
    names = [example["input_ids"][i + 3] for i in occurrences(example["input_ids"], code_of)]
    assert len(names) == 5  # question + fact + 3 distractors
    assert names.count(task.name_ids[example["name"]]) == 2  # only the question and its fact name the entity

    end = bench.RetrievalTask(tokenizer, documents, question="end")
    example = end.example(random.Random(1), 300, 0.5)
    question = end.question_ids(example["name"])
    assert len(example["input_ids"]) == 300
    assert example["input_ids"][-1 - len(question) : -1] == question
    assert example["input_ids"][-2 - len(question)] == tokenizer.sep_token_id


# ---------------------------------------------------------------------------------------------------------------------
# The sliding-window attention
# ---------------------------------------------------------------------------------------------------------------------


def test_window_plan_covers_own_block_neighbours_and_global(bench):
    plan = bench.window_plan(2, 3, n_blocks=12, top_k=8, global_blocks=1)
    assert plan.shape == (2, 3, 12, 8)
    for i in range(12):
        expected = sorted({0} | {j for j in range(i - 3, i + 4) if 0 <= j < 12})
        row = plan[1, 2, i].tolist()
        assert row == expected + [-1] * (8 - len(expected)), (i, row)
    # an even number of neighbours: one more after than before; no global block
    plan = bench.window_plan(1, 1, n_blocks=6, top_k=4, global_blocks=0)
    assert plan[0, 0, 3].tolist() == [2, 3, 4, 5]
    assert plan[0, 0, 0].tolist() == [0, 1, 2, -1]


@pytest.mark.parametrize("length,padding", [(64, 0), (61, 5)])
def test_window_attention_equals_dense_masking_with_its_plan(bench, length, padding):
    block, top_k, global_blocks = 8, 4, 1
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 4, length, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    key_valid = torch.ones(2, length, dtype=torch.bool)
    if padding:
        key_valid[1, -padding:] = False

    class Module(torch.nn.Module):
        config = type("Config", (), dict(route_block_size=block, route_topk=top_k, route_global_blocks=global_blocks))

    info = {}
    out, weights = bench.window_attention_forward(
        Module(), query, key, value, key_valid if padding else None, scaling=0.25, router_info=info
    )
    assert weights is None and out.shape == (2, length, 4, 16)
    n_blocks = -(-length // block)
    plan = bench.window_plan(2, 4, n_blocks, top_k, global_blocks)
    assert info["plan"].equal(plan)
    mask = routed_mask(
        plan,
        per_token=False,
        block_size=block,
        q_len=length,
        k_len=length,
        key_valid=key_valid if padding else None,
        causal=False,
        query_offset=0,
    )
    expected, _ = reference_attention(query, key, value, mask, scale=0.25)
    torch.testing.assert_close(out.transpose(1, 2), expected)
    # and the gradients
    grads = torch.autograd.grad(out.transpose(1, 2).sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.sum(), (query, key, value))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    # the last query block (7) reads the global block 0 and its neighbour 6, nothing in between
    assert mask[:, :, -1, :block].all()
    assert not mask[:, :, -1, block : 6 * block].any() and mask[0, :, -1, 6 * block :].all()


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


TINY = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    block_size=16,
    top_k=4,
    global_blocks=1,
    num_random_blocks=1,
)


def test_every_model_runs_a_forward_from_one_initialisation(bench, tokenizer, documents):
    settings = dict(bench.CONFIG, **TINY, models=bench.MODELS)
    models = bench.build_models(settings, max_length=256, vocab_size=tokenizer.vocab_size)
    assert list(models) == bench.MODELS
    implementations = {name: model.config._attn_implementation for name, model in models.items()}
    assert implementations["dualroute"] == "dualroute" and implementations["dense"] == "sdpa"
    assert implementations["window"] == bench.WINDOW_ATTENTION
    state = models["dualroute"].state_dict()
    for name in ("dense", "window"):
        assert all(torch.equal(state[k], v) for k, v in models[name].state_dict().items())
    task = bench.RetrievalTask(tokenizer, documents)
    batch = task.batch(random.Random(0), 256, 2)
    logits = {}
    with torch.no_grad():
        for name, model in models.items():
            out = model(input_ids=batch["input_ids"], labels=batch["labels"])
            assert out.logits.shape == (2, len(bench.CODES)) and torch.isfinite(out.loss)
            logits[name] = out.logits
    assert models["bigbird"].bert.attention_type == "block_sparse"  # it switches to full attention on short input
    # 16 blocks, top-4: routing and window read different blocks, so the three attentions really differ
    assert not torch.allclose(logits["dualroute"], logits["dense"])
    assert not torch.allclose(logits["window"], logits["dense"])


def test_training_and_evaluation_run(bench, tokenizer, documents):
    settings = dict(
        bench.CONFIG, **TINY, models=["dualroute", "window"], stages=[[128, 2], [256, 1]], batch_tokens=512
    )
    models = bench.build_models(settings, max_length=256, vocab_size=tokenizer.vocab_size)
    task = bench.RetrievalTask(tokenizer, documents)
    before = models["window"].classifier.out_proj.weight.clone()
    trained = bench.train(models["window"], task, settings)
    assert [e["length"] for e in trained["log"]] == [128, 128, 256]
    assert not models["window"].training and not before.equal(models["window"].classifier.out_proj.weight)
    examples = bench.eval_examples(task, 256, 3, seed=0)
    result = bench.evaluate(models["dualroute"], examples, batch_size=2)
    assert len(result["predictions"]) == 3 and 0.0 <= result["accuracy"] <= 1.0


def test_training_steps_are_timed_per_model_and_length(bench, tokenizer, documents):
    settings = dict(
        bench.CONFIG, **TINY, models=["dualroute", "window"], stages=[[128, 2], [256, 1]], batch_tokens=512
    )
    models = bench.build_models(settings, max_length=256, vocab_size=tokenizer.vocab_size)
    times = bench.time_training_steps(models, bench.RetrievalTask(tokenizer, documents), settings, steps=1, rounds=2)
    assert set(times) == {"dualroute", "window"} and all(set(t) == {"128", "256"} for t in times.values())
    assert all(seconds > 0 for t in times.values() for seconds in t.values())
    assert bench.training_cost(times["window"], settings["stages"]) == pytest.approx(
        2 * times["window"]["128"] + times["window"]["256"]
    )
    assert not any(model.training for model in models.values())


def test_key_share(bench):
    settings = dict(bench.CONFIG, block_size=16, top_k=16, bigbird_block_size=32, num_random_blocks=3)
    assert bench.key_share("dense", 4096, settings) == 1.0
    assert bench.key_share("dualroute", 4096, settings) == 16 * 16 / 4096
    assert bench.key_share("dualroute", 256, settings) == 1.0
    assert bench.key_share("window", 4096, settings) < bench.key_share("dualroute", 4096, settings)
    # BigBird at 4096, block 32: 128 blocks; first/last read all, 2nd/2nd-last 7 blocks, the rest 8
    assert bench.key_share("bigbird", 4096, settings) == (2 * 128 + 2 * 7 + 124 * 8) / 128**2
    assert bench.key_share("bigbird", 256, settings) == 1.0  # 256 <= (5 + 2 * 3) * 32: full attention


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_payload(bench) -> dict:
    config = dict(bench.CONFIG, lengths=[1024, 2048], depth_bins=2, eval_examples=4)
    depths = [0.1, 0.3, 0.6, 0.9]
    labels = [0, 1, 2, 3]
    predictions = {"dualroute": [0, 1, 2, 3], "window": [0, 1, 5, 5]}
    return {
        "config": config,
        "eval_sets": {str(n): {"labels": labels, "depths": depths} for n in config["lengths"]},
        "results": {
            name: {
                "train": {"seconds": 120.0},
                "eval": {
                    str(n): {
                        "accuracy": sum(p == y for p, y in zip(preds, labels)) / 4,
                        "predictions": preds,
                        "routed_to_code": [[True, True], [True, False], [False, True], [True, True]],
                    }
                    for n in config["lengths"]
                },
                "key_share": {str(n): 512 / n for n in config["lengths"]},
            }
            for name, preds in predictions.items()
        },
        "step_seconds": {
            "dualroute": {str(n): 0.5 for n, _ in config["stages"]},
            "dense": {str(n): 1.0 for n, _ in config["stages"]},
        },
    }


def test_render_builds_the_readme_table(bench):
    text = bench.render(synthetic_payload(bench))
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| model | length | keys read | depth 0.0-0.5 | depth 0.5-1.0 | accuracy")
    assert lines[2].split(" | ")[:6] == ["| DualRoute", "1024", "50%", "100%", "100%", "**100%**"]
    assert lines[4].split(" | ")[:6] == ["| sliding window", "1024", "50%", "100%", "0%", "**50%**"]
    assert "CLS block reads the fact (per layer)" in lines[0]
    assert lines[2].split(" | ")[6] == "75% / 75%"  # per layer: share of examples whose CLS block read the fact
    steps = sum(s for _, s in bench.CONFIG["stages"])  # dense: 1 s per step, DualRoute 0.5 s
    assert lines[2].split(" | ")[7] == f"{steps * 0.5 / 60:.1f} min (0.50× dense) |"
    assert lines[4].split(" | ")[7] == "- |"  # the window's steps were not timed
    assert len(lines) == 2 + 4


def test_plot_writes_a_png(bench, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "retrieval.png"
    bench.plot(synthetic_payload(bench), path)
    assert path.stat().st_size > 1000


def test_a_quick_run_does_not_overwrite_the_committed_results(bench):
    assert bench.parse_args([])["out"] == "retrieval.json"
    assert bench.parse_args(["--quick"])["out"] == "retrieval_quick.json"
    assert bench.parse_args(["--quick", "--out", "mine.json"])["out"] == "mine.json"
