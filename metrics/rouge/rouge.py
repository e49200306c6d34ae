"""ROUGE, as a local `evaluate` module: a drop-in for the Hub's ``rouge`` that needs no network.

Load it with ``evaluate.load("metrics/rouge")`` from the repository root (or with the folder's absolute path).
Scores come from Google's ``rouge_score`` package (the same one the Hub metric wraps), so the per-example numbers
are identical; the results have the Hub's keys (``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``).

One deliberate difference: the Hub metric aggregates with ``rouge_score``'s ``BootstrapAggregator`` and reports the
median of 1000 bootstrap resamples of the mean (random, though close to the mean). This module reports the plain
mean of the per-example F-measures, which is deterministic and exactly reproducible.
"""

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer


_DESCRIPTION = """
ROUGE (Recall-Oriented Understudy for Gisting Evaluation) compares a generated text with one or more references by
their overlapping units, here reported as the F-measure (harmonic mean of the overlap's precision and recall):
    rouge1    -- overlap of unigrams (words);
    rouge2    -- overlap of bigrams;
    rougeL    -- longest common subsequence of the two texts, taken as one sequence;
    rougeLsum -- "summary-level" LCS: the texts are split into sentences on newlines ("\\n") and the LCS is taken
                 over the union of sentence pairs; without newlines it equals rougeL.
Texts are lower-cased and tokenized on non-alphanumeric characters by `rouge_score` (which also drops non-ASCII
characters, so pass a `tokenizer` for other scripts). With several references per example the best-scoring
reference counts. The corpus score is the mean of the per-example F-measures.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the generated texts, one per example.
    references (`list` of `str`, or `list` of `list` of `str`): the reference text(s) of every example.
    rouge_types (`list` of `str`, optional): any of `"rouge1"`, `"rouge2"`, ..., `"rouge9"`, `"rougeL"`,
        `"rougeLsum"`; defaults to `["rouge1", "rouge2", "rougeL", "rougeLsum"]`.
    use_aggregator (`bool`, defaults to `True`): if `True`, return the mean F-measure of every type; if `False`,
        one list of per-example F-measures per type.
    use_stemmer (`bool`, defaults to `False`): strip word suffixes with the Porter stemmer before matching.
    tokenizer (callable `str -> list of str`, optional): replaces `rouge_score`'s default tokenizer.

Returns:
    A `dict` with one key per rouge type (`rouge1`, `rouge2`, `rougeL`, `rougeLsum` by default), each a `float`
    between 0 and 1 (or a `list` of `float` with `use_aggregator=False`).

Examples:
    >>> rouge = evaluate.load("metrics/rouge")
    >>> rouge.compute(predictions=["hello there", "general kenobi"], references=["hello there", "general kenobi"])
    {'rouge1': 1.0, 'rouge2': 1.0, 'rougeL': 1.0, 'rougeLsum': 1.0}
"""

_CITATION = """
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    month = jul,
    year = "2004",
    address = "Barcelona, Spain",
    publisher = "Association for Computational Linguistics",
    url = "https://www.aclweb.org/anthology/W04-1013",
    pages = "74--81",
}
"""

_DEFAULT_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


class _CallableTokenizer:
    """Adapts a plain ``str -> list[str]`` function to the ``.tokenize`` interface `rouge_score` expects."""

    def __init__(self, function):
        self.function = function

    def tokenize(self, text):
        return self.function(text)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    """Mean ROUGE F-measures (rouge1, rouge2, rougeL, rougeLsum) computed with the `rouge_score` package."""

    def _info(self):
        # Two accepted layouts: several references per example (tried first) or exactly one.
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://en.wikipedia.org/wiki/ROUGE_(metric)"],
        )

    def _compute(
        self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False, tokenizer=None
    ):
        rouge_types = list(rouge_types or _DEFAULT_TYPES)
        if tokenizer is not None:
            tokenizer = _CallableTokenizer(tokenizer)
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)

        per_type = {rouge_type: [] for rouge_type in rouge_types}
        for reference, prediction in zip(references, predictions):
            if isinstance(reference, (list, tuple)):  # keeps the best-matching reference
                scores = scorer.score_multi(reference, prediction)
            else:
                scores = scorer.score(reference, prediction)
            for rouge_type in rouge_types:
                per_type[rouge_type].append(float(scores[rouge_type].fmeasure))

        if not use_aggregator:
            return per_type
        return {key: float(np.mean(values)) if values else 0.0 for key, values in per_type.items()}
