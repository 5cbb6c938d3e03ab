"""Uncertainty measures over T stochastic forward passes.

Every function takes the softmax outputs of the T passes as an array of shape
``[T, batch_size, num_classes]`` and returns one value per image, shape
``[batch_size]``. Logarithms are natural (nats). The term ``0 * log 0`` is
taken as 0, so one-hot probabilities give no NaN. Inputs are converted to
float64 before any sum, whatever their dtype.

With ``p_t`` the probabilities of pass t and ``p = mean_t p_t``:

- predictive entropy: ``H[p] = -sum_c p_c log p_c`` (total uncertainty);
- expected entropy: ``mean_t H[p_t]`` (aleatoric part);
- mutual information: ``H[p] - mean_t H[p_t]`` (epistemic part, the BALD
  score), clipped at 0 against rounding;
- variation ratio: ``1 - f / T``, where ``f`` counts the passes whose top-1
  class is the most frequent top-1 class;
- std: the standard deviation over the T passes (population, ``ddof=0``) of
  the probability of the class predicted by ``p``.
"""

import numpy as np

__all__ = [
    "MEASURES",
    "entropy",
    "expected_entropy",
    "mean_probs",
    "mutual_information",
    "predicted_class_std",
    "predictive_entropy",
    "summarize_samples",
    "variation_ratio",
]

MEASURES = (
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
    "std",
)


def _as_samples(probs):
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError("expected probabilities of shape [T, batch_size, num_classes], "
                         f"got shape {list(probs.shape)}")
    if probs.shape[0] < 1 or probs.shape[2] < 1:
        raise ValueError(f"expected at least one sample and one class, got shape {list(probs.shape)}")
    return probs


def entropy(probs, axis=-1):
    """Compute the Shannon entropy in nats along ``axis``, with ``0 log 0 = 0``.

    Args:
        probs: probabilities of any shape, summing to 1 along ``axis``.
        axis: the class axis.

    Returns:
        An array with ``axis`` removed.
    """
    probs = np.asarray(probs, dtype=np.float64)
    safe = np.where(probs > 0, probs, 1.0)
    return -np.sum(np.where(probs > 0, probs * np.log(safe), 0.0), axis=axis)


def mean_probs(probs):
    """Average the T passes: ``[T, batch_size, num_classes]`` to ``[batch_size, num_classes]``."""
    return _as_samples(probs).mean(axis=0)


def predictive_entropy(probs):
    """Compute the entropy of the mean probabilities, shape ``[batch_size]``."""
    return entropy(mean_probs(probs))


def expected_entropy(probs):
    """Compute the mean over passes of each pass's entropy, shape ``[batch_size]``."""
    return entropy(_as_samples(probs)).mean(axis=0)


def mutual_information(probs):
    """Compute predictive minus expected entropy, never negative, shape ``[batch_size]``."""
    probs = _as_samples(probs)
    return np.maximum(predictive_entropy(probs) - expected_entropy(probs), 0.0)


def variation_ratio(probs):
    """Compute the fraction of passes that disagree with the modal top-1 class.

    Returns:
        Shape ``[batch_size]``, in ``[0, 1 - 1/T]``. Ties between top-1
        classes within a pass go to the lowest class id, as ``argmax`` does.
    """
    probs = _as_samples(probs)
    num_samples, _, num_classes = probs.shape
    votes = probs.argmax(axis=2)
    counts = np.stack([(votes == c).sum(axis=0) for c in range(num_classes)], axis=1)
    return 1.0 - counts.max(axis=1) / num_samples


def predicted_class_std(probs):
    """Compute the std over passes of the predicted class's probability.

    The predicted class is the argmax of the mean probabilities.

    Returns:
        Shape ``[batch_size]``.
    """
    probs = _as_samples(probs)
    predicted = mean_probs(probs).argmax(axis=1)
    per_pass = np.take_along_axis(probs, predicted[None, :, None], axis=2)[:, :, 0]
    return per_pass.std(axis=0)


def summarize_samples(probs):
    """Compute the mean probabilities and every uncertainty measure in one go.

    Args:
        probs: softmax outputs of shape ``[T, batch_size, num_classes]``.

    Returns:
        A tuple ``(mean, measures)``: ``mean`` has shape
        ``[batch_size, num_classes]`` and ``measures`` maps each name in
        ``MEASURES`` to an array of shape ``[batch_size]``.
    """
    probs = _as_samples(probs)
    mean = probs.mean(axis=0)
    pe = entropy(mean)
    ee = entropy(probs).mean(axis=0)
    measures = {
        "predictive_entropy": pe,
        "expected_entropy": ee,
        "mutual_information": np.maximum(pe - ee, 0.0),
        "variation_ratio": variation_ratio(probs),
        "std": predicted_class_std(probs),
    }
    return mean, measures
