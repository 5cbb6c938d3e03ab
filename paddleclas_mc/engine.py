"""MC Dropout inference from a PaddleClas config, the work behind ``tools/infer.py``.

Everything that can be checked without reading an image is checked before
the first image is read. That covers the ``MCDropout`` and ``Infer``
sections, the device, the checkpoint, the preprocessing ops and the label
file against the model's output width. It also covers whether the model has
anything to sample and whether ``Infer.resume`` can continue the earlier run.
"""

import dataclasses
import os
import time

import numpy as np
import paddle
from tqdm import tqdm

from . import integration
from .config import parse_infer_section, parse_mc_section, path_value
from .dataset import ImageFolderDataset, build_loader, list_images
from .output import (build_records, check_class_id_map, error_record, load_class_id_map,
                     write_json_atomic)
from .resume import (SUMMARY_FILE, ResumeState, build_run_record, open_output,
                     pending_batches, run_settings)
from .sampling import MCSampler, resolve_strategy, single_pass
from .uncertainty import summarize_samples

__all__ = ["batch_seed", "build_inference_model", "checkpoint_file", "probe_num_classes",
           "run_infer", "set_device"]


def set_device(config):
    """Select ``Global.device`` (PaddleClas's key) and return Paddle's device string.

    Raises:
        ValueError: when the device is not available in this Paddle build.
    """
    device = (config.get("Global") or {}).get("device", "cpu")
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


def _prepare(config):
    """Check the config and build the model, sampler and dataset, reading no image.

    Returns:
        A tuple ``(run, dataset, device, strategy)``, with ``run.paths`` still empty.
    """
    logger = integration.get_logger()
    mc = parse_mc_section(config)
    infer = parse_infer_section(config)
    device = set_device(config)
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
        strategy, reason = resolve_strategy(mc.strategy, infer.batch_size, mc.max_batch)
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

    Args:
        config: a PaddleClas config (dict), with ``-o`` overrides applied.
        config_path: the config file, recorded in the summary.

    Returns:
        The summary dict. It counts every record in ``predictions.jsonl``,
        including those kept from an earlier run when resuming.
    """
    logger = integration.get_logger()
    started = time.time()

    run, dataset, device, strategy = _prepare(config)
    infer = run.infer
    image_list = list_images(infer.infer_imgs, infer.infer_list)
    run.paths = dataset.paths = list(image_list.paths)
    _log_listing(image_list, infer)

    writer = None
    state = ResumeState()
    fingerprint = None
    if infer.save_dir:
        settings = run_settings(config, run.mc, infer, device, run.amp, checkpoint_file(config),
                                run.class_id_map, run.paths)
        run_record = build_run_record(settings, config_path, checkpoint_file(config),
                                      infer.infer_imgs)
        fingerprint = run_record["fingerprint"]
        writer, state = open_output(infer.save_dir, run_record, run.paths, infer.resume, logger)
        if state.finished_summary is not None:
            writer.close()
            logger.info(f"Infer.resume: the run in {infer.save_dir} already finished with "
                        f"the same settings ({len(state.done)} records), so nothing is done.")
            return state.finished_summary
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
                records = [record for record in _predict_batch(batch, batch_index, run)
                           if record["file_name"] not in state.done]
                for record in records:
                    if "error" in record:
                        failed.append(record)
                        logger.warning(f"Skipped {printable(record['file_name'])}: "
                                       f"{printable(record['error'])}")
                    else:
                        predicted += 1
                if writer is not None:
                    writer.write(records)
                else:
                    logger.info(records)
    finally:
        if writer is not None:
            writer.close()

    position = {path: index for index, path in enumerate(run.paths)}
    failed.sort(key=lambda record: position[record["file_name"]])
    summary = {
        "mode": "mc_dropout" if run.mc.enable else "single_pass",
        "config": config_path,
        "model": (config.get("Arch") or {}).get("name"),
        "checkpoint": (config.get("Global") or {}).get("pretrained_model"),
        "infer_imgs": infer.infer_imgs,
        "images": len(run.paths),
        "predicted": predicted,
        "failed": len(failed),
        "ignored_files": len(image_list.ignored),
        "unreadable_dirs": [str(folder) for folder in image_list.unreadable_dirs],
        "samples": run.mc.samples if run.mc.enable else 1,
        "seed": run.mc.seed if run.mc.enable else None,
        "strategy": strategy,
        "stochastic_layers": ([item.name for item in run.sampler.stochastic_layers]
                              if run.sampler else []),
        "device": device,
        "resumed_records": len(state.done),
        "finished": True,
        "fingerprint": fingerprint,
        "wall_time_s": round(time.time() - started, 3),
        "failed_files": failed,
    }
    if infer.save_dir:
        summary_path = os.path.join(infer.save_dir, SUMMARY_FILE)
        write_json_atomic(summary_path, summary)
        logger.info(f"Wrote {writer.path} and {summary_path}")
    if summary["predicted"] == 0:
        logger.warning("No image could be predicted. The error records name the causes.")
    logger.info(f"Infer finished: {summary['images']} images, {summary['predicted']} "
                f"predicted, {summary['failed']} failed, T={summary['samples']}, "
                f"strategy={strategy}, {summary['wall_time_s']} s")
    return summary
