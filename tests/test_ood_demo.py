import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import ood_demo  # noqa: E402


def test_ood_sets_shapes_and_sizes():
    digits = [np.full((8, 8), value, np.uint8) for value in range(0, 250, 2)]
    sets = ood_demo.build_ood_sets(digits, seed=0)
    assert set(sets) == {"photo_crops", "inverted", "noised", "letters"}
    for name, images in sets.items():
        assert len(images) == ood_demo.IMAGES_PER_SET, name
        assert all(np.asarray(image).shape == (8, 8) for image in images), name


def test_ood_sets_deterministic():
    digits = [np.full((8, 8), value, np.uint8) for value in range(0, 250, 2)]
    first = ood_demo.build_ood_sets(digits, seed=1)
    second = ood_demo.build_ood_sets(digits, seed=1)
    for name in first:
        assert all(np.array_equal(a, b) for a, b in zip(first[name], second[name])), name


def test_letters_use_full_brightness():
    letters = ood_demo.build_ood_sets([np.zeros((8, 8), np.uint8)] * 130)["letters"]
    assert all(image.max() == 255 for image in letters)
