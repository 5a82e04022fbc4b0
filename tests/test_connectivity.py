"""Connectivity building blocks: the width multiplier of `fedsparse.models` (width 1 is the original model bit for
bit), permutation specs and weight matching on widened models, and the IMP of `simulations/bench_connectivity.py`
(pruned weights stay exactly 0 through retraining; masks only shrink)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse.alignment import apply_permutation, permutation_spec, random_permutation, weight_matching
from fedsparse.models import build_model
from tests.conftest import load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_bench():
    return load_script("bench_connectivity")


def original_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`fedsparse.models.mlp` as it was before the width multiplier."""
    size = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(size, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                         nn.Linear(200, num_classes))


def original_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`fedsparse.models.cnn` as it was before the width multiplier."""
    channels, height, width = input_shape
    features = nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = 64 * (height // 4) * (width // 4)
    return nn.Sequential(features, nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))


@pytest.mark.parametrize("name,builder,shape", [("mlp", original_mlp, (1, 28, 28)), ("cnn", original_cnn, (1, 16, 16)),
                                                ("cnn", original_cnn, (3, 32, 32))])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_width_one_is_the_original_model_bit_for_bit(name, builder, shape, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = builder(shape, 10).state_dict()
    for model in (build_model(name, shape, 10, seed=seed), build_model(name, shape, 10, seed=seed, width=1)):
        state = model.state_dict()
        assert list(state) == list(reference)
        for key, value in reference.items():
            assert torch.equal(state[key], value), key


def test_width_multiplies_the_hidden_sizes():
    mlp = build_model("mlp", (1, 8, 8), 10, seed=0, width=3)
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [600, 600, 10]
    cnn = build_model("cnn", (1, 16, 16), 10, seed=0, width=2)
    assert (cnn[0][0].out_channels, cnn[0][3].out_channels, cnn[1].out_features) == (64, 128, 256)
    assert cnn[1].in_features == 128 * 4 * 4


@pytest.mark.parametrize("width", [0, -1, 1.5, True])
def test_bad_width_is_a_value_error(width):
    with pytest.raises(ValueError, match="width"):
        build_model("mlp", (1, 8, 8), 10, width=width)


def test_resnet18_rejects_a_width_multiplier():
    with pytest.raises(ValueError, match="width"):
        build_model("resnet18", (3, 32, 32), 10, width=2)


@pytest.mark.parametrize("name,shape,width", [("mlp", (1, 8, 8), 3), ("cnn", (1, 16, 16), 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_model_permutation_keeps_function_and_weight_matching_recovers_it(name, shape, width, seed):
    model = build_model(name, shape, 10, seed=seed, width=width).eval()
    spec = permutation_spec(name, model)
    assert spec.sizes["P0"] == (200 if name == "mlp" else 32) * width
    permutation = random_permutation(spec, torch.Generator().manual_seed(seed))
    state = model.state_dict()
    permuted_state = apply_permutation(spec, permutation, state)
    assert any(not torch.equal(permuted_state[k], state[k]) for k in state)
    permuted = build_model(name, shape, 10, width=width).eval()
    permuted.load_state_dict(permuted_state)
    inputs = torch.randn(16, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-5, rtol=0)
    found = weight_matching(spec, state, permuted_state).permutation
    recovered = apply_permutation(spec, found, permuted_state)
    for key, value in state.items():
        assert torch.equal(recovered[key], value), key


def test_prune_masks_by_hand():
    bench = load_bench()
    state = {"a": torch.tensor([[0.5, -3.0], [0.1, 2.0]]), "b": torch.tensor([1.0, -0.2, 4.0, 0.3])}
    first = bench.prune_masks(state, ["a", "b"], {}, 0.5)  # keep 4 of 8: |-3|, 2, 1, 4
    assert torch.equal(first["a"], torch.tensor([[False, True], [False, True]]))
    assert torch.equal(first["b"], torch.tensor([True, False, True, False]))
    # a pruned weight never comes back, even when it is now the largest: keep 2 of the 4 survivors (4, |-3|)
    grown = {"a": torch.tensor([[9.0, -3.0], [0.1, 2.0]]), "b": torch.tensor([1.0, -0.2, 4.0, 0.3])}
    second = bench.prune_masks(grown, ["a", "b"], first, 0.5)
    assert torch.equal(second["a"], torch.tensor([[False, True], [False, False]]))
    assert torch.equal(second["b"], torch.tensor([False, False, True, False]))
    with pytest.raises(ValueError, match="fraction"):
        bench.prune_masks(state, ["a"], {}, 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imp_keeps_pruned_weights_exactly_zero_through_retraining(seed):
    bench = load_bench()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 10, size=256).astype(np.int64)
    data = bench.Data(x, y, x[:64], y[:64], (1, 6, 6))
    model = build_model("mlp", data.input_shape, 10, seed=seed)
    run = bench.iterative_magnitude_pruning(model, data, epochs=3, rewind_epoch=1, levels=3, fraction=0.2, lr=0.05,
                                            seed=seed)
    assert len(run.states) == len(run.masks) == 4 and run.masks[0] == {}
    total = sum(mask.numel() for mask in run.masks[1].values())
    kept = total
    for level in range(1, 4):
        masks, state, previous = run.masks[level], run.states[level], run.masks[level - 1]
        kept = round(kept * 0.8)
        assert sum(int(mask.sum()) for mask in masks.values()) == kept
        assert bench.mask_density(masks) == pytest.approx(kept / total)
        for key, mask in masks.items():
            assert bool((state[key][~mask] == 0).all()), (level, key)  # exactly zero after retraining
            if previous:
                assert not bool((mask & ~previous[key]).any())  # masks only shrink
        # the surviving weights were retrained (they differ from the previous level's)
        assert any(not torch.equal(state[key][mask], run.states[level - 1][key][mask]) for key, mask in masks.items())


def test_train_epochs_rejects_unknown_mask_names():
    bench = load_bench()
    model = build_model("mlp", (1, 4, 4), 10, seed=0)
    x = np.zeros((8, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="no parameter"):
        bench.train_epochs(model, x, np.zeros(8, np.int64), epochs=1, lr=0.1, seed=0, masks={"nope": torch.ones(1)})


def test_interior_gaps_are_signed_and_skip_the_vertices():
    from fedsparse.alignment import BarrierResult, Evaluation

    bench = load_bench()
    result = BarrierResult(weights=((1.0, 0.0), (0.5, 0.5), (0.0, 1.0)),
                           evaluations=(Evaluation(1.0, 0.8), Evaluation(0.7, 0.9), Evaluation(2.0, 0.6)),
                           loss_barrier=0.0, accuracy_barrier=0.0)
    loss_gap, accuracy_gap = bench.interior_gaps(result)
    assert loss_gap == pytest.approx(0.7 - 1.5) and accuracy_gap == pytest.approx(0.7 - 0.9)


def test_train_epochs_snapshots_at_the_asked_steps():
    bench = load_bench()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(130, 1, 4, 4)).astype(np.float32)  # 3 steps per epoch (64 + 64 + 2)
    y = rng.integers(0, 10, size=130).astype(np.int64)
    by_epoch = bench.train_epochs(build_model("mlp", (1, 4, 4), 10, seed=0), x, y, epochs=2, lr=0.1, seed=0)
    by_step = bench.train_epochs(build_model("mlp", (1, 4, 4), 10, seed=0), x, y, epochs=2, lr=0.1, seed=0,
                                 snapshot_steps=[6, 1, 3])
    assert len(by_epoch) == 2 and len(by_step) == 3
    for key in by_epoch[0]:
        assert torch.equal(by_step[1][key], by_epoch[0][key]) and torch.equal(by_step[2][key], by_epoch[1][key])
    assert any(not torch.equal(by_step[0][key], by_step[1][key]) for key in by_epoch[0])
    with pytest.raises(ValueError, match="snapshot steps"):
        bench.train_epochs(build_model("mlp", (1, 4, 4), 10, seed=0), x, y, epochs=2, lr=0.1, seed=0,
                           snapshot_steps=[7])
