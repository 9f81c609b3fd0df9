"""Tests of the ResNet18 source-vs-target domain classifier (tiny, seeded)."""

import numpy as np
import pytest

from mr2nst.core.lab.domain_classifier import (
    ClassifierSettings,
    DomainClassifier,
    build_model,
    crops_of,
)


def _images(level, seed, n=3):
    gen = np.random.default_rng(seed)
    mask = np.ones((80, 80), dtype=bool)
    return [
        (np.clip(level + 0.05 * gen.standard_normal((80, 80)), 0, 1).astype(np.float32), mask)
        for _ in range(n)
    ]


def test_model_takes_one_channel():
    """The ResNet18 has a one-channel first convolution and one output logit."""
    model = build_model()
    assert model.conv1.in_channels == 1 and model.fc.out_features == 1


def test_crops_lie_inside_the_breast():
    """Crops are centred on mask pixels."""
    image = np.zeros((100, 100), dtype=np.float32)
    mask = np.zeros_like(image, dtype=bool)
    mask[:, 50:] = True
    image[mask] = 1.0
    crops = crops_of(image, mask, 8, 32, np.random.default_rng(0))
    assert crops.shape == (8, 32, 32) and np.all(crops[:, 16, 16] == 1.0)


@pytest.mark.slow
def test_separable_domains_are_learnt_deterministically():
    """Dark vs bright images are told apart, and the same seed gives the same scores."""
    settings = ClassifierSettings(crop=32, steps=15, batch=8, crops_per_image=4)
    source, target = _images(0.25, 1), _images(0.75, 2)
    a = DomainClassifier.train(source, target, settings)
    b = DomainClassifier.train(source, target, settings)
    probe_t, probe_s = _images(0.75, 3, 1)[0], _images(0.25, 4, 1)[0]
    assert a.is_target(*probe_t) and not a.is_target(*probe_s)
    assert a.prob_target(*probe_t) == b.prob_target(*probe_t)
