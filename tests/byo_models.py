"""Model factories of a user's own (``tests.byo_models:NAME``), for the bring-your-own-model tests."""

from __future__ import annotations

from torch import nn


def tiny(in_channels: int, num_classes: int) -> nn.Module:
    """A small fitting model: conv, global pooling, one logit per class."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def wrong_outputs(in_channels: int, num_classes: int) -> nn.Module:
    """Three logits whatever the classes: does not fit a 10-class dataset."""
    return tiny(in_channels, 3)


def not_a_module(in_channels: int, num_classes: int) -> str:
    return "a model"


def fails_on_input(in_channels: int, num_classes: int) -> nn.Module:
    """Expects 64 flat features: fails on images."""
    return nn.Linear(64, num_classes)
