"""The prepared partitions of `fedsparse.partition_cache` behind `client.handlers.local_data`: a cached partition
is exactly the recomputed one, a damaged entry is detected and recomputed, and an entry is never read for another
key (seed, partitioner, data file, split, partition)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.handlers import _split_of, data_cache_dir, dataset_shape, local_data
from fedsparse import partition_cache
from fedsparse.config import resolve
from fedsparse.data import client_split, load_dataset
from fedsparse.partition_cache import (
    PARTITION_CONFIG_KEYS,
    DatasetShape,
    PartitionCacheError,
    cached_dataset_shape,
    cached_partition,
    partition_key,
    read_entry,
)


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPARSE_CACHE", str(tmp_path / "cache"))
    return resolve({"dataset": "digits", "num-clients": 3, "partitioner": "dirichlet", "seed": 7,
                    "val-fraction": 0.1, "output-dir": str(tmp_path / "out")})


def _entries(cfg: dict) -> list:
    return sorted(data_cache_dir(cfg).glob("*.x.npy"))


class Counted:
    """`compute` for cached_partition that counts its calls."""

    def __init__(self, cfg: dict, partition_id: int, split: str = "train") -> None:
        self.cfg, self.partition_id, self.split, self.calls = cfg, partition_id, split, 0

    def __call__(self):
        self.calls += 1
        return _split_of(self.cfg, self.partition_id, self.split)


@pytest.mark.parametrize("split", ["train", "val"])
def test_cached_partition_equals_the_recomputed_one(cfg, split):
    first = local_data(cfg, 1, split)  # computes and writes
    assert len(_entries(cfg)) == 1
    second = local_data(cfg, 1, split)  # read back, memory-mapped
    assert isinstance(second[0], np.memmap) and isinstance(second[1], np.memmap)
    fresh = _split_of(cfg, 1, split)
    ds = load_dataset("digits")
    train_idx, val_idx = client_split(cfg, 1)
    idx = train_idx if split == "train" else val_idx
    assert len(idx) > 0
    for got in (first, second):
        for array, expected in zip(got, (ds.x_train[idx], ds.y_train[idx]), strict=True):
            assert array.dtype == expected.dtype and array.shape == expected.shape
            assert np.array_equal(array, expected)
    assert np.array_equal(second[0], fresh[0]) and np.array_equal(second[1], fresh[1])
    assert len(_entries(cfg)) == 1  # the read wrote nothing new


def test_a_write_to_the_returned_arrays_never_reaches_the_cache(cfg):
    local_data(cfg, 0)
    x, _ = local_data(cfg, 0)
    x[:] = 123.0
    again, _ = local_data(cfg, 0)
    assert np.array_equal(again, _split_of(cfg, 0, "train")[0])


@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "other-shape", "record-of-another-key",
                                    "record-not-json"])
def test_a_damaged_entry_is_detected_and_recomputed(cfg, damage):
    local_data(cfg, 2)
    key = partition_key(cfg, 2, "train")
    (x_path,) = _entries(cfg)
    record_path = x_path.with_name(x_path.name.replace(".x.npy", ".json"))
    if damage == "flip-a-byte":
        raw = bytearray(x_path.read_bytes())
        raw[-5] ^= 0x40  # inside the last float's bytes: same shape and dtype, other content
        x_path.write_bytes(bytes(raw))
    elif damage == "truncate":
        x_path.write_bytes(x_path.read_bytes()[:-100])
    elif damage == "other-shape":
        np.save(x_path, np.zeros((3, 1, 16, 16), dtype=np.float32))
    elif damage == "record-of-another-key":
        record = json.loads(record_path.read_text())
        record["key"] = "0" * 64
        record_path.write_text(json.dumps(record))
    else:
        record_path.write_text("{not json")
    with pytest.raises((PartitionCacheError, ValueError)):
        read_entry(data_cache_dir(cfg), key)
    compute = Counted(cfg, 2)
    x, y = cached_partition(cfg, 2, "train", data_cache_dir(cfg), compute)
    assert compute.calls == 1
    fresh = _split_of(cfg, 2, "train")
    assert np.array_equal(x, fresh[0]) and np.array_equal(y, fresh[1])
    repaired = read_entry(data_cache_dir(cfg), key)  # rewritten whole
    assert np.array_equal(repaired.x, fresh[0]) and np.array_equal(repaired.y, fresh[1])


@pytest.mark.parametrize("change", [{"seed": 8}, {"partitioner": "iid"}, {"dirichlet-alpha": 0.5},
                                    {"val-fraction": 0.2}, {"train-subset": 900}, {"num-clients": 4}])
def test_another_setting_never_reads_the_old_entry(cfg, change):
    local_data(cfg, 0)
    other = resolve({**cfg, **change})
    assert partition_key(other, 0, "train").digest() != partition_key(cfg, 0, "train").digest()
    compute = Counted(other, 0)
    x, y = cached_partition(other, 0, "train", data_cache_dir(other), compute)
    assert compute.calls == 1 and len(_entries(cfg)) == 2
    fresh = _split_of(other, 0, "train")
    assert np.array_equal(x, fresh[0]) and np.array_equal(y, fresh[1])


def test_partition_split_and_data_files_are_in_the_key(cfg, tmp_path, monkeypatch):
    digests = {partition_key(cfg, p, s).digest() for p in range(3) for s in ("train", "val")}
    assert len(digests) == 6
    data_file = tmp_path / "data.bin"
    data_file.write_bytes(b"one")
    monkeypatch.setattr(partition_cache, "dataset_files", lambda name, root: [data_file])
    before = partition_key(cfg, 0, "train").digest()
    data_file.write_bytes(b"other content")
    assert partition_key(cfg, 0, "train").digest() != before


def test_partition_key_covers_every_setting_the_split_reads(cfg):
    """Every run-config key that loading the dataset and drawing a client's split read is in the key."""
    read: set[str] = set()

    class Recording(dict):
        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

    _split_of(Recording(cfg), 0, "val")
    assert read and read <= set(PARTITION_CONFIG_KEYS), read - set(PARTITION_CONFIG_KEYS)


def test_an_unwritable_cache_still_gives_the_partition(cfg, tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    compute = Counted(cfg, 1)
    x, y = cached_partition(cfg, 1, "train", blocker / "cache", compute)
    fresh = _split_of(cfg, 1, "train")
    assert compute.calls == 1 and np.array_equal(x, fresh[0]) and np.array_equal(y, fresh[1])


def test_dataset_shape_is_recorded_and_a_bad_record_recomputed(cfg):
    ds = load_dataset("digits")
    assert dataset_shape(cfg) == DatasetShape(ds.input_shape, ds.num_classes)
    (record,) = data_cache_dir(cfg).glob("*.shape.json")
    calls = []

    def compute() -> DatasetShape:
        calls.append(1)
        return DatasetShape(ds.input_shape, ds.num_classes)

    assert cached_dataset_shape(cfg, data_cache_dir(cfg), compute) == DatasetShape(ds.input_shape, 10)
    assert calls == []  # read from the record
    record.write_text(json.dumps({**json.loads(record.read_text()), "num_classes": 0}))
    assert cached_dataset_shape(cfg, data_cache_dir(cfg), compute).num_classes == 10 and calls == [1]


def test_bad_arguments_are_refused(cfg):
    with pytest.raises(ValueError, match="split"):
        partition_key(cfg, 0, "test")
    with pytest.raises(ValueError, match="partition_id"):
        partition_key(cfg, -1, "train")
    with pytest.raises(ValueError, match="lacks"):
        partition_key({"dataset": "digits"}, 0, "train")
