"""Model registry. Models know nothing of training or scoring: (B, C, H, W) in, (B, classes) logits out.

A model is named by a registered name (``MODELS``) or by a factory of the user's own,
``package.module:factory``: a callable ``(in_channels, num_classes) -> nn.Module``, imported in
every process that builds the model (the driver, each training worker and curvature actor); or,
from Python, it is an ``nn.Module`` instance, packed once (``pack_instance``) into a
ModelInstance that the spec carries to those processes by value. ``resolve_model`` turns any of
them into the factory that builds the model. Weights to start from are a state dict file, read
with ``torch.load(weights_only=True)``; an instance's own parameters are its starting weights.
"""

from __future__ import annotations

import copy
import importlib
import io
import pickle
from collections.abc import Callable

import torch
from torch import nn

from raycurv import storage
from raycurv.model_instance import INSTANCE_PREFIX, ModelInstance, is_instance_name

# What a spec's ``train.model`` holds: a registered name, ``package.module:factory``, or a packed
# nn.Module instance.
ModelChoice = str | ModelInstance


class SmallCNN(nn.Module):
    """Three 3x3 conv layers with batch norm, a 2x2 max-pool after the first two, global
    average pooling. Pooling early keeps it cheap: scoring runs n+1 gradient passes per sample.

    Works for any input of at least 4x4 (8x8 digits, 28x28 MNIST-like, 32x32 CIFAR).
    Shapes: (B, C, H, W) -> (B, w, H/2, W/2) -> (B, 2w, H/4, W/4) -> (B, 4w) -> (B, classes).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem and no max-pool, so layer4 sees 4x4 maps.

    Shapes: (B, C, 32, 32) -> (B, 64, 32, 32) -> ... -> (B, 512, 4, 4) -> (B, 512) -> (B, classes).
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _torchvision(name: str) -> Callable[[int, int], nn.Module]:
    def build(in_channels: int, num_classes: int) -> nn.Module:
        import torchvision  # seconds to import; only these models need it

        # weights=None: raycurv never downloads weights; it trains from scratch.
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        return model

    return build


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18_cifar": CifarResNet18,
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
}


def is_factory_path(name: str) -> bool:
    """Whether ``name`` names a user's factory (``package.module:factory``), not a registered model."""
    return ":" in name


def import_factory(path: str) -> Callable[[int, int], nn.Module]:
    """The callable named by ``package.module:factory`` (the attribute may be dotted, a.b).
    Raises ValueError (one line) when the module does not import or has no such callable."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"model factory {path!r} must look like package.module:factory")
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ValueError(f"model factory {path!r}: cannot import {module_name}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model factory {path!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model factory {path!r} is not callable")
    return target


def load_weights(location: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file or URI, read without unpickling code (weights_only=True).
    Raises ValueError (one line) when it is missing or does not hold a state dict."""
    raw = storage.read_bytes(location)
    if raw is None:
        raise ValueError(f"weights file not found: {location}")
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or torch errors for a file that is not a state dict
        raise ValueError(f"weights file {location} is not a torch state dict: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a raycurv training checkpoint: its model's weights
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"weights file {location} does not hold a state dict (name -> tensor)")
    return state


def _reason(exc: BaseException) -> str:
    """An exception as one line: its type and its message's first line."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


def _on_cpu(module: nn.Module) -> nn.Module:
    """``module`` if all its tensors are on the CPU, else a copy moved there (``module`` stays)."""
    tensors = [*module.parameters(), *module.buffers()]
    return module if all(t.device.type == "cpu" for t in tensors) else copy.deepcopy(module).cpu()


def pack_instance(module: nn.Module) -> ModelInstance:
    """Pack an ``nn.Module`` instance for every process that builds the model: the module (a
    copy moved to the CPU where it is elsewhere; ``module`` itself is left as it is), pickled with
    cloudpickle and checked to unpickle. Its parameters and buffers are the starting weights.
    Raises ValueError (one line) when it is no nn.Module or does not pickle (it holds a lock, a
    file open for writing)."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module instance, got {type(module).__name__}")
    from ray import cloudpickle  # pickles classes of a notebook or script by value

    name = f"{INSTANCE_PREFIX}{type(module).__module__}.{type(module).__qualname__}"
    try:
        pickled = cloudpickle.dumps(_on_cpu(module))
        pickle.loads(pickled)
    except Exception as exc:  # TypeError, PicklingError, or whatever the module's own code raises
        raise ValueError(f"model {name!r} cannot be pickled for Ray's training workers and "
                         f"curvature actors: {_reason(exc)}") from None
    return ModelInstance(name=name, pickled=pickled)


def resolve_model(model: ModelChoice) -> Callable[[int, int], nn.Module]:
    """The factory of ``model``: a registered model, an imported ``package.module:factory``, or a
    packed instance (which builds a fresh copy of itself). Raises ValueError (one line) for an
    unknown name, a factory that does not import, or an instance's name without the instance."""
    if isinstance(model, ModelInstance):
        return model
    if is_instance_name(model):
        raise ValueError(f"model {model!r} was an nn.Module instance given to raycurv.score(): "
                         "only the instance itself builds it; give it again, or a registered "
                         "name or package.module:factory")
    if is_factory_path(model):
        return import_factory(model)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODELS)}, "
                         "or package.module:factory")
    return MODELS[model]


def build_model(model: ModelChoice, *, in_channels: int, num_classes: int,
                weights: str | None = None) -> nn.Module:
    """Build a registered model, a user's ``package.module:factory`` model or a fresh copy of a
    packed instance, with ``weights`` (a state dict file) loaded when given. Raises ValueError
    (one line) for an unknown name, a factory that does not import or returns no nn.Module, or
    weights that do not fit the model."""
    name = str(model)
    built = resolve_model(model)(in_channels, num_classes)
    if not isinstance(built, nn.Module):
        raise ValueError(f"model {name!r} returned {type(built).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            built.load_state_dict(load_weights(weights))
        except RuntimeError as exc:
            raise ValueError(f"weights file {weights} does not match model {name!r}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
    return built


def check_model(model: ModelChoice, *, input_shape: tuple[int, ...], num_classes: int,
                weights: str | None = None) -> None:
    """Build the model once and run a batch of two zero inputs of ``input_shape`` (C, H, W)
    through it: the logits must be (2, num_classes). Raises ValueError (one line) otherwise."""
    name = str(model)
    built = build_model(model, in_channels=input_shape[0], num_classes=num_classes, weights=weights)
    built.eval()
    try:
        with torch.no_grad():
            out = built(torch.zeros((2, *input_shape)))
    except Exception as exc:  # shape errors from inside the user's model
        raise ValueError(f"model {name!r} fails on inputs of shape {tuple(input_shape)}: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {name!r} outputs {shape} for a batch of 2, expected "
                         f"(2, {num_classes}): one logit per class")
