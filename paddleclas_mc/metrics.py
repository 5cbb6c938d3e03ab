"""Classification metrics for single-pass and MC Dropout evaluation.

The module uses NumPy only, so it runs without Paddle. Each metric keeps a
state that ``update`` fills batch by batch: counts and exact sums, or the
per-sample values where ranks need them (``MisclassificationDetection`` and
``SelectivePrediction``). ``state`` exports that state, ``merge`` or
``merge_state`` adds another instance's state, and ``compute`` turns it into
a dict of floats.

Merging is exact. The same samples split into other batches or other
processes give bit-identical results, because counts are integers, per-sample
values are concatenated and every float sum is kept as an exact integer (see
``_exact_sum``).

Inputs shared by all metrics:
    probs: Float array ``[batch_size, num_classes]`` of class probabilities.
        For MC Dropout this is the mean over the stochastic forward passes.
        Every entry must be finite and in [0, 1], and every row must sum to 1
        within ``ROW_SUM_TOLERANCE``.
    labels: Integer array ``[batch_size]`` of true class indices in
        ``[0, num_classes)``. ``[batch_size, 1]`` is accepted as well, because
        PaddleClas's data loaders yield labels in that shape.
    uncertainty: Optional dict from measure name (for example
        ``"predictive_entropy"``) to a float array ``[batch_size]``, where a
        higher value means less certain. Only ``MisclassificationDetection``
        and ``SelectivePrediction`` read it.

The predicted class is ``argmax(probs)``, which is the lowest class index
among tied maxima, and its probability is the confidence.
"""

import inspect

import numpy as np

__all__ = [
    "Brier",
    "binary_auroc",
    "CalibrationError",
    "METRICS",
    "Metric",
    "MisclassificationDetection",
    "NLL",
    "ROW_SUM_TOLERANCE",
    "SelectivePrediction",
    "TopkAcc",
    "build_metrics",
]

# Maximum allowed |sum(row) - 1| for a row of probs. float32 softmax rows over
# 10 to 21843 classes were measured to sum to 1 within 3e-7, far inside it.
ROW_SUM_TOLERANCE = 1e-3

# Lower clip for the true-class probability in NLL.
NLL_PROBABILITY_FLOOR = 1e-12

# Every finite float64 equals m * 2**(e - 53) with an integer significand
# |m| < 2**53 and a frexp exponent e >= -1073, so multiplying by 2**1126 makes
# it an integer. Sums of these integers are exact and associative.
_FIXED_POINT_BITS = 1126


# Exact sums.


def _exact_sum(values):
    """Sum float64 values exactly.

    Args:
        values: Array-like of finite floats, any shape.

    Returns:
        int: The exact sum in units of ``2**-1126``. Adding two such results
        gives the exact sum of the union, whatever the split.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0

    mantissas, exponents = np.frexp(values)
    significands = np.ldexp(mantissas, 53).astype(np.int64)
    shifts = exponents.astype(np.int64) + (_FIXED_POINT_BITS - 53)

    # Split each 53-bit significand into a high part below 2**27 and a low
    # part below 2**26, so int64 sums of either cannot overflow for fewer
    # than 2**36 values.
    high = significands >> 26
    low = significands - (high << 26)

    # Sum the parts of the values that share a shift in int64, then combine
    # the few group sums as Python integers.
    order = np.argsort(shifts, kind="stable")
    sorted_shifts = shifts[order]
    group_starts = np.flatnonzero(np.diff(sorted_shifts, prepend=-1))
    high_sums = np.add.reduceat(high[order], group_starts)
    low_sums = np.add.reduceat(low[order], group_starts)

    total = 0
    for shift, high_sum, low_sum in zip(
            sorted_shifts[group_starts].tolist(), high_sums.tolist(), low_sums.tolist()):
        total += (high_sum << (shift + 26)) + (low_sum << shift)
    return total


def _exact_mean(fixed_point_sum, count):
    """Return ``fixed_point_sum / count`` as the correctly rounded float."""
    # Python's int / int division rounds correctly, even for huge integers.
    return fixed_point_sum / (count << _FIXED_POINT_BITS)


# Input validation.


def _validate_probs(probs):
    """Return ``probs`` as float64 ``[batch_size, num_classes]`` or raise ValueError."""
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(
            f"probs must be a 2-D array [batch_size, num_classes], got shape "
            f"{probs.shape}.")
    if probs.dtype.kind not in "fiu":
        raise ValueError(
            f"probs must contain real numbers, got dtype {probs.dtype}.")
    if probs.shape[1] == 0:
        raise ValueError(
            f"probs must have at least one class column, got shape {probs.shape}.")

    probs = probs.astype(np.float64, copy=False)
    if probs.size == 0:
        return probs

    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinity.")

    low, high = probs.min(), probs.max()
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"probs must be in [0, 1], got values from {low!r} to {high!r}. "
            "Pass softmax probabilities, not logits.")

    row_errors = np.abs(probs.sum(axis=1) - 1.0)
    worst_row = int(np.argmax(row_errors))
    if row_errors[worst_row] > ROW_SUM_TOLERANCE:
        raise ValueError(
            f"each row of probs must sum to 1 within {ROW_SUM_TOLERANCE}, but "
            f"row {worst_row} sums to {probs[worst_row].sum()!r}. Pass softmax "
            "probabilities, not logits.")

    return probs


def _validate_labels(labels, probs_shape):
    """Return ``labels`` as int64 ``[batch_size]`` or raise ValueError."""
    batch_size, num_classes = probs_shape

    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"labels must have shape [batch_size] or [batch_size, 1], got shape "
            f"{labels.shape}.")
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be integer class indices, got dtype {labels.dtype}.")
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but probs has {batch_size} "
            "rows; both must have one entry per sample.")

    if batch_size:
        low, high = labels.min(), labels.max()
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must be in [0, {num_classes}) for probs with "
                f"{num_classes} classes, got values from {low} to {high}.")

    return labels.astype(np.int64, copy=False)


def _validate_uncertainty_measure(uncertainty, name, batch_size):
    """Return ``uncertainty[name]`` as float64 ``[batch_size]`` or raise ValueError."""
    if uncertainty is None:
        raise ValueError(
            f"uncertainty measure {name!r} is required, but update() got no "
            "uncertainty dict. Pass uncertainty={name: values}.")
    if not isinstance(uncertainty, dict):
        raise ValueError(
            f"uncertainty must be a dict from measure name to an array "
            f"[batch_size], got {type(uncertainty).__name__}.")
    if name not in uncertainty:
        raise ValueError(
            f"uncertainty measure {name!r} is missing; the uncertainty dict has "
            f"{sorted(uncertainty)}.")

    return _validate_float_vector(uncertainty[name], batch_size, f"uncertainty[{name!r}]")


def _validate_float_vector(values, length, description):
    """Return ``values`` as finite float64 ``[length]`` or raise ValueError."""
    values = np.asarray(values)
    if values.ndim != 1 or values.shape[0] != length:
        raise ValueError(
            f"{description} must have shape [{length}] (one value per sample), "
            f"got shape {values.shape}.")
    if values.dtype.kind not in "fiu":
        raise ValueError(
            f"{description} must contain real numbers, got dtype {values.dtype}.")

    values = values.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{description} contains NaN or infinity.")

    return values


def _validate_state_keys(state, expected_keys, metric_name):
    """Raise ValueError unless ``state`` is a dict with exactly ``expected_keys``."""
    if not isinstance(state, dict):
        raise ValueError(
            f"{metric_name} state must be a dict, got {type(state).__name__}.")

    expected_keys = set(expected_keys)
    if set(state) != expected_keys:
        raise ValueError(
            f"{metric_name} state must have the keys {sorted(expected_keys)}, "
            f"got {sorted(state)}.")


def _validate_count_array(values, length, key, metric_name):
    """Return ``values`` as int64 ``[length]`` or raise ValueError."""
    values = np.asarray(values)
    if values.shape != (length,) or values.dtype.kind not in "iu":
        raise ValueError(
            f"{metric_name} state[{key!r}] must be an integer array of shape "
            f"[{length}], got dtype {values.dtype} and shape {values.shape}.")
    return values.astype(np.int64)


def _validate_count(value, key, metric_name):
    """Return ``value`` as a non-negative int or raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(
            f"{metric_name} state[{key!r}] must be a non-negative integer, got "
            f"{value!r}.")
    return int(value)


def _require_samples(sample_count, metric_name):
    """Raise RuntimeError when a metric has no samples to compute on."""
    if sample_count == 0:
        raise RuntimeError(
            f"{metric_name}.compute() needs at least one sample; call update() "
            "or merge() first.")


# Shared per-sample quantities.


def _confidence_and_correct(probs, labels):
    """Return the top-1 confidence (float ``[batch_size]``) and correctness (bool ``[batch_size]``)."""
    predictions = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(labels)), predictions]
    return confidence, predictions == labels


def _true_class_ranks(probs, labels):
    """Return the 0-based rank of the true class in each row, int ``[batch_size]``.

    Classes are ranked by descending probability. Tied probabilities are
    ranked by ascending class index, the order ``np.argmax`` uses, so rank 0
    means that the true class is the top-1 prediction.
    """
    rows = np.arange(len(labels))
    true_probs = probs[rows, labels][:, None]

    higher = np.count_nonzero(probs > true_probs, axis=1)

    class_index = np.arange(probs.shape[1])[None, :]
    tied_before = np.count_nonzero(
        (probs == true_probs) & (class_index < labels[:, None]), axis=1)

    return higher + tied_before


def _average_ranks(values):
    """Return the 1-based ranks of ``values`` with ties given their average rank.

    Args:
        values: Float array ``[num_samples]``.

    Returns:
        Float array ``[num_samples]``. A group of g tied values that would
        take ranks r + 1 .. r + g all get r + (g + 1) / 2.
    """
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks_before = np.cumsum(counts) - counts
    return (ranks_before + (counts + 1) / 2.0)[inverse]


# Metrics.


class Metric:
    """Base class that validates the inputs and defines the state API.

    Subclasses set ``higher_is_better`` (True when larger values of every key
    that ``compute`` returns are better) and implement ``config``,
    ``reset``, ``_update``, ``state``, ``merge_state`` and ``compute``.
    """

    higher_is_better = None

    def update(self, probs, labels, uncertainty=None):
        """Add one batch.

        Args:
            probs: Float array ``[batch_size, num_classes]`` of probabilities.
            labels: Integer array ``[batch_size]`` (or ``[batch_size, 1]``) of
                true class indices.
            uncertainty: Optional dict from measure name to float
                ``[batch_size]``, higher meaning less certain. Metrics that do
                not use it ignore it.

        Raises:
            ValueError: When an input is invalid. The message names it.
        """
        probs = _validate_probs(probs)
        labels = _validate_labels(labels, probs.shape)
        self._update(probs, labels, uncertainty)

    def merge(self, other):
        """Add the state of ``other``, a metric of the same class and config.

        Raises:
            TypeError: When ``other`` is of another class.
            ValueError: When ``other`` has another config.
        """
        if type(other) is not type(self):
            raise TypeError(
                f"cannot merge {type(other).__name__} into {type(self).__name__}.")
        if other.config() != self.config():
            raise ValueError(
                f"cannot merge {type(self).__name__} with config {other.config()} "
                f"into one with config {self.config()}.")
        self.merge_state(other.state())

    @classmethod
    def from_state(cls, state, **config):
        """Build a metric from ``config`` and add ``state`` to it."""
        metric = cls(**config)
        metric.merge_state(state)
        return metric

    def config(self):
        """Return the constructor arguments as a dict."""
        raise NotImplementedError

    def reset(self):
        """Clear the state."""
        raise NotImplementedError

    def _update(self, probs, labels, uncertainty):
        raise NotImplementedError

    def state(self):
        """Return a copy of the state as a dict of NumPy arrays and Python numbers."""
        raise NotImplementedError

    def merge_state(self, state):
        """Add a state returned by ``state()`` of a metric with the same config."""
        raise NotImplementedError

    def compute(self):
        """Return the metric values as a dict of floats."""
        raise NotImplementedError


class TopkAcc(Metric):
    """Top-k accuracy.

    ``top_k = (1 / N) * sum_i [rank_i < k]``, where ``rank_i`` is the 0-based
    rank of the true class of sample i among the classes sorted by descending
    probability. Tied probabilities are ranked by ascending class index, as
    ``np.argmax`` does, so ``top1`` is the accuracy of the argmax prediction.
    A k larger than the number of classes acts as k = num_classes, so its
    accuracy is 1.

    Args:
        topk: Positive integers k. Duplicates are dropped.

    ``compute()`` returns ``top{k}`` for each k, for example ``top1`` and
    ``top5``.
    """

    higher_is_better = True

    def __init__(self, topk=(1, 5)):
        self.topk = self._validate_topk(topk)
        self.reset()

    @staticmethod
    def _validate_topk(topk):
        if isinstance(topk, (int, np.integer)):
            topk = (topk,)
        topk = tuple(topk)
        if not topk:
            raise ValueError("TopkAcc topk must contain at least one k.")

        for k in topk:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(
                    f"TopkAcc topk must contain positive integers, got {k!r}.")

        return tuple(sorted({int(k) for k in topk}))

    def config(self):
        return {"topk": self.topk}

    def reset(self):
        self._sample_count = 0
        self._correct_counts = np.zeros(len(self.topk), dtype=np.int64)

    def _update(self, probs, labels, uncertainty):
        ranks = _true_class_ranks(probs, labels)
        for index, k in enumerate(self.topk):
            self._correct_counts[index] += np.count_nonzero(ranks < k)
        self._sample_count += len(labels)

    def state(self):
        """Return ``sample_count`` (int) and ``correct_counts`` (int64 ``[len(topk)]``)."""
        return {
            "sample_count": self._sample_count,
            "correct_counts": self._correct_counts.copy(),
        }

    def merge_state(self, state):
        _validate_state_keys(state, ("sample_count", "correct_counts"), "TopkAcc")
        sample_count = _validate_count(state["sample_count"], "sample_count", "TopkAcc")
        correct_counts = _validate_count_array(
            state["correct_counts"], len(self.topk), "correct_counts", "TopkAcc")

        self._sample_count += sample_count
        self._correct_counts += correct_counts

    def compute(self):
        _require_samples(self._sample_count, "TopkAcc")
        return {
            f"top{k}": float(correct / self._sample_count)
            for k, correct in zip(self.topk, self._correct_counts)
        }


class NLL(Metric):
    """Mean negative log-likelihood of the true class, in nats.

    ``NLL = -(1 / N) * sum_i log(max(p_i[y_i], 1e-12))``

    The clip at ``NLL_PROBABILITY_FLOOR`` (1e-12) caps one sample's
    contribution at about 27.6 nats, so a single zero probability for the
    true class does not make the mean infinite.

    ``compute()`` returns ``nll``.
    """

    higher_is_better = False

    def __init__(self):
        self.reset()

    def config(self):
        return {}

    def reset(self):
        self._sample_count = 0
        self._nll_sum = 0

    def _update(self, probs, labels, uncertainty):
        true_probs = probs[np.arange(len(labels)), labels]
        losses = -np.log(np.maximum(true_probs, NLL_PROBABILITY_FLOOR))
        self._nll_sum += _exact_sum(losses)
        self._sample_count += len(labels)

    def state(self):
        """Return ``sample_count`` (int) and ``nll_sum_fixed_point``.

        ``nll_sum_fixed_point`` is the exact sum of the per-sample losses as an
        integer in units of ``2**-1126``.
        """
        return {
            "sample_count": self._sample_count,
            "nll_sum_fixed_point": self._nll_sum,
        }

    def merge_state(self, state):
        _validate_state_keys(state, ("sample_count", "nll_sum_fixed_point"), "NLL")
        sample_count = _validate_count(state["sample_count"], "sample_count", "NLL")
        nll_sum = _validate_count(
            state["nll_sum_fixed_point"], "nll_sum_fixed_point", "NLL")

        self._sample_count += sample_count
        self._nll_sum += nll_sum

    def compute(self):
        _require_samples(self._sample_count, "NLL")
        return {"nll": _exact_mean(self._nll_sum, self._sample_count)}


class Brier(Metric):
    """Multiclass Brier score.

    ``Brier = (1 / N) * sum_i sum_c (p_ic - y_ic)^2``, where ``y_i`` is the
    one-hot vector of the true class. It ranges from 0 (certain and right) to
    2 (certain and wrong). It equals the sum over classes of the binary Brier
    score of each class against the rest.

    ``compute()`` returns ``brier``.
    """

    higher_is_better = False

    def __init__(self):
        self.reset()

    def config(self):
        return {}

    def reset(self):
        self._sample_count = 0
        self._squared_error_sum = 0

    def _update(self, probs, labels, uncertainty):
        targets = np.zeros_like(probs)
        targets[np.arange(len(labels)), labels] = 1.0
        self._squared_error_sum += _exact_sum((probs - targets) ** 2)
        self._sample_count += len(labels)

    def state(self):
        """Return ``sample_count`` (int) and ``squared_error_sum_fixed_point``.

        ``squared_error_sum_fixed_point`` is the exact sum of ``(p_ic - y_ic)^2``
        over samples and classes as an integer in units of ``2**-1126``.
        """
        return {
            "sample_count": self._sample_count,
            "squared_error_sum_fixed_point": self._squared_error_sum,
        }

    def merge_state(self, state):
        keys = ("sample_count", "squared_error_sum_fixed_point")
        _validate_state_keys(state, keys, "Brier")
        sample_count = _validate_count(state["sample_count"], "sample_count", "Brier")
        squared_error_sum = _validate_count(
            state["squared_error_sum_fixed_point"], "squared_error_sum_fixed_point",
            "Brier")

        self._sample_count += sample_count
        self._squared_error_sum += squared_error_sum

    def compute(self):
        _require_samples(self._sample_count, "Brier")
        return {"brier": _exact_mean(self._squared_error_sum, self._sample_count)}


class CalibrationError(Metric):
    """Expected and maximum calibration error of the top-1 confidence.

    The confidences are split into B equal-width bins with edges ``b / B``.
    Bin b contains the confidences in ``[b / B, (b + 1) / B)``, except that the
    last bin is closed, ``[(B - 1) / B, 1]``, so a confidence of exactly 1.0 is
    counted. A confidence of exactly 0 falls in the first bin. For a bin with
    ``n_b`` samples::

        acc_b  = (number of correct predictions in b) / n_b
        conf_b = (sum of confidences in b) / n_b
        ECE    = sum_b (n_b / N) * |acc_b - conf_b|
        MCE    = max over non-empty bins of |acc_b - conf_b|

    Args:
        n_bins: Number of bins B.

    ``compute()`` returns ``ece``, ``mce`` and ``n_bins`` (an int, so that a
    report can print "ECE (15 bins)").
    """

    higher_is_better = False

    def __init__(self, n_bins=15):
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(
                f"CalibrationError n_bins must be a positive integer, got {n_bins!r}.")
        self.n_bins = int(n_bins)
        self.bin_edges = np.arange(self.n_bins + 1) / self.n_bins
        self.reset()

    @classmethod
    def from_state(cls, state, **config):
        """Build a metric from a state, taking ``n_bins`` from the state unless given."""
        if "n_bins" not in config and isinstance(state, dict) and "bin_counts" in state:
            config["n_bins"] = len(state["bin_counts"])
        return super().from_state(state, **config)

    def config(self):
        return {"n_bins": self.n_bins}

    def reset(self):
        self._bin_counts = np.zeros(self.n_bins, dtype=np.int64)
        self._correct_counts = np.zeros(self.n_bins, dtype=np.int64)
        self._confidence_sums = np.array([0] * self.n_bins, dtype=object)

    def _assign_bins(self, confidence):
        """Return the bin index of each confidence, int ``[batch_size]``."""
        bins = np.searchsorted(self.bin_edges, confidence, side="right") - 1
        return np.clip(bins, 0, self.n_bins - 1)

    def _update(self, probs, labels, uncertainty):
        confidence, correct = _confidence_and_correct(probs, labels)
        bins = self._assign_bins(confidence)

        self._bin_counts += np.bincount(bins, minlength=self.n_bins)
        self._correct_counts += np.bincount(bins[correct], minlength=self.n_bins)
        for index in np.unique(bins):
            self._confidence_sums[index] += _exact_sum(confidence[bins == index])

    def state(self):
        """Return the per-bin state, each entry an array ``[n_bins]``.

        ``bin_counts`` and ``correct_counts`` are int64.
        ``confidence_sums_fixed_point`` is an object array of Python integers,
        each the exact sum of a bin's confidences in units of ``2**-1126``.
        """
        return {
            "bin_counts": self._bin_counts.copy(),
            "correct_counts": self._correct_counts.copy(),
            "confidence_sums_fixed_point": self._confidence_sums.copy(),
        }

    def merge_state(self, state):
        keys = ("bin_counts", "correct_counts", "confidence_sums_fixed_point")
        _validate_state_keys(state, keys, "CalibrationError")
        bin_counts = _validate_count_array(
            state["bin_counts"], self.n_bins, "bin_counts", "CalibrationError")
        correct_counts = _validate_count_array(
            state["correct_counts"], self.n_bins, "correct_counts", "CalibrationError")
        confidence_sums = [
            _validate_count(value, "confidence_sums_fixed_point", "CalibrationError")
            for value in state["confidence_sums_fixed_point"]
        ]
        if len(confidence_sums) != self.n_bins:
            raise ValueError(
                f"CalibrationError state['confidence_sums_fixed_point'] must have "
                f"{self.n_bins} entries, got {len(confidence_sums)}.")

        self._bin_counts += bin_counts
        self._correct_counts += correct_counts
        self._confidence_sums += np.array(confidence_sums, dtype=object)

    def bin_statistics(self):
        """Return the per-bin values behind the reliability diagram.

        Returns:
            dict with ``bin_edges`` (float ``[n_bins + 1]``), ``bin_counts``
            (int ``[n_bins]``), and ``accuracy`` and ``confidence`` (float
            ``[n_bins]``, NaN for empty bins).
        """
        accuracy = np.full(self.n_bins, np.nan)
        confidence = np.full(self.n_bins, np.nan)
        for index in np.flatnonzero(self._bin_counts):
            count = int(self._bin_counts[index])
            accuracy[index] = self._correct_counts[index] / count
            confidence[index] = _exact_mean(self._confidence_sums[index], count)

        return {
            "bin_edges": self.bin_edges.copy(),
            "bin_counts": self._bin_counts.copy(),
            "accuracy": accuracy,
            "confidence": confidence,
        }

    def compute(self):
        sample_count = int(self._bin_counts.sum())
        _require_samples(sample_count, "CalibrationError")

        statistics = self.bin_statistics()
        filled = self._bin_counts > 0
        gaps = np.abs(statistics["accuracy"][filled] - statistics["confidence"][filled])
        weights = self._bin_counts[filled] / sample_count

        return {
            "ece": float(np.sum(weights * gaps)),
            "mce": float(np.max(gaps)),
            "n_bins": self.n_bins,
        }


def _auroc(scores, positive):
    """Return the AUROC of ``scores`` for the ``positive`` flags, or NaN.

    ``AUROC = (sum of the average ranks of the positives - P (P + 1) / 2) / (P * Q)``
    with P positives and Q negatives, which is the Mann-Whitney U statistic
    divided by P * Q. A tie between a positive and a negative counts 1/2.

    Args:
        scores: Float ``[num_samples]``, higher meaning more likely positive.
        positive: Bool ``[num_samples]``.
    """
    positive_count = int(np.count_nonzero(positive))
    negative_count = len(positive) - positive_count
    if positive_count == 0 or negative_count == 0:
        return float("nan")

    # Ranks are multiples of 1/2, so this float sum is exact in any order.
    rank_sum = float(np.sum(_average_ranks(scores)[positive]))
    u_statistic = rank_sum - positive_count * (positive_count + 1) / 2.0
    return u_statistic / (positive_count * negative_count)


def binary_auroc(scores, positive):
    """Compute the AUROC of ``scores`` for telling ``positive`` samples from the rest.

    Ties count 1/2, as in ``sklearn.metrics.roc_auc_score``.

    Args:
        scores: Float ``[num_samples]``, higher meaning more likely positive.
        positive: Bool ``[num_samples]``.

    Returns:
        The AUROC in [0, 1], or NaN when only one class is present.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = _validate_float_vector(scores, positive.size, "scores")
    if positive.ndim != 1:
        raise ValueError(f"positive must be a bool array [num_samples], got shape {positive.shape}.")
    return _auroc(scores, positive)


def _average_precision(scores, positive):
    """Return the average precision of ``scores`` for the ``positive`` flags, or NaN.

    ``AP = sum_j (R_j - R_{j-1}) * P_j`` over the distinct scores
    ``t_1 > t_2 > ...``, where ``P_j`` and ``R_j`` are the precision and recall
    of predicting positive when ``score >= t_j``, and ``R_0 = 0``. Tied scores
    enter together at one threshold.

    Args:
        scores: Float ``[num_samples]``, higher meaning more likely positive.
        positive: Bool ``[num_samples]``.
    """
    positive_count = int(np.count_nonzero(positive))
    if positive_count == 0 or positive_count == len(positive):
        return float("nan")

    thresholds, inverse = np.unique(scores, return_inverse=True)
    positives_per_threshold = np.bincount(inverse[positive], minlength=len(thresholds))
    samples_per_threshold = np.bincount(inverse, minlength=len(thresholds))

    # Walk the thresholds from the highest score down.
    true_positives = np.cumsum(positives_per_threshold[::-1])
    predicted_positives = np.cumsum(samples_per_threshold[::-1])
    precision = true_positives / predicted_positives
    recall_gain = positives_per_threshold[::-1] / positive_count

    return float(np.sum(recall_gain * precision))


class MisclassificationDetection(Metric):
    """AUROC and AUPR of uncertainty measures for detecting misclassifications.

    For each measure the positive class is a misclassified sample (argmax
    prediction differs from the label), the negative class a correctly
    classified one, and the score is the uncertainty value, so a higher value
    should mean more likely wrong.

    AUROC is the Mann-Whitney U statistic ``U / (P * Q)`` computed from average
    ranks, so ties between a positive and a negative count 1/2. It equals
    ``sklearn.metrics.roc_auc_score``. AUPR is the average precision
    ``sum_j (R_j - R_{j-1}) * P_j`` over the distinct uncertainty values in
    descending order, which equals ``sklearn.metrics.average_precision_score``.
    Its chance level is the error rate.

    When all samples are correct or all are wrong, both values are undefined
    and ``compute`` returns NaN for them rather than raising, so that a run
    with perfect accuracy still reports its other metrics.

    The state keeps every sample's uncertainty values and correctness flag,
    because ranks need all of them for an exact merge.

    Args:
        measures: Names of the uncertainty measures to evaluate, each of which
            every ``update`` must provide. None takes the names of the first
            ``update``'s uncertainty dict, and later updates must provide the
            same names.

    ``compute()`` returns ``{measure}_auroc`` and ``{measure}_aupr`` for each
    measure, for example ``predictive_entropy_auroc``.
    """

    higher_is_better = True

    def __init__(self, measures=None):
        if measures is not None:
            measures = tuple(measures)
            if not measures or not all(isinstance(name, str) and name for name in measures):
                raise ValueError(
                    "MisclassificationDetection measures must be None or a "
                    f"non-empty list of measure names, got {measures!r}.")
        self.measures = measures
        self.reset()

    def config(self):
        return {"measures": self.measures}

    def reset(self):
        self._measure_names = self.measures
        self._correct_batches = []
        self._uncertainty_batches = {}

    def _resolve_measure_names(self, uncertainty):
        """Return the measure names this update must provide, fixing them on first use."""
        if self._measure_names is not None:
            return self._measure_names

        if not isinstance(uncertainty, dict) or not uncertainty:
            received = "an empty dict" if uncertainty == {} else type(uncertainty).__name__
            raise ValueError(
                "MisclassificationDetection needs a non-empty uncertainty dict "
                f"from measure name to values [batch_size], got {received}.")
        self._measure_names = tuple(uncertainty)
        return self._measure_names

    def _update(self, probs, labels, uncertainty):
        names = self._resolve_measure_names(uncertainty)
        if self.measures is None and set(uncertainty) != set(names):
            raise ValueError(
                f"MisclassificationDetection was updated with the measures "
                f"{list(names)}, but this batch has {sorted(uncertainty)}. Pass "
                "the same measures every batch or set measures explicitly.")

        values = {
            name: _validate_uncertainty_measure(uncertainty, name, len(labels))
            for name in names
        }
        _, correct = _confidence_and_correct(probs, labels)

        self._correct_batches.append(correct)
        for name in names:
            self._uncertainty_batches.setdefault(name, []).append(values[name])

    def _concatenated(self):
        """Return the correctness flags and uncertainty values as single arrays."""
        correct = np.concatenate(self._correct_batches or [np.zeros(0, dtype=bool)])
        uncertainty = {
            name: np.concatenate(self._uncertainty_batches.get(name) or [np.zeros(0)])
            for name in self._measure_names or ()
        }
        return correct, uncertainty

    def state(self):
        """Return ``correct`` (bool ``[num_samples]``) and ``uncertainty/{measure}``.

        Each ``uncertainty/{measure}`` entry is float64 ``[num_samples]`` in the
        same sample order as ``correct``.
        """
        correct, uncertainty = self._concatenated()
        state = {"correct": correct}
        for name, values in uncertainty.items():
            state["uncertainty/" + name] = values
        return state

    def merge_state(self, state):
        if not isinstance(state, dict) or "correct" not in state:
            raise ValueError(
                "MisclassificationDetection state must be a dict with a 'correct' "
                f"entry, got {type(state).__name__}.")

        names = tuple(key[len("uncertainty/"):] for key in state if key.startswith("uncertainty/"))
        expected_keys = ["correct"] + ["uncertainty/" + name for name in names]
        _validate_state_keys(state, expected_keys, "MisclassificationDetection")

        correct = np.asarray(state["correct"])
        if correct.ndim != 1 or correct.dtype != bool:
            raise ValueError(
                "MisclassificationDetection state['correct'] must be a bool array "
                f"[num_samples], got dtype {correct.dtype} and shape {correct.shape}.")
        if correct.size == 0:
            return

        if self._measure_names is None:
            self._measure_names = names
        if set(names) != set(self._measure_names):
            raise ValueError(
                f"cannot merge a MisclassificationDetection state with the "
                f"measures {sorted(names)} into one with {sorted(self._measure_names)}.")

        values = {
            name: _validate_float_vector(
                state["uncertainty/" + name], correct.size,
                f"MisclassificationDetection state['uncertainty/{name}']")
            for name in names
        }

        self._correct_batches.append(correct.copy())
        for name in names:
            self._uncertainty_batches.setdefault(name, []).append(values[name].copy())

    def compute(self):
        correct, uncertainty = self._concatenated()
        _require_samples(correct.size, "MisclassificationDetection")

        wrong = ~correct
        results = {}
        for name, values in uncertainty.items():
            results[f"{name}_auroc"] = _auroc(values, wrong)
            results[f"{name}_aupr"] = _average_precision(values, wrong)
        return results


class SelectivePrediction(Metric):
    """Risk-coverage evaluation of selective classification.

    Samples are accepted from the most certain down: by descending top-1
    confidence when ``score="confidence"``, otherwise by ascending value of
    the named uncertainty measure. The risk at coverage c is the error rate
    among the accepted ``c * N`` samples.

    Ties: samples with equal scores are accepted in a uniformly random order,
    and the metric reports the expected value. Let ``E(x)`` be the number of
    errors among the x most certain samples, linearly interpolated between the
    boundaries of the groups of tied scores (a unique score is a group of
    one). This is the expected error count under random tie-breaking, and it
    does not depend on the input order::

        risk(c) = E(c * N) / (c * N)
        AURC    = (1 / N) * sum_{k=1..N} E(k) / k
        E-AURC  = AURC - AURC of a perfect ranking (all errors rejected first)

    For coverages where ``c * N`` is not an integer, ``E`` interpolates
    between the two neighbouring samples. With T errors, a perfect ranking
    has ``E(k) = max(0, k - (N - T))``.

    Args:
        coverages: Coverages in (0, 1] at which to report the risk.
        score: ``"confidence"`` or the name of an uncertainty measure that
            every ``update`` provides. ``"confidence"`` is reserved and never
            looked up in the uncertainty dict.

    ``compute()`` returns ``aurc``, ``e_aurc`` and ``risk@{c:g}`` for each
    coverage, for example ``risk@0.95`` and ``risk@1``.
    """

    higher_is_better = False

    def __init__(self, coverages=(0.5, 0.8, 0.9, 0.95, 1.0), score="confidence"):
        self.coverages = self._validate_coverages(coverages)
        if not isinstance(score, str) or not score:
            raise ValueError(
                "SelectivePrediction score must be 'confidence' or the name of an "
                f"uncertainty measure, got {score!r}.")
        self.score = score
        self.reset()

    @staticmethod
    def _validate_coverages(coverages):
        coverages = tuple(coverages)
        if not coverages:
            raise ValueError("SelectivePrediction coverages must not be empty.")

        for coverage in coverages:
            if isinstance(coverage, bool) or not isinstance(coverage, (int, float, np.number)):
                raise ValueError(
                    f"SelectivePrediction coverages must be numbers, got {coverage!r}.")
            if not 0.0 < coverage <= 1.0:
                raise ValueError(
                    f"SelectivePrediction coverages must be in (0, 1], got {coverage!r}.")

        return tuple(sorted({float(coverage) for coverage in coverages}))

    def config(self):
        return {"coverages": self.coverages, "score": self.score}

    def reset(self):
        self._certainty_batches = []
        self._correct_batches = []

    def _update(self, probs, labels, uncertainty):
        confidence, correct = _confidence_and_correct(probs, labels)
        if self.score == "confidence":
            certainty = confidence
        else:
            certainty = -_validate_uncertainty_measure(uncertainty, self.score, len(labels))

        self._certainty_batches.append(certainty)
        self._correct_batches.append(correct)

    def _concatenated(self):
        """Return the certainty scores and correctness flags as single arrays."""
        certainty = np.concatenate(self._certainty_batches or [np.zeros(0)])
        correct = np.concatenate(self._correct_batches or [np.zeros(0, dtype=bool)])
        return certainty, correct

    def state(self):
        """Return ``certainty`` (float64) and ``correct`` (bool), both ``[num_samples]``.

        ``certainty`` is the confidence, or the negated uncertainty measure, so
        that a higher value is always accepted first.
        """
        certainty, correct = self._concatenated()
        return {"certainty": certainty, "correct": correct}

    def merge_state(self, state):
        _validate_state_keys(state, ("certainty", "correct"), "SelectivePrediction")

        correct = np.asarray(state["correct"])
        if correct.ndim != 1 or correct.dtype != bool:
            raise ValueError(
                "SelectivePrediction state['correct'] must be a bool array "
                f"[num_samples], got dtype {correct.dtype} and shape {correct.shape}.")
        certainty = _validate_float_vector(
            state["certainty"], correct.size, "SelectivePrediction state['certainty']")

        self._certainty_batches.append(certainty.copy())
        self._correct_batches.append(correct.copy())

    def _expected_error_counts(self):
        """Return the group boundaries and the error counts at them, for ``np.interp``.

        Returns:
            Two arrays ``[num_groups + 1]``: the number of accepted samples at
            each tie-group boundary, from 0 to N, and the errors among them.
        """
        certainty, correct = self._concatenated()

        # np.unique sorts ascending; reverse to accept the most certain first.
        _, inverse, group_sizes = np.unique(
            certainty, return_inverse=True, return_counts=True)
        group_errors = np.bincount(inverse[~correct], minlength=len(group_sizes))

        accepted = np.concatenate([[0], np.cumsum(group_sizes[::-1])])
        errors = np.concatenate([[0], np.cumsum(group_errors[::-1])])
        return accepted, errors

    def curve(self):
        """Return the risk-coverage curve at every coverage k / N.

        Returns:
            Tuple of float arrays ``[N]``: coverage ``k / N`` and risk
            ``E(k) / k`` for k = 1 .. N.
        """
        accepted, errors = self._expected_error_counts()
        sample_count = int(accepted[-1])
        _require_samples(sample_count, "SelectivePrediction")

        counts = np.arange(1, sample_count + 1)
        risk = np.interp(counts, accepted, errors) / counts
        return counts / sample_count, risk

    def compute(self):
        accepted, errors = self._expected_error_counts()
        sample_count = int(accepted[-1])
        _require_samples(sample_count, "SelectivePrediction")

        counts = np.arange(1, sample_count + 1)
        aurc = float(np.mean(np.interp(counts, accepted, errors) / counts))

        error_count = int(errors[-1])
        optimal_errors = np.maximum(0, counts - (sample_count - error_count))
        optimal_aurc = float(np.mean(optimal_errors / counts))

        results = {"aurc": aurc, "e_aurc": aurc - optimal_aurc}
        for coverage in self.coverages:
            accepted_count = coverage * sample_count
            expected_errors = np.interp(accepted_count, accepted, errors)
            results[f"risk@{coverage:g}"] = float(expected_errors / accepted_count)
        return results


# Config.

METRICS = {
    "TopkAcc": TopkAcc,
    "NLL": NLL,
    "Brier": Brier,
    "CalibrationError": CalibrationError,
    "MisclassificationDetection": MisclassificationDetection,
    "SelectivePrediction": SelectivePrediction,
}


def _build_metric(entry):
    """Build one metric from a one-key dict such as ``{"TopkAcc": {"topk": [1, 5]}}``."""
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError(
            "each Metric.Eval entry must be a dict with one key, the metric name, "
            f"for example {{'TopkAcc': {{'topk': [1, 5]}}}}; got {entry!r}.")

    (name, arguments), = entry.items()
    if name not in METRICS:
        raise ValueError(
            f"unknown metric {name!r} in Metric.Eval; allowed metrics: "
            f"{sorted(METRICS)}.")

    # ``- NLL:`` in YAML gives None.
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ValueError(
            f"the arguments of metric {name!r} must be a dict, got {arguments!r}.")

    metric_class = METRICS[name]
    allowed = list(inspect.signature(metric_class).parameters)
    for key in arguments:
        if key not in allowed:
            raise ValueError(
                f"unknown argument {key!r} for metric {name!r}; allowed "
                f"arguments: {allowed}.")

    return metric_class(**arguments)


def build_metrics(metric_config_list):
    """Build metrics from a PaddleClas ``Metric.Eval`` list.

    Args:
        metric_config_list: List of one-key dicts mapping a name in ``METRICS``
            to its constructor arguments, or to None for the defaults, for
            example ``[{"TopkAcc": {"topk": [1, 5]}}, {"NLL": None}]``.

    Returns:
        list of ``Metric`` in the order given.

    Raises:
        ValueError: When an entry, metric name or argument is invalid. The
            message names it and lists the allowed ones.
    """
    if not isinstance(metric_config_list, (list, tuple)):
        raise ValueError(
            "Metric.Eval must be a list of one-key dicts, got "
            f"{type(metric_config_list).__name__}.")
    return [_build_metric(entry) for entry in metric_config_list]
