import math

import numpy as np
import pytest

from paddleclas_mc import uncertainty as U

LOG2 = math.log(2.0)


def _samples(*passes):
    """Stack per-pass probabilities [batch, classes] into [T, batch, classes]."""
    return np.asarray(passes, dtype=np.float64)


class TestHandComputed:
    def test_one_hot_agreeing_passes(self):
        probs = _samples([[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]])
        _, m = U.summarize_samples(probs)
        assert m["predictive_entropy"][0] == 0.0
        assert m["expected_entropy"][0] == 0.0
        assert m["mutual_information"][0] == 0.0
        assert m["variation_ratio"][0] == 0.0
        assert m["std"][0] == 0.0

    def test_one_hot_disagreeing_passes(self):
        probs = _samples([[1.0, 0.0]], [[0.0, 1.0]])
        mean, m = U.summarize_samples(probs)
        assert np.allclose(mean, [[0.5, 0.5]])
        assert m["predictive_entropy"][0] == pytest.approx(LOG2)
        assert m["expected_entropy"][0] == 0.0
        assert m["mutual_information"][0] == pytest.approx(LOG2)
        assert m["variation_ratio"][0] == pytest.approx(0.5)
        assert m["std"][0] == pytest.approx(0.5)

    def test_uniform_passes(self):
        probs = np.full((4, 1, 5), 0.2)
        _, m = U.summarize_samples(probs)
        assert m["predictive_entropy"][0] == pytest.approx(math.log(5))
        assert m["expected_entropy"][0] == pytest.approx(math.log(5))
        assert m["mutual_information"][0] == 0.0
        assert m["std"][0] == 0.0

    def test_mixed_case(self):
        # Pass 1: [0.9, 0.1], pass 2: [0.5, 0.5]; mean [0.7, 0.3].
        probs = _samples([[0.9, 0.1]], [[0.5, 0.5]])
        _, m = U.summarize_samples(probs)
        pe = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
        h1 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
        ee = (h1 + LOG2) / 2
        assert m["predictive_entropy"][0] == pytest.approx(pe)
        assert m["expected_entropy"][0] == pytest.approx(ee)
        assert m["mutual_information"][0] == pytest.approx(pe - ee)
        # argmax ties go to class 0, so both passes vote class 0.
        assert m["variation_ratio"][0] == 0.0
        assert m["std"][0] == pytest.approx(0.2)

    def test_variation_ratio_three_classes(self):
        probs = _samples([[0.6, 0.3, 0.1]], [[0.1, 0.8, 0.1]], [[0.2, 0.7, 0.1]],
                         [[0.1, 0.1, 0.8]])
        assert U.variation_ratio(probs)[0] == pytest.approx(1 - 2 / 4)


class TestProperties:
    def test_no_nan_with_exact_zeros_and_ones(self):
        probs = np.zeros((3, 4, 6))
        probs[:, :, 0] = 1.0
        probs[1, 2] = 0.0
        probs[1, 2, 5] = 1.0
        _, m = U.summarize_samples(probs)
        for name, values in m.items():
            assert np.all(np.isfinite(values)), name

    def test_mutual_information_never_negative(self):
        rng = np.random.RandomState(0)
        logits = rng.randn(20, 64, 10) * 0.01
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        probs = probs.astype(np.float32)
        assert np.all(U.mutual_information(probs) >= 0.0)

    def test_functions_match_summary(self):
        rng = np.random.RandomState(1)
        probs = rng.dirichlet(np.ones(7), size=(9, 5))
        _, m = U.summarize_samples(probs)
        assert np.allclose(m["predictive_entropy"], U.predictive_entropy(probs))
        assert np.allclose(m["expected_entropy"], U.expected_entropy(probs))
        assert np.allclose(m["mutual_information"], U.mutual_information(probs))
        assert np.allclose(m["std"], U.predicted_class_std(probs))
        assert set(m) == set(U.MEASURES)

    def test_wrong_rank_rejected(self):
        with pytest.raises(ValueError, match=r"\[T, batch_size, num_classes\]"):
            U.predictive_entropy(np.ones((2, 3)))
