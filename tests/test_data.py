import numpy as np
import pytest

from fedsparse import data
from fedsparse.config import resolve
from tests.conftest import SHARED_DATA


def skew(hist: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the pooled one."""
    p = hist / hist.sum(1, keepdims=True)
    q = hist.sum(0) / hist.sum()
    return float(0.5 * np.abs(p - q).sum(1).mean())


def test_digits_loads_offline_as_16x16_images():
    ds = data.load_dataset("digits")
    assert ds.x_train.shape[1:] == (1, 16, 16) and ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert len(ds.y_train) + len(ds.y_test) == 1797 and set(ds.y_test) == set(range(10))


def test_partitions_are_deterministic_for_a_seed_and_cover_the_data(tmp_path, monkeypatch):
    cfg = resolve({"dataset": "digits", "num-clients": 8, "partitioner": "dirichlet", "dirichlet-alpha": 0.3})
    monkeypatch.setenv("FEDSPARSE_CACHE", str(tmp_path / "a"))
    data.partition_indices.cache_clear()
    first = [data.client_split(cfg, i) for i in range(8)]
    for cache in ("b", "a"):  # a fresh draw in an empty cache, then the one read back from disk
        monkeypatch.setenv("FEDSPARSE_CACHE", str(tmp_path / cache))
        data.partition_indices.cache_clear()
        again = [data.client_split(cfg, i) for i in range(8)]
        for (a_train, a_val), (b_train, b_val) in zip(first, again):
            assert np.array_equal(a_train, b_train) and np.array_equal(a_val, b_val)
    assert len(list((tmp_path / "b").rglob("*.npz"))) == 1
    other = [data.client_split({**cfg, "seed": 7}, i)[0] for i in range(8)]
    assert any(not np.array_equal(a[0], b) for a, b in zip(first, other))
    everything = np.concatenate([np.concatenate(s) for s in first])
    assert len(everything) == len(set(everything.tolist())) == len(data.load_dataset("digits").y_train)


def test_dirichlet_0_1_is_skewed_and_iid_is_not():
    base = {"dataset": "digits", "num-clients": 10}
    iid = skew(data.label_histograms(resolve({**base, "partitioner": "iid"})))
    dirichlet = skew(data.label_histograms(resolve({**base, "partitioner": "dirichlet", "dirichlet-alpha": 0.1})))
    print(f"label skew (mean TV distance to pooled): iid {iid:.3f}, dirichlet(0.1) {dirichlet:.3f}")
    assert iid < 0.1
    assert dirichlet > 0.5


def test_label_limited_partitioners():
    base = {"dataset": "digits", "num-clients": 10}
    patho = data.label_histograms(resolve({**base, "partitioner": "pathological", "classes-per-client": 2}))
    assert ((patho > 0).sum(1) <= 2).all()
    # 2 shards of label-sorted data: a shard can straddle a label boundary, so up to 4 labels, mostly 2-3
    shard = data.label_histograms(resolve({**base, "partitioner": "shard", "shards-per-client": 2}))
    assert ((shard > 0).sum(1) <= 4).all() and (shard > 0).sum(1).mean() <= 3


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "REPO_ROOT", tmp_path / "checkout")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDSPARSE_DATA", str(tmp_path / "empty"))
    data.load_dataset.cache_clear()
    with pytest.raises(data.DatasetNotFound) as err:
        data.load_dataset("usps")
    assert str(tmp_path / "empty") in str(err.value) and "FEDSPARSE_DATA" in str(err.value)
    data.load_dataset.cache_clear()


@pytest.mark.skipif(not (SHARED_DATA / "fashion_mnist").exists(), reason="../shared/data is absent")
def test_fashion_mnist_from_shared_data():
    data.load_dataset.cache_clear()
    ds = data.load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_test).tolist() == [1000] * 10


def test_partition_cache_key_holds_the_split_version_and_library_versions():
    from importlib.metadata import version

    key = data.partition_code_key()
    assert f"split-v{data.SPLIT_VERSION}" in key
    assert f"flwr-datasets=={version('flwr-datasets')}" in key and f"numpy=={np.__version__}" in key


def test_a_cache_left_by_other_code_is_never_read(tmp_path, monkeypatch):
    cfg = resolve({"dataset": "digits", "num-clients": 6, "partitioner": "dirichlet"})
    monkeypatch.setenv("FEDSPARSE_CACHE", str(tmp_path))
    data.partition_indices.cache_clear()
    truth = [data.client_split(cfg, i)[0] for i in range(6)]
    (left_behind,) = tmp_path.rglob("*.npz")
    data.write_split_cache(left_behind, data.PartitionTable.from_parts([np.arange(3)] * 6))  # what other code
    # might have cached, in this code's format
    data.partition_indices.cache_clear()
    assert data.client_split(cfg, 0)[0].size == 3  # the same code reads its own cache...
    for change in ("SPLIT_VERSION", "library"):  # ...code that splits differently never does
        if change == "SPLIT_VERSION":
            monkeypatch.setattr(data, "SPLIT_VERSION", data.SPLIT_VERSION + 1)
        else:
            monkeypatch.setattr(data, "partition_code_key", lambda: ("split-vX", "flwr-datasets==0.0.0"))
        data.partition_indices.cache_clear()
        again = [data.client_split(cfg, i)[0] for i in range(6)]
        assert all(np.array_equal(a, b) for a, b in zip(truth, again)), change
    data.partition_indices.cache_clear()


def test_cifar10_jpeg_subset_is_shuffled_by_a_fixed_permutation(tmp_path, monkeypatch):
    # the loader on fake, class-sorted files (no JPEG decoding): its order is the fixed permutation
    folder = tmp_path / "cifar10_jpeg"
    folder.mkdir()
    for name in ("cifar10_train_first1000perclass_jpeg.zip", "cifar10_test_jpeg.zip"):
        (folder / name).write_bytes(b"")
    sorted_labels = np.repeat(np.arange(10), 100)
    fake_images = np.broadcast_to(sorted_labels[:, None, None, None], (1000, 2, 2, 3)).astype(np.uint8)
    monkeypatch.setattr(data, "_read_cifar_zip", lambda path: (fake_images, sorted_labels))
    ds = data._cifar10([tmp_path])
    order = np.random.default_rng(data.JPEG_SUBSET_ORDER_SEED).permutation(1000)
    assert np.array_equal(ds.y_train, sorted_labels[order])
    assert np.array_equal(np.round(ds.x_train[:, 0, 0, 0] * 255), ds.y_train)  # images moved with their labels
    assert np.bincount(ds.y_train[:100], minlength=10).min() >= 3  # a prefix of 100 holds every class
    assert np.array_equal(ds.y_test, sorted_labels)  # the test set keeps its order


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar10_jpeg").exists(), reason="../shared/data is absent")
def test_cifar10_jpeg_subset_prefix_holds_every_class():
    # the zip lists its 10k images sorted by class: a train-subset prefix used to be all airplanes
    data.load_dataset.cache_clear()
    ds = data.load_dataset("cifar10")
    counts = np.bincount(ds.y_train[:400], minlength=10)
    assert counts.min() >= 20, counts  # 40 expected per class; 31..47 with this fixed order
    assert np.bincount(ds.y_train).tolist() == [1000] * 10
    again = np.random.default_rng(data.JPEG_SUBSET_ORDER_SEED).permutation(10_000)
    assert np.array_equal(ds.y_train, np.repeat(np.arange(10), 1000)[again])  # deterministic: a fixed permutation
    data.load_dataset.cache_clear()
