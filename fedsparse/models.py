"""Model registry: `build_model(name, input_shape, num_classes, width=1)`.

- `cnn`: two conv-pool blocks and two linear layers, for small grey images (28x28, 16x16).
- `mlp`: two hidden layers.
- `width` multiplies every hidden size of `mlp` and `cnn` (32/64 channels and 128 units for the cnn, 200 units for
  the mlp); width 1 builds exactly the original models (same layers, same parameter draws for the same seed).
  `resnet18` takes width 1 only.
- `resnet18`: torchvision's ResNet-18 in its CIFAR form (3x3 stem, no max-pool) with GroupNorm in place of
  BatchNorm, as in the SSFL paper: batch statistics do not average well across non-IID clients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ModelBuilder = Callable[..., nn.Module]  # (input_shape, num_classes, width=1) -> model
MODELS: dict[str, ModelBuilder] = {}


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(fn: ModelBuilder) -> ModelBuilder:
        MODELS[name] = fn
        return fn

    return wrap


@register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 1) -> nn.Module:
    channels, height, image_width = input_shape
    conv_a, conv_b, hidden = 32 * width, 64 * width, 128 * width
    features = nn.Sequential(
        nn.Conv2d(channels, conv_a, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(conv_a, conv_b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = conv_b * (height // 4) * (image_width // 4)
    return nn.Sequential(features, nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 1) -> nn.Module:
    size = 1
    for d in input_shape:
        size *= d
    hidden = 200 * width
    return nn.Sequential(nn.Flatten(), nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


@register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int, width: int = 1) -> nn.Module:
    if width != 1:
        raise ValueError(f"resnet18 has no width multiplier (width must be 1, got {width})")
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(min(32, c), c))
    model.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None,
                width: int = 1) -> nn.Module:
    """A fresh model; with `seed`, its initialisation is the same in every process. `width` (an integer >= 1)
    multiplies the hidden sizes of `mlp` and `cnn`; width 1 is the default model."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    if seed is None:
        return MODELS[name](input_shape, num_classes, width=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](input_shape, num_classes, width=width)


def maskable_names(model: nn.Module, layers: tuple[str, ...] = ("conv", "linear")) -> list[str]:
    """State-dict keys of the weights a sparsity mask applies to (Conv and/or Linear weights; never biases
    or norm parameters), in state-dict order."""
    kinds = tuple(k for name, k in (("conv", nn.Conv2d), ("linear", nn.Linear)) if name in layers)
    names = {f"{prefix}.weight" if prefix else "weight"
             for prefix, module in model.named_modules() if isinstance(module, kinds)}
    return [k for k in model.state_dict() if k in names]
