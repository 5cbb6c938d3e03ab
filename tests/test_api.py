"""The public Python API: every example in docs/api.md and the docstrings, and the exports."""

import doctest
import os
import re

import numpy as np
import paddle
import pytest

import paddleclas_mc
from paddleclas_mc import functional
from paddleclas_mc.metrics import CalibrationError, MisclassificationDetection

from conftest import SmallNet, trained_batch_norm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_DOC = os.path.join(ROOT, "docs", "api.md")


def _doc_blocks():
    """Return ``(heading, code)`` for every fenced Python block of docs/api.md."""
    with open(API_DOC, encoding="utf-8") as file:
        text = file.read()
    blocks = []
    heading = "top"
    pattern = re.compile(r"^(#+ [^\n]*)$|^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    for match in pattern.finditer(text):
        if match.group(1):
            heading = match.group(1).lstrip("# ").strip()
        else:
            blocks.append((heading, match.group(2)))
    return blocks


DOC_BLOCKS = _doc_blocks()
SETUP_CODE = DOC_BLOCKS[0][1]


def test_doc_has_examples():
    assert len(DOC_BLOCKS) >= 8


@pytest.mark.parametrize("code", [code for _, code in DOC_BLOCKS[1:]],
                         ids=[f"{index}-{heading.split(':')[0]}"
                              for index, (heading, _) in enumerate(DOC_BLOCKS[1:], start=1)])
def test_doc_example_runs(code, monkeypatch):
    # The last example reads the demo config with paths relative to the root.
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "api_doc_example"}
    exec(compile(SETUP_CODE, "docs/api.md (set-up)", "exec"), namespace)
    exec(compile(code, "docs/api.md", "exec"), namespace)


def test_functional_docstring_examples():
    paddle.seed(0)
    model = trained_batch_norm(SmallNet())
    images = paddle.to_tensor(np.random.RandomState(0).randn(5, 3, 8, 8).astype("float32"))
    result = doctest.testmod(functional, extraglobs={"model": model, "images": images},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 20
    assert result.failed == 0


def test_exports_resolve():
    for name in paddleclas_mc.__all__:
        assert getattr(paddleclas_mc, name) is not None, name
    assert set(paddleclas_mc.__all__) <= set(dir(paddleclas_mc))


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        paddleclas_mc.no_such_name  # noqa: B018


def test_submodules_still_import():
    from paddleclas_mc import integration, sampling
    assert callable(integration.build_model)
    assert sampling.MCSampler is paddleclas_mc.MCSampler


# MCPrediction and mc_predict.


def test_prediction_matches_summarize_samples():
    probs = np.random.RandomState(0).dirichlet(np.ones(6), size=(7, 3))   # [T, B, C]
    prediction = functional.MCPrediction.from_samples(probs)
    mean, measures = paddleclas_mc.summarize_samples(probs)
    assert np.array_equal(prediction.mean, mean)
    for name, values in measures.items():
        assert np.array_equal(prediction.measures[name], values), name
    assert np.array_equal(prediction.class_ids, mean.argmax(axis=1))
    assert np.array_equal(prediction.confidence, mean.max(axis=1))
    assert prediction.samples.shape == (7, 3, 6)


def test_prediction_rejects_2d_input():
    with pytest.raises(ValueError, match=r"\[T, batch_size, num_classes\]"):
        functional.MCPrediction.from_samples(np.full((3, 4), 0.25))


def test_mc_predict_shapes_and_seed(small_net, images):
    first = functional.mc_predict(small_net, images, samples=12, seed=3)
    second = functional.mc_predict(small_net, images, samples=12, seed=3)
    assert first.samples.shape == (12, 5, 4)
    assert first.mean.shape == (5, 4)
    assert first.variation_ratio.shape == (5,)
    assert np.array_equal(first.samples, second.samples)


def test_mc_predict_passes_sampler_options(small_net, images):
    looped = functional.mc_predict(small_net, images, samples=4, seed=0, strategy="loop")
    assert looped.samples.shape == (4, 5, 4)
    with pytest.raises(ValueError, match="strategy"):
        functional.mc_predict(small_net, images, samples=4, strategy="fast")


def test_mc_predict_rejects_model_without_dropout(images):
    model = paddle.nn.Sequential(paddle.nn.Flatten(), paddle.nn.Linear(192, 4))
    with pytest.raises(paddleclas_mc.NoStochasticLayerError):
        functional.mc_predict(model, images, samples=4)


# Calibration and selective-prediction functions against references.


@pytest.fixture
def scored_samples():
    """200 samples over 5 classes, about 60 % right, with an uncertainty score."""
    random = np.random.RandomState(1)
    probs = random.dirichlet(np.ones(5) * 0.5, size=200)
    labels = np.where(random.rand(200) < 0.6, probs.argmax(axis=1), random.randint(0, 5, 200))
    uncertainty = 1.0 - probs.max(axis=1) + random.rand(200) * 0.1
    return probs, labels, uncertainty


def _reference_ece(probs, labels, n_bins):
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for index in range(n_bins):
        members = bins == index
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return total


def test_ece_matches_reference(scored_samples):
    probs, labels, _ = scored_samples
    for n_bins in (1, 10, 15):
        ece = functional.expected_calibration_error(probs, labels, n_bins=n_bins)
        assert ece == pytest.approx(_reference_ece(probs, labels, n_bins), abs=1e-12)


def test_mce_and_bins_match_class(scored_samples):
    probs, labels, _ = scored_samples
    metric = CalibrationError(n_bins=10)
    metric.update(probs, labels)
    assert functional.maximum_calibration_error(probs, labels, n_bins=10) == metric.compute()["mce"]
    bins = functional.reliability_bins(probs, labels, n_bins=10)
    assert bins["bin_counts"].sum() == 200
    assert bins["bin_edges"].shape == (11,)


def test_nll_brier_accuracy_match_sklearn(scored_samples):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    probs, labels, _ = scored_samples
    classes = list(range(5))
    assert functional.negative_log_likelihood(probs, labels) == pytest.approx(
        sklearn_metrics.log_loss(labels, probs, labels=classes), rel=1e-9)
    onehot = np.eye(5)[labels]
    assert functional.brier_score(probs, labels) == pytest.approx(
        np.mean(np.sum((probs - onehot) ** 2, axis=1)), rel=1e-12)
    for k in (1, 3):
        assert functional.top_k_accuracy(probs, labels, k=k) == pytest.approx(
            sklearn_metrics.top_k_accuracy_score(labels, probs, k=k, labels=classes))


def test_detection_matches_sklearn(scored_samples):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    probs, labels, uncertainty = scored_samples
    wrong = probs.argmax(axis=1) != labels
    detection = functional.misclassification_detection(probs, labels, uncertainty)
    assert detection["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(wrong, uncertainty))
    assert detection["aupr"] == pytest.approx(
        sklearn_metrics.average_precision_score(wrong, uncertainty))

    metric = MisclassificationDetection(measures=["u"])
    metric.update(probs, labels, {"u": uncertainty})
    assert detection["auroc"] == metric.compute()["u_auroc"]


def test_selective_risk_orders(scored_samples):
    probs, labels, uncertainty = scored_samples
    by_confidence = functional.selective_risk(probs, labels, coverages=(0.5, 1.0))
    by_uncertainty = functional.selective_risk(probs, labels, uncertainty, coverages=(0.5, 1.0))
    error_rate = np.mean(probs.argmax(axis=1) != labels)
    for risk in (by_confidence, by_uncertainty):
        assert risk["risk@1"] == pytest.approx(error_rate)
        assert risk["e_aurc"] >= 0.0
    assert by_confidence["aurc"] != by_uncertainty["aurc"]


def test_risk_coverage_curve(scored_samples):
    probs, labels, uncertainty = scored_samples
    coverage, risk = functional.risk_coverage(probs, labels, uncertainty)
    assert coverage.shape == risk.shape == (200,)
    assert coverage[-1] == 1.0
    assert risk[-1] == pytest.approx(np.mean(probs.argmax(axis=1) != labels))
    assert np.mean(risk) == pytest.approx(
        functional.selective_risk(probs, labels, uncertainty)["aurc"])


def test_functions_reject_logits():
    with pytest.raises(ValueError, match="not logits"):
        functional.expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
