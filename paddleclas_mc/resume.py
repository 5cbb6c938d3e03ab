"""The files of an infer run in ``Infer.save_dir``, and resuming an interrupted run.

A run with ``Infer.save_dir`` writes three files there:

- ``predictions.jsonl``: one record per image, appended batch by batch
  (see ``output.PredictionWriter``).
- ``run.json``: written before the first batch. It stores the settings that
  shape the records and their SHA-256 fingerprint.
- ``summary.json``: written when the run finishes, with ``"finished": true``
  and the same fingerprint.

With ``Infer.resume: True`` a run reuses the records already in
``predictions.jsonl``. Batches are always cut from the full image list at
multiples of ``Infer.batch_size``, and each batch's dropout seed comes from
its batch index. So a resumed batch has the same images and seed as in an
uninterrupted run, and gives the same records. For that reason the image
list and the batch size are part of the fingerprint, next to the model,
checkpoint contents, preprocessing, ``MCDropout`` section, device and label
map. Resuming with a different fingerprint is rejected.

Under ``python -m paddle.distributed.launch`` with more than one process,
rank r appends its records to its own shard,
``<save_dir>/.rank<r>/predictions.jsonl`` with its own ``run.json``. When
every rank has finished, rank 0 merges all records into ``predictions.jsonl``
in the order of a run with one process and writes ``summary.json``, and then
each rank deletes its shard. The world size is not part of the fingerprint,
because the records do not depend on it, so a run may be resumed with another
number of processes. Rank 0 moves the records of shards that no rank of the
new run owns into ``predictions.jsonl`` (``absorb_stale_shards``).
"""

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
from typing import Optional

import paddle

from .output import PredictionWriter, parse_record_lines, parse_records, write_json_atomic

__all__ = [
    "RUN_FILE",
    "SUMMARY_FILE",
    "ResumeState",
    "absorb_stale_shards",
    "build_run_record",
    "check_unfinished_run",
    "file_sha256",
    "merge_record_lines",
    "open_output",
    "pending_batches",
    "run_settings",
    "settings_fingerprint",
    "shard_dir",
    "stale_shard_dirs",
]

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"

# A rank's shard folder in save_dir is this prefix followed by the rank.
SHARD_PREFIX = ".rank"
_SHARD_PATTERN = re.compile(re.escape(SHARD_PREFIX) + r"(0|[1-9][0-9]*)")


def file_sha256(path):
    """Return the SHA-256 hex digest of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain(obj):
    """Return ``obj`` as plain JSON types, with keys sorted."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def _text_sha256(lines):
    digest = hashlib.sha256()
    for line in lines:
        # surrogateescape gives back the original bytes of a non-UTF-8 file name.
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _file_stamps(paths):
    """Yield ``"<size> <mtime_ns>"`` per path, so a replaced image changes the fingerprint.

    Only ``os.stat`` runs here: no image is read. A missing file gives ``"-"``.
    """
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            yield "-"
            continue
        yield f"{stat.st_size} {stat.st_mtime_ns}"


def run_settings(config, mc, infer, device, amp, checkpoint_file, class_id_map, paths):
    """Collect the settings that shape the records of an infer run.

    Args:
        config: the PaddleClas config, for ``Arch``.
        mc: the ``MCDropoutConfig``.
        infer: the ``InferConfig``.
        device: Paddle's device string.
        amp: the AMP level, or None.
        checkpoint_file: the ``.pdparams`` file, or None for random weights.
        class_id_map: class id to name, or None.
        paths: the image paths in reading order.

    Returns:
        A dict of plain JSON values, keyed by the config key each comes from.
        Paths are left out where their contents are compared instead (the
        checkpoint), so moving a file does not block resuming.
    """
    label_map = None
    if class_id_map is not None:
        label_map = _text_sha256(f"{class_id} {name}" for class_id, name in
                                 sorted(class_id_map.items()))
    return _plain({
        "Arch": config.get("Arch"),
        "Global.pretrained_model (sha256)": file_sha256(checkpoint_file) if checkpoint_file else None,
        # The device type only: under the launcher, rank r runs on gpu:r,
        # and every rank gives the same records.
        "Global.device": device.split(":")[0],
        "AMP": amp,
        "paddle": paddle.__version__,
        "MCDropout": dataclasses.asdict(mc) if mc.enable else {"enable": False},
        "Infer.transforms": list(infer.transforms),
        "Infer.batch_size": infer.batch_size,
        "Infer.PostProcess.topk": infer.topk,
        "Infer.PostProcess.class_id_map_file (sha256)": label_map,
        "Infer.infer_imgs (images)": {"count": len(paths), "sha256": _text_sha256(paths),
                                      "files (sha256)": _text_sha256(_file_stamps(paths))},
    })


def settings_fingerprint(settings):
    """Return the SHA-256 hex digest of a settings dict from ``run_settings``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


@dataclasses.dataclass
class ResumeState:
    """Records already in ``predictions.jsonl`` when a run starts.

    Attributes:
        done: file names that have a record.
        predicted: how many of those records are predictions.
        failed: the error records, in file order.
        finished_summary: the stored ``summary.json`` when the earlier run
            finished with the same fingerprint, else None.
    """

    done: set = dataclasses.field(default_factory=set)
    predicted: int = 0
    failed: list = dataclasses.field(default_factory=list)
    finished_summary: Optional[dict] = None

    def add(self, record):
        """Count one earlier record; return False when its file already has one."""
        name = record["file_name"]
        if name in self.done:
            return False
        self.done.add(name)
        if "error" in record:
            self.failed.append(record)
        else:
            self.predicted += 1
        return True


def _read_json(path):
    """Return the JSON object stored at ``path``, or None when missing or unreadable."""
    try:
        with open(path, "rb") as file:
            value = json.loads(file.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _start_fresh(writer, save_dir, run_record):
    """Empty ``save_dir``'s run files and write ``run.json``.

    The order keeps a kill at any step safe: once ``run.json`` is gone, old
    records can no longer be resumed, and the new ``run.json`` is written
    only after the old records are deleted.
    """
    _remove(os.path.join(save_dir, RUN_FILE))
    _remove(os.path.join(save_dir, SUMMARY_FILE))
    writer.truncate(0)
    write_json_atomic(os.path.join(save_dir, RUN_FILE), run_record)


def _check_same_settings(stored, run_record, writer, record_count):
    run_path = os.path.join(os.path.dirname(writer.path), RUN_FILE)
    if stored is None or "fingerprint" not in stored:
        raise ValueError(
            f"Infer.resume: {writer.path} contains {record_count} records, but {run_path} is "
            "missing or unreadable, so their settings cannot be checked. Rerun with "
            "-o Infer.resume=False to start over.")
    if stored["fingerprint"] == run_record["fingerprint"]:
        return

    old = stored.get("settings") or {}
    new = run_record["settings"]
    changed = [key for key in new if old.get(key) != new[key]] or ["unknown"]
    raise ValueError(
        f"Infer.resume: the {record_count} records in {writer.path} were made with other "
        f"settings ({', '.join(changed)} changed), and mixing them would give records "
        "no single run makes. Restore those settings, rerun with -o Infer.resume=False "
        "to start over, or set Infer.save_dir to a new folder.")


def _resume_state(records, paths, summary, fingerprint, writer):
    state = ResumeState()
    known = set(paths)
    for record in records:
        name = record["file_name"]
        if name not in known:
            raise ValueError(
                f"Infer.resume: {writer.path} has a record for {name!r}, which is not "
                "among the images of Infer.infer_imgs. Rerun with -o Infer.resume=False "
                "to start over.")
        state.add(record)

    finished = (summary is not None and summary.get("finished") is True
                and summary.get("fingerprint") == fingerprint and len(state.done) == len(known))
    state.finished_summary = summary if finished else None
    return state


def check_unfinished_run(save_dir, resume):
    """Reject overwriting an unfinished run when ``Infer.resume`` is unset.

    Only an explicit ``Infer.resume=False`` replaces records of a run that has
    no finished ``summary.json``, so a typo in the key cannot throw away
    finished batches. Shards of a multi-process run count as records.

    Args:
        save_dir: ``Infer.save_dir``.
        resume: ``Infer.resume``: True, False, or None when unset.

    Raises:
        ValueError: when ``resume`` is None and ``save_dir`` contains records
            of an unfinished run.
    """
    if resume is not None:
        return
    summary = _read_json(os.path.join(save_dir, SUMMARY_FILE))
    if summary and summary.get("finished"):
        return

    candidates = [os.path.join(save_dir, PredictionWriter.file_name)]
    if os.path.isdir(save_dir):
        candidates += [os.path.join(save_dir, name, PredictionWriter.file_name)
                       for name in sorted(os.listdir(save_dir)) if name.startswith(".rank")]
    for path in candidates:
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            raise ValueError(
                f"Infer.save_dir: {path} contains records of an unfinished run. Set -o "
                "Infer.resume=True to continue it, or -o Infer.resume=False to "
                "overwrite it.")


def open_output(save_dir, run_record, paths, resume, logger):
    """Open ``predictions.jsonl`` for a run and collect what an earlier run left.

    Without ``resume`` the earlier files are replaced. With it, existing
    records are kept when ``run.json`` has the same fingerprint. An
    unfinished last line is cut off, and a stale ``summary.json`` is deleted.

    Args:
        save_dir: ``Infer.save_dir``.
        run_record: the ``run.json`` contents, with ``settings`` and ``fingerprint``.
        paths: the image paths of this run.
        resume: ``Infer.resume``.
        logger: PaddleClas's logger.

    Returns:
        A tuple ``(writer, state)``: an open ``PredictionWriter`` and a ``ResumeState``.

    Raises:
        ValueError: when resuming is not possible (settings changed, ``run.json``
            missing, a malformed line), or another run holds the lock.
    """
    writer = PredictionWriter(save_dir, append=True)
    try:
        data = writer.read()
        if not resume:
            if data:
                logger.warning(f"Overwriting {writer.path}, which contains an earlier run's "
                               "records. Set Infer.resume=True to continue a run instead.")
            _start_fresh(writer, save_dir, run_record)
            return writer, ResumeState()

        records, complete_size = parse_records(data, writer.path)
        if not records:
            logger.info(f"Infer.resume: {writer.path} contains no records, so the run starts "
                        "from the first image.")
            _start_fresh(writer, save_dir, run_record)
            return writer, ResumeState()

        _check_same_settings(_read_json(os.path.join(save_dir, RUN_FILE)), run_record, writer,
                             len(records))
        summary_path = os.path.join(save_dir, SUMMARY_FILE)
        state = _resume_state(records, paths, _read_json(summary_path),
                              run_record["fingerprint"], writer)
        if complete_size < len(data):
            logger.warning(f"Infer.resume: dropped an unfinished last line of "
                           f"{len(data) - complete_size} bytes from {writer.path}.")
            writer.truncate(complete_size)
        if state.finished_summary is None:
            _remove(summary_path)
        return writer, state
    except BaseException:
        writer.close()
        raise


def pending_batches(paths, batch_size, done):
    """Cut the image list into batches and keep those with an image that has no record.

    Returns:
        A list of ``(batch_index, indices)``. Every batch is the full slice
        ``[batch_index * batch_size, (batch_index + 1) * batch_size)``, so its
        images and seed match an uninterrupted run, even when some of its
        images already have a record.
    """
    batches = []
    for batch_index, start in enumerate(range(0, len(paths), batch_size)):
        indices = list(range(start, min(start + batch_size, len(paths))))
        if any(paths[index] not in done for index in indices):
            batches.append((batch_index, indices))
    return batches


def build_run_record(settings, config_path, checkpoint_file, infer_imgs, world_size=1):
    """Return the ``run.json`` contents: the settings, their fingerprint and what they came from."""
    return {
        "fingerprint": settings_fingerprint(settings),
        "settings": settings,
        "config": config_path,
        "checkpoint": checkpoint_file,
        "infer_imgs": infer_imgs,
        "world_size": world_size,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def shard_dir(save_dir, rank):
    """Return the folder of one rank's records: ``<save_dir>/.rank<rank>``."""
    return os.path.join(save_dir, f"{SHARD_PREFIX}{rank}")


def stale_shard_dirs(save_dir, first_rank):
    """Return ``(rank, folder)`` for each shard folder in ``save_dir`` of rank ``first_rank`` or above.

    The list is sorted by rank, and empty when ``save_dir`` does not exist.
    """
    try:
        entries = list(os.scandir(save_dir))
    except FileNotFoundError:
        return []
    shards = []
    for entry in entries:
        match = _SHARD_PATTERN.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and int(match.group(1)) >= first_rank:
            shards.append((int(match.group(1)), entry.path))
    return sorted(shards)


def absorb_stale_shards(writer, state, save_dir, first_rank, run_record, paths, resume, logger):
    """Move the records of shards that no rank of this run owns into ``writer``, then delete them.

    Shards of rank ``first_rank`` and above are left by an earlier run with
    more processes, or, with ``first_rank`` 0, by an earlier run with several
    processes that a single process now continues. With ``resume``, their
    records are checked as ``open_output`` checks ``predictions.jsonl``, and
    those for files without a record in ``state`` are appended to ``writer``
    and added to ``state``. Without it, the shards are only deleted.

    Raises:
        ValueError: when a shard's records were made with other settings, or
            another running infer holds its lock.
    """
    for rank, folder in stale_shard_dirs(save_dir, first_rank):
        shard, _ = open_output(folder, run_record, paths, resume, logger)
        try:
            lines = parse_record_lines(shard.read(), shard.path)[0] if resume else []
        finally:
            shard.close()

        moved = []
        for record, line in lines:
            if state.add(record):
                moved.append(line + b"\n")
        writer.write_bytes(b"".join(moved))
        shutil.rmtree(folder)
        if moved:
            logger.info(f"Infer.resume: moved {len(moved)} records of rank {rank} from "
                        f"{folder} to {writer.path}")
        else:
            logger.info(f"Deleted {folder}, the shard of rank {rank} of an earlier run")


def merge_record_lines(sources, paths):
    """Merge the records of several ``predictions.jsonl`` contents into image-list order.

    Args:
        sources: ``(name, data)`` pairs, ``data`` in the format of
            ``predictions.jsonl`` and ``name`` used in errors. When several
            records name the same file, the first one is kept.
        paths: the image paths of the run, in reading order.

    Returns:
        A list of ``(record, line)`` pairs, one per path and in the order of
        ``paths``, ``line`` being the record's bytes without the newline.

    Raises:
        ValueError: when a record names a file outside ``paths``, or a path
            has no record.
    """
    position = {path: index for index, path in enumerate(paths)}
    merged = [None] * len(paths)
    for name, data in sources:
        lines, _ = parse_record_lines(data, name)
        for record, line in lines:
            index = position.get(record["file_name"])
            if index is None:
                raise ValueError(f"{name} has a record for {record['file_name']!r}, which is "
                                 "not among the images of Infer.infer_imgs.")
            if merged[index] is None:
                merged[index] = (record, line)

    missing = [paths[index] for index, entry in enumerate(merged) if entry is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(paths)} images have no record after merging "
                         f"the records of every rank, e.g. {missing[:3]}.")
    return merged
