"""Run exported inference models with Paddle Inference, the work behind ``tools/predict.py``.

``InferenceModel`` loads a model written by ``paddle.jit.save``
(``inference.json`` or ``inference.pdmodel``, plus ``inference.pdiparams``)
with ``paddle.inference.create_predictor``. Two kinds of model are read:

- an MC Dropout export from ``tools/export_model.py`` with ``MCDropout.enable``.
  Its ``inference_mc.json`` lists the outputs, and one predictor run returns
  the mean probabilities and every uncertainty measure;
- any other PaddleClas classification export, whose first output is read as
  probabilities, as PaddleClas's deploy ``Topk`` reads it.

``run_predict`` runs such a model over ``Infer.infer_imgs`` and writes the
records that ``tools/infer.py`` writes (``predictions.jsonl`` and
``summary.json``), so dygraph MC Dropout and the exported model can be
compared line by line.
"""

import dataclasses
import json
import os
import time

import numpy as np
import paddle
from tqdm import tqdm

from . import __version__, integration
from .config import parse_infer_section, parse_mc_section, path_value
from .dataset import ImageFolderDataset, build_loader, list_images
from .engine import batch_seed, printable
from .memory import configure_heap, release_free_memory
from .output import (PredictionWriter, build_records, check_class_id_map, error_record,
                     load_class_id_map, write_json_atomic)
from .sampling import seeded
from .uncertainty import MEASURES

__all__ = [
    "METADATA_FILE",
    "MODEL_PREFIX",
    "OUTPUT_NAMES",
    "InferenceModel",
    "load_metadata",
    "run_predict",
]

# paddle.jit.save's path prefix, the one PaddleClas's export and deploy predictor use.
MODEL_PREFIX = "inference"

# Written beside an MC Dropout export; its absence marks a plain PaddleClas export.
METADATA_FILE = "inference_mc.json"

# The outputs of an MC Dropout export, in predictor output order. PaddleClas's
# deploy predictor reads only the first one, so it gets the mean probabilities.
OUTPUT_NAMES = ("probs", "log_probs") + MEASURES

# Value of ``format`` in ``inference_mc.json``; readers reject other values.
METADATA_FORMAT = "paddleclas-mc/mc-dropout-export/1"


def load_metadata(model_dir):
    """Read ``inference_mc.json`` of an exported model.

    Returns:
        The metadata dict, or None when the folder has no such file (a plain
        PaddleClas export).

    Raises:
        ValueError: when the file is not JSON, has another ``format`` or
            lists other outputs than ``OUTPUT_NAMES``.
    """
    path = os.path.join(model_dir, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            metadata = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file ({error}). Export the model again "
                         "with tools/export_model.py.") from None
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
        raise ValueError(f"{path}: format is not {METADATA_FORMAT!r}; the file was written "
                         "by another version. Export the model again with this version.")
    names = [output.get("name") for output in metadata.get("outputs", [])]
    if names != list(OUTPUT_NAMES):
        raise ValueError(f"{path}: lists the outputs {names}, expected {list(OUTPUT_NAMES)}. "
                         "Export the model again with this version.")
    return metadata


def _model_files(model_dir):
    """Return the program and parameter files of ``model_dir``, or raise FileNotFoundError."""
    params = os.path.join(model_dir, MODEL_PREFIX + ".pdiparams")
    for program_name in (MODEL_PREFIX + ".json", MODEL_PREFIX + ".pdmodel"):
        program = os.path.join(model_dir, program_name)
        if os.path.isfile(program) and os.path.isfile(params):
            return program, params
    raise FileNotFoundError(
        f"Global.inference_model_dir: {model_dir!r} has no {MODEL_PREFIX}.json or "
        f"{MODEL_PREFIX}.pdmodel with {MODEL_PREFIX}.pdiparams. Set it to the "
        "Global.save_inference_dir of tools/export_model.py.")


class InferenceModel:
    """An exported model run by a ``paddle.inference`` predictor.

    Args:
        model_dir: the folder ``tools/export_model.py`` wrote.
        device: ``cpu`` or ``gpu`` (``gpu:N`` selects device N).
        cpu_threads: math library threads on CPU; None uses ``os.cpu_count()``.

    Attributes:
        metadata: ``inference_mc.json`` as a dict, or None for a plain export.
        program_file: the ``.json`` or ``.pdmodel`` file that was loaded.

    Raises:
        FileNotFoundError: when the model files are missing.
        ValueError: when ``inference_mc.json`` is invalid or the device is unknown.
    """

    def __init__(self, model_dir, device="cpu", cpu_threads=None):
        self.model_dir = model_dir
        self.program_file, _ = _model_files(model_dir)
        self.metadata = load_metadata(model_dir)

        config = paddle.inference.Config(model_dir, MODEL_PREFIX)
        device_type, _, device_id = str(device).partition(":")
        if device_type == "gpu":
            # 500 MB is the initial GPU memory pool; it grows as needed.
            # NOTE: this branch has not been run on a GPU.
            config.enable_use_gpu(500, int(device_id or 0))
        elif device_type == "cpu":
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(cpu_threads or os.cpu_count() or 1)
        else:
            raise ValueError(f"Global.device: {device!r} is not supported by "
                             "tools/predict.py; use cpu or gpu.")
        config.disable_glog_info()
        self.predictor = paddle.inference.create_predictor(config)
        self.input_name = self.predictor.get_input_names()[0]
        self.output_names = list(self.predictor.get_output_names())

        if self.metadata is not None and len(self.output_names) != len(OUTPUT_NAMES):
            raise ValueError(
                f"{model_dir}: the program has {len(self.output_names)} outputs but "
                f"{METADATA_FILE} lists {len(OUTPUT_NAMES)}. The files come from "
                "different exports; export the model again.")

    @property
    def is_mc(self):
        """Whether the model samples MC Dropout inside its graph."""
        return self.metadata is not None

    def run(self, images):
        """Run the predictor once.

        Args:
            images: float32 array ``[B, C, H, W]``, preprocessed as in ``Infer.transforms``.

        Returns:
            The outputs as numpy arrays, in the predictor's output order.
        """
        handle = self.predictor.get_input_handle(self.input_name)
        handle.reshape(list(images.shape))
        handle.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        self.predictor.run()
        return [self.predictor.get_output_handle(name).copy_to_cpu()
                for name in self.output_names]

    def predict(self, images):
        """Return the probabilities and, for an MC Dropout export, the measures.

        Args:
            images: float32 array ``[B, C, H, W]``.

        Returns:
            A tuple ``(probs, measures)``: float32 probabilities ``[B, num_classes]``
            (the mean over the T passes for an MC Dropout export), and a dict
            from each name in ``MEASURES`` to an array ``[B]``, or None for a
            plain export.
        """
        outputs = self.run(images)
        if not self.is_mc:
            return outputs[0], None
        named = dict(zip(OUTPUT_NAMES, outputs))
        return named["probs"], {name: named[name] for name in MEASURES}


def _read_predict_settings(config):
    """Return ``(model_dir, device, cpu_threads)`` from the ``Global`` section."""
    section = config.get("Global") or {}
    model_dir = path_value(section.get("inference_model_dir"), "Global.inference_model_dir",
                           required=True)
    threads = section.get("cpu_num_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"Global.cpu_num_threads: invalid value {threads!r}; expected an "
                         "integer >= 1.")
    return model_dir, section.get("device", "cpu"), threads


def _check_mc_settings(model, mc, logger):
    """Log where the config's ``MCDropout`` section differs from the exported model."""
    if model.is_mc:
        metadata = model.metadata
        if mc.enable and mc.samples != metadata["samples"]:
            logger.warning(f"MCDropout.samples is {mc.samples} but the model was exported "
                           f"with T={metadata['samples']}, which is what runs. Export again "
                           "to change T.")
        logger.info(f"Exported MC Dropout: T={metadata['samples']}, strategy="
                    f"{metadata['strategy']}, seed={mc.seed} (applied per batch in this "
                    "process; null draws fresh masks)")
    elif mc.enable:
        logger.warning(f"MCDropout.enable is True but {model.model_dir} has no "
                       f"{METADATA_FILE}, so it is a single-pass export and no uncertainty "
                       "is computed. Export with -o MCDropout.enable=True for MC Dropout.")


@dataclasses.dataclass
class _PredictRun:
    """State shared by the batches of one ``run_predict`` call."""

    model: InferenceModel
    infer: object
    seed: object
    paths: list
    class_id_map: object
    num_classes: object


def _predict_batch(run, batch, batch_index):
    """Run one batch and return its records, error records included, in image order."""
    records = {}
    indices = batch["indices"].numpy().tolist() if len(batch["indices"]) else []
    if indices:
        images = batch["images"]
        images = images.numpy() if isinstance(images, paddle.Tensor) else np.asarray(images)
        # The random ops of an MC export draw from Paddle's generators in this
        # process, so seeding them fixes the masks.
        with seeded(batch_seed(run.seed, batch_index) if run.model.is_mc else None):
            probs, measures = run.model.predict(images)

        if run.num_classes is None:
            # A plain export states no output width, so the label map is
            # checked here, before the first record is written.
            run.num_classes = int(probs.shape[1])
            if run.class_id_map is not None:
                check_class_id_map(run.class_id_map, run.num_classes,
                                   run.infer.class_id_map_file)

        names = [run.paths[index] for index in indices]
        built = build_records(probs, names, run.infer.topk, run.class_id_map, measures)
        records.update(zip(indices, built))
    for index, message in batch["errors"]:
        records[int(index)] = error_record(run.paths[int(index)], message)
    return [records[index] for index in sorted(records)]


def run_predict(config, config_path=None):
    """Run an exported model over ``Infer.infer_imgs`` and write the records.

    Reads ``Global.inference_model_dir``, ``Global.device``,
    ``Global.cpu_num_threads``, the ``Infer`` section as ``tools/infer.py``
    does, and ``MCDropout.seed``. With a seed, each batch's masks come from
    the seed of its batch index, as in ``tools/infer.py``, so the same
    seed, images and batch size give the same records.

    Returns:
        The summary dict, also written to ``<Infer.save_dir>/summary.json``.

    Raises:
        ValueError: on an invalid config, and on ``Infer.resume``, which this
            tool does not support.
        FileNotFoundError: when the model or label file is missing.

    On glibc this fixes the process's mmap threshold, as ``run_infer`` does.
    """
    logger = integration.get_logger()
    started = time.time()
    configure_heap()
    infer = parse_infer_section(config)
    mc = parse_mc_section(config)
    if infer.resume:
        raise ValueError("Infer.resume: tools/predict.py does not resume runs; set "
                         "-o Infer.resume=False, which rewrites predictions.jsonl.")
    model_dir, device, threads = _read_predict_settings(config)
    model = InferenceModel(model_dir, device, threads)
    _check_mc_settings(model, mc, logger)

    num_classes = model.metadata["num_classes"] if model.is_mc else None
    class_id_map = None
    if infer.class_id_map_file:
        class_id_map = load_class_id_map(infer.class_id_map_file, infer.delimiter, num_classes)

    image_list = list_images(infer.infer_imgs, infer.infer_list)
    paths = list(image_list.paths)
    dataset = ImageFolderDataset(paths, list(infer.transforms))
    logger.info(f"Predicting {len(paths)} images from {printable(infer.infer_imgs)} with "
                f"{model.program_file} in batches of {infer.batch_size}")

    run = _PredictRun(model=model, infer=infer, seed=mc.seed, paths=paths,
                      class_id_map=class_id_map, num_classes=num_classes)
    writer = PredictionWriter(infer.save_dir) if infer.save_dir else None
    predicted, failed = 0, []
    try:
        loader = build_loader(dataset, infer.batch_size, infer.num_workers)
        progress = tqdm(loader, total=len(loader), desc="predict", unit="batch", disable=None)
        for batch_index, batch in enumerate(progress):
            release_free_memory()
            records = _predict_batch(run, batch, batch_index)
            for record in records:
                if "error" in record:
                    failed.append(record)
                    logger.warning(f"Skipped {printable(record['error'])}")
                else:
                    predicted += 1
            if writer is not None:
                writer.write(records)
            else:
                logger.info(records)
    finally:
        if writer is not None:
            writer.close()

    summary = {
        "mode": "mc_dropout_exported" if model.is_mc else "single_pass_exported",
        "config": config_path,
        "inference_model_dir": model_dir,
        "program_file": os.path.basename(model.program_file),
        "infer_imgs": infer.infer_imgs,
        "images": len(paths),
        "predicted": predicted,
        "failed": len(failed),
        "samples": model.metadata["samples"] if model.is_mc else 1,
        "strategy": model.metadata["strategy"] if model.is_mc else "single_pass",
        "seed": mc.seed if model.is_mc else None,
        "batch_size": infer.batch_size,
        "device": str(device),
        "paddle_version": paddle.__version__,
        "paddleclas_mc_version": __version__,
        "wall_time_s": round(time.time() - started, 3),
        "failed_files": failed,
    }
    if infer.save_dir:
        summary_path = os.path.join(infer.save_dir, "summary.json")
        write_json_atomic(summary_path, summary)
        logger.info(f"Wrote {writer.path} and {summary_path}")
    logger.info(f"Predict finished: {len(paths)} images, {predicted} predicted, "
                f"{len(failed)} failed, {summary['wall_time_s']} s")
    return summary
