"""Model factories of a user's own (``tests.byo_models:NAME``) and model classes whose instances
`raycurv.score(model=...)` takes, for the bring-your-own-model tests."""

from __future__ import annotations

import threading

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


class TinyNet(nn.Module):
    """The ``tiny`` factory's model as a class of its own, to pass as an instance."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.net = tiny(in_channels, num_classes)

    def forward(self, x):
        return self.net(x)


class Locked(TinyNet):
    """Holds a lock: cannot be pickled, so it cannot reach Ray's workers."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
