"""Tests that each function in paddleclas_mc.plots writes a PNG file."""

import matplotlib
import numpy as np
import pytest

from paddleclas_mc.metrics import CalibrationError, SelectivePrediction
from paddleclas_mc.plots import (plot_reliability_diagram, plot_risk_coverage,
                                 plot_uncertainty_histograms)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_batch(seed, batch_size=300, num_classes=5, sharpness=1.0):
    """Return probs [batch_size, num_classes], labels [batch_size] and the predictive entropy."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0 * sharpness, size=(batch_size, num_classes))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)

    noisy_logits = logits + rng.normal(scale=2.0, size=logits.shape)
    labels = noisy_logits.argmax(axis=1)
    entropy = -np.sum(probs * np.log(probs), axis=1)
    return probs, labels, entropy


def assert_png(path):
    with open(path, "rb") as file:
        header = file.read(8)
        rest = file.read()

    assert header == PNG_SIGNATURE
    assert len(rest) > 1000


def test_reliability_diagram_png(tmp_path):
    states = {}
    for name, seed, sharpness in (("single pass", 0, 1.5), ("MC Dropout", 1, 0.7)):
        probs, labels, _ = make_batch(seed, sharpness=sharpness)
        metric = CalibrationError(n_bins=15)
        metric.update(probs, labels)
        states[name] = metric.state()

    path = plot_reliability_diagram(states, tmp_path / "reliability.png")

    assert path == str(tmp_path / "reliability.png")
    assert_png(path)


def test_reliability_diagram_accepts_metric(tmp_path):
    probs, labels, _ = make_batch(0)
    metric = CalibrationError(n_bins=10)
    metric.update(probs, labels)

    path = plot_reliability_diagram({"single pass": metric}, tmp_path / "nested" / "one.png")

    assert_png(path)


def test_risk_coverage_png(tmp_path):
    curves = {}
    for name, seed in (("single pass", 0), ("MC Dropout", 1)):
        probs, labels, _ = make_batch(seed)
        metric = SelectivePrediction()
        metric.update(probs, labels)
        curves[name] = metric.curve()

    path = plot_risk_coverage(curves, tmp_path / "risk_coverage.png")

    assert_png(path)


def test_uncertainty_histograms_png(tmp_path):
    probs, labels, entropy = make_batch(0)
    correct = probs.argmax(axis=1) == labels
    values = {"predictive_entropy": entropy, "max_prob": 1.0 - probs.max(axis=1)}

    path = plot_uncertainty_histograms(values, correct, tmp_path / "histograms.png")

    assert_png(path)


def test_histograms_per_measure_flags(tmp_path):
    probs, labels, entropy = make_batch(0)
    values = {"single pass": entropy, "all correct": entropy}
    flags = {"single pass": probs.argmax(axis=1) == labels,
             "all correct": np.ones(len(labels), dtype=bool)}

    path = plot_uncertainty_histograms(values, flags, tmp_path / "flags.png")

    assert_png(path)


def test_plots_keep_global_backend(tmp_path):
    backend = matplotlib.get_backend()
    probs, labels, entropy = make_batch(0)

    plot_uncertainty_histograms({"entropy": entropy}, probs.argmax(axis=1) == labels,
                                tmp_path / "backend.png")

    assert matplotlib.get_backend() == backend


@pytest.mark.parametrize("plot", [
    lambda path: plot_reliability_diagram({}, path),
    lambda path: plot_risk_coverage({}, path),
    lambda path: plot_uncertainty_histograms({}, np.zeros(0, dtype=bool), path),
])
def test_plots_reject_empty_input(plot, tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        plot(tmp_path / "empty.png")


def test_histograms_shape_mismatch_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"\[num_samples\]"):
        plot_uncertainty_histograms({"entropy": np.zeros(3)}, np.zeros(2, dtype=bool),
                                    tmp_path / "bad.png")
