"""The `flwr` CLI as a local deployment uses it: connections in `$FLWR_HOME/config.toml`, `flwr run`, `flwr ls`,
`flwr supernode register|ls`, `flwr stop`, `flwr log`.

Invariants:
- Connections are written to the CLI's own `$FLWR_HOME/config.toml`, never to the app's `pyproject.toml`: `flwr run`
  migrates a `[tool.flwr.federations]` table there by rewriting the file. `run` checks the file's hash around
  the call and raises if it changed.
- A run's outcome is read from `flwr ls --format json` (`FINISHED_OK`), never from `flwr run`'s exit code, which is
  0 for failed runs too.
- The run config goes to `flwr run` as a TOML file (`--run-config FILE`): no shell quoting of values to get wrong.
  Dotted keys (`sparse.sparsity`) are TOML dotted keys, which Flower flattens back to the same names.
- Every call has a deadline; a CLI that does not answer, or answers without JSON, raises DeploymentError with its
  output. Each call is a Python start-up (about a CPU second): callers poll files first and the CLI sparingly.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsparse.deploy_processes import DeploymentError, flower_env

FINISHED_OK = "finished:completed"
CLI_TIMEOUT = 180.0  # seconds for one CLI call: a start-up on a loaded machine takes tens of seconds


@dataclass(frozen=True)
class Connection:
    """One `[superlink.NAME]` entry of the CLI's config.toml: where the Control API is, and how to trust it."""

    name: str
    address: str  # "host:port"
    root_certificates: Path | None  # the CA to verify the SuperLink with; None: insecure (no TLS)

    def toml(self) -> str:
        """The entry as TOML lines."""
        trust = (f'root-certificates = "{self.root_certificates}"' if self.root_certificates is not None
                 else "insecure = true")
        return f'[superlink.{self.name}]\naddress = "{self.address}"\n{trust}\n'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_run_config(path: Path, run_config: dict[str, Any]) -> Path:
    """The run config as a TOML file for `flwr run --run-config FILE`; returns `path`."""
    path.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in run_config.items()))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FlowerCli:
    """The `flwr` executable with its own FLWR_HOME (hence its own config.toml), run from `cwd`."""

    def __init__(self, binary: str, home: Path, cwd: Path) -> None:
        self.binary = binary
        self.home = Path(home)
        self.cwd = Path(cwd)

    def configure(self, connections: list[Connection]) -> Path:
        """Write config.toml with these connections, the first one the default; returns its path."""
        if not connections:
            raise ValueError("configure needs at least one connection")
        self.home.mkdir(parents=True, exist_ok=True)
        text = f'[superlink]\ndefault = "{connections[0].name}"\n\n' + "\n".join(c.toml() for c in connections)
        path = self.home / "config.toml"
        path.write_text(text)
        return path

    def call(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """`flwr ARGS` with this CLI's FLWR_HOME; the completed process (any exit code)."""
        try:
            return subprocess.run([self.binary, *args], check=False, capture_output=True, text=True, timeout=timeout,
                                  env=flower_env(self.home, Path(self.binary).parent), cwd=str(self.cwd),
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"flwr {' '.join(args)} did not answer in {timeout:.0f} s") from err

    def json(self, *args: str, timeout: float = CLI_TIMEOUT) -> dict[str, Any]:
        """`flwr ARGS` (which must include `--format json`), its output parsed."""
        result = self.call(*args, timeout=timeout)
        try:
            return json.loads(result.stdout[result.stdout.index("{"):])
        except ValueError as err:
            raise DeploymentError(f"flwr {' '.join(args)}: no JSON in its output (exit {result.returncode}):\n"
                                  f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}") from err

    def _succeeded(self, what: str, out: dict[str, Any]) -> dict[str, Any]:
        if not out.get("success"):
            raise DeploymentError(f"{what} failed: {out.get('error-message', out)}")
        return out

    def run(self, app_dir: Path, connection: str, run_config_file: Path, timeout: float = CLI_TIMEOUT) -> int:
        """`flwr run APP CONNECTION --run-config FILE`; the new run's id."""
        pyproject = Path(app_dir) / "pyproject.toml"
        before = _sha256(pyproject)
        out = self.json("run", str(app_dir), connection, "--run-config", str(run_config_file), "--format", "json",
                        timeout=timeout)
        if _sha256(pyproject) != before:
            raise DeploymentError(f"flwr run rewrote {pyproject} (a [tool.flwr.federations] table?)")
        return int(self._succeeded("flwr run", out)["run-id"])

    def run_status(self, connection: str, run_id: int) -> dict[str, Any]:
        """The run as `flwr ls --run-id ID --format json` reports it (status, network-traffic, ...)."""
        out = self._succeeded(f"flwr ls --run-id {run_id}",
                              self.json("ls", connection, "--run-id", str(run_id), "--format", "json"))
        if not out.get("runs"):
            raise DeploymentError(f"flwr ls --run-id {run_id} knows no such run: {out}")
        return out["runs"][0]

    def runs(self, connection: str) -> list[dict[str, Any]]:
        """Every run the SuperLink knows (`flwr ls --format json`)."""
        return self._succeeded("flwr ls", self.json("ls", connection, "--format", "json"))["runs"]

    def node_states(self, connection: str) -> dict[int, str]:
        """{node id: status} from `flwr supernode ls` (registered, online, offline, ...)."""
        out = self._succeeded("flwr supernode ls", self.json("supernode", "ls", connection, "--format", "json"))
        return {int(node["node-id"]): node["status"] for node in out["nodes"]}

    def register_key(self, connection: str, public_key: Path) -> int:
        """`flwr supernode register`: the SuperLink accepts this key from now on; returns its node id."""
        out = self.json("supernode", "register", str(public_key), connection, "--format", "json")
        return int(self._succeeded(f"registering {public_key}", out)["node-id"])

    def stop(self, connection: str, run_id: int) -> str:
        """`flwr stop RUN_ID`; its output (a run that already ended is not an error here)."""
        return self.call("stop", str(run_id), connection).stdout

    def run_log(self, connection: str, run_id: int, timeout: float = 60.0) -> str:
        """The ServerApp's log of a run as the SuperLink kept it (`flwr log --show`)."""
        return self.call("log", str(run_id), connection, "--show", timeout=timeout).stdout
