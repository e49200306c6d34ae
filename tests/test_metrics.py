"""The local `evaluate` modules in ``metrics/``: loaded with ``evaluate.load(folder)`` exactly as users load them.

Accuracy and F1 are checked against hand-computed values, ROUGE against the `rouge_score` package called directly,
and routing recall against hand-built attention/plan pairs and against a direct computation on a real
``route_blocks`` plan.
"""

import math
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from modeling_dualroute import route_blocks
from modeling_dualroute.attention_dualroute import routed_mask


REPO = Path(__file__).resolve().parents[1]
METRICS = REPO / "metrics"


@pytest.fixture
def load(tmp_path):
    """``evaluate.load`` of a folder under ``metrics/``, with the metric's data cache in a per-test directory."""

    def _load(name, *args, **kwargs):
        return evaluate.load(str(METRICS / name), *args, cache_dir=str(tmp_path), **kwargs)

    return _load


# --- loading ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["accuracy", "f1", "rouge", "routing_recall"])
def test_every_module_loads_from_its_folder_with_its_documentation(load, name):
    metric = load(name)
    assert isinstance(metric, evaluate.Metric)
    assert metric.description.strip() and metric.citation.strip() and metric.inputs_description.strip()
    assert metric.inputs_description in metric.compute.__doc__  # what help(metric.compute) shows


def test_relative_path_from_the_repository_root_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    accuracy = evaluate.load("metrics/accuracy", cache_dir=str(tmp_path))
    assert accuracy.compute(predictions=[1, 0], references=[1, 1]) == {"accuracy": 0.5}


# --- accuracy --------------------------------------------------------------------------------------------------------


def test_accuracy_matches_hand_computed_values(load):
    accuracy = load("accuracy")
    predictions, references = [0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 1, 2]  # 4 of 6 correct
    assert accuracy.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(4 / 6)
    assert accuracy.compute(predictions=predictions, references=references, normalize=False) == {"accuracy": 4.0}
    weighted = accuracy.compute(predictions=predictions, references=references, sample_weight=[1, 1, 1, 1, 1, 5])
    assert weighted["accuracy"] == pytest.approx(4 / 10)


def test_accuracy_accumulates_batches_of_arrays_and_tensors(load):
    accuracy = load("accuracy")
    accuracy.add_batch(predictions=np.array([0, 1, 2]), references=np.array([0, 1, 1]))
    accuracy.add_batch(predictions=torch.tensor([2, 1, 0]), references=torch.tensor([2, 1, 2]))
    assert accuracy.compute()["accuracy"] == pytest.approx(4 / 6)


def test_accuracy_multilabel_counts_exact_matches(load):
    accuracy = load("accuracy", "multilabel")
    result = accuracy.compute(predictions=[[0, 1], [1, 1], [1, 0]], references=[[0, 1], [1, 0], [1, 0]])
    assert result["accuracy"] == pytest.approx(2 / 3)


# --- f1 --------------------------------------------------------------------------------------------------------------

# Imbalanced three-class example: support 6 / 3 / 1.
#   class 0: TP 5, FP 1, FN 1 -> F1 = 10 / 12 = 5/6
#   class 1: TP 2, FP 2, FN 1 -> F1 = 4 / 7
#   class 2: TP 0, FP 0, FN 1 -> F1 = 0
F1_REFERENCES = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]
F1_PREDICTIONS = [0, 0, 0, 0, 0, 1, 1, 1, 0, 1]
F1_PER_CLASS = [5 / 6, 4 / 7, 0.0]


@pytest.mark.parametrize(
    "average, expected",
    [
        ("macro", sum(F1_PER_CLASS) / 3),  # 59/126: every class counts the same
        ("micro", 14 / 20),  # 2*7 / (2*7 + 3 + 3): equals accuracy in single-label multiclass
        ("weighted", (6 * 5 / 6 + 3 * 4 / 7 + 1 * 0.0) / 10),  # 47/70: by support
    ],
)
def test_f1_averages_on_an_imbalanced_multiclass_example(load, average, expected):
    f1 = load("f1")
    result = f1.compute(predictions=F1_PREDICTIONS, references=F1_REFERENCES, average=average)
    assert result["f1"] == pytest.approx(expected)


def test_f1_per_class_binary_and_errors(load):
    f1 = load("f1")
    per_class = f1.compute(predictions=F1_PREDICTIONS, references=F1_REFERENCES, average=None)["f1"]
    np.testing.assert_allclose(per_class, F1_PER_CLASS)
    # Binary (the default): TP 1, FP 1, FN 1 for label 1; TP 2, FP 1, FN 1 for label 0.
    assert f1.compute(predictions=[0, 1, 0, 1, 0], references=[0, 0, 1, 1, 0]) == {"f1": 0.5}
    assert f1.compute(predictions=[0, 1, 0, 1, 0], references=[0, 0, 1, 1, 0], pos_label=0)["f1"] == pytest.approx(
        2 / 3
    )
    with pytest.raises(ValueError, match="multiclass"):
        f1.compute(predictions=F1_PREDICTIONS, references=F1_REFERENCES)


# --- rouge -----------------------------------------------------------------------------------------------------------

ROUGE_PREDICTIONS = ["the cat was found under the bed", "a quick brown fox jumps.\nIt lands on the dog"]
ROUGE_REFERENCES = ["the cat was under the bed", "the fast brown fox jumped over the dog.\nIt landed"]
ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_the_rouge_score_package(load, use_stemmer):
    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=use_stemmer)
    direct = [scorer.score(ref, pred) for ref, pred in zip(ROUGE_REFERENCES, ROUGE_PREDICTIONS)]
    rouge = load("rouge")

    per_example = rouge.compute(
        predictions=ROUGE_PREDICTIONS, references=ROUGE_REFERENCES, use_stemmer=use_stemmer, use_aggregator=False
    )
    aggregated = rouge.compute(predictions=ROUGE_PREDICTIONS, references=ROUGE_REFERENCES, use_stemmer=use_stemmer)

    assert sorted(aggregated) == sorted(ROUGE_TYPES)
    for rouge_type in ROUGE_TYPES:
        expected = [scores[rouge_type].fmeasure for scores in direct]
        assert per_example[rouge_type] == pytest.approx(expected)
        assert aggregated[rouge_type] == pytest.approx(np.mean(expected))
    assert aggregated["rougeLsum"] != aggregated["rougeL"]  # the newlines split sentences for rougeLsum only


def test_rouge_multiple_references_keep_the_best(load):
    rouge = load("rouge")
    result = rouge.compute(predictions=["the cat sat"], references=[["a dog ran", "the cat sat"]])
    assert result == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0}


# --- routing recall --------------------------------------------------------------------------------------------------


def _softmax(scores):
    scores = scores - scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(-1, keepdims=True)


def test_recall_is_one_when_the_plan_keeps_every_block(load):
    recall = load("routing_recall", block_size=3)
    attention = _softmax(np.random.default_rng(0).normal(size=(2, 2, 6, 7)))  # 3 key blocks, 2 query blocks
    plan = np.tile(np.array([0, 1, 2]), (2, 1, 2, 1))  # (batch, kv_heads=1, query blocks, top_k)
    assert recall.compute(attention=attention, plan=plan)["routing_recall"] == pytest.approx(1.0)


def test_recall_is_zero_when_attention_sits_in_a_block_the_plan_skips(load):
    recall = load("routing_recall", block_size=3)
    attention = np.zeros((1, 2, 6, 7))
    attention[..., 6] = 1.0  # every query looks only at key 6, in key block 2
    plan = np.tile(np.array([0, 1, -1]), (1, 1, 2, 1))
    assert recall.compute(attention=attention, plan=plan) == {"routing_recall": 0.0}


def test_recall_of_two_query_blocks_is_the_mean_of_their_shares(load):
    recall = load("routing_recall", block_size=2)
    attention = np.tile([0.4, 0.4, 0.1, 0.1], (1, 1, 4, 1))  # 1 head, 4 queries, key blocks {0, 1} and {2, 3}
    plan = np.array([[[[0], [1]]]])  # query block 0 keeps key block 0 (0.8), query block 1 keeps key block 1 (0.2)
    assert recall.compute(attention=attention, plan=plan)["routing_recall"] == pytest.approx(0.5)


def test_query_heads_share_the_plan_of_their_kv_head(load):
    recall = load("routing_recall", block_size=2, per_token=True)
    attention = np.zeros((1, 4, 1, 4))
    attention[0, :2, 0, 0] = 1.0  # query heads 0, 1 look at key block 0
    attention[0, 2:, 0, 3] = 1.0  # query heads 2, 3 look at key block 1
    plan = np.array([[[[0]], [[1]]]])  # kv head 0 keeps block 0, kv head 1 keeps block 1: grouping h // 2 -> 1.0
    assert recall.compute(attention=attention, plan=plan)["routing_recall"] == pytest.approx(1.0)


# One head, 3 query tokens, 4 keys in blocks {0, 1} and {2, 3}; one plan row per query token.
PER_TOKEN_ATTENTION = [[[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]]
PER_TOKEN_PLAN = [[[0, -1], [1, -1], [0, 1]]]  # rows keep 1.0, 0.0 and 1.0 of their mass


def test_per_token_rows(load):
    recall = load("routing_recall", block_size=2)
    result = recall.compute(attention=[PER_TOKEN_ATTENTION], plan=[PER_TOKEN_PLAN], per_token=True)
    assert result["routing_recall"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="per_token"):  # 3 rows cannot be the 2 query blocks of 3 queries
        recall.compute(attention=[PER_TOKEN_ATTENTION], plan=[PER_TOKEN_PLAN], per_token=False)


def test_query_mask_leaves_out_padded_rows_and_examples_count_once(load):
    recall = load("routing_recall", block_size=2, per_token=True)
    result = recall.compute(attention=[PER_TOKEN_ATTENTION], plan=[PER_TOKEN_PLAN], query_mask=[[True, False, True]])
    assert result["routing_recall"] == pytest.approx(1.0)

    # Ragged batches: a 3-query example (recall 2/3, torch bfloat16) and a 1-query example (recall 0), mean 1/3.
    recall.add_batch(attention=torch.tensor([PER_TOKEN_ATTENTION], dtype=torch.bfloat16), plan=[PER_TOKEN_PLAN])
    recall.add_batch(attention=[[[[0.0, 0.0, 1.0, 0.0]]]], plan=[[[[0, -1]]]], query_mask=[[True]])
    assert recall.compute()["routing_recall"] == pytest.approx((2 / 3 + 0.0) / 2)


@pytest.mark.parametrize("causal", [False, True])
def test_recall_of_a_route_blocks_plan_equals_a_direct_computation(load, causal):
    batch, heads, kv_heads, length, dim, block = 2, 4, 2, 13, 8, 4  # ragged last block, GQA
    lengths = [13, 9]  # the second sequence is right-padded
    valid = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    query, key = torch.randn(batch, heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    plan = route_blocks(
        query, key, block_size=block, top_k=2, causal=causal, key_padding_mask=valid, query_padding_mask=valid
    )
    scores = query @ key.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2) / math.sqrt(dim)
    visible = valid[:, None, None, :] & (torch.ones(length, length).tril().bool() if causal else True)
    attention = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)

    recall = load("routing_recall", block_size=block, per_token=causal)
    result = recall.compute(attention=attention, plan=plan, query_mask=valid)["routing_recall"]

    # Direct: per example, mean over heads and real queries of the mass on keys whose block the plan keeps.
    attention, plan = attention.numpy().astype(np.float64), plan.numpy()
    per_example = []
    for b in range(batch):
        shares = []
        for h in range(heads):
            for q in range(lengths[b]):
                kept = set(plan[b, h // (heads // kv_heads), q if causal else q // block].tolist()) - {-1}
                shares.append(sum(attention[b, h, q, t] for t in range(length) if t // block in kept))
        per_example.append(np.mean(shares))
    assert result == pytest.approx(np.mean(per_example), abs=1e-6)
    assert 0.0 < result < 1.0

    # The same numbers from the project's own dense mask of a plan (level 2 attends exactly there).
    mask = routed_mask(
        torch.from_numpy(plan),
        per_token=causal,
        block_size=block,
        q_len=length,
        k_len=length,
        key_valid=valid,
        causal=causal,
        query_offset=0,
    ).repeat_interleave(heads // kv_heads, dim=1)
    inside = (attention * mask.numpy()).sum(-1)
    from_mask = [inside[b, :, : lengths[b]].mean() for b in range(batch)]
    assert result == pytest.approx(np.mean(from_mask), abs=1e-6)
