"""Processes of a local Flower deployment: finding Flower's executables, their environment, free loopback ports,
waiting for a port, and `Proc`, one long-lived process in its own session that is stopped together with everything
it spawned.

Invariants:
- A signal only reaches a process this module started or one of its descendants, identified by pid AND start time
  (from /proc), so a recycled pid is never signalled; nothing is ever looked up by name.
- Waits poll a condition until a deadline and fail early, with the process's log tail, when the process they
  wait for has exited; nothing sleeps a fixed time in the hope that something is ready.
- A priority is set at start (`nice`, inherited by everything the process spawns later) and never lowered
  below ours unless the OS allows it (`can_raise_priority`).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CAP_SYS_NICE = 23  # bit of the capability that lets a process lower niceness (linux/capability.h)


class DeploymentError(RuntimeError):
    """A component did not start, a command failed, or a run did not end in time; the message says which."""


def find_tool(name: str) -> str:
    """An executable from this interpreter's environment first (the venv need not be activated), else PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"'{name}' not found: install flwr 1.42 in this environment (pip install -e .)")
    return found


def flower_env(home: Path, tool_dir: Path) -> dict[str, str]:
    """The environment of a Flower component or CLI call with this FLWR_HOME.

    Every dependency is installed already: a per-run `uv sync` would need the network and could shadow the pinned
    packages. `tool_dir` goes first on PATH, so SuperLink and SuperNode find flower-superexec (and it
    flwr-serverapp/flwr-clientapp) from the same environment.
    """
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{tool_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


def can_raise_priority(steps: int) -> bool:
    """Whether a child may run `steps` niceness steps above our priority (below our niceness).

    True with CAP_SYS_NICE (root outside a container that drops it) or when RLIMIT_NICE allows that niceness.
    """
    if steps <= 0:
        return True
    target = os.getpriority(os.PRIO_PROCESS, 0) - steps
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or 20 - soft <= target:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except OSError:
        pass
    return False


def spawn(name: str, args: list[str], *, cwd: Path, log_path: Path, env: dict[str, str], niceness: int = 0) -> Proc:
    """Start a long-lived process in a session of its own, stdout and stderr appended to `log_path`.

    `niceness` is relative to ours (`nice -n`, which execs the command, so the pid stays the component's); a
    negative value needs `can_raise_priority`. The new session means Ctrl-C in the terminal reaches only us, and
    the process group id is the pid.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    nice = shutil.which("nice")
    if niceness and nice:
        args = [nice, "-n", str(niceness), *args]
    with log_path.open("ab") as out:
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=str(cwd), start_new_session=True)
    return Proc(name, popen, log_path)


def wait_port(proc: Proc, port: int, timeout: float) -> None:
    """Until `proc` accepts TCP connections on 127.0.0.1:`port`; DeploymentError if it exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if not proc.alive():
            raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"{proc.name} did not listen on port {port} in {timeout:.0f} s:\n{proc.tail()}")
        time.sleep(0.2)


def free_port(taken: set[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now: the kernel's pick for port 0."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if taken is None or port not in taken:
            if taken is not None:
                taken.add(port)
            return port
    raise DeploymentError("no free TCP port found on 127.0.0.1")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port (half a second to answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a process, from /proc; None if it is gone (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[1]), int(fields[19])


def niceness_of(pid: int) -> int | None:
    """The niceness of a running process, from /proc; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2:].split()[16])  # field 19 of proc(5), counted after the command name


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every process below `pid` (SuperExec, flwr-serverapp, flwr-clientapp, ...).

    The start time identifies a process beyond its pid, so a later signal never reaches a process that got a
    recycled pid after ours exited.
    """
    tree: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        st = proc_stat(int(entry.name))
        if st is not None:
            tree.setdefault(st[0], []).append((int(entry.name), st[1]))
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child, started in tree.get(todo.pop(), []):
            out[child] = started
            todo.append(child)
    return out


@dataclass
class Proc:
    """One long-lived process this module started, in its own session (so its group id is its pid)."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, grace: float = 8.0) -> None:
        """Signal the process, its group and every descendant by PID; SIGKILL whatever outlives `grace`.

        Flower's components spawn helpers (SuperExec, then one flwr-serverapp or flwr-clientapp per task); the
        group covers those that stay in it, the PID list those that left it or were orphaned on the way.
        """
        known = descendants(self.pid)
        self._signal(known, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.alive() or any(proc_stat(p) for p in known)):
            time.sleep(0.1)
        if sig != signal.SIGKILL:
            self._signal({**known, **descendants(self.pid)}, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _signal(self, others: dict[int, int], sig: int) -> None:
        if self.popen.poll() is None:  # not reaped yet, so the pid (and group id) is still ours
            for send in (os.killpg, os.kill):
                try:
                    send(self.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid, started in others.items():
            st = proc_stat(pid)
            if st is None or st[1] != started:
                continue  # gone, or the pid now belongs to another process
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
