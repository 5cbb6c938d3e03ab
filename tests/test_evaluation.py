"""Evaluation on the bundled digits demo: single pass beside MC Dropout."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from paddleclas_mc.config import load_config
from paddleclas_mc.evaluation import build_run_metrics, run_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join(ROOT, "configs", "demo", "mc_digits.yaml")


@pytest.fixture(autouse=True)
def repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture
def label_file(tmp_path):
    """The first 37 test digits and one unreadable file, as an ImageNetDataset list."""
    with open(os.path.join(ROOT, "demo", "digits", "test_list.txt"), encoding="utf-8") as file:
        lines = file.read().splitlines()[:37]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    lines.append(f"{os.path.relpath(broken, os.path.join(ROOT, 'demo', 'digits'))} 3")
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(label_file, output_dir, *overrides):
    return load_config(MC_CONFIG, [f"DataLoader.Eval.dataset.cls_label_path={label_file}",
                                   "DataLoader.Eval.sampler.batch_size=8",
                                   f"Global.output_dir={output_dir}",
                                   "MCDropout.samples=5", *overrides])


class TestMCEvaluation:
    def test_report_has_both_runs(self, label_file, tmp_path):
        report = run_eval(_config(label_file, tmp_path))
        for run in ("single_pass", "mc_dropout"):
            for key in ("top1", "top5", "nll", "brier", "ece", "mce", "aurc", "risk@0.95",
                        "predictive_entropy_auroc", "predictive_entropy_aupr"):
                assert key in report[run], (run, key)
        assert "mutual_information_auroc" in report["mc_dropout"]
        assert report["n_bins"] == 15

    def test_unreadable_image_counted(self, label_file, tmp_path):
        report = run_eval(_config(label_file, tmp_path))
        assert report["images"] == 38
        assert report["evaluated"] == 37
        assert report["failed"] == 1
        assert report["failed_files"][0]["file_name"].endswith("broken.png")

    def test_outputs_written(self, label_file, tmp_path):
        run_eval(_config(label_file, tmp_path))
        with open(tmp_path / "metrics.json", encoding="utf-8") as file:
            assert json.load(file)["samples"] == 5
        for name in ("reliability_diagram.png", "risk_coverage.png", "uncertainty_histograms.png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    def test_same_seed_same_metrics(self, label_file, tmp_path):
        first = run_eval(_config(label_file, tmp_path / "a"))
        second = run_eval(_config(label_file, tmp_path / "b"))
        # json.dumps compares NaN (an AUROC with no wrong prediction) as equal.
        assert json.dumps(first["mc_dropout"]) == json.dumps(second["mc_dropout"])
        assert json.dumps(first["single_pass"]) == json.dumps(second["single_pass"])

    def test_every_image_scored_with_small_last_batch(self, label_file, tmp_path):
        # 37 readable images in batches of 8 leave a last batch of 6 (with the broken file).
        report = run_eval(_config(label_file, tmp_path))
        assert report["evaluated"] == 37

    def test_calibration_bins_configurable(self, label_file, tmp_path):
        config = _config(label_file, tmp_path)
        config["Metric"]["Eval"].append({"CalibrationError": {"n_bins": 10}})
        assert run_eval(config)["n_bins"] == 10


def test_single_pass_accuracy_by_direct_count(label_file, tmp_path):
    report = run_eval(_config(label_file, tmp_path, "MCDropout.enable=False"))
    assert "mc_dropout" not in report
    # The reference: run the infer pipeline image by image and count correct top-1.
    from paddleclas_mc.engine import run_infer
    with open(label_file, encoding="utf-8") as file:
        listed = [line.rsplit(" ", 1) for line in file.read().splitlines()]
    list_path = tmp_path / "paths.txt"
    list_path.write_text("\n".join(os.path.join(ROOT, "demo", "digits", name)
                                   for name, _ in listed) + "\n", encoding="utf-8")
    infer_config = load_config(MC_CONFIG, [f"Infer.infer_imgs={list_path}",
                                           f"Infer.save_dir={tmp_path / 'infer'}",
                                           "MCDropout.enable=False", "Infer.num_workers=0"])
    run_infer(infer_config)
    with open(tmp_path / "infer" / "predictions.jsonl", encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    correct = [record["class_ids"][0] == int(label)
               for record, (_, label) in zip(records, listed) if "error" not in record]
    assert report["single_pass"]["top1"] == pytest.approx(np.mean(correct), abs=1e-12)


def test_metric_eval_unknown_name_rejected():
    with pytest.raises(ValueError, match="Metric.Eval"):
        build_run_metrics({"Metric": {"Eval": [{"mAP": None}]}})


@pytest.mark.skipif(not os.environ.get("PADDLECLAS_ROOT"),
                    reason="set PADDLECLAS_ROOT to a PaddleClas source checkout to compare "
                           "with its tools/eval.py")
def test_single_pass_matches_paddleclas_eval(tmp_path):
    """Top-1 with MC disabled equals PaddleClas's own tools/eval.py on the same config."""
    script = os.path.join(os.environ["PADDLECLAS_ROOT"], "tools", "eval.py")
    config = os.path.join(ROOT, "configs", "demo", "digits.yaml")
    command = [sys.executable, script, "-c", config, "-o", "Global.device=cpu",
               "-o", "Global.use_visualdl=False", "-o", "Global.eval_during_train=False",
               "-o", "Global.print_batch_step=10", "-o", "Global.epochs=1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    paddleclas_top1 = float(re.search(r"\[Avg\].*top1: ([0-9.]+)", result.stdout).group(1))

    ours = run_eval(load_config(config, [f"Global.output_dir={tmp_path}"]))
    assert round(ours["single_pass"]["top1"], 5) == paddleclas_top1
