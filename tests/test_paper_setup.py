"""The SSFL paper's setup options: crop/flip augmentation, per-channel input normalisation, the balanced Dirichlet
split; and that their defaults leave every existing run bit-identical (values recorded before they existed)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fedsparse.config import ConfigError, resolve
from fedsparse.data import balanced_sizes, channel_stats, client_split, load_dataset, partition_labels
from fedsparse.train import TrainConfig, crop_flip, evaluate, normalize_batch, saliency_scores, train_local


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.random((40, 3, 8, 8), dtype=np.float32), rng.integers(0, 3, 40)


def _digest(arrays) -> str:
    """A short hash of arrays' bytes: equal for two runs in one process that must be bit-identical."""
    return hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in arrays)).hexdigest()[:16]


def _moments(tensor: torch.Tensor) -> tuple[float, float, float]:
    """Sum, sum of squares and the sum of every 7th entry: three numbers that move if any entry does."""
    flat = tensor.detach().reshape(-1).double()
    return float(flat.sum()), float((flat**2).sum()), float(flat[::7].sum())


def test_defaults_are_the_same_as_before_the_options():
    """Values recorded before augment/normalize existed. Floats within 1e-6 (relative), not bit for bit, so another
    CPU's kernels cannot fail the test; a change in the default path moves them by far more."""
    torch.set_num_threads(1)
    x, y = _data()
    net = _small_net()
    loss = train_local(net, x, y, TrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9), seed=3)
    assert loss == pytest.approx(0.99978808760643, rel=1e-6)
    weights = _moments(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    assert weights == pytest.approx((0.6542177293813438, 4.578838397597867, 0.3352121277712285), rel=1e-6)
    scores = saliency_scores(net, x, y, ["0.weight"], batch_size=8, batches=2, seed=4)
    assert _moments(scores["0.weight"]) == pytest.approx((2.2275540612463374, 0.08788562555785104,
                                                          0.2844156860373914), rel=1e-6)
    assert evaluate(net, x, y) == pytest.approx((0.819702434539795, 0.65), rel=1e-6)
    train, val = client_split(resolve({"dataset": "digits", "num-clients": 5, "seed": 7}), 2)
    digest = hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()[:16]  # integers: exact on any machine
    assert (len(train), len(val), digest) == (261, 29, "7b4e3d5c55e36f8d")


def test_crop_flip_is_deterministic_per_seed_and_changes_the_batch():
    xb = torch.from_numpy(_data()[0][:16])
    first = crop_flip(xb, np.random.default_rng([5, 1]))
    again = crop_flip(xb, np.random.default_rng([5, 1]))
    other = crop_flip(xb, np.random.default_rng([6, 1]))
    assert first.shape == xb.shape and torch.equal(first, again)
    assert not torch.equal(first, xb) and not torch.equal(first, other)
    # every output image is a shifted (and maybe flipped) window of its padded input
    padded = torch.nn.functional.pad(xb, (4, 4, 4, 4))
    for image, source in zip(first, padded):
        windows = [source[:, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(image, w) or torch.equal(image, w.flip(-1)) for w in windows)


def test_train_local_with_augmentation_is_deterministic_and_differs_from_plain():
    torch.set_num_threads(1)
    x, y = _data()
    settings = TrainConfig(epochs=1, batch_size=8, lr=0.1, augment="crop-flip")
    runs = []
    for _ in range(2):
        net = _small_net()
        train_local(net, x, y, settings, seed=3)
        runs.append(_digest(p.detach().numpy() for p in net.parameters()))
    plain = _small_net()
    train_local(plain, x, y, TrainConfig(epochs=1, batch_size=8, lr=0.1), seed=3)
    assert runs[0] == runs[1] != _digest(p.detach().numpy() for p in plain.parameters())
    with pytest.raises(ValueError, match="augment"):
        train_local(_small_net(), x, y, TrainConfig(augment="rotate"), seed=3)


def test_saliency_batch_is_augmented_and_normalised_like_training():
    x, y = _data()
    net = _small_net()
    plain = saliency_scores(net, x, y, ["0.weight"], batch_size=8, batches=1, seed=4)
    augmented = saliency_scores(net, x, y, ["0.weight"], batch_size=8, batches=1, seed=4, augment="crop-flip")
    again = saliency_scores(net, x, y, ["0.weight"], batch_size=8, batches=1, seed=4, augment="crop-flip")
    assert torch.equal(augmented["0.weight"], again["0.weight"])
    assert not torch.equal(plain["0.weight"], augmented["0.weight"])


def test_normalisation_gives_zero_mean_unit_std_per_channel_on_the_training_set():
    x = load_dataset("digits").x_train  # (N, 1, 16, 16)
    stats = channel_stats(x)
    standardised = normalize_batch(torch.from_numpy(x), stats).double()
    assert standardised.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (standardised.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-5
    base = _data()[0][:, :1]
    rgb = np.concatenate([base, 0.5 * base, 0.2 * base + 0.1], axis=1)  # channels with known mean/std ratios
    rgb_stats = channel_stats(rgb)
    assert rgb_stats.mean[1] == pytest.approx(0.5 * rgb_stats.mean[0])
    assert rgb_stats.mean[2] == pytest.approx(0.2 * rgb_stats.mean[0] + 0.1)
    assert rgb_stats.std[1] == pytest.approx(0.5 * rgb_stats.std[0])
    assert rgb_stats.std[2] == pytest.approx(0.2 * rgb_stats.std[0])
    out = normalize_batch(torch.from_numpy(rgb), rgb_stats).double()
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5


def test_evaluate_applies_the_same_normalisation():
    x, y = _data()
    stats = channel_stats(x)
    net = _small_net()
    assert evaluate(net, x, y, normalize=stats) == evaluate(net, normalize_batch(torch.from_numpy(x), stats).numpy(), y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_dirichlet_gives_equal_sizes_and_covers_each_example_once(seed, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPARSE_CACHE", str(tmp_path))
    labels = load_dataset("digits").y_train
    parts = partition_labels(labels, "digits", "dirichlet-balanced", 10, seed, 0.3, 2, 2)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(labels)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # no example twice
    histograms = np.stack([np.bincount(labels[p], minlength=10) for p in parts])
    assert (histograms.max(axis=1) > 2 * len(labels) / 100).all()  # skewed: some class well above its iid share


def test_balanced_sizes():
    assert balanced_sizes(10, 3) == [4, 3, 3]
    assert balanced_sizes(9, 3) == [3, 3, 3]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'augment'"):
        resolve({"augment": "rotate"})
    with pytest.raises(ConfigError, match="'normalize'"):
        resolve({"normalize": "maybe"})
    with pytest.raises(ConfigError, match="'partitioner'"):
        resolve({"partitioner": "balanced"})
    assert resolve({"partitioner": "dirichlet-balanced", "augment": "crop-flip", "normalize": True})["augment"] == \
        "crop-flip"


def test_a_run_standardises_with_its_training_set_stats_only_when_asked():
    from fedsparse.data import dataset_channel_stats, input_stats
    from server.experiments.standard import StandardExperiment

    plain = resolve({"dataset": "digits", "model": "mlp"})
    assert input_stats(plain) is None
    asked = resolve({"dataset": "digits", "model": "mlp", "normalize": True, "train-subset": 500})
    assert input_stats(asked) == dataset_channel_stats("digits", "", 500)
    assert input_stats(asked) == channel_stats(load_dataset("digits").x_train[:500])
    # the server's test-set evaluator uses the same stats as the clients
    assert StandardExperiment(asked).phases[0].evaluators[0].normalize == input_stats(asked)
    assert StandardExperiment(plain).phases[0].evaluators[0].normalize is None
