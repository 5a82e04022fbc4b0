"""The run configuration: one flat schema of hyphenated keys, shared by `flwr run`, `fedsparse run` and the tests.

Every key has a type, a default and a check. `resolve()` turns whatever the caller has (Flower's typed
run_config, strings from `--set key=value`, a preset TOML) into a complete, validated dict, and fails before any
training starts with a `ConfigError` that names the offending key and what it allows.

Invariants of a resolved config: every float is finite, `seed` is in [0, MAX_SEED], `min-clients` <= `num-clients`,
`output-dir` is not blank, `sparse.mask-layers` is a normalised comma list. What needs the data, the model or the machine
(the split, maskable weights, a GPU, a writable folder) is checked by `fedsparse.simulation.preflight`. A resumed
run may differ from its checkpoint only in RESUME_CHANGEABLE and RESUME_IGNORED (`fedsparse.resume`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedsparse.optim import OPTIMIZERS

STRATEGIES = ("fedavg", "ssfl", "random", "magnitude", "topk")
DATASETS = ("fashion-mnist", "mnist", "usps", "cifar10", "cifar100", "digits")
MODELS = ("cnn", "mlp", "resnet18")
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
VALUE_DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
AGGREGATIONS = ("mean", "median", "trimmed-mean")

MAX_SEED = 2**32 - 1  # numpy's legacy seeding and every seed derived from it stay in range

# What `fedsparse run --resume DIR --set ...` may change: nothing that decides the model, the data or the clients'
# work, only how long the run goes on and where and how fast it runs.
RESUME_CHANGEABLE = ("num-rounds", "round-timeout", "connect-timeout", "device", "client-num-cpus", "client-num-gpus",
                     "min-clients")
# Not compared on resume: where the run folder is (a copied folder resumes) and the resume flag itself.
RESUME_IGNORED = ("output-dir", "resume")


# Keys that moved into a namespace (Flower turns the nested table [tool.flwr.app.config.sparse] into "sparse.<key>").
# The old flat names are still read, so existing commands (`--set sparsity=0.8`) and run folders keep working.
RENAMED = {old: f"sparse.{old}" for old in ("sparsity", "mask-scope", "mask-layers", "saliency-fraction",
                                            "saliency-batches", "saliency-aggregation", "value-dtype",
                                            "warmup-rounds", "topk-density")}


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables (a preset's `[sparse]`, TOML dotted keys) -> dotted keys, as Flower does for the run config;
    old flat names (RENAMED) become their namespaced key."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    for old_name, new_name in RENAMED.items():
        if old_name in out:
            value = out.pop(old_name)
            if new_name in out and out[new_name] != value:
                raise ConfigError(f"config key '{old_name}' is now '{new_name}', and both are set ({value!r} and "
                                  f"{out[new_name]!r}): set only '{new_name}'")
            out[new_name] = value
    return out


class ConfigError(ValueError):
    """An invalid run configuration; the message names the key."""


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # human wording of `check`, for the error message


def _in_unit_open(x: float) -> bool:
    return 0.0 < x <= 1.0


SCHEMA: dict[str, Key] = {
    # what runs
    "strategy": Key(str, "fedavg", "federated strategy", STRATEGIES),
    "dataset": Key(str, "fashion-mnist", "dataset name", DATASETS),
    "model": Key(str, "cnn", "model name", MODELS),
    "data-root": Key(str, "", "explicit data folder (else $FEDSPARSE_DATA, ../shared/data, Debian, download)"),
    "train-subset": Key(int, 0, "use only the first N training examples (0 = all)", check=lambda v: v >= 0,
                        rule=">= 0"),
    # federation
    "num-clients": Key(int, 10, "number of clients (partitions)", check=lambda v: v >= 1, rule=">= 1"),
    "num-rounds": Key(int, 3, "federated rounds", check=lambda v: v >= 1, rule=">= 1"),
    "fraction-train": Key(float, 1.0, "fraction of clients sampled per round", check=_in_unit_open,
                          rule="in (0, 1]"),
    "partitioner": Key(str, "dirichlet", "how data is split across clients", PARTITIONERS),
    "dirichlet-alpha": Key(float, 0.3, "Dirichlet concentration (smaller = more skewed)",
                           check=lambda v: v > 0, rule="> 0"),
    "classes-per-client": Key(int, 2, "pathological partitioner: classes per client", check=lambda v: v >= 1,
                              rule=">= 1"),
    "shards-per-client": Key(int, 2, "shard partitioner: shards per client", check=lambda v: v >= 1,
                             rule=">= 1"),
    "val-fraction": Key(float, 0.1, "share of each client's data held out for local validation",
                        check=lambda v: 0.0 <= v < 1.0, rule="in [0, 1)"),
    # local training
    "local-epochs": Key(int, 1, "local epochs per round", check=lambda v: v >= 1, rule=">= 1"),
    "batch-size": Key(int, 32, "local batch size", check=lambda v: v >= 1, rule=">= 1"),
    "lr": Key(float, 0.05, "local learning rate", check=lambda v: v > 0, rule="> 0"),
    "lr-decay": Key(float, 1.0, "per-round lr factor: lr * lr-decay**(round-1)", check=_in_unit_open,
                    rule="in (0, 1]"),
    "momentum": Key(float, 0.0, "momentum (sgd, tam) or beta1 (adam, adatam, adatamw)",
                    check=lambda v: 0.0 <= v < 1.0, rule="in [0, 1)"),
    "weight-decay": Key(float, 0.0, "SGD weight decay", check=lambda v: v >= 0, rule=">= 0"),
    "grad-clip": Key(float, 0.0, "clip the gradient norm to this (0 = off)", check=lambda v: v >= 0,
                     rule=">= 0"),
    "optimizer": Key(str, "sgd", "local optimiser (fedsparse.optim; momentum is beta1 of the adam family)",
                     tuple(OPTIMIZERS)),
    "seed": Key(int, 42, "seed for data split, init, sampling and training",
                check=lambda v: 0 <= v <= MAX_SEED, rule=f"in [0, {2**32 - 1}]"),
    # sparse.*: the sparse strategies (ssfl, random, magnitude, topk)
    "sparse.sparsity": Key(float, 0.9, "fraction of maskable weights pruned", check=lambda v: 0.0 <= v < 1.0,
                    rule="in [0, 1)"),
    "sparse.mask-scope": Key(str, "global", "top-k over all maskable tensors or per tensor", ("global", "layerwise")),
    "sparse.mask-layers": Key(str, "conv,linear", "which weights are maskable: comma list of conv, linear"),
    "sparse.saliency-fraction": Key(float, 1.0, "share of clients asked for saliency", check=_in_unit_open,
                             rule="in (0, 1]"),
    "sparse.saliency-batches": Key(int, 1, "minibatches per client for the saliency score", check=lambda v: v >= 1,
                            rule=">= 1"),
    "sparse.saliency-aggregation": Key(str, "weighted", "how the server averages client scores", ("weighted", "mean")),
    "sparse.value-dtype": Key(str, "float32", "precision of values on the wire (sparse strategies)", VALUE_DTYPES),
    "sparse.warmup-rounds": Key(int, 1, "magnitude: dense rounds before the mask is fixed", check=lambda v: v >= 0,
                         rule=">= 0"),
    "sparse.topk-density": Key(float, 0.1, "topk: share of update entries each client sends", check=_in_unit_open,
                        rule="in (0, 1]"),
    # where and how it runs
    "device": Key(str, "auto", "torch device for training and evaluation", DEVICES),
    "client-num-cpus": Key(int, 1, "CPUs per simulated client (Ray)", check=lambda v: v >= 1, rule=">= 1"),
    "client-num-gpus": Key(float, 0.0, "GPUs per simulated client (fractions allowed)",
                           check=lambda v: v >= 0, rule=">= 0"),
    "round-timeout": Key(float, 900.0, "seconds to wait for the replies of one exchange (a round's training, the "
                         "saliency query, a mask install)", check=lambda v: v > 0, rule="> 0"),
    "connect-timeout": Key(float, 120.0, "seconds to wait for min-clients (else num-clients) nodes to connect "
                           "before the first round", check=lambda v: v > 0, rule="> 0"),
    "min-clients": Key(int, 0, "wait for this many connected clients before starting (0 = num-clients)",
                       check=lambda v: v >= 0, rule=">= 0"),
    "output-dir": Key(str, "results/latest", "where results and checkpoints go",
                      check=lambda v: bool(v.strip()), rule="a non-empty path"),
    "resume": Key(bool, False, "continue from the checkpoint in output-dir"),
    # robustness of the aggregation (every strategy's train replies)
    "aggregation": Key(str, "mean", "how client updates are combined: example-weighted mean, coordinate-wise "
                       "median, or trimmed mean (the last two unweighted)", AGGREGATIONS),
    "trim-fraction": Key(float, 0.1, "trimmed-mean: share of the values dropped at each end, per coordinate",
                         check=lambda v: 0.0 <= v < 0.5, rule="in [0, 0.5)"),
    "max-update-norm-ratio": Key(float, 50.0, "reject an update whose L2 norm exceeds this times the round's "
                                 "median update norm (0 = off)", check=lambda v: v >= 0, rule=">= 0"),
}


def _coerce(name: str, key: Key, value: Any) -> Any:
    """Convert `value` to the key's type; strings (from the command line) are parsed."""
    if key.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{name}': expected true or false, got {value!r}")
    if key.type is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{name}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{name}': expected an integer, got {value!r}")
    if key.type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{name}': expected a number, got {value!r}")
    return str(value)


def resolve(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults updated with `overrides`, every key checked. Raises ConfigError naming the first bad key."""
    cfg = {name: key.default for name, key in SCHEMA.items()}
    for name, value in flatten(overrides or {}).items():
        if name not in SCHEMA:
            raise ConfigError(f"unknown config key '{name}'; known keys: {', '.join(sorted(SCHEMA))}")
        cfg[name] = _coerce(name, SCHEMA[name], value)
    for name, key in SCHEMA.items():
        value = cfg[name]
        if key.type is float and not math.isfinite(value):
            raise ConfigError(f"config key '{name}': {value!r} is not a finite number")
        if key.choices is not None and value not in key.choices:
            raise ConfigError(f"config key '{name}': {value!r} is not one of {', '.join(key.choices)}")
        if key.check is not None and not key.check(value):
            raise ConfigError(f"config key '{name}': {value!r} must be {key.rule}")
    layers = [x.strip() for x in cfg["sparse.mask-layers"].split(",") if x.strip()]
    if not layers or any(x not in ("conv", "linear") for x in layers):
        raise ConfigError(f"config key 'sparse.mask-layers': {cfg['sparse.mask-layers']!r} must be a comma list of conv, linear")
    cfg["sparse.mask-layers"] = ",".join(layers)  # "conv, linear" -> "conv,linear": every reader splits on ","
    if cfg["fraction-train"] * cfg["num-clients"] < 1.0:
        raise ConfigError(
            f"config key 'fraction-train': {cfg['fraction-train']} x num-clients {cfg['num-clients']} "
            "samples no client; raise it to at least 1/num-clients"
        )
    if cfg["min-clients"] > cfg["num-clients"]:
        raise ConfigError(f"config key 'min-clients': {cfg['min-clients']} is more than num-clients "
                          f"{cfg['num-clients']}; the run would wait for clients that never come")
    return cfg


def resume_conflicts(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Keys whose value in `wanted` differs from the run `saved` in a way resume must refuse, sorted.

    Keys in RESUME_CHANGEABLE and RESUME_IGNORED may differ. A key missing from `saved` (the run predates it)
    counts as its default; a key that is no longer in the schema is ignored. `num-rounds` may only grow, which
    the caller checks against the rounds already done.
    """
    saved, wanted = flatten(saved), flatten(wanted)
    conflicts = []
    for name, key in SCHEMA.items():
        if name in RESUME_CHANGEABLE or name in RESUME_IGNORED:
            continue
        if saved.get(name, key.default) != wanted.get(name, key.default):
            conflicts.append(name)
    return conflicts


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """`["a=1", "b=x"]` -> `{"a": "1", "b": "x"}`, for `--set`."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[name.strip()] = value.strip()
    return out
