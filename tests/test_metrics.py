"""Tests of paddleclas_mc.metrics against scikit-learn and hand-computed values."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import (average_precision_score, brier_score_loss, log_loss,
                             roc_auc_score, top_k_accuracy_score)

from paddleclas_mc import metrics
from paddleclas_mc.metrics import (NLL, Brier, CalibrationError, MisclassificationDetection,
                                   SelectivePrediction, TopkAcc, build_metrics)


def make_batch(seed=0, batch_size=200, num_classes=6):
    """Return probs [batch_size, num_classes], labels [batch_size] and two uncertainty measures.

    Labels are drawn from the probabilities, so the accuracy lies well
    between 0 and 1 and the measures are informative but imperfect.
    """
    rng = np.random.default_rng(seed)
    concentration = rng.uniform(0.2, 3.0, size=(batch_size, 1))
    probs = rng.gamma(concentration, size=(batch_size, num_classes))
    probs /= probs.sum(axis=1, keepdims=True)

    cumulative = np.cumsum(probs, axis=1)
    draws = rng.random((batch_size, 1))
    labels = np.minimum(np.sum(cumulative < draws, axis=1), num_classes - 1)

    entropy = -np.sum(probs * np.log(np.maximum(probs, 1e-300)), axis=1)
    uncertainty = {
        "predictive_entropy": entropy,
        # Rounding creates many ties, which AUROC and AP must handle.
        "rounded_entropy": np.round(entropy, 1),
    }
    return probs, labels, uncertainty


def one_hot_probs(predictions, num_classes, confidence=1.0):
    """Return probs [batch_size, num_classes] putting ``confidence`` on each prediction."""
    predictions = np.asarray(predictions)
    rest = (1.0 - confidence) / (num_classes - 1)
    probs = np.full((len(predictions), num_classes), rest)
    probs[np.arange(len(predictions)), predictions] = confidence
    return probs


def compute_in_batches(metric, probs, labels, uncertainty, boundaries):
    """Update ``metric`` with the slices between ``boundaries`` and return compute()."""
    for start, stop in zip(boundaries[:-1], boundaries[1:]):
        batch_uncertainty = {name: values[start:stop] for name, values in uncertainty.items()}
        metric.update(probs[start:stop], labels[start:stop], batch_uncertainty)
    return metric.compute()


METRIC_FACTORIES = {
    "TopkAcc": lambda: TopkAcc(topk=(1, 3)),
    "NLL": NLL,
    "Brier": Brier,
    "CalibrationError": lambda: CalibrationError(n_bins=10),
    "MisclassificationDetection": MisclassificationDetection,
    "SelectivePrediction": lambda: SelectivePrediction(score="rounded_entropy"),
    "SelectivePrediction(confidence)": SelectivePrediction,
}


# Exact sums.


@pytest.mark.parametrize("values", [
    [0.1, 0.2, 0.3],
    [1e308, 1e308, -1e308],
    [5e-324, 2.5, -5e-324],
    [0.0, -0.0],
    np.random.default_rng(1).normal(size=3000) * 10.0 ** np.random.default_rng(2).integers(-300, 300, 3000),
])
def test_exact_sum_matches_fractions(values):
    expected = sum((Fraction(value) for value in np.asarray(values, dtype=float).tolist()), Fraction(0))

    total = metrics._exact_sum(values)

    assert Fraction(total, 2 ** metrics._FIXED_POINT_BITS) == expected


# TopkAcc.


def test_topk_matches_sklearn():
    probs, labels, _ = make_batch()
    metric = TopkAcc(topk=(1, 3))

    metric.update(probs, labels)
    results = metric.compute()

    assert results["top1"] == pytest.approx(
        top_k_accuracy_score(labels, probs, k=1, labels=range(6)), abs=1e-12)
    assert results["top3"] == pytest.approx(
        top_k_accuracy_score(labels, probs, k=3, labels=range(6)), abs=1e-12)


def test_topk_k_above_num_classes():
    probs, labels, _ = make_batch(num_classes=4)
    metric = TopkAcc(topk=(1, 5))

    metric.update(probs, labels)

    assert metric.compute()["top5"] == 1.0


def test_topk_ties_follow_argmax():
    probs = np.array([[0.5, 0.5, 0.0], [0.4, 0.3, 0.3]])
    labels = np.array([1, 2])
    metric = TopkAcc(topk=(1, 2, 3))

    metric.update(probs, labels)
    results = metric.compute()

    assert results["top1"] == 0.0
    assert results["top2"] == 0.5
    assert results["top3"] == 1.0


def test_topk_keys_sorted_unique():
    metric = TopkAcc(topk=[5, 1, 5])

    assert metric.topk == (1, 5)


# NLL and Brier.


def test_nll_matches_log_loss():
    probs, labels, _ = make_batch()
    metric = NLL()

    metric.update(probs, labels)

    expected = log_loss(labels, probs, labels=range(probs.shape[1]))
    assert metric.compute()["nll"] == pytest.approx(expected, rel=1e-10)


def test_nll_clips_zero_probability():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    labels = np.array([1, 0])
    metric = NLL()

    metric.update(probs, labels)

    expected = (-math.log(1e-12) - math.log(0.5)) / 2
    assert metric.compute()["nll"] == pytest.approx(expected, rel=1e-15)


def test_brier_matches_sklearn_one_vs_rest():
    probs, labels, _ = make_batch()
    metric = Brier()

    metric.update(probs, labels)

    expected = sum(
        brier_score_loss(labels == class_index, probs[:, class_index])
        for class_index in range(probs.shape[1]))
    assert metric.compute()["brier"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("predictions, labels, expected", [
    ([0, 1], [0, 1], 0.0),
    ([0, 1], [1, 0], 2.0),
])
def test_brier_certain_extremes(predictions, labels, expected):
    metric = Brier()

    metric.update(one_hot_probs(predictions, 3), np.array(labels))

    assert metric.compute()["brier"] == expected


# CalibrationError.


def test_ece_hand_built_case():
    probs = np.array([
        [0.9, 0.1, 0.0, 0.0],    # confidence 0.9, correct, bin 3
        [0.8, 0.2, 0.0, 0.0],    # confidence 0.8, wrong, bin 3
        [0.6, 0.4, 0.0, 0.0],    # confidence 0.6, correct, bin 2
        [0.3, 0.3, 0.2, 0.2],    # confidence 0.3, wrong, bin 1
    ])
    labels = np.array([0, 1, 0, 2])
    metric = CalibrationError(n_bins=4)

    metric.update(probs, labels)
    results = metric.compute()

    # Bin gaps: |0.5 - 0.85| = 0.35 (2 samples), |1 - 0.6| = 0.4, |0 - 0.3| = 0.3.
    assert results["ece"] == pytest.approx((2 * 0.35 + 0.4 + 0.3) / 4, abs=1e-15)
    assert results["mce"] == pytest.approx(0.4, abs=1e-15)
    assert results["n_bins"] == 4
    assert metric.state()["bin_counts"].tolist() == [0, 1, 1, 2]


def test_ece_matches_direct_formula():
    probs, labels, _ = make_batch(batch_size=500)
    metric = CalibrationError(n_bins=15)

    metric.update(probs, labels)

    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    expected_ece = 0.0
    expected_mce = 0.0
    for index in range(15):
        low, high = index / 15, (index + 1) / 15
        in_bin = (confidence >= low) & ((confidence < high) | (index == 14))
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            expected_ece += in_bin.mean() * gap
            expected_mce = max(expected_mce, gap)
    results = metric.compute()
    assert results["ece"] == pytest.approx(expected_ece, abs=1e-12)
    assert results["mce"] == pytest.approx(expected_mce, abs=1e-12)


@pytest.mark.parametrize("labels, expected", [
    ([0, 1, 2], 0.0),   # all correct at confidence 1.0
    ([1, 2, 0], 1.0),   # all wrong at confidence 1.0
])
def test_ece_certain_extremes(labels, expected):
    metric = CalibrationError()

    metric.update(one_hot_probs([0, 1, 2], 3), np.array(labels))
    results = metric.compute()

    assert results["ece"] == expected
    assert results["mce"] == expected


def test_ece_confidence_one_in_top_bin():
    metric = CalibrationError(n_bins=10)

    metric.update(one_hot_probs([0], 3), np.array([0]))

    assert metric.state()["bin_counts"].tolist() == [0] * 9 + [1]


@pytest.mark.parametrize("confidence, expected_bin", [
    (0.0, 0),
    (0.25, 1),
    (0.5, 2),
    (0.999, 3),
    (1.0, 3),
])
def test_calibration_bin_edges(confidence, expected_bin):
    metric = CalibrationError(n_bins=4)

    assert metric._assign_bins(np.array([confidence]))[0] == expected_bin


def test_bin_statistics_empty_bins_nan():
    metric = CalibrationError(n_bins=4)

    metric.update(one_hot_probs([0, 1], 2), np.array([0, 0]))
    statistics = metric.bin_statistics()

    assert np.isnan(statistics["accuracy"][:3]).all()
    assert statistics["accuracy"][3] == 0.5
    assert statistics["confidence"][3] == 1.0
    assert statistics["bin_edges"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


# MisclassificationDetection.


@pytest.mark.parametrize("measure", ["predictive_entropy", "rounded_entropy"])
def test_detection_matches_sklearn(measure):
    probs, labels, uncertainty = make_batch(batch_size=400)
    wrong = probs.argmax(axis=1) != labels
    metric = MisclassificationDetection()

    metric.update(probs, labels, uncertainty)
    results = metric.compute()

    assert results[f"{measure}_auroc"] == pytest.approx(
        roc_auc_score(wrong, uncertainty[measure]), abs=1e-12)
    assert results[f"{measure}_aupr"] == pytest.approx(
        average_precision_score(wrong, uncertainty[measure]), abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 1, 2], [1, 2, 0]])
def test_detection_single_class_nan(labels):
    metric = MisclassificationDetection()

    metric.update(one_hot_probs([0, 1, 2], 3, confidence=0.8), np.array(labels),
                  {"entropy": np.array([0.1, 0.2, 0.3])})
    results = metric.compute()

    assert math.isnan(results["entropy_auroc"])
    assert math.isnan(results["entropy_aupr"])


def test_detection_selected_measures():
    probs, labels, uncertainty = make_batch()
    metric = MisclassificationDetection(measures=["rounded_entropy"])

    metric.update(probs, labels, uncertainty)

    assert sorted(metric.compute()) == ["rounded_entropy_aupr", "rounded_entropy_auroc"]


def test_detection_changed_measures_rejected():
    probs, labels, uncertainty = make_batch()
    metric = MisclassificationDetection()
    metric.update(probs, labels, uncertainty)

    with pytest.raises(ValueError, match="same measures"):
        metric.update(probs, labels, {"predictive_entropy": uncertainty["predictive_entropy"]})


def test_detection_needs_uncertainty():
    probs, labels, _ = make_batch()

    with pytest.raises(ValueError, match="uncertainty dict"):
        MisclassificationDetection().update(probs, labels)


# SelectivePrediction.


def brute_force_aurc(certainty, correct):
    """Return the AURC averaged over every order of the tied samples."""
    values = []
    for order in itertools.permutations(range(len(certainty))):
        order = np.array(order)
        if np.any(np.diff(certainty[order]) > 0):
            continue
        errors = np.cumsum(~correct[order])
        values.append(np.mean(errors / np.arange(1, len(order) + 1)))
    return np.mean(values)


@pytest.mark.parametrize("confidence, correct", [
    ([0.95, 0.9, 0.8, 0.7, 0.6, 0.55], [True, False, True, True, False, True]),
    ([0.9, 0.6, 0.6, 0.6, 0.5, 0.5], [True, False, True, True, False, True]),
    ([0.6] * 6, [True, False, True, True, False, True]),
])
def test_aurc_expected_over_tie_orders(confidence, correct):
    # Every confidence is at least 0.5, so class 0 is the argmax prediction.
    confidence = np.array(confidence)
    correct = np.array(correct)
    probs = np.stack([confidence, 1.0 - confidence], axis=1)
    labels = np.where(correct, 0, 1)
    metric = SelectivePrediction()

    metric.update(probs, labels)

    expected = brute_force_aurc(confidence, correct)
    assert metric.compute()["aurc"] == pytest.approx(expected, abs=1e-12)


def test_selective_all_tied_risk_constant():
    probs = np.full((8, 2), 0.5)
    labels = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    metric = SelectivePrediction(coverages=(0.25, 0.5, 1.0))

    metric.update(probs, labels)
    results = metric.compute()

    for key in ("risk@0.25", "risk@0.5", "risk@1", "aurc"):
        assert results[key] == pytest.approx(0.25, abs=1e-15), key


def test_selective_risk_interpolates_coverage():
    # Sorted by confidence: correct, wrong, correct, correct, wrong.
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0, 1])
    metric = SelectivePrediction(coverages=(0.4, 0.5, 1.0))

    metric.update(probs, labels)
    results = metric.compute()

    assert results["risk@0.4"] == pytest.approx(1 / 2, abs=1e-15)
    assert results["risk@0.5"] == pytest.approx(1 / 2.5, abs=1e-15)
    assert results["risk@1"] == pytest.approx(2 / 5, abs=1e-15)


def test_selective_perfect_ranking_zero_e_aurc():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1])
    metric = SelectivePrediction()

    metric.update(probs, labels)
    results = metric.compute()

    assert results["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4, abs=1e-15)
    assert results["e_aurc"] == pytest.approx(0.0, abs=1e-15)


def test_selective_uncertainty_score_order():
    probs, labels, _ = make_batch()
    by_confidence = SelectivePrediction()
    by_uncertainty = SelectivePrediction(score="inverse_confidence")

    by_confidence.update(probs, labels)
    by_uncertainty.update(probs, labels, {"inverse_confidence": -probs.max(axis=1)})

    assert by_uncertainty.compute() == by_confidence.compute()


def test_selective_curve_matches_aurc():
    probs, labels, _ = make_batch()
    metric = SelectivePrediction()
    metric.update(probs, labels)

    coverage, risk = metric.curve()

    assert coverage.shape == risk.shape == (len(labels),)
    assert coverage[0] == 1 / len(labels)
    assert coverage[-1] == 1.0
    assert risk[-1] == pytest.approx(np.mean(probs.argmax(axis=1) != labels), abs=1e-15)
    assert np.mean(risk) == metric.compute()["aurc"]


# Shared behaviour.


@pytest.mark.parametrize("name", sorted(METRIC_FACTORIES))
def test_batch_of_one(name):
    probs, labels, uncertainty = make_batch(batch_size=1)
    metric = METRIC_FACTORIES[name]()

    metric.update(probs, labels, uncertainty)
    results = metric.compute()

    assert results
    assert all(isinstance(value, (float, int)) for value in results.values())


@pytest.mark.parametrize("name", sorted(METRIC_FACTORIES))
def test_merge_matches_single_pass(name):
    probs, labels, uncertainty = make_batch(batch_size=300)
    boundaries = [0, 1, 37, 38, 150, 151, 299, 300]

    expected = compute_in_batches(METRIC_FACTORIES[name](), probs, labels, uncertainty, [0, 300])
    batched = compute_in_batches(METRIC_FACTORIES[name](), probs, labels, uncertainty, boundaries)

    rank_0 = METRIC_FACTORIES[name]()
    rank_1 = METRIC_FACTORIES[name]()
    compute_in_batches(rank_0, probs, labels, uncertainty, [0, 13, 113])
    compute_in_batches(rank_1, probs, labels, uncertainty, [113, 200, 300])
    rank_0.merge(rank_1)

    # Merge in the other order, from an exported state, into an empty metric.
    from_states = METRIC_FACTORIES[name]()
    from_states.merge_state(rank_1.state())
    rank_0_again = METRIC_FACTORIES[name]()
    compute_in_batches(rank_0_again, probs, labels, uncertainty, [0, 113])
    from_states.merge_state(rank_0_again.state())

    assert batched == expected
    assert rank_0.compute() == expected
    assert from_states.compute() == expected


@pytest.mark.parametrize("name", sorted(METRIC_FACTORIES))
def test_reset_clears_state(name):
    probs, labels, uncertainty = make_batch()
    metric = METRIC_FACTORIES[name]()
    metric.update(probs, labels, uncertainty)

    metric.reset()

    with pytest.raises(RuntimeError, match="at least one sample"):
        metric.compute()


@pytest.mark.parametrize("name", sorted(METRIC_FACTORIES))
def test_state_is_a_copy(name):
    probs, labels, uncertainty = make_batch()
    metric = METRIC_FACTORIES[name]()
    metric.update(probs[:50], labels[:50], {key: value[:50] for key, value in uncertainty.items()})
    state = metric.state()
    expected = type(metric).from_state(state, **metric.config()).compute()

    metric.update(probs[50:], labels[50:], {key: value[50:] for key, value in uncertainty.items()})

    assert type(metric).from_state(state, **metric.config()).compute() == expected


@pytest.mark.parametrize("name", sorted(METRIC_FACTORIES))
def test_higher_is_better_declared(name):
    assert isinstance(METRIC_FACTORIES[name]().higher_is_better, bool)


def test_labels_column_accepted():
    probs, labels, _ = make_batch()
    flat = TopkAcc()
    column = TopkAcc()

    flat.update(probs, labels)
    column.update(probs, labels[:, None])

    assert column.compute() == flat.compute()


def test_calibration_from_state_infers_bins():
    probs, labels, _ = make_batch()
    metric = CalibrationError(n_bins=7)
    metric.update(probs, labels)

    rebuilt = CalibrationError.from_state(metric.state())

    assert rebuilt.n_bins == 7
    assert rebuilt.compute() == metric.compute()


def test_merge_other_class_rejected():
    with pytest.raises(TypeError, match="cannot merge NLL into Brier"):
        Brier().merge(NLL())


def test_merge_other_config_rejected():
    with pytest.raises(ValueError, match="config"):
        CalibrationError(n_bins=10).merge(CalibrationError(n_bins=15))


def test_merge_state_missing_key_rejected():
    with pytest.raises(ValueError, match="must have the keys"):
        TopkAcc().merge_state({"sample_count": 3})


# Invalid inputs.

VALID_PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
VALID_LABELS = np.array([0, 2])


@pytest.mark.parametrize("probs, labels, message", [
    (VALID_PROBS[0], VALID_LABELS, "2-D array"),
    (np.log(VALID_PROBS), VALID_LABELS, r"in \[0, 1\]"),
    (VALID_PROBS * 0.9, VALID_LABELS, "sum to 1"),
    (np.where(VALID_PROBS == 0.2, np.nan, VALID_PROBS), VALID_LABELS, "NaN"),
    (VALID_PROBS.astype(str), VALID_LABELS, "real numbers"),
    (np.zeros((2, 0)), VALID_LABELS, "at least one class"),
    (VALID_PROBS, VALID_LABELS.astype(float), "integer class indices"),
    (VALID_PROBS, np.array([0, 3]), r"in \[0, 3\)"),
    (VALID_PROBS, np.array([-1, 0]), r"in \[0, 3\)"),
    (VALID_PROBS, np.array([0]), "1 entries but probs has 2 rows"),
    (VALID_PROBS, np.array([[0, 1], [2, 0]]), r"\[batch_size, 1\]"),
])
def test_invalid_inputs_rejected(probs, labels, message):
    with pytest.raises(ValueError, match=message):
        NLL().update(probs, labels)


@pytest.mark.parametrize("uncertainty, message", [
    (None, "no uncertainty dict"),
    ([0.1, 0.2], "must be a dict"),
    ({"other": np.zeros(2)}, "'entropy' is missing"),
    ({"entropy": np.zeros(3)}, r"shape \[2\]"),
    ({"entropy": np.array([0.1, np.inf])}, "NaN or infinity"),
])
def test_invalid_uncertainty_rejected(uncertainty, message):
    with pytest.raises(ValueError, match=message):
        SelectivePrediction(score="entropy").update(VALID_PROBS, VALID_LABELS, uncertainty)


@pytest.mark.parametrize("factory, message", [
    (lambda: TopkAcc(topk=[0, 1]), "positive integers"),
    (lambda: TopkAcc(topk=[]), "at least one k"),
    (lambda: CalibrationError(n_bins=0), "positive integer"),
    (lambda: SelectivePrediction(coverages=[0.0]), r"in \(0, 1\]"),
    (lambda: SelectivePrediction(coverages=[1.5]), r"in \(0, 1\]"),
    (lambda: SelectivePrediction(score=""), "score must be"),
    (lambda: MisclassificationDetection(measures=[]), "non-empty list"),
])
def test_invalid_arguments_rejected(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


# build_metrics.


def test_build_metrics_from_config():
    built = build_metrics([
        {"TopkAcc": {"topk": [1, 5]}},
        {"NLL": None},
        {"Brier": {}},
        {"CalibrationError": {"n_bins": 10}},
        {"MisclassificationDetection": {"measures": ["predictive_entropy"]}},
        {"SelectivePrediction": {"coverages": [0.9], "score": "predictive_entropy"}},
    ])

    assert [type(metric).__name__ for metric in built] == [
        "TopkAcc", "NLL", "Brier", "CalibrationError", "MisclassificationDetection",
        "SelectivePrediction"]
    assert built[0].topk == (1, 5)
    assert built[3].n_bins == 10
    assert built[4].measures == ("predictive_entropy",)
    assert built[5].config() == {"coverages": (0.9,), "score": "predictive_entropy"}


@pytest.mark.parametrize("config_list, message", [
    ([{"Accuracy": {}}], r"unknown metric 'Accuracy'.*'TopkAcc'"),
    ([{"TopkAcc": {"k": 1}}], r"unknown argument 'k' for metric 'TopkAcc'.*\['topk'\]"),
    ([{"CalibrationError": {"bins": 15}}], r"unknown argument 'bins'.*\['n_bins'\]"),
    ([{"NLL": {}, "Brier": {}}], "one key"),
    (["NLL"], "one key"),
    ([{"TopkAcc": [1, 5]}], "must be a dict"),
    ({"NLL": None}, "must be a list"),
])
def test_build_metrics_rejects(config_list, message):
    with pytest.raises(ValueError, match=message):
        build_metrics(config_list)
