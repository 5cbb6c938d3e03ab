"""Interrupted infer runs: whole lines on disk, and Infer.resume ending with the full record set."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import paddle
import pytest

from paddleclas_mc.cli import main
from paddleclas_mc.config import load_config
from paddleclas_mc.dataset import ImageFolderDataset
from paddleclas_mc.engine import run_infer
from paddleclas_mc.output import PredictionWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join(ROOT, "configs", "demo", "mc_digits.yaml")
ALL_DIGITS = os.path.join("demo", "digits", "images", "test")
THREES = os.path.join(ALL_DIGITS, "3")
CHECKPOINT = os.path.join(ROOT, "demo", "model", "PPLCNet_x0_25_digits.pdparams")


@pytest.fixture(autouse=True)
def repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def small_overrides(save_dir, *extra):
    """Overrides for a quick run over the 46 demo threes, batches of 4, T=5."""
    return [f"Infer.infer_imgs={THREES}", f"Infer.save_dir={save_dir}", "Infer.batch_size=4",
            "Infer.num_workers=0", "MCDropout.samples=5", *extra]


def read_lines(path):
    with open(path, "rb") as file:
        return file.read().split(b"\n")[:-1]


def records_by_file(path):
    records = [json.loads(line) for line in read_lines(path)]
    by_file = {record["file_name"]: record for record in records}
    assert len(by_file) == len(records), f"{path} has a file with two records"
    return by_file


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished small run: ``(save_dir, summary)``, kept as the reference."""
    save_dir = tmp_path_factory.mktemp("reference")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        summary = run_infer(load_config(MC_CONFIG, small_overrides(save_dir)))
    finally:
        os.chdir(cwd)
    return save_dir, summary


def copy_run(save_dir, target):
    shutil.copytree(save_dir, target)
    return target


def test_killed_run_resumes_to_same_records(tmp_path):
    killed = tmp_path / "killed"
    overrides = [f"Infer.infer_imgs={ALL_DIGITS}", f"Infer.save_dir={killed}",
                 "Infer.batch_size=1", "Infer.num_workers=0", "MCDropout.samples=30"]
    command = [sys.executable, os.path.join(ROOT, "tools", "infer.py"), "-c", MC_CONFIG]
    for override in overrides:
        command += ["-o", override]
    # stderr goes to a file, because a full pipe would stall the run.
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        predictions = killed / "predictions.jsonl"
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and process.poll() is None:
                if predictions.exists() and predictions.read_bytes().count(b"\n") >= 2:
                    break
                time.sleep(0.002)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=60)
    log = (tmp_path / "stderr.txt").read_text(errors="replace")[-2000:]
    assert process.returncode == -signal.SIGKILL, log

    data = predictions.read_bytes()
    done = data.count(b"\n")
    assert 2 <= done < 450, f"killed after {done} of 450 records; the kill came too late"
    assert data.endswith(b"\n"), f"{predictions} ends in a cut-short line"
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        assert "file_name" in json.loads(line), f"{predictions}:{number}"
    assert not (killed / "summary.json").exists()

    resumed = run_infer(load_config(MC_CONFIG, overrides + ["Infer.resume=True"]))
    full = tmp_path / "full"
    uninterrupted = run_infer(load_config(
        MC_CONFIG, overrides[:1] + [f"Infer.save_dir={full}"] + overrides[2:]))

    assert resumed["resumed_records"] == done
    for key in ("images", "predicted", "failed"):
        assert resumed[key] == uninterrupted[key], key
    resumed_records = records_by_file(predictions)
    full_records = records_by_file(full / "predictions.jsonl")
    assert sorted(resumed_records) == sorted(full_records)
    for name, record in full_records.items():
        assert resumed_records[name] == record, name
    # Batches are appended in order, so even the bytes match.
    assert predictions.read_bytes() == (full / "predictions.jsonl").read_bytes()


def test_finished_run_not_redone(finished_run, tmp_path, monkeypatch, caplog):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    before = (save_dir / "predictions.jsonl").stat().st_mtime_ns

    def fail_on_read(self, path):
        raise AssertionError(f"read {path} although the run had finished")

    monkeypatch.setattr(ImageFolderDataset, "_load_image", fail_on_read)
    with caplog.at_level(logging.INFO):
        summary = run_infer(load_config(MC_CONFIG, small_overrides(save_dir, "Infer.resume=True")))

    assert summary == finished_run[1]
    assert (save_dir / "predictions.jsonl").stat().st_mtime_ns == before
    assert "already finished" in caplog.text


def test_cut_short_last_line_dropped(finished_run, tmp_path, caplog):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    predictions = save_dir / "predictions.jsonl"
    data = predictions.read_bytes()
    cut = data.index(b"\n", len(data) // 2) - 10
    predictions.write_bytes(data[:cut])
    (save_dir / "summary.json").unlink()

    with caplog.at_level(logging.WARNING):
        summary = run_infer(load_config(MC_CONFIG, small_overrides(save_dir, "Infer.resume=True")))

    assert "dropped an unfinished last line" in caplog.text
    assert predictions.read_bytes() == data
    assert summary["images"] == finished_run[1]["images"]
    assert summary["predicted"] == finished_run[1]["predicted"]


def test_missing_record_inferred_again(finished_run, tmp_path):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    predictions = save_dir / "predictions.jsonl"
    lines = read_lines(predictions)
    removed = json.loads(lines[5])["file_name"]
    predictions.write_bytes(b"".join(line + b"\n" for index, line in enumerate(lines)
                                     if index != 5))
    (save_dir / "summary.json").unlink()

    summary = run_infer(load_config(MC_CONFIG, small_overrides(save_dir, "Infer.resume=True")))

    assert read_lines(predictions)[-1] == lines[5], f"{removed} got another record"
    assert records_by_file(predictions) == records_by_file(finished_run[0] / "predictions.jsonl")
    assert summary["resumed_records"] == len(lines) - 1


def test_resume_counts_old_errors(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(os.path.join(ROOT, THREES), folder)
    (folder / "broken.png").write_bytes(b"not a png")
    save_dir = tmp_path / "run"
    overrides = small_overrides(save_dir, f"Infer.infer_imgs={folder}")
    full = run_infer(load_config(MC_CONFIG, overrides))
    predictions = save_dir / "predictions.jsonl"
    lines = read_lines(predictions)
    predictions.write_bytes(b"".join(line + b"\n" for line in lines[:len(lines) // 2]))

    resumed = run_infer(load_config(MC_CONFIG, overrides + ["Infer.resume=True"]))

    assert resumed["failed"] == full["failed"] == 1
    assert resumed["failed_files"] == full["failed_files"]
    assert resumed["predicted"] == full["predicted"]


@pytest.mark.parametrize("override, changed", [
    ("MCDropout.samples=6", "MCDropout"),
    ("MCDropout.seed=7", "MCDropout"),
    ("MCDropout.strategy=loop", "MCDropout"),
    ("Infer.batch_size=3", "Infer.batch_size"),
    ("Infer.transforms.1.ResizeImage.size=28", "Infer.transforms"),
    ("Infer.PostProcess.topk=2", "Infer.PostProcess.topk"),
    ("Arch.dropout_prob=0.3", "Arch"),
])
def test_resume_with_other_settings_rejected(finished_run, tmp_path, capsys, override, changed):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    before = (save_dir / "predictions.jsonl").read_bytes()
    arguments = ["infer", "-c", MC_CONFIG]
    for option in small_overrides(save_dir, "Infer.resume=True", override):
        arguments += ["-o", option]

    assert main(arguments) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: Infer.resume:"), message
    assert f"({changed} changed)" in message, message
    assert "\n" not in message
    assert (save_dir / "predictions.jsonl").read_bytes() == before


def test_resume_with_changed_checkpoint_rejected(finished_run, tmp_path, capsys):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    state = paddle.load(CHECKPOINT)
    state["fc.bias"] = state["fc.bias"] + 1.0
    paddle.save(state, str(tmp_path / "changed.pdparams"))
    arguments = ["infer", "-c", MC_CONFIG]
    for option in small_overrides(save_dir, "Infer.resume=True",
                                  f"Global.pretrained_model={tmp_path / 'changed'}"):
        arguments += ["-o", option]

    assert main(arguments) == 2
    assert "Global.pretrained_model (sha256) changed" in capsys.readouterr().err


def test_resume_with_moved_checkpoint_accepted(finished_run, tmp_path):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    (save_dir / "summary.json").unlink()
    shutil.copy(CHECKPOINT, tmp_path / "moved.pdparams")

    summary = run_infer(load_config(MC_CONFIG, small_overrides(
        save_dir, "Infer.resume=True", f"Global.pretrained_model={tmp_path / 'moved'}")))

    assert summary["resumed_records"] == finished_run[1]["images"]


def test_resume_without_run_json_rejected(finished_run, tmp_path, capsys):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    (save_dir / "run.json").unlink()
    arguments = ["infer", "-c", MC_CONFIG]
    for option in small_overrides(save_dir, "Infer.resume=True"):
        arguments += ["-o", option]

    assert main(arguments) == 2
    message = capsys.readouterr().err
    assert "run.json is missing" in message
    assert "Infer.resume=False" in message


def test_resume_of_empty_dir_starts_fresh(finished_run, tmp_path):
    summary = run_infer(load_config(MC_CONFIG, small_overrides(tmp_path / "new",
                                                               "Infer.resume=True")))

    assert summary["resumed_records"] == 0
    assert (records_by_file(tmp_path / "new" / "predictions.jsonl")
            == records_by_file(finished_run[0] / "predictions.jsonl"))


def test_without_resume_overwrites(finished_run, tmp_path, caplog):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        summary = run_infer(load_config(MC_CONFIG, small_overrides(save_dir)))

    assert "Overwriting" in caplog.text
    assert summary["resumed_records"] == 0
    assert len(read_lines(save_dir / "predictions.jsonl")) == summary["images"]


def test_resume_needs_save_dir(capsys):
    assert main(["infer", "-c", MC_CONFIG, "-o", "Infer.save_dir=null",
                 "-o", "Infer.resume=True"]) == 2
    assert "Infer.save_dir: invalid value None" in capsys.readouterr().err


def test_resume_must_be_boolean(capsys):
    assert main(["infer", "-c", MC_CONFIG, "-o", "Infer.resume=yes"]) == 2
    assert "Infer.resume: invalid value 'yes'" in capsys.readouterr().err


def test_concurrent_run_in_same_dir_rejected(tmp_path):
    writer = PredictionWriter(str(tmp_path))
    try:
        command = [sys.executable, os.path.join(ROOT, "tools", "infer.py"), "-c", MC_CONFIG]
        for option in small_overrides(tmp_path):
            command += ["-o", option]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        writer.close()

    assert result.returncode == 2, result.stderr[-2000:]
    assert "is locked by another running infer" in result.stderr


def test_fingerprint_ignores_device_id():
    from paddleclas_mc.config import parse_infer_section, parse_mc_section
    from paddleclas_mc.resume import run_settings, settings_fingerprint

    config = load_config(MC_CONFIG, small_overrides("unused"))
    mc, infer = parse_mc_section(config), parse_infer_section(config)

    def fingerprint(device):
        return settings_fingerprint(run_settings(config, mc, infer, device, None, None, None,
                                                 ["a.png"]))

    assert fingerprint("gpu:0") == fingerprint("gpu:3") == fingerprint("gpu")
    assert fingerprint("gpu") != fingerprint("cpu")


def test_stale_shard_dirs_match_rank_folders(tmp_path):
    from paddleclas_mc.resume import shard_dir, stale_shard_dirs

    for name in (".rank0", ".rank2", ".rank10", ".rank01", ".rankx", "rank1"):
        (tmp_path / name).mkdir()
    (tmp_path / ".rank3").write_text("a file, not a shard folder")

    assert stale_shard_dirs(str(tmp_path), 0) == [
        (0, str(tmp_path / ".rank0")), (2, str(tmp_path / ".rank2")),
        (10, str(tmp_path / ".rank10"))]
    assert [rank for rank, _ in stale_shard_dirs(str(tmp_path), 2)] == [2, 10]
    assert stale_shard_dirs(str(tmp_path / "missing"), 0) == []
    assert shard_dir("out", 4) == os.path.join("out", ".rank4")


def test_resume_rejects_shard_of_other_settings(finished_run, tmp_path, capsys):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    (save_dir / "summary.json").unlink()
    shard = save_dir / ".rank1"
    shard.mkdir()
    lines = read_lines(save_dir / "predictions.jsonl")
    (shard / "predictions.jsonl").write_bytes(lines[0] + b"\n")
    run_json = json.loads((save_dir / "run.json").read_text(encoding="utf-8"))
    run_json["fingerprint"] = "0" * 64
    (shard / "run.json").write_text(json.dumps(run_json), encoding="utf-8")
    arguments = ["infer", "-c", MC_CONFIG]
    for option in small_overrides(save_dir, "Infer.resume=True"):
        arguments += ["-o", option]

    assert main(arguments) == 2
    message = capsys.readouterr().err
    assert f"{shard / 'predictions.jsonl'} were made with other settings" in message
    assert shard.exists()


def test_fresh_run_deletes_stale_shards(finished_run, tmp_path):
    save_dir = copy_run(finished_run[0], tmp_path / "run")
    shard = save_dir / ".rank1"
    shard.mkdir()
    (shard / "predictions.jsonl").write_bytes(b'{"file_name": "old.png"}\n')

    run_infer(load_config(MC_CONFIG, small_overrides(save_dir)))

    assert not shard.exists()
    assert records_by_file(save_dir / "predictions.jsonl") == records_by_file(
        finished_run[0] / "predictions.jsonl")


def test_unset_resume_keeps_unfinished_run(tmp_path, capsys):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / "predictions.jsonl").write_bytes(b'{"file_name": "a.png", "class_ids": [1]}\n')
    options = []
    for option in small_overrides(save_dir):
        options += ["-o", option]

    assert main(["infer", "-c", MC_CONFIG, *options]) == 2

    assert "Infer.resume=False to overwrite" in capsys.readouterr().err
    assert (save_dir / "predictions.jsonl").read_bytes().startswith(b'{"file_name": "a.png"')


def test_replaced_image_rejects_resume(tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(THREES, images)
    save_dir = tmp_path / "run"
    overrides = small_overrides(save_dir) + [f"Infer.infer_imgs={images}"]
    run_infer(load_config(MC_CONFIG, overrides))
    (save_dir / "summary.json").unlink()
    first, second = sorted(images.iterdir())[:2]
    shutil.copy(second, first)
    options = []
    for option in overrides + ["Infer.resume=True"]:
        options += ["-o", option]

    assert main(["infer", "-c", MC_CONFIG, *options]) == 2

    assert "Infer.infer_imgs (images)" in capsys.readouterr().err
