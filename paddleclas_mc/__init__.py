"""Monte Carlo Dropout inference and evaluation for PaddleClas models.

The core works on any ``paddle.nn.Layer``:

    >>> from paddleclas_mc import MCSampler, summarize_samples
    >>> sampler = MCSampler(model, samples=30)
    >>> probs = sampler.sample(images, seed=0)      # [T, batch_size, num_classes]
    >>> mean, measures = summarize_samples(probs)   # mean: [batch_size, num_classes]
    >>> measures["mutual_information"].shape         # (batch_size,)

``tools/infer.py -c config.yaml`` and ``paddleclas-mc infer -c config.yaml``
run the same from a PaddleClas config. ``docs/api.md`` lists the API with
shapes and examples.

The names below are imported on first use, so ``import paddleclas_mc``
imports neither Paddle nor PaddleClas. That keeps the start-up hook
(``paddleclas_mc.integration.hook``) cheap in every Python process.
"""

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    # dropout.py: which layers MC sampling puts into training mode.
    "NoStochasticLayerError": "dropout",
    "StochasticLayer": "dropout",
    "find_stochastic_layers": "dropout",
    "mc_dropout": "dropout",
    # sampling.py: T stochastic forward passes.
    "MCSampler": "sampling",
    "single_pass": "sampling",
    # uncertainty.py: measures over [T, batch_size, num_classes].
    "MEASURES": "uncertainty",
    "entropy": "uncertainty",
    "expected_entropy": "uncertainty",
    "mutual_information": "uncertainty",
    "predicted_class_std": "uncertainty",
    "predictive_entropy": "uncertainty",
    "summarize_samples": "uncertainty",
    "variation_ratio": "uncertainty",
    # metrics.py: streaming metrics over [batch_size, num_classes].
    "Brier": "metrics",
    "CalibrationError": "metrics",
    "MisclassificationDetection": "metrics",
    "NLL": "metrics",
    "SelectivePrediction": "metrics",
    "TopkAcc": "metrics",
    "binary_auroc": "metrics",
    "build_metrics": "metrics",
    # functional.py: one call per metric, and the summary of one batch.
    "MCPrediction": "functional",
    "brier_score": "functional",
    "expected_calibration_error": "functional",
    "maximum_calibration_error": "functional",
    "mc_predict": "functional",
    "misclassification_detection": "functional",
    "negative_log_likelihood": "functional",
    "reliability_bins": "functional",
    "risk_coverage": "functional",
    "selective_risk": "functional",
    "top_k_accuracy": "functional",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    import importlib

    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
