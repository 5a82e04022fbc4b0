"""Run the ServerApp and ClientApp of this repository through Flower's simulation engine on Ray, in-process.

`flwr run .` is the other way in; both load the same apps. This path exists because it propagates errors as
exceptions (so `fedsparse run` can exit non-zero) and takes a complete run config without a SuperLink.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

APP_DIR = Path(__file__).resolve().parent.parent  # the checkout: holds server/, client/ and pyproject.toml


def check_resources(cfg: dict) -> None:
    """Fail before Ray starts when the machine cannot give what the config asks for."""
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("config key 'device': cuda asked for, but torch sees no CUDA GPU here; "
                               "set device=auto or device=cpu")
    if cfg["client-num-gpus"] > 0:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"config key 'client-num-gpus': {cfg['client-num-gpus']} GPUs asked for, but torch "
                               "sees no CUDA GPU here; set client-num-gpus=0")
    if cfg["client-num-cpus"] > (os.cpu_count() or 1):
        raise RuntimeError(f"config key 'client-num-cpus': {cfg['client-num-cpus']} asked for, but this machine "
                           f"has {os.cpu_count()} CPUs")


def check_output_dir(cfg: dict) -> None:
    """`output-dir` is a folder this process can write (created if missing); ConfigError naming the key if not."""
    from fedsparse.config import ConfigError

    out = Path(cfg["output-dir"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config key 'output-dir': {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fedsparse-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"config key 'output-dir': cannot write to {out}: {err.strerror or err}") from err


def check_split(cfg: dict, num_examples: int, num_classes: int, labels: np.ndarray | None = None) -> None:
    """Settings a partitioner would fail on, named before it runs (flwr-datasets' own errors name no key), with
    values that work. With the training `labels`, a Dirichlet split is replayed first (`fedsparse.split_check`:
    exact and fast), so one that cannot be drawn fails here in seconds, naming what would split."""
    from fedsparse.config import ConfigError

    if cfg["num-clients"] > num_examples // 2:
        raise ConfigError(f"config key 'num-clients': {cfg['num-clients']} clients for {num_examples} examples; "
                          f"every client needs at least 2 examples: at most {num_examples // 2} clients")
    if labels is not None and cfg["partitioner"] == "dirichlet":
        from fedsparse.split_check import dirichlet_advice, dirichlet_sizes

        if dirichlet_sizes(labels, cfg["num-clients"], cfg["dirichlet-alpha"], cfg["seed"]) is None:
            advice = dirichlet_advice(labels, cfg["num-clients"], cfg["dirichlet-alpha"], cfg["seed"])
            raise ConfigError(f"config key 'partitioner': dirichlet split of {num_examples} examples over "
                              f"{cfg['num-clients']} clients with dirichlet-alpha={cfg['dirichlet-alpha']:g} "
                              f"cannot be drawn (11 draws, seed {cfg['seed']}); {advice.text()}")
    if cfg["partitioner"] == "shard" and cfg["num-clients"] * cfg["shards-per-client"] > num_examples:
        raise ConfigError(f"config key 'shards-per-client': {cfg['num-clients']} clients x "
                          f"{cfg['shards-per-client']} shards is more shards than the {num_examples} examples; "
                          f"at most {num_examples // cfg['num-clients']}")
    if cfg["partitioner"] == "pathological" and cfg["classes-per-client"] > num_classes:
        raise ConfigError(f"config key 'classes-per-client': {cfg['classes-per-client']} is more than the "
                          f"{num_classes} classes of {cfg['dataset']}")


def uses_mask(strategy: str) -> bool:
    """Whether `strategy` prunes the model to a fixed mask: it reads `sparse.sparsity` (its `config_keys`)."""
    from fedsparse.config import strategy_config_keys

    return "sparse.sparsity" in (strategy_config_keys(strategy) or ())


def check_run_settings(cfg: dict) -> None:
    """The checks that hold on any machine: the dataset is found, the split is possible, the model builds and has
    maskable weights, a mask of the asked density is possible, then the experiment's own `check_config` (only that
    for an experiment with `uses_dataset = False`, whose clients hold other data). The ServerApp runs them too, so
    `flwr run` fails at its start naming the key. Raises ConfigError / DatasetNotFound."""
    from fedsparse.config import ConfigError
    from fedsparse.data import client_split, load_dataset
    from fedsparse.models import build_model, maskable_names
    from fedsparse.sparse import Layout, MaskError, check_density
    from server.experiments import EXPERIMENTS

    experiment = EXPERIMENTS[cfg["experiment"]]
    check_experiment = getattr(experiment, "check_config", None)
    if not getattr(experiment, "uses_dataset", True):  # its clients hold other data (text): only its own checks
        if check_experiment is not None:
            check_experiment(cfg)
        return
    ds = load_dataset(cfg["dataset"], cfg["data-root"])
    labels = ds.y_train[: cfg["train-subset"] or None]
    check_split(cfg, len(labels), ds.num_classes, labels)
    try:
        client_split(cfg, 0)  # draws every client's partition (cached for the run)
    except ValueError as err:  # flwr-datasets gives up on a draw it cannot balance
        raise ConfigError(f"config key 'partitioner': {cfg['partitioner']} split of {len(labels)} examples over "
                          f"{cfg['num-clients']} clients failed: {err}") from err
    model = build_model(cfg["model"], ds.input_shape, ds.num_classes)
    if uses_mask(cfg["strategy"]):
        names = maskable_names(model, tuple(x.strip() for x in cfg["sparse.mask-layers"].split(",")))
        if not names:
            raise ConfigError(f"config key 'sparse.mask-layers': model {cfg['model']} has no "
                              f"{cfg['sparse.mask-layers']} weights for a {cfg['strategy']} mask")
        layout = Layout.of(model.state_dict(), names)
        try:
            check_density(layout, 1.0 - cfg["sparse.sparsity"], cfg["sparse.mask-scope"])
        except MaskError as err:
            raise ConfigError(f"config key 'sparse.sparsity': {err}") from err
    if check_experiment is not None:  # an experiment's own settings (the continual stream, its rounds)
        check_experiment(cfg)


def preflight(cfg: dict) -> None:
    """Everything that can fail before Ray starts: `check_run_settings`, the resources exist on this machine, a
    resumed run's files are sound and its settings may change as asked, and output-dir can be written (checked
    last: it creates the folder). Raises ConfigError (ResumeError for a run folder) / DatasetNotFound."""
    from fedsparse.config import ConfigError
    from fedsparse.resume import load_for_resume

    check_run_settings(cfg)
    try:
        check_resources(cfg)
    except RuntimeError as err:
        raise ConfigError(str(err)) from err
    if cfg["resume"]:
        load_for_resume(cfg)
    check_output_dir(cfg)


DEFAULT_CLIENT_APP = "client.client_app:app"


def load_apps(app_dir: Path = APP_DIR, client_app: str = DEFAULT_CLIENT_APP) -> tuple[Any, Any]:
    """(ServerApp, ClientApp) of the checkout in `app_dir`; `client_app` = "MODULE:ATTR" picks another ClientApp
    (tests use "tests.faults:app", ours wrapped with a fault-injecting mod)."""
    if not (app_dir / "server" / "server_app.py").exists():
        raise FileNotFoundError(f"{app_dir} holds no server/server_app.py: pass the fedsparse checkout as app dir")
    module_name, sep, attr = client_app.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"client app must be 'MODULE:ATTR', got {client_app!r}")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    server = importlib.import_module("server.server_app").app
    client = getattr(importlib.import_module(module_name), attr)
    return server, client


def ray_init_args(ray_cpus: int | None) -> dict[str, Any]:
    """What Flower's Ray backend passes to `ray.init` (it calls it only when Ray is not initialised yet).

    With `RAY_ADDRESS` set (e.g. to "auto" or "HEAD_IP:6379" after `ray start --head` / `ray start --address`),
    ray.init attaches to that cluster, and the actor pool spans every node's CPUs; Ray then refuses `num_cpus`
    (the cluster's nodes declared their resources when they started), so none is passed and `ray_cpus` is ignored.
    Without it, a local Ray instance of `ray_cpus` CPUs (default: all) starts for this run. An explicit local
    instance ("address": "local") keeps a `ray start` cluster on this machine from being joined by accident."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        return {"address": address, "logging_level": "error"}
    return {"address": "local", "num_cpus": ray_cpus or os.cpu_count() or 1, "include_dashboard": False,
            "logging_level": "error"}


@contextmanager
def app_config_parsed_once() -> Iterator[None]:
    """While active, Flower's simulation engine parses the app's pyproject.toml once per run instead of once per
    virtual node.

    The engine registers every virtual node's context with `DeprecatedRunInfoStore.register_context`, which calls
    `get_fused_config_from_dir(app_dir, override_config)`: a TOML parse of pyproject.toml per node (4.5 ms each
    here, so 45 s of start-up for 10,000 clients). The result depends only on the two arguments, so it is cached
    on them and every node gets its own shallow copy (a run config's values are scalars); the original function is
    restored on exit."""
    from flwr.compat.client import run_info_store

    original = run_info_store.get_fused_config_from_dir
    parsed: dict[tuple[str, str], dict] = {}

    def fused_once(app_path: Path, override_config: dict) -> dict:
        key = (str(Path(app_path).resolve()), repr(sorted(override_config.items())))
        if key not in parsed:
            parsed[key] = original(app_path, override_config)
        return dict(parsed[key])

    run_info_store.get_fused_config_from_dir = fused_once
    try:
        yield
    finally:
        run_info_store.get_fused_config_from_dir = original


def simulate(cfg: dict, app_dir: Path = APP_DIR, ray_cpus: int | None = None,
             client_app: str = DEFAULT_CLIENT_APP) -> None:
    """Run one simulation with `cfg` (already resolved) on a local Ray cluster; raises if the run fails.
    `client_app` ("MODULE:ATTR") replaces our ClientApp, e.g. by the test-only fault mod's."""
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Flower's public run_simulation() cannot take a run config (context.run_config is empty there); its
    # internal _run_simulation() takes a Run, whose override_config reaches every ClientApp (fused with
    # pyproject.toml's defaults, read from app_dir when is_app=True).
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    check_resources(cfg)
    server_app, client = load_apps(app_dir, client_app)
    run = Run.create_empty(run_id=abs(hash((cfg["seed"], cfg["output-dir"]))) % (2**63))
    run.override_config = dict(cfg)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(cfg))
    backend_config = {
        "client_resources": {"num_cpus": cfg["client-num-cpus"], "num_gpus": cfg["client-num-gpus"]},
        "init_args": ray_init_args(ray_cpus),
    }
    with app_config_parsed_once():
        _run_simulation(num_supernodes=cfg["num-clients"], exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                        client_app=client, server_app=server_app, backend_config=backend_config,
                        server_app_context=context,
                        app_dir=str(app_dir), run=run, is_app=True)

