"""End-to-end inference on the bundled digits demo (checkpoint and images in demo/)."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import paddle
import pytest

from paddleclas_mc import integration
from paddleclas_mc.cli import main
from paddleclas_mc.config import load_config
from paddleclas_mc.dropout import NoStochasticLayerError
from paddleclas_mc.engine import build_inference_model, run_infer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join(ROOT, "configs", "demo", "mc_digits.yaml")
TEST_IMAGES = os.path.join(ROOT, "demo", "digits", "images", "test")


@pytest.fixture(autouse=True)
def repository_root(monkeypatch):
    # The demo configs use paths relative to the repository root.
    monkeypatch.chdir(ROOT)


@pytest.fixture
def image_folder(tmp_path):
    """Twelve demo digits, a zero-byte file and a truncated PNG in nested folders."""
    folder = tmp_path / "images"
    for digit in range(3):
        source = os.path.join(TEST_IMAGES, str(digit))
        target = folder / f"class {digit}"
        target.mkdir(parents=True)
        for name in sorted(os.listdir(source))[:4]:
            shutil.copy(os.path.join(source, name), target / name)
    (folder / "class 0" / "empty.png").write_bytes(b"")
    data = (folder / "class 1" / sorted(os.listdir(folder / "class 1"))[0]).read_bytes()
    (folder / "class 1" / "truncated.png").write_bytes(data[: len(data) // 2])
    return folder


def _config(image_folder, save_dir, *overrides):
    return load_config(MC_CONFIG, [f"Infer.infer_imgs={image_folder}",
                                   f"Infer.save_dir={save_dir}", "Infer.num_workers=0",
                                   "Infer.batch_size=5", "MCDropout.samples=6",
                                   *overrides])


def _read_jsonl(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


class TestMCInference:
    def test_every_file_has_one_record(self, image_folder, tmp_path):
        summary = run_infer(_config(image_folder, tmp_path / "out"))
        records = _read_jsonl(tmp_path / "out" / "predictions.jsonl")
        listed = sorted(str(path) for path in image_folder.rglob("*.png"))
        assert sorted(record["file_name"] for record in records) == listed
        assert summary["images"] == 14
        assert summary["predicted"] == 12
        assert summary["failed"] == 2

    def test_error_records_name_the_cause(self, image_folder, tmp_path):
        run_infer(_config(image_folder, tmp_path / "out"))
        errors = {os.path.basename(r["file_name"]): r["error"]
                  for r in _read_jsonl(tmp_path / "out" / "predictions.jsonl") if "error" in r}
        assert set(errors) == {"empty.png", "truncated.png"}
        assert "0 bytes" in errors["empty.png"]
        assert "truncated" in errors["truncated.png"]

    def test_records_carry_uncertainty(self, image_folder, tmp_path):
        run_infer(_config(image_folder, tmp_path / "out"))
        record = next(r for r in _read_jsonl(tmp_path / "out" / "predictions.jsonl")
                      if "error" not in r)
        assert list(record)[:4] == ["class_ids", "scores", "file_name", "label_names"]
        for measure in ("predictive_entropy", "expected_entropy", "mutual_information",
                        "variation_ratio", "std"):
            assert measure in record
        assert len(record["class_ids"]) == 3
        assert record["label_names"][0] in {"zero", "one", "two"}

    def test_summary_written(self, image_folder, tmp_path):
        run_infer(_config(image_folder, tmp_path / "out"))
        with open(tmp_path / "out" / "summary.json", encoding="utf-8") as file:
            summary = json.load(file)
        assert summary["samples"] == 6
        assert summary["seed"] == 2024
        assert summary["strategy"] == "prefix"
        assert summary["device"] == "cpu"
        assert len(summary["failed_files"]) == 2

    def test_demo_digits_mostly_correct(self, image_folder, tmp_path):
        run_infer(_config(image_folder, tmp_path / "out"))
        records = [r for r in _read_jsonl(tmp_path / "out" / "predictions.jsonl")
                   if "error" not in r]
        correct = [r["label_names"][0] == ["zero", "one", "two"][int(r["file_name"].split("class ")[1][0])]
                   for r in records]
        assert sum(correct) >= 11

    @pytest.mark.parametrize("strategy", ["loop", "tiled"])
    def test_same_seed_same_predictions(self, image_folder, tmp_path, strategy):
        run_infer(_config(image_folder, tmp_path / "a", f"MCDropout.strategy={strategy}"))
        run_infer(_config(image_folder, tmp_path / "b", f"MCDropout.strategy={strategy}"))
        first = (tmp_path / "a" / "predictions.jsonl").read_text(encoding="utf-8")
        assert first == (tmp_path / "b" / "predictions.jsonl").read_text(encoding="utf-8")

    def test_workers_give_same_predictions(self, image_folder, tmp_path):
        run_infer(_config(image_folder, tmp_path / "a"))
        run_infer(_config(image_folder, tmp_path / "b", "Infer.num_workers=2"))
        first = (tmp_path / "a" / "predictions.jsonl").read_text(encoding="utf-8")
        assert first == (tmp_path / "b" / "predictions.jsonl").read_text(encoding="utf-8")

    def test_without_save_dir_logs_only(self, image_folder, tmp_path):
        config = _config(image_folder, tmp_path / "out", "Infer.save_dir=null")
        summary = run_infer(config)
        assert summary["predicted"] == 12
        assert not (tmp_path / "out").exists()


def _paddleclas_single_pass(config, paths):
    """Reference: PaddleClas's infer loop as its Engine runs it, for one batch.

    Decoding uses PaddleClas's DecodeImage (OpenCV) and scoring follows its
    Topk: softmax over logits, classes sorted by descending probability,
    scores rounded to 5 decimals.
    """
    ops = integration.create_preprocess_ops(config["Infer"]["transforms"])
    batch = []
    for path in paths:
        with open(path, "rb") as file:
            data = file.read()
        for op in ops:
            data = op(data)
        batch.append(data)
    model = build_inference_model(config)
    with paddle.no_grad():
        logits = model(paddle.to_tensor(np.stack(batch))).numpy().astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    topk = config["Infer"]["PostProcess"]["topk"]
    return [{"class_ids": [int(i) for i in row.argsort()[-topk:][::-1]],
             "scores": [round(float(row[i]), 5) for i in row.argsort()[-topk:][::-1]]}
            for row in probs]


def test_single_pass_matches_paddleclas(image_folder, tmp_path):
    config = _config(image_folder, tmp_path / "out", "MCDropout.enable=False")
    summary = run_infer(config)
    records = [r for r in _read_jsonl(tmp_path / "out" / "predictions.jsonl") if "error" not in r]
    expected = _paddleclas_single_pass(config, [r["file_name"] for r in records])
    assert summary["mode"] == "single_pass"
    for record, reference in zip(records, expected):
        assert record["class_ids"] == reference["class_ids"], record["file_name"]
        assert np.allclose(record["scores"], reference["scores"], atol=1e-5), record["file_name"]
        assert "mutual_information" not in record


def test_decoding_matches_paddleclas_opencv(image_folder):
    path = next(image_folder.rglob("test_*.png"))
    data = path.read_bytes()
    from paddleclas_mc.dataset import decode_image
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert np.array_equal(decode_image(data), expected)


def test_model_without_dropout_rejected_before_images(tmp_path):
    config = load_config(MC_CONFIG, [f"Infer.infer_imgs={tmp_path / 'missing'}"])
    config["Arch"] = {"name": "MobileNetV2_x0_25", "class_num": 10}
    config["Global"]["pretrained_model"] = None
    with pytest.raises(NoStochasticLayerError, match="nothing stochastic"):
        run_infer(config)


def test_wrong_class_count_checkpoint_rejected():
    config = load_config(MC_CONFIG, ["Arch.class_num=12"])
    with pytest.raises(ValueError, match="does not fit"):
        build_inference_model(config)


class TestCommandLine:
    def test_invalid_value_exits_2(self, capsys):
        assert main(["infer", "-c", MC_CONFIG, "-o", "MCDropout.samples=1"]) == 2
        assert "MCDropout.samples: invalid value 1" in capsys.readouterr().err

    def test_unknown_key_exits_2(self, capsys):
        assert main(["infer", "-c", MC_CONFIG, "-o", "MCDropout.sample=10"]) == 2
        assert "unknown key(s) sample" in capsys.readouterr().err

    def test_tools_infer_script(self, image_folder, tmp_path):
        command = [sys.executable, os.path.join(ROOT, "tools", "infer.py"), "-c", MC_CONFIG,
                   "-o", f"Infer.infer_imgs={image_folder}", "-o", f"Infer.save_dir={tmp_path}",
                   "-o", "MCDropout.samples=3"]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Infer finished: 14 images, 12 predicted, 2 failed" in result.stdout
        assert len(_read_jsonl(tmp_path / "predictions.jsonl")) == 14
