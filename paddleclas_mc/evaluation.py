"""Single-pass and MC Dropout evaluation from one run, the work behind ``tools/eval.py``.

Every batch of ``DataLoader.Eval`` goes through the single pass and, when
``MCDropout.enable`` is true, through T stochastic passes. Each run updates
its own metric instances, so the report shows what MC Dropout changes on the
same images. An image that cannot be read is counted and listed in
``metrics.json``, and scored by neither run.
"""

import dataclasses
import os
import time

import numpy as np
from prettytable import PrettyTable
from tqdm import tqdm

from . import distributed, integration
from .config import parse_mc_section, path_value
from .dataset import build_loader
from .engine import (amp_level, batch_seed, build_inference_model, describe_strategy,
                     printable, probe_num_classes, set_device)
from .labelled_dataset import build_eval_loader
from .memory import configure_heap, release_free_memory
from .metrics import (Brier, CalibrationError, MisclassificationDetection, NLL,
                      SelectivePrediction, TopkAcc, build_metrics)
from .output import write_json_atomic
from .plots import plot_reliability_diagram, plot_risk_coverage, plot_uncertainty_histograms
from .sampling import MCSampler, single_pass
from .uncertainty import entropy, summarize_samples

__all__ = ["build_run_metrics", "check_labels", "run_eval"]

SINGLE_PASS = "single_pass"
MC_DROPOUT = "mc_dropout"

# Metrics added to every report when Metric.Eval does not list them.
_DEFAULT_METRICS = (TopkAcc, NLL, Brier, CalibrationError, MisclassificationDetection,
                    SelectivePrediction)


def build_run_metrics(config):
    """Build one run's metrics: ``Metric.Eval`` plus the defaults it leaves out.

    Returns:
        A list of ``Metric``. Listing a metric in ``Metric.Eval`` sets its
        arguments, e.g. ``- CalibrationError: {n_bins: 10}``.
    """
    listed = ((config.get("Metric") or {}).get("Eval")) or []
    try:
        metrics = build_metrics(listed)
    except ValueError as error:
        raise ValueError(f"Metric.Eval: {error}") from None
    present = {type(metric) for metric in metrics}
    metrics += [metric_type() for metric_type in _DEFAULT_METRICS if metric_type not in present]
    return metrics


def single_pass_uncertainty(probs):
    """Uncertainty of one deterministic pass: entropy and least confidence, each ``[batch_size]``."""
    return {"predictive_entropy": entropy(probs), "least_confidence": 1.0 - probs.max(axis=1)}


@dataclasses.dataclass
class _Run:
    name: str
    metrics: list
    scored: int = 0


def _update(run, probs, labels, uncertainty):
    for metric in run.metrics:
        metric.update(probs, labels, uncertainty)
    run.scored += len(labels)


def _label_source(config):
    """Return the config key that the class ids of ``DataLoader.Eval`` come from."""
    dataset = ((config.get("DataLoader") or {}).get("Eval") or {}).get("dataset") or {}
    if dataset.get("name") == "ImageNetDataset":
        return "DataLoader.Eval.dataset.cls_label_path"
    if dataset.get("class_id_map_file"):
        return "DataLoader.Eval.dataset.class_id_map_file"
    return "DataLoader.Eval.dataset.image_root (one sub-folder per class)"


def check_labels(paths, labels, num_classes, source):
    """Raise when a class id is outside ``[0, num_classes)``, naming the first such image.

    Raises:
        ValueError: naming ``source``, the image and its class id.
    """
    for path, label in zip(paths, labels):
        if not 0 <= int(label) < num_classes:
            raise ValueError(
                f"{source}: {path} has class id {int(label)}, but the model has "
                f"{num_classes} classes (ids 0 to {num_classes - 1}). Check that the "
                "labels and Global.pretrained_model belong to the same dataset.")


def _find(run, metric_type):
    return next(metric for metric in run.metrics if isinstance(metric, metric_type))


def _results(run):
    results = {}
    for metric in run.metrics:
        results.update(metric.compute())
    return results


def _format(value):
    if isinstance(value, (int, np.integer)):
        return str(value)
    return "nan" if np.isnan(value) else f"{value:.4f}"


def format_table(results_by_run, n_bins):
    """Return the printed comparison table: one row per metric, one column per run."""
    table = PrettyTable()
    names = list(results_by_run)
    table.field_names = ["metric"] + names
    keys = []
    for results in results_by_run.values():
        keys += [key for key in results if key not in keys and key != "n_bins"]
    for key in keys:
        label = f"{key} ({n_bins} bins)" if key in ("ece", "mce") else key
        table.add_row([label] + [_format(results_by_run[name][key])
                                 if key in results_by_run[name] else "-" for name in names])
    table.align = "r"
    table.align["metric"] = "l"
    return table.get_string()


def _write_plots(runs, output_dir, mc_label):
    labels = {SINGLE_PASS: "single pass", MC_DROPOUT: mc_label}
    calibration = {labels[run.name]: _find(run, CalibrationError) for run in runs}
    curves = {labels[run.name]: _find(run, SelectivePrediction).curve() for run in runs}
    paths = [
        plot_reliability_diagram(calibration, os.path.join(output_dir, "reliability_diagram.png")),
        plot_risk_coverage(curves, os.path.join(output_dir, "risk_coverage.png")),
    ]

    detection = _find(runs[-1], MisclassificationDetection).state()
    values = {key.split("/", 1)[1]: value for key, value in detection.items()
              if key.startswith("uncertainty/")}
    paths.append(plot_uncertainty_histograms(
        values, detection["correct"], os.path.join(output_dir, "uncertainty_histograms.png")))
    return paths


def _my_batches(loader, dataset, ranks):
    """Return this rank's loader and the global index of each of its batches.

    With several processes, batches are cut from the full image list as with
    one process, and rank r evaluates batches ``r, r + W, r + 2W, ...``.
    """
    if ranks.world_size == 1:
        return loader, list(range(len(loader)))
    batch_size = loader.batch_size
    batches = [list(range(start, min(start + batch_size, len(dataset))))
               for start in range(0, len(dataset), batch_size)]
    mine = distributed.assign_batches(list(enumerate(batches)), ranks.rank, ranks.world_size)
    my_loader = build_loader(dataset, batch_size, loader.num_workers,
                             batches=[indices for _, indices in mine])
    return my_loader, [batch_index for batch_index, _ in mine]


def _merge_runs(config, reports):
    """Merge the metric states of every rank into fresh runs, in rank order.

    Every metric state merges exactly (``paddleclas_mc.metrics``), so the
    merged metrics equal those of one process over the same images.
    """
    names = list(reports[0]["states"])
    runs = [_Run(name, build_run_metrics(config)) for name in names]
    for report in reports:
        for run in runs:
            for metric, state in zip(run.metrics, report["states"][run.name]):
                metric.merge_state(state)
            run.scored += report["scored"][run.name]
    return runs


def _write_report(config, config_path, runs, failed, rank_reports, setup, started):
    """Compute the metrics, write ``metrics.json`` and the plots, and log the table.

    Args:
        failed: ``(dataset index, file name, message)`` of each image not scored.
        rank_reports: a dict per rank, in rank order, with its ``device``
            and the number of ``batches`` it evaluated.
        setup: a dict with ``images``, ``mc`` (the ``MCDropoutConfig``),
            ``strategy`` and ``output_dir``.

    Raises:
        ValueError: when no image could be read.
    """
    logger = integration.get_logger()
    mc = setup["mc"]
    failed = [{"file_name": name, "error": message} for _, name, message in sorted(failed)]
    evaluated = setup["images"] - len(failed)
    if evaluated == 0:
        raise ValueError("DataLoader.Eval: no image could be read, so there is nothing to "
                         f"evaluate; the first error: {failed[0]['error'] if failed else '-'}")

    results = {run.name: _results(run) for run in runs}
    n_bins = _find(runs[0], CalibrationError).n_bins
    report = {
        "config": config_path,
        "model": (config.get("Arch") or {}).get("name"),
        "checkpoint": (config.get("Global") or {}).get("pretrained_model"),
        "images": setup["images"],
        "evaluated": evaluated,
        "failed": len(failed),
        "scored": {run.name: run.scored for run in runs},
        "samples": mc.samples if mc.enable else None,
        "seed": mc.seed if mc.enable else None,
        "strategy": setup["strategy"],
        "device": rank_reports[0]["device"],
        "world_size": len(rank_reports),
        "devices": [report["device"] for report in rank_reports],
        "batches_per_rank": [report["batches"] for report in rank_reports],
        "n_bins": n_bins,
        **results,
        "wall_time_s": round(time.time() - started, 3),
        "failed_files": failed,
    }

    output_dir = setup["output_dir"]
    os.makedirs(output_dir, exist_ok=True)
    metrics_path = os.path.join(output_dir, "metrics.json")
    write_json_atomic(metrics_path, report)
    plots = _write_plots(runs, output_dir, f"MC Dropout (T={mc.samples})")
    logger.info("Evaluation of %d images (%d not readable):\n%s", evaluated, len(failed),
                format_table(results, n_bins))
    logger.info(f"Wrote {metrics_path} and {', '.join(plots)}")
    return report


def run_eval(config, config_path=None):
    """Evaluate the single pass and, if enabled, MC Dropout on ``DataLoader.Eval``.

    Writes ``metrics.json``, ``reliability_diagram.png``, ``risk_coverage.png``
    and ``uncertainty_histograms.png`` under ``Global.output_dir`` and logs
    the comparison table.

    Under ``python -m paddle.distributed.launch`` with several processes,
    rank r evaluates batches ``r, r + W, r + 2W, ...`` (W processes), each
    with the seed of its global batch index. Rank 0 merges the metric states
    of every rank, computes the metrics once from the merged states and
    writes the files.

    Args:
        config: a PaddleClas config (dict), with ``-o`` overrides applied.
        config_path: the config file, recorded in ``metrics.json``.

    Returns:
        The dict written to ``metrics.json``, on every rank.

    On glibc this fixes the process's mmap threshold, as ``run_infer`` does.
    """
    logger = integration.get_logger()
    started = time.time()
    ranks = distributed.current_ranks()
    configure_heap()

    mc = parse_mc_section(config)
    device = set_device(config, ranks)
    amp = amp_level(config)
    runs = [_Run(SINGLE_PASS, build_run_metrics(config))]
    if mc.enable:
        runs.append(_Run(MC_DROPOUT, build_run_metrics(config)))
    output_dir = path_value((config.get("Global") or {}).get("output_dir"),
                            "Global.output_dir") or "./output/"
    model = build_inference_model(config)

    sampler = None
    strategy = None
    if mc.enable:
        sampler = MCSampler(model, mc.samples, mc.strategy, mc.max_batch,
                            mc.drop_path, mc.functional_dropout, amp)
    loader, dataset = build_eval_loader(config)
    label_source = _label_source(config)
    num_classes = probe_num_classes(model, dataset, amp)
    if num_classes is not None:
        check_labels(dataset.paths, dataset.labels, num_classes, label_source)
    if sampler is not None:
        strategy, reason = describe_strategy(sampler, dataset, loader.batch_size)
        logger.info(f"MC Dropout: T={mc.samples}, strategy={strategy} ({reason}), "
                    f"seed={mc.seed}, device={device}")
    processes = f" on {ranks.world_size} processes" if ranks.world_size > 1 else ""
    logger.info(f"Evaluating {len(dataset)} images in batches of {loader.batch_size}{processes}: "
                "single pass" + (f" and MC Dropout (T={mc.samples})" if mc.enable else ""))
    if ranks.world_size > 1:
        distributed.check_same_images(ranks, [f"{path} {label}" for path, label in
                                  zip(dataset.paths, dataset.labels)],
                          "DataLoader.Eval.dataset")

    my_loader, batch_indices = _my_batches(loader, dataset, ranks)

    def evaluate_my_batches():
        failed = []
        desc = f"eval, {ranks.label}" if ranks.world_size > 1 else "eval"
        progress = tqdm(my_loader, total=len(my_loader), desc=desc, unit="batch", disable=None)
        checked = num_classes is not None
        for batch_index, batch in zip(batch_indices, progress):
            release_free_memory()
            for index, message in batch["errors"]:
                failed.append((int(index), dataset.paths[int(index)], message))
                if ranks.world_size == 1:
                    logger.warning(f"Not scored {printable(message)}")
            if not len(batch["indices"]):
                continue

            images = batch["images"]
            labels = batch["labels"].numpy()
            probs = single_pass(model, images, amp).astype(np.float64)
            if not checked:
                # The test forward pass failed, so the class ids are checked here.
                check_labels(dataset.paths, dataset.labels, probs.shape[1], label_source)
                checked = True
            _update(runs[0], probs, labels, single_pass_uncertainty(probs))
            if sampler is not None:
                mean, measures = summarize_samples(
                    sampler.sample(images, seed=batch_seed(mc.seed, batch_index)))
                measures.update(least_confidence=1.0 - mean.max(axis=1))
                _update(runs[1], mean, labels, measures)
        return failed

    failed = ranks.run_on_all(evaluate_my_batches, "evaluate batches")

    setup = {"images": len(dataset), "mc": mc, "strategy": strategy, "output_dir": output_dir}
    if ranks.world_size == 1:
        return _write_report(config, config_path, runs, failed,
                             [{"device": device, "batches": len(batch_indices)}], setup, started)

    reports = ranks.gather({"states": {run.name: [metric.state() for metric in run.metrics]
                                       for run in runs},
                            "scored": {run.name: run.scored for run in runs},
                            "failed": failed, "device": device,
                            "batches": len(batch_indices)}, "metric states")

    def merge_and_write():
        all_failed = [entry for report in reports for entry in report["failed"]]
        for _, _, message in sorted(all_failed):
            logger.warning(f"Not scored {printable(message)}")
        return _write_report(config, config_path, _merge_runs(config, reports), all_failed,
                             reports, setup, started)

    report = ranks.run_on_main(merge_and_write if ranks.is_main else None, "merge metrics")
    ranks.finish()
    return report
