"""Exported inference models: MC Dropout inside the graph, and PaddleClas's single pass.

The small-network tests export ``conftest.SmallNet`` and relatives with an
input of ``[3, 8, 8]``. The demo tests export the bundled digits model once per
module and compare the exported model, run by a ``paddle.inference``
predictor, with dygraph inference on a subset of the held-out digits.
"""

import json
import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from conftest import SmallNet
from paddleclas_mc import integration
from paddleclas_mc.cli import main
from paddleclas_mc.config import load_config
from paddleclas_mc.dataset import ImageFolderDataset, list_images
from paddleclas_mc.dropout import NoStochasticLayerError
from paddleclas_mc.engine import build_inference_model, run_infer
from paddleclas_mc.export import (LOG_PROB_FLOOR, export_mc_model, export_single_pass_model,
                                  mc_outputs, run_export)
from paddleclas_mc.predictor import (METADATA_FILE, OUTPUT_NAMES, InferenceModel,
                                     run_predict)
from paddleclas_mc.sampling import MCSampler, single_pass
from paddleclas_mc.uncertainty import MEASURES, summarize_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join("configs", "demo", "mc_digits.yaml")
PLAIN_CONFIG = os.path.join("configs", "demo", "digits.yaml")
TEST_IMAGES = os.path.join(ROOT, "demo", "digits", "images", "test")
SMALL_SHAPE = [3, 8, 8]
DEMO_SHAPE = "Global.image_shape=[3,32,32]"


def _images(count=4, seed=1):
    return np.random.RandomState(seed).standard_normal([count] + SMALL_SHAPE).astype(np.float32)


def _run_twice(model_dir, images):
    model = InferenceModel(model_dir)
    return model.run(images), model.run(images)


def _read_jsonl(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


class ResidualDropoutNet(paddle.nn.Layer):
    """Dropout inside a residual branch, which the prefix strategy cannot split."""

    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.pool = paddle.nn.AdaptiveAvgPool2D(1)
        self.dropout = paddle.nn.Dropout(0.5)
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x):
        features = self.pool(self.conv(x)).flatten(1)
        return self.fc(features + self.dropout(features))


class TwiceDropoutNet(paddle.nn.Layer):
    """One dropout layer called twice in a forward."""

    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.pool = paddle.nn.AdaptiveAvgPool2D(1)
        self.dropout = paddle.nn.Dropout(0.3)
        self.hidden = paddle.nn.Linear(8, 8)
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x):
        features = self.dropout(self.pool(self.conv(x)).flatten(1))
        return self.fc(self.dropout(F.relu(self.hidden(features))))


class FeatureNet(paddle.nn.Layer):
    """A stochastic layer on the 4-D feature map or the pooled features: [B, 3, 8, 8] to [B, 4]."""

    def __init__(self, stochastic, on_map):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.stochastic = stochastic
        self.on_map = on_map
        self.pool = paddle.nn.AdaptiveAvgPool2D(1)
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x)
        if self.on_map:
            return self.fc(self.pool(self.stochastic(x)).flatten(1))
        return self.fc(self.stochastic(self.pool(x).flatten(1)))


class FunctionalDropoutBlock(paddle.nn.Layer):
    """A linear layer followed by ``F.dropout`` driven by the block's own training flag."""

    def __init__(self):
        super().__init__()
        self.linear = paddle.nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.linear(x), p=0.5, training=self.training)


class FunctionalNet(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.pool = paddle.nn.AdaptiveAvgPool2D(1)
        self.block = FunctionalDropoutBlock()
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.block(self.pool(self.conv(x)).flatten(1)))


def _trained(net):
    paddle.seed(0)
    net.eval()
    return net


class TestGraphMeasures:
    def test_dygraph_matches_summarize_samples(self):
        logits = np.random.RandomState(0).standard_normal([7, 5, 6]) * 4
        probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
        probs[:, 0] = np.eye(6)[2]  # one-hot rows: 0 log 0 terms
        probs = probs.astype(np.float32)

        outputs = [value.numpy() for value in mc_outputs(paddle.to_tensor(probs))]
        mean, measures = summarize_samples(probs)

        np.testing.assert_allclose(outputs[0], mean, atol=1e-6)
        np.testing.assert_allclose(outputs[1], np.log(np.maximum(mean, LOG_PROB_FLOOR)),
                                   rtol=1e-5, atol=1e-4)
        for index, name in enumerate(MEASURES, start=2):
            np.testing.assert_allclose(outputs[index], measures[name], atol=2e-6,
                                       err_msg=name)

    def test_predictor_matches_summarize_samples(self, tmp_path):
        # Paddle Inference may run ops in place; each output must keep its value.
        class Measures(paddle.nn.Layer):
            def __init__(self):
                super().__init__()
                # jit.save writes inference.pdiparams only for a model with parameters.
                self.scale = self.create_parameter(
                    [1], default_initializer=paddle.nn.initializer.Constant(1.0))

            def forward(self, logits):
                return mc_outputs(F.softmax(logits * self.scale, axis=-1))

        spec = paddle.static.InputSpec([5, None, 6], "float32")
        paddle.jit.save(paddle.jit.to_static(Measures(), input_spec=[spec]),
                        str(tmp_path / "inference"))
        logits = (np.random.RandomState(1).standard_normal([5, 3, 6]) * 3).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)

        outputs = InferenceModel(str(tmp_path)).run(logits)
        mean, measures = summarize_samples(probs)

        np.testing.assert_allclose(outputs[0], mean, atol=1e-6)
        np.testing.assert_allclose(outputs[1], np.log(mean), atol=1e-5)
        for index, name in enumerate(MEASURES, start=2):
            np.testing.assert_allclose(outputs[index], measures[name], atol=2e-6,
                                       err_msg=name)


class TestMCExportSmallNet:
    @pytest.fixture
    def exported(self, small_net, tmp_path):
        metadata = export_mc_model(small_net, str(tmp_path), SMALL_SHAPE, samples=8)
        return str(tmp_path), metadata

    def test_metadata(self, exported):
        model_dir, metadata = exported
        with open(os.path.join(model_dir, METADATA_FILE), encoding="utf-8") as file:
            assert json.load(file) == metadata
        assert metadata["samples"] == 8
        assert metadata["strategy"] == "prefix"
        assert metadata["split_layer"] == "dropout"
        assert metadata["seed_policy"] == "fresh_masks_each_run"
        assert metadata["num_classes"] == 4
        assert [output["name"] for output in metadata["outputs"]] == list(OUTPUT_NAMES)
        assert metadata["stochastic_layers"] == [{"name": "dropout", "kind": "dropout",
                                                  "rate": 0.5}]

    def test_no_dropout_op_left(self, exported):
        model_dir, _ = exported
        with open(os.path.join(model_dir, "inference.json"), encoding="utf-8") as file:
            program = file.read()
        assert '"1.dropout"' not in program
        assert '"1.uniform"' in program

    def test_runs_draw_fresh_masks(self, exported):
        model_dir, _ = exported
        first, second = _run_twice(model_dir, _images())
        assert not np.array_equal(first[0], second[0])
        assert (first[OUTPUT_NAMES.index("mutual_information")] > 0).any()

    def test_output_shapes_and_ranges(self, exported):
        model_dir, _ = exported
        outputs = dict(zip(OUTPUT_NAMES, InferenceModel(model_dir).run(_images(5))))
        assert outputs["probs"].shape == (5, 4)
        np.testing.assert_allclose(outputs["probs"].sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(F.softmax(paddle.to_tensor(outputs["log_probs"])).numpy(),
                                   outputs["probs"], atol=1e-6)
        for name in MEASURES:
            assert outputs[name].shape == (5,), name
            assert outputs[name].dtype == np.float32, name
            assert (outputs[name] >= 0).all(), name
        assert (outputs["variation_ratio"] <= 1 - 1 / 8 + 1e-6).all()

    def test_mean_converges_to_dygraph_mc(self, small_net, tmp_path):
        samples = 400
        export_mc_model(small_net, str(tmp_path), SMALL_SHAPE, samples=samples)
        images = _images(3)
        exported = InferenceModel(str(tmp_path)).predict(images)[0]

        dygraph = MCSampler(small_net, samples=samples).sample(paddle.to_tensor(images), seed=3)
        # Both are means of 400 independent passes, so their difference has a
        # standard error of sqrt(2) * std / sqrt(400); allow 5 of those.
        tolerance = 5 * np.sqrt(2) * dygraph.std(axis=0) / np.sqrt(samples) + 1e-4
        difference = np.abs(exported - dygraph.mean(axis=0))
        assert (difference <= tolerance).all(), (difference, tolerance)

    def test_model_left_as_it_was(self, small_net, tmp_path):
        state = {key: value.numpy().copy() for key, value in small_net.state_dict().items()}
        export_mc_model(small_net, str(tmp_path), SMALL_SHAPE, samples=4)

        assert all(not layer.training for layer in [small_net] + small_net.sublayers())
        assert "forward" not in small_net.dropout.__dict__
        assert not small_net.dropout._forward_pre_hooks
        for key, value in small_net.state_dict().items():
            np.testing.assert_array_equal(value.numpy(), state[key])

    def test_residual_dropout_falls_back_to_tiled(self, tmp_path):
        metadata = export_mc_model(_trained(ResidualDropoutNet()), str(tmp_path), SMALL_SHAPE,
                                   samples=6)
        assert metadata["strategy"] == "tiled"
        assert "prefix ruled out" in metadata["strategy_reason"]
        first, second = _run_twice(str(tmp_path), _images())
        assert first[0].shape == (4, 4)
        assert not np.array_equal(first[0], second[0])

    def test_explicit_prefix_rejected_for_residual_dropout(self, tmp_path):
        with pytest.raises(ValueError, match="prefix cannot be exported"):
            export_mc_model(_trained(ResidualDropoutNet()), str(tmp_path), SMALL_SHAPE,
                            samples=4, strategy="prefix")

    def test_loop_strategy_exports_tiled(self, small_net, tmp_path):
        metadata = export_mc_model(small_net, str(tmp_path), SMALL_SHAPE, samples=4,
                                   strategy="loop")
        assert metadata["strategy"] == "tiled"
        assert metadata["split_layer"] is None

    def test_layer_called_twice_tiled_once(self, tmp_path):
        net = _trained(TwiceDropoutNet())
        metadata = export_mc_model(net, str(tmp_path), SMALL_SHAPE, samples=5)
        assert metadata["strategy"] == "prefix"
        # Tiling the second call as well would give T * T * B rows, so 5 * 3 here.
        outputs = InferenceModel(str(tmp_path)).run(_images(3))
        assert outputs[0].shape == (3, 4)

    def test_no_stochastic_layer_rejected(self, tmp_path):
        net = _trained(SmallNet(p=0.0))
        with pytest.raises(NoStochasticLayerError):
            export_mc_model(net, str(tmp_path), SMALL_SHAPE, samples=4)
        assert not os.listdir(tmp_path)


@pytest.mark.parametrize("build, on_map", [
    (lambda: paddle.nn.Dropout(0.4, mode="downscale_in_infer"), False),
    (lambda: paddle.nn.Dropout(0.4, axis=1), False),
    (lambda: paddle.nn.Dropout2D(0.4), True),
    (lambda: paddle.nn.Dropout3D(0.4), True),
    (lambda: paddle.nn.AlphaDropout(0.4), False),
    (lambda: paddle.nn.FeatureAlphaDropout(0.4), True),
], ids=["downscale", "axis", "dropout2d", "dropout3d", "alpha", "feature_alpha"])
def test_dropout_types_stay_stochastic(build, on_map, tmp_path):
    stochastic = build()
    if isinstance(stochastic, paddle.nn.Dropout3D):
        net = _trained(paddle.nn.Sequential(
            paddle.nn.Conv3D(1, 4, 3, padding=1), stochastic,
            paddle.nn.AdaptiveAvgPool3D(1), paddle.nn.Flatten(), paddle.nn.Linear(4, 4)))
        shape = [1, 4, 4, 4]
    else:
        net = _trained(FeatureNet(stochastic, on_map))
        shape = SMALL_SHAPE
    images = np.random.RandomState(2).standard_normal([3] + shape).astype(np.float32)

    export_mc_model(net, str(tmp_path), shape, samples=200)
    first, second = _run_twice(str(tmp_path), images)

    assert not np.array_equal(first[0], second[0])
    # The mean over 200 passes stays within 0.1 of the eval pass, as in dygraph,
    # except for alpha dropout, which is not unbiased for inputs that are not
    # standardized.
    if not isinstance(stochastic, (paddle.nn.AlphaDropout, paddle.nn.FeatureAlphaDropout)):
        reference = single_pass(net, paddle.to_tensor(images))
        np.testing.assert_allclose(first[0], reference, atol=0.1)


def test_functional_dropout_owner_stays_stochastic(tmp_path):
    original = F.dropout
    net = _trained(FunctionalNet())
    metadata = export_mc_model(net, str(tmp_path), SMALL_SHAPE, samples=6,
                               functional_dropout=["block"])
    assert metadata["stochastic_layers"][0]["kind"] == "functional_dropout"
    first, second = _run_twice(str(tmp_path), _images())
    assert not np.array_equal(first[0], second[0])
    assert F.dropout is original


class TestSinglePassExport:
    def test_matches_dygraph_single_pass(self, small_net, tmp_path):
        export_single_pass_model(small_net, str(tmp_path), SMALL_SHAPE)
        model = InferenceModel(str(tmp_path))
        images = _images(6)

        probs, measures = model.predict(images)
        assert measures is None
        assert not model.is_mc
        assert not os.path.exists(tmp_path / METADATA_FILE)
        np.testing.assert_allclose(probs, single_pass(small_net, paddle.to_tensor(images)),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(probs, model.predict(images)[0])


# The digits demo, exported once for this module.


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Export the demo model with and without MC Dropout; list a subset of the held-out digits."""
    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        base = tmp_path_factory.mktemp("demo_export")
        paths = list_images(TEST_IMAGES).paths[::5]
        image_list = base / "images.txt"
        image_list.write_text("".join(path + "\n" for path in paths), encoding="utf-8")

        mc_dir, plain_dir = str(base / "mc"), str(base / "plain")
        mc = run_export(load_config(MC_CONFIG, [DEMO_SHAPE, f"Global.save_inference_dir={mc_dir}",
                                                "MCDropout.samples=20"]))
        run_export(load_config(PLAIN_CONFIG, [DEMO_SHAPE,
                                              f"Global.save_inference_dir={plain_dir}"]))
        yield {"base": base, "mc_dir": mc_dir, "plain_dir": plain_dir, "paths": paths,
               "image_list": str(image_list), "metadata": mc["metadata"]}
    finally:
        os.chdir(previous)


@pytest.fixture
def in_root(monkeypatch):
    # The demo configs use paths relative to the repository root.
    monkeypatch.chdir(ROOT)


def _demo_overrides(demo, save_dir, seed):
    return [f"Infer.infer_imgs={demo['image_list']}", f"Infer.save_dir={save_dir}",
            "Infer.num_workers=0", "Infer.batch_size=16", "MCDropout.samples=20",
            f"MCDropout.seed={seed}", f"Global.inference_model_dir={demo['mc_dir']}"]


def _demo_images(demo):
    config = load_config(PLAIN_CONFIG)
    dataset = ImageFolderDataset(demo["paths"], config["Infer"]["transforms"])
    return np.stack([dataset[index]["image"] for index in range(len(demo["paths"]))])


@pytest.mark.usefixtures("in_root")
class TestDemo:
    def test_metadata(self, demo):
        metadata = demo["metadata"]
        assert metadata["samples"] == 20
        assert metadata["strategy"] == "prefix"
        assert metadata["arch"] == "PPLCNet_x0_25"
        assert metadata["num_classes"] == 10
        assert metadata["image_shape"] == [3, 32, 32]
        assert sorted(os.listdir(demo["mc_dir"])) == ["inference.json", "inference.pdiparams",
                                                      METADATA_FILE]
        assert sorted(os.listdir(demo["plain_dir"])) == ["inference.json",
                                                         "inference.pdiparams"]

    def test_single_pass_export_matches_dygraph(self, demo):
        images = _demo_images(demo)
        model = build_inference_model(load_config(PLAIN_CONFIG))
        expected = single_pass(model, paddle.to_tensor(images))

        probs, _ = InferenceModel(demo["plain_dir"]).predict(images)

        np.testing.assert_array_equal(probs.argmax(axis=1), expected.argmax(axis=1))
        # Paddle Inference runs other kernels than dygraph, so the values
        # agree to float32 rounding rather than bit for bit.
        np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-5)

    def test_mc_export_agrees_with_dygraph_mc(self, demo):
        base = demo["base"]
        predicted = run_predict(load_config(MC_CONFIG, _demo_overrides(
            demo, str(base / "predict"), 1)))
        assert predicted["predicted"] == len(demo["paths"])
        exported = _read_jsonl(base / "predict" / "predictions.jsonl")
        dygraph = []
        for seed in (2, 3):
            save_dir = str(base / f"dygraph_{seed}")
            run_infer(load_config(MC_CONFIG, _demo_overrides(demo, save_dir, seed)))
            dygraph.append(_read_jsonl(os.path.join(save_dir, "predictions.jsonl")))

        assert [record["file_name"] for record in exported] == demo["paths"]
        assert [list(record) for record in exported] == [list(record) for record in dygraph[0]]
        agree = np.mean([a["class_ids"][0] == b["class_ids"][0]
                         for a, b in zip(exported, dygraph[0])])
        assert agree >= 0.97

        # Two dygraph runs with other seeds give the Monte Carlo error; the
        # export may differ from dygraph by about as much, not more.
        for name in ("predictive_entropy", "mutual_information", "std"):
            export_values = np.array([record[name] for record in exported])
            first, second = (np.array([record[name] for record in run]) for run in dygraph)
            mc_error = np.abs(first - second).mean()
            assert np.abs(export_values - first).mean() <= 3 * mc_error + 1e-5, name

    def test_predict_same_seed_same_records(self, demo):
        outputs = []
        for run in ("a", "b"):
            save_dir = demo["base"] / f"seeded_{run}"
            run_predict(load_config(MC_CONFIG, _demo_overrides(demo, str(save_dir), 7)))
            outputs.append((save_dir / "predictions.jsonl").read_bytes())
        assert outputs[0] == outputs[1]

    def test_deploy_topk_reads_mc_mean(self, demo):
        # PaddleClas's deploy ClsPredictor feeds its first output, unchanged,
        # to its Topk, which takes probabilities.
        images = _demo_images(demo)[:8]
        outputs = dict(zip(OUTPUT_NAMES, InferenceModel(demo["mc_dir"]).run(images)))
        np.testing.assert_allclose(outputs["probs"].sum(axis=1), 1.0, atol=1e-5)

        records = integration.Topk(topk=3)(outputs["probs"])
        assert [record["class_ids"][0] for record in records] == \
            outputs["probs"].argmax(axis=1).tolist()
        np.testing.assert_allclose([record["scores"][0] for record in records],
                                   outputs["probs"].max(axis=1), atol=1e-5)

    def test_predict_cli_writes_summary(self, demo):
        save_dir = demo["base"] / "cli"
        status = main(["predict", "-c", MC_CONFIG, *sum(
            (["-o", option] for option in _demo_overrides(demo, str(save_dir), 4)), [])])
        assert status == 0
        summary = json.loads((save_dir / "summary.json").read_text(encoding="utf-8"))
        assert summary["mode"] == "mc_dropout_exported"
        assert summary["samples"] == 20
        assert summary["predicted"] == len(demo["paths"])

    def test_plain_export_predicts_without_measures(self, demo):
        save_dir = demo["base"] / "plain_predict"
        overrides = _demo_overrides(demo, str(save_dir), 0)
        overrides[-1] = f"Global.inference_model_dir={demo['plain_dir']}"
        summary = run_predict(load_config(PLAIN_CONFIG, overrides))
        records = _read_jsonl(save_dir / "predictions.jsonl")
        assert summary["mode"] == "single_pass_exported"
        assert list(records[0]) == ["class_ids", "scores", "file_name", "label_names"]


@pytest.mark.usefixtures("in_root")
class TestExportErrors:
    def test_missing_image_shape(self, capsys):
        assert main(["export", "-c", MC_CONFIG]) == 2
        assert "Global.image_shape" in capsys.readouterr().err

    def test_multilabel_rejected_with_mc(self, tmp_path, capsys):
        status = main(["export", "-c", MC_CONFIG, "-o", DEMO_SHAPE,
                       "-o", f"Global.save_inference_dir={tmp_path}",
                       "-o", "Global.use_multilabel=True"])
        assert status == 2
        assert "sigmoid outputs" in capsys.readouterr().err

    def test_predict_missing_model_dir(self, tmp_path, capsys):
        status = main(["predict", "-c", MC_CONFIG, "-o",
                       f"Global.inference_model_dir={tmp_path}"])
        assert status == 2
        assert "has no inference.json" in capsys.readouterr().err


def test_plain_export_identical_to_paddleclas(tmp_path, in_root):
    """Byte-for-byte against a checkout's tools/export_model.py (PADDLECLAS_ROOT)."""
    checkout = os.environ.get("PADDLECLAS_ROOT")
    if not checkout:
        pytest.skip("PADDLECLAS_ROOT is not set. Set it to a PaddleClas source checkout "
                    "to compare the export with PaddleClas's tools/export_model.py.")
    script = os.path.join(checkout, "tools", "export_model.py")
    if not os.path.isfile(script):
        pytest.fail(f"PADDLECLAS_ROOT={checkout!r} has no tools/export_model.py.")

    theirs, ours = tmp_path / "paddleclas", tmp_path / "ours"
    process = subprocess.run(
        [sys.executable, script, "-c", PLAIN_CONFIG, "-o", f"Global.save_inference_dir={theirs}",
         "-o", "Global.image_shape=[3,32,32]", "-o", "Global.epochs=1",
         "-o", "Global.use_visualdl=False", "-o", "Global.eval_during_train=False",
         "-o", "Global.print_batch_step=10"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    run_export(load_config(PLAIN_CONFIG, [DEMO_SHAPE, f"Global.save_inference_dir={ours}"]))

    assert sorted(os.listdir(theirs)) == sorted(os.listdir(ours))
    for name in os.listdir(theirs):
        assert (theirs / name).read_bytes() == (ours / name).read_bytes(), name
