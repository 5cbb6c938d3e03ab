import pytest

from paddleclas_mc.config import (apply_overrides, load_config, parse_infer_section,
                                  parse_mc_section)


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
