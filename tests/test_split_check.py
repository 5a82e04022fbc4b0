"""`fedsparse.split_check`: the replayed Dirichlet draw gives flwr-datasets' exact client sizes, or None exactly when
flwr-datasets gives up; a split that cannot be drawn is refused naming the key and values that were checked to work."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedsparse.config import ConfigError, resolve
from fedsparse.data import make_partitioner
from fedsparse.simulation import check_split
from fedsparse.split_check import dirichlet_advice, dirichlet_sizes


def flwr_sizes(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> np.ndarray | None:
    """What flwr-datasets' partitioner (as fedsparse builds it) draws: every client's size, or None if it raises."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    partitioner = make_partitioner("dirichlet", num_clients, seed, alpha)
    partitioner.dataset = Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            partitioner.load_partition(0)
        except ValueError:
            return None
    return np.array([len(partitioner._partition_id_to_indices[i]) for i in range(num_clients)])


def labels_of(seed: int, n: int = 600, classes: int = 10) -> np.ndarray:
    """Unbalanced labels: class k is drawn with weight k + 1."""
    weights = np.arange(1, classes + 1) / np.arange(1, classes + 1).sum()
    return np.random.default_rng(seed).choice(classes, size=n, p=weights)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("num_clients", "alpha"), [(10, 0.3), (40, 0.1), (60, 1.0), (150, 0.5), (250, 5.0)])
def test_the_replay_gives_flwr_datasets_sizes_or_its_failure(seed, num_clients, alpha):
    labels = labels_of(seed)
    expected = flwr_sizes(labels, num_clients, alpha, seed)
    got = dirichlet_sizes(labels, num_clients, alpha, seed)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.tolist() == expected.tolist() and got.sum() == len(labels)


def test_the_cases_above_include_splits_that_fail_and_that_succeed():
    outcomes = {dirichlet_sizes(labels_of(s), n, a, s) is None
                for s in (0, 1, 2) for n, a in [(10, 0.3), (150, 0.5), (250, 5.0)]}
    assert outcomes == {True, False}


def test_advice_names_values_that_split_and_fewer_clients_is_the_most_that_do():
    labels = labels_of(0)
    assert dirichlet_sizes(labels, 250, 0.3, 0) is None
    advice = dirichlet_advice(labels, 250, 0.3, 0)
    assert advice.max_clients is not None and dirichlet_sizes(labels, advice.max_clients, 0.3, 0) is not None
    assert dirichlet_sizes(labels, advice.max_clients + 1, 0.3, 0) is None
    if advice.min_alpha is not None:
        assert dirichlet_sizes(labels, 250, advice.min_alpha, 0) is not None
        assert dirichlet_sizes(labels, 250, advice.min_alpha / 2, 0) is None


def test_an_impossible_split_is_refused_naming_the_key_and_what_works():
    labels = labels_of(0)
    cfg = resolve({"dataset": "digits", "partitioner": "dirichlet", "num-clients": 250, "dirichlet-alpha": 0.3,
                   "seed": 0})
    advice = dirichlet_advice(labels, 250, 0.3, 0)
    with pytest.raises(ConfigError, match=r"config key 'partitioner'.*cannot be drawn") as error:
        check_split(cfg, len(labels), 10, labels)
    assert f"num-clients={advice.max_clients}" in str(error.value) and "dirichlet-balanced" in str(error.value)
    with pytest.raises(ConfigError, match="at most 300 clients"):
        check_split({**cfg, "num-clients": 301}, len(labels), 10, labels)
