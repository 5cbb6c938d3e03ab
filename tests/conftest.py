"""Shared fixtures: small networks with BatchNorm and dropout, built on CPU."""

import os

import numpy as np
import paddle
import pytest

paddle.set_device("cpu")


class SmallNet(paddle.nn.Layer):
    """Conv, BatchNorm, pooling, dropout and a classifier: [B, 3, 8, 8] to [B, 4]."""

    def __init__(self, p=0.5, mode="upscale_in_train", num_classes=4):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(8)
        self.pool = paddle.nn.AdaptiveAvgPool2D(1)
        self.dropout = paddle.nn.Dropout(p=p, mode=mode)
        self.fc = paddle.nn.Linear(8, num_classes)

    def forward(self, x):
        x = paddle.nn.functional.relu(self.bn(self.conv(x)))
        x = self.pool(x).flatten(1)
        return self.fc(self.dropout(x))


def trained_batch_norm(model, seed=0):
    """Give BatchNorm non-trivial running statistics with a few training steps."""
    paddle.seed(seed)
    model.train()
    with paddle.no_grad():
        for _ in range(3):
            model(paddle.randn([16, 3, 8, 8]) * 2 + 1)
    model.eval()
    return model


@pytest.fixture
def small_net():
    paddle.seed(0)
    return trained_batch_norm(SmallNet())


@pytest.fixture
def images():
    return paddle.to_tensor(np.random.RandomState(0).randn(5, 3, 8, 8).astype("float32"))


def require_paddleclas_checkout(*required_paths):
    """Return ``$PADDLECLAS_ROOT``, skipping the test when it is not set.

    Args:
        required_paths: paths inside the checkout the test reads, such as
            ``tools/infer.py``; a checkout without one fails the test.
    """
    root = os.environ.get("PADDLECLAS_ROOT")
    if not root:
        pytest.skip("PADDLECLAS_ROOT is not set. Set it to a PaddleClas source checkout "
                    "(git clone https://github.com/PaddlePaddle/PaddleClas) to run the "
                    "checkout tests, e.g. PADDLECLAS_ROOT=~/PaddleClas python -m pytest "
                    "tests/test_integration_hook.py tests/test_paddleclas_configs.py")
    for path in required_paths:
        if not os.path.exists(os.path.join(root, path)):
            pytest.fail(f"PADDLECLAS_ROOT={root!r} has no {path}; set it to the root of a "
                        "PaddleClas source checkout.")
    return root
