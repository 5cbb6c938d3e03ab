"""The prefix strategy: exactness, distribution, safety probe and clean-up."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from conftest import SmallNet, trained_batch_norm
from paddleclas_mc import integration
from paddleclas_mc.sampling import MCSampler, single_pass


class DropPath(paddle.nn.Layer):
    """Stochastic depth as PaddleClas writes it: one keep-or-drop draw per row."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = 1 - self.drop_prob
        mask = paddle.floor(keep + paddle.rand([x.shape[0]] + [1] * (x.ndim - 1)))
        return x / keep * mask


class HeadNet(paddle.nn.Layer):
    """Conv, BatchNorm and a stochastic layer before the classifier: [B, 3, 8, 8] to [B, 4].

    ``where="features"`` puts the stochastic layer on the 4-D feature map, as
    Dropout2D is used; ``"head"`` on the pooled features, as PPLCNet does.
    """

    def __init__(self, stochastic, where="head"):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(8)
        self.stochastic = stochastic
        self.where = where
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if self.where == "features":
            x = self.stochastic(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.where == "head":
            x = self.stochastic(x)
        return self.fc(x)


class ResidualNet(paddle.nn.Layer):
    """Dropout inside a residual branch: ``x + dropout(f(x))``."""

    def __init__(self, p=0.5):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.branch = paddle.nn.Linear(8, 8)
        self.dropout = paddle.nn.Dropout(p)
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1)
        x = x + self.dropout(self.branch(x))
        return self.fc(x)


class CapturedBatchNet(paddle.nn.Layer):
    """Reads the batch size from the input and uses it after the dropout.

    ``use="reshape"`` reshapes to ``[batch_size, -1]``. ``use="token"``
    prepends a learned token expanded to the batch size, as ViT's class token.
    ``empty_fails`` makes the layers before the dropout reject an empty batch.
    """

    def __init__(self, use, empty_fails=False, p=0.5):
        super().__init__()
        self.use = use
        self.empty_fails = empty_fails
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.dropout = paddle.nn.Dropout(p)
        self.token = self.create_parameter([1, 8])
        self.fc = paddle.nn.Linear(8 if use == "reshape" else 16, 4)

    def forward(self, x):
        batch_size = x.shape[0]
        if self.empty_fails and batch_size == 0:
            raise ValueError("empty batch")
        x = self.dropout(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1))
        if self.use == "reshape":
            x = x.reshape([batch_size, -1])
        else:
            x = paddle.concat([self.token.expand([batch_size, 8]), x.flatten(1)], axis=1)
        return self.fc(x)


class TwoInputBlock(paddle.nn.Layer):
    """Owns a functional dropout and takes two tensors."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x, bias):
        return F.dropout(x, self.p, training=self.training) + bias


class TwoInputNet(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.block = TwoInputBlock()
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1)
        return self.fc(self.block(x, x.mean(axis=0, keepdim=True)))


class FailingHead(paddle.nn.Layer):
    """Raises once ``armed`` is set, to test clean-up after a failed forward."""

    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(8, 4)
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("forward failed on purpose")
        return self.fc(x)


def _snapshot(model):
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


def _training_flags(model):
    return [layer.training for layer in model.sublayers(include_self=True)]


def _variance_error(samples):
    """Standard error of the per-entry sample variance over axis 0."""
    centred = samples - samples.mean(axis=0)
    fourth = (centred ** 4).mean(axis=0)
    return np.sqrt(np.maximum(fourth - centred.var(axis=0) ** 2, 0) / samples.shape[0])


@pytest.mark.parametrize("mode", ["upscale_in_train", "downscale_in_infer"])
def test_zero_like_rate_matches_single_pass(images, mode):
    paddle.seed(3)
    model = trained_batch_norm(SmallNet(p=1e-9, mode=mode))
    sampler = MCSampler(model, samples=7, strategy="prefix", max_batch=4)
    probs = sampler.sample(images, seed=0)
    deterministic = single_pass(model, images)
    assert probs.shape == (7, 5, 4)
    # Equal up to float32 rounding, so the test does not depend on the BLAS
    # kernel a batch size selects.
    np.testing.assert_allclose(probs, np.broadcast_to(deterministic, probs.shape),
                               rtol=1e-6, atol=1e-9)


STOCHASTIC_HEADS = {
    "dropout_upscale": lambda: HeadNet(paddle.nn.Dropout(0.5)),
    "dropout_downscale": lambda: HeadNet(paddle.nn.Dropout(0.5, mode="downscale_in_infer")),
    "dropout2d_features": lambda: HeadNet(paddle.nn.Dropout2D(0.5), where="features"),
    "drop_path": lambda: HeadNet(DropPath(0.3)),
}


@pytest.mark.parametrize("kind", sorted(STOCHASTIC_HEADS))
def test_distribution_matches_loop(images, kind):
    paddle.seed(5)
    model = trained_batch_norm(STOCHASTIC_HEADS[kind]())
    drop_path = kind == "drop_path"
    samples = 400
    loop = MCSampler(model, samples, "loop", drop_path=drop_path).sample(images, seed=1)
    prefix_sampler = MCSampler(model, samples, "prefix", max_batch=64, drop_path=drop_path)
    prefix = prefix_sampler.sample(images, seed=2)

    assert prefix_sampler.describe_strategy(5, images)[0] == "prefix"
    assert not np.allclose(prefix[0], prefix[1])
    mean_error = np.sqrt(loop.var(axis=0) / samples + prefix.var(axis=0) / samples)
    assert np.all(np.abs(loop.mean(axis=0) - prefix.mean(axis=0)) < 5 * mean_error + 1e-6)
    variance_error = np.sqrt(_variance_error(loop) ** 2 + _variance_error(prefix) ** 2)
    assert np.all(np.abs(loop.var(axis=0) - prefix.var(axis=0)) < 5 * variance_error + 1e-7)


def test_rows_are_independent_passes(small_net, images):
    # Rows t * B + b of one image must not share a mask, or the spread collapses.
    probs = MCSampler(small_net, samples=50, strategy="prefix", max_batch=500).sample(
        images, seed=0)
    assert len({probs[t, 0].tobytes() for t in range(50)}) > 25


class TestUnsafeModels:
    def test_residual_branch_falls_back(self, images):
        paddle.seed(0)
        sampler = MCSampler(ResidualNet(), samples=4, strategy="auto", max_batch=64)
        strategy, reason = sampler.describe_strategy(5, images)
        # The test images are on CPU, where auto's fallback is loop.
        assert strategy == "loop"
        assert reason.startswith("on CPU")
        assert "prefix ruled out" in reason
        assert "dropout" in reason
        assert sampler.sample(images).shape == (4, 5, 4)

    def test_residual_branch_explicit_raises(self, images):
        paddle.seed(0)
        sampler = MCSampler(ResidualNet(), samples=4, strategy="prefix")
        with pytest.raises(ValueError, match="prefix cannot run on ResidualNet") as info:
            sampler.sample(images)
        assert "residual branch" in str(info.value)
        assert "tiled or loop" in str(info.value)

    def test_expanded_batch_size_detected(self, images):
        paddle.seed(0)
        sampler = MCSampler(CapturedBatchNet("token"), samples=4, strategy="auto")
        strategy, reason = sampler.describe_strategy(5, images)
        assert strategy == "loop"
        assert "with one image" in reason
        with pytest.raises(ValueError, match="prefix cannot run"):
            MCSampler(CapturedBatchNet("token"), samples=4, strategy="prefix").sample(images)

    def test_two_tensor_inputs_detected(self, images):
        paddle.seed(0)
        model = TwoInputNet()
        sampler = MCSampler(model, samples=4, strategy="auto", functional_dropout=["block"])
        strategy, reason = sampler.describe_strategy(5, images)
        assert strategy == "loop"
        assert "gets 2 tensor inputs" in reason
        explicit = MCSampler(model, samples=4, strategy="prefix", functional_dropout=["block"])
        with pytest.raises(ValueError, match="gets 2 tensor inputs"):
            explicit.sample(images)

    def test_captured_reshape_with_one_image_detected(self, images):
        # An empty batch is rejected, so each forward would run the layers
        # before the dropout on one image and the reshape would get batch size 1.
        paddle.seed(0)
        sampler = MCSampler(CapturedBatchNet("reshape", empty_fails=True), samples=4)
        strategy, reason = sampler.describe_strategy(5, images)
        assert strategy == "loop"
        assert "empty batch" in reason


class TestEmptyBatchFeed:
    def test_captured_reshape_runs_exactly(self, images):
        # Paddle's reshape reads 0 as "keep this dimension", so a batch size
        # of 0 read from the empty batch keeps the row count of the tiled rows.
        paddle.seed(0)
        model = CapturedBatchNet("reshape", p=1e-9)
        sampler = MCSampler(model, samples=3, strategy="auto", max_batch=4)
        assert sampler.describe_strategy(5, images)[0] == "prefix"
        assert sampler.prefix_plan(images).feed_size == 0
        probs = sampler.sample(images)
        np.testing.assert_allclose(probs, np.broadcast_to(single_pass(model, images), probs.shape),
                                   rtol=1e-6, atol=1e-9)

    def test_one_image_feed_matches_single_pass(self, images):
        class EmptyFailsNet(HeadNet):
            def forward(self, x):
                if x.shape[0] == 0:
                    raise ValueError("empty batch")
                return super().forward(x)

        paddle.seed(0)
        model = trained_batch_norm(EmptyFailsNet(paddle.nn.Dropout(1e-9)))
        sampler = MCSampler(model, samples=3, strategy="auto", max_batch=4)
        strategy, reason = sampler.describe_strategy(5, images)
        assert strategy == "prefix"
        assert sampler.prefix_plan(images).feed_size == 1
        assert "on one image" in reason
        probs = sampler.sample(images)
        np.testing.assert_allclose(probs, np.broadcast_to(single_pass(model, images), probs.shape),
                                   rtol=1e-6, atol=1e-9)


def test_same_seed_same_output(small_net, images):
    sampler = MCSampler(small_net, samples=6, strategy="prefix", max_batch=7)
    first = sampler.sample(images, seed=123)
    paddle.seed(99)
    second = sampler.sample(images, seed=123)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, sampler.sample(images, seed=124))


def test_repeated_split_layer_uses_first_call(images):
    # VGG calls its one Dropout twice; only the first call is the split.
    class TwiceNet(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
            self.drop = paddle.nn.Dropout(1e-9)
            self.fc1 = paddle.nn.Linear(8, 8)
            self.fc2 = paddle.nn.Linear(8, 4)

        def forward(self, x):
            x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1)
            return self.fc2(self.drop(F.relu(self.fc1(self.drop(x)))))

    paddle.seed(0)
    model = TwiceNet()
    sampler = MCSampler(model, samples=3, strategy="auto", max_batch=4)
    strategy, reason = sampler.describe_strategy(5, images)
    assert strategy == "prefix"
    assert "called 2 times" in reason
    probs = sampler.sample(images)
    np.testing.assert_allclose(probs, np.broadcast_to(single_pass(model, images), probs.shape),
                               rtol=1e-6, atol=1e-9)


class TestCleanUp:
    def test_state_and_flags_untouched(self, small_net, images):
        small_net.bn.training = True
        before, flags = _snapshot(small_net), _training_flags(small_net)
        MCSampler(small_net, samples=4, strategy="prefix", max_batch=3).sample(images)
        after = _snapshot(small_net)
        for name in before:
            assert np.array_equal(before[name], after[name]), name
        assert _training_flags(small_net) == flags
        assert not small_net.dropout._forward_pre_hooks

    def test_restored_when_forward_raises(self, images):
        paddle.seed(0)
        model = trained_batch_norm(HeadNet(paddle.nn.Dropout(0.5)))
        model.fc = FailingHead()
        sampler = MCSampler(model, samples=4, strategy="prefix")
        assert sampler.prefix_plan(images).usable
        before, flags = _snapshot(model), _training_flags(model)
        model.fc.armed = True
        with pytest.raises(RuntimeError, match="failed on purpose"):
            sampler.sample(images)
        after = _snapshot(model)
        for name in before:
            assert np.array_equal(before[name], after[name]), name
        assert _training_flags(model) == flags
        assert not model.stochastic._forward_pre_hooks

    def test_restored_when_probe_raises(self, images):
        paddle.seed(0)
        model = HeadNet(paddle.nn.Dropout(0.5))
        model.fc = FailingHead()
        model.fc.armed = True
        flags = _training_flags(model)
        with pytest.raises(RuntimeError, match="failed on purpose"):
            MCSampler(model, samples=4, strategy="auto").describe_strategy(5, images)
        assert _training_flags(model) == flags
        assert not model.stochastic._forward_pre_hooks


def test_forward_sizes_bounded(small_net, images):
    sampler = MCSampler(small_net, samples=10, strategy="prefix", max_batch=3)
    sampler.prefix_plan(images)
    model_rows, split_rows, head_rows = [], [], []
    handles = [
        small_net.register_forward_pre_hook(
            lambda layer, inputs: model_rows.append(inputs[0].shape[0])),
        small_net.dropout.register_forward_post_hook(
            lambda layer, inputs, output: split_rows.append(output.shape[0])),
        small_net.fc.register_forward_pre_hook(
            lambda layer, inputs: head_rows.append(inputs[0].shape[0])),
    ]
    try:
        sampler.sample(images)
    finally:
        for handle in handles:
            handle.remove()
    # Capture runs the 5 images as 3 + 2, then every sampling forward gets
    # an empty batch and at most 3 tiled rows at the dropout.
    assert model_rows == [3, 2] + [0] * 17
    assert max(split_rows) == 3
    assert sum(head_rows) == 50


def test_batch_plan_cached_per_shape(small_net, images):
    sampler = MCSampler(small_net, samples=3, strategy="auto")
    first = sampler.prefix_plan(images)
    assert sampler.prefix_plan(images[:2]) is first
    assert sampler.prefix_plan(paddle.randn([2, 3, 6, 6])) is not first


def test_pplcnet_auto_chooses_prefix():
    paddle.seed(0)
    model = integration.build_model(
        {"Arch": {"name": "PPLCNet_x0_25", "class_num": 10, "dropout_prob": 1e-9}})
    model.eval()
    images = paddle.randn([3, 3, 64, 64])
    sampler = MCSampler(model, samples=4, strategy="auto", max_batch=5)
    strategy, reason = sampler.describe_strategy(3, images)
    assert strategy == "prefix"
    assert reason.startswith("auto: dropout is the first stochastic layer")
    probs = sampler.sample(images, seed=0)
    np.testing.assert_allclose(probs, np.broadcast_to(single_pass(model, images), probs.shape),
                               rtol=1e-5, atol=1e-8)
