"""Transfer unlearning by data selection (`fedsparse.unlearning.transfer`): exact neighbour selection with
deterministic ties, features from the pretrained model, the penultimate-layer hook on every model, and the
guarantee that no non-static example ever reaches a gradient."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse.models import build_model
from fedsparse.unlearning.core import ArrayData
from fedsparse.unlearning.transfer import (
    IndexedData,
    TransferConfig,
    TransferTask,
    classifier_head,
    finetune_on,
    format_transfer_table,
    penultimate_features,
    select_neighbours,
    split_static,
    training_set,
    transfer,
    transfer_table,
)

DIM = 16


def blobs(rng: np.random.Generator, centers: np.ndarray, per_class: int, noise: float = 1.0) -> ArrayData:
    """`per_class` Gaussian points around each center, labelled by the center's index."""
    x = np.concatenate([c + noise * rng.standard_normal((per_class, centers.shape[1])) for c in centers])
    y = np.repeat(np.arange(len(centers)), per_class)
    return ArrayData(x.astype(np.float32), y.astype(np.int64))


def pretrained_mlp(seed: int = 0) -> nn.Module:
    """A small MLP trained on a 4-class source task in DIM dimensions."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(100 + seed)
    source = blobs(rng, 3 * rng.standard_normal((4, DIM)), 30)
    model = build_model("mlp", (DIM,), 4, seed=seed)
    data = IndexedData(source.x, source.y, np.arange(len(source)))
    return finetune_on(model, data, TransferConfig(epochs=2, lr=0.05, seed=seed)).model


def small_task(seed: int, static_fraction: float = 0.5, per_class: int = 10) -> TransferTask:
    """A 3-class target task, an auxiliary pool drawn from the same classes, and a test set."""
    rng = np.random.default_rng(seed)
    centers = 3 * rng.standard_normal((3, DIM))
    target = blobs(rng, centers, per_class)
    return TransferTask(target, split_static(len(target), static_fraction, seed), blobs(rng, centers, 40),
                        blobs(rng, centers, 30))


FAST = TransferConfig(epochs=2, batch_size=8, lr=0.05, neighbours=2)


@pytest.fixture(scope="module")
def pretrained() -> nn.Module:
    """One pretrained MLP for the module (transfer never modifies it; a test checks that)."""
    return pretrained_mlp()


# ----------------------------------------------------------------------------------------------------------------
# Neighbour selection


def test_select_neighbours_hand_built_ties_go_to_the_lower_pool_index():
    pool = np.array([[3, 0], [1, 0], [0, 1], [1, 0], [0, -1], [0, 0.5]], dtype=float)
    query = np.array([[0, 0], [3, 0.1]], dtype=float)
    chosen = select_neighbours(query, pool, 3)
    # query 0: 0.5 (index 5), then four points at distance 1 (indices 1, 2, 3, 4): the lowest two win
    assert chosen.pool_index[0].tolist() == [5, 1, 2]
    assert chosen.distances[0].tolist() == [0.5, 1.0, 1.0]
    # query 1: index 0 at 0.1, then indices 1 and 3 (both (1, 0)) tie at sqrt(4.01)
    assert chosen.pool_index[1].tolist() == [0, 1, 3]
    assert chosen.distances[1] == pytest.approx([0.1, np.sqrt(4.01), np.sqrt(4.01)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_neighbours_equals_brute_force_on_integer_grids_full_of_ties(seed):
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 3, size=(60, 3)).astype(float)  # many duplicates and equal distances
    queries = rng.integers(0, 3, size=(20, 3)).astype(float)
    k = 7
    chosen = select_neighbours(queries, pool, k)
    for q, query in enumerate(queries):
        squared = ((pool - query) ** 2).sum(axis=1)  # exact on integers
        expected = np.lexsort((np.arange(len(pool)), squared))[:k]
        assert chosen.pool_index[q].tolist() == expected.tolist()
        assert np.allclose(chosen.distances[q], np.sqrt(squared[expected]))


def test_select_neighbours_rejects_bad_arguments():
    pool = np.zeros((4, 2))
    with pytest.raises(ValueError, match="k must be"):
        select_neighbours(np.zeros((1, 2)), pool, 5)
    with pytest.raises(ValueError, match="equal widths"):
        select_neighbours(np.zeros((1, 3)), pool, 1)


# ----------------------------------------------------------------------------------------------------------------
# Features


@pytest.mark.parametrize("name, shape", [("mlp", (DIM,)), ("cnn", (1, 16, 16)),
                                         pytest.param("resnet18", (3, 8, 8), marks=pytest.mark.slow)])
def test_penultimate_features_are_the_input_of_the_head(name, shape):
    model = build_model(name, shape, 5, seed=0)
    data = ArrayData(torch.randn(3, *shape, generator=torch.Generator().manual_seed(1)).numpy(),
                     np.zeros(3, dtype=np.int64))
    features = penultimate_features(model, data, batch_size=2)
    headless = copy.deepcopy(model).eval()
    head_name, head = classifier_head(headless)
    parent, _, attribute = head_name.rpartition(".")
    setattr(headless.get_submodule(parent) if parent else headless, attribute, nn.Identity())
    with torch.no_grad():
        expected = headless(torch.from_numpy(data.x)).double().numpy()
    assert features.shape == (3, head.in_features)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)  # batch size 2 vs 3: conv rounding
    assert model.training  # mode restored


# ----------------------------------------------------------------------------------------------------------------
# The guarantee: no non-static example ever reaches a gradient


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_non_static_example_reaches_a_gradient(seed, pretrained):
    task = small_task(seed)
    non_static = set(task.non_static_ids.tolist())
    static = set(task.static_ids.tolist())
    cfg = dataclasses.replace(FAST, seed=seed)
    # An instrument independent of the loop's own record: every input row the first layer sees with gradients on.
    # (Module hooks travel with the deep copies that `transfer` makes.)
    rows_in_graph: list[bytes] = []

    def record_inputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            rows_in_graph.extend(row.tobytes() for row in inputs[0].detach().numpy())

    non_static_rows = {row.tobytes() for row in task.target.x[task.non_static_ids]}
    handle = pretrained[1].register_forward_pre_hook(record_inputs)
    try:
        selected = transfer("data_selection", pretrained, task, cfg)
        selected_rows = set(rows_in_graph)
        rows_in_graph.clear()
        static_only = transfer("static_only", pretrained, task, cfg)
        static_only_rows = set(rows_in_graph)
        rows_in_graph.clear()
        everything = transfer("all_data", pretrained, task, cfg)
        all_rows = set(rows_in_graph)
    finally:
        handle.remove()

    trained = set(selected.trained_ids.tolist())
    assert trained.isdisjoint(non_static)
    assert selected_rows.isdisjoint(non_static_rows)
    picked_ids = set(task.auxiliary_ids[selected.selected_pool_index].tolist())
    assert trained == static | picked_ids  # every static and every selected example was trained on
    assert len(picked_ids) >= 2

    assert set(static_only.trained_ids.tolist()) == static
    assert static_only_rows.isdisjoint(non_static_rows)

    # the instruments do see non-static data when it is trained on
    assert set(everything.trained_ids.tolist()) == static | non_static
    assert non_static_rows <= all_rows


def test_finetune_on_records_only_the_batches_it_backpropagates():
    model = build_model("mlp", (DIM,), 3, seed=0)
    backward_calls = []

    def count_backward(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda _grad: backward_calls.append(1))

    model[1].register_forward_hook(count_backward)
    data = IndexedData(np.zeros((10, DIM), np.float32), np.zeros(10, np.int64), np.arange(100, 110))
    run = finetune_on(model, data, TransferConfig(epochs=2, batch_size=4))
    assert run.trained_ids.tolist() == list(range(100, 110))
    assert len(backward_calls) == 2 * 3  # 3 minibatches per epoch
    backward_calls.clear()
    budgeted = finetune_on(model, data, TransferConfig(epochs=1, steps=7, batch_size=4))
    assert len(backward_calls) == 7 and budgeted.trained_ids.tolist() == list(range(100, 110))
    with pytest.raises(ValueError, match="empty"):
        finetune_on(model, IndexedData(data.x[:0], data.y[:0], data.ids[:0]), TransferConfig())


# ----------------------------------------------------------------------------------------------------------------
# Selection happens in the pretrained model's feature space


def test_selection_uses_the_pretrained_features_not_the_finetuned_ones(pretrained):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    task = small_task(0)
    cfg = dataclasses.replace(FAST, neighbours=1)
    calls = []

    def spy(model: nn.Module, data: ArrayData) -> np.ndarray:
        state = model.state_dict()
        calls.append(all(torch.equal(state[k], before[k]) for k in before))
        return penultimate_features(model, data)

    result = transfer("data_selection", pretrained, task, cfg, feature_fn=spy)
    assert calls == [True, True]  # queries and pool, both embedded by the untouched pretrained model
    assert all(torch.equal(v, before[k]) for k, v in pretrained.state_dict().items())  # pretrained left unchanged

    queries = task.target.subset(task.non_static_ids)
    expected = select_neighbours(penultimate_features(pretrained, queries),
                                 penultimate_features(pretrained, task.auxiliary), 1).pool_index.reshape(-1)
    assert result.selected_pool_index.tolist() == expected.tolist()
    finetuned = select_neighbours(penultimate_features(result.model, queries),
                                  penultimate_features(result.model, task.auxiliary), 1).pool_index.reshape(-1)
    assert finetuned.tolist() != expected.tolist()  # the finetuned space would pick differently


def test_selected_examples_take_the_label_chosen_by_label_source():
    target = ArrayData(np.array([[0.0], [10.0], [20.0]], np.float32), np.array([0, 1, 2], np.int64))
    auxiliary = ArrayData(np.array([[19.0], [1.0], [11.0], [50.0]], np.float32), np.array([7, 8, 9, 6], np.int64))
    task = TransferTask(target, np.array([True, False, False]), auxiliary, target)

    def identity(_model: nn.Module, data: ArrayData) -> np.ndarray:
        return data.x.astype(np.float64)

    model = build_model("mlp", (1,), 3, seed=0)
    by_query = training_set("data_selection", model, task, TransferConfig(neighbours=1), feature_fn=identity)
    assert by_query.selected_pool_index.tolist() == [2, 0]  # 10 -> 11, 20 -> 19
    assert by_query.data.ids.tolist() == [0, 3 + 2, 3 + 0]
    assert by_query.data.y.tolist() == [0, 1, 2]
    by_own = training_set("data_selection", model, task, TransferConfig(neighbours=1, label_source="auxiliary"),
                          feature_fn=identity)
    assert by_own.data.y.tolist() == [0, 9, 7]
    with pytest.raises(ValueError, match="unknown transfer method"):
        training_set("retrain", model, task, TransferConfig())


# ----------------------------------------------------------------------------------------------------------------
# Splits and the table


def test_split_static_counts_and_is_seeded():
    mask = split_static(10, 0.25, seed=3)
    assert mask.sum() == round(2.5) and mask.dtype == np.bool_
    assert np.array_equal(mask, split_static(10, 0.25, seed=3))
    with pytest.raises(ValueError):
        split_static(10, 1.5, seed=0)
    with pytest.raises(ValueError, match="boolean mask"):
        TransferTask(ArrayData(np.zeros((2, 1), np.float32), np.zeros(2, np.int64)), np.array([1, 0]),
                     ArrayData(np.zeros((1, 1), np.float32), np.zeros(1, np.int64)),
                     ArrayData(np.zeros((1, 1), np.float32), np.zeros(1, np.int64)))


def test_transfer_table_rows_and_format(pretrained):
    task = small_task(0)
    rows = transfer_table(pretrained, task.target, task.auxiliary, task.test, static_fractions=[0.25, 0.75],
                          seeds=[0, 1], cfg=dataclasses.replace(FAST, epochs=1))
    assert [(r.static_fraction, r.seed, r.method) for r in rows[:3]] == [
        (0.25, 0, "data_selection"), (0.25, 0, "static_only"), (0.25, 0, "all_data")]
    assert len(rows) == 2 * 2 * 3
    sizes = {(r.static_fraction, r.method): r.train_examples for r in rows if r.seed == 0}
    # 30 target examples: static part, plus k=2 selected per non-static example for data selection
    assert sizes[(0.25, "static_only")] == 8 and sizes[(0.25, "data_selection")] == 8 + 2 * 22
    assert sizes[(0.25, "all_data")] == 30 and sizes[(0.75, "static_only")] == 22
    assert all(0 <= r.test_accuracy <= 1 for r in rows)
    text = format_transfer_table(rows)
    assert text.splitlines()[0] == "| static fraction | data_selection | static_only | all_data | seeds |"
    assert text.splitlines()[2].startswith("| 0.25 | ") and text.splitlines()[2].endswith(" | 2 |")
