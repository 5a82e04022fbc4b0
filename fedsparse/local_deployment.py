"""A real Flower deployment of this repository on loopback: one SuperLink with TLS and SuperNode authentication,
N SuperNodes with registered keys, and the SuperExec processes that run the apps; the topology of
`docker-compose.yml`, without Docker.

    with LocalDeployment(nodes=3, workdir=tmp) as dep:
        run_id = dep.submit({"strategy": "ssfl", "num-rounds": 2})
        status = dep.wait(run_id, timeout=300)

Invariants:
- Every deployment has its own folder (certificates, keys, one FLWR_HOME per component, logs, run outputs) and its
  own free ports, so two deployments on one machine never meet.
- Secrets are made once per deployment (`fedsparse.certificates`); a restarted node keeps its key, hence its node id.
- `stop()` (and leaving the `with` block, also on an error) stops every process the deployment started, newest
  first, by pid with everything each one spawned (`fedsparse.deploy_processes`); nothing is looked up by name.
- Every wait polls a file or the CLI until a generous deadline and fails early, with the log tail, when the
  process it waits for has exited. Files are polled often (free), the CLI sparingly (a Python start-up each).
- Priorities: the SuperLink, its SuperExec (hence the ServerApp), the edge proxy and (with process isolation) the
  SuperNodes, which only relay messages, run SERVER_PRIORITY_BOOST niceness steps above the SuperNodes' SuperExecs
  (hence the ClientApps, which do the CPU-heavy work). On a loaded
  machine a starved SuperLink once made the ServerApp miss Flower's task heartbeat (sent every ~20 s, expired after
  60 s, neither configurable in Flower 1.42), which fails the run. Where the OS allows it the server side is
  raised (niceness -5) and the clients run at ours, so they are not starved by other jobs either; elsewhere the
  clients are lowered (niceness +10) instead.

With `edge_proxy=True` nginx stands in front of the SuperLink as in docker-compose.yml (`fedsparse.edge_proxy`):
the SuperNodes dial its Fleet-only port, the CLI its Control-only port, and the connection `PUBLIC_CONNECTION`
points the CLI at the Fleet-only port (which must refuse it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from fedsparse import edge_proxy
from fedsparse.certificates import DeploymentSecrets
from fedsparse.config import ConfigError, flatten, resolve
from fedsparse.deploy_processes import (
    DeploymentError,
    Proc,
    can_raise_priority,
    find_tool,
    flower_env,
    free_port,
    spawn,
    wait_port,
)
from fedsparse.flower_cli import Connection, FlowerCli, write_run_config
from fedsparse.results import read_rounds

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app: pyproject.toml, server/, client/
CONNECTION = "fedsparse-local"  # the operator's connection in the CLI's config.toml
PUBLIC_CONNECTION = "fedsparse-public"  # with the edge proxy: the CLI pointed at its Fleet-only port (refused)
SERVER_PRIORITY_BOOST = 5  # niceness steps of the server side above the clients (see the module docstring)
CLIENT_NICENESS_FALLBACK = 10  # the clients' niceness where the server side cannot be raised
START_TIMEOUT = 240.0  # seconds for a component to listen / the SuperNodes to be online, on a loaded machine
OFFLINE_TIMEOUT = 300.0  # seconds for the SuperLink to mark a dead node offline (2 missed 30 s heartbeats + load)

# The run submitted when nothing is overridden: small enough for a laptop, sparse like the paper.
DEFAULT_RUN: dict[str, Any] = {"strategy": "ssfl", "dataset": "digits", "sparse.sparsity": 0.9, "num-rounds": 3,
                               "local-epochs": 1, "round-timeout": 120.0}

Log = Callable[[str], None]


@dataclass
class SuperNode:
    """One SuperNode of the deployment (and, with process isolation, the SuperExec that runs its ClientApps)."""

    index: int  # 1-based, as in the compose service names supernode-1, supernode-2, ...
    partition_id: int
    num_partitions: int
    port: int  # its Runtime API (the SuperExec dials it)
    key: Path | None  # private key for SuperNode authentication (None without TLS)
    registered: bool
    home: Path  # its FLWR_HOME
    env: dict[str, str] = field(default_factory=dict)  # extra environment of its processes (e.g. a test fault)
    node_id: int | None = None  # known once the key is registered
    log_offset: int = 0  # size of its log when it was last started
    procs: list[Proc] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"supernode-{self.index}"

    def alive(self) -> bool:
        """Whether every process of this node runs."""
        return bool(self.procs) and all(p.alive() for p in self.procs)


@dataclass(frozen=True)
class SubmittedRun:
    """A run this deployment submitted: its resolved config and where the ServerApp writes its results."""

    config: dict[str, Any]
    output_dir: Path


@dataclass(frozen=True)
class Priorities:
    """Niceness of each side, relative to the deploying process."""

    server: int  # SuperLink, its SuperExec and ServerApps, edge proxy, SuperNodes (process isolation)
    clients: int  # the SuperNodes' SuperExecs and ClientApps

    @classmethod
    def choose(cls) -> Priorities:
        """Raise the server side where the OS allows it, else lower the clients (module docstring)."""
        if can_raise_priority(SERVER_PRIORITY_BOOST):
            return cls(server=-SERVER_PRIORITY_BOOST, clients=0)
        return cls(server=0, clients=CLIENT_NICENESS_FALLBACK)


def app_with_clientapp(source: Path, dest: Path, clientapp: str, module_file: str) -> Path:
    """A copy of the Flower app at `source` (its `client/`, `server/` and pyproject.toml) in `dest` whose ClientApp
    component is `clientapp` ("package.module:app"), with `module_file` (relative to `source`) copied beside;
    for deployments that run another ClientApp against the real ServerApp (the fault-injection app of the tests,
    the do-nothing floor of the round benchmark). ValueError if pyproject.toml has not exactly one clientapp line."""
    import re
    import shutil

    pyproject = (source / "pyproject.toml").read_text()
    component = re.compile(r'^clientapp = ".*"$', re.MULTILINE)
    if len(component.findall(pyproject)) != 1:
        raise ValueError(f"{source / 'pyproject.toml'}: expected one clientapp component")
    for folder in ("client", "server"):
        shutil.copytree(source / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / module_file).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / module_file, dest / module_file)
    (dest / "pyproject.toml").write_text(component.sub(f'clientapp = "{clientapp}"', pyproject))
    return dest


def _print(msg: str) -> None:
    print(f"[deploy] {msg}", file=sys.stderr, flush=True)


class LocalDeployment:
    """SuperLink + N SuperNodes (+ SuperExecs) on 127.0.0.1, each with its own FLWR_HOME, port and log.

    `isolation="process"` starts the SuperExecs as separate processes (what docker-compose.yml does, one
    container each); `"subprocess"` lets SuperLink and SuperNodes spawn their own. `tls=False` is the
    equivalent of docker-compose.insecure.yml: no TLS and no SuperNode authentication (Flower refuses auth
    without TLS). `edge_proxy=True` puts nginx in front of the SuperLink (module docstring); the SuperExec still
    dials the SuperLink itself. `node_env` maps a node index (1-based) to extra environment variables of that
    SuperNode and its SuperExec, hence of its ClientApps (tests inject a fault this way).
    """

    def __init__(self, nodes: int = 3, workdir: str | os.PathLike | None = None, *, isolation: str = "process",
                 tls: bool = True, edge_proxy: bool = False, app_dir: Path = APP_DIR,
                 start_timeout: float = START_TIMEOUT, node_env: dict[int, dict[str, str]] | None = None,
                 log: Log | None = _print) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        if isolation not in ("process", "subprocess"):
            raise ValueError(f"isolation must be 'process' or 'subprocess', got {isolation!r}")
        if edge_proxy and not tls:
            raise ValueError("edge_proxy needs tls: the proxy terminates TLS with the deployment's certificates")
        if start_timeout <= 0:
            raise ValueError(f"start_timeout must be > 0, got {start_timeout}")
        self.num_nodes = nodes
        self.isolation = isolation
        self.tls = tls
        self.edge = edge_proxy
        self.node_env = {int(index): dict(env) for index, env in (node_env or {}).items()}
        self.app_dir = Path(app_dir).resolve()
        self.start_timeout = start_timeout
        self.priorities = Priorities.choose()
        self._sink = log or (lambda msg: None)
        self._t0 = time.monotonic()
        self.workdir = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="fedsparse-deploy-"))
        self.secrets = DeploymentSecrets(certs=self.workdir / "certs", keys=self.workdir / "keys")
        self.logs = self.workdir / "logs"
        self.link_home = self.workdir / "superlink"
        self.runs_dir = self.workdir / "runs"
        self.edge_dir = self.workdir / "edge-proxy"
        self.ports: set[int] = set()
        self.port = 0  # the SuperLink's
        self.public_port = 0  # the edge proxy's Fleet-only port (0: no proxy)
        self.operator_port = 0  # the edge proxy's Control-only port (0: no proxy)
        self.edge_proc: Proc | None = None
        self.superlink: list[Proc] = []  # the SuperLink, then (process isolation) its SuperExec
        self.supernodes: list[SuperNode] = []
        self.runs: dict[int, SubmittedRun] = {}
        self._procs: list[Proc] = []  # everything ever started, for stop()
        self._bins = {name: find_tool(name) for name in ("flower-superlink", "flower-supernode", "flower-superexec")}
        self.cli = FlowerCli(find_tool("flwr"), home=self.workdir / "cli", cwd=self.workdir)

    @property
    def certs(self) -> Path:
        """The folder of the CA and the certificates (ca.crt is what a client of this deployment trusts)."""
        return self.secrets.certs

    @property
    def keys(self) -> Path:
        """The folder of the SuperNodes' authentication keys."""
        return self.secrets.keys

    def log(self, msg: str) -> None:
        """Progress, stamped with the seconds since this deployment was created."""
        self._sink(f"{time.monotonic() - self._t0:7.1f}s  {msg}")

    # ---- lifecycle
    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Secrets, SuperLink (and edge proxy), key registration, SuperNodes; returns when every node is online."""
        t0 = time.monotonic()
        for folder in (self.logs, self.link_home, self.runs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.log(f"deployment folder {self.workdir}")
        if self.tls:
            self.secrets = DeploymentSecrets.create(self.certs, self.keys, self.num_nodes)
        self.port = free_port(self.ports)
        self.start_superlink()
        if self.edge:
            self.start_edge_proxy()
        self._configure_cli()
        for index in range(1, self.num_nodes + 1):
            node = self._new_node(index, partition_id=index - 1, num_partitions=self.num_nodes, register=self.tls)
            self.start_supernode(node)
        self.wait_online(list(self.supernodes), timeout=self.start_timeout)
        via = f", nodes via edge proxy 127.0.0.1:{self.public_port}" if self.edge else ""
        self.log(f"{self.num_nodes} SuperNodes online after {time.monotonic() - t0:.1f} s "
                 f"(SuperLink 127.0.0.1:{self.port}{via}, {'TLS + node auth' if self.tls else 'INSECURE'}, "
                 f"isolation={self.isolation}, niceness server {self.priorities.server:+d} "
                 f"clients {self.priorities.clients:+d})")

    @property
    def fleet_address(self) -> str:
        """The address SuperNodes dial: the edge proxy's public port, else the SuperLink itself."""
        return f"127.0.0.1:{self.public_port if self.edge else self.port}"

    def stop(self) -> None:
        """Stop every process this deployment started, newest first (nodes before the link), by PID."""
        alive = [p for p in reversed(self._procs) if p.alive()]
        for proc in alive:
            proc.stop()
        if alive:
            self.log(f"stopped {len(alive)} processes: {', '.join(f'{p.name}[{p.pid}]' for p in alive)}")

    # ---- components
    def _spawn(self, name: str, args: list[str], home: Path, extra_env: dict[str, str] | None = None,
               niceness: int = 0) -> Proc:
        env = {**flower_env(home, Path(self.cli.binary).parent), **(extra_env or {})}
        proc = spawn(name, args, cwd=home, log_path=self.logs / f"{name}.log", env=env, niceness=niceness)
        self._procs.append(proc)
        return proc

    def _tls_client_args(self) -> list[str]:
        return ["--root-certificates", str(self.secrets.ca_cert)] if self.tls else ["--insecure"]

    def _superexec_auth_args(self) -> list[str]:
        # With process isolation the Runtime API shares the SuperLink's (public) port: only holders of the
        # shared secret may pull ServerApp/ClientApp tasks from it. Flower ignores it in subprocess mode.
        if self.tls and self.isolation == "process":
            return ["--superexec-auth-secret-file", str(self.secrets.superexec_secret)]
        return []

    def start_superlink(self) -> None:
        """The SuperLink on a fresh port (SQLite state in its FLWR_HOME) and, with process isolation, the
        SuperExec that runs the ServerApps; both at the server side's priority."""
        args = [self._bins["flower-superlink"], "--host", "127.0.0.1", "--port", str(self.port),
                "--isolation", self.isolation, "--database", str(self.link_home / "state.db"),
                "--disable-runtime-dependency-installation"]
        if self.tls:
            args += ["--ssl-ca-certfile", str(self.secrets.ca_cert), "--ssl-certfile", str(self.secrets.superlink_cert),
                     "--ssl-keyfile", str(self.secrets.superlink_key), "--enable-supernode-auth",
                     *self._superexec_auth_args()]
        else:
            args.append("--insecure")
        link = self._spawn("superlink", args, self.link_home, niceness=self.priorities.server)
        self.superlink = [link]
        wait_port(link, self.port, self.start_timeout)
        if self.isolation == "process":
            self.superlink.append(self._spawn("superexec-serverapp", [
                self._bins["flower-superexec"], *self._tls_client_args(), *self._superexec_auth_args(),
                "--runtime-api-address", f"127.0.0.1:{self.port}"], self.link_home, niceness=self.priorities.server))
        self.log(f"SuperLink up on 127.0.0.1:{self.port} (pid {link.pid})")

    def start_edge_proxy(self) -> None:
        """nginx on two fresh loopback ports: public (Fleet API only) and operator (Control API only)."""
        nginx = edge_proxy.nginx_binary()
        if nginx is None:
            raise DeploymentError("edge_proxy=True needs nginx (Debian: apt-get install nginx-light)")
        self.public_port, self.operator_port = free_port(self.ports), free_port(self.ports)
        try:
            edge_proxy.write_local_config(self.edge_dir, public_port=self.public_port,
                                          operator_port=self.operator_port, superlink_port=self.port,
                                          certs=self.certs)
        except edge_proxy.EdgeProxyError as err:
            raise DeploymentError(str(err)) from err
        self.edge_proc = self._spawn("edge-proxy", [nginx, *edge_proxy.server_args(self.edge_dir)], self.edge_dir,
                                     niceness=self.priorities.server)
        wait_port(self.edge_proc, self.public_port, self.start_timeout)
        wait_port(self.edge_proc, self.operator_port, self.start_timeout)
        self.log(f"edge proxy up: Fleet on 127.0.0.1:{self.public_port}, Control on 127.0.0.1:{self.operator_port} "
                 f"(pid {self.edge_proc.pid})")

    def edge_access_log(self) -> list[str]:
        """The edge proxy's access log, one request a line ([] without a proxy)."""
        path = self.edge_dir / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def _configure_cli(self) -> None:
        trust = self.secrets.ca_cert if self.tls else None
        operator = self.operator_port if self.edge else self.port
        connections = [Connection(CONNECTION, f"127.0.0.1:{operator}", trust)]
        if self.edge:
            connections.append(Connection(PUBLIC_CONNECTION, f"127.0.0.1:{self.public_port}", trust))
        self.cli.configure(connections)

    def _new_node(self, index: int, partition_id: int, num_partitions: int, register: bool) -> SuperNode:
        key = self.secrets.node_key(index) if self.tls else None
        node = SuperNode(index=index, partition_id=partition_id, num_partitions=num_partitions,
                         port=free_port(self.ports), key=key, registered=False,
                         home=self.workdir / f"supernode-{index}", env=self.node_env.get(index, {}))
        if register and key is not None:
            node.node_id = self.cli.register_key(CONNECTION, DeploymentSecrets.public_key(key))
            node.registered = True
        self.supernodes.append(node)
        return node

    def start_supernode(self, node: SuperNode, max_wait_time: float | None = None) -> SuperNode:
        """Start `node` (and, with process isolation, its SuperExec at the clients' priority); does not wait.

        With subprocess isolation the SuperNode spawns the SuperExec (and it the ClientApps), which inherit its
        priority, so it runs at the clients' priority; with process isolation it only relays, at the server's."""
        args = [self._bins["flower-supernode"], "--superlink", self.fleet_address, *self._tls_client_args(),
                "--node-config", f"partition-id={node.partition_id} num-partitions={node.num_partitions}",
                "--isolation", self.isolation, "--host", "127.0.0.1", "--port", str(node.port)]
        if node.key is not None:
            args += ["--auth-supernode-private-key", str(node.key)]
        if max_wait_time is not None:
            args += ["--max-wait-time", str(max_wait_time)]
        if self.tls and self.isolation == "process":
            # Its Runtime API is dialled by a separate SuperExec (a separate container in compose): TLS too.
            args += ["--ssl-certfile", str(self.secrets.node_cert), "--ssl-keyfile", str(self.secrets.node_cert_key),
                     "--ssl-ca-certfile", str(self.secrets.ca_cert), *self._superexec_auth_args()]
        log_path = self.logs / f"{node.name}.log"
        node.log_offset = log_path.stat().st_size if log_path.exists() else 0
        relay_niceness = self.priorities.clients if self.isolation == "subprocess" else self.priorities.server
        node.procs = [self._spawn(node.name, args, node.home, node.env, niceness=relay_niceness)]
        if self.isolation == "process":
            node.procs.append(self._spawn(f"superexec-{node.name}", [
                self._bins["flower-superexec"], *self._tls_client_args(), *self._superexec_auth_args(),
                "--runtime-api-address", f"127.0.0.1:{node.port}"], node.home, node.env,
                niceness=self.priorities.clients))
        auth = "no authentication" if not self.tls else "key registered" if node.registered else "key NOT registered"
        self.log(f"{node.name} started: partition {node.partition_id}/{node.num_partitions}, runtime port {node.port}, "
                 f"{auth}{f', node id {node.node_id}' if node.node_id else ''} (pid {node.procs[0].pid})")
        return node

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL) -> SuperNode:
        """Kill SuperNode `index` (1-based) and its SuperExec and ClientApps (default SIGKILL, as a crashed host)."""
        node = self.node(index)
        for proc in node.procs:
            proc.stop(sig)
        self.log(f"{node.name} killed (signal {signal.Signals(sig).name})")
        return node

    def restart_supernode(self, index: int, wait: bool = True) -> SuperNode:
        """Start a killed SuperNode again with the same key (hence the same node id) and partition.

        With node authentication the SuperLink refuses to activate a node id it still counts as online (and a
        refused SuperNode does not retry), while a crashed node stays online until its heartbeat lapses (2 x 30 s):
        so this first waits, up to OFFLINE_TIMEOUT, until the SuperLink no longer lists the node as online.
        """
        node = self.node(index)
        for proc in node.procs:
            if proc.alive():
                proc.stop()
        if self.tls and node.node_id is not None:
            deadline = time.monotonic() + OFFLINE_TIMEOUT
            while self.node_states().get(node.node_id) == "online":
                if time.monotonic() > deadline:
                    raise DeploymentError(f"{node.name} (node {node.node_id}) still online {OFFLINE_TIMEOUT:.0f} s "
                                          "after it stopped")
                time.sleep(5.0)  # each check is a CLI start-up: ask every few seconds, not continuously
        node.port = free_port(self.ports)
        self.start_supernode(node)
        if wait:
            self.wait_online([node], timeout=self.start_timeout)
        return node

    def add_supernode(self, key_registered: bool = False, partition_id: int = 0,
                      max_wait_time: float | None = 30.0) -> SuperNode:
        """One more SuperNode, with a fresh key that is registered only if asked (a refused node gives up
        after `max_wait_time` seconds of retrying and exits). Needs TLS and node authentication."""
        if not self.tls:
            raise DeploymentError("add_supernode(key_registered=...) needs TLS and node authentication")
        node = self._new_node(len(self.supernodes) + 1, partition_id, self.num_nodes, register=key_registered)
        return self.start_supernode(node, max_wait_time=max_wait_time)

    def node(self, index: int) -> SuperNode:
        """The SuperNode with this 1-based index; KeyError if there is none."""
        for node in self.supernodes:
            if node.index == index:
                return node
        raise KeyError(f"no supernode-{index}")

    def node_states(self) -> dict[int, str]:
        """{node id: status} as the SuperLink reports it (registered, online, offline, ...)."""
        return self.cli.node_states(CONNECTION)

    def wait_online(self, nodes: list[SuperNode], timeout: float) -> None:
        """Until every node in `nodes` is online (by node id with auth, by count without).

        A SuperNode logs its node id once the SuperLink has activated it; that file check is free, while every
        `flwr supernode ls` is a Python start-up, so the CLI only confirms at the end.
        """
        deadline = time.monotonic() + timeout
        while True:
            for node in nodes:
                if not node.alive():
                    dead = next(p for p in node.procs if not p.alive())
                    raise DeploymentError(f"{dead.name} exited with code {dead.popen.returncode}:\n{dead.tail()}")
            if all(self._activated(node) for node in nodes):
                states = self.node_states()
                if self.tls:
                    done = all(states.get(node.node_id) == "online" for node in nodes)
                else:
                    done = sum(state == "online" for state in states.values()) >= len(nodes)
                if done:
                    return
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperNodes not online after {timeout:.0f} s: {self.node_states()}\n"
                                      + "\n".join(f"--- {n.name}\n{n.procs[0].tail(10)}" for n in nodes))
            time.sleep(0.5)

    @staticmethod
    def _activated(node: SuperNode) -> bool:
        try:
            with node.procs[0].log.open("rb") as log:
                log.seek(node.log_offset)  # the log is appended to across restarts: only this start counts
                return b"SuperNode ID:" in log.read()
        except OSError:
            return False

    # ---- runs
    def submit(self, run_config: dict[str, Any] | None = None, timeout: float = 300.0,
               app_dir: Path | None = None) -> int:
        """`flwr run` with these run-config overrides; returns the run id.

        Old flat key names (`sparsity`) are accepted and sent under their namespaced name (`sparse.sparsity`),
        which is what the ServerApp reads under `flwr run`. The overrides are checked with `fedsparse.config.resolve` first (a bad key fails here, not inside the
        ServerApp), then only they go to `flwr run`: pyproject.toml supplies every other value. num-clients and
        min-clients default to the number of SuperNodes (a run starts only when all are connected); output-dir
        defaults to a fresh folder under the deployment and is made absolute, because the ServerApp's working
        directory is Flower's choice. `app_dir` replaces the deployment's app folder for this run (e.g. a copy
        whose pyproject.toml names another ClientApp).
        """
        seq = len(self.runs) + 1
        overrides = {**DEFAULT_RUN, "num-clients": self.num_nodes, "min-clients": self.num_nodes,
                     "output-dir": str(self.runs_dir / f"run-{seq}"), **flatten(run_config or {})}
        overrides["output-dir"] = str(Path(overrides["output-dir"]).resolve())
        cfg = resolve(overrides)
        if cfg["num-clients"] != self.num_nodes:
            raise ConfigError(f"num-clients={cfg['num-clients']} but this deployment has {self.num_nodes} "
                              "partitions (SuperNodes)")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        # The overridden keys with their resolved values: typed (a `--set` value is a string), names as resolved.
        config_file = write_run_config(self.runs_dir / f"run-{seq}.toml", {key: cfg[key] for key in overrides})
        app = Path(app_dir).resolve() if app_dir is not None else self.app_dir
        run_id = self.cli.run(app, CONNECTION, config_file, timeout=timeout)
        self.runs[run_id] = SubmittedRun(config=cfg, output_dir=Path(cfg["output-dir"]))
        self.log(f"run {run_id} submitted: {cfg['strategy']} on {cfg['dataset']}, {cfg['num-clients']} clients, "
                 f"{cfg['num-rounds']} rounds -> {cfg['output-dir']}")
        return run_id

    def status(self, run_id: int) -> dict[str, Any]:
        """The run as `flwr ls --run-id ID --format json` reports it (status, network-traffic, ...)."""
        return self.cli.run_status(CONNECTION, run_id)

    def round_rows(self, run_id: int) -> list[dict[str, float]]:
        """The run's rounds.csv as numbers (empty before round 1 ends)."""
        return read_rounds(self.runs[run_id].output_dir / "rounds.csv", missing_ok=True)

    def rounds_done(self, run_id: int) -> int:
        """Rounds the ServerApp has finished (rows of rounds.csv in the run's output folder)."""
        return len(self.round_rows(run_id))

    def summary(self, run_id: int) -> dict[str, Any] | None:
        """The run's summary.json (None until the ServerApp has written it)."""
        path = self.runs[run_id].output_dir / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    def wait(self, run_id: int, timeout: float = 600.0, poll: float = 30.0,
             on_round: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Follow a submitted run until Flower says it finished; returns the final `flwr ls` entry.

        Progress comes from the run's rounds.csv (a file check each second); `flwr ls` is asked every `poll`
        seconds, and every 2 s once summary.json exists, because each call is a CLI start-up that costs CPU the
        run needs. `on_round(k)` is called once when round k has finished (a test kills a node there). On
        timeout the run is stopped with `flwr stop` and DeploymentError is raised. Flower's view of the run
        (status, network totals) is saved next to its results as flower-run-ID.json.
        """
        if run_id not in self.runs:
            raise KeyError(f"run {run_id} was not submitted by this deployment")
        deadline = time.monotonic() + timeout
        output_dir = self.runs[run_id].output_dir
        summary = output_dir / "summary.json"
        last_status, seen_rounds, next_ask, summary_seen = "", 0, 0.0, False
        while True:
            done = self.rounds_done(run_id)
            while seen_rounds < done:
                seen_rounds += 1
                self.log(f"run {run_id}: round {seen_rounds} done")
                if on_round is not None:
                    on_round(seen_rounds)
            if not summary_seen and summary.exists():
                summary_seen, next_ask = True, 0.0
            if time.monotonic() >= next_ask:
                status = self.status(run_id)
                next_ask = time.monotonic() + (2.0 if summary_seen else poll)
                if status["status"] != last_status:
                    self.log(f"run {run_id}: {status['status']}")
                    last_status = status["status"]
                if status["status"].startswith("finished"):
                    self._save_run_log(run_id)
                    output_dir.mkdir(parents=True, exist_ok=True)
                    (output_dir / f"flower-run-{run_id}.json").write_text(json.dumps(status, indent=2) + "\n")
                    return status
            if time.monotonic() > deadline:
                self.cli.stop(CONNECTION, run_id)
                self._save_run_log(run_id)
                raise DeploymentError(f"run {run_id} still '{last_status}' after {timeout:.0f} s; stopped it "
                                      f"(logs in {self.logs})")
            time.sleep(1.0)

    def _save_run_log(self, run_id: int) -> None:
        """The ServerApp's log as the SuperLink kept it, next to the components' logs."""
        try:
            text = self.cli.run_log(CONNECTION, run_id)
        except DeploymentError as err:
            text = str(err)
        (self.logs / f"run-{run_id}.log").write_text(text)
