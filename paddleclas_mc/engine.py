"""MC Dropout inference from a PaddleClas config, the work behind ``tools/infer.py``.

Everything that can be checked without reading an image is checked before
the first image is read. That covers the ``MCDropout`` and ``Infer``
sections, the device, the checkpoint, the preprocessing ops and the label
file against the model's output width. It also covers whether the model has
anything to sample and whether ``Infer.resume`` can continue the earlier run.
"""

import dataclasses
import os
import shutil
import time

import numpy as np
import paddle
from tqdm import tqdm

from . import distributed, integration
from .config import parse_infer_section, parse_mc_section, path_value
from .dataset import ImageFolderDataset, build_loader, list_images
from .memory import configure_heap, release_free_memory
from .output import (build_records, check_class_id_map, encode_json_line, error_record,
                     load_class_id_map, write_bytes_atomic, write_json_atomic)
from .resume import (SUMMARY_FILE, ResumeState, absorb_stale_shards, build_run_record,
                     check_unfinished_run,
                     merge_record_lines, open_output, pending_batches, run_settings, shard_dir)
from .sampling import MCSampler, resolve_strategy, single_pass
from .uncertainty import summarize_samples

__all__ = ["batch_seed", "build_inference_model", "checkpoint_file", "describe_strategy",
           "probe_num_classes",
           "run_infer", "set_device"]


def set_device(config, ranks=None):
    """Select ``Global.device`` (PaddleClas's key) and return Paddle's device string.

    With several processes, ``gpu`` selects the GPU that
    ``paddle.distributed.launch`` gave this process (``FLAGS_selected_gpus``).

    Args:
        config: a PaddleClas config.
        ranks: this process's ``distributed.Ranks``, or None for one process.

    Raises:
        ValueError: when the device is not available in this Paddle build, or
            names a device id (``gpu:1``) although several processes run.
    """
    device = (config.get("Global") or {}).get("device", "cpu")
    # NOTE: several GPU processes have not been run; only CPU processes are tested.
    if ranks is not None and ranks.world_size > 1 and ":" in str(device):
        raise ValueError(
            f"Global.device: {device!r} puts all {ranks.world_size} processes on one device. "
            f"Set -o Global.device={str(device).split(':')[0]}, and each process uses the "
            "device that python -m paddle.distributed.launch selected for it (--gpus).")
    try:
        paddle.set_device(device)
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            f"Global.device: {device!r} is not available ({error}). Set -o "
            "Global.device=cpu, or install the Paddle build for that device "
            "(pip install 'paddleclas-mc[gpu]' for CUDA).") from None
    return paddle.get_device()


def amp_level(config):
    """Return the AMP level for inference, following PaddleClas's ``AMP`` section.

    PaddleClas runs eval and infer under AMP only when both ``AMP.use_amp``
    and ``AMP.use_fp16_test`` are true.
    """
    amp = config.get("AMP") or {}
    if amp.get("use_amp") and amp.get("use_fp16_test"):
        return amp.get("level", "O1")
    return None


def checkpoint_file(config):
    """Return the ``.pdparams`` file that ``Global.pretrained_model`` names, or None when unset."""
    checkpoint = path_value((config.get("Global") or {}).get("pretrained_model"),
                            "Global.pretrained_model")
    if checkpoint is None:
        return None
    return checkpoint if checkpoint.endswith(".pdparams") else checkpoint + ".pdparams"


def _check_no_unexpected_parameters(model, file_path):
    """Raise when the checkpoint contains parameters the model does not have.

    ``integration.load_pretrained`` rejects missing and wrongly shaped
    parameters, but a checkpoint of a larger model whose shared layers match
    would still load, and its extra layers would be dropped without a word.
    """
    # NOTE: this loads the checkpoint a second time. The check belongs in
    # integration.load_pretrained, which has the loaded state at hand.
    unexpected = sorted(set(paddle.load(file_path)) - set(model.state_dict()))
    if unexpected:
        raise ValueError(
            f"Global.pretrained_model: checkpoint {file_path!r} does not fit Arch "
            f"({len(unexpected)} parameters the model lacks, e.g. {unexpected[:3]}). Check "
            "Arch.name and its arguments against the config the checkpoint was trained with.")


def build_inference_model(config):
    """Build ``Arch``, load ``Global.pretrained_model`` and set the model to eval.

    Raises:
        ValueError: when ``Arch`` names no PaddleClas model or the checkpoint
            does not fit it (missing, extra or wrongly shaped parameters).
        FileNotFoundError: when the checkpoint does not exist.
    """
    logger = integration.get_logger()
    arch = config.get("Arch") or {}
    if not isinstance(arch, dict) or not arch.get("name"):
        raise ValueError("Arch.name: missing; set it to a PaddleClas model name, "
                         "e.g. PPLCNet_x1_0.")
    try:
        # A fresh name scope, because some PaddleClas models (MobileNetV2)
        # give their parameters fixed names, which Paddle accepts only once
        # per scope, so a second build in the same process would fail.
        with paddle.utils.unique_name.guard():
            model = integration.build_model(config)
    except (AttributeError, TypeError, KeyError) as error:
        raise ValueError(f"Arch: cannot build {arch.get('name')!r}: {error}. Check "
                         "Arch.name and its arguments against PaddleClas's model zoo.") from None

    file_path = checkpoint_file(config)
    if file_path:
        loaded = integration.load_pretrained(model, file_path[:-len(".pdparams")])
        _check_no_unexpected_parameters(model, loaded)
        logger.info(f"Loaded checkpoint {loaded}")
    else:
        logger.warning("Global.pretrained_model is not set: the model has random weights.")
    model.eval()
    return model


def probe_num_classes(model, dataset, amp):
    """Return the number of classes, from one forward pass on a black test image.

    The 224 x 224 image goes through the dataset's preprocessing ops, so this
    also shows that ``Arch`` accepts what ``Infer.transforms`` produces,
    before any image is read.

    Returns:
        The width of the model's output, or None when the test image fails
        in a way real images might not (an op that needs a larger image, or a
        model that needs another input size). A warning is logged then, and
        the label map is checked on the first batch instead.

    Raises:
        ValueError: when the ops fail on a 1024 x 1024 image as well, so
            every image would fail, naming the op.
    """
    logger = integration.get_logger()
    try:
        image = dataset.probe(224, 224)
    except ValueError as error:
        try:
            dataset.probe(1024, 1024)
        except ValueError:
            raise ValueError(f"{error} The ops fail on 224x224 and 1024x1024 images alike, "
                             f"so every image would fail. Check the op's parameters in "
                             f"{dataset.config_key}.") from None
        logger.warning(f"{error}. The number of classes is checked on the first batch instead.")
        return None

    try:
        probs = single_pass(model, paddle.to_tensor(image[np.newaxis]), amp)
    except Exception as error:  # noqa: BLE001 - the model is any user network
        reason = " ".join(str(error).split())[:300]
        logger.warning(f"A test forward pass of Arch on the {dataset.config_key} output of a "
                       f"224x224 image (shape {list(image.shape)}) failed "
                       f"({type(error).__name__}: {reason}). The number of classes is "
                       "checked on the first batch instead.")
        return None
    return int(probs.shape[1])


def batch_seed(seed, batch_index):
    """Derive the seed of one batch from the run's seed, or None for no seed.

    Each batch gets its own seed, so a run's output does not depend on how
    many batches came before in the same process.
    """
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def printable(name):
    """Return ``name`` safe to log: bytes that are not UTF-8 become ``\\x..`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclasses.dataclass
class _Inference:
    """State shared by the batches of one run."""

    mc: object
    infer: object
    amp: object
    model: object
    sampler: object
    paths: list
    class_id_map: object
    num_classes: object


def _predict_batch(batch, batch_index, run):
    indices = batch["indices"].numpy().tolist() if len(batch["indices"]) else []
    records = {}

    if indices:
        images = batch["images"]
        if not isinstance(images, paddle.Tensor):
            images = paddle.to_tensor(images)
        if run.sampler is not None:
            probs = run.sampler.sample(images, seed=batch_seed(run.mc.seed, batch_index))
            mean, measures = summarize_samples(probs)
        else:
            mean, measures = single_pass(run.model, images, run.amp), None

        if run.num_classes is None:
            # The test forward pass failed, so the label map is checked here,
            # before the first record is written.
            run.num_classes = int(mean.shape[1])
            if run.class_id_map is not None:
                check_class_id_map(run.class_id_map, run.num_classes,
                                   run.infer.class_id_map_file)

        names = [run.paths[i] for i in indices]
        for index, record in zip(indices, build_records(mean, names, run.infer.topk,
                                                        run.class_id_map, measures)):
            records[index] = record

    for index, message in batch["errors"]:
        records[int(index)] = error_record(run.paths[int(index)], message)
    return [records[index] for index in sorted(records)]


def describe_strategy(sampler, dataset, batch_size):
    """Pick the sampling strategy of a run before any image is read, with the reason.

    ``auto`` and ``prefix`` need an input to probe the prefix split on; a black
    test image preprocessed by the dataset's ops has the shape real images get.

    Returns:
        A tuple ``(strategy, reason)``.

    Raises:
        ValueError: when ``MCDropout.strategy`` is ``prefix`` and the model
            does not allow it, with the reason.
    """
    try:
        image = dataset.probe(224, 224)
    except ValueError:
        if sampler.strategy in ("loop", "tiled"):
            return resolve_strategy(sampler.strategy, batch_size, sampler.max_batch)
        return sampler.strategy, ("decided on the first batch, since the test image "
                                  "does not pass the preprocessing ops")
    return sampler.describe_strategy(batch_size, paddle.to_tensor(image[np.newaxis]))


def _prepare(config, ranks):
    """Check the config and build the model, sampler and dataset, reading no image.

    Returns:
        A tuple ``(run, dataset, device, strategy)``, with ``run.paths`` still empty.
    """
    logger = integration.get_logger()
    mc = parse_mc_section(config)
    infer = parse_infer_section(config)
    device = set_device(config, ranks)
    amp = amp_level(config)
    model = build_inference_model(config)
    dataset = ImageFolderDataset([], list(infer.transforms))
    num_classes = probe_num_classes(model, dataset, amp)

    class_id_map = None
    if infer.class_id_map_file:
        class_id_map = load_class_id_map(infer.class_id_map_file, infer.delimiter, num_classes)

    sampler = None
    strategy = "single_pass"
    if mc.enable:
        sampler = MCSampler(model, mc.samples, mc.strategy, mc.max_batch,
                            mc.drop_path, mc.functional_dropout, amp)
        strategy, reason = describe_strategy(sampler, dataset, infer.batch_size)
        layers = ", ".join(f"{item.name or type(item.layer).__name__} ({item.kind}, "
                           f"rate {item.rate})" for item in sampler.stochastic_layers)
        logger.info(f"MC Dropout: T={mc.samples}, strategy={strategy} ({reason}), "
                    f"max_batch={mc.max_batch}, seed={mc.seed}, device={device}")
        logger.info(f"MC Dropout samples {len(sampler.stochastic_layers)} stochastic "
                    f"layer(s): {layers}")
    else:
        logger.info(f"MCDropout is disabled: single-pass inference on {device}")

    run = _Inference(mc=mc, infer=infer, amp=amp, model=model, sampler=sampler, paths=[],
                     class_id_map=class_id_map, num_classes=num_classes)
    return run, dataset, device, strategy


def _log_listing(image_list, infer):
    logger = integration.get_logger()
    logger.info(f"Inferring {len(image_list.paths)} images from {printable(infer.infer_imgs)} "
                f"in batches of {infer.batch_size}")
    if image_list.ignored:
        examples = ", ".join(printable(os.path.basename(path)) for path in image_list.ignored[:5])
        logger.info(f"Ignored {len(image_list.ignored)} files without an image extension "
                    f"(e.g. {examples})")
    for folder in image_list.unreadable_dirs:
        logger.warning(f"Cannot list folder {printable(str(folder))}, so its images are "
                       "missing from the run. Check its permissions.")


def _log_skipped(record):
    integration.get_logger().warning(f"Skipped {printable(record['error'])}")


def _build_summary(config, config_path, run, image_list, strategy, devices, outcome, started):
    """Return the summary of a finished run.

    Args:
        devices: the device of each rank, in rank order.
        outcome: a dict with ``predicted``, ``failed`` (the error records),
            ``resumed_records``, ``fingerprint`` and ``batches_per_rank`` (the
            batches each rank inferred in this run).
    """
    position = {path: index for index, path in enumerate(run.paths)}
    failed = sorted(outcome["failed"], key=lambda record: position[record["file_name"]])
    return {
        "mode": "mc_dropout" if run.mc.enable else "single_pass",
        "config": config_path,
        "model": (config.get("Arch") or {}).get("name"),
        "checkpoint": (config.get("Global") or {}).get("pretrained_model"),
        "infer_imgs": run.infer.infer_imgs,
        "images": len(run.paths),
        "predicted": outcome["predicted"],
        "failed": len(failed),
        "ignored_files": len(image_list.ignored),
        "unreadable_dirs": [str(folder) for folder in image_list.unreadable_dirs],
        "samples": run.mc.samples if run.mc.enable else 1,
        "seed": run.mc.seed if run.mc.enable else None,
        "strategy": strategy,
        "stochastic_layers": ([item.name for item in run.sampler.stochastic_layers]
                              if run.sampler else []),
        "device": devices[0],
        "world_size": len(devices),
        "devices": list(devices),
        "batches_per_rank": outcome["batches_per_rank"],
        "resumed_records": outcome["resumed_records"],
        "finished": True,
        "fingerprint": outcome["fingerprint"],
        "wall_time_s": round(time.time() - started, 3),
        "failed_files": failed,
    }


def _finish(summary, save_dir, predictions_path):
    """Write ``summary.json`` when there is a ``save_dir``, and log the end of the run."""
    logger = integration.get_logger()
    if save_dir:
        summary_path = os.path.join(save_dir, SUMMARY_FILE)
        write_json_atomic(summary_path, summary)
        logger.info(f"Wrote {predictions_path} and {summary_path}")
    if summary["predicted"] == 0:
        logger.warning("No image could be predicted. The error records name the causes.")
    processes = f", {summary['world_size']} processes" if summary["world_size"] > 1 else ""
    logger.info(f"Infer finished: {summary['images']} images, {summary['predicted']} "
                f"predicted, {summary['failed']} failed, T={summary['samples']}, "
                f"strategy={summary['strategy']}{processes}, {summary['wall_time_s']} s")


def _run_record(config, config_path, run, device, world_size):
    settings = run_settings(config, run.mc, run.infer, device, run.amp, checkpoint_file(config),
                            run.class_id_map, run.paths)
    return build_run_record(settings, config_path, checkpoint_file(config),
                            run.infer.infer_imgs, world_size)


def run_infer(config, config_path=None):
    """Run single-pass or MC Dropout inference as the config describes.

    Every check that needs no image (config sections, device, checkpoint,
    label map against the model's output width, ``Infer.resume`` against the
    earlier run) runs before the first image is read.

    With ``Infer.save_dir`` set, records stream to
    ``<save_dir>/predictions.jsonl``, ``run.json`` stores the run's settings,
    and ``summary.json`` is written at the end; otherwise each batch's records
    are logged, as PaddleClas does. ``Infer.resume`` is described in
    ``paddleclas_mc.resume``.

    Under ``python -m paddle.distributed.launch`` with several processes,
    each process infers its share of the batches and rank 0 merges the
    records (see ``_infer_on_ranks``).

    Args:
        config: a PaddleClas config (dict), with ``-o`` overrides applied.
        config_path: the config file, recorded in the summary.

    Returns:
        The summary dict, on every rank. It counts every record in
        ``predictions.jsonl``, including those kept from an earlier run when
        resuming.

    On glibc this fixes the process's mmap threshold (see
    ``paddleclas_mc.memory``), so that peak memory does not grow with the
    image count.
    """
    logger = integration.get_logger()
    started = time.time()
    ranks = distributed.current_ranks()
    configure_heap()

    run, dataset, device, strategy = _prepare(config, ranks)
    infer = run.infer
    image_list = list_images(infer.infer_imgs, infer.infer_list)
    run.paths = dataset.paths = list(image_list.paths)
    _log_listing(image_list, infer)
    if infer.save_dir:
        check_unfinished_run(infer.save_dir, infer.resume)
    if ranks.world_size > 1:
        return _infer_on_ranks(config, config_path, run, dataset, image_list, device,
                               strategy, ranks, started)

    writer = None
    state = ResumeState()
    fingerprint = None
    if infer.save_dir:
        run_record = _run_record(config, config_path, run, device, 1)
        fingerprint = run_record["fingerprint"]
        writer, state = open_output(infer.save_dir, run_record, run.paths, infer.resume, logger)
        if state.finished_summary is not None:
            writer.close()
            logger.info(f"Infer.resume: the run in {infer.save_dir} already finished with "
                        f"the same settings ({len(state.done)} records), so nothing is done.")
            return state.finished_summary
        try:
            absorb_stale_shards(writer, state, infer.save_dir, 0, run_record, run.paths,
                                infer.resume, logger)
        except BaseException:
            writer.close()
            raise
        if state.done:
            logger.info(f"Infer.resume: {len(state.done)} of {len(run.paths)} images already "
                        f"have a record in {writer.path}. Inferring the other "
                        f"{len(run.paths) - len(state.done)}.")

    batches = pending_batches(run.paths, infer.batch_size, state.done)
    predicted = state.predicted
    failed = list(state.failed)
    try:
        if batches:
            loader = build_loader(dataset, infer.batch_size, infer.num_workers,
                                  batches=[indices for _, indices in batches])
            progress = tqdm(loader, total=len(loader), desc="infer", unit="batch", disable=None)
            for (batch_index, _), batch in zip(batches, progress):
                release_free_memory()
                records = [record for record in _predict_batch(batch, batch_index, run)
                           if record["file_name"] not in state.done]
                for record in records:
                    if "error" in record:
                        failed.append(record)
                        _log_skipped(record)
                    else:
                        predicted += 1
                if writer is not None:
                    writer.write(records)
                else:
                    logger.info(records)
    finally:
        if writer is not None:
            writer.close()

    outcome = {"predicted": predicted, "failed": failed, "resumed_records": len(state.done),
               "fingerprint": fingerprint, "batches_per_rank": [len(batches)]}
    summary = _build_summary(config, config_path, run, image_list, strategy, [device],
                             outcome, started)
    _finish(summary, infer.save_dir, writer.path if writer else None)
    return summary


# Several processes.


def _open_outputs_on_ranks(run, run_record, ranks):
    """Open rank 0's ``predictions.jsonl`` and this rank's shard.

    Returns:
        A tuple ``(merged, shard, done, finished)``: rank 0's writer of
        ``predictions.jsonl`` (None on the other ranks), this rank's shard
        writer, and the file names that already have a record in either.
        ``finished`` is the summary of an earlier finished run that rank 0
        found, or None. When it is set, both writers are None and nothing is
        left to do.
    """
    logger = integration.get_logger()
    infer = run.infer
    merged, error = None, None
    merged_state = ResumeState()
    if ranks.is_main:
        try:
            merged, merged_state = open_output(infer.save_dir, run_record, run.paths,
                                               infer.resume, logger)
            if merged_state.finished_summary is None:
                absorb_stale_shards(merged, merged_state, infer.save_dir, ranks.world_size,
                                    run_record, run.paths, infer.resume, logger)
        except Exception as caught:  # noqa: BLE001 - re-raised on every rank by check
            error = caught
            if merged is not None:
                merged.close()
    ranks.check(error, "open predictions.jsonl")

    finished = ranks.broadcast(merged_state.finished_summary, "finished run")
    if finished is not None:
        if merged is not None:
            merged.close()
        return None, None, set(), finished

    opened = []

    def open_shard():
        opened.extend(open_output(shard_dir(infer.save_dir, ranks.rank), run_record,
                                  run.paths, infer.resume, logger))

    try:
        ranks.run_on_all(open_shard, "open shard")
    except BaseException:
        for writer in [merged] + opened[:1]:
            if writer is not None:
                writer.close()
        raise
    shard, shard_state = opened
    return merged, shard, merged_state.done | shard_state.done, None


def _infer_my_batches(run, dataset, plan, shard, ranks):
    """Infer this rank's batches, appending the records to ``shard``.

    Returns:
        The records as ``predictions.jsonl`` bytes: the whole shard, records
        of an earlier run included, or without a shard the new records.
    """
    infer = run.infer
    kept = []
    if plan:
        loader = build_loader(dataset, infer.batch_size, infer.num_workers,
                              batches=[indices for _, indices, _ in plan])
        progress = tqdm(loader, total=len(loader), desc=f"infer, {ranks.label}",
                        unit="batch", disable=None)
        for (batch_index, _, skipped), batch in zip(plan, progress):
            release_free_memory()
            skipped_names = {run.paths[index] for index in skipped}
            records = [record for record in _predict_batch(batch, batch_index, run)
                       if record["file_name"] not in skipped_names]
            if shard is not None:
                shard.write(records)
            else:
                kept += records
    if shard is not None:
        return shard.read()
    return b"".join(encode_json_line(record) for record in kept)


def _plan_batches(run, ranks, done, device):
    """Deal the pending batches out to the ranks.

    Returns:
        A tuple ``(plan, done_indices, devices, plan_sizes)``. ``plan`` is
        this rank's list of ``(batch_index, indices, skipped)``, ``skipped``
        being the indices of images that already have a record.
        ``done_indices`` (the images with a record on any rank), ``devices``
        (each rank's device) and ``plan_sizes`` (each rank's number of
        batches) are set on rank 0 only.
    """
    position = {path: index for index, path in enumerate(run.paths)}
    reports = ranks.gather({"device": device, "done": sorted(position[name] for name in done)},
                           "done records")
    plans = done_indices = devices = plan_sizes = None
    if ranks.is_main:
        done_indices = set()
        for report in reports:
            done_indices.update(report["done"])
        devices = [report["device"] for report in reports]
        pending = pending_batches(run.paths, run.infer.batch_size,
                                  {run.paths[index] for index in done_indices})
        plans = [[(batch_index, indices, [index for index in indices if index in done_indices])
                  for batch_index, indices in distributed.assign_batches(pending, rank,
                                                                         ranks.world_size)]
                 for rank in range(ranks.world_size)]
        plan_sizes = [len(plan) for plan in plans]
    return ranks.scatter(plans, "batch plan"), done_indices, devices, plan_sizes


def _merge_on_main(run, blobs, merged, done_indices):
    """Merge every rank's records on rank 0, write or log them, and return the outcome counts."""
    logger = integration.get_logger()
    infer = run.infer
    sources = []
    if merged is not None:
        sources.append((merged.path, merged.read()))
        names = [shard_dir(infer.save_dir, rank) for rank in range(len(blobs))]
    else:
        names = [f"the records of rank {rank}" for rank in range(len(blobs))]
    sources += list(zip(names, blobs))
    lines = merge_record_lines(sources, run.paths)

    failed = [record for record, _ in lines if "error" in record]
    for index, (record, _) in enumerate(lines):
        if "error" in record and index not in done_indices:
            _log_skipped(record)
    if merged is not None:
        write_bytes_atomic(merged.path, b"".join(line + b"\n" for _, line in lines))
    else:
        for start in range(0, len(lines), infer.batch_size):
            batch = [record for index, (record, _) in
                     enumerate(lines[start:start + infer.batch_size], start=start)
                     if index not in done_indices]
            if batch:
                logger.info(batch)
    return {"predicted": len(lines) - len(failed), "failed": failed,
            "resumed_records": len(done_indices)}


def _infer_on_ranks(config, config_path, run, dataset, image_list, device, strategy, ranks,
                    started):
    """Run inference as one of several processes started by ``paddle.distributed.launch``.

    Batches are cut from the full image list as with one process, and rank r
    infers the pending batches ``r, r + W, r + 2W, ...`` (W processes), each
    with the seed of its global batch index. Every rank appends its records
    to its own shard (``<save_dir>/.rank<r>/predictions.jsonl``) or keeps
    them in memory without ``Infer.save_dir``. At the end the records travel
    to rank 0 through the launcher's store, and rank 0 writes
    ``predictions.jsonl`` in the order of a run with one process and
    ``summary.json``, or logs the records batch by batch.
    """
    logger = integration.get_logger()
    infer = run.infer
    distributed.check_same_images(ranks, run.paths, "Infer.infer_imgs")

    merged = shard = run_record = None
    done = set()
    if infer.save_dir:
        run_record = _run_record(config, config_path, run, device, ranks.world_size)
        merged, shard, done, finished = _open_outputs_on_ranks(run, run_record, ranks)
        if finished is not None:
            logger.info(f"Infer.resume: the run in {infer.save_dir} already finished with "
                        "the same settings, so nothing is done.")
            ranks.finish()
            return finished

    try:
        plan, done_indices, devices, plan_sizes = _plan_batches(run, ranks, done, device)
        if ranks.is_main and done_indices:
            logger.info(f"Infer.resume: {len(done_indices)} of {len(run.paths)} images already "
                        f"have a record. Inferring the other "
                        f"{len(run.paths) - len(done_indices)} on {ranks.world_size} processes.")

        data = ranks.run_on_all(lambda: _infer_my_batches(run, dataset, plan, shard, ranks),
                                "infer batches")
        if shard is not None:
            shard.close()
        blobs = ranks.gather(data, "records")

        def merge():
            try:
                outcome = _merge_on_main(run, blobs, merged, done_indices)
            finally:
                if merged is not None:
                    merged.close()
            outcome["fingerprint"] = run_record["fingerprint"] if run_record else None
            outcome["batches_per_rank"] = plan_sizes
            summary = _build_summary(config, config_path, run, image_list, strategy, devices,
                                     outcome, started)
            _finish(summary, infer.save_dir, merged.path if merged else None)
            return summary

        summary = ranks.run_on_main(merge if ranks.is_main else None, "merge records")
    finally:
        for writer in (merged, shard):
            if writer is not None:
                writer.close()

    if shard is not None:
        # predictions.jsonl and summary.json hold every record now.
        shutil.rmtree(os.path.dirname(shard.path))
    ranks.finish()
    return summary
