"""Monte Carlo Dropout inference and evaluation for PaddleClas models.

The core works on any ``paddle.nn.Layer``:

    >>> from paddleclas_mc import MCSampler, summarize_samples
    >>> sampler = MCSampler(model, samples=30, seed=0)
    >>> probs = sampler.sample(images)          # [T, batch_size, num_classes]
    >>> mean, measures = summarize_samples(probs)

``tools/infer.py -c config.yaml`` runs the same from a PaddleClas config.
"""

from .dropout import NoStochasticLayerError, find_stochastic_layers, mc_dropout
from .sampling import MCSampler, single_pass
from .uncertainty import (MEASURES, expected_entropy, mutual_information, predicted_class_std,
                          predictive_entropy, summarize_samples, variation_ratio)

__version__ = "0.1.0"

__all__ = [
    "MCSampler",
    "MEASURES",
    "NoStochasticLayerError",
    "expected_entropy",
    "find_stochastic_layers",
    "mc_dropout",
    "mutual_information",
    "predicted_class_std",
    "predictive_entropy",
    "single_pass",
    "summarize_samples",
    "variation_ratio",
]
