"""Continual learning library (`fedsparse.continual`): SFA, penalties and Fisher, replay, metrics, streams, driver.

Hand-computed checks wherever possible; the driver runs use the split `digits` stream (offline, ~300 train images
per task) with a small MLP and take about a second each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse.continual import (
    FisherEstimate,
    ReplayBuffer,
    ServerSFA,
    SFACallback,
    SFAConfig,
    SFASchedule,
    StreamConfig,
    TaskMergeConfig,
    TaskMerger,
    aggregate_fishers,
    average_accuracy,
    average_forgetting,
    average_model_,
    backward_transfer,
    domain_stream,
    estimate_fisher,
    ewc_penalty,
    l2_penalty,
    permuted_stream,
    plot_matrix,
    run_stream,
    sfa_average,
    split_stream,
    steps_per_task,
    train_task,
    with_replay,
    write_matrix_csv,
)
from fedsparse.continual.metrics import read_matrix_csv
from fedsparse.continual.sfa import StateMismatch
from fedsparse.continual.streams import partition_task, to_grey_resized
from fedsparse.models import build_model
from fedsparse.train import TrainConfig, evaluate, train_local
from tests.conftest import SHARED_DATA

FAST_TRAIN = TrainConfig(epochs=3, batch_size=16, lr=0.05, momentum=0.5)  # 57 steps on a 289-image task


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyNet(nn.Module):
    """A 2 -> 2 linear layer plus an integer buffer (which SFA must copy, not average)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("counter", torch.tensor([7], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _set_tiny(model: TinyNet, weight: list[list[float]], bias: list[float], counter: int) -> None:
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor(weight))
        model.linear.bias.copy_(torch.tensor(bias))
        model.counter.fill_(counter)


@pytest.fixture(scope="module")
def digit_tasks():
    """The first two tasks of split digits: (0, 1) and (2, 3)."""
    return split_stream("digits", classes_per_task=2)[:2]


def _mlp(tasks, seed: int = 0) -> nn.Module:
    return build_model("mlp", tasks[0].input_shape, 10, seed=seed)


# ------------------------------------------------------------------------------------------------------ SFA


def test_sfa_average_equals_formula_by_hand():
    current, anchor = TinyNet(), TinyNet()
    _set_tiny(current, [[1.0, 2.0], [-4.0, 0.5]], [8.0, 0.0], counter=3)
    _set_tiny(anchor, [[5.0, -2.0], [0.0, 0.5]], [0.0, 4.0], counter=9)
    before = {k: v.clone() for k, v in current.state_dict().items()}
    averaged = sfa_average(current.state_dict(), anchor.state_dict(), beta=0.25)
    # 0.75 * current + 0.25 * anchor, entry by entry (all exact in binary floating point)
    assert torch.equal(averaged["linear.weight"], torch.tensor([[2.0, 1.0], [-3.0, 0.5]]))
    assert torch.equal(averaged["linear.bias"], torch.tensor([6.0, 1.0]))
    assert torch.equal(averaged["counter"], torch.tensor([3]))  # non-float: the current model's copy
    assert all(torch.equal(before[k], v) for k, v in current.state_dict().items())  # inputs untouched

    weight_tensor = current.linear.weight
    average_model_(current, anchor.state_dict(), beta=0.25)
    assert current.linear.weight is weight_tensor  # in place: an optimiser holding it keeps its state
    assert all(torch.equal(averaged[k], v) for k, v in current.state_dict().items())


def test_sfa_average_rejects_bad_arguments():
    model = TinyNet()
    with pytest.raises(ValueError, match="beta"):
        sfa_average(model.state_dict(), model.state_dict(), beta=1.5)
    with pytest.raises(StateMismatch, match="missing"):
        sfa_average(model.state_dict(), {"linear.weight": model.linear.weight}, beta=0.5)
    with pytest.raises(ValueError, match="p must be"):
        SFASchedule(10, 0.0)


def test_sfa_schedule_steps():
    assert SFASchedule(10, 0.3).averaging_steps() == [3, 6, 9, 10]
    assert SFASchedule(10, 0.5).averaging_steps() == [5, 10]
    assert SFASchedule(10, 1.0).averaging_steps() == [10]  # p = 1: only at the task's end
    assert SFASchedule(7, 0.01).averaging_steps() == list(range(1, 8))  # interval at least one step


def test_sfa_callback_counts_and_server_rounds():
    model = TinyNet()
    anchor = {k: v.clone() for k, v in model.state_dict().items()}
    callback = SFACallback(anchor, SFASchedule(12, 1.0), beta=0.5)
    for step in range(1, 13):
        callback(model, step)
    assert callback.averaged_at == [12]

    server = ServerSFA(SFAConfig(beta=0.5, p=1.0, average_first_task=True))
    state = {"w": torch.tensor([4.0])}
    for task_index, target in enumerate((torch.tensor([8.0]), torch.tensor([0.0]))):
        server.start_task(state, rounds=4)
        assert torch.equal(server.anchor["w"], state["w"])  # anchor = the previous task's final global model
        for round_in_task in range(1, 5):
            state = server.after_round(round_in_task, {"w": target.clone()})  # "training" lands on target
        if task_index == 0:
            assert torch.equal(state["w"], torch.tensor([6.0]))  # 0.5 * 8 + 0.5 * 4
    assert torch.equal(state["w"], torch.tensor([3.0]))  # 0.5 * 0 + 0.5 * 6: the anchor was task 0's end model
    assert server.averaged_rounds == [(0, 4), (1, 4)]

    resumed = ServerSFA(SFAConfig(beta=0.5, p=1.0, average_first_task=True))
    resumed.load_state_dict(server.state_dict())
    assert torch.equal(resumed.anchor["w"], server.anchor["w"]) and resumed.averaged_rounds == server.averaged_rounds
    assert torch.equal(resumed.after_round(4, {"w": torch.tensor([2.0])})["w"], torch.tensor([4.0]))  # 0.5*2+0.5*6

    skip_first = ServerSFA(SFAConfig(beta=0.5, p=0.5))
    for _ in range(2):
        skip_first.start_task(state, rounds=4)
        for round_in_task in range(1, 5):
            state = skip_first.after_round(round_in_task, state)
    assert skip_first.averaged_rounds == [(1, 2), (1, 4)]


def test_sfa_run_anchor_is_previous_task_model_and_p1_averages_at_task_ends_only(digit_tasks):
    config = StreamConfig(train=FAST_TRAIN, sfa=SFAConfig(beta=0.5, p=1.0))
    result = run_stream(_mlp(digit_tasks), digit_tasks, "sfa", config, keep_states=True)
    last_step = steps_per_task(len(digit_tasks[1].x_train), FAST_TRAIN)
    assert result.sfa_steps == [[], [last_step]]  # first task: no anchor; second: only at its end
    assert result.anchors[0] is None
    assert all(torch.equal(result.anchors[1][k], v) for k, v in result.final_states[0].items())

    assert last_step == 57  # 3 epochs of ceil(289 / 16) batches
    config = StreamConfig(train=FAST_TRAIN, sfa=SFAConfig(beta=0.5, p=0.3, average_first_task=True))
    result = run_stream(_mlp(digit_tasks), digit_tasks, "sfa", config)
    assert result.sfa_steps == [[17, 34, 51, 57]] * 2  # every round(0.3 * 57) = 17 steps, and at the end


# ------------------------------------------------------------------------------------------------ penalties


def test_train_task_without_penalty_is_train_local(digit_tasks):
    task = digit_tasks[0]
    first, second = _mlp(digit_tasks), _mlp(digit_tasks)
    train_local(first, task.x_train, task.y_train, FAST_TRAIN, seed=5)
    train_task(second, task.x_train, task.y_train, FAST_TRAIN, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                  strict=True))


def test_l2_with_zero_strength_is_finetuning_and_small_strength_close(digit_tasks):
    def final_states(method: str, strength: float):
        config = StreamConfig(train=FAST_TRAIN, l2_strength=strength)
        return run_stream(_mlp(digit_tasks), digit_tasks, method, config, keep_states=True).final_states[-1]

    finetuned = final_states("finetune", 0.0)
    assert all(torch.equal(finetuned[k], v) for k, v in final_states("l2", 0.0).items())
    tiny = final_states("l2", 1e-6)
    strong = final_states("l2", 10.0)
    gap_tiny = max((finetuned[k] - v).abs().max().item() for k, v in tiny.items())
    gap_strong = max((finetuned[k] - v).abs().max().item() for k, v in strong.items())
    assert gap_tiny < 1e-5
    assert gap_strong > 1e-3


def test_penalty_values_by_hand():
    model = TinyNet()
    _set_tiny(model, [[1.0, 2.0], [0.0, -1.0]], [3.0, 0.0], counter=0)
    anchor = {"linear.weight": torch.zeros(2, 2), "linear.bias": torch.tensor([1.0, 0.0])}
    # L2: 0.5 * 2 * (1 + 4 + 0 + 1 + 4 + 0) = 10
    assert l2_penalty(anchor, 2.0)(model).item() == 10.0
    fisher = FisherEstimate({"linear.weight": torch.tensor([[1.0, 0.5], [3.0, 2.0]]),
                             "linear.bias": torch.tensor([0.25, 7.0])}, num_examples=4)
    # EWC: 0.5 * 2 * (1*1 + 0.5*4 + 3*0 + 2*1 + 0.25*4 + 7*0) = 6
    assert ewc_penalty(anchor, fisher, 2.0)(model).item() == 6.0


def test_fisher_is_mean_squared_per_example_gradient_by_hand():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    y = np.array([0, 2, 1, 2, 0])
    # d/dW log softmax(Wx + b)[y] = (onehot(y) - p) x^T, d/db = onehot(y) - p
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy().astype(np.float64)
    residual = np.eye(3)[y] - probs
    expected_weight = np.mean([np.outer(residual[i], x[i]) ** 2 for i in range(5)], axis=0)
    expected_bias = np.mean(residual ** 2, axis=0)
    for batch_size in (5, 2):
        estimate = estimate_fisher(model, x, y, batch_size=batch_size)
        assert estimate.num_examples == 5
        np.testing.assert_allclose(estimate.diagonal["weight"].numpy(), expected_weight, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(estimate.diagonal["bias"].numpy(), expected_bias, rtol=1e-5, atol=1e-7)
    assert model.weight.grad is None  # no gradient left behind
    sampled = estimate_fisher(model, x, y, labels="sampled", seed=3)
    assert torch.equal(sampled.diagonal["bias"], estimate_fisher(model, x, y, labels="sampled", seed=3)
                       .diagonal["bias"])


def test_fishers_aggregate_weighted_by_examples():
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    x = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    small, large = estimate_fisher(model, x[:2], y[:2]), estimate_fisher(model, x[2:], y[2:])
    combined = aggregate_fishers([small, large])
    assert combined.num_examples == 8
    union = estimate_fisher(model, x, y)
    for key in union.diagonal:
        torch.testing.assert_close(combined.diagonal[key], union.diagonal[key])
        torch.testing.assert_close(combined.diagonal[key], 0.25 * small.diagonal[key] + 0.75 * large.diagonal[key])
    with pytest.raises(ValueError):
        aggregate_fishers([])


# --------------------------------------------------------------------------------------------------- replay


@pytest.mark.parametrize("strategy", ["reservoir", "class_balanced"])
def test_replay_buffer_bounded_and_holds_only_past_tasks(strategy):
    buffer = ReplayBuffer(50, strategy=strategy, seed=4)
    for task_id in range(4):
        ids = np.arange(task_id * 1000, task_id * 1000 + 120)  # each "image" is its own id, to check integrity
        x, y = ids.astype(np.float32)[:, None], (ids % 2 + 2 * task_id).astype(np.int64)
        assert set(buffer.contents().task_ids.tolist()) <= set(range(task_id))  # nothing of the current task
        buffer.add_task(task_id, x, y)
        stored = buffer.contents()
        assert len(buffer) == 50 and len(stored.y) <= 50
        assert set(stored.task_ids.tolist()) <= set(range(task_id + 1))
        assert np.array_equal(stored.task_ids, stored.x[:, 0].astype(np.int64) // 1000)  # x, y, task stay together
        assert np.array_equal(stored.y, stored.x[:, 0].astype(np.int64) % 2 + 2 * stored.task_ids)
    assert set(buffer.contents().task_ids.tolist()) == {0, 1, 2, 3}
    if strategy == "class_balanced":
        assert sorted(np.bincount(buffer.contents().y).tolist()) == [6] * 6 + [7] * 2  # 50 over 8 classes
    with pytest.raises(ValueError, match="already added"):
        buffer.add_task(3, x, y)


def test_replay_buffer_state_round_trip_and_mixing():
    first = ReplayBuffer(10, seed=0)
    first.add_task(0, np.arange(30, dtype=np.float32)[:, None], np.zeros(30, dtype=np.int64))
    second = ReplayBuffer(10, seed=99)
    second.load_state_dict(first.state_dict())
    new_x = np.arange(100, 140, dtype=np.float32)[:, None]
    for buffer in (first, second):
        buffer.add_task(1, new_x, np.ones(40, dtype=np.int64))
    assert np.array_equal(first.contents().x, second.contents().x)
    x, y = with_replay(np.zeros((3, 1), dtype=np.float32), np.full(3, 5), first)
    assert len(x) == len(y) == 13 and y[:3].tolist() == [5, 5, 5]


# -------------------------------------------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_matrix(tmp_path):
    matrix = np.array([[0.6, 0.1, 0.0],
                       [0.9, 0.8, 0.2],
                       [0.5, 0.7, 0.9]])
    assert average_accuracy(matrix) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert average_forgetting(matrix) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)  # best earlier, not R[j,j]
    assert backward_transfer(matrix) == pytest.approx(((0.5 - 0.6) + (0.7 - 0.8)) / 2)
    assert average_forgetting(np.array([[0.7]])) == backward_transfer(np.array([[0.7]])) == 0.0
    with pytest.raises(ValueError, match="square"):
        average_accuracy(np.zeros((2, 3)))
    names = ["a", "b", "c"]
    read_back, read_names = read_matrix_csv(write_matrix_csv(tmp_path / "r.csv", matrix, names))
    assert read_names == names and np.allclose(read_back, matrix)
    png = plot_matrix(tmp_path / "r.png", matrix, names, title="hand")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_matrix_of_two_task_run(digit_tasks):
    model = _mlp(digit_tasks)
    result = run_stream(model, digit_tasks, "finetune", StreamConfig(train=FAST_TRAIN), keep_states=True)
    assert result.accuracy.shape == (2, 2) and not np.isnan(result.accuracy).any()
    assert result.task_names == ["digits:0-1", "digits:2-3"]
    for index, task in enumerate(digit_tasks):
        probe = _mlp(digit_tasks, seed=9)
        probe.load_state_dict(result.final_states[index])
        assert result.accuracy[index, index] == evaluate(probe, task.x_test, task.y_test)[1]
    for column, task in enumerate(digit_tasks):  # the last row is the final model, on every task
        assert result.accuracy[1, column] == evaluate(model, task.x_test, task.y_test)[1]


def test_epoch_tracking_matches_matrix_and_changes_nothing(digit_tasks):
    config = StreamConfig(train=FAST_TRAIN, sfa=SFAConfig(beta=0.5, p=0.3))
    plain = run_stream(_mlp(digit_tasks), digit_tasks, "sfa", config, keep_states=True)
    tracked = run_stream(_mlp(digit_tasks), digit_tasks, "sfa", config, keep_states=True, track_epochs=True)
    assert [(point.task, point.epoch, len(point.accuracy)) for point in tracked.history] == [
        (0, 1, 1), (0, 2, 1), (0, 3, 1), (1, 1, 2), (1, 2, 2), (1, 3, 2)]
    for task_index, last in ((0, tracked.history[2]), (1, tracked.history[5])):  # the last epoch = the matrix row
        assert last.accuracy == tuple(tracked.accuracy[task_index, :task_index + 1])
    assert np.array_equal(plain.accuracy, tracked.accuracy)
    assert all(torch.equal(plain.final_states[-1][k], v) for k, v in tracked.final_states[-1].items())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_keeps_the_first_task_where_finetuning_forgets_it(digit_tasks, seed):
    """Seeds 0-3 measured: fine-tuning R[1,0] = 0.0 (class-incremental, shared head), replay with 40 stored
    examples R[1,0] = 0.61-0.86; both learn each task when it is trained (R[i,i] >= 0.89)."""
    config = StreamConfig(train=FAST_TRAIN, seed=seed, replay_capacity=40, fisher_examples=64)
    finetune = run_stream(_mlp(digit_tasks, seed), digit_tasks, "finetune", config).accuracy
    replay = run_stream(_mlp(digit_tasks, seed), digit_tasks, "replay", config).accuracy
    assert finetune[0, 0] > 0.9 and replay[0, 0] > 0.9
    assert finetune[1, 0] < 0.1
    assert replay[1, 0] > 0.4
    ewc = run_stream(_mlp(digit_tasks, seed), digit_tasks, "ewc", config).accuracy
    assert not np.isnan(ewc).any()
    with pytest.raises(ValueError, match="unknown continual method"):
        run_stream(_mlp(digit_tasks), digit_tasks, "nope", config)


# -------------------------------------------------------------------------------------------------- streams


def test_split_and_permuted_digits_streams():
    tasks = split_stream("digits", classes_per_task=2, train_size=40, test_size=10)
    assert [task.classes for task in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert all(task.x_train.shape == (40, 1, 16, 16) and task.x_test.shape == (10, 1, 16, 16) for task in tasks)
    assert all(set(np.unique(task.y_train)) <= set(task.classes) for task in tasks)

    permuted = permuted_stream("digits", num_tasks=3, seed=1, train_size=30, test_size=10)
    assert len(permuted) == 3 and permuted[0].classes == permuted[1].classes == permuted[2].classes
    base, other = permuted[0].x_train.reshape(30, -1), permuted[1].x_train.reshape(30, -1)
    assert np.array_equal(np.sort(base, axis=1), np.sort(other, axis=1))  # same pixels, moved
    assert not np.array_equal(base, other)
    assert np.array_equal(permuted[0].y_train, permuted[2].y_train)
    again = permuted_stream("digits", num_tasks=3, seed=1, train_size=30, test_size=10)
    assert np.array_equal(again[2].x_test, permuted[2].x_test)  # seeded


def test_partition_task_disjoint_and_complete_for_iid():
    task = split_stream("digits", classes_per_task=2)[0]
    for kind in ("iid", "dirichlet"):
        parts = partition_task(task, 4, kind=kind, seed=1, alpha=0.5)
        assert len(parts) == 4
        joined = np.concatenate(parts)
        assert len(np.unique(joined)) == len(joined)  # disjoint
        if kind == "iid":
            assert np.array_equal(np.sort(joined), np.arange(len(task.y_train)))
    with pytest.raises(ValueError, match="num_clients"):
        partition_task(task, 0)


def test_grey_resize_by_hand():
    rgb = np.zeros((1, 3, 4, 4), dtype=np.float32)
    rgb[:, 0], rgb[:, 1], rgb[:, 2] = 1.0, 0.5, 0.0
    grey = to_grey_resized(rgb, 2)
    assert grey.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(grey, 0.299 + 0.5 * 0.587, rtol=1e-6)


needs_shared = pytest.mark.skipif(not (SHARED_DATA / "fashion_mnist").exists(), reason="../shared/data is absent")


@needs_shared
def test_fashion_streams_shapes():
    tasks = split_stream("fashion-mnist", train_size=20, test_size=10)
    assert [task.classes for task in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert tasks[0].x_train.shape == (20, 1, 28, 28)
    permuted = permuted_stream("fashion-mnist", num_tasks=5, train_size=20, test_size=10)
    assert len(permuted) == 5 and permuted[4].x_test.shape == (10, 1, 28, 28)


@needs_shared
def test_domain_stream_without_cifar_shapes():
    tasks = domain_stream(image_size=28, train_size=30, test_size=10, datasets=("mnist", "usps", "fashion-mnist"))
    assert [task.name for task in tasks] == ["mnist", "usps", "fashion-mnist"]
    for task in tasks:
        assert task.x_train.shape == (30, 1, 28, 28) and task.x_test.shape == (10, 1, 28, 28)
        assert task.x_train.dtype == np.float32 and 0.0 <= task.x_train.min() and task.x_train.max() <= 1.0


@needs_shared
@pytest.mark.slow
def test_domain_stream_full_shapes():
    tasks = domain_stream(image_size=32, train_size=50, test_size=20)  # decodes CIFAR-10's 20k JPEGs (~25 s)
    assert [task.name for task in tasks] == ["mnist", "usps", "fashion-mnist", "cifar10"]
    assert all(task.x_train.shape == (50, 1, 32, 32) and task.classes == tuple(range(10)) for task in tasks)


# ------------------------------------------------------------------------------------- merge after each task


def _states(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` random float state dicts of one layout (a weight, a bias) plus an equal integer buffer."""
    generator = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=generator), "b": torch.randn(4, generator=generator),
             "n": torch.tensor(7)} for _ in range(count)]


def _through(merger: TaskMerger, trained: list[dict[str, torch.Tensor]], start: dict[str, torch.Tensor]
             ) -> list[dict[str, torch.Tensor]]:
    """Feed the merger a stream: task t starts from the previous merge (the first from `start`) and ends with
    `trained[t]`; the merges after every task."""
    merges = []
    for state in trained:
        merger.start_task(merges[-1] if merges else start)
        merges.append(merger.end_task(state))
    return merges


@pytest.mark.parametrize("scale", [0.7, 0.0])
def test_task_arithmetic_after_each_task_is_theta0_plus_lambda_sum_of_task_vectors(scale):
    theta_0, theta_1, theta_2, theta_3 = _states(0, 4)
    merges = _through(TaskMerger(TaskMergeConfig("merge-ta", scale=scale)), [theta_1, theta_2, theta_3], theta_0)
    assert all(torch.equal(merges[0][key], theta_1[key]) for key in theta_1)  # no merge after the first task
    for tasks, merged in ((2, merges[1]), (3, merges[2])):
        lam = scale or 1.0 / tasks  # 0 = the mean of the task vectors
        for key in ("w", "b"):
            by_hand = theta_0[key] + lam * sum(state[key] - theta_0[key] for state in (theta_1, theta_2, theta_3)[:tasks])
            torch.testing.assert_close(merged[key], by_hand, rtol=0, atol=1e-6)
        assert torch.equal(merged["n"], theta_0["n"])
    if scale == 0.0:  # lambda 1/t: the plain average of the per-task models
        torch.testing.assert_close(merges[2]["w"], (theta_1["w"] + theta_2["w"] + theta_3["w"]) / 3)


def test_ties_after_each_task_by_hand():
    theta_0 = {"w": torch.zeros(5)}
    theta_1 = {"w": torch.tensor([4.0, -1.0, 0.5, -3.0, 0.2])}  # density 0.4: keeps 4 and -3
    theta_2 = {"w": torch.tensor([-2.0, 0.1, 5.0, -1.0, 0.3])}  # keeps -2 and 5
    merger = TaskMerger(TaskMergeConfig("merge-ties", density=0.4))
    merges = _through(merger, [theta_1, theta_2], theta_0)
    # elected signs of the trimmed sums (2, 0, 5, -3, 0): +, majority (+), +, -, +; -2 disagrees with + and drops
    torch.testing.assert_close(merges[1]["w"], torch.tensor([4.0, 0.0, 5.0, -3.0, 0.0]))
    assert len(merger.task_models) == 2 and torch.equal(merger.task_models[1]["w"], theta_2["w"])


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_wise_ft_after_each_task_interpolates_with_the_task_start(alpha):
    theta_0, theta_1, theta_2, theta_3 = _states(1, 4)
    merger = TaskMerger(TaskMergeConfig("wise-ft", alpha=alpha))
    merges = _through(merger, [theta_1, theta_2, theta_3], theta_0)
    assert merger.task_models == []  # WiSE-FT keeps only the task's start
    assert all(torch.equal(merges[0][key], theta_1[key]) for key in theta_1)
    for index in (1, 2):
        trained = (theta_2, theta_3)[index - 1]
        for key in ("w", "b"):
            expected = (1 - alpha) * merges[index - 1][key] + alpha * trained[key]
            torch.testing.assert_close(merges[index][key], expected, rtol=0, atol=1e-6)
    if alpha == 1.0:  # fine-tuning, exactly
        assert all(torch.equal(merges[2][key], theta_3[key]) for key in theta_3)
    if alpha == 0.0:  # the first task's model, for ever
        assert all(torch.equal(merges[2][key], theta_1[key]) for key in theta_1)


@pytest.mark.parametrize("method", ["merge-ta", "merge-ties", "wise-ft"])
def test_task_merger_state_round_trip_continues_identically(method):
    states = _states(2, 5)
    config = TaskMergeConfig(method, alpha=0.3)
    merger = TaskMerger(config)
    merges = _through(merger, states[1:3], states[0])
    restored = TaskMerger(config)
    restored.load_state_dict(merger.state_dict())
    for each in (merger, restored):
        each.start_task(merges[-1])
    first, second = merger.end_task(states[3]), restored.end_task(states[3])
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["w"], states[3]["w"])  # it did merge


def test_centralised_driver_merges_after_each_task(digit_tasks):
    """run_stream with the merge methods: WiSE-FT alpha 1 is fine-tuning bit for bit, alpha 0 ends on task 1's
    model; Task Arithmetic's final model is theta_0 + lambda (tau_1 + tau_2), tau_2 of the model fine-tuning
    trains on task 2 (task 2 starts from task 1's unmerged model)."""
    def run(method: str, **knobs: float):
        model = _mlp(digit_tasks)
        initial = {key: value.clone() for key, value in model.state_dict().items()}
        result = run_stream(model, digit_tasks, method, StreamConfig(train=FAST_TRAIN, **knobs), keep_states=True)
        return initial, result.final_states

    theta_0, (theta_1, theta_2) = run("finetune")
    assert all(torch.equal(run("wise-ft", merge_alpha=1.0)[1][-1][key], value) for key, value in theta_2.items())
    assert all(torch.equal(run("wise-ft", merge_alpha=0.0)[1][-1][key], value) for key, value in theta_1.items())
    _, (first, merged) = run("merge-ta", merge_scale=0.6)
    assert all(torch.equal(first[key], value) for key, value in theta_1.items())
    for key, value in theta_0.items():
        torch.testing.assert_close(merged[key], value + 0.6 * ((theta_1[key] - value) + (theta_2[key] - value)),
                                   rtol=0, atol=1e-6)


def test_task_merge_config_refuses_bad_values():
    for kwargs, match in (({"method": "merge"}, "unknown merge-after-task"), ({"alpha": 1.5}, "alpha"),
                          ({"scale": -1.0}, "scale"), ({"density": 0.0}, "density")):
        with pytest.raises(ValueError, match=match):
            TaskMergeConfig(**{"method": "merge-ta", **kwargs})
    with pytest.raises(RuntimeError, match="before start_task"):
        TaskMerger(TaskMergeConfig("wise-ft")).end_task(_states(0, 1)[0])
