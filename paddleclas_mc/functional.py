"""One-call functions for code that builds its own model and data pipeline.

``mc_predict`` runs T stochastic passes over one batch and returns an
``MCPrediction``. The metric functions score one set of probabilities against
labels in a single call. Each builds one metric from ``metrics.py``, feeds it
every sample at once and returns what ``compute`` returns, so the numbers are
the ones ``tools/eval.py`` reports. To accumulate over many batches, use the
metric classes (``CalibrationError`` and the others) with ``update`` and
``compute`` instead.

Shapes: ``probs`` is ``[N, C]`` (for MC Dropout, the mean over the T passes),
``labels`` is ``[N]`` (``[N, 1]`` is accepted too) and ``uncertainty`` is
``[N]``, higher meaning less certain. Everything except ``mc_predict`` runs on
NumPy alone, without Paddle.

Example:
    >>> import numpy as np
    >>> probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    >>> labels = np.array([0, 1, 1])
    >>> round(expected_calibration_error(probs, labels, n_bins=10), 4)
    0.3
    >>> top_k_accuracy(probs, labels, k=1)
    0.6666666666666666
"""

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

from .metrics import (NLL, Brier, CalibrationError, MisclassificationDetection,
                      SelectivePrediction, TopkAcc)
from .uncertainty import MEASURES, summarize_samples

__all__ = [
    "MCPrediction",
    "brier_score",
    "expected_calibration_error",
    "maximum_calibration_error",
    "mc_predict",
    "misclassification_detection",
    "negative_log_likelihood",
    "reliability_bins",
    "risk_coverage",
    "selective_risk",
    "top_k_accuracy",
]

# Measure name under which a caller's uncertainty array is passed to a metric.
_UNCERTAINTY_KEY = "uncertainty"


@dataclasses.dataclass(frozen=True)
class MCPrediction:
    """T stochastic passes over a batch and their summary.

    Attributes:
        samples: softmax outputs of every pass, ``[T, B, C]``.
        mean: mean probabilities over the passes, float64 ``[B, C]``.
        predictive_entropy: entropy of ``mean`` in nats, ``[B]``.
        expected_entropy: mean entropy of the single passes, ``[B]``.
        mutual_information: ``predictive_entropy - expected_entropy``, ``[B]``.
        variation_ratio: fraction of passes whose top-1 class is not the
            most frequent one, ``[B]``.
        std: standard deviation over the passes of the probability of the
            class that ``mean`` predicts, ``[B]``.

    Example:
        >>> import numpy as np
        >>> samples = np.array([[[0.8, 0.2]], [[0.4, 0.6]]])   # T=2, B=1, C=2
        >>> prediction = MCPrediction.from_samples(samples)
        >>> prediction.mean
        array([[0.6, 0.4]])
        >>> prediction.class_ids, prediction.variation_ratio
        (array([0]), array([0.5]))
    """

    samples: np.ndarray
    mean: np.ndarray
    predictive_entropy: np.ndarray
    expected_entropy: np.ndarray
    mutual_information: np.ndarray
    variation_ratio: np.ndarray
    std: np.ndarray

    @classmethod
    def from_samples(cls, samples) -> "MCPrediction":
        """Summarize softmax outputs of shape ``[T, B, C]``, as ``summarize_samples`` does.

        Raises:
            ValueError: when ``samples`` is not 3-D.
        """
        samples = np.asarray(samples)
        mean, measures = summarize_samples(samples)
        return cls(samples=samples, mean=mean, **measures)

    @property
    def class_ids(self) -> np.ndarray:
        """The class with the highest mean probability, int ``[B]``."""
        return self.mean.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        """The highest mean probability, ``[B]``."""
        return self.mean.max(axis=1)

    @property
    def measures(self) -> Dict[str, np.ndarray]:
        """Every uncertainty measure by its name in ``MEASURES``, each ``[B]``."""
        return {name: getattr(self, name) for name in MEASURES}


def mc_predict(model, images, samples: int = 30, seed: Optional[int] = None,
               **sampler_options) -> MCPrediction:
    """Run T stochastic passes of ``model`` over one batch and summarize them.

    This builds an ``MCSampler`` on every call. To predict many batches with
    one model, build the sampler once and call
    ``MCPrediction.from_samples(sampler.sample(images, seed))``.

    Args:
        model: any ``paddle.nn.Layer`` with at least one dropout layer.
        images: input tensor ``[B, ...]``.
        samples: T, the number of stochastic passes (>= 2).
        seed: seed of the dropout masks, or None for a fresh draw. Paddle's
            generator state is restored afterwards.
        **sampler_options: further ``MCSampler`` arguments, such as
            ``strategy``, ``max_batch``, ``drop_path`` or ``functional_dropout``.

    Returns:
        An ``MCPrediction`` with ``samples`` of shape ``[T, B, C]``.

    Raises:
        NoStochasticLayerError: when the model has nothing to sample.

    Example:
        >>> prediction = mc_predict(model, images, samples=20, seed=0)
        >>> prediction.samples.shape, prediction.mean.shape, prediction.mutual_information.shape
        ((20, 5, 4), (5, 4), (5,))
    """
    from .sampling import MCSampler

    sampler = MCSampler(model, samples=samples, **sampler_options)
    return MCPrediction.from_samples(sampler.sample(images, seed=seed))


def _compute(metric, probs, labels, uncertainty=None):
    metric.update(probs, labels, uncertainty)
    return metric.compute()


def _as_measure(uncertainty):
    """Wrap an uncertainty array ``[N]`` in the dict the metric classes take."""
    return {_UNCERTAINTY_KEY: np.asarray(uncertainty)}


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Compute the expected calibration error of the top-1 confidence.

    ``ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|`` over ``n_bins``
    equal-width confidence bins (see ``metrics.CalibrationError``).

    Args:
        probs: probabilities ``[N, C]``, each row summing to 1.
        labels: true class indices ``[N]``.
        n_bins: the number of bins.

    Returns:
        The ECE, in [0, 1].

    Example:
        >>> round(expected_calibration_error([[0.9, 0.1], [0.3, 0.7]], [0, 0], n_bins=10), 4)
        0.4
    """
    return _compute(CalibrationError(n_bins=n_bins), probs, labels)["ece"]


def maximum_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Compute the largest ``|accuracy_b - confidence_b|`` over the non-empty bins.

    Args:
        probs: probabilities ``[N, C]``.
        labels: true class indices ``[N]``.
        n_bins: the number of equal-width confidence bins.

    Example:
        >>> maximum_calibration_error([[0.9, 0.1], [0.3, 0.7]], [0, 0], n_bins=10)
        0.7
    """
    return _compute(CalibrationError(n_bins=n_bins), probs, labels)["mce"]


def reliability_bins(probs, labels, n_bins: int = 15) -> Dict[str, np.ndarray]:
    """Return the per-bin values behind a reliability diagram.

    Args:
        probs: probabilities ``[N, C]``.
        labels: true class indices ``[N]``.
        n_bins: the number of equal-width confidence bins.

    Returns:
        A dict with ``bin_edges`` ``[n_bins + 1]``, ``bin_counts`` (int
        ``[n_bins]``), and ``accuracy`` and ``confidence`` ``[n_bins]``, NaN
        for empty bins.

    Example:
        >>> bins = reliability_bins([[0.9, 0.1], [0.3, 0.7]], [0, 0], n_bins=10)
        >>> bins["bin_counts"].tolist()
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 1]
    """
    metric = CalibrationError(n_bins=n_bins)
    metric.update(probs, labels)
    return metric.bin_statistics()


def negative_log_likelihood(probs, labels) -> float:
    """Compute the mean negative log-likelihood of the true class, in nats.

    A true-class probability below 1e-12 counts as 1e-12, so one zero does
    not make the mean infinite.

    Example:
        >>> round(negative_log_likelihood([[0.5, 0.5], [0.25, 0.75]], [0, 1]), 4)
        0.4904
    """
    return _compute(NLL(), probs, labels)["nll"]


def brier_score(probs, labels) -> float:
    """Compute the multiclass Brier score ``mean_i sum_c (p_ic - y_ic)^2``, in [0, 2].

    Example:
        >>> brier_score([[1.0, 0.0], [0.5, 0.5]], [0, 1])
        0.25
    """
    return _compute(Brier(), probs, labels)["brier"]


def top_k_accuracy(probs, labels, k: int = 1) -> float:
    """Compute the fraction of samples whose true class is among the k most probable.

    Tied probabilities rank by class index, as ``np.argmax`` does.

    Example:
        >>> top_k_accuracy([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]], [1, 1], k=2)
        1.0
    """
    return _compute(TopkAcc(topk=(k,)), probs, labels)[f"top{k}"]


def misclassification_detection(probs, labels, uncertainty) -> Dict[str, float]:
    """Score how well ``uncertainty`` ranks the misclassified samples first.

    A sample is misclassified when ``argmax(probs)`` differs from its label.

    Args:
        probs: probabilities ``[N, C]``.
        labels: true class indices ``[N]``.
        uncertainty: any uncertainty measure ``[N]``, higher meaning less
            certain, such as ``MCPrediction.mutual_information``.

    Returns:
        ``{"auroc": ..., "aupr": ...}``, with misclassified samples as the
        positive class. Both are NaN when every sample is right or every
        sample is wrong.

    Example:
        >>> misclassification_detection([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], [0, 1, 1],
        ...                             uncertainty=[0.1, 0.7, 0.3])
        {'auroc': 1.0, 'aupr': 1.0}
    """
    results = _compute(MisclassificationDetection(measures=(_UNCERTAINTY_KEY,)),
                       probs, labels, _as_measure(uncertainty))
    return {"auroc": results[f"{_UNCERTAINTY_KEY}_auroc"],
            "aupr": results[f"{_UNCERTAINTY_KEY}_aupr"]}


def _selective_prediction(probs, labels, uncertainty, coverages=(1.0,)):
    if uncertainty is None:
        metric = SelectivePrediction(coverages=coverages, score="confidence")
        metric.update(probs, labels)
    else:
        metric = SelectivePrediction(coverages=coverages, score=_UNCERTAINTY_KEY)
        metric.update(probs, labels, _as_measure(uncertainty))
    return metric


def selective_risk(probs, labels, uncertainty=None,
                   coverages=(0.5, 0.8, 0.9, 0.95, 1.0)) -> Dict[str, float]:
    """Compute AURC, E-AURC and the error rate at given coverages.

    Samples are accepted from the most certain down: by top-1 confidence
    when ``uncertainty`` is None, else by ascending ``uncertainty``. Ties
    count at their expected value under random order (see
    ``metrics.SelectivePrediction``).

    Args:
        probs: probabilities ``[N, C]``.
        labels: true class indices ``[N]``.
        uncertainty: optional uncertainty ``[N]``, higher meaning less certain.
        coverages: fractions of samples in (0, 1] at which to report the risk.

    Returns:
        ``aurc``, ``e_aurc`` and ``risk@{c:g}`` for each coverage.

    Example:
        >>> selective_risk([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], [0, 1, 1], coverages=(0.5, 1.0))
        {'aurc': 0.1111111111111111, 'e_aurc': 0.0, 'risk@0.5': 0.0, 'risk@1': 0.3333333333333333}
    """
    return _selective_prediction(probs, labels, uncertainty, coverages).compute()


def risk_coverage(probs, labels, uncertainty=None) -> Tuple[np.ndarray, np.ndarray]:
    """Return the risk-coverage curve, with samples accepted as in ``selective_risk``.

    Returns:
        ``(coverage, risk)``, each ``[N]``: for k = 1 .. N, the coverage
        ``k / N`` and the error rate among the k most certain samples.

    Example:
        >>> coverage, risk = risk_coverage([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], [0, 1, 1])
        >>> coverage.round(3).tolist(), risk.round(3).tolist()
        ([0.333, 0.667, 1.0], [0.0, 0.0, 0.333])
    """
    return _selective_prediction(probs, labels, uncertainty).curve()
