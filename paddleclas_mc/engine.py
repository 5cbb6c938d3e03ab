"""MC Dropout inference from a PaddleClas config, the work behind ``tools/infer.py``.

Everything that can be checked without reading an image (the ``MCDropout``
and ``Infer`` sections, the device, the checkpoint, the label file, the
preprocessing ops and whether the model has anything to sample) is checked
before the first image is read.
"""

import dataclasses
import time

import numpy as np
import paddle
from tqdm import tqdm

from . import integration
from .config import parse_infer_section, parse_mc_section
from .dataset import ImageFolderDataset, build_loader, list_images
from .output import PredictionWriter, build_records, error_record, load_class_id_map, write_json_atomic
from .sampling import MCSampler, resolve_strategy, single_pass
from .uncertainty import summarize_samples

__all__ = ["batch_seed", "build_inference_model", "run_infer", "set_device"]


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


def build_inference_model(config):
    """Build ``Arch``, load ``Global.pretrained_model`` and set the model to eval.

    Raises:
        ValueError: when ``Arch`` names no PaddleClas model or the checkpoint
            does not fit it.
        FileNotFoundError: when the checkpoint does not exist.
    """
    logger = integration.get_logger()
    arch = config.get("Arch") or {}
    if not arch.get("name"):
        raise ValueError("Arch.name: missing; set it to a PaddleClas model name, "
                         "e.g. PPLCNet_x1_0.")
    try:
        model = integration.build_model(config)
    except (AttributeError, TypeError) as error:
        raise ValueError(f"Arch: cannot build {arch.get('name')!r}: {error}. Check "
                         "Arch.name and its arguments against PaddleClas's model zoo.") from None

    checkpoint = (config.get("Global") or {}).get("pretrained_model")
    if checkpoint:
        loaded = integration.load_pretrained(model, checkpoint)
        logger.info(f"Loaded checkpoint {loaded}")
    else:
        logger.warning("Global.pretrained_model is not set: the model has random weights.")
    model.eval()
    return model


def batch_seed(seed, batch_index):
    """Derive the seed of one batch from the run's seed, or None for no seed.

    Each batch gets its own seed, so a run's output does not depend on how
    many batches came before in the same process.
    """
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


@dataclasses.dataclass
class _RunState:
    predicted: int = 0
    failed: list = dataclasses.field(default_factory=list)


def _predict_batch(batch, batch_index, paths, sampler, model, infer, class_id_map, mc, amp):
    indices = batch["indices"].numpy().tolist() if len(batch["indices"]) else []
    records = {}

    if indices:
        images = batch["images"]
        if not isinstance(images, paddle.Tensor):
            images = paddle.to_tensor(images)
        if sampler is not None:
            probs = sampler.sample(images, seed=batch_seed(mc.seed, batch_index))
            mean, measures = summarize_samples(probs)
        else:
            mean, measures = single_pass(model, images, amp), None
        names = [paths[i] for i in indices]
        for index, record in zip(indices, build_records(mean, names, infer.topk,
                                                        class_id_map, measures)):
            records[index] = record

    for index, message in batch["errors"]:
        records[int(index)] = error_record(paths[int(index)], message)
    return [records[index] for index in sorted(records)]


def run_infer(config, config_path=None):
    """Run single-pass or MC Dropout inference as the config describes.

    With ``Infer.save_dir`` set, records stream to
    ``<save_dir>/predictions.jsonl`` and a ``summary.json`` is written at the
    end; otherwise each batch's records are logged, as PaddleClas does.

    Args:
        config: a PaddleClas config (dict), with ``-o`` overrides applied.
        config_path: the config file, recorded in the summary.

    Returns:
        The summary dict.
    """
    logger = integration.get_logger()
    started = time.time()

    mc = parse_mc_section(config)
    infer = parse_infer_section(config)
    device = set_device(config)
    amp = amp_level(config)
    model = build_inference_model(config)
    num_classes = (config.get("Arch") or {}).get("class_num")
    class_id_map = None
    if infer.class_id_map_file:
        class_id_map = load_class_id_map(infer.class_id_map_file, infer.delimiter,
                                         num_classes if isinstance(num_classes, int) else None)

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

    image_list = list_images(infer.infer_imgs, infer.infer_list)
    paths = image_list.paths
    dataset = ImageFolderDataset(paths, list(infer.transforms))
    loader = build_loader(dataset, infer.batch_size, infer.num_workers)
    logger.info(f"Inferring {len(paths)} images from {infer.infer_imgs} in batches of "
                f"{infer.batch_size}" + (f"; {len(image_list.ignored)} non-image files "
                                         "ignored" if image_list.ignored else ""))

    writer = PredictionWriter(infer.save_dir) if infer.save_dir else None
    state = _RunState()
    try:
        progress = tqdm(loader, total=len(loader), desc="infer", unit="batch", disable=None)
        for batch_index, batch in enumerate(progress):
            records = _predict_batch(batch, batch_index, paths, sampler, model, infer,
                                     class_id_map, mc, amp)
            for record in records:
                if "error" in record:
                    state.failed.append(record)
                    logger.warning(f"Skipped {record['file_name']}: {record['error']}")
                else:
                    state.predicted += 1
            if writer is not None:
                writer.write(records)
            else:
                logger.info(records)
    finally:
        if writer is not None:
            writer.close()

    summary = {
        "mode": "mc_dropout" if mc.enable else "single_pass",
        "config": config_path,
        "model": (config.get("Arch") or {}).get("name"),
        "checkpoint": (config.get("Global") or {}).get("pretrained_model"),
        "infer_imgs": infer.infer_imgs,
        "images": len(paths),
        "predicted": state.predicted,
        "failed": len(state.failed),
        "ignored_files": len(image_list.ignored),
        "samples": mc.samples if mc.enable else 1,
        "seed": mc.seed if mc.enable else None,
        "strategy": strategy,
        "stochastic_layers": [item.name for item in sampler.stochastic_layers] if sampler else [],
        "device": device,
        "wall_time_s": round(time.time() - started, 3),
        "failed_files": state.failed,
    }
    if infer.save_dir:
        write_json_atomic(f"{infer.save_dir}/summary.json", summary)
        logger.info(f"Wrote {writer.path} and {infer.save_dir}/summary.json")
    logger.info(f"Infer finished: {summary['images']} images, {summary['predicted']} "
                f"predicted, {summary['failed']} failed, T={summary['samples']}, "
                f"strategy={strategy}, {summary['wall_time_s']} s")
    return summary
