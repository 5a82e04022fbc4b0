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
