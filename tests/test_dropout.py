import numpy as np
import paddle
import pytest

from conftest import SmallNet, trained_batch_norm
from paddleclas_mc.dropout import NoStochasticLayerError, find_stochastic_layers, mc_dropout


def _snapshot(model):
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


class TestFindStochasticLayers:
    def test_dropout_found(self, small_net):
        found = find_stochastic_layers(small_net)
        assert [item.name for item in found] == ["dropout"]
        assert found[0].kind == "dropout"
        assert found[0].rate == 0.5

    @pytest.mark.parametrize("layer_type", [paddle.nn.Dropout2D, paddle.nn.Dropout3D,
                                            paddle.nn.AlphaDropout, paddle.nn.FeatureAlphaDropout])
    def test_dropout_family_found(self, layer_type):
        model = paddle.nn.Sequential(paddle.nn.Linear(4, 4), layer_type(0.3))
        assert [item.name for item in find_stochastic_layers(model)] == ["1"]

    def test_zero_rate_rejected(self):
        model = SmallNet(p=0.0)
        with pytest.raises(NoStochasticLayerError, match="p = 0") as info:
            find_stochastic_layers(model)
        assert "MCDropout.drop_path" in str(info.value)
        assert "MCDropout.functional_dropout" in str(info.value)

    def test_no_dropout_rejected(self):
        model = paddle.nn.Sequential(paddle.nn.Linear(4, 4), paddle.nn.BatchNorm1D(4))
        with pytest.raises(NoStochasticLayerError, match="no dropout or DropPath layer"):
            find_stochastic_layers(model)

    def test_drop_path_needs_switch(self):
        class DropPath(paddle.nn.Layer):
            def __init__(self, drop_prob):
                super().__init__()
                self.drop_prob = drop_prob

            def forward(self, x):
                return x

        model = paddle.nn.Sequential(paddle.nn.Linear(4, 4), DropPath(0.1))
        with pytest.raises(NoStochasticLayerError, match="drop_path is False"):
            find_stochastic_layers(model)
        found = find_stochastic_layers(model, drop_path=True)
        assert [(item.name, item.kind) for item in found] == [("1", "drop_path")]

    def test_functional_owner_by_pattern(self):
        model = paddle.nn.Sequential(paddle.nn.Linear(4, 4), paddle.nn.Linear(4, 4))
        found = find_stochastic_layers(model, functional_dropout=["*"])
        assert [item.kind for item in found] == ["functional_dropout"] * 2

    def test_functional_owner_unknown_name(self):
        model = paddle.nn.Sequential(paddle.nn.Linear(4, 4))
        with pytest.raises(ValueError, match="no sublayer is named 'blocks.0'"):
            find_stochastic_layers(model, functional_dropout=["blocks.0"])

    @pytest.mark.parametrize("name", ["ResNet18", "MobileNetV2_x0_25"])
    def test_paddleclas_model_without_dropout_rejected(self, name):
        from paddleclas_mc import integration
        model = integration.build_model({"Arch": {"name": name, "class_num": 10},
                                         "Global": {"device": "cpu"}})
        with pytest.raises(NoStochasticLayerError):
            find_stochastic_layers(model)


class TestMCDropoutContext:
    def test_only_dropout_in_training(self, small_net):
        with mc_dropout(small_net):
            flags = {name: layer.training for name, layer in small_net.named_sublayers()}
            assert small_net.training is False
        assert flags == {"conv": False, "bn": False, "pool": False, "dropout": True, "fc": False}

    def test_parameters_and_buffers_unchanged(self, small_net, images):
        before = _snapshot(small_net)
        with mc_dropout(small_net):
            for _ in range(5):
                small_net(images)
        after = _snapshot(small_net)
        assert before.keys() == after.keys()
        for name in before:
            assert np.array_equal(before[name], after[name]), name

    def test_flags_restored(self, small_net):
        small_net.train()
        small_net.bn.eval()
        before = [layer.training for layer in small_net.sublayers(include_self=True)]
        with mc_dropout(small_net):
            pass
        assert [layer.training for layer in small_net.sublayers(include_self=True)] == before

    def test_flags_restored_after_exception(self, small_net, images):
        def fail(layer, inputs):
            raise RuntimeError("forward failed")

        handle = small_net.fc.register_forward_pre_hook(fail)
        small_net.train()
        before = _snapshot(small_net)
        with pytest.raises(RuntimeError, match="forward failed"):
            with mc_dropout(small_net):
                small_net(images)
        handle.remove()
        assert all(layer.training for layer in small_net.sublayers(include_self=True))
        after = _snapshot(small_net)
        for name in before:
            assert np.array_equal(before[name], after[name]), name

    def test_functional_owner_keeps_batch_norm_in_eval(self):
        block = paddle.nn.Sequential(paddle.nn.Conv2D(3, 3, 1), paddle.nn.BatchNorm2D(3))
        model = paddle.nn.Sequential(block, paddle.nn.Flatten())
        with mc_dropout(model, functional_dropout=["0"]):
            assert block.training is True
            assert block[0].training is False
            assert block[1].training is False

    def test_global_train_mode_untouched(self, small_net):
        tracer = paddle.base.framework._dygraph_tracer()
        before = tracer._train_mode
        with mc_dropout(small_net):
            pass
        assert tracer._train_mode == before

    @pytest.mark.parametrize("mode", ["upscale_in_train", "downscale_in_infer"])
    def test_mean_matches_deterministic(self, mode):
        paddle.seed(1)
        model = trained_batch_norm(SmallNet(p=0.3, mode=mode))
        x = paddle.randn([2, 3, 8, 8])
        with paddle.no_grad():
            deterministic = model(x).numpy()
            tiled = paddle.tile(x, [4000, 1, 1, 1])
            with mc_dropout(model):
                samples = model(tiled).numpy().reshape(4000, 2, -1)
        # The classifier after the dropout is linear, so the expectation is exact;
        # the tolerance is about 5 standard errors of the mean over 4,000 passes.
        standard_error = samples.std(axis=0) / np.sqrt(4000)
        assert np.all(np.abs(samples.mean(axis=0) - deterministic) < 5 * standard_error + 1e-6)
