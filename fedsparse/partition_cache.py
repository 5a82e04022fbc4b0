"""A client's prepared partition on disk, so that a fresh ClientApp process gets its examples without reading and
partitioning the whole dataset again.

A deployed Flower node starts one `flwr-clientapp` process per message, and every one of them would load the full
dataset (for `digits`: import scikit-learn and resample every image) and draw the partition again. Here the first
message on a node writes its partition (examples and labels) as two .npy files and a small JSON record; later
messages memory-map the files (`np.load(mmap_mode="c")`: pages are read on demand, and a write by the caller stays
private to its process, so nothing can change the file).

    x, y = cached_partition(cfg, partition_id, "train", folder, compute=lambda: recompute(...))

Invariants:
- A cache never decides a result. An entry's name is a hash of everything that determines its arrays
  (`PartitionKey`): the dataset name, every setting of the run config that the dataset loading and the split read
  (`PARTITION_CONFIG_KEYS`), the partition id and the split, the identity (path, size, mtime) of every file the
  dataset may be read from (`dataset_files`), the source of `fedsparse/data.py` and this module, and the versions
  of the libraries that read and split the data. Any change in any of them names another entry.
- Entries are written atomically: each file to a temporary name, then renamed; the JSON record, written last,
  holds the key, the arrays' shapes, dtypes and SHA-256 digests.
- A read checks the record's key, the shapes, dtypes and digests of the arrays; on any mismatch or error the
  entry is recomputed (and written again). A cache that cannot be written is no error: the result is the same.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout of an entry changes
SPLITS = ("train", "val")
PARTITION_CONFIG_KEYS = ("dataset", "data-root", "train-subset", "partitioner", "num-clients", "seed",
                         "dirichlet-alpha", "classes-per-client", "shards-per-client", "val-fraction")
"""The run-config keys that `fedsparse.data.load_dataset` and `fedsparse.data.client_split` read (a test checks
that they read no other)."""
LIBRARIES = ("numpy", "torch", "scikit-learn", "flwr-datasets", "datasets", "pyarrow", "h5py", "pillow",
             "torchvision")
# Where each dataset's files may be, under every root of `fedsparse.data.search_roots` (see fedsparse.data).
DATASET_FOLDERS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion-mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
    "usps": ("usps",),
    "cifar10": ("cifar10_jpeg", "cifar-10-batches-py"),
    "cifar100": ("cifar-100-python",),
}
_CODE_FILES = (Path(__file__).resolve().parent / "data.py", Path(__file__).resolve())


class PartitionCacheError(ValueError):
    """An entry on disk that does not match what was asked for (the text says what); it is then recomputed."""


class Partition(NamedTuple):
    """One client's examples and labels."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class PartitionKey:
    """Everything that determines a client's partition (module docstring); `digest()` names its entry."""

    settings: tuple[tuple[str, str], ...]  # (run-config key, repr of its value) for PARTITION_CONFIG_KEYS
    partition_id: int
    split: str
    data_files: tuple[tuple[str, int, int], ...]  # (path, size, mtime_ns) of every file the dataset may come from
    code: str  # digest of fedsparse/data.py and this module
    libraries: tuple[str, ...]
    cache_format: int = CACHE_FORMAT

    def digest(self) -> str:
        """A SHA-256 hex digest of every field."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def library_versions() -> tuple[str, ...]:
    """`name==version` (or `name absent`) of every library that reads or splits data."""
    out = []
    for package in LIBRARIES:
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(f"{package} absent")
    return tuple(out)


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of the source of `fedsparse/data.py` and of this module: an edit to either names new entries."""
    sha = hashlib.sha256()
    for path in _CODE_FILES:
        sha.update(path.read_bytes())
    return sha.hexdigest()


def _files_under(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file())


def dataset_files(name: str, data_root: str) -> list[Path]:
    """Every file dataset `name` may be read from, in the order `fedsparse.data` searches: under each search
    root's folders for it (`DATASET_FOLDERS`), Debian's Fashion-MNIST, torchvision's download target; for
    `digits`, scikit-learn's data file (found without importing scikit-learn)."""
    from fedsparse.data import DEBIAN_FASHION, search_roots

    if name == "digits":
        spec = importlib.util.find_spec("sklearn")
        if spec is None or spec.origin is None:
            return []
        return _files_under(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz")
    subfolders = DATASET_FOLDERS.get(name, ())
    roots = [*search_roots(data_root or None), Path.home() / ".cache" / "fedsparse"]  # the last: torchvision's
    folders = [root / sub for root in roots for sub in subfolders]
    if name == "fashion-mnist":
        folders.append(DEBIAN_FASHION)
    return [path for folder in folders for path in _files_under(folder)]


def _key(cfg: dict, keys: tuple[str, ...], partition_id: int, split: str) -> PartitionKey:
    missing = [key for key in PARTITION_CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"run config lacks {', '.join(missing)}: not a resolved config")
    files = []
    for path in dataset_files(str(cfg["dataset"]), str(cfg["data-root"])):
        stat = path.stat()
        files.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return PartitionKey(settings=tuple((key, repr(cfg[key])) for key in keys), partition_id=int(partition_id),
                        split=split, data_files=tuple(files), code=code_digest(), libraries=library_versions())


def partition_key(cfg: dict, partition_id: int, split: str) -> PartitionKey:
    """The key of `partition_id`'s `split` ("train" or "val") under the resolved run config `cfg`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if partition_id < 0:
        raise ValueError(f"partition_id must be >= 0, got {partition_id}")
    return _key(cfg, PARTITION_CONFIG_KEYS, partition_id, split)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _describe(array: np.ndarray) -> dict:
    return {"shape": list(array.shape), "dtype": array.dtype.str, "sha256": _sha256(array)}


def _paths(folder: Path, digest: str) -> tuple[Path, Path, Path]:
    stem = folder / digest[:32]
    return stem.with_suffix(".x.npy"), stem.with_suffix(".y.npy"), stem.with_suffix(".json")


def read_entry(folder: Path, key: PartitionKey) -> Partition:
    """The entry of `key` in `folder`, memory-mapped; FileNotFoundError if there is none, PartitionCacheError if
    its record or arrays do not match."""
    digest = key.digest()
    x_path, y_path, record_path = _paths(folder, digest)
    record = json.loads(record_path.read_text())
    if record.get("key") != digest or record.get("format") != CACHE_FORMAT:
        raise PartitionCacheError(f"{record_path}: written for another key")
    arrays = {}
    for name, path in (("x", x_path), ("y", y_path)):
        array = np.load(path, mmap_mode="c", allow_pickle=False)
        if _describe(array) != record.get(name):
            raise PartitionCacheError(f"{path}: shape, dtype or content differs from its record "
                                      f"({list(array.shape)} {array.dtype.str}, record {record.get(name)})")
        arrays[name] = array
    if len(arrays["x"]) != len(arrays["y"]):
        raise PartitionCacheError(f"{x_path}: {len(arrays['x'])} examples but {len(arrays['y'])} labels")
    return Partition(arrays["x"], arrays["y"])


def write_entry(folder: Path, key: PartitionKey, partition: Partition) -> None:
    """Write `partition` as the entry of `key`: each file to a temporary name, then renamed; the record last."""
    digest = key.digest()
    folder.mkdir(parents=True, exist_ok=True)
    x_path, y_path, record_path = _paths(folder, digest)
    record = {"format": CACHE_FORMAT, "key": digest, "x": _describe(partition.x), "y": _describe(partition.y),
              "what": asdict(key)}
    suffix = f".{os.getpid()}.tmp"
    for path, array in ((x_path, partition.x), (y_path, partition.y)):
        temporary = path.with_name(path.name + suffix)
        with temporary.open("wb") as out:
            np.save(out, np.ascontiguousarray(array), allow_pickle=False)
        temporary.replace(path)
    temporary = record_path.with_name(record_path.name + suffix)
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(record_path)


def cached_partition(cfg: dict, partition_id: int, split: str, folder: Path,
                     compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Partition:
    """`partition_id`'s `split` from its entry in `folder`, else `compute()` (written there for the next
    process). A damaged or mismatching entry is recomputed and replaced (module docstring)."""
    key = partition_key(cfg, partition_id, split)
    try:
        return read_entry(Path(folder), key)
    except FileNotFoundError:
        pass
    except (PartitionCacheError, OSError, ValueError, EOFError) as err:  # damaged: recompute and replace
        log.warning("partition cache entry ignored and recomputed: %s", err)
    x, y = compute()
    partition = Partition(x, y)
    try:
        write_entry(Path(folder), key, partition)
    except OSError as err:
        log.warning("partition cache not written to %s: %s", folder, err)
    return partition


@dataclass(frozen=True)
class DatasetShape:
    """What a model of a dataset needs to know about it: one example's shape and the number of classes."""

    input_shape: tuple[int, ...]
    num_classes: int


def cached_dataset_shape(cfg: dict, folder: Path, compute: Callable[[], DatasetShape]) -> DatasetShape:
    """The run's dataset's `DatasetShape` from its record in `folder` (keyed like a partition, on the dataset,
    its data root and files, the code and the libraries), else `compute()`, recorded for the next process."""
    key = _key(cfg, ("dataset", "data-root"), partition_id=-1, split="shape")
    digest = key.digest()
    path = Path(folder) / f"{digest[:32]}.shape.json"
    try:
        record = json.loads(path.read_text())
        if record.get("key") == digest and record.get("format") == CACHE_FORMAT:
            shape = DatasetShape(tuple(int(n) for n in record["input_shape"]), int(record["num_classes"]))
            if shape.num_classes > 0 and all(n > 0 for n in shape.input_shape):
                return shape
        log.warning("dataset shape record %s ignored: written for another key or malformed", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("dataset shape record %s ignored: %s", path, err)
    shape = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"format": CACHE_FORMAT, "key": digest, "input_shape": list(shape.input_shape),
                                         "num_classes": shape.num_classes}))
        temporary.replace(path)
    except OSError as err:
        log.warning("dataset shape record not written to %s: %s", folder, err)
    return shape
