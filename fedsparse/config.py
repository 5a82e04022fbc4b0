"""The run configuration: one schema of hyphenated keys, shared by `flwr run`, `fedsparse run` and the tests.

Core keys are flat (`strategy`, `lr`); the keys of one family of methods live in a namespace, a dotted prefix
(`sparse.sparsity`, later `cl.*`): Flower turns the nested table `[tool.flwr.app.config.sparse]` into them.
Every key has a type, a default and a check. `resolve()` turns whatever the caller has (Flower's typed
run_config, strings from `--set key=value`, a preset TOML) into a complete, validated dict, and fails before any
training starts with a `ConfigError` that names the offending key and what it allows.

The names a key may take from a registry (`strategy`, `experiment`, `optimizer`, `model`) are the registry's own:
this module holds no second list of them, and imports `server.*` registries only inside `resolve()`, so
`fedsparse` stays importable without the `server` package. A namespaced key set to something other than its
default must be used by the run: it is in the chosen strategy's `config_keys` or in a namespace of the chosen
experiment's `config_namespaces`; otherwise `resolve()` refuses it by name (a run would silently ignore it).
Comparing with the default, not asking whether the key was given, makes this work under `flwr run` too, which
passes every key.

Invariants of a resolved config: every float is finite, `seed` is in [0, MAX_SEED], `min-clients` <= `num-clients`,
`output-dir` is not blank, `sparse.mask-layers` is a normalised comma list, every namespaced key off its default is
read by the chosen strategy or experiment. What needs the data, the model or the machine (the split, maskable
weights, a GPU, a writable folder) is checked by `fedsparse.simulation.preflight`. A resumed
run may differ from its checkpoint only in RESUME_CHANGEABLE and RESUME_IGNORED (`fedsparse.resume`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedsparse.continual.procedure import FEDERATED_METHODS as CL_METHODS
from fedsparse.merging.merge import MERGE_METHODS
from fedsparse.optim import OPTIMIZERS
from fedsparse.tasks import STREAMS as CL_STREAMS

DATASETS = ("fashion-mnist", "mnist", "usps", "cifar10", "cifar100", "digits")
PARTITIONERS = ("iid", "dirichlet", "dirichlet-balanced", "pathological", "shard")
VALUE_DTYPES = ("float32", "float16", "bfloat16", "int8")  # int8: per-block scales (fedsparse.transport)
DEVICES = ("auto", "cpu", "cuda")
AGGREGATIONS = ("mean", "median", "trimmed-mean")
DISCOVERY = ("auto", "all", "on-demand")  # server.strategies.nodes: which nodes are asked their partition
SALIENCY_AGGREGATIONS = ("weighted", "mean")
SALIENCY_DTYPES = ("float32", "float16", "bfloat16")  # how a client uploads its saliency scores
SALIENCY_INITS = ("send", "rebuild")  # how a client gets the initial model it scores (see server.strategies.ssfl)
TRANSFER_METHODS = ("data_selection", "static_only", "all_data")  # fedsparse.unlearning.transfer
# the unlearn experiment's phase 2 (server.experiments.unlearning)
UNLEARN_METHODS = ("retrain", "finetune", "del", "federaser")
# fedsparse.unlearning registry methods the unlearn experiment runs as local procedures (client.unlearning_local)
UNLEARN_LOCAL_METHODS = ("gradient_ascent", "neggrad_plus", "l1_sparse", "random_label", "salun", "scrub")
UNLEARN_FORGET_SETS = ("client", "client-samples", "uniform", "class")  # client.unlearning.forget_split
UNLEARN_TRANSPORTS = ("dense", "values")  # how the unlearn experiment's DEL rounds carry the model
UNLEARN_SCORE_DTYPES = ("float32", "float16")  # how a client sends its DEL scores (forget set on many clients)
CONN_DATA = ("full", "partition")  # the connectivity experiment's training data (client.connectivity)

MAX_SEED = 2**32 - 1  # numpy's legacy seeding and every seed derived from it stay in range

# What `fedsparse run --resume DIR --set ...` may change: nothing that decides the model, the data or the clients'
# work, only how long the run goes on and where and how fast it runs.
RESUME_CHANGEABLE = ("num-rounds", "round-timeout", "connect-timeout", "device", "client-num-cpus", "client-num-gpus",
                     "min-clients", "discovery")
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


# Registries whose names are the choices of a key, as "module:ATTRIBUTE" (a dict keyed by name).
STRATEGY_REGISTRY = "server.strategies:STRATEGIES"
EXPERIMENT_REGISTRY = "server.experiments:EXPERIMENTS"
MODEL_REGISTRY = "fedsparse.models:MODELS"


def registry(path: str) -> Mapping[str, Any] | None:
    """The registry at "module:ATTRIBUTE", imported on first use; None while that module does not exist, or is a
    folder without `__init__.py` yet (another module missing inside it is an error, raised as is)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            return None
        raise
    if getattr(module, "__file__", None) is None:  # a namespace package: the registry module is not written yet
        return None
    return getattr(module, attr)


@dataclass(frozen=True)
class Key:
    """One run-config key: its type, default, help text and what values it allows."""

    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # human wording of `check`, for the error message
    registry: str = ""  # "module:ATTRIBUTE" whose names are the choices (read by `allowed`, not at import)

    def allowed(self) -> tuple[str, ...] | None:
        """The values this key may take: its registry's names (only the default while the registry's module does
        not exist yet), its fixed choices, or None for any value that passes `check`."""
        if self.registry:
            names = registry(self.registry)
            return (self.default,) if names is None else tuple(names)
        return self.choices


def namespace(name: str) -> str:
    """"sparse" for "sparse.sparsity"; "" for a core key."""
    return name.partition(".")[0] if "." in name else ""


def _in_unit_open(x: float) -> bool:
    return 0.0 < x <= 1.0


SCHEMA: dict[str, Key] = {
    # what runs
    "experiment": Key(str, "standard", "experiment: phases of federated rounds (server.experiments)",
                      registry=EXPERIMENT_REGISTRY),
    "strategy": Key(str, "fedavg", "federated strategy (server.strategies)", registry=STRATEGY_REGISTRY),
    "dataset": Key(str, "fashion-mnist", "dataset name", DATASETS),
    "model": Key(str, "cnn", "model name (fedsparse.models)", registry=MODEL_REGISTRY),
    "data-root": Key(str, "", "explicit data folder (else $FEDSPARSE_DATA, ../shared/data, Debian, download)"),
    "train-subset": Key(int, 0, "use only the first N training examples (0 = all)", check=lambda v: v >= 0,
                        rule=">= 0"),
    # federation
    "num-clients": Key(int, 10, "number of clients (partitions)", check=lambda v: v >= 1, rule=">= 1"),
    "num-rounds": Key(int, 3, "federated rounds", check=lambda v: v >= 1, rule=">= 1"),
    "eval-every": Key(int, 1, "central evaluation every k-th round (and always a phase's last round)",
                      check=lambda v: v >= 1, rule=">= 1"),
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
    "augment": Key(str, "none", "training-batch augmentation (crop-flip: 4-pixel padded random crop + horizontal flip, "
                   "seeded; also on the saliency batch)", ("none", "crop-flip")),
    "normalize": Key(bool, False, "standardise inputs per channel with the training set's mean/std (train, saliency "
                     "and evaluation)"),
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
    "sparse.saliency-aggregation": Key(str, "weighted", "how the server averages client scores", SALIENCY_AGGREGATIONS),
    "sparse.saliency-dtype": Key(str, "float32", "precision of the uploaded saliency scores", SALIENCY_DTYPES),
    "sparse.saliency-topk": Key(float, 0.0, "each client uploads only its top ceil(x * k) scores (k = mask size); 0 = all",
                         check=lambda v: v >= 0.0, rule=">= 0"),
    "sparse.saliency-init": Key(str, "send", "ssfl: the saliency query sends the initial model, or the clients "
                                "rebuild it from seed (checked by fingerprint; sent where it differs)", SALIENCY_INITS),
    "sparse.value-dtype": Key(str, "float32", "precision of values on the wire (sparse strategies)", VALUE_DTYPES),
    "sparse.warmup-rounds": Key(int, 1, "magnitude: dense rounds before the mask is fixed", check=lambda v: v >= 0,
                         rule=">= 0"),
    "sparse.topk-density": Key(float, 0.1, "topk: share of update entries each client sends", check=_in_unit_open,
                        rule="in (0, 1]"),
    # cl.*: the continual experiment (experiment = "continual"; server/experiments/continual.py)
    "cl.stream": Key(str, "domains", "task stream (fedsparse.tasks.STREAMS)", CL_STREAMS),
    "cl.method": Key(str, "finetune", "continual method", CL_METHODS),
    "cl.rounds-per-task": Key(int, 5, "federated rounds on each task", check=lambda v: v >= 1, rule=">= 1"),
    "cl.num-tasks": Key(int, 0, "train on the stream's first N tasks (0 = all)", check=lambda v: v >= 0,
                        rule=">= 0"),
    "cl.sfa-p": Key(float, 0.25, "SFA: average every p x the task's rounds (sfa) or local steps (sfa-client), "
                    "and at the task's end", check=_in_unit_open, rule="in (0, 1]"),
    "cl.sfa-beta": Key(float, 0.25, "SFA: weight of the previous task's model in the average",
                       check=lambda v: 0.0 <= v <= 1.0, rule="in [0, 1]"),
    "cl.merge-alpha": Key(float, 0.5, "wise-ft: weight of the newly trained model in (1 - alpha) previous + alpha "
                          "trained (WiSE-FT's alpha: 1 = finetune, 0 = keep task 1's model)",
                          check=lambda v: 0.0 <= v <= 1.0, rule="in [0, 1]"),
    "cl.merge-lambda": Key(float, 0.0, "merge-ta: lambda of theta_0 + lambda sum of task vectors (0 = 1 / tasks "
                           "so far, their mean)", check=lambda v: v >= 0, rule=">= 0"),
    "cl.merge-density": Key(float, 0.2, "merge-ties: kept fraction of each task vector (TIES trim)",
                            check=_in_unit_open, rule="in (0, 1]"),
    "cl.penalty": Key(float, 1.0, "l2 / ewc: strength lambda of lambda/2 sum F (w - anchor)^2",
                      check=lambda v: v >= 0, rule=">= 0"),
    "cl.fisher-examples": Key(int, 200, "ewc: examples per client for its Fisher estimate",
                              check=lambda v: v >= 1, rule=">= 1"),
    "cl.replay-size": Key(int, 200, "replay: past-task examples each client keeps", check=lambda v: v >= 1,
                          rule=">= 1"),
    "cl.train-size": Key(int, 2000, "training examples kept per task (a prefix; 0 = all)",
                         check=lambda v: v >= 0, rule=">= 0"),
    "cl.test-size": Key(int, 1000, "test examples kept per task (a prefix; 0 = all)", check=lambda v: v >= 0,
                        rule=">= 0"),
    # unlearn.*: client withdrawal as federated rounds (experiment = "unlearn"; server/experiments/unlearning.py)
    "unlearn.method": Key(str, "del", "how the federation forgets the withdrawn client",
                          UNLEARN_METHODS + UNLEARN_LOCAL_METHODS),
    "unlearn.client": Key(int, 0, "partition id of the client that withdraws (its data is the forget set)",
                          check=lambda v: v >= 0, rule=">= 0"),
    "unlearn.train-rounds": Key(int, 5, "FedAvg rounds on every client before the withdrawal",
                                check=lambda v: v >= 1, rule=">= 1"),
    "unlearn.rounds": Key(int, 5, "rounds of the unlearning phase (on the remaining clients)",
                          check=lambda v: v >= 1, rule=">= 1"),
    "unlearn.alpha": Key(float, 0.3, "del: share of all parameters the withdrawn client's mask selects",
                         check=_in_unit_open, rule="in (0, 1]"),
    "unlearn.forget": Key(str, "client", "the forget set: a client's data (it withdraws), part of one client's data, "
                          "part of every client's data, or part of one class's examples", UNLEARN_FORGET_SETS),
    "unlearn.forget-fraction": Key(float, 0.1, "client-samples / uniform: share of the client's examples forgotten; "
                                   "class: share of its examples of unlearn.forget-class", check=_in_unit_open,
                                   rule="in (0, 1]"),
    "unlearn.forget-class": Key(int, 0, "class: the label whose examples are forgotten", check=lambda v: v >= 0,
                                rule=">= 0"),
    "unlearn.federaser-interval": Key(int, 2, "federaser: the server stores the clients' updates every this many "
                                      "training rounds (one calibration round each)", check=lambda v: v >= 1,
                                      rule=">= 1"),
    "unlearn.federaser-epochs": Key(float, 0.5, "federaser: share of the original local steps a calibration round "
                                    "runs", check=_in_unit_open, rule="in (0, 1]"),
    "unlearn.transport": Key(str, "values", "del rounds: only the trainable values travel (values) or the dense model",
                             UNLEARN_TRANSPORTS),
    "unlearn.score-dtype": Key(str, "float32", "del with uniform / class forget sets: precision of the channel scores "
                               "each forget-set holder sends", UNLEARN_SCORE_DTYPES),
    "unlearn.local-lr": Key(float, 0.0, "registry methods (client.unlearning_local): the clients' learning rate "
                            "(0 = the round's lr)", check=lambda v: v >= 0, rule=">= 0"),
    "unlearn.neggrad-beta": Key(float, 0.99, "neggrad_plus: loss = beta CE(retain) - (1 - beta) CE(forget)",
                                check=_in_unit_open, rule="in (0, 1]"),
    "unlearn.l1-coefficient": Key(float, 5e-4, "l1_sparse: L1 weight at the phase start (decays linearly to 0)",
                                  check=lambda v: v >= 0, rule=">= 0"),
    "unlearn.salun-fraction": Key(float, 0.5, "salun: share of parameters in the saliency mask",
                                  check=_in_unit_open, rule="in (0, 1]"),
    "unlearn.scrub-max-epochs": Key(int, 2, "scrub: the phase's first this-many local epochs run the forget-set "
                                    "max pass", check=lambda v: v >= 0, rule=">= 0"),
    # merge.*: model merging as federated rounds (experiment = "merge"; server/experiments/merging.py)
    "merge.method": Key(str, "task_arithmetic", "how the server merges the experts (fedsparse.merging.MERGE_METHODS)",
                        MERGE_METHODS),
    "merge.stream": Key(str, "domains", "task stream: client i trains its expert on task i (fedsparse.tasks)",
                        CL_STREAMS),
    "merge.expert-rounds": Key(int, 1, "rounds of expert training (the server merges after each)",
                               check=lambda v: v >= 1, rule=">= 1"),
    "merge.expert-epochs": Key(int, 2, "local epochs of expert training per round", check=lambda v: v >= 1,
                               rule=">= 1"),
    "merge.lambda": Key(float, 0.0, "scale lambda of the merged task vector (0 = the method's own default)",
                        check=lambda v: v >= 0, rule=">= 0"),
    "merge.local": Key(bool, True, "experts start from the shared initial model (false: each from its own seed)"),
    "merge.align": Key(bool, False, "weight-match every expert (and its init) to the first before merging"),
    "merge.task-heads": Key(bool, False, "per-task heads: the classifier head is not merged; task i is evaluated "
                            "with expert i's head"),
    "merge.tact": Key(bool, False, "TACT: per-task correction of the merged model's per-channel statistics to the "
                      "expert's (the clients fit it on their data)"),
    "merge.tact-examples": Key(int, 500, "TACT: calibration examples per client", check=lambda v: v >= 1,
                               rule=">= 1"),
    "merge.train-size": Key(int, 2000, "training examples kept per task (a prefix; 0 = all)",
                            check=lambda v: v >= 0, rule=">= 0"),
    "merge.test-size": Key(int, 1000, "test examples kept per task (a prefix; 0 = all)", check=lambda v: v >= 0,
                           rule=">= 0"),
    # conn.*: linear mode connectivity as federated rounds (experiment = "connectivity";
    # server/experiments/connectivity.py)
    "conn.data": Key(str, "full", "what each client trains its own model on: the whole training set or its partition",
                     CONN_DATA),
    "conn.points": Key(int, 11, "interpolation points between two models, ends included", check=lambda v: v >= 2,
                       rule=">= 2"),
    "conn.simplex-resolution": Key(int, 4, "3-way barrier: grid steps per edge of the simplex",
                                   check=lambda v: v >= 1, rule=">= 1"),
    "conn.eval-examples": Key(int, 2000, "test examples the barriers are measured on (a prefix; 0 = all)",
                              check=lambda v: v >= 0, rule=">= 0"),
    "conn.repair": Key(bool, True, "also measure the aligned barrier with REPAIR at every interpolation point"),
    "conn.calibration-examples": Key(int, 500, "training examples for REPAIR statistics and BatchNorm resets",
                                     check=lambda v: v >= 1, rule=">= 1"),
    # transfer.*: transfer unlearning by data selection as federated rounds (experiment = "transfer";
    # server/experiments/transfer.py)
    "transfer.method": Key(str, "data_selection", "what the transfer phase trains on: static + selected pool "
                           "images, static only, or all target data", TRANSFER_METHODS),
    "transfer.source-classes": Key(int, 5, "classes below this are the source task, the others the target",
                                   check=lambda v: v >= 1, rule=">= 1"),
    "transfer.pretrain-rounds": Key(int, 5, "FedAvg rounds on the source classes", check=lambda v: v >= 1,
                                    rule=">= 1"),
    "transfer.rounds": Key(int, 5, "FedAvg rounds on the target classes", check=lambda v: v >= 1, rule=">= 1"),
    "transfer.static-fraction": Key(float, 0.5, "share of each client's target examples that are static (usable "
                                    "forever)", check=lambda v: 0.0 <= v <= 1.0, rule="in [0, 1]"),
    "transfer.aux-size": Key(int, 2000, "public static pool: target-class training images after train-subset",
                             check=lambda v: v >= 1, rule=">= 1"),
    "transfer.neighbours": Key(int, 1, "data_selection: pool images selected per non-static example",
                               check=lambda v: v >= 1, rule=">= 1"),
    # aggregate.*: merging as the aggregation of ordinary rounds (strategies ties, dare; server/strategies/merge_aggregation.py)
    "aggregate.density": Key(float, 0.2, "ties: share of each client's update kept by the magnitude trim (over the "
                             "whole update)", check=_in_unit_open, rule="in (0, 1]"),
    "aggregate.drop": Key(float, 0.5, "dare: share of each update's entries dropped at random (the rest rescaled by "
                          "1/(1-drop))", check=lambda v: 0.0 <= v < 1.0, rule="in [0, 1)"),
    "aggregate.lambda": Key(float, 1.0, "ties, dare: the global model moves by lambda x the merged update",
                            check=lambda v: v > 0, rule="> 0"),
    # lm.*: the character GPT as federated rounds (experiment = "lm"; server/experiments/language.py)
    "lm.block-size": Key(int, 64, "context length of the GPT (characters)", check=lambda v: v >= 2, rule=">= 2"),
    "lm.layers": Key(int, 2, "transformer blocks", check=lambda v: v >= 1, rule=">= 1"),
    "lm.heads": Key(int, 4, "attention heads per block (must divide lm.embd)", check=lambda v: v >= 1, rule=">= 1"),
    "lm.embd": Key(int, 64, "embedding width", check=lambda v: v >= 1, rule=">= 1"),
    "lm.local-steps": Key(int, 50, "AdamW steps a client runs per round on its text", check=lambda v: v >= 1,
                          rule=">= 1"),
    "lm.val-fraction": Key(float, 0.1, "share of the corpus (its end, cut at a turn) held out for validation",
                           check=lambda v: 0.0 < v < 1.0, rule="in (0, 1)"),
    "lm.eval-windows": Key(int, 64, "validation windows of lm.block-size scored after every round",
                           check=lambda v: v >= 1, rule=">= 1"),
    "lm.sample-chars": Key(int, 200, "characters of the samples written to summary.json", check=lambda v: v >= 0,
                           rule=">= 0"),
    # lmu.*: a client asks the federated char GPT to forget (experiment = "lm-unlearn";
    # server/experiments/language_unlearning.py)
    "lmu.method": Key(str, "gradient_ascent", "how the federation forgets client lmu.client's forget set",
                      ("retrain", "finetune", "gradient_ascent")),
    "lmu.forget": Key(str, "ood", "the forget set: id = passages of the client's own text, ood = canaries inserted "
                      "into it", ("id", "ood")),
    "lmu.canary-kind": Key(str, "random", "ood: the canaries' generator", ("random", "digits", "code")),
    "lmu.client": Key(int, 0, "partition id of the client that asks to forget", check=lambda v: v >= 0,
                      rule=">= 0"),
    "lmu.count": Key(int, 16, "forget examples (and as many never-trained twins)", check=lambda v: v >= 3,
                     rule=">= 3"),
    "lmu.length": Key(int, 32, "characters per forget example (at most lm.block-size + 1)", check=lambda v: v >= 2,
                      rule=">= 2"),
    "lmu.prefix": Key(int, 8, "exact extraction: greedy continuation of this many leading characters",
                      check=lambda v: v >= 1, rule=">= 1"),
    "lmu.repeats": Key(int, 20, "ood: copies of each canary inserted into the client's text", check=lambda v: v >= 1,
                       rule=">= 1"),
    "lmu.train-rounds": Key(int, 10, "FedAvg rounds on every client's text (forget set included) before the request",
                            check=lambda v: v >= 1, rule=">= 1"),
    "lmu.rounds": Key(int, 5, "rounds of the unlearning phase", check=lambda v: v >= 1, rule=">= 1"),
    "lmu.participants": Key(str, "all", "who trains in the unlearning phase: all, others (without lmu.client; not "
                            "gradient_ascent), client (only lmu.client; gradient_ascent only)",
                            ("all", "others", "client")),
    "lmu.ascent-steps": Key(int, 5, "gradient_ascent: full-batch Adam ascent steps of lmu.client per round",
                            check=lambda v: v >= 1, rule=">= 1"),
    "lmu.ascent-lr": Key(float, 1e-4, "gradient_ascent: lmu.client's ascent learning rate", check=lambda v: v > 0,
                         rule="> 0"),
    # lmf.*: federated mechanistic unlearning of facts (experiment = "lm-mechanistic";
    # server/experiments/language_facts.py)
    "lmf.localization": Key(str, "lookup_mlps", "how client lmf.client localizes its facts (the mask of the unlearning "
                            "rounds)", ("lookup_mlps", "causal_tracing", "attribution_patching", "random", "all_mlps",
                                        "all_weights")),
    "lmf.client": Key(int, 0, "partition id of the client that asks that its facts be forgotten",
                      check=lambda v: v >= 0, rule=">= 0"),
    "lmf.facts": Key(int, 8, "synthetic facts each client holds", check=lambda v: v >= 2, rule=">= 2"),
    "lmf.repeats": Key(int, 20, "copies of each fact in each prompt format in a client's text",
                       check=lambda v: v >= 1, rule=">= 1"),
    "lmf.corpus-chunk": Key(int, 64, "characters of the client's text before each fact line",
                            check=lambda v: v >= 0, rule=">= 0"),
    "lmf.train-rounds": Key(int, 10, "FedAvg rounds teaching every client's text and facts", check=lambda v: v >= 1,
                            rule=">= 1"),
    "lmf.rounds": Key(int, 3, "rounds of the masked unlearning phase", check=lambda v: v >= 1, rule=">= 1"),
    "lmf.lookup-layers": Key(int, 1, "MLPs of the lookup localization (the others are matched to their parameter "
                             "count)", check=lambda v: v >= 1, rule=">= 1"),
    "lmf.train-format": Key(int, 0, "the prompt format unlearning and maintenance train on", check=lambda v: v >= 0,
                            rule=">= 0"),
    "lmf.unlearn-steps": Key(int, 20, "masked Adam steps a client runs per unlearning round", check=lambda v: v >= 1,
                             rule=">= 1"),
    "lmf.unlearn-lr": Key(float, 1e-3, "learning rate of the masked steps", check=lambda v: v > 0, rule="> 0"),
    "lmf.relearn-lr": Key(float, 3e-4, "learning rate of the relearning attack", check=lambda v: v > 0, rule="> 0"),
    "lmf.relearn-steps": Key(int, 30, "relearning attack: Adam steps on half of the forgotten facts",
                             check=lambda v: v >= 1, rule=">= 1"),
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
    "discovery": Key(str, "auto", "which nodes the server asks their partition (query.info): all before round 1, or "
                     "on-demand only those a round samples (start-up independent of num-clients); auto = on-demand "
                     "for the standard experiment of a strategy without one-off exchanges, else all", DISCOVERY),
    "output-dir": Key(str, "results/latest", "where results and checkpoints go",
                      check=lambda v: bool(v.strip()), rule="a non-empty path"),
    "resume": Key(bool, False, "continue from the checkpoint in output-dir"),
    "client-state-dir": Key(str, "", "where clients keep snapshots of their state for resume "
                            "('' = <output-dir>/client-state)"),
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


def strategy_config_keys(strategy: str) -> frozenset[str] | None:
    """The namespaced keys strategy `strategy` reads (its class's `config_keys`); None when the class does not
    declare them (then no key is refused on its account)."""
    strategies = registry(STRATEGY_REGISTRY) or {}
    return getattr(strategies.get(strategy), "config_keys", None)


def experiment_namespaces(experiment: str) -> frozenset[str]:
    """The namespaces experiment `experiment` reads (its registry entry's `config_namespaces`; none if undeclared)."""
    experiments = registry(EXPERIMENT_REGISTRY) or {}
    return frozenset(getattr(experiments.get(experiment), "config_namespaces", ()))


def check_keys_are_used(cfg: dict[str, Any], given: Mapping[str, Any] | None = None) -> None:
    """ConfigError for the first namespaced key whose value differs from its default although neither the chosen
    strategy (`config_keys`) nor the chosen experiment (`config_namespaces`) reads it. The message names the key,
    the name it was given under (an old flat name), and the strategies or experiments that would use it."""
    strategy, experiment = cfg["strategy"], cfg["experiment"]
    strategy_keys = strategy_config_keys(strategy)
    if strategy_keys is None:
        return
    used = set(strategy_keys)
    namespaces = experiment_namespaces(experiment)
    for name, key in SCHEMA.items():
        space = namespace(name)
        if not space or name in used or space in namespaces or cfg[name] == key.default:
            continue
        old_names = [old for old, new in RENAMED.items() if new == name and old in (given or {})]
        given_as = f" (given as '{old_names[0]}')" if old_names else ""
        users = [n for n in (registry(STRATEGY_REGISTRY) or {}) if name in (strategy_config_keys(n) or ())]
        experiments = [n for n in (registry(EXPERIMENT_REGISTRY) or {}) if space in experiment_namespaces(n)]
        if users:
            hint = f"strategies that use it: {', '.join(users)}"
        elif experiments:
            hint = f"experiments that use it: {', '.join(experiments)}"
        else:
            hint = "no strategy or experiment uses it"
        raise ConfigError(f"config key '{name}'{given_as} is set to {cfg[name]!r}, but strategy {strategy} with "
                          f"experiment {experiment} does not use it ({hint}); leave it at its default "
                          f"{key.default!r}")


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
        choices = key.allowed()
        if choices is not None and value not in choices:
            raise ConfigError(f"config key '{name}': {value!r} is not one of {', '.join(choices)}")
        if key.check is not None and not key.check(value):
            raise ConfigError(f"config key '{name}': {value!r} must be {key.rule}")
    layers = [x.strip() for x in cfg["sparse.mask-layers"].split(",") if x.strip()]
    if not layers or any(x not in ("conv", "linear") for x in layers):
        raise ConfigError(f"config key 'sparse.mask-layers': {cfg['sparse.mask-layers']!r} must be a comma list of "
                          "conv, linear")
    cfg["sparse.mask-layers"] = ",".join(layers)  # "conv, linear" -> "conv,linear": every reader splits on ","
    if cfg["fraction-train"] * cfg["num-clients"] < 1.0:
        raise ConfigError(
            f"config key 'fraction-train': {cfg['fraction-train']} x num-clients {cfg['num-clients']} "
            "samples no client; raise it to at least 1/num-clients"
        )
    if cfg["min-clients"] > cfg["num-clients"]:
        raise ConfigError(f"config key 'min-clients': {cfg['min-clients']} is more than num-clients "
                          f"{cfg['num-clients']}; the run would wait for clients that never come")
    check_keys_are_used(cfg, overrides or {})
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
