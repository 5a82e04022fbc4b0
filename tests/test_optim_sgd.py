"""fedsparse.optim.sgd.SGD: bit-identical to torch.optim.SGD(foreach=False) on CPU, torch's argument checks, state
dicts that load either way, and local training that never imports torch._dynamo (the reason the class exists)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from fedsparse.optim import SGD, build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20


class TwoBranchNet(nn.Module):
    """A small model whose `side` branch is used on odd steps only and whose `unused` parameter never is, so some
    parameters have grad None on some or all steps."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)
        self.side = nn.Linear(5, 3)
        self.unused = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor, use_side: bool) -> torch.Tensor:
        out = self.head(torch.tanh(self.body(x)))
        return out + self.side(x) if use_side else out


@dataclass(frozen=True)
class Options:
    """One point of the grid: optimiser keywords, and how gradients are cleared between steps."""

    kwargs: dict = field(default_factory=dict)
    set_to_none: bool = True


GRID = {
    "plain": Options({"lr": 0.1}),
    "momentum": Options({"lr": 0.05, "momentum": 0.9}),
    "dampening": Options({"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    "nesterov": Options({"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "weight-decay": Options({"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}),
    "weight-decay-no-momentum": Options({"lr": 0.1, "weight_decay": 5e-3}),
    "maximize": Options({"lr": 0.01, "momentum": 0.5, "weight_decay": 1e-3, "maximize": True}),
    "zero-not-none": Options({"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
                             set_to_none=False),
}


def param_groups(model: TwoBranchNet) -> list[dict]:
    """Two groups; the second overrides lr and weight decay."""
    return [{"params": [*model.body.parameters(), model.unused]},
            {"params": [*model.head.parameters(), *model.side.parameters()], "lr": 0.02, "weight_decay": 0.02}]


def run_steps(model: TwoBranchNet, optimizer: torch.optim.Optimizer, set_to_none: bool, steps: int = STEPS,
              seed: int = 0) -> list[float]:
    """`steps` updates on seeded random batches; the losses step(closure) returned."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        x = torch.randn(6, 5, generator=gen)
        y = torch.randint(0, 3, (6,), generator=gen)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y, use_side: bool = step % 2 == 1) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=set_to_none)
            loss = nn.functional.cross_entropy(model(x, use_side), y)
            loss.backward()
            return loss

        losses.append(optimizer.step(closure).item())
    return losses


def assert_same_state(ours: SGD, reference: torch.optim.SGD, ours_model: nn.Module, reference_model: nn.Module
                      ) -> None:
    for (name, p), q in zip(ours_model.named_parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    ours_state, reference_state = ours.state_dict()["state"], reference.state_dict()["state"]
    assert ours_state.keys() == reference_state.keys()
    for index, entry in reference_state.items():
        assert ours_state[index].keys() == entry.keys() == {"momentum_buffer"}
        assert torch.equal(ours_state[index]["momentum_buffer"], entry["momentum_buffer"]), index


@pytest.mark.parametrize("options", GRID.values(), ids=GRID.keys())
def test_bit_identical_to_torch_single_tensor_sgd(options):
    torch.manual_seed(1)
    ours_model = TwoBranchNet()
    reference_model = copy.deepcopy(ours_model)
    initial = {name: p.detach().clone() for name, p in ours_model.named_parameters()}
    ours = SGD(param_groups(ours_model), **options.kwargs)
    reference = torch.optim.SGD(param_groups(reference_model), foreach=False, **options.kwargs)
    ours_losses = run_steps(ours_model, ours, options.set_to_none)
    reference_losses = run_steps(reference_model, reference, options.set_to_none)
    assert ours_losses == reference_losses
    assert_same_state(ours, reference, ours_model, reference_model)
    for name, p in ours_model.named_parameters():  # a parameter without a gradient never moves; all others do
        assert torch.equal(p, initial[name]) == (name == "unused"), name
    has_momentum = options.kwargs.get("momentum", 0) != 0
    assert (ours_model.unused in ours.state) is False
    assert len(ours.state) == (6 if has_momentum else 0)  # body, head, side (weight and bias each); never unused


def test_groups_and_defaults_match_torch():
    model = TwoBranchNet()
    ours = SGD(param_groups(model), lr=0.05, momentum=0.9, nesterov=True)
    reference = torch.optim.SGD(param_groups(copy.deepcopy(model)), lr=0.05, momentum=0.9, nesterov=True)
    assert ours.defaults == {k: v for k, v in reference.defaults.items() if k not in ("foreach", "differentiable",
                                                                                       "fused")}
    strip = ("params", "foreach", "differentiable", "fused")
    assert [{k: v for k, v in g.items() if k not in strip} for g in ours.param_groups] == \
        [{k: v for k, v in g.items() if k not in strip} for g in reference.param_groups]
    assert SGD([nn.Parameter(torch.zeros(1))]).defaults["lr"] == torch.optim.SGD([nn.Parameter(torch.zeros(1))]
                                                                                 ).defaults["lr"]


@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
def test_state_dict_loads_into_either_class_and_resumes_identically(direction):
    torch.manual_seed(2)
    kwargs = {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3}
    first_model = TwoBranchNet()
    first = SGD(param_groups(first_model), **kwargs) if direction == "ours-to-torch" else \
        torch.optim.SGD(param_groups(first_model), foreach=False, **kwargs)
    run_steps(first_model, first, True, steps=5)
    saved = copy.deepcopy(first.state_dict())

    second_model = copy.deepcopy(first_model)
    second = torch.optim.SGD(param_groups(second_model), foreach=False, **kwargs) if direction == "ours-to-torch" \
        else SGD(param_groups(second_model), **kwargs)
    second.load_state_dict(saved)
    run_steps(first_model, first, True, steps=5, seed=3)
    run_steps(second_model, second, True, steps=5, seed=3)
    for p, q in zip(first_model.parameters(), second_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_step_without_closure_returns_none_and_hooks_run():
    param = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = SGD([param], lr=0.5)
    calls = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
    param.grad = torch.tensor([0.25, 1.0])
    assert optimizer.step() is None
    assert torch.equal(param.detach(), torch.tensor([0.875, -2.5]))
    assert calls == [optimizer]


@pytest.mark.parametrize("kwargs, reason", [
    ({"lr": -0.1}, "lr must be >= 0"),
    ({"lr": float("nan")}, "lr must be finite"),
    ({"lr": torch.tensor(0.1)}, "lr must be a real number"),
    ({"lr": "0.1"}, "lr must be a real number"),
    ({"lr": 0.1, "momentum": -0.5}, "momentum must be >= 0"),
    ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay must be >= 0"),
    ({"lr": 0.1, "dampening": float("inf")}, "dampening must be finite"),
    ({"lr": 0.1, "nesterov": True}, "Nesterov momentum requires"),
    ({"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "Nesterov momentum requires"),
])
def test_bad_arguments_raise_value_error(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        SGD([nn.Parameter(torch.zeros(2))], **kwargs)


def test_empty_parameter_list_raises_value_error():
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)


def test_registry_builds_this_class():
    optimizer = build_optimizer("sgd", [nn.Parameter(torch.zeros(2))], lr=0.05, momentum=0.9, weight_decay=1e-4)
    assert type(optimizer) is SGD
    assert (optimizer.defaults["lr"], optimizer.defaults["momentum"], optimizer.defaults["weight_decay"]) == \
        (0.05, 0.9, 1e-4)


# One local training call as a ClientApp's train handler makes it (masks, momentum, weight decay, grad clipping),
# then a state-dict round trip; the last line checks that torch.optim.SGD's step does import torch._dynamo, so the
# check above it can fail.
NO_DYNAMO_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from torch import nn
    from fedsparse.train import TrainConfig, train_local
    from fedsparse.optim import build_optimizer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 3, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=40).astype(np.int64)
    masks = {"1.weight": (torch.rand(16, 12) > 0.5).float()}
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-4, grad_clip=0.5)
    train_local(model, x, y, cfg, seed=1, masks=masks)
    optimizer = build_optimizer("sgd", model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    optimizer.load_state_dict(optimizer.state_dict())
    print("fedsparse sgd imported dynamo:", "torch._dynamo" in sys.modules)
    reference = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reference.step()
    print("torch.optim.SGD imported dynamo:", "torch._dynamo" in sys.modules)
""")


def test_local_training_never_imports_torch_dynamo():
    out = subprocess.run([sys.executable, "-c", NO_DYNAMO_SCRIPT], check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["fedsparse sgd imported dynamo: False", "torch.optim.SGD imported dynamo: True"]
