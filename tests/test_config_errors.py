"""Configuration errors from ``paddleclas_mc.cli``: exit status 2, one line naming the key, no image read."""

import json
import os

import paddle
import pytest
import yaml

from paddleclas_mc import engine
from paddleclas_mc.cli import main
from paddleclas_mc.config import load_config
from paddleclas_mc.dataset import ImageFolderDataset
from paddleclas_mc.engine import run_infer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join(ROOT, "configs", "demo", "mc_digits.yaml")
CHECKPOINT = os.path.join(ROOT, "demo", "model", "PPLCNet_x0_25_digits")
LABELS = os.path.join(ROOT, "demo", "digits", "label_list.txt")
THREES = os.path.join(ROOT, "demo", "digits", "images", "test", "3")


@pytest.fixture(autouse=True)
def repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture
def no_image_access(monkeypatch):
    """Fail the test if the run lists Infer.infer_imgs or reads an image."""
    def fail_listing(*args, **kwargs):
        raise AssertionError(f"listed {args[0]!r} before the configuration error")

    def fail_read(self, path):
        raise AssertionError(f"read {path!r} before the configuration error")

    monkeypatch.setattr(engine, "list_images", fail_listing)
    monkeypatch.setattr(ImageFolderDataset, "_load_image", fail_read)


def run_cli(capsys, *overrides, config=MC_CONFIG):
    """Run ``infer`` through the CLI; return ``(exit status, stderr's last line)``."""
    arguments = ["infer", "-c", config]
    for override in overrides:
        arguments += ["-o", override]
    status = main(arguments)
    lines = capsys.readouterr().err.strip().splitlines()
    return status, lines[-1] if lines else ""


def assert_config_error(status, message, key, *fragments):
    assert status == 2, message
    assert message.startswith(f"error: {key}"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def write_config(tmp_path, edit):
    """Write the demo config after ``edit(config)`` to a file; return its path."""
    with open(MC_CONFIG, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    for section in ("Global", "Infer", "DataLoader"):
        config[section] = json.loads(json.dumps(config[section]).replace(
            '"demo/', f'"{ROOT}/demo/'))
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


class TestCheckpoint:
    def test_missing_checkpoint(self, capsys, no_image_access, tmp_path):
        status, message = run_cli(capsys, f"Global.pretrained_model={tmp_path / 'none'}")
        assert_config_error(status, message, "Global.pretrained_model", "none.pdparams",
                            "not found")

    def test_wrong_class_count(self, capsys, no_image_access):
        status, message = run_cli(capsys, "Arch.class_num=12")
        assert_config_error(status, message, "Global.pretrained_model", "does not fit Arch",
                            "model [1280, 12]")

    def test_class_num_absent(self, capsys, no_image_access, tmp_path):
        config = write_config(tmp_path, lambda config: config["Arch"].pop("class_num"))
        status, message = run_cli(capsys, config=config)
        assert_config_error(status, message, "Global.pretrained_model", "does not fit Arch",
                            "model [1280, 1000]")

    @pytest.mark.parametrize("name", ["PPLCNet_x0_35", "ResNet18", "MobileNetV3_small_x0_35"])
    def test_wrong_architecture(self, capsys, no_image_access, name):
        status, message = run_cli(capsys, f"Arch.name={name}")
        assert_config_error(status, message, "Global.pretrained_model", "does not fit Arch")

    def test_unknown_architecture(self, capsys, no_image_access):
        status, message = run_cli(capsys, "Arch.name=NoSuchNet")
        assert_config_error(status, message, "Arch", "NoSuchNet")

    def test_extra_parameters(self, capsys, no_image_access, tmp_path):
        state = paddle.load(CHECKPOINT + ".pdparams")
        state["head.weight"] = paddle.zeros([4, 4])
        paddle.save(state, str(tmp_path / "extra.pdparams"))
        status, message = run_cli(capsys, f"Global.pretrained_model={tmp_path / 'extra'}")
        assert_config_error(status, message, "Global.pretrained_model",
                            "1 parameters the model lacks", "head.weight")


class TestLabelMap:
    @pytest.mark.parametrize("text, fragments", [
        ("0 zero\none 1\n", [":2:", "expected '<class id> <name>'"]),
        ("0 zero\n1\n", [":2:", "expected"]),
        ("0 zero\n-1 minus\n", [":2:", "non-negative class id"]),
        ("0 zero\n0 nought\n", [":2:", "listed twice"]),
        ("0 zero\n1 \n", [":2:", "empty name"]),
        ("\n\n", ["names no class"]),
        ("0 zero\n1 one\n", ["ids without a name: [2, 3, 4, 5, 6, 7, 8, 9]"]),
        ("".join(f"{i} d{i}\n" for i in range(11)), ["class ids [10]", "0 to 9"]),
    ], ids=["id_not_a_number", "no_name", "negative_id", "duplicate", "empty_name",
            "empty_file", "too_few", "too_many"])
    def test_malformed_or_incomplete(self, capsys, no_image_access, tmp_path, text, fragments):
        path = tmp_path / "labels.txt"
        path.write_text(text, encoding="utf-8")
        status, message = run_cli(capsys, f"Infer.PostProcess.class_id_map_file={path}")
        assert_config_error(status, message, "Infer.PostProcess.class_id_map_file",
                            str(path), *fragments)

    def test_not_utf8(self, capsys, no_image_access, tmp_path):
        path = tmp_path / "labels.txt"
        path.write_bytes("0 z\xe9ro\n".encode("latin-1"))
        status, message = run_cli(capsys, f"Infer.PostProcess.class_id_map_file={path}")
        assert_config_error(status, message, "Infer.PostProcess.class_id_map_file", "UTF-8")

    def test_byte_order_mark_accepted(self, tmp_path):
        path = tmp_path / "labels.txt"
        with open(LABELS, encoding="utf-8") as file:
            path.write_text("\ufeff" + file.read(), encoding="utf-8")
        config = load_config(MC_CONFIG, [f"Infer.infer_imgs={THREES}", "Infer.save_dir=null",
                                         f"Infer.PostProcess.class_id_map_file={path}",
                                         "MCDropout.samples=2", "Infer.num_workers=0"])
        assert run_infer(config)["predicted"] == len(os.listdir(THREES))

    def test_checked_against_model_output_without_class_num(self, capsys, no_image_access,
                                                            tmp_path):
        # Random weights, no Arch.class_num: PPLCNet's default head has 1000 classes.
        def edit(config):
            config["Arch"].pop("class_num")
            config["Global"]["pretrained_model"] = None

        status, message = run_cli(capsys, config=write_config(tmp_path, edit))
        assert_config_error(status, message, "Infer.PostProcess.class_id_map_file",
                            "names 10 classes but the model has 1000")

    def test_checked_on_first_batch_when_probe_fails(self, tmp_path, monkeypatch):
        def fail_probe(self, height=224, width=224):
            if height == 224:
                raise ValueError("Infer.transforms: probe failed for this test")
            return None

        monkeypatch.setattr(ImageFolderDataset, "probe", fail_probe)
        path = tmp_path / "labels.txt"
        path.write_text("0 zero\n1 one\n", encoding="utf-8")
        config = load_config(MC_CONFIG, [f"Infer.infer_imgs={THREES}",
                                         f"Infer.save_dir={tmp_path / 'out'}",
                                         f"Infer.PostProcess.class_id_map_file={path}",
                                         "MCDropout.samples=2", "Infer.num_workers=0"])
        with pytest.raises(ValueError, match="ids without a name: \\[2, 3"):
            run_infer(config)
        assert (tmp_path / "out" / "predictions.jsonl").read_bytes() == b""


class TestOverrides:
    def test_equals_sign_in_value_kept(self, capsys, no_image_access):
        status, message = run_cli(capsys, "Global.pretrained_model=a=b")
        assert_config_error(status, message, "Global.pretrained_model", "'a=b.pdparams'")

    @pytest.mark.parametrize("folder", ["2024-01-01", "010", "1:30", "2024"])
    def test_path_like_yaml_value_kept(self, capsys, tmp_path, monkeypatch, folder):
        images = tmp_path / folder
        images.mkdir()
        for name in sorted(os.listdir(THREES))[:3]:
            with open(os.path.join(THREES, name), "rb") as file:
                (images / name).write_bytes(file.read())
        monkeypatch.chdir(tmp_path)
        status, message = run_cli(capsys, f"Infer.infer_imgs={folder}", "Infer.save_dir=out",
                                  f"Global.pretrained_model={CHECKPOINT}",
                                  f"Infer.PostProcess.class_id_map_file={LABELS}",
                                  "MCDropout.samples=2", "Infer.num_workers=0")
        assert status == 0, message
        with open(tmp_path / "out" / "predictions.jsonl", encoding="utf-8") as file:
            names = [json.loads(line)["file_name"] for line in file]
        assert len(names) == 3
        assert all(name.startswith(folder + os.sep) for name in names), names

    def test_date_path_in_config_file_kept(self, tmp_path, monkeypatch):
        (tmp_path / "2024-01-01").mkdir()
        config_path = tmp_path / "config.yaml"
        config_path.write_text("Infer:\n  infer_imgs: 2024-01-01\n  transforms: [{DecodeImage: {}}]\n",
                               encoding="utf-8")
        from paddleclas_mc.config import parse_infer_section
        assert parse_infer_section(load_config(str(config_path))).infer_imgs == "2024-01-01"

    @pytest.mark.parametrize("override, key, value", [
        ("MCDropout.seed=0x10", "MCDropout.seed", "'0x10'"),
        ("MCDropout.seed=010", "MCDropout.seed", "'010'"),
        ("MCDropout.samples=1_000", "MCDropout.samples", "'1_000'"),
        ("MCDropout.samples=1:30", "MCDropout.samples", "'1:30'"),
        ("MCDropout.enable=yes", "MCDropout.enable", "'yes'"),
        ("MCDropout.enable=on", "MCDropout.enable", "'on'"),
        ("Infer.batch_size=0x10", "Infer.batch_size", "'0x10'"),
    ])
    def test_non_decimal_number_rejected(self, capsys, no_image_access, override, key, value):
        status, message = run_cli(capsys, override)
        assert_config_error(status, message, key, f"invalid value {value}")

    def test_invalid_yaml_value_one_line(self, capsys, no_image_access):
        status, message = run_cli(capsys, "Infer.batch_size=[1")
        assert_config_error(status, message, "-o 'Infer.batch_size=[1'", "not valid YAML")

    def test_missing_equals_sign(self, capsys, no_image_access):
        status, message = run_cli(capsys, "MCDropout.samples")
        assert_config_error(status, message, "-o 'MCDropout.samples'", "Section.key=value")


@pytest.mark.parametrize("key, value", [
    ("samples", "0"), ("samples", "1"), ("samples", "-3"), ("samples", "2.5"),
    ("max_batch", "0"), ("max_batch", "-1"), ("seed", "-1"), ("seed", "1.5"),
    ("strategy", "fast"), ("enable", "2"), ("drop_path", "maybe"),
    ("functional_dropout", "blocks.0"), ("functional_dropout", "['']"),
])
def test_out_of_range_mc_value(capsys, no_image_access, key, value):
    status, message = run_cli(capsys, f"MCDropout.{key}={value}")
    assert_config_error(status, message, f"MCDropout.{key}", "invalid value", "expected")


@pytest.mark.parametrize("override, key", [
    ("Infer.batch_size=0", "Infer.batch_size"),
    ("Infer.num_workers=-1", "Infer.num_workers"),
    ("Infer.resume=1", "Infer.resume"),
    ("Infer.PostProcess.topk=0", "Infer.PostProcess.topk"),
    ("Infer.PostProcess=Topk", "Infer.PostProcess"),
    ("Infer.infer_imgs=[a, b]", "Infer.infer_imgs"),
    ("Infer.transforms.1.ResizeImage.size=-5", "Infer.transforms"),
    ("Infer.transforms.1.ResizeImage.sizes=32", "Infer.transforms"),
])
def test_invalid_infer_value(capsys, no_image_access, override, key):
    status, message = run_cli(capsys, override)
    assert_config_error(status, message, key)


def test_config_file_errors(capsys, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text("Global: [\n", encoding="utf-8")

    for path, fragment in ((empty, "must hold a mapping"), (broken, "not valid YAML"),
                           (tmp_path, "cannot read config file"),
                           (tmp_path / "none.yaml", "not found")):
        status, message = run_cli(capsys, config=str(path))
        assert_config_error(status, message, "-c", str(path), fragment)
