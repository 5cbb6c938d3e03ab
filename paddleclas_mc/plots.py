"""PNG plots of calibration, selective prediction and uncertainty.

The figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas
directly, without pyplot, so the plots work on machines without a display and
leave the user's pyplot backend and open figures unchanged.
"""

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import CalibrationError

__all__ = [
    "plot_reliability_diagram",
    "plot_risk_coverage",
    "plot_uncertainty_histograms",
]

_HISTOGRAM_BINS = 30

# Panels per row of the histogram figure; more measures wrap to a new row.
_HISTOGRAM_COLUMNS = 3


def _new_figure(width, height):
    """Return a Figure of ``width`` x ``height`` inches on its own Agg canvas."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure, path):
    """Write ``figure`` as a PNG to ``path``, creating its folder, and return the path."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


def _as_calibration_metric(value):
    """Return ``value`` as a CalibrationError, building it from a state dict if needed."""
    if isinstance(value, CalibrationError):
        return value
    return CalibrationError.from_state(value)


def plot_reliability_diagram(calibration_states_by_name, path):
    """Draw a reliability diagram per run, side by side, and save it as a PNG.

    Each panel shows the accuracy of every confidence bin as a bar, the gap to
    the bin's mean confidence as a hatched bar, and the diagonal of perfect
    calibration. The legend gives the expected calibration error.

    Args:
        calibration_states_by_name: Dict from run name (for example
            ``"single pass"`` and ``"MC Dropout"``) to a ``CalibrationError``
            or to the dict its ``state()`` returns.
        path: Output PNG file. Missing folders are created.

    Returns:
        str: ``path``.

    Raises:
        ValueError: When the dict is empty or a run has no samples.
    """
    if not calibration_states_by_name:
        raise ValueError("plot_reliability_diagram needs at least one calibration state.")

    panel_count = len(calibration_states_by_name)
    figure = _new_figure(4.2 * panel_count, 4.4)
    axes = figure.subplots(1, panel_count, sharey=True, squeeze=False)[0]

    for axis, (name, value) in zip(axes, calibration_states_by_name.items()):
        metric = _as_calibration_metric(value)
        results = metric.compute()
        statistics = metric.bin_statistics()

        edges = statistics["bin_edges"]
        width = np.diff(edges)
        filled = statistics["bin_counts"] > 0
        accuracy = np.where(filled, statistics["accuracy"], 0.0)
        confidence = np.where(filled, statistics["confidence"], 0.0)

        axis.bar(edges[:-1], accuracy, width=width, align="edge",
                 color="tab:blue", edgecolor="black", linewidth=0.5,
                 label=f"Accuracy, ECE = {results['ece']:.4f}")
        axis.bar(edges[:-1], confidence - accuracy, bottom=accuracy, width=width,
                 align="edge", color="tab:red", alpha=0.3, hatch="//",
                 edgecolor="tab:red", linewidth=0.5, label="Gap to mean confidence")
        axis.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray",
                  label="Perfect calibration")

        axis.set_xlim(0.0, 1.0)
        axis.set_ylim(0.0, 1.0)
        axis.set_title(f"{name} ({results['n_bins']} bins)")
        axis.set_xlabel("Confidence (top-1 probability)")
        axis.legend(loc="upper left", fontsize="small")

    axes[0].set_ylabel("Accuracy")
    figure.suptitle("Reliability diagram")
    return _save_figure(figure, path)


def plot_risk_coverage(curves_by_name, path):
    """Draw risk-coverage curves in one panel and save them as a PNG.

    Args:
        curves_by_name: Dict from run name to a ``(coverage, risk)`` pair of
            float arrays ``[num_points]``, as ``SelectivePrediction.curve()``
            returns. The legend shows the mean risk, which equals
            ``SelectivePrediction``'s AURC when the curve comes from ``curve()``.
        path: Output PNG file. Missing folders are created.

    Returns:
        str: ``path``.

    Raises:
        ValueError: When the dict is empty or a curve is malformed.
    """
    if not curves_by_name:
        raise ValueError("plot_risk_coverage needs at least one curve.")

    figure = _new_figure(5.5, 4.4)
    axis = figure.subplots()

    for name, (coverage, risk) in curves_by_name.items():
        coverage = np.asarray(coverage, dtype=np.float64)
        risk = np.asarray(risk, dtype=np.float64)
        if coverage.ndim != 1 or coverage.shape != risk.shape or coverage.size == 0:
            raise ValueError(
                f"curve {name!r} must be two non-empty 1-D arrays of equal length, "
                f"got shapes {coverage.shape} and {risk.shape}.")

        axis.plot(coverage, risk, linewidth=1.5,
                  label=f"{name} (AURC = {np.mean(risk):.4f})")

    axis.set_xlim(0.0, 1.0)
    axis.set_ylim(bottom=0.0)
    axis.set_xlabel("Coverage (fraction of samples accepted)")
    axis.set_ylabel("Risk (error rate on accepted samples)")
    axis.set_title("Risk-coverage curve")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", fontsize="small")
    return _save_figure(figure, path)


def plot_uncertainty_histograms(values_by_measure, correct_flags, path):
    """Draw histograms of each uncertainty measure for correct and wrong predictions.

    One panel per measure overlays the density-normalised histograms of the
    correctly and wrongly classified samples, so that the two shapes are
    comparable even when errors are rare.

    Args:
        values_by_measure: Dict from measure name to float ``[num_samples]``.
        correct_flags: Bool ``[num_samples]`` shared by every measure, or a
            dict from measure name to bool ``[num_samples]`` when the measures
            come from runs with different predictions (single pass and MC
            Dropout).
        path: Output PNG file. Missing folders are created.

    Returns:
        str: ``path``.

    Raises:
        ValueError: When the dict is empty or the shapes do not match.
    """
    if not values_by_measure:
        raise ValueError("plot_uncertainty_histograms needs at least one measure.")

    panel_count = len(values_by_measure)
    columns = min(panel_count, _HISTOGRAM_COLUMNS)
    rows = -(-panel_count // columns)
    figure = _new_figure(4.0 * columns, 3.4 * rows)
    grid = figure.subplots(rows, columns, squeeze=False)
    axes = grid.ravel()
    for unused in axes[panel_count:]:
        unused.set_visible(False)

    for axis, (name, values) in zip(axes, values_by_measure.items()):
        flags = correct_flags[name] if isinstance(correct_flags, dict) else correct_flags
        values = np.asarray(values, dtype=np.float64)
        flags = np.asarray(flags, dtype=bool)
        if values.ndim != 1 or values.shape != flags.shape:
            raise ValueError(
                f"measure {name!r} has shape {values.shape} but its correct flags "
                f"have shape {flags.shape}; both must be [num_samples].")

        # Shared edges make the two histograms comparable bar by bar.
        edges = np.histogram_bin_edges(values, bins=_HISTOGRAM_BINS)
        for subset, label, color in ((flags, "Correct", "tab:blue"),
                                     (~flags, "Wrong", "tab:red")):
            if np.any(subset):
                axis.hist(values[subset], bins=edges, density=True, alpha=0.5,
                          color=color, label=f"{label} (n = {np.count_nonzero(subset)})")

        axis.set_title(name)
        axis.set_xlabel("Uncertainty")
        axis.legend(fontsize="small")

    for row in grid:
        row[0].set_ylabel("Density")
    figure.suptitle("Uncertainty of correct and wrong predictions")
    return _save_figure(figure, path)
