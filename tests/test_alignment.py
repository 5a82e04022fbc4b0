"""Alignment: permutations leave each model's function unchanged, weight/activation matching recover a known
permutation, barriers of a model with itself are 0, and REPAIR hits its target statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse.alignment import (
    Evaluation,
    activation_matching,
    apply_permutation,
    assign,
    check_permutation,
    dataset_evaluator,
    invert_permutation,
    linear_barrier,
    permutation_spec,
    random_permutation,
    repair,
    reset_batchnorm_statistics,
    simplex_barrier,
    simplex_grid,
    weight_matching,
)
from fedsparse.merging import record_channel_stats
from fedsparse.models import build_model

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 16, 16), "resnet18": (3, 32, 32)}


def permuted_copy(name: str, model: nn.Module, seed: int):
    spec = permutation_spec(name, model)
    permutation = random_permutation(spec, torch.Generator().manual_seed(seed))
    other = build_model(name, SHAPES[name], 10)
    other.load_state_dict(apply_permutation(spec, permutation, model.state_dict()))
    return spec, permutation, other


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_permutation_leaves_the_function_unchanged(name):
    torch.manual_seed(0)
    model = build_model(name, SHAPES[name], 10, seed=1).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # GroupNorm starts at weight 1, bias 0: make every entry distinct
            parameter.add_(0.1 * torch.randn_like(parameter))
    _, _, other = permuted_copy(name, model, seed=2)
    other.eval()
    changed = [key for key, value in model.state_dict().items() if not torch.equal(value, other.state_dict()[key])]
    assert len(changed) == len(model.state_dict()) - 1  # everything but the output bias moved
    x = torch.randn(1 if name == "resnet18" else 4, *SHAPES[name])
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=1e-5)


def test_resnet_permutations_keep_groupnorm_groups():
    model = build_model("resnet18", SHAPES["resnet18"], 10, seed=1)
    spec = permutation_spec("resnet18", model)
    assert spec.group_size("stage4") == 16 and spec.group_size("layer1.0") == 2
    permutation = random_permutation(spec, torch.Generator().manual_seed(0))
    check_permutation(spec, permutation)
    broken = dict(permutation)
    broken["stage1"] = permutation["stage1"].roll(1)  # shifts every unit across a group boundary
    with pytest.raises(ValueError, match="splits groups"):
        check_permutation(spec, broken)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_matching_recovers_a_known_permutation(name, seed):
    model = build_model(name, SHAPES[name], 10, seed=seed)
    spec, permutation, other = permuted_copy(name, model, seed=seed + 10)
    result = weight_matching(spec, model.state_dict(), other.state_dict(), seed=seed)
    inverse = invert_permutation(permutation)
    for key in spec.sizes:
        assert torch.equal(result.permutation[key], inverse[key]), key
    aligned = apply_permutation(spec, result.permutation, other.state_dict())
    assert all(torch.equal(aligned[key], value) for key, value in model.state_dict().items())


def test_weight_matching_is_robust_to_small_noise():
    model = build_model("mlp", SHAPES["mlp"], 10, seed=3)
    spec, permutation, other = permuted_copy("mlp", model, seed=4)
    generator = torch.Generator().manual_seed(5)
    noisy = {key: value + 0.01 * value.std() * torch.randn(value.shape, generator=generator)
             for key, value in other.state_dict().items()}
    result = weight_matching(spec, model.state_dict(), noisy)
    inverse = invert_permutation(permutation)
    assert all(torch.equal(result.permutation[key], inverse[key]) for key in spec.sizes)


def test_grouped_assignment_keeps_groups_and_finds_the_block_optimum():
    generator = np.random.default_rng(0)
    truth = np.array([6, 7, 4, 5, 1, 0, 3, 2])  # groups of 2 map to groups of 2
    score = generator.normal(size=(8, 8)) * 0.1
    score[np.arange(8), truth] += 5.0
    assert assign(score, group_size=2).tolist() == truth.tolist()
    assert assign(score, group_size=1).tolist() == truth.tolist()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_activation_matching_recovers_a_known_permutation(name):
    model = build_model(name, SHAPES[name], 10, seed=7)
    spec, permutation, other = permuted_copy(name, model, seed=8)
    batches = [torch.randn(64, *SHAPES[name], generator=torch.Generator().manual_seed(9))]
    found = activation_matching(spec, model, other, batches)
    inverse = invert_permutation(permutation)
    assert all(torch.equal(found[key], inverse[key]) for key in spec.sizes)


def fixed_evaluator(x: torch.Tensor, y: torch.Tensor):
    return dataset_evaluator(x.numpy(), y.numpy())


def test_a_model_with_itself_has_zero_barrier():
    model = build_model("mlp", SHAPES["mlp"], 10, seed=0)
    generator = torch.Generator().manual_seed(0)
    evaluate = fixed_evaluator(torch.randn(50, *SHAPES["mlp"], generator=generator),
                               torch.randint(0, 10, (50,), generator=generator))
    state = model.state_dict()
    two = linear_barrier(model, state, state, evaluate, num_points=5)
    assert two.loss_barrier == pytest.approx(0.0, abs=1e-9) and two.accuracy_barrier == pytest.approx(0.0, abs=1e-9)
    assert [weights[1] for weights in two.weights] == [0.0, 0.25, 0.5, 0.75, 1.0]
    three = simplex_barrier(model, [state, state, state], evaluate, resolution=3)
    assert len(three.weights) == 10
    assert three.loss_barrier == pytest.approx(0.0, abs=1e-9)


def test_barrier_of_two_different_models_is_measured_against_the_chord():
    """With a stub evaluator whose loss is a known function of one weight, the barrier is that function's maximum
    gap above the straight line between the endpoints."""
    model = nn.Linear(1, 1, bias=False)
    original = model.weight.detach().clone()
    losses = {}

    def evaluate(module: nn.Module) -> Evaluation:
        weight = float(module.weight.detach())
        losses[weight] = 1.0 - (weight - 1.0) ** 2  # 0 at w=0 and w=2, peak 1 at w=1
        return Evaluation(losses[weight], 1.0 - losses[weight] / 2)

    result = linear_barrier(model, {"weight": torch.zeros(1, 1)}, {"weight": torch.full((1, 1), 2.0)}, evaluate,
                            num_points=5)
    assert result.loss_barrier == pytest.approx(1.0) and result.accuracy_barrier == pytest.approx(0.5)
    assert sorted(losses) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert torch.equal(model.weight.detach(), original)  # the caller's model is not loaded
    assert len(simplex_grid(3, 4)) == 15


def test_repair_sets_interpolated_statistics():
    model_a = build_model("cnn", SHAPES["cnn"], 10, seed=0)
    model_b = build_model("cnn", SHAPES["cnn"], 10, seed=1)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, *SHAPES["cnn"], generator=generator) for _ in range(2)]
    layers = ["0.0", "0.3", "1"]
    for fuse in (True, False):
        result = repair(model_a, model_b, 0.5, layers, batches, fuse=fuse)
        assert result.fused == fuse
        after = record_channel_stats(result.model, layers, batches)
        for layer in layers:
            torch.testing.assert_close(after[layer].mean, result.targets[layer].mean, rtol=0, atol=1e-4)
            torch.testing.assert_close(after[layer].std, result.targets[layer].std, rtol=0, atol=1e-4)
    stats_a = record_channel_stats(model_a, layers, batches)
    torch.testing.assert_close(result.targets["1"].std,
                               0.5 * (stats_a["1"].std + record_channel_stats(model_b, layers, batches)["1"].std))
    plain = build_model("cnn", SHAPES["cnn"], 10)
    plain.load_state_dict({key: (model_a.state_dict()[key] + model_b.state_dict()[key]) / 2
                           for key in model_a.state_dict()})
    collapsed = record_channel_stats(plain, layers, batches)["1"].std
    assert float((collapsed - result.targets["1"].std).abs().max()) > 1e-3  # interpolation did shrink the std


def test_reset_batchnorm_statistics_is_a_cumulative_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    batches = [torch.randn(8, 3), torch.randn(8, 3)]
    reset_batchnorm_statistics(model, batches)
    with torch.no_grad():
        features = [model[0](batch) for batch in batches]
    expected_mean = (features[0].mean(0) + features[1].mean(0)) / 2  # equal batch sizes: mean of batch means
    expected_var = (features[0].var(0) + features[1].var(0)) / 2
    torch.testing.assert_close(model[1].running_mean, expected_mean)
    torch.testing.assert_close(model[1].running_var, expected_var)
    assert model[1].momentum == 0.1 and model.training
