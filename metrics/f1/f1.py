"""F1 score, as a local `evaluate` module: a drop-in for the Hub's ``f1`` that needs no network.

Load it with ``evaluate.load("metrics/f1")`` from the repository root (or with the folder's absolute path).
Arguments, defaults and results follow the Hub metric (which wraps ``sklearn.metrics.f1_score``); the computation is
written with numpy alone, so the project does not depend on scikit-learn.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall. For one label, with true positives TP, false positives
FP and false negatives FN:
    F1 = 2 * precision * recall / (precision + recall) = 2 TP / (2 TP + FP + FN)
and 0 when the label is neither predicted nor present (2 TP + FP + FN = 0). With several labels, `average` says how
the per-label scores combine:
    binary   -- only the `pos_label` label (the default; the data must have at most two labels);
    micro    -- one F1 from the TP, FP and FN summed over all labels (equals accuracy for single-label multiclass);
    macro    -- the unweighted mean of the per-label F1 (every label counts the same, however rare);
    weighted -- the mean of the per-label F1 weighted by each label's support (its number of true instances);
    None     -- the per-label F1 scores themselves.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, numpy array or torch tensor, shape `(n,)`): predicted labels. With the
        `multilabel` configuration (`evaluate.load(path, "multilabel")`), shape `(n, n_labels)` of 0/1 indicators.
    references (same type and shape as `predictions`): ground-truth labels.
    labels (`list` of `int`, optional): the labels to score, in the order of the per-label results; defaults to
        every label seen in `predictions` or `references`, sorted (for `multilabel`: every column).
    pos_label (`int`, defaults to 1): the label scored when `average="binary"`.
    average (`str` or `None`, defaults to `"binary"`): one of `"binary"`, `"micro"`, `"macro"`, `"weighted"` or
        `None`, see the description.
    sample_weight (`list` of `float`, optional): one weight per example; defaults to 1 for every example.

Returns:
    f1 (`float`, or a numpy array of one `float` per label when `average=None`): between 0 and 1, 1.0 being perfect.

Examples:
    >>> f1 = evaluate.load("metrics/f1")
    >>> f1.compute(predictions=[0, 1, 0, 1, 0], references=[0, 0, 1, 1, 0])
    {'f1': 0.5}
    >>> f1.compute(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2], average="macro")
    {'f1': 0.26666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


def _safe_divide(numerator, denominator):
    """``numerator / denominator`` elementwise, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """F1 score with scikit-learn's ``average`` modes (binary, micro, macro, weighted, per label)."""

    def _info(self):
        if self.config_name == "multilabel":
            label = datasets.Sequence(datasets.Value("int32"))
        else:
            label = datasets.Value("int32")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": label, "references": label}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != references.shape[:1]:
            raise ValueError(f"sample_weight has shape {weights.shape}, expected {references.shape[:1]}")

        # Both layouts become 0/1 indicator matrices (examples, labels), so one code path counts TP, FP and FN.
        if references.ndim == 2:  # multilabel indicators
            columns = np.arange(references.shape[1]) if labels is None else np.asarray(labels)
            true, pred = references[:, columns] == 1, predictions[:, columns] == 1
            if average == "binary":
                raise ValueError("average='binary' is not defined for multilabel inputs; use micro/macro/weighted")
        else:
            present = np.union1d(references, predictions)
            if average == "binary":
                if len(present) > 2:
                    raise ValueError(
                        f"Target is multiclass ({len(present)} labels) but average='binary'; "
                        "choose one of None, 'micro', 'macro', 'weighted'"
                    )
                if len(present) == 2 and pos_label not in present:
                    raise ValueError(f"pos_label={pos_label} is not a valid label: it should be one of {present}")
                labels = [pos_label]
            columns = present if labels is None else np.asarray(labels)
            true = references[:, None] == columns[None, :]
            pred = predictions[:, None] == columns[None, :]

        w = weights[:, None]
        true_pos = np.sum(w * (true & pred), axis=0)
        false_pos = np.sum(w * (~true & pred), axis=0)
        false_neg = np.sum(w * (true & ~pred), axis=0)

        if average == "micro":
            score = _safe_divide(2 * true_pos.sum(), 2 * true_pos.sum() + false_pos.sum() + false_neg.sum())
            return {"f1": float(score)}
        per_label = _safe_divide(2 * true_pos, 2 * true_pos + false_pos + false_neg)
        if average is None:
            return {"f1": per_label}
        if average == "weighted":
            support = true_pos + false_neg
            score = _safe_divide(np.sum(per_label * support), np.sum(support))
        else:  # macro, and binary (a single label)
            score = per_label.mean() if per_label.size else 0.0
        return {"f1": float(score)}
