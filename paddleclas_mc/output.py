"""Per-image records: PaddleClas's Topk fields plus uncertainty, streamed to disk.

A prediction record holds PaddleClas's Topk fields (``class_ids``,
``scores``, ``file_name``, ``label_names``) computed from the probabilities
it is given (the mean of the T passes under MC Dropout), followed by one
field per uncertainty measure. An image that could not be read gets an error
record ``{"file_name": ..., "error": ...}`` in its place, so every input file
has exactly one record.
"""

import errno
import json
import os
import secrets

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np

from . import integration

__all__ = [
    "PredictionWriter",
    "RecordFileError",
    "build_records",
    "check_class_id_map",
    "encode_json_line",
    "error_record",
    "load_class_id_map",
    "parse_record_lines",
    "parse_records",
    "write_bytes_atomic",
    "write_json_atomic",
]

# Uncertainty values are written with this many decimals; Topk rounds scores to 5.
MEASURE_DECIMALS = 6

CLASS_ID_MAP_KEY = "Infer.PostProcess.class_id_map_file"


def load_class_id_map(path, delimiter=" ", num_classes=None, config_key=CLASS_ID_MAP_KEY):
    """Read a PaddleClas ``class_id_map_file``: one ``<class id><delimiter><name>`` per line.

    Args:
        path: the label file, UTF-8 with or without a byte-order mark.
        delimiter: the separator between id and name.
        num_classes: when given, the map must name every class id in
            ``[0, num_classes)`` and no other (see ``check_class_id_map``).
        config_key: the config key of the file, named in errors.

    Returns:
        A dict from class id to name.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: on a malformed line, a duplicate id, an empty name, a file
            that is not UTF-8 or names no class, or ids that do not match
            ``num_classes``, naming the file and the line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{config_key}: label file {path!r} not found.")

    try:
        with open(path, "r", encoding="utf-8-sig") as file:
            lines = file.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{config_key}: label file {path!r} is not UTF-8 text "
                         f"({error}). Save it as UTF-8.") from None

    class_id_map = {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        class_id, sep, name = line.partition(delimiter)
        class_id = class_id.strip()
        if not sep or not (class_id.isascii() and class_id.isdigit()):
            raise ValueError(
                f"{config_key}: {path}:{line_number}: expected '<class id>{delimiter}"
                f"<name>' with a non-negative class id, got {line!r}.")
        class_id = int(class_id)
        if class_id in class_id_map:
            raise ValueError(f"{config_key}: {path}:{line_number}: class id {class_id} "
                             "is listed twice.")
        if not name.strip():
            raise ValueError(f"{config_key}: {path}:{line_number}: class id {class_id} "
                             "has an empty name.")
        class_id_map[class_id] = name

    if not class_id_map:
        raise ValueError(f"{config_key}: label file {path!r} names no class. Write one "
                         f"'<class id>{delimiter}<name>' line per class.")
    if num_classes is not None:
        check_class_id_map(class_id_map, num_classes, path, config_key)
    return class_id_map


def check_class_id_map(class_id_map, num_classes, path, config_key=CLASS_ID_MAP_KEY):
    """Check that a label map names exactly the class ids ``0 .. num_classes - 1``.

    Raises:
        ValueError: when an id has no name or an id is out of range, naming the file.
    """
    missing = [i for i in range(num_classes) if i not in class_id_map]
    extra = sorted(i for i in class_id_map if not 0 <= i < num_classes)
    if missing:
        raise ValueError(
            f"{config_key}: {path} names {len(class_id_map)} classes but the model has "
            f"{num_classes}; ids without a name: {missing[:10]}. Use the label file that "
            "belongs to Global.pretrained_model.")
    if extra:
        raise ValueError(
            f"{config_key}: {path} names class ids {extra[:10]}, which the model "
            f"does not have (its ids are 0 to {num_classes - 1}). Use the label file that "
            "belongs to Global.pretrained_model.")


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


def encode_json_line(obj):
    """Encode ``obj`` as one UTF-8 JSON line, newline included.

    Non-ASCII text is written as is. A file name that is not valid UTF-8
    (Linux allows any bytes, which Python represents as lone surrogates) cannot
    be, so such a record is written with ``\\u`` escapes instead. Both forms
    are valid JSON, and ``json.loads`` returns the original string.
    """
    text = json.dumps(obj, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = json.dumps(obj, ensure_ascii=True).encode("ascii")
    return data + b"\n"


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename.

    A reader sees the old file or the new one, never a half-written one.
    NaN and infinite floats (an AUROC with one class present, say) are
    written as ``null``, since strict JSON has no NaN. Text that is not
    valid UTF-8 is escaped as in ``encode_json_line``.
    """
    obj = _replace_non_finite(obj)
    text = json.dumps(obj, ensure_ascii=False, indent=2, allow_nan=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = json.dumps(obj, ensure_ascii=True, indent=2, allow_nan=False).encode("ascii")

    write_bytes_atomic(path, data)


def write_bytes_atomic(path, data):
    """Write ``data`` to ``path`` through a temporary file, ``os.fsync`` and a rename.

    A reader sees the old file or the new one, never a half-written one, and
    the new one is on disk when the function returns. The file gets mode
    0o644 less the umask, as ``PredictionWriter`` creates its file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp_path = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    handle = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


class RecordFileError(ValueError):
    """A ``predictions.jsonl`` line that is not a record, found when resuming."""


def parse_records(data, path):
    """Parse the contents of a ``predictions.jsonl`` written by ``PredictionWriter``.

    Args:
        data: the file contents (bytes).
        path: the file, named in errors.

    Returns:
        A tuple ``(records, complete_size)``. ``records`` contains one dict
        per whole line. ``complete_size`` is the byte length up to and including
        the last newline. Bytes after it are a line that a killed run left
        unfinished, and are not a record.

    Raises:
        RecordFileError: when a whole line is not a JSON object with a
            ``file_name``, naming the file and the line number.
    """
    lines, complete_size = parse_record_lines(data, path)
    return [record for record, _ in lines], complete_size


def parse_record_lines(data, path):
    """Parse ``predictions.jsonl`` contents as ``parse_records`` does, keeping each line's bytes.

    Returns:
        A tuple ``(lines, complete_size)``: ``lines`` contains one
        ``(record, line)`` pair per whole line, ``line`` without its newline.

    Raises:
        RecordFileError: as ``parse_records``.
    """
    complete_size = data.rfind(b"\n") + 1
    lines = []
    for line_number, line in enumerate(data[:complete_size].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecordFileError(
                f"{path}:{line_number}: not a JSON record ({error}). Delete the line to "
                "infer that image again, or rerun without Infer.resume to start over.") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise RecordFileError(
                f"{path}:{line_number}: not a record with a file_name. Delete the line, or "
                "rerun without Infer.resume to start over.")
        lines.append((record, line))
    return lines, complete_size


class PredictionWriter:
    """Append records to ``<save_dir>/predictions.jsonl`` as each batch finishes.

    One JSON object per line, UTF-8, with file names unescaped unless they
    are not valid UTF-8 (see ``encode_json_line``). The file is opened
    with ``O_APPEND`` and each batch goes to the kernel in one ``os.write``,
    with no buffer in Python, so a killed process leaves the lines of every
    finished batch and no part of a later one. The exception is a write that
    the kernel completes only in part (a full disk, say): the rest follows
    in further calls, and a kill between them leaves a cut-short last line,
    which ``parse_records`` sets apart. ``close`` runs ``os.fsync``.

    On POSIX systems the file is locked with ``fcntl.lockf`` while open, so a
    second run cannot write into the same ``save_dir`` at the same time. The
    lock belongs to this process (DataLoader workers do not inherit it) and
    ends when the process does, even when it is killed.

    Args:
        save_dir: the folder of the file, created if missing.
        append: keep the existing records (to resume) instead of emptying the file.

    Raises:
        ValueError: when another process holds the lock.
    """

    file_name = "predictions.jsonl"

    def __init__(self, save_dir, append=False):
        os.makedirs(save_dir, exist_ok=True)
        self.path = os.path.join(save_dir, self.file_name)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _lock(self._fd, self.path)
            if not append:
                os.ftruncate(self._fd, 0)
        except BaseException:
            os.close(self._fd)
            raise

    def read(self):
        """Return the current contents of the file as bytes.

        The file is read through the writer's own descriptor, because closing
        any other descriptor of the file would drop this process's lock.
        """
        size = os.fstat(self._fd).st_size
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(self._fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def truncate(self, size):
        """Cut the file to ``size`` bytes, for example to drop an unfinished last line."""
        os.ftruncate(self._fd, size)

    def write(self, records):
        """Append a batch of records as whole lines, in one ``os.write`` when the kernel allows."""
        self.write_bytes(b"".join(encode_json_line(record) for record in records))

    def write_bytes(self, data):
        """Append encoded lines, for example records copied from another file."""
        data = memoryview(data)
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def close(self):
        """Flush the file to disk and close it, which also releases the lock."""
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _lock(fd, path):
    """Take an exclusive, non-blocking lock on ``fd``, or raise ValueError."""
    if fcntl is None:
        # NOTE: without fcntl (Windows), two runs with the same save_dir are not kept apart.
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise ValueError(
            f"Infer.save_dir: {path} is locked by another running infer. Wait for it to "
            "finish, or set Infer.save_dir to another folder.") from None
