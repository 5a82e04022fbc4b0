"""Processes of a local Flower deployment: free loopback ports, and `Proc`, one long-lived process in its own
session that is stopped together with everything it spawned.

Invariant: a signal only reaches a process this module started or one of its descendants, identified by pid AND
start time (from /proc), so a recycled pid is never signalled; nothing is ever looked up by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class DeploymentError(RuntimeError):
    """A component did not start, a command failed, or a run did not end in time; the message says which."""


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
