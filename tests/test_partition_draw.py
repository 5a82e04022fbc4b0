"""How `fedsparse.data` draws and caches a split, checked against flwr-datasets itself.

- iid, computed with numpy, equals flwr-datasets' `IidPartitioner` partition by partition (n % k != 0, k = 1,
  k = n) and asks flwr-datasets only for the spot-checked partitions; when flwr-datasets answers otherwise, the
  draw falls back to it, logs a warning and returns flwr-datasets' answer.
- Every other partitioner returns exactly what the plain loop (iterate each partition's rows) returns.
- The cache is one index array plus offsets, read back bit for bit as read-only views; a file in the old format
  (one member per client) or with broken offsets at the key is drawn again, never read.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from datasets import Dataset as HFDataset
from flwr_datasets.partitioner import IidPartitioner

from fedsparse import data


def synthetic_labels(num_examples: int, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    """Labels with every class present, in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.arange(num_examples) % num_classes).astype(np.int64)


def reference_split(labels: np.ndarray, kind: str, num_clients: int, seed: int, alpha: float = 0.3,
                    classes_per_client: int = 2, shards_per_client: int = 2) -> list[np.ndarray]:
    """The straightforward draw: load every partition through flwr-datasets and iterate its rows."""
    partitioner = data.make_partitioner(kind, num_clients, seed, alpha, classes_per_client, shards_per_client,
                                        num_examples=len(labels))
    partitioner.dataset = HFDataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    return [np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)) for i in range(num_clients)]


def assert_same_split(got: tuple[np.ndarray, ...], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for client, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == np.int64 and np.array_equal(a, b), f"client {client}"


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPARSE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(("num_examples", "num_clients"), [(1797, 1), (1797, 10), (1000, 7), (103, 103), (60, 13)])
def test_iid_equals_flwr_datasets_partition_by_partition(num_examples, num_clients):
    labels = synthetic_labels(num_examples)
    expected = reference_split(labels, "iid", num_clients, seed=3)
    assert_same_split(data.iid_table(num_examples, num_clients).parts(), expected)
    assert_same_split(data.partition_labels(labels, "test", "iid", num_clients, 3, 0.3, 2, 2), expected)
    assert sum(len(part) for part in expected) == num_examples


def test_iid_asks_flwr_datasets_only_for_the_spot_checks(monkeypatch):
    asked: list[int] = []
    plain = IidPartitioner.load_partition

    def counted(self, partition_id):
        asked.append(partition_id)
        return plain(self, partition_id)

    monkeypatch.setattr(IidPartitioner, "load_partition", counted)
    labels = synthetic_labels(60_000)
    parts = data.partition_labels(labels, "test", "iid", 10_000, 42, 0.3, 2, 2)
    checks = data.iid_spot_checks(10_000)
    assert sorted(asked) == checks and len(checks) == 2 + data.IID_SPOT_CHECKS
    assert checks[0] == 0 and checks[-1] == 9_999
    assert [len(parts[i]) for i in (0, 9_999)] == [6, 6] and np.array_equal(parts[9_999], np.arange(59_994, 60_000))


def test_iid_falls_back_to_flwr_datasets_when_it_answers_otherwise(monkeypatch, caplog):
    """Should flwr-datasets' iid split change (here: strided instead of contiguous shards), its answer wins."""
    def strided(self, partition_id):
        return self.dataset.shard(num_shards=self.num_partitions, index=partition_id, contiguous=False)

    monkeypatch.setattr(IidPartitioner, "load_partition", strided)
    labels = synthetic_labels(500)
    with caplog.at_level(logging.WARNING, logger="fedsparse.data"):
        got = data.partition_labels(labels, "test", "iid", 9, 1, 0.3, 2, 2)
    assert_same_split(got, [np.arange(i, 500, 9) for i in range(9)])
    assert "differs from flwr-datasets'" in caplog.text


def test_a_wrong_block_of_the_first_partition_falls_back(monkeypatch, caplog):
    """A numpy split that is wrong at a spot-checked partition (here the first two clients' boundary) is not used."""
    right = data.iid_table

    def off_by_one(num_examples, num_clients):
        table = right(num_examples, num_clients)
        offsets = table.offsets.copy()
        offsets[1] += 1
        return data.PartitionTable(table.indices.copy(), offsets)

    monkeypatch.setattr(data, "iid_table", off_by_one)
    labels = synthetic_labels(300)
    with caplog.at_level(logging.WARNING, logger="fedsparse.data"):
        got = data.partition_labels(labels, "test", "iid", 7, 1, 0.3, 2, 2)
    assert_same_split(got, reference_split(labels, "iid", 7, seed=1))
    assert "partitions [0" in caplog.text


@pytest.mark.parametrize(("kind", "num_clients", "seed"), [("dirichlet", 10, 0), ("dirichlet", 23, 5),
                                                          ("dirichlet-balanced", 9, 2), ("pathological", 10, 1),
                                                          ("shard", 12, 4)])
def test_other_partitioners_equal_the_plain_loop(kind, num_clients, seed):
    labels = data.load_dataset("digits").y_train
    expected = reference_split(labels, kind, num_clients, seed)
    assert_same_split(data.partition_labels(labels, "digits", kind, num_clients, seed, 0.3, 2, 2), expected)


def test_partition_column_reads_the_selected_rows_in_order():
    table = HFDataset.from_dict({"idx": np.arange(50) * 3, "label": np.arange(50) % 5})
    rows = [7, 3, 3, 49, 0]
    picked = table.select(rows)  # an indices mapping over the whole table
    sliced = table.select(range(10, 20))  # a contiguous select: a slice of the table
    nested = picked.select([4, 1])  # a select of a select
    shard = table.shard(num_shards=4, index=3, contiguous=True)
    for part in (picked, sliced, nested, shard, table):
        assert np.array_equal(data.partition_column(part), np.asarray(part["idx"]))
    assert data.partition_column(nested).tolist() == [0, 9]


def test_the_cache_is_one_array_and_offsets_read_back_as_read_only_views(monkeypatch):
    labels = data.load_dataset("digits").y_train
    drawn = data.partition_labels(labels, "digits", "dirichlet", 6, 1, 0.3, 2, 2)
    path = data.split_cache_path(labels, "digits", "dirichlet", 6, 1, 0.3, 2, 2)
    with np.load(path) as stored:
        assert sorted(stored.files) == ["indices", "offsets"]
        assert stored["offsets"].tolist() == [0, *np.cumsum([len(p) for p in drawn]).tolist()]

    def no_draw(*args, **kwargs):
        raise AssertionError("the cache was not read")

    monkeypatch.setattr(data, "make_partitioner", no_draw)
    again = data.partition_labels(labels, "digits", "dirichlet", 6, 1, 0.3, 2, 2)
    assert_same_split(again, list(drawn))
    base = again[0].base
    assert all(part.base is base and not part.flags.writeable for part in again)
    with pytest.raises(ValueError):
        again[2][0] = 0


@pytest.mark.parametrize("damage", ["old-format", "offsets-past-the-end", "other-client-count", "not-a-zip",
                                    "one-npy-array", "truncated"])
def test_a_cache_in_another_format_is_drawn_again(damage, caplog):
    labels = data.load_dataset("digits").y_train
    truth = data.partition_labels(labels, "digits", "iid", 5, 0, 0.3, 2, 2)
    path = data.split_cache_path(labels, "digits", "iid", 5, 0, 0.3, 2, 2)
    if damage == "old-format":
        np.savez(path, **{str(i): np.arange(3) for i in range(5)})
    elif damage == "offsets-past-the-end":
        np.savez(path, indices=np.arange(10), offsets=np.array([0, 2, 4, 6, 8, 11]))
    elif damage == "other-client-count":
        np.savez(path, indices=np.arange(10), offsets=np.array([0, 5, 10]))
    elif damage == "one-npy-array":
        with path.open("wb") as handle:
            np.save(handle, np.arange(10))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    else:
        path.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="fedsparse.data"):
        again = data.partition_labels(labels, "digits", "iid", 5, 0, 0.3, 2, 2)
    assert_same_split(again, list(truth))
    assert "drawing the split again" in caplog.text
    assert_same_split(data.read_split_cache(path, 5).parts(), list(truth))  # rewritten in the new format


def test_partition_table_refuses_bad_offsets():
    indices = np.arange(6, dtype=np.int64)
    for offsets in ([1, 6], [0, 4, 3, 6], [0, 5], [0]):
        with pytest.raises(ValueError, match="offsets"):
            data.PartitionTable(indices.copy(), np.array(offsets, dtype=np.int64))
    with pytest.raises(ValueError, match="int64"):
        data.PartitionTable(indices.astype(np.int32), np.array([0, 6], dtype=np.int64))
    with pytest.raises(ValueError):
        data.iid_table(10, 0)
    table = data.PartitionTable.from_parts([np.array([4, 5]), np.array([], dtype=np.int64), np.array([1])])
    assert table.offsets.tolist() == [0, 2, 2, 3] and [p.tolist() for p in table.parts()] == [[4, 5], [], [1]]
    with pytest.raises(ValueError, match="client 3"):
        table.part(3)
