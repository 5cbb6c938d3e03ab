"""PaddleClas's own ImageNet configs run MC Dropout unchanged, plus -o MCDropout.enable=True.

The configs are read from the PaddleClas checkout that ``PADDLECLAS_ROOT``
names, never copied here, and the tests skip without it (see
docs/paddleclas_checkout.md). Each runs through the checkout's
``tools/infer.py`` (with the start-up hook) and through ``paddleclas-mc
infer``, on random weights, three generated images and 64x64 crops so that
it is quick on a CPU.
"""

import json
import os
import site
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import require_paddleclas_checkout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH_NAME = "paddleclas_mc_hook.pth"

# Config under ppcls/configs/ImageNet -> Arch.name.
CONFIGS = {
    "PPLCNet/PPLCNet_x1_0.yaml": "PPLCNet_x1_0",
    "MobileNetV3/MobileNetV3_large_x1_0.yaml": "MobileNetV3_large_x1_0",
    "EfficientNet/EfficientNetB0.yaml": "EfficientNetB0",
}

IMAGE_SIZES = [(96, 80), (64, 120), (100, 100)]
CROP_SIZE = 64


def _checkout_root():
    return require_paddleclas_checkout("ppcls/configs/ImageNet")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three random RGB JPEG images of different sizes."""
    folder = tmp_path_factory.mktemp("images")
    random = np.random.RandomState(0)
    for index, (height, width) in enumerate(IMAGE_SIZES):
        pixels = random.randint(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image_{index}.jpg")
    return folder


def _read_config(path):
    with open(path, encoding="utf-8") as file:
        return yaml.safe_load(file)


def _overrides(root, config_path, images, save_dir, output_dir, null):
    """Return the -o options: CPU, random weights, the test images and 64x64 crops.

    ``null`` is how the entry point's -o parser spells None: PaddleClas's
    evaluates Python (``None``), paddleclas-mc's parses YAML (``null``).
    """
    config = _read_config(config_path)
    transforms = config["Infer"]["transforms"]
    # Fail clearly if PaddleClas reorders the ops the overrides index.
    assert "ResizeImage" in transforms[1], transforms
    assert "CropImage" in transforms[2], transforms
    # Arch.pretrained would download weights, which these tests must not do.
    assert not config["Arch"].get("pretrained"), config["Arch"]

    label_file = os.path.join(root, config["Infer"]["PostProcess"]["class_id_map_file"])
    options = {
        "Global.device": "cpu",
        "Global.pretrained_model": null,
        "Global.output_dir": str(output_dir),
        "Infer.infer_imgs": str(images),
        "Infer.save_dir": str(save_dir),
        "Infer.transforms.1.ResizeImage.resize_short": str(CROP_SIZE),
        "Infer.transforms.2.CropImage.size": str(CROP_SIZE),
        "Infer.PostProcess.class_id_map_file": label_file,
        "MCDropout.enable": "True",
    }
    arguments = []
    for key, value in options.items():
        arguments += ["-o", f"{key}={value}"]
    return arguments


def _run(command, cwd):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"{' '.join(command)}\nstdout:\n{result.stdout[-3000:]}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")
    return result


def _check_outputs(save_dir, model_name, label_file):
    with open(save_dir / "predictions.jsonl", encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    with open(save_dir / "summary.json", encoding="utf-8") as file:
        summary = json.load(file)
    with open(label_file, encoding="utf-8") as file:
        label_names = {line.strip().split(" ", 1)[1] for line in file if line.strip()}

    assert len(records) == len(IMAGE_SIZES)
    for record in records:
        assert "error" not in record, record
        assert len(record["class_ids"]) == 5
        assert all(0 <= class_id < 1000 for class_id in record["class_ids"])
        assert set(record["label_names"]) <= label_names
        assert record["scores"] == sorted(record["scores"], reverse=True)
        assert sum(record["scores"]) <= 1.0 + 1e-4
        for measure in ("predictive_entropy", "expected_entropy", "mutual_information",
                        "variation_ratio", "std"):
            assert np.isfinite(record[measure]), (measure, record)

    assert summary["mode"] == "mc_dropout"
    assert summary["model"] == model_name
    assert summary["samples"] == 30
    assert summary["predicted"] == len(IMAGE_SIZES)
    assert summary["stochastic_layers"], summary


def _pth_installed():
    directories = site.getsitepackages() + [site.getusersitepackages()]
    return any(os.path.isfile(os.path.join(directory, PTH_NAME)) for directory in directories)


@pytest.mark.parametrize("relative_path", list(CONFIGS))
def test_checkout_tools_infer(relative_path, images, tmp_path):
    root = _checkout_root()
    if not _pth_installed():
        pytest.fail(f"{PTH_NAME} is not installed in site-packages. Reinstall paddleclas-mc "
                    "(pip install -e . or pip install .) so that its build backend adds it.")
    config_path = os.path.join(root, "ppcls", "configs", "ImageNet", relative_path)
    save_dir = tmp_path / "predictions"
    command = [sys.executable, os.path.join(root, "tools", "infer.py"), "-c", config_path,
               *_overrides(root, config_path, images, save_dir, tmp_path / "output", "None")]
    _run(command, cwd=tmp_path)

    label_file = os.path.join(root, "ppcls", "utils", "imagenet1k_label_list.txt")
    _check_outputs(save_dir, CONFIGS[relative_path], label_file)
    assert (tmp_path / "output" / "infer.log").is_file()


@pytest.mark.parametrize("relative_path", list(CONFIGS))
def test_paddleclas_mc_infer(relative_path, images, tmp_path):
    root = _checkout_root()
    config_path = os.path.join(root, "ppcls", "configs", "ImageNet", relative_path)
    save_dir = tmp_path / "predictions"
    command = [sys.executable, "-m", "paddleclas_mc", "infer", "-c", config_path,
               *_overrides(root, config_path, images, save_dir, tmp_path / "output", "null")]
    _run(command, cwd=tmp_path)

    label_file = os.path.join(root, "ppcls", "utils", "imagenet1k_label_list.txt")
    _check_outputs(save_dir, CONFIGS[relative_path], label_file)


def test_config_without_dropout_rejected(images, tmp_path):
    # ResNet50_vd has neither dropout nor DropPath, so MC Dropout has
    # nothing to sample and paddleclas-mc exits with the ways out.
    root = _checkout_root()
    config_path = os.path.join(root, "ppcls", "configs", "ImageNet", "ResNet",
                               "ResNet50_vd.yaml")
    command = [sys.executable, "-m", "paddleclas_mc", "infer", "-c", config_path,
               *_overrides(root, config_path, images, tmp_path / "predictions",
                           tmp_path / "output", "null")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "ResNet has nothing stochastic to sample" in result.stderr
    assert not (tmp_path / "predictions" / "predictions.jsonl").exists()
