"""Datasets by name, found on disk in a fixed order, and split across clients with flwr-datasets partitioners.

Lookup order for the files: an explicit `data_root`, `$FEDSPARSE_DATA`, `../shared/data` beside the checkout,
Debian's `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`), then torchvision's download for users who
have internet. `digits` ships inside scikit-learn and never touches the disk or the network.

Images come back as float32 arrays shaped (N, C, H, W) in [0, 1] with int64 labels, in an order with no class
structure (the class-sorted CIFAR-10 JPEG subset is put through a fixed permutation), so `train-subset`'s prefix of
N examples is representative.

Client partitions are cached on disk under a key made of the labels' hash, every partitioner argument,
`SPLIT_VERSION` and the versions of flwr-datasets, datasets, numpy and pyarrow: a cache written by other code or
other libraries is never read, so what a machine has left behind cannot decide a result. A split is one int64 index
array plus the clients' offsets in it (`PartitionTable`, stored as two npz members). flwr-datasets is the authority
on every split: the iid one is computed with numpy and checked against flwr-datasets' own partitions on every draw
(any difference: every partition is loaded through flwr-datasets); the others load every partition through it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parent.parent
JPEG_SUBSET_ORDER_SEED = 20240  # the fixed shuffle of the class-sorted CIFAR-10 JPEG subset
# Bump whenever the way partitions are drawn changes (partitioner arguments, the index table, the sorting):
# it is part of the on-disk cache key, so a cache left by older code is never read. 3: the cache is one index array
# plus the clients' offsets in it (`PartitionTable`), no longer one npz member per client.
SPLIT_VERSION = 3
IID_SPOT_CHECKS = 4  # partitions, besides the first and the last, that every iid draw checks against flwr-datasets
IID_SPOT_CHECK_SEED = 1301  # seeds the choice of those partitions (with the number of clients)


class DatasetNotFound(FileNotFoundError):
    """The dataset's files are nowhere we looked, and downloading failed."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str  # where the files came from, recorded in config.json

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def shared_roots() -> list[Path]:
    """Where `../shared/data` may be: beside the checkout, or beside the working directory."""
    return [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def search_roots(data_root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched, in order (the download target is the first writable of these or ~/.cache)."""
    roots = []
    if data_root:
        roots.append(Path(data_root))
    if os.environ.get("FEDSPARSE_DATA"):
        roots.append(Path(os.environ["FEDSPARSE_DATA"]))
    roots.extend(shared_roots())
    seen, unique = set(), []
    for r in roots:
        key = str(r.resolve()) if r.exists() else str(r)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip'ed or not) as a uint8 array: 2 zero bytes, type code, ndim, big-endian dims, data."""
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(candidates: list[Path], names: list[str]) -> Path | None:
    """First folder among `candidates` that holds every file in `names` (gzip'ed or not)."""
    for folder in candidates:
        if all((folder / n).exists() or (folder / (n + ".gz")).exists() for n in names):
            return folder
    return None


def _idx_file(folder: Path, name: str) -> Path:
    return folder / (name + ".gz") if (folder / (name + ".gz")).exists() else folder / name


def _images(x: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    x = x.astype(np.float32) / 255.0
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2).copy()


def _not_found(name: str, roots: list[Path], extra: str) -> DatasetNotFound:
    looked = "\n  ".join(str(r) for r in roots)
    return DatasetNotFound(
        f"dataset '{name}' not found. Looked in:\n  {looked}\n{extra}\n"
        "Set FEDSPARSE_DATA (or the run-config key data-root) to a folder that holds it."
    )


def _mnist_like(name: str, subdirs: list[str], roots: list[Path], extra_dirs: list[Path]) -> Dataset:
    train_files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    test_files = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    candidates = [r / s for r in roots for s in subdirs] + extra_dirs
    folder = _find(candidates, train_files + test_files)
    if folder is not None:
        x, y, xt, yt = (read_idx(_idx_file(folder, f)) for f in train_files + test_files)
        return Dataset(name, _images(x), y.astype(np.int64), _images(xt), yt.astype(np.int64), 10, str(folder))
    return _torchvision(name, roots)


def _torchvision(name: str, roots: list[Path]) -> Dataset:
    """The user's path with internet: torchvision downloads into the first root (or ~/.cache/fedsparse)."""
    import torchvision

    cls = {
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "mnist": torchvision.datasets.MNIST,
        "cifar10": torchvision.datasets.CIFAR10,
        "cifar100": torchvision.datasets.CIFAR100,
    }[name]
    # download into data-root or $FEDSPARSE_DATA when given (they come first), never into ../shared
    target = roots[0] if roots[0] not in shared_roots() else Path.home() / ".cache" / "fedsparse"
    try:
        train = cls(str(target), train=True, download=True)
        test = cls(str(target), train=False, download=True)
    except Exception as err:  # no network, a proxy, a half-written file: all end here
        raise _not_found(name, roots, f"torchvision download into {target} failed too: {err}") from err
    x, xt = np.asarray(train.data), np.asarray(test.data)
    y, yt = np.asarray(train.targets), np.asarray(test.targets)
    classes = 100 if name == "cifar100" else 10
    return Dataset(name, _images(x), y.astype(np.int64), _images(xt), yt.astype(np.int64), classes, str(target))


def _read_cifar_zip(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        x = np.stack([np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in names])
    y = np.array([CIFAR10_CLASSES.index(n.split("/")[0]) for n in names], dtype=np.int64)
    return x, y


def _cifar10(roots: list[Path]) -> Dataset:
    for r in roots:
        folder = r / "cifar10_jpeg"
        train, test = folder / "cifar10_train_first1000perclass_jpeg.zip", folder / "cifar10_test_jpeg.zip"
        if train.exists() and test.exists():
            x, y = _read_cifar_zip(train)
            xt, yt = _read_cifar_zip(test)
            # The zip lists its files sorted by class; CIFAR-10's own files are in random order. A fixed
            # permutation restores that, so a `train-subset` prefix holds every class, not just airplanes.
            order = np.random.default_rng(JPEG_SUBSET_ORDER_SEED).permutation(len(y))
            x, y = x[order], y[order]
            log.warning("cifar10: using the JPEG subset in %s (10k train images), not the full set", folder)
            return Dataset("cifar10", _images(x), y, _images(xt), yt, 10, str(folder))
    return _torchvision("cifar10", roots)


def _usps(roots: list[Path]) -> Dataset:
    for r in roots:
        path = r / "usps" / "usps.h5"
        if path.exists():
            import h5py

            with h5py.File(path, "r") as h:
                x = h["train/data"][:].reshape(-1, 1, 16, 16).astype(np.float32)
                y = h["train/target"][:].astype(np.int64)
                xt = h["test/data"][:].reshape(-1, 1, 16, 16).astype(np.float32)
                yt = h["test/target"][:].astype(np.int64)
            return Dataset("usps", x, y, xt, yt, 10, str(path))
    raise _not_found("usps", roots, "USPS has no torchvision download; put usps/usps.h5 (the ESL zip data) there.")


def _mnist(roots: list[Path]) -> Dataset:
    try:
        return _mnist_like("mnist", ["mnist", "MNIST/raw"], roots, [])
    except DatasetNotFound:
        # ../shared/data has the MNIST test set only: split it rather than fail, and say so loudly.
        folder = _find([r / "mnist" for r in roots], ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
        if folder is None:
            raise
        x = _images(read_idx(_idx_file(folder, "t10k-images-idx3-ubyte")))
        y = read_idx(_idx_file(folder, "t10k-labels-idx1-ubyte")).astype(np.int64)
        log.warning("mnist: only the test set is in %s; using its first 8000 images to train, the rest to test",
                    folder)
        return Dataset("mnist", x[:8000], y[:8000], x[8000:], y[8000:], 10, f"{folder} (test set split 8000/2000)")


def _digits() -> Dataset:
    """scikit-learn's 8x8 digits, upsampled to 16x16 like USPS; a fixed stratified 80/20 split."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).numpy()
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: len(idx) // 5]] = True
    return Dataset("digits", x[~test], y[~test], x[test], y[test], 10, "sklearn.datasets.load_digits")


@lru_cache(maxsize=4)
def load_dataset(name: str, data_root: str = "") -> Dataset:
    """Load a dataset by name (cached per process: Ray actors keep it between rounds)."""
    roots = search_roots(data_root or None)
    if name == "digits":
        return _digits()
    if name == "fashion-mnist":
        return _mnist_like("fashion-mnist", ["fashion_mnist", "fashion-mnist", "FashionMNIST/raw"], roots,
                           [DEBIAN_FASHION])
    if name == "mnist":
        return _mnist(roots)
    if name == "usps":
        return _usps(roots)
    if name == "cifar10":
        return _cifar10(roots)
    if name == "cifar100":
        return _torchvision("cifar100", roots)
    raise ValueError(f"unknown dataset '{name}'")


# ---------------------------------------------------------------------------------------------- partitions


def make_partitioner(kind: str, num_clients: int, seed: int, alpha: float = 0.3, classes_per_client: int = 2,
                     shards_per_client: int = 2, num_examples: int | None = None):
    """A flwr-datasets partitioner over the column `label`.

    `dirichlet-balanced` is the SSFL paper's split: every client holds the same number of examples (the first
    `num_examples % num_clients` clients one more), with class priors drawn from Dir(alpha); it is flwr-datasets'
    `InnerDirichletPartitioner` with equal `partition_sizes`, which needs `num_examples` (give it for that kind).
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        InnerDirichletPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    if kind == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if kind == "dirichlet":
        return DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                    min_partition_size=2, self_balancing=True, seed=seed)
    if kind == "dirichlet-balanced":
        if num_examples is None or num_examples < num_clients:
            raise ValueError(f"dirichlet-balanced needs num_examples >= num_clients ({num_clients}), got {num_examples}")
        sizes = balanced_sizes(num_examples, num_clients)
        return InnerDirichletPartitioner(partition_sizes=sizes, partition_by="label", alpha=alpha, seed=seed)
    if kind == "pathological":
        return PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                       num_classes_per_partition=classes_per_client, seed=seed)
    if kind == "shard":
        return ShardPartitioner(num_partitions=num_clients, partition_by="label",
                                num_shards_per_partition=shards_per_client, seed=seed)
    raise ValueError(f"unknown partitioner '{kind}'")


def balanced_sizes(num_examples: int, num_clients: int) -> list[int]:
    """Equal client sizes summing to `num_examples`: the first `num_examples % num_clients` get one more."""
    base, extra = divmod(num_examples, num_clients)
    return [base + (1 if i < extra else 0) for i in range(num_clients)]


def partition_code_key() -> tuple[str, ...]:
    """What, besides the labels and the arguments, decides a partition: SPLIT_VERSION and the versions of the
    libraries that draw it. Part of the cache key, so a cache written under other code is never read."""
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for package in ("flwr-datasets", "datasets", "numpy", "pyarrow"):
        try:
            versions.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} absent")
    return (f"split-v{SPLIT_VERSION}", *versions)


def partition_cache_dir() -> Path:
    """The folder of the on-disk partition cache: `$FEDSPARSE_CACHE/partitions`, else `~/.cache/fedsparse/...`."""
    return Path(os.environ.get("FEDSPARSE_CACHE", Path.home() / ".cache" / "fedsparse")) / "partitions"


class SplitCacheDamaged(ValueError):
    """A partition cache file that cannot be read as a `PartitionTable`; `reason` says what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"partition cache {path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class PartitionTable:
    """Every client's sorted training indices in one array: client i holds `indices[offsets[i]:offsets[i + 1]]`.

    Invariants (checked on construction): both arrays are one-dimensional int64 and read-only; `offsets` has one
    entry more than there are clients, starts at 0, never decreases and ends at `len(indices)`. `parts()` returns
    views into `indices`, so the clients' arrays share one buffer and none can be written to.
    """

    indices: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        for name, array in (("indices", self.indices), ("offsets", self.offsets)):
            if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != np.int64:
                raise ValueError(f"{name} must be a one-dimensional int64 array")
        if len(self.offsets) < 2 or self.offsets[0] != 0 or self.offsets[-1] != len(self.indices):
            raise ValueError(f"offsets must run from 0 to len(indices) = {len(self.indices)} over at least one "
                             f"client, got {len(self.offsets)} offsets")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must never decrease")
        self.indices.flags.writeable = False
        self.offsets.flags.writeable = False

    @property
    def num_clients(self) -> int:
        """How many clients the table splits the data over."""
        return len(self.offsets) - 1

    def part(self, client: int) -> np.ndarray:
        """The indices of one client (a read-only view)."""
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client {client} is not in 0..{self.num_clients - 1}")
        return self.indices[self.offsets[client]:self.offsets[client + 1]]

    def parts(self) -> tuple[np.ndarray, ...]:
        """The indices of every client, in client order (read-only views)."""
        bounds = self.offsets.tolist()
        return tuple(self.indices[start:end] for start, end in pairwise(bounds))

    @classmethod
    def from_parts(cls, parts: list[np.ndarray] | tuple[np.ndarray, ...]) -> PartitionTable:
        """The table of clients' index arrays (copied into one array, as int64)."""
        if not parts:
            raise ValueError("a partition table needs at least one client")
        sizes = np.array([len(part) for part in parts], dtype=np.int64)
        offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes)])
        return cls(np.concatenate([np.asarray(part, dtype=np.int64) for part in parts]), offsets)


def write_split_cache(path: Path, table: PartitionTable) -> None:
    """Store `table` at `path` as an npz of two members, `indices` and `offsets` (written whole, then renamed into
    place, so a reader never sees half a file)."""
    temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(temporary, indices=table.indices, offsets=table.offsets)
    temporary.replace(path)


def read_split_cache(path: Path, num_clients: int) -> PartitionTable:
    """The table stored at `path` by `write_split_cache`; `SplitCacheDamaged` if the file is not one (an unreadable
    file, other members, another number of clients, offsets that do not fit)."""
    try:
        stored = np.load(path, allow_pickle=False)
        if not isinstance(stored, np.lib.npyio.NpzFile):
            raise SplitCacheDamaged(path, "a single array, not an npz archive")
        with stored:
            if sorted(stored.files) != ["indices", "offsets"]:
                raise SplitCacheDamaged(path, f"members {sorted(stored.files)[:4]}, not ['indices', 'offsets']")
            indices, offsets = stored["indices"], stored["offsets"]
    except SplitCacheDamaged:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise SplitCacheDamaged(path, f"unreadable: {err}") from err
    if len(offsets) != num_clients + 1:
        raise SplitCacheDamaged(path, f"{len(offsets) - 1} clients, expected {num_clients}")
    try:
        return PartitionTable(indices, offsets)
    except ValueError as err:
        raise SplitCacheDamaged(path, str(err)) from err


def iid_table(num_examples: int, num_clients: int) -> PartitionTable:
    """flwr-datasets' iid split computed with numpy: `IidPartitioner.load_partition(i)` is datasets'
    `Dataset.shard(num_clients, i, contiguous=True)`, the rows `div * i + min(i, mod)` up to the next client's
    start, where `div, mod = divmod(num_examples, num_clients)`; the rows are in index order, so each block is
    already sorted. `partition_labels` checks it against flwr-datasets on every draw."""
    if num_clients < 1 or num_examples < 0:
        raise ValueError(f"need num_clients >= 1 and num_examples >= 0, got {num_clients} and {num_examples}")
    div, mod = divmod(num_examples, num_clients)
    clients = np.arange(num_clients + 1, dtype=np.int64)
    return PartitionTable(np.arange(num_examples, dtype=np.int64), div * clients + np.minimum(clients, mod))


def iid_spot_checks(num_clients: int) -> list[int]:
    """The partitions an iid draw compares with flwr-datasets: the first, the last and `IID_SPOT_CHECKS` more
    drawn by a generator seeded with the number of clients (the same ones on every machine)."""
    rng = np.random.default_rng([IID_SPOT_CHECK_SEED, num_clients])
    drawn = rng.choice(num_clients, size=min(num_clients, IID_SPOT_CHECKS), replace=False)
    return sorted({0, num_clients - 1, *drawn.tolist()})


def partition_column(part, column: str = "idx") -> np.ndarray:
    """The values of `column` in the rows of `part` (a HuggingFace `datasets.Dataset`), read from its Arrow table.

    A `select` keeps the parent's whole table plus an indices mapping (the rows it holds, in order); a contiguous
    one slices the table (or the mapping). Reading the column and taking the mapped rows gives what iterating the
    rows gives, without a Python object per row; should the library keep its rows some other way (the length then
    differs), the partition is read through its public Arrow format instead.
    """
    values = part.data.column(column)
    mapping = getattr(part, "_indices", None)
    if mapping is not None:
        values = values.take(mapping.column("indices"))
    array = values.to_numpy()
    if len(array) != len(part):
        array = part.with_format("arrow")[:].column(column).to_numpy()
    return array


def _draw_partitions(labels: np.ndarray, kind: str, num_clients: int, seed: int, alpha: float,
                     classes_per_client: int, shards_per_client: int) -> PartitionTable:
    """Every client's sorted indices, as flwr-datasets' partitioner `kind` splits a table of (idx, label) rows.

    iid is computed at once (`iid_table`) and kept only if the spot-checked partitions equal flwr-datasets'; every
    other partitioner, and iid after a mismatch, loads each partition through flwr-datasets.
    """
    from datasets import Dataset as HFDataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    partitioner = make_partitioner(kind, num_clients, seed, alpha, classes_per_client, shards_per_client,
                                   num_examples=len(labels))
    partitioner.dataset = HFDataset.from_dict({"idx": np.arange(len(labels)), "label": labels})

    def load(client: int) -> np.ndarray:
        return np.sort(partition_column(partitioner.load_partition(client)).astype(np.int64, copy=False))

    if kind == "iid":
        table = iid_table(len(labels), num_clients)
        mismatched = [i for i in iid_spot_checks(num_clients) if not np.array_equal(table.part(i), load(i))]
        if not mismatched:
            return table
        log.warning("the iid split computed here differs from flwr-datasets' at partitions %s of %d: loading "
                    "every partition through flwr-datasets instead", mismatched, num_clients)
    return PartitionTable.from_parts([load(i) for i in range(num_clients)])


@lru_cache(maxsize=8)
def partition_indices(labels_key: tuple, kind: str, num_clients: int, seed: int, alpha: float,
                      classes_per_client: int, shards_per_client: int) -> tuple[np.ndarray, ...]:
    """Training-set indices of every client. `labels_key` is (dataset name, data root, train-subset).

    Kept in memory per process and on disk per machine (`partition_labels`): in a deployment every message runs
    in a fresh ClientApp process, which would otherwise import `datasets` and redraw the partition each time.
    """
    name, root, subset = labels_key
    labels = load_dataset(name, root).y_train
    if subset:
        labels = labels[:subset]
    return partition_labels(labels, name, kind, num_clients, seed, alpha, classes_per_client, shards_per_client)


def split_cache_path(labels: np.ndarray, source: str, kind: str, num_clients: int, seed: int, alpha: float,
                     classes_per_client: int, shards_per_client: int) -> Path:
    """Where `partition_labels` caches this split: a name hashed from the split code's version, the library
    versions, `source` (what the labels are of), a hash of the labels and every setting."""
    key = (partition_code_key(), source, hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64)).hexdigest(),
           kind, num_clients, seed, alpha, classes_per_client, shards_per_client)
    return partition_cache_dir() / (hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".npz")


def partition_labels(labels: np.ndarray, source: str, kind: str, num_clients: int, seed: int, alpha: float,
                     classes_per_client: int, shards_per_client: int) -> tuple[np.ndarray, ...]:
    """Sorted int64 indices into `labels` of every client (read-only views into one array), drawn by the
    flwr-datasets partitioner `kind` and cached on disk at `split_cache_path`: a cache written by other code or for
    other labels is never read, and a damaged one is drawn again and rewritten."""
    path = split_cache_path(labels, source, kind, num_clients, seed, alpha, classes_per_client, shards_per_client)
    if path.exists():
        try:
            return read_split_cache(path, num_clients).parts()
        except SplitCacheDamaged as err:
            log.warning("%s; drawing the split again", err)
    table = _draw_partitions(labels, kind, num_clients, seed, alpha, classes_per_client, shards_per_client)
    try:  # a cache that cannot be written is no error: the partition is deterministic anyway
        path.parent.mkdir(parents=True, exist_ok=True)
        write_split_cache(path, table)
    except OSError as err:
        log.debug("partition cache not written: %s", err)
    return table.parts()


def client_split(cfg: dict, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of one client, deterministic for the seed."""
    parts = partition_indices((cfg["dataset"], cfg["data-root"], cfg["train-subset"]), cfg["partitioner"],
                              cfg["num-clients"], cfg["seed"], cfg["dirichlet-alpha"], cfg["classes-per-client"],
                              cfg["shards-per-client"])
    idx = parts[partition_id]
    rng = np.random.default_rng([cfg["seed"], partition_id])
    idx = rng.permutation(idx)
    n_val = round(len(idx) * cfg["val-fraction"]) if len(idx) > 1 else 0
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


def label_histograms(cfg: dict) -> np.ndarray:
    """(num-clients, num-classes) label counts of the clients' training data, for reports and tests."""
    ds = load_dataset(cfg["dataset"], cfg["data-root"])
    return np.stack([np.bincount(ds.y_train[client_split(cfg, i)[0]], minlength=ds.num_classes)
                     for i in range(cfg["num-clients"])])


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and standard deviation of a training set, for input normalisation."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def channel_stats(x: np.ndarray) -> ChannelStats:
    """Mean and std of every channel of images (N, C, H, W), computed in float64 (a zero std becomes 1, so a
    constant channel is only centred)."""
    if x.ndim != 4:
        raise ValueError(f"channel_stats expects images (N, C, H, W), got shape {x.shape}")
    values = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    std = values.std(axis=1)
    return ChannelStats(tuple(float(m) for m in values.mean(axis=1)),
                        tuple(float(s) if s > 0 else 1.0 for s in std))


def input_stats(cfg: dict) -> ChannelStats | None:
    """What a run standardises its inputs with: the per-channel stats of its training set (the `train-subset`
    prefix) when `normalize` is on, else None. The clients' training and saliency batches and the server's test
    set all use this, so every path sees the same inputs."""
    if not cfg.get("normalize", False):
        return None
    return dataset_channel_stats(cfg["dataset"], cfg["data-root"], cfg["train-subset"])


@lru_cache(maxsize=4)
def dataset_channel_stats(name: str, data_root: str = "", train_subset: int = 0) -> ChannelStats:
    """`channel_stats` of a dataset's training set (its `train_subset` prefix when > 0), cached per process."""
    return channel_stats(load_dataset(name, data_root).x_train[: train_subset or None])
