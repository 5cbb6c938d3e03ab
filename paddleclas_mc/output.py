"""Per-image records: PaddleClas's Topk fields plus uncertainty, streamed to disk.

A prediction record holds PaddleClas's Topk fields (``class_ids``,
``scores``, ``file_name``, ``label_names``) computed from the probabilities
it is given (the mean of the T passes under MC Dropout), followed by one
field per uncertainty measure. An image that could not be read gets an error
record ``{"file_name": ..., "error": ...}`` in its place, so every input file
has exactly one record.
"""

import json
import os
import tempfile

import numpy as np

from . import integration

__all__ = [
    "PredictionWriter",
    "build_records",
    "error_record",
    "load_class_id_map",
    "write_json_atomic",
]

# Uncertainty values are written with this many decimals; Topk rounds scores to 5.
MEASURE_DECIMALS = 6


def load_class_id_map(path, delimiter=" ", num_classes=None):
    """Read a PaddleClas ``class_id_map_file``: one ``<class id><delimiter><name>`` per line.

    Args:
        path: the label file.
        delimiter: the separator between id and name.
        num_classes: when given, every class id in ``[0, num_classes)`` must
            have a name.

    Returns:
        A dict from class id to name.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: on a malformed line, a duplicate id or a missing class id,
            naming the file and the line.
    """
    key = "Infer.PostProcess.class_id_map_file"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: label file {path!r} not found.")

    class_id_map = {}
    with open(path, "r", encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            class_id, sep, name = line.partition(delimiter)
            if not sep or not class_id.strip().isdigit():
                raise ValueError(
                    f"{key}: {path}:{line_number}: expected '<class id>{delimiter}<name>', "
                    f"got {line!r}.")
            class_id = int(class_id)
            if class_id in class_id_map:
                raise ValueError(f"{key}: {path}:{line_number}: class id {class_id} is listed twice.")
            class_id_map[class_id] = name

    if num_classes is not None:
        missing = [i for i in range(num_classes) if i not in class_id_map]
        if missing:
            raise ValueError(
                f"{key}: {path} names {len(class_id_map)} classes but the model has "
                f"{num_classes}; ids without a name: {missing[:10]}.")
    return class_id_map


def error_record(file_name, message):
    """Return the record for an image that could not be read or preprocessed."""
    return {"file_name": file_name, "error": message}


def build_records(probs, file_names, topk, class_id_map=None, measures=None):
    """Build one record per image.

    Args:
        probs: float probabilities ``[batch_size, num_classes]``.
        file_names: ``batch_size`` file names.
        topk: how many classes each record lists.
        class_id_map: class id to name, or None for no ``label_names``.
        measures: name to float array ``[batch_size]``, appended per record.

    Returns:
        A list of ``batch_size`` dicts.
    """
    postprocess = integration.Topk(topk=topk, label_list=class_id_map or None)
    records = postprocess(np.asarray(probs), list(file_names))

    for name, values in (measures or {}).items():
        for record, value in zip(records, values):
            record[name] = round(float(value), MEASURE_DECIMALS)
    return records


def _replace_non_finite(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _replace_non_finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_replace_non_finite(value) for value in obj]
    return obj


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename.

    A reader sees the old file or the new one, never a half-written one.
    NaN and infinite floats (an AUROC with one class present, say) are
    written as ``null``, since strict JSON has no NaN.
    """
    obj = _replace_non_finite(obj)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(obj, file, ensure_ascii=False, indent=2, allow_nan=False)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


class PredictionWriter:
    """Append records to ``<save_dir>/predictions.jsonl`` as each batch finishes.

    One JSON object per line, UTF-8, file names unescaped. The file is flushed
    after every batch, so a run that is stopped early leaves the records of
    every finished batch.
    """

    file_name = "predictions.jsonl"

    def __init__(self, save_dir):
        os.makedirs(save_dir, exist_ok=True)
        self.path = os.path.join(save_dir, self.file_name)
        self._file = open(self.path, "w", encoding="utf-8")

    def write(self, records):
        """Append a batch of records and flush them to disk."""
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        self._file.write(lines)
        self._file.flush()

    def close(self):
        """Close the file."""
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
