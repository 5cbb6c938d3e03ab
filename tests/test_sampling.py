import numpy as np
import paddle
import pytest

from conftest import SmallNet, trained_batch_norm
from paddleclas_mc.sampling import MCSampler, extract_logits, resolve_strategy, single_pass


@pytest.mark.parametrize("strategy", ["loop", "tiled"])
class TestStrategies:
    def test_shape_and_probabilities(self, small_net, images, strategy):
        probs = MCSampler(small_net, samples=6, strategy=strategy, max_batch=4).sample(images)
        assert probs.shape == (6, 5, 4)
        assert probs.dtype == np.float32
        assert np.allclose(probs.sum(axis=-1), 1.0, atol=1e-5)

    def test_samples_differ(self, small_net, images, strategy):
        probs = MCSampler(small_net, samples=6, strategy=strategy).sample(images, seed=1)
        assert not np.allclose(probs[0], probs[1])

    def test_same_seed_same_output(self, small_net, images, strategy):
        sampler = MCSampler(small_net, samples=6, strategy=strategy, max_batch=7)
        first = sampler.sample(images, seed=123)
        paddle.seed(99)
        second = sampler.sample(images, seed=123)
        assert np.array_equal(first, second)

    def test_other_seed_other_output(self, small_net, images, strategy):
        sampler = MCSampler(small_net, samples=6, strategy=strategy)
        assert not np.array_equal(sampler.sample(images, seed=1), sampler.sample(images, seed=2))

    def test_parameters_and_flags_untouched(self, small_net, images, strategy):
        before = {k: v.numpy().copy() for k, v in small_net.state_dict().items()}
        MCSampler(small_net, samples=4, strategy=strategy).sample(images)
        for name, value in small_net.state_dict().items():
            assert np.array_equal(before[name], value.numpy()), name
        assert not any(layer.training for layer in small_net.sublayers(include_self=True))

    def test_runs_without_gradient(self, small_net, images, strategy):
        flags = []
        handle = small_net.fc.register_forward_post_hook(
            lambda layer, inputs, output: flags.append(output.stop_gradient))
        images.stop_gradient = False
        MCSampler(small_net, samples=3, strategy=strategy).sample(images)
        handle.remove()
        assert flags
        assert all(flags)

    @pytest.mark.parametrize("mode", ["upscale_in_train", "downscale_in_infer"])
    def test_zero_like_rate_matches_single_pass(self, images, strategy, mode):
        paddle.seed(3)
        model = trained_batch_norm(SmallNet(p=1e-9, mode=mode))
        probs = MCSampler(model, samples=3, strategy=strategy).sample(images)
        deterministic = single_pass(model, images)
        assert np.allclose(probs, deterministic[None], atol=1e-5)

    @pytest.mark.parametrize("mode", ["upscale_in_train", "downscale_in_infer"])
    def test_mean_approaches_single_pass(self, images, strategy, mode):
        paddle.seed(4)
        model = trained_batch_norm(SmallNet(p=0.1, mode=mode))
        probs = MCSampler(model, samples=400, strategy=strategy, max_batch=512).sample(images, seed=5)
        deterministic = single_pass(model, images)
        # Softmax is not linear, so the MC mean matches only approximately at a low rate.
        assert np.abs(probs.mean(axis=0) - deterministic).max() < 0.02


def test_tiled_matches_loop_distribution(small_net, images):
    loop = MCSampler(small_net, samples=300, strategy="loop").sample(images, seed=1)
    tiled = MCSampler(small_net, samples=300, strategy="tiled", max_batch=64).sample(images, seed=2)
    error = np.sqrt(loop.var(axis=0) / 300 + tiled.var(axis=0) / 300)
    assert np.all(np.abs(loop.mean(axis=0) - tiled.mean(axis=0)) < 5 * error + 1e-6)


def test_tiled_forward_size_bounded(small_net, images):
    sizes = []
    handle = small_net.register_forward_pre_hook(lambda layer, inputs: sizes.append(inputs[0].shape[0]))
    MCSampler(small_net, samples=10, strategy="tiled", max_batch=8).sample(images)
    handle.remove()
    assert max(sizes) == 8
    assert sum(sizes) == 50


class TestResolveStrategy:
    def test_auto_small_batch_tiles_off_cpu(self):
        assert resolve_strategy("auto", 8, 64)[0] == "tiled"

    def test_auto_large_batch_loops_off_cpu(self):
        assert resolve_strategy("auto", 64, 64)[0] == "loop"

    def test_auto_loops_on_cpu_whatever_the_batch(self):
        for batch_size in (1, 8, 64, 128):
            strategy, reason = resolve_strategy("auto", batch_size, 64, on_cpu=True)
            assert strategy == "loop"
            assert reason.startswith("on CPU")

    def test_explicit_tiled_kept_on_cpu(self):
        assert resolve_strategy("tiled", 8, 64, on_cpu=True) == ("tiled", "set in the config")

    def test_explicit_kept(self):
        assert resolve_strategy("loop", 8, 64) == ("loop", "set in the config")


class TestExtractLogits:
    def test_dict_and_list_outputs(self):
        logits = paddle.ones([2, 3])
        assert extract_logits([logits]) is logits
        assert extract_logits({"logits": logits}) is logits
        assert extract_logits({"Student": {"logits": logits}}) is logits

    def test_missing_logits(self):
        with pytest.raises(ValueError, match="cannot find logits"):
            extract_logits({"features": paddle.ones([2, 3])})


def test_invalid_sampler_arguments(small_net):
    with pytest.raises(ValueError, match="samples must be >= 2"):
        MCSampler(small_net, samples=1)
    with pytest.raises(ValueError, match="strategy"):
        MCSampler(small_net, strategy="fast")


class TestPrefixStrategyChoice:
    def test_strategy_lists_agree(self):
        from paddleclas_mc.config import STRATEGIES as CONFIG_STRATEGIES
        from paddleclas_mc.sampling import STRATEGIES
        assert CONFIG_STRATEGIES == STRATEGIES
        assert "prefix" in STRATEGIES

    def test_resolve_keeps_explicit_prefix(self):
        assert resolve_strategy("prefix", 8, 64) == ("prefix", "set in the config")

    def test_invalid_strategy_lists_prefix(self, small_net):
        with pytest.raises(ValueError, match="auto, loop, tiled, prefix"):
            MCSampler(small_net, strategy="fast")

    def test_loop_and_tiled_need_no_images(self, small_net):
        assert MCSampler(small_net, strategy="loop").describe_strategy(8) == (
            "loop", "set in the config")
        assert MCSampler(small_net, strategy="tiled").describe_strategy(8)[0] == "tiled"

    def test_auto_needs_images(self, small_net):
        with pytest.raises(ValueError, match="needs sample_images"):
            MCSampler(small_net, strategy="auto").describe_strategy(8)

    def test_auto_prefers_prefix(self, small_net, images):
        strategy, reason = MCSampler(small_net, strategy="auto").describe_strategy(5, images)
        assert strategy == "prefix"
        assert reason.startswith("auto: dropout is the first stochastic layer called")

    def test_explicit_prefix_reason(self, small_net, images):
        strategy, reason = MCSampler(small_net, strategy="prefix").describe_strategy(5, images)
        assert strategy == "prefix"
        assert reason.startswith("set in the config: ")
