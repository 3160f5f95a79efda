"""The model registry: every model takes the dataset's channels and classes."""

from __future__ import annotations

import pytest
import torch

from raycurv.models import MODELS, build_model


@pytest.mark.parametrize(("name", "shape"), [("small_cnn", (1, 8, 8)), ("small_cnn", (1, 28, 28)),
                                             ("small_cnn", (3, 32, 32)), ("resnet18_cifar", (3, 32, 32)),
                                             ("resnet18", (1, 32, 32)), ("resnet50", (3, 32, 32))])
def test_models_map_inputs_to_class_logits(name, shape):
    model = build_model(name, in_channels=shape[0], num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_cifar_resnet_keeps_32x32_resolution_in_its_stem():
    model = build_model("resnet18_cifar", in_channels=3, num_classes=10)
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid: " + ", ".join(MODELS)):
        build_model("vgg", in_channels=1, num_classes=2)
