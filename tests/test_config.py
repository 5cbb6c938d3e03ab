import datetime

import pytest

from paddleclas_mc.config import (apply_overrides, load_config, parse_infer_section,
                                  parse_mc_section, path_value)


class TestMCSection:
    def test_absent_section_disabled(self):
        mc = parse_mc_section({})
        assert mc.enable is False
        assert mc.samples == 30

    def test_values_kept(self):
        mc = parse_mc_section({"MCDropout": {"enable": True, "samples": 50, "seed": 7,
                                             "strategy": "tiled", "max_batch": 16,
                                             "drop_path": True,
                                             "functional_dropout": ["blocks.*.attn"]}})
        assert (mc.samples, mc.seed, mc.strategy, mc.max_batch) == (50, 7, "tiled", 16)
        assert mc.functional_dropout == ("blocks.*.attn",)

    def test_unknown_key_rejected(self):
        with pytest.raises(ValueError, match="unknown key.*sample_count.*Allowed keys"):
            parse_mc_section({"MCDropout": {"sample_count": 10}})

    @pytest.mark.parametrize("key, value", [
        ("samples", 1), ("samples", 2.5), ("samples", True), ("seed", -1), ("seed", "7"),
        ("strategy", "fast"), ("max_batch", 0), ("enable", "yes"), ("enable", 1),
        ("drop_path", None), ("functional_dropout", "blocks.0"),
        ("functional_dropout", [""]),
    ])
    def test_invalid_value_rejected(self, key, value):
        with pytest.raises(ValueError, match=rf"MCDropout\.{key}: invalid value"):
            parse_mc_section({"MCDropout": {key: value}})


class TestOverrides:
    def test_values_parsed_as_yaml(self):
        config = {"Global": {"device": "gpu"}}
        apply_overrides(config, ["MCDropout.enable=True", "MCDropout.samples=50",
                                 "MCDropout.seed=null", "Global.device=cpu",
                                 "Metric.topk=[1, 5]"])
        assert config["MCDropout"] == {"enable": True, "samples": 50, "seed": None}
        assert config["Global"]["device"] == "cpu"
        assert config["Metric"]["topk"] == [1, 5]

    def test_value_with_equals_sign(self):
        config = {}
        apply_overrides(config, ["Infer.infer_imgs=a=b.jpg"])
        assert config["Infer"]["infer_imgs"] == "a=b.jpg"

    def test_no_eval_of_values(self):
        config = {}
        apply_overrides(config, ["Global.device=open"])
        assert config["Global"]["device"] == "open"

    def test_list_index(self):
        config = {"Infer": {"transforms": [{"DecodeImage": None}, {"ResizeImage": {"size": 32}}]}}
        apply_overrides(config, ["Infer.transforms.1.ResizeImage.size=64"])
        assert config["Infer"]["transforms"][1]["ResizeImage"]["size"] == 64

    def test_list_index_out_of_range(self):
        config = {"Infer": {"transforms": [{"DecodeImage": None}]}}
        with pytest.raises(ValueError, match="must index a list of 1 items"):
            apply_overrides(config, ["Infer.transforms.3.ResizeImage.size=64"])

    def test_missing_equals_sign(self):
        with pytest.raises(ValueError, match="expected Section.key=value"):
            apply_overrides({}, ["MCDropout.enable"])


class TestInferSection:
    base = {"Infer": {"infer_imgs": "images/", "batch_size": 4,
                      "transforms": [{"DecodeImage": None}],
                      "PostProcess": {"name": "Topk", "topk": 5,
                                      "class_id_map_file": "labels.txt"}}}

    def test_valid_section(self):
        infer = parse_infer_section(self.base)
        assert (infer.batch_size, infer.topk, infer.class_id_map_file) == (4, 5, "labels.txt")

    @pytest.mark.parametrize("key, value, message", [
        ("batch_size", 0, "Infer.batch_size"),
        ("infer_imgs", None, "Infer.infer_imgs"),
        ("transforms", [], "Infer.transforms"),
        ("PostProcess", {"name": "ThreshOutput"}, "Infer.PostProcess.name"),
        ("PostProcess", {"name": "Topk", "topk": 0}, "Infer.PostProcess.topk"),
        ("PostProcess", {"name": "Topk", "threshold": 0.5}, "Infer.PostProcess"),
    ])
    def test_invalid_section(self, key, value, message):
        config = {"Infer": dict(self.base["Infer"], **{key: value})}
        with pytest.raises(ValueError, match=message):
            parse_infer_section(config)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("Global:\n  device: gpu\nNormalize:\n  scale: 1.0/255.0\n")
    config = load_config(str(path), ["Global.device=cpu"])
    assert config["Global"]["device"] == "cpu"
    assert config["Normalize"]["scale"] == "1.0/255.0"


@pytest.mark.parametrize("raw, expected", [
    ("50", 50), ("-3", -3), ("0", 0), ("2.5", 2.5), ("1e-3", 0.001), ("True", True),
    ("false", False), ("null", None), ("~", None), ("", None), ("[1, 5]", [1, 5]),
    ("{size: 64}", {"size": 64}), ("'010'", "010"),
    ("0x10", "0x10"), ("010", "010"), ("1_000", "1_000"), ("1:30", "1:30"),
    ("yes", "yes"), ("off", "off"), ("2024-01-01", "2024-01-01"),
    ("images/my #1 folder", "images/my #1 folder"), ("a: b", "a: b"),
    ("[2024-01-01, 0x10]", ["2024-01-01", "0x10"]),
])
def test_override_value_types(raw, expected):
    config = {}
    apply_overrides(config, [f"Section.key={raw}"])
    assert config["Section"]["key"] == expected, raw


@pytest.mark.parametrize("value, expected", [
    ("images", "images"), (2024, "2024"), (datetime.date(2024, 1, 1), "2024-01-01"), (None, None),
])
def test_path_value_converts(value, expected):
    assert path_value(value, "Infer.save_dir") == expected


@pytest.mark.parametrize("value", [True, 1.5, ["a"], {"a": 1}])
def test_path_value_rejects(value):
    with pytest.raises(ValueError, match="Infer.save_dir: invalid value"):
        path_value(value, "Infer.save_dir")


def test_infer_resume_parsed():
    section = dict(TestInferSection.base["Infer"], save_dir="out", resume=True)
    assert parse_infer_section({"Infer": section}).resume is True
    assert parse_infer_section(TestInferSection.base).resume is None


def test_infer_unknown_key_warns(caplog):
    import logging
    section = dict(TestInferSection.base["Infer"], infer_img="typo/")
    with caplog.at_level(logging.WARNING):
        parse_infer_section({"Infer": section})
    assert "Infer.infer_img is not read" in caplog.text
    assert "did you mean Infer.infer_imgs?" in caplog.text


def test_override_none_is_null():
    config = {}
    apply_overrides(config, ["Global.pretrained_model=None", "Global.name=Nonesuch"])
    assert config["Global"]["pretrained_model"] is None
    assert config["Global"]["name"] == "Nonesuch"
