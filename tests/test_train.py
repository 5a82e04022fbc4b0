"""Local training's seams (optimiser, objective, after-step callbacks): the default SGD path is bit-identical to the
loop before the seams, every registered optimiser trains through `train_local` with masks kept, an objective's
penalty changes the result (and with weight 0 does not), callbacks run once per optimiser step, and masks hold
against a callback that moves weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse.models import build_model
from fedsparse.optim import OPTIMIZERS
from fedsparse.train import TrainConfig, apply_masks, cross_entropy, train_local

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pre_registry_train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *, seed: int,
                             masks: dict[str, torch.Tensor]) -> float:
    """train_local as it was before the optimiser registry (commit fdcf5d1) and the objective/callback seams, CPU only:
    the oracle for the default SGD path."""
    model.train()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    total, count = 0.0, 0
    apply_masks(model, masks)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = xt[idx], yt[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            for name, mask in masks.items():
                params[name].grad.mul_(mask)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            apply_masks(model, masks)
            total += loss.item() * len(idx)
            count += len(idx)
    return total / max(count, 1)


def blobs(seed: int, n: int = 120, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian blobs as 1x4x4 'images'."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, 16)) * 3.0
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.standard_normal((n, 16))
    return x.reshape(n, 1, 4, 4).astype(np.float32), y.astype(np.int64)


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def random_masks(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.rand(p.shape, generator=gen) < 0.7).float()
            for name, p in model.named_parameters() if name.endswith("weight")}


@pytest.mark.parametrize("settings", [
    {"momentum": 0.9, "weight_decay": 5e-4, "grad_clip": 0.0, "masked": True},
    {"momentum": 0.0, "weight_decay": 0.0, "grad_clip": 1.0, "masked": False},
])
def test_sgd_path_is_bit_identical_to_the_loop_before_the_registry(settings):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((48, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 48).astype(np.int64)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=settings["momentum"],
                      weight_decay=settings["weight_decay"], grad_clip=settings["grad_clip"])
    assert cfg.optimizer == "sgd"
    new, old = build_model("cnn", (1, 8, 8), 10, seed=1), build_model("cnn", (1, 8, 8), 10, seed=1)
    masks = random_masks(new, 5) if settings["masked"] else {}
    new_loss = train_local(new, x, y, cfg, seed=3, masks=masks)
    old_loss = pre_registry_train_local(old, x, y, cfg, seed=3, masks=masks)
    assert new_loss == old_loss
    for name, tensor in old.state_dict().items():
        assert torch.equal(new.state_dict()[name], tensor), name


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registered_optimizer_learns_and_keeps_pruned_weights_zero(name):
    """Three seeds; the loss on the training blobs must fall to under a fifth of the untrained loss (measured: at
    most 0.022 of it over five seeds)."""
    lr = 0.05 if name in ("sgd", "tam") else 0.01
    for seed in range(3):
        x, y = blobs(seed)
        torch.manual_seed(seed)
        model = small_mlp()
        masks = random_masks(model, seed)
        apply_masks(model, masks)
        with torch.no_grad():
            before = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).item()
        train_local(model, x, y, TrainConfig(epochs=3, batch_size=16, lr=lr, momentum=0.9, optimizer=name),
                    seed=seed, masks=masks)
        with torch.no_grad():
            after = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).item()
        assert after < 0.2 * before, (name, seed, before, after)
        params = dict(model.named_parameters())
        for weight_name, mask in masks.items():
            assert torch.all(params[weight_name][mask == 0] == 0), (name, weight_name)


def test_unknown_optimizer_fails_naming_the_choices():
    x, y = blobs(0, n=8)
    with pytest.raises(ValueError, match="sgd, adam, tam, adatam, adatamw"):
        train_local(small_mlp(), x, y, TrainConfig(optimizer="lamb"), seed=0)


def squared_norm_objective(weight: float):
    """Cross-entropy + weight * sum of squared parameters (an L2 penalty toward zero)."""
    def objective(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        penalty = sum((p ** 2).sum() for p in model.parameters())
        return cross_entropy(model, logits, targets) + weight * penalty
    return objective


def trained(objective=None, callbacks=(), masks_seed: int | None = None, seed: int = 0
            ) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, weights, masks) after two epochs of SGD with momentum on blobs, from a fixed initialisation."""
    x, y = blobs(seed, n=50)
    torch.manual_seed(seed)
    model = small_mlp()
    masks = random_masks(model, masks_seed) if masks_seed is not None else {}
    loss = train_local(model, x, y, TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9), seed=seed,
                       masks=masks, objective=objective, callbacks=callbacks)
    return loss, {k: v.clone() for k, v in model.state_dict().items()}, masks


@pytest.mark.parametrize("seed", range(3))
def test_an_objective_penalty_changes_the_result_and_with_weight_zero_does_not(seed):
    base_loss, base, _ = trained(seed=seed)
    zero_loss, zero, _ = trained(squared_norm_objective(0.0), seed=seed)
    assert zero_loss == base_loss
    assert all(torch.equal(zero[k], base[k]) for k in base)
    penalised_loss, penalised, _ = trained(squared_norm_objective(0.05), seed=seed)
    norm = sum(float((v ** 2).sum()) for v in base.values())
    penalised_norm = sum(float((v ** 2).sum()) for v in penalised.values())
    assert penalised_norm < 0.95 * norm, (penalised_norm, norm)  # the penalty pulls the weights toward zero
    assert penalised_loss > base_loss  # the reported loss is the objective's value, penalty included


def test_callbacks_run_once_per_optimiser_step_in_order_with_the_step_number():
    calls: list[tuple[str, int]] = []
    first = lambda model, step: calls.append(("first", step))
    second = lambda model, step: calls.append(("second", step))
    trained(callbacks=[first, second])
    steps = 2 * -(-50 // 16)  # two epochs of ceil(50 / 16) minibatches
    assert calls == [(name, step) for step in range(1, steps + 1) for name in ("first", "second")]


def test_a_callback_that_moves_weights_cannot_revive_pruned_ones():
    """The callback adds 0.1 to every parameter after each step; the mask is applied after the callbacks."""
    def shift(model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1)

    _, plain, masks = trained(masks_seed=4)
    _, shifted, _ = trained(callbacks=[shift], masks_seed=4)
    for name, mask in masks.items():
        assert torch.all(shifted[name][mask == 0] == 0), name
        assert not torch.equal(shifted[name][mask == 1], plain[name][mask == 1]), name  # the callback did act
    assert not torch.equal(shifted["1.bias"], plain["1.bias"])  # unmasked tensors keep the callback's moves
