"""Model registry: `build_model(name, input_shape, num_classes)`.

- `cnn`: two conv-pool blocks and two linear layers, for small grey images (28x28, 16x16).
- `mlp`: two hidden layers.
- `resnet18`: torchvision's ResNet-18 in its CIFAR form (3x3 stem, no max-pool) with GroupNorm in place of
  BatchNorm, as in the SSFL paper: batch statistics do not average well across non-IID clients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]
MODELS: dict[str, ModelBuilder] = {}


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(fn: ModelBuilder) -> ModelBuilder:
        MODELS[name] = fn
        return fn

    return wrap


@register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    features = nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = 64 * (height // 4) * (width // 4)
    return nn.Sequential(features, nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))


@register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    size = 1
    for d in input_shape:
        size *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(size, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                         nn.Linear(200, num_classes))


@register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(min(32, c), c))
    model.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None) -> nn.Module:
    """A fresh model; with `seed`, its initialisation is the same in every process."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
    if seed is None:
        return MODELS[name](input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](input_shape, num_classes)


def maskable_names(model: nn.Module, layers: tuple[str, ...] = ("conv", "linear")) -> list[str]:
    """State-dict keys of the weights a sparsity mask applies to (Conv and/or Linear weights; never biases
    or norm parameters), in state-dict order."""
    kinds = tuple(k for name, k in (("conv", nn.Conv2d), ("linear", nn.Linear)) if name in layers)
    names = {f"{prefix}.weight" if prefix else "weight"
             for prefix, module in model.named_modules() if isinstance(module, kinds)}
    return [k for k in model.state_dict() if k in names]
