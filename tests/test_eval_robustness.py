"""Eval scores every image, whatever the batching, and repeats its numbers for a fixed seed."""

import json
import logging
import os

import pytest

from paddleclas_mc.cli import main
from paddleclas_mc.config import load_config
from paddleclas_mc.dataset import ImageFolderDataset
from paddleclas_mc.evaluation import run_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join(ROOT, "configs", "demo", "mc_digits.yaml")
DIGITS = os.path.join(ROOT, "demo", "digits")

# 37 readable images and one broken file: batches of 8 end with a batch of 6.
READABLE = 37

# Keys of metrics.json that differ between identical runs.
RUN_SPECIFIC_KEYS = ("wall_time_s", "config")


@pytest.fixture(autouse=True)
def repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def label_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labels")
    with open(os.path.join(DIGITS, "test_list.txt"), encoding="utf-8") as file:
        lines = file.read().splitlines()[:READABLE]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    lines.insert(20, f"{os.path.relpath(folder / 'broken.png', DIGITS)} 3")
    path = folder / "list.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def eval_config(label_file, output_dir, *overrides):
    return load_config(MC_CONFIG, [f"DataLoader.Eval.dataset.cls_label_path={label_file}",
                                   f"Global.output_dir={output_dir}", "MCDropout.samples=5",
                                   *overrides])


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as file:
        metrics = json.load(file)
    for key in RUN_SPECIFIC_KEYS:
        metrics.pop(key)
    return metrics


@pytest.fixture(scope="module")
def reference(label_file, tmp_path_factory):
    """Metrics of a run with batches of 8 and no workers."""
    output_dir = tmp_path_factory.mktemp("reference")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        run_eval(eval_config(label_file, output_dir, "DataLoader.Eval.sampler.batch_size=8"))
    finally:
        os.chdir(cwd)
    return read_metrics(output_dir)


def test_every_image_scored_with_small_last_batch(reference):
    assert reference["images"] == READABLE + 1
    assert reference["evaluated"] == READABLE
    assert reference["scored"] == {"single_pass": READABLE, "mc_dropout": READABLE}
    assert reference["failed_files"][0]["file_name"].endswith("broken.png")


@pytest.mark.parametrize("batch_size, workers", [(8, 2), (5, 0), (64, 0), (1, 2)])
def test_scored_whatever_the_batching(label_file, tmp_path, reference, batch_size, workers):
    report = run_eval(eval_config(label_file, tmp_path,
                                  f"DataLoader.Eval.sampler.batch_size={batch_size}",
                                  f"DataLoader.Eval.loader.num_workers={workers}"))

    assert report["scored"] == {"single_pass": READABLE, "mc_dropout": READABLE}
    # The single pass is deterministic, so only float rounding may differ with the batch size.
    for key in ("top1", "top5", "nll", "brier"):
        assert report["single_pass"][key] == pytest.approx(reference["single_pass"][key],
                                                           abs=1e-6), key


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_identical_metrics_json(label_file, tmp_path, reference, workers):
    run_eval(eval_config(label_file, tmp_path, "DataLoader.Eval.sampler.batch_size=8",
                         f"DataLoader.Eval.loader.num_workers={workers}"))
    metrics = read_metrics(tmp_path)

    for key in reference:
        assert metrics[key] == reference[key], key


def test_other_seed_other_mc_numbers(label_file, tmp_path, reference):
    run_eval(eval_config(label_file, tmp_path, "DataLoader.Eval.sampler.batch_size=8",
                         "MCDropout.seed=7"))
    metrics = read_metrics(tmp_path)

    assert metrics["mc_dropout"]["nll"] != reference["mc_dropout"]["nll"]
    assert metrics["single_pass"] == reference["single_pass"]


def test_drop_last_ignored_with_warning(label_file, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        report = run_eval(eval_config(label_file, tmp_path, "DataLoader.Eval.sampler.batch_size=8",
                                      "DataLoader.Eval.sampler.drop_last=True",
                                      "MCDropout.enable=False"))

    assert "drop_last is ignored" in caplog.text
    assert report["scored"] == {"single_pass": READABLE}


def test_label_out_of_range_rejected_before_images(label_file, tmp_path, capsys, monkeypatch):
    def fail_read(self, path):
        raise AssertionError(f"read {path!r} before the configuration error")

    monkeypatch.setattr(ImageFolderDataset, "_load_image", fail_read)
    lines = label_file.read_text(encoding="utf-8").splitlines()
    bad_name = lines[3].rsplit(" ", 1)[0]
    lines[3] = f"{bad_name} 10"
    bad_file = tmp_path / "list.txt"
    bad_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    status = main(["eval", "-c", MC_CONFIG, "-o",
                   f"DataLoader.Eval.dataset.cls_label_path={bad_file}",
                   "-o", f"Global.output_dir={tmp_path}"])

    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2, message
    assert message.startswith("error: DataLoader.Eval.dataset.cls_label_path:"), message
    assert f"{bad_name} has class id 10" in message
    assert "ids 0 to 9" in message


@pytest.mark.parametrize("override, key", [
    ("DataLoader.Eval.sampler.batch_size=0", "DataLoader.Eval.sampler.batch_size"),
    ("DataLoader.Eval.loader.num_workers=-1", "DataLoader.Eval.loader.num_workers"),
    ("DataLoader.Eval.dataset.name=CocoDataset", "DataLoader.Eval.dataset.name"),
    ("DataLoader.Eval.dataset.cls_label_path=null", "DataLoader.Eval.dataset.cls_label_path"),
    ("MCDropout.samples=1", "MCDropout.samples"),
])
def test_invalid_eval_config(capsys, tmp_path, override, key):
    status = main(["eval", "-c", MC_CONFIG, "-o", override, "-o", f"Global.output_dir={tmp_path}"])

    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2, message
    assert message.startswith(f"error: {key}"), message
