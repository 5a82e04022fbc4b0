"""A real Flower deployment of this repository on loopback: one SuperLink with TLS and SuperNode authentication,
N SuperNodes with registered keys, and the SuperExec processes that run the apps; the same topology as
`docker-compose.yml`, without Docker.

    python -m fedsparse.deploy --nodes 3 --set num-rounds=3 sparse.sparsity=0.9

starts everything, submits an SSFL run on `digits` with `flwr run`, follows it, prints the final status taken
from `flwr ls --format json` (never from `flwr run`'s exit code, which is 0 for failed runs too), compares the
bytes our accounting counted with the network totals Flower reports, stops every process it started by PID, and
exits non-zero unless the run ended `finished:completed`.

Tests drive the same code through `LocalDeployment`:

    with LocalDeployment(nodes=3, workdir=tmp) as dep:
        run_id = dep.submit({"strategy": "ssfl", "num-rounds": 2})
        status = dep.wait(run_id, timeout=300)

Every start has its own folder (certificates, keys, one FLWR_HOME per component, logs, run outputs) and its own
free ports, so two deployments on one machine never meet. With `edge_proxy=True` (`--edge-proxy`) nginx stands in
front of the SuperLink as in docker-compose.yml (`fedsparse.edge_proxy`): the SuperNodes dial its Fleet-only port,
the CLI its Control-only port, and `PUBLIC_CONNECTION` names the CLI pointed at the Fleet-only port (refused).
Process handling (ports, stopping a component with everything it spawned) lives in `fedsparse.deploy_processes`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from fedsparse import edge_proxy
from fedsparse.config import ConfigError, parse_assignments, resolve
from fedsparse.deploy_processes import DeploymentError, Proc, free_port, port_open
from fedsparse.results import read_rounds

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app: pyproject.toml, server/, client/
DEPLOY_DIR = APP_DIR / "deploy"  # gen-certs.sh, gen-keys.sh, register-supernodes.sh
CONNECTION = "fedsparse-local"  # the connection name written to the CLI's config.toml (the operator's)
# With the edge proxy: the same CLI pointed at the proxy's public (Fleet-only) port, which must refuse it.
PUBLIC_CONNECTION = "fedsparse-public"
FINISHED_OK = "finished:completed"
CLIENT_NICENESS = 10  # scheduling priority of the SuperNodes' SuperExecs (hence of their ClientApp processes)

# The run the CLI submits when nothing is overridden: small enough for a laptop, sparse like the paper.
DEFAULT_RUN = {"strategy": "ssfl", "dataset": "digits", "sparse.sparsity": 0.9, "num-rounds": 3, "local-epochs": 1,
               "round-timeout": 120.0}


Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(f"[deploy] {msg}", file=sys.stderr, flush=True)


@dataclass
class SuperNode:
    """One SuperNode of the deployment (and, with process isolation, the SuperExec that runs its ClientApps)."""

    index: int  # 1-based, as in the compose service names supernode-1, supernode-2, ...
    partition_id: int
    num_partitions: int
    port: int  # its Runtime API (the SuperExec dials it)
    key: Path | None  # private key for SuperNode authentication
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
        return bool(self.procs) and all(p.alive() for p in self.procs)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_run_config(path: Path, cfg: dict) -> Path:
    """The run config as a TOML file for `flwr run -c FILE` (no shell quoting of values to get wrong)."""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.items()))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _find_tool(name: str) -> str:
    """An executable from this interpreter's environment first (the venv need not be activated), else PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"'{name}' not found: install flwr 1.42 in this environment (pip install -e .)")
    return found


# ------------------------------------------------------------------------------------------ deployment


class LocalDeployment:
    """SuperLink + N SuperNodes (+ SuperExecs) on 127.0.0.1, each with its own FLWR_HOME, port and log.

    `isolation="process"` starts the SuperExecs as separate processes (what docker-compose.yml does, one
    container each); `"subprocess"` lets SuperLink and SuperNodes spawn their own. `tls=False` is the
    equivalent of docker-compose.insecure.yml: no TLS and no SuperNode authentication (Flower refuses auth
    without TLS). `edge_proxy=True` puts nginx in front of the SuperLink, as the compose `edge` service does
    (see `fedsparse.edge_proxy`): SuperNodes dial its public port, which forwards only the Fleet API; the CLI
    (connection CONNECTION) dials its operator port, which forwards only the Control API; the SuperExec still
    dials the SuperLink itself. `node_env` maps a node index (1-based) to extra environment variables of that
    SuperNode and its SuperExec, hence of its ClientApps (tests inject a fault this way).
    """

    def __init__(self, nodes: int = 3, workdir: str | os.PathLike | None = None, *, isolation: str = "process",
                 tls: bool = True, edge_proxy: bool = False, app_dir: Path = APP_DIR, start_timeout: float = 90.0,
                 node_env: dict[int, dict[str, str]] | None = None, log: Log | None = _print) -> None:
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        if isolation not in ("process", "subprocess"):
            raise ValueError("isolation must be 'process' or 'subprocess'")
        if edge_proxy and not tls:
            raise ValueError("edge_proxy needs tls: the proxy terminates TLS with the deployment's certificates")
        self.num_nodes = nodes
        self.isolation = isolation
        self.tls = tls
        self.edge = edge_proxy
        self.node_env = {int(index): dict(env) for index, env in (node_env or {}).items()}
        self.app_dir = Path(app_dir).resolve()
        self.start_timeout = start_timeout
        self._sink = log or (lambda msg: None)
        self._t0 = time.monotonic()
        self.workdir = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="fedsparse-deploy-"))
        self.certs = self.workdir / "certs"
        self.keys = self.workdir / "keys"
        self.logs = self.workdir / "logs"
        self.cli_home = self.workdir / "cli"
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
        self.runs: dict[int, dict] = {}
        self._procs: list[Proc] = []  # everything ever started, for stop()
        self._bins = {n: _find_tool(n) for n in ("flower-superlink", "flower-supernode", "flower-superexec",
                                                 "flwr")}

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
        """Certificates, keys, SuperLink, key registration, SuperNodes; returns when every node is online."""
        t0 = time.monotonic()
        for d in (self.logs, self.cli_home, self.link_home, self.runs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.log(f"deployment folder {self.workdir}")
        if self.tls:
            self._script("gen-certs.sh", str(self.certs), "--supernodes", str(self.num_nodes))
            self._script("gen-keys.sh", str(self.keys), "--supernodes", str(self.num_nodes))
        self.port = free_port(self.ports)
        self.start_superlink()
        if self.edge:
            self.start_edge_proxy()
        self._write_cli_config()
        for i in range(1, self.num_nodes + 1):
            node = self._new_node(i, partition_id=i - 1, num_partitions=self.num_nodes, register=self.tls)
            self.start_supernode(node)
        self.wait_online([n for n in self.supernodes], timeout=self.start_timeout)
        via = f", nodes via edge proxy 127.0.0.1:{self.public_port}" if self.edge else ""
        self.log(f"{self.num_nodes} SuperNodes online after {time.monotonic() - t0:.1f} s "
                 f"(SuperLink 127.0.0.1:{self.port}{via}, {'TLS + node auth' if self.tls else 'INSECURE'}, "
                 f"isolation={self.isolation})")

    @property
    def fleet_address(self) -> str:
        """The address SuperNodes dial: the edge proxy's public port, else the SuperLink itself."""
        return f"127.0.0.1:{self.public_port if self.edge else self.port}"

    def stop(self) -> None:
        """Stop every process this deployment started, newest first (nodes before the link), by PID."""
        alive = [p for p in reversed(self._procs) if p.alive()]
        for p in alive:
            p.stop()
        if alive:
            self.log(f"stopped {len(alive)} processes: {', '.join(f'{p.name}[{p.pid}]' for p in alive)}")

    # ---- components
    def _env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(home),
            # Every dependency is installed already; a per-run `uv sync` would need the network and could
            # shadow the pinned packages.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            # SuperLink and SuperNode find flower-superexec (and it flwr-serverapp/-clientapp) on PATH.
            "PATH": f"{Path(self._bins['flwr']).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        return env

    def _spawn(self, name: str, args: list[str], home: Path, extra_env: dict[str, str] | None = None,
               niceness: int = 0) -> Proc:
        home.mkdir(parents=True, exist_ok=True)
        nice = shutil.which("nice")
        if niceness and nice:
            args = [nice, "-n", str(niceness), *args]  # nice execs the command: the pid stays the component's
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as out:
            # A session of its own: Ctrl-C in the terminal reaches only us, and the group id is the pid.
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**self._env(home), **(extra_env or {})}, cwd=str(home),
                                     start_new_session=True)
        proc = Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def _tls_client_args(self) -> list[str]:
        return ["--root-certificates", str(self.certs / "ca.crt")] if self.tls else ["--insecure"]

    def _superexec_auth_args(self) -> list[str]:
        # With process isolation the Runtime API shares the SuperLink's (public) port: only holders of the
        # shared secret may pull ServerApp/ClientApp tasks from it. Flower ignores it in subprocess mode.
        if self.tls and self.isolation == "process":
            return ["--superexec-auth-secret-file", str(self.certs / "superexec.secret")]
        return []

    def start_superlink(self) -> None:
        args = [self._bins["flower-superlink"], "--host", "127.0.0.1", "--port", str(self.port),
                "--isolation", self.isolation, "--database", str(self.link_home / "state.db"),
                "--disable-runtime-dependency-installation"]
        if self.tls:
            args += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile",
                     str(self.certs / "superlink.crt"), "--ssl-keyfile", str(self.certs / "superlink.key"),
                     "--enable-supernode-auth", *self._superexec_auth_args()]
        else:
            args.append("--insecure")
        link = self._spawn("superlink", args, self.link_home)
        self.superlink = [link]
        self._wait_port(link, self.port)
        if self.isolation == "process":
            self.superlink.append(self._spawn("superexec-serverapp", [
                self._bins["flower-superexec"], *self._tls_client_args(), *self._superexec_auth_args(),
                "--runtime-api-address", f"127.0.0.1:{self.port}"], self.link_home))
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
        self.edge_proc = self._spawn("edge-proxy", [nginx, *edge_proxy.server_args(self.edge_dir)], self.edge_dir)
        self._wait_port(self.edge_proc, self.public_port)
        self._wait_port(self.edge_proc, self.operator_port)
        self.log(f"edge proxy up: Fleet on 127.0.0.1:{self.public_port}, Control on 127.0.0.1:{self.operator_port} "
                 f"(pid {self.edge_proc.pid})")

    def edge_access_log(self) -> list[str]:
        """The edge proxy's access log, one request a line ([] without a proxy)."""
        path = self.edge_dir / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def _wait_port(self, proc: Proc, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not port_open(port):
            if not proc.alive():
                raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"{proc.name} did not listen on port {port} in {self.start_timeout:.0f} s:\n"
                                      f"{proc.tail()}")
            time.sleep(0.2)

    def _write_cli_config(self) -> None:
        # The CLI's connection lives in $FLWR_HOME/config.toml; never in pyproject.toml, whose
        # [tool.flwr.federations] table `flwr run` would migrate by rewriting the file.
        operator = self.operator_port if self.edge else self.port
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{operator}"']
        lines.append(f'root-certificates = "{self.certs / "ca.crt"}"' if self.tls else "insecure = true")
        if self.edge:
            lines += ["", f"[superlink.{PUBLIC_CONNECTION}]", f'address = "127.0.0.1:{self.public_port}"',
                      f'root-certificates = "{self.certs / "ca.crt"}"']
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _new_node(self, index: int, partition_id: int, num_partitions: int, register: bool) -> SuperNode:
        key = None
        if self.tls:
            # start() made the files of the first nodes at once; gen-*.sh keep what exists and add what is missing,
            # so a node added later just raises the count.
            key = self.keys / f"supernode-{index}"
            if not key.exists():
                self._script("gen-keys.sh", str(self.keys), "--supernodes", str(index))
            if self.isolation == "process" and not (self.certs / f"supernode-{index}.crt").exists():
                self._script("gen-certs.sh", str(self.certs), "--supernodes", str(index))
        node = SuperNode(index=index, partition_id=partition_id, num_partitions=num_partitions,
                         port=free_port(self.ports), key=key, registered=False,
                         home=self.workdir / f"supernode-{index}", env=self.node_env.get(index, {}))
        if register and key is not None:
            node.node_id = self.register_key(key.with_suffix(".pub"))
            node.registered = True
        self.supernodes.append(node)
        return node

    def register_key(self, public_key: Path) -> int:
        """`flwr supernode register`: the SuperLink accepts this key from now on; returns its node id."""
        out = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        if not out.get("success"):
            raise DeploymentError(f"registering {public_key} failed: {out.get('error-message', out)}")
        return int(out["node-id"])

    def start_supernode(self, node: SuperNode, max_wait_time: float | None = None) -> SuperNode:
        args = [self._bins["flower-supernode"], "--superlink", self.fleet_address, *self._tls_client_args(),
                "--node-config", f"partition-id={node.partition_id} num-partitions={node.num_partitions}",
                "--isolation", self.isolation, "--host", "127.0.0.1", "--port", str(node.port)]
        if node.key is not None:
            args += ["--auth-supernode-private-key", str(node.key)]
        if max_wait_time is not None:
            args += ["--max-wait-time", str(max_wait_time)]
        if self.tls and self.isolation == "process":
            # Its Runtime API is dialled by a separate SuperExec (a separate container in compose): TLS too.
            args += ["--ssl-certfile", str(self.certs / f"{node.name}.crt"), "--ssl-keyfile",
                     str(self.certs / f"{node.name}.key"), "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                     *self._superexec_auth_args()]
        log_path = self.logs / f"{node.name}.log"
        node.log_offset = len(log_path.read_text(errors="replace")) if log_path.exists() else 0
        # Subprocess isolation: the SuperNode spawns the SuperExec (and it the ClientApps), which inherit its priority.
        node.procs = [self._spawn(node.name, args, node.home, node.env,
                                  niceness=CLIENT_NICENESS if self.isolation == "subprocess" else 0)]
        if self.isolation == "process":
            # Its ClientApps do the CPU-heavy work; at a lower priority they cannot starve the SuperLink and the
            # ServerApp (whose 60 s heartbeat a loaded machine once made it miss), only each other.
            node.procs.append(self._spawn(f"superexec-{node.name}", [
                self._bins["flower-superexec"], *self._tls_client_args(), *self._superexec_auth_args(),
                "--runtime-api-address", f"127.0.0.1:{node.port}"], node.home, node.env, niceness=CLIENT_NICENESS))
        self.log(f"{node.name} started: partition {node.partition_id}/{node.num_partitions}, "
                  f"runtime port {node.port}, "
                 f"{'no authentication' if not self.tls else 'key registered' if node.registered else 'key NOT registered'}"
                  f"{f', node id {node.node_id}' if node.node_id else ''} (pid {node.procs[0].pid})")
        return node

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL) -> SuperNode:
        """Kill SuperNode `index` (1-based) and its SuperExec and ClientApps, as a crashed host would."""
        node = self.node(index)
        for p in node.procs:
            p.stop(sig)
        self.log(f"{node.name} killed (signal {signal.Signals(sig).name})")
        return node

    def restart_supernode(self, index: int, wait: bool = True) -> SuperNode:
        """Start a killed SuperNode again with the same key (hence the same node id) and partition."""
        node = self.node(index)
        for p in node.procs:
            if p.alive():
                p.stop()
        if self.tls and node.node_id is not None:
            # The SuperLink refuses to activate a node id it still counts as online (a SuperNode that exits
            # refused does not retry), and a crashed node stays online until its heartbeat lapses: 2 x 30 s.
            deadline = time.monotonic() + 150
            while self.node_states().get(node.node_id) == "online":
                if time.monotonic() > deadline:
                    raise DeploymentError(f"{node.name} (node {node.node_id}) still online 150 s after it stopped")
                time.sleep(5)
        node.port = free_port(self.ports)
        self.start_supernode(node)
        if wait:
            self.wait_online([node], timeout=self.start_timeout)
        return node

    def add_supernode(self, key_registered: bool = False, partition_id: int = 0,
                      max_wait_time: float | None = 30.0) -> SuperNode:
        """One more SuperNode, with a fresh key that is registered only if asked (a refused node gives up
        after `max_wait_time` seconds of retrying and exits)."""
        if not self.tls:
            raise DeploymentError("add_supernode(key_registered=...) needs TLS and node authentication")
        node = self._new_node(len(self.supernodes) + 1, partition_id, self.num_nodes, register=key_registered)
        return self.start_supernode(node, max_wait_time=max_wait_time)

    def node(self, index: int) -> SuperNode:
        for n in self.supernodes:
            if n.index == index:
                return n
        raise KeyError(f"no supernode-{index}")

    # ---- the flwr CLI
    def flwr(self, *args: str, timeout: float = 120.0, json_out: bool = True) -> Any:
        """Run the flwr CLI against this deployment; parsed JSON output (or the raw text)."""
        try:
            res = subprocess.run([self._bins["flwr"], *args], check=False, capture_output=True, text=True, timeout=timeout,
                                 env=self._env(self.cli_home), cwd=str(self.workdir), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"flwr {' '.join(args)} did not answer in {timeout:.0f} s") from err
        if not json_out:
            return res.stdout
        try:
            return json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError as err:
            raise DeploymentError(f"flwr {' '.join(args)}: no JSON in its output (exit {res.returncode}):\n"
                                  f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}") from err

    def node_states(self) -> dict[int, str]:
        """{node id: status} from `flwr supernode ls` (registered, online, offline, ...)."""
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        if not out.get("success"):
            raise DeploymentError(f"flwr supernode ls failed: {out.get('error-message', out)}")
        return {int(n["node-id"]): n["status"] for n in out["nodes"]}

    def wait_online(self, nodes: list[SuperNode], timeout: float) -> None:
        """Until every node in `nodes` is online (by node id with auth, by count without).

        A SuperNode logs its node id once the SuperLink has activated it; that file check is free, while every
        `flwr supernode ls` is a Python start-up (about a CPU second), so the CLI only confirms at the end.
        """
        deadline = time.monotonic() + timeout
        while True:
            for n in nodes:
                if not n.alive():
                    bad = next(p for p in n.procs if not p.alive())
                    raise DeploymentError(f"{bad.name} exited with code {bad.popen.returncode}:\n{bad.tail()}")
            if all(self._activated(n) for n in nodes):
                states = self.node_states()
                if self.tls:
                    done = all(states.get(n.node_id) == "online" for n in nodes)
                else:
                    done = sum(s == "online" for s in states.values()) >= len(nodes)
                if done:
                    return
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperNodes not online after {timeout:.0f} s: {self.node_states()}\n"
                                      + "\n".join(f"--- {n.name}\n{n.procs[0].tail(10)}" for n in nodes))
            time.sleep(0.5)

    @staticmethod
    def _activated(node: SuperNode) -> bool:
        try:
            text = node.procs[0].log.read_text(errors="replace")
        except OSError:
            return False
        # The log is appended to across restarts: only the part after the latest start counts.
        return "SuperNode ID:" in text[node.log_offset:]

    # ---- runs
    def submit(self, run_config: dict | None = None, timeout: float = 120.0, app_dir: Path | None = None) -> int:
        """`flwr run` with these run-config overrides; returns the run id.

        num-clients and min-clients default to the number of SuperNodes (a run starts only when all are
        connected); output-dir defaults to a fresh folder under the deployment, and is made absolute because
        the ServerApp's working directory is Flower's choice. `app_dir` replaces the deployment's app folder for
        this run (e.g. a copy whose pyproject.toml names another ClientApp).
        """
        overrides = {**DEFAULT_RUN, "num-clients": self.num_nodes, "min-clients": self.num_nodes,
                     **(run_config or {})}
        cfg = resolve(overrides)  # a bad key fails here, not inside the ServerApp
        if cfg["num-clients"] != self.num_nodes:
            raise ConfigError(f"num-clients={cfg['num-clients']} but this deployment has {self.num_nodes} "
                              "partitions (SuperNodes)")
        seq = len(self.runs) + 1
        if "output-dir" not in (run_config or {}):
            cfg["output-dir"] = str(self.runs_dir / f"run-{seq}")
        cfg["output-dir"] = str(Path(cfg["output-dir"]).resolve())
        cfg_file = write_run_config(self.runs_dir / f"run-{seq}.toml", cfg)
        app = Path(app_dir).resolve() if app_dir is not None else self.app_dir
        pyproject = app / "pyproject.toml"
        before = _sha256(pyproject)
        out = self.flwr("run", str(app), CONNECTION, "--run-config", str(cfg_file), "--format", "json",
                        timeout=timeout)
        if _sha256(pyproject) != before:
            raise DeploymentError(f"flwr run rewrote {pyproject} (a [tool.flwr.federations] table?)")
        if not out.get("success"):
            raise DeploymentError(f"flwr run failed: {out.get('error-message', out)}")
        run_id = int(out["run-id"])
        self.runs[run_id] = {"config": cfg, "output_dir": Path(cfg["output-dir"]), "submitted": time.time()}
        self.log(f"run {run_id} submitted: {cfg['strategy']} on {cfg['dataset']}, {cfg['num-clients']} clients, "
                  f"{cfg['num-rounds']} rounds -> {cfg['output-dir']}")
        return run_id

    def status(self, run_id: int) -> dict:
        """The run as `flwr ls --run-id ID --format json` reports it (status, network-traffic, ...)."""
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        if not out.get("success") or not out.get("runs"):
            raise DeploymentError(f"flwr ls --run-id {run_id} failed: {out.get('error-message', out)}")
        return out["runs"][0]

    def rounds_done(self, run_id: int) -> int:
        """Rounds the ServerApp has finished (rows of rounds.csv in the run's output folder)."""
        return len(read_rounds(self.runs[run_id]["output_dir"] / "rounds.csv", missing_ok=True))

    def wait(self, run_id: int, timeout: float = 600.0, poll: float = 30.0,
             on_round: Callable[[int], None] | None = None) -> dict:
        """Follow the run until Flower says it finished; returns the final `flwr ls` entry.

        Progress comes from the run's rounds.csv (a file check each second); `flwr ls` is asked every `poll`
        seconds, and at once when summary.json appears, because each call is a CLI start-up that costs CPU the
        run needs. `on_round(k)` is called once when round k has finished (a test kills a node there). On
        timeout the run is stopped with `flwr stop` and DeploymentError is raised.
        """
        deadline = time.monotonic() + timeout
        summary = self.runs[run_id]["output_dir"] / "summary.json" if run_id in self.runs else None
        last_status, seen_rounds, next_ask, summary_seen = "", 0, 0.0, False
        while True:
            done = self.rounds_done(run_id) if run_id in self.runs else 0
            while seen_rounds < done:
                seen_rounds += 1
                self.log(f"run {run_id}: round {seen_rounds} done")
                if on_round is not None:
                    on_round(seen_rounds)
            if summary is not None and not summary_seen and summary.exists():
                summary_seen, next_ask = True, 0.0
            if time.monotonic() >= next_ask:
                st = self.status(run_id)
                next_ask = time.monotonic() + (2.0 if summary_seen else poll)
                if st["status"] != last_status:
                    self.log(f"run {run_id}: {st['status']}")
                    last_status = st["status"]
                if st["status"].startswith("finished"):
                    self._save_run_log(run_id)
                    # Next to the run's results: Flower's view of it (status, network totals, compute time).
                    where = self.runs[run_id]["output_dir"] if run_id in self.runs else self.runs_dir
                    where.mkdir(parents=True, exist_ok=True)
                    (where / f"flower-run-{run_id}.json").write_text(json.dumps(st, indent=2) + "\n")
                    return st
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), CONNECTION, json_out=False)
                self._save_run_log(run_id)
                raise DeploymentError(f"run {run_id} still '{last_status}' after {timeout:.0f} s; stopped it "
                                      f"(logs in {self.logs})")
            time.sleep(1.0)

    def _save_run_log(self, run_id: int) -> None:
        """The ServerApp's log as the SuperLink kept it, next to the components' logs."""
        try:
            text = self.flwr("log", str(run_id), CONNECTION, "--show", timeout=60, json_out=False)
        except DeploymentError as err:
            text = str(err)
        (self.logs / f"run-{run_id}.log").write_text(text)

    # ---- helpers
    def _script(self, name: str, *args: str) -> None:
        script = DEPLOY_DIR / name
        try:
            res = subprocess.run(["bash", str(script), *args], check=False, capture_output=True, text=True,
                                 timeout=120)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"{script} did not finish in 120 s") from err
        if res.returncode != 0:
            raise DeploymentError(f"{script} {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")


# ------------------------------------------------------------------------------------------ reporting


def summary_of(dep: LocalDeployment, run_id: int) -> dict | None:
    path = dep.runs[run_id]["output_dir"] / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def compare_bytes(summary: dict, status: dict) -> dict:
    """Our counted payload bytes against Flower's per-run network totals (SuperNode <-> SuperLink).

    Ours: count_bytes() of every record of every message and reply (rounds + one-off saliency/mask exchange).
    Flower's: the serialized messages and objects its Fleet API moved, i.e. ours plus protocol framing,
    metadata and message headers. overhead = Flower / ours - 1.
    """
    down = summary["bytes_down"] + summary.get("oneoff_down", 0)
    up = summary["bytes_up"] + summary.get("oneoff_up", 0)
    traffic = status.get("network-traffic", {})
    out_b, in_b = int(traffic.get("outbound-bytes", 0)), int(traffic.get("inbound-bytes", 0))
    counted = down + up
    return {"counted_down": down, "counted_up": up, "counted_total": counted,
            "flower_outbound": out_b, "flower_inbound": in_b, "flower_total": out_b + in_b,
            "overhead_down": out_b / down - 1 if down else float("nan"),
            "overhead_up": in_b / up - 1 if up else float("nan"),
            "overhead": (out_b + in_b) / counted - 1 if counted else float("nan")}


def round_rows(dep: LocalDeployment, run_id: int) -> list[dict[str, float]]:
    """The run's rounds.csv as numbers (empty before round 1 ends)."""
    return read_rounds(dep.runs[run_id]["output_dir"] / "rounds.csv", missing_ok=True)


def round_times(dep: LocalDeployment, run_id: int) -> list[float]:
    return [r["seconds"] for r in round_rows(dep, run_id)]


def report(dep: LocalDeployment, run_id: int, status: dict) -> str:
    lines = [f"run {run_id}: {status['status']}"
             + (f" ({status['status-details']})" if status.get("status-details", "N/A") != "N/A" else "")]
    summary = summary_of(dep, run_id)
    if summary is None:
        lines.append(f"no summary.json in {dep.runs[run_id]['output_dir']}")
        return "\n".join(lines)
    if summary.get("final_accuracy") is not None:
        lines.append(f"final accuracy {100 * summary['final_accuracy']:.2f}%  rounds {summary['rounds']}  "
                     f"failures {len(summary.get('failures', []))}")
    b = compare_bytes(summary, status)
    lines.append(f"bytes counted by fedsparse: down {b['counted_down']:,}  up {b['counted_up']:,}  "
                 f"total {b['counted_total']:,}")
    lines.append(f"Flower network-traffic:     out  {b['flower_outbound']:,}  in {b['flower_inbound']:,}  "
                 f"total {b['flower_total']:,}")
    lines.append(f"overhead of the wire over our count: {100 * b['overhead']:+.2f}% "
                 f"(down {100 * b['overhead_down']:+.2f}%, up {100 * b['overhead_up']:+.2f}%)")
    secs = round_times(dep, run_id)
    if secs:
        later = secs[1:] or secs
        lines.append(f"seconds per round: {', '.join(f'{s:.1f}' for s in secs)} "
                     f"(round 1 includes the one-off exchange; mean of later rounds {sum(later) / len(later):.1f})")
    for f in summary.get("failures", []):
        lines.append(f"failure: round {f.get('round')} node {f['node_id']}: {f['reason']} ({f['message']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsparse.deploy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes = num-clients (default 3)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"run-config overrides (defaults: {' '.join(f'{k}={v}' for k, v in DEFAULT_RUN.items())})")
    parser.add_argument("--workdir", help="folder for certificates, keys, logs and results (default: a new "
                                          "temporary folder, kept afterwards)")
    parser.add_argument("--isolation", choices=("process", "subprocess"), default="process",
                        help="process: SuperExecs are separate processes, as in docker-compose.yml (default)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no node authentication (local trials only, like docker-compose.insecure.yml)")
    parser.add_argument("--edge-proxy", action="store_true",
                        help="nginx in front of the SuperLink: nodes dial its Fleet-only port, the CLI its "
                             "Control-only port (as the compose `edge` service; needs nginx and TLS)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run (default 1800)")
    args = parser.parse_args(argv)
    if args.edge_proxy and args.insecure:
        parser.error("--edge-proxy terminates TLS: it cannot be combined with --insecure")
    try:
        overrides = parse_assignments(args.set)
        if "output-dir" in overrides:
            overrides["output-dir"] = str(Path(overrides["output-dir"]).resolve())
        cfg = resolve({**DEFAULT_RUN, "num-clients": args.nodes, **overrides})
        if cfg["num-clients"] != args.nodes:
            raise ConfigError(f"num-clients={cfg['num-clients']} must equal --nodes {args.nodes}: one partition "
                              "per SuperNode")
    except ConfigError as err:
        print(f"fedsparse.deploy: {err}", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks, which stop every process

    signal.signal(signal.SIGTERM, on_term)
    dep = LocalDeployment(nodes=args.nodes, workdir=args.workdir, isolation=args.isolation, tls=not args.insecure,
                          edge_proxy=args.edge_proxy)
    try:
        with dep:
            run_id = dep.submit(overrides)
            status = dep.wait(run_id, timeout=args.timeout)
            print(report(dep, run_id, status))
            print(f"logs and results in {dep.workdir}")
    except DeploymentError as err:
        print(f"fedsparse.deploy: {err}", file=sys.stderr)
        print(f"logs in {dep.logs}", file=sys.stderr)
        return 1
    return 0 if status["status"] == FINISHED_OK else 1


if __name__ == "__main__":
    sys.exit(main())
