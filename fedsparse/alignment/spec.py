"""Permutation specs: which axes of which state-dict entries each hidden-unit permutation acts on.

Convention: a permutation is a `LongTensor` `perm` of the units of one hidden layer (or residual stream), and
applying it to an entry reindexes every axis that carries those units: `permuted[..., i, ...] =
original[..., perm[i], ...]`. Applying `perm` to a model's output units of layer l and input units of layer l+1
(and to everything between, e.g. biases and norm affines) leaves the model's function unchanged.

Invariants of a `PermutationSpec`:
- `axes` lists every state-dict key of the model, with one entry per axis of the key's *view* (`views`, default
  the tensor's own shape): a permutation name or None. A flattened conv output feeding a Linear layer is viewed
  as `(out, channels, height * width)` so that the channel permutation moves whole blocks of columns.
- A permutation with `group_sizes[name] = g > 1` must keep groups of g consecutive units together as sets (it maps
  block `k` onto some block `k'`): GroupNorm normalises over such groups, so only these permutations commute with it.
- `activations[name]` names a module, called once per forward pass, whose output carries the permutation on
  axis 1; activation matching and REPAIR/TACT probes use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedsparse.merging.state import StateDict

Permutation = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """Permutation names with their sizes and group sizes, and per state-dict key the permutation on each axis."""

    sizes: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]
    group_sizes: dict[str, int] = field(default_factory=dict)
    views: dict[str, tuple[int, ...]] = field(default_factory=dict)
    activations: dict[str, str] = field(default_factory=dict)

    def group_size(self, name: str) -> int:
        """Units per GroupNorm group that `name` must keep together (1: any permutation)."""
        return self.group_sizes.get(name, 1)

    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """For each permutation, the (key, axis) pairs it acts on."""
        result: dict[str, list[tuple[str, int]]] = {name: [] for name in self.sizes}
        for key, names in self.axes.items():
            for axis, name in enumerate(names):
                if name is not None:
                    result[name].append((key, axis))
        return result


def identity_permutation(spec: PermutationSpec) -> Permutation:
    """The permutation that changes nothing."""
    return {name: torch.arange(size) for name, size in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator) -> Permutation:
    """A uniformly random permutation per name that respects the spec's group sizes."""
    result = {}
    for name, size in spec.sizes.items():
        group = spec.group_size(name)
        blocks = torch.randperm(size // group, generator=generator)
        within = torch.stack([torch.randperm(group, generator=generator) for _ in range(size // group)])
        result[name] = (blocks[:, None] * group + within).reshape(-1)
    return result


def invert_permutation(permutation: Permutation) -> Permutation:
    """`inverse[name][perm[i]] = i`: applying `permutation` then its inverse is the identity."""
    return {name: torch.argsort(perm) for name, perm in permutation.items()}


def check_permutation(spec: PermutationSpec, permutation: Permutation) -> None:
    """Raise `ValueError` unless `permutation` names every permutation of the spec, each a permutation of the right
    size that keeps the spec's groups together."""
    for name, size in spec.sizes.items():
        if name not in permutation:
            raise ValueError(f"permutation '{name}' missing")
        perm = permutation[name]
        if perm.shape != (size,) or not torch.equal(torch.sort(perm).values, torch.arange(size)):
            raise ValueError(f"'{name}' is not a permutation of {size} units")
        group = spec.group_size(name)
        blocks = (perm // group).view(-1, group)
        if not bool((blocks == blocks[:, :1]).all()):
            raise ValueError(f"'{name}' splits groups of {group} units (GroupNorm would change the function)")


def permute_entry(spec: PermutationSpec, permutation: Permutation, key: str, value: torch.Tensor,
                  skip_axis: int | None = None) -> torch.Tensor:
    """One state-dict entry with the permutations of its axes applied (except `skip_axis`), in its original shape."""
    view_shape = spec.views.get(key, tuple(value.shape))
    names = spec.axes[key]
    if len(names) != len(view_shape):
        raise ValueError(f"'{key}': spec has {len(names)} axes, its view {view_shape} has {len(view_shape)}")
    result = value.reshape(view_shape)
    for axis, name in enumerate(names):
        if name is not None and axis != skip_axis:
            result = result.index_select(axis, permutation[name].to(value.device))
    return result.reshape(value.shape)


def apply_permutation(spec: PermutationSpec, permutation: Permutation, state: StateDict) -> StateDict:
    """The state dict of the permuted model (same function as `state`'s model); `ValueError` when the spec does
    not cover exactly the state's keys."""
    if set(spec.axes) != set(state):
        missing = sorted(set(state) - set(spec.axes))
        extra = sorted(set(spec.axes) - set(state))
        raise ValueError(f"spec does not match the state dict: keys without spec {missing[:5]}, unknown {extra[:5]}")
    check_permutation(spec, permutation)
    return {key: permute_entry(spec, permutation, key, value) for key, value in state.items()}


def _linear_chain(prefixes: list[str]) -> dict[str, tuple[str | None, ...]]:
    """Axes for a chain of Linear layers: hidden permutation `P<i>` between layer i and i+1."""
    axes: dict[str, tuple[str | None, ...]] = {}
    last = len(prefixes) - 1
    for position, prefix in enumerate(prefixes):
        out_perm = f"P{position}" if position < last else None
        in_perm = f"P{position - 1}" if position > 0 else None
        axes[f"{prefix}.weight"] = (out_perm, in_perm)
        axes[f"{prefix}.bias"] = (out_perm,)
    return axes


def mlp_spec(model: nn.Module) -> PermutationSpec:
    """`fedsparse.models.mlp`: Flatten, Linear(1), ReLU, Linear(3), ReLU, Linear(5); permutations P0, P1."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    axes = _linear_chain([name for name, _ in linears])
    sizes = {f"P{index}": module.out_features for index, (_, module) in enumerate(linears[:-1])}
    activations = {f"P{index}": name for index, (name, _) in enumerate(linears[:-1])}
    return PermutationSpec(sizes=sizes, axes=axes, activations=activations)


def cnn_spec(model: nn.Module) -> PermutationSpec:
    """`fedsparse.models.cnn`: conv 0.0 (P0), conv 0.3 (P1), flatten, Linear 1 (P2), Linear 3."""
    conv_a, conv_b = model[0][0], model[0][3]
    hidden, head = model[1], model[3]
    if not (isinstance(conv_a, nn.Conv2d) and isinstance(conv_b, nn.Conv2d) and isinstance(hidden, nn.Linear)
            and isinstance(head, nn.Linear) and head.in_features == hidden.out_features):
        raise ValueError("model does not have the layout of fedsparse.models.cnn")
    positions = hidden.in_features // conv_b.out_channels
    axes: dict[str, tuple[str | None, ...]] = {
        "0.0.weight": ("P0", None, None, None), "0.0.bias": ("P0",),
        "0.3.weight": ("P1", "P0", None, None), "0.3.bias": ("P1",),
        "1.weight": ("P2", "P1", None), "1.bias": ("P2",),
        "3.weight": (None, "P2"), "3.bias": (None,),
    }
    return PermutationSpec(
        sizes={"P0": conv_a.out_channels, "P1": conv_b.out_channels, "P2": hidden.out_features},
        axes=axes,
        views={"1.weight": (hidden.out_features, conv_b.out_channels, positions)},
        activations={"P0": "0.0", "P1": "0.3", "P2": "1"},
    )


def resnet18_spec(model: nn.Module) -> PermutationSpec:
    """`fedsparse.models.resnet18` (GroupNorm): one permutation per residual stage (`stage1` = stem and layer1,
    `stage2..4`) and one inside every block (`layer<L>.<b>`), each keeping GroupNorm groups together."""
    modules = dict(model.named_modules())
    axes: dict[str, tuple[str | None, ...]] = {}
    sizes: dict[str, int] = {}
    group_sizes: dict[str, int] = {}
    activations: dict[str, str] = {}

    def add_norm(prefix: str, perm: str) -> None:
        norm = modules[prefix]
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"'{prefix}' is {type(norm).__name__}, expected GroupNorm")
        axes[f"{prefix}.weight"] = (perm,)
        axes[f"{prefix}.bias"] = (perm,)
        sizes[perm] = norm.num_channels
        group_sizes[perm] = norm.num_channels // norm.num_groups

    def conv(key: str, out_perm: str, in_perm: str | None) -> None:
        axes[f"{key}.weight"] = (out_perm, in_perm, None, None)
        if modules[key].bias is not None:
            axes[f"{key}.bias"] = (out_perm,)

    conv("conv1", "stage1", None)
    add_norm("bn1", "stage1")
    activations["stage1"] = "layer1"
    for layer in range(1, 5):
        stage = f"stage{layer}"
        blocks = modules[f"layer{layer}"]
        for index in range(len(blocks)):
            prefix = f"layer{layer}.{index}"
            stream_in = f"stage{layer - 1}" if index == 0 and layer > 1 else stage
            inner = prefix
            conv(f"{prefix}.conv1", inner, stream_in)
            add_norm(f"{prefix}.bn1", inner)
            activations[inner] = f"{prefix}.bn1"
            conv(f"{prefix}.conv2", stage, inner)
            add_norm(f"{prefix}.bn2", stage)
            if f"{prefix}.downsample" in modules:
                conv(f"{prefix}.downsample.0", stage, stream_in)
                add_norm(f"{prefix}.downsample.1", stage)
        activations[stage] = f"layer{layer}"
    axes["fc.weight"] = (None, "stage4")
    axes["fc.bias"] = (None,)
    return PermutationSpec(sizes=sizes, axes=axes, group_sizes=group_sizes, activations=activations)


SPEC_BUILDERS: dict[str, Callable[[nn.Module], PermutationSpec]] = {
    "mlp": mlp_spec,
    "cnn": cnn_spec,
    "resnet18": resnet18_spec,
}


def permutation_spec(model_name: str, model: nn.Module) -> PermutationSpec:
    """The permutation spec of a `fedsparse.models` model by its registry name, read from the built `model`."""
    if model_name not in SPEC_BUILDERS:
        raise ValueError(f"no permutation spec for model '{model_name}'; known: {', '.join(SPEC_BUILDERS)}")
    spec = SPEC_BUILDERS[model_name](model)
    keys = set(model.state_dict())
    if set(spec.axes) != keys:
        raise ValueError(f"spec for '{model_name}' does not cover the model: {sorted(keys ^ set(spec.axes))[:5]}")
    return spec
