"""Accuracy, as a local `evaluate` module: a drop-in for the Hub's ``accuracy`` that needs no network.

Load it with ``evaluate.load("metrics/accuracy")`` from the repository root (or with the folder's absolute path).
The computation follows the Hub metric (which wraps ``sklearn.metrics.accuracy_score``) but is written with numpy
alone, so the project does not depend on scikit-learn.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Accuracy is the fraction of examples whose prediction equals the reference:
    accuracy = (number of correct predictions) / (number of examples)
With `sample_weight`, every example counts with its weight. With the `multilabel` configuration an example is a
vector of 0/1 labels and counts as correct only if the whole vector matches (subset accuracy).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, numpy array or torch tensor, shape `(n,)`): predicted labels. With the
        `multilabel` configuration (`evaluate.load(path, "multilabel")`), shape `(n, n_labels)` of 0/1 indicators.
    references (same type and shape as `predictions`): ground-truth labels.
    normalize (`bool`, defaults to `True`): if `False`, return the (weighted) number of correct examples instead
        of the fraction.
    sample_weight (`list` of `float`, optional): one weight per example; defaults to 1 for every example.

Returns:
    accuracy (`float`): the fraction (or, with `normalize=False`, the number) of correct examples; between 0 and 1
        when normalized, 1.0 being perfect.

Examples:
    >>> accuracy = evaluate.load("metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], normalize=False)
    {'accuracy': 3.0}
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction of correct predictions (subset accuracy for the ``multilabel`` configuration)."""

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
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
        correct = predictions == references
        if correct.ndim > 1:  # multilabel: an example is correct only if every label matches
            correct = correct.all(axis=tuple(range(1, correct.ndim)))
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight has shape {weights.shape}, expected {correct.shape}")
        score = float(np.sum(weights * correct))
        if normalize:
            total = float(np.sum(weights))
            if total == 0:
                raise ValueError("accuracy is undefined: no examples, or sample weights that sum to zero")
            score /= total
        return {"accuracy": score}
