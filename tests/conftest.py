"""Shared fixtures: small networks with BatchNorm and dropout, built on CPU."""

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
