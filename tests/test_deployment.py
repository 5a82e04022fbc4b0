"""Multi-node deployment (issue 4): real SuperLink, SuperNode and SuperExec processes on loopback with TLS and
SuperNode authentication, driven through `fedsparse.deploy.LocalDeployment`; and the docker compose files, which
are parsed (no Docker engine is needed) and checked for files, secrets and build contexts that do not exist.

The process tests share one 3-node deployment and two small runs on `digits`: a clean SSFL run (3 rounds) with
the byte comparison, and a faulty run (2 rounds) in which supernode-1 sends malformed sparse replies and
supernode-3 is killed during round 2; plus a refused unregistered SuperNode. About 4.5 CPU-minutes: 5.5 minutes
of wall time on 2 cores that other jobs kept at load 5-10. Every message in a deployment starts a ClientApp
process (about 5 CPU seconds), and the dead node costs one round-timeout (40 s).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsparse import deploy
from fedsparse.deploy import FINISHED_OK, LocalDeployment, compare_bytes, summary_of

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.insecure.yml", "docker-compose.gpu.yml"]
MAX_OVERHEAD = 0.15  # the bound on |Flower's network totals / our count - 1|
# Flower's totals are our payload plus protobuf framing and message metadata, so they are not smaller than our
# count; only its content-addressed dedup of byte-identical objects (a few identical ConfigRecords here) can
# take a little off. A larger deficit means we count bytes that never crossed the wire (e.g. twice).
MIN_OVERHEAD = -0.02


def _missing_tools() -> list[str]:
    tools = ["openssl", "ssh-keygen", "bash"]
    missing = [t for t in tools if shutil.which(t) is None]
    for flower_tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not (Path(sys.executable).parent / flower_tool).exists() and shutil.which(flower_tool) is None:
            missing.append(flower_tool)
    return missing


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    missing = _missing_tools()
    if missing:
        pytest.skip(f"deployment tests need {', '.join(missing)}")
    with LocalDeployment(nodes=3, workdir=tmp_path_factory.mktemp("deploy")) as d:
        yield d


def _run(d: LocalDeployment, config: dict, timeout: float = 400, on_round=None) -> tuple[int, dict, dict]:
    run_id = d.submit(config)
    status = d.wait(run_id, timeout=timeout, on_round=on_round)
    summary = summary_of(d, run_id)
    assert summary is not None, f"no summary.json; status {status}; logs in {d.logs}"
    return run_id, status, summary


# ------------------------------------------------------------------------------------------ processes


@pytest.mark.deployment
def test_ssfl_run_completes_and_bytes_agree_with_flower(dep):
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    run_id, status, summary = _run(dep, {"strategy": "ssfl", "sparsity": 0.9, "num-rounds": 3})
    assert status["status"] == FINISHED_OK, status
    assert summary["rounds"] == 3 and summary["failures"] == []
    assert 0.05 < summary["density"] < 0.15  # 90% sparsity (the mask covers conv and linear weights)
    b = compare_bytes(summary, status)
    print(f"\nrun {run_id}: counted {b['counted_total']:,} B, Flower {b['flower_total']:,} B, overhead "
          f"{100 * b['overhead']:+.2f}% (down {100 * b['overhead_down']:+.2f}%, up {100 * b['overhead_up']:+.2f}%)")
    for key in ("overhead", "overhead_down", "overhead_up"):
        assert MIN_OVERHEAD < b[key] < MAX_OVERHEAD, (key, b)
    # `flwr run` must never rewrite pyproject.toml (it does when it finds [tool.flwr.federations]).
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject


@pytest.mark.deployment
def test_unregistered_supernode_is_refused(dep):
    online_before = dep.node_states()
    rogue = dep.add_supernode(key_registered=False, max_wait_time=20)
    proc = rogue.procs[0]
    deadline = time.monotonic() + 60
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        assert not proc.alive(), f"an unregistered SuperNode is still running:\n{proc.tail()}"
        assert proc.popen.returncode != 0
        assert "Failed to activate SuperNode" in proc.log.read_text(), proc.tail()
        # The SuperLink knows no new node, and the registered ones are untouched.
        assert dep.node_states() == online_before
    finally:
        for p in rogue.procs:
            p.stop()


@pytest.mark.deployment
def test_register_script_registers_a_key(dep):
    key = dep.keys / "extra"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["bash", str(ROOT / "deploy" / "register-supernodes.sh"), "--superlink", f"127.0.0.1:{dep.port}",
           "--ca", str(dep.certs / "ca.crt"), f"{key}.pub"]
    first = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    node_id = int(first.stdout.split()[-1])
    assert dep.node_states()[node_id] == "registered"
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 0 and "already-registered" in again.stdout, again.stderr


@pytest.fixture(scope="module")
def faulty_run(dep):
    """One 2-round SSFL run: supernode-1 (partition 0) answers every train message with a malformed sparse
    reply (one value too many); supernode-3 is killed (SIGKILL, with its SuperExec and ClientApps) as soon as
    round 1 is over. Sharing one run keeps the suite inside its time budget; each test checks its own part."""
    faulty, killed = dep.node(1), dep.node(3)

    def on_round(k: int) -> None:
        if k == 1:
            dep.kill_supernode(3, signal.SIGKILL)

    # round-timeout bounds the wait for the dead node's reply: long enough for a live node on a busy machine.
    run_id, status, summary = _run(dep, {"strategy": "ssfl", "num-rounds": 2, "round-timeout": 40.0,
                                         "fault-partition": 0, "client-fault": "wrong-length"},
                                   on_round=on_round)
    dep.restart_supernode(3)  # the deployment is whole again for any test that follows
    rounds = deploy.round_rows(dep, run_id)
    return {"status": status, "summary": summary, "rounds": rounds, "faulty": faulty.node_id,
            "killed": killed.node_id}


@pytest.mark.deployment
def test_malformed_sparse_reply_is_rejected_and_run_completes(faulty_run):
    assert faulty_run["status"]["status"] == FINISHED_OK, faulty_run["status"]
    rejected = [f for f in faulty_run["summary"]["failures"]
                if f["node_id"] == faulty_run["faulty"] and f["reason"].startswith("rejected reply")]
    assert sorted(f["round"] for f in rejected) == [1, 2], faulty_run["summary"]["failures"]
    assert all(r["rejected"] >= 1 for r in faulty_run["rounds"])
    assert faulty_run["rounds"][0]["clients"] == 2  # round 1: the two honest nodes were aggregated


@pytest.mark.deployment
def test_killed_supernode_run_completes_with_the_others(faulty_run):
    assert faulty_run["status"]["status"] == FINISHED_OK, faulty_run["status"]
    summary = faulty_run["summary"]
    assert summary["rounds"] == 2
    dead = [f for f in summary["failures"] if f["node_id"] == faulty_run["killed"]]
    assert dead and all(f["round"] == 2 for f in dead), summary["failures"]
    assert dead[0]["reason"] in ("no reply before the timeout",) or "Node Unavailable" in dead[0]["reason"]
    assert faulty_run["rounds"][1]["clients"] >= 1  # the surviving honest node was aggregated in round 2


# ------------------------------------------------------------------------------------------ compose

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR} / ${VAR:-default} substitution, enough for our files."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def _load(name: str, env: dict[str, str]) -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the compose files (pip install pyyaml)")
    return yaml.safe_load(_interpolate((ROOT / name).read_text(), env))


@pytest.fixture(scope="module")
def compose_env(tmp_path_factory) -> dict[str, str]:
    """Certificates and keys made by the repository's scripts into a temporary folder (the compose files take
    their location from FEDSPARSE_CERTS / FEDSPARSE_KEYS), so every secret the files name really exists."""
    if shutil.which("openssl") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("openssl and ssh-keygen make the compose secrets")
    base = tmp_path_factory.mktemp("compose")
    subprocess.run(["bash", str(ROOT / "deploy" / "gen-certs.sh"), str(base / "certs"), "--supernodes", "3"],
                   check=True, capture_output=True)
    subprocess.run(["bash", str(ROOT / "deploy" / "gen-keys.sh"), str(base / "keys"), "--supernodes", "3"],
                   check=True, capture_output=True)
    return {**os.environ, "FEDSPARSE_CERTS": str(base / "certs"), "FEDSPARSE_KEYS": str(base / "keys")}


def test_compose_names_only_existing_files(compose_env):
    base = _load("docker-compose.yml", compose_env)
    services = base["services"]
    assert "superlink" in services and "superexec-serverapp" in services
    nodes = sorted(s for s in services if re.fullmatch(r"supernode-\d+", s))
    assert len(nodes) == 3
    problems = []
    for name in COMPOSE_FILES:
        doc = _load(name, compose_env)
        for secret, spec in (doc.get("secrets") or {}).items():
            if not (ROOT / spec["file"]).is_file():
                problems.append(f"{name}: secret {secret} -> {spec['file']} does not exist")
        for svc_name, svc in (doc.get("services") or {}).items():
            build = svc.get("build")
            if isinstance(build, dict):
                ctx = ROOT / build.get("context", ".")
                if not ctx.is_dir():
                    problems.append(f"{name}: {svc_name} build context {ctx} does not exist")
                elif not (ctx / build.get("dockerfile", "Dockerfile")).is_file():
                    problems.append(f"{name}: {svc_name} Dockerfile {build.get('dockerfile')} does not exist")
            for used in svc.get("secrets") or []:
                used = used if isinstance(used, str) else used["source"]
                if used not in (base.get("secrets") or {}):
                    problems.append(f"{name}: {svc_name} uses undeclared secret {used}")
            for vol in svc.get("volumes") or []:
                source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
                if source.startswith((".", "/")) and not (ROOT / source).exists():
                    problems.append(f"{name}: {svc_name} mounts {source}, which does not exist "
                                    "(set FEDSPARSE_DATA_HOST to your data folder)")
            if name != "docker-compose.yml" and svc_name not in services:
                problems.append(f"{name}: overrides {svc_name}, which docker-compose.yml does not define")
    assert not problems, "\n".join(problems)


def test_compose_tls_auth_and_isolation_by_default(compose_env):
    services = _load("docker-compose.yml", compose_env)["services"]
    link = " ".join(map(str, services["superlink"]["command"]))
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--database"):
        assert flag in link
    for name, svc in services.items():
        cmd = " ".join(map(str, svc.get("command", [])))
        assert "--insecure" not in cmd, name
        assert "--allow-runtime-dependency-installation" not in cmd, name
    insecure = _load("docker-compose.insecure.yml", compose_env)["services"]
    assert all("--insecure" in " ".join(map(str, s["command"])) for s in insecure.values() if "command" in s)
    ports = [_flag(s["command"], "--port") for n, s in services.items() if re.fullmatch(r"supernode-\d+", n)]
    assert None not in ports and len(set(ports)) == len(ports), f"each SuperNode has its own port: {ports}"
    configs = [_flag(s["command"], "--node-config") for n, s in services.items()
               if re.fullmatch(r"supernode-\d+", n)]
    assert sorted(configs) == [f"partition-id={i} num-partitions=3" for i in range(3)]


def _flag(command: list, flag: str) -> str | None:
    """The value after `flag` in a command list."""
    args = [str(a) for a in command]
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.skipif(shutil.which("docker-compose") is None and shutil.which("docker") is None,
                    reason="no compose implementation installed (apt-get install docker-compose)")
@pytest.mark.parametrize("overrides", [[], ["docker-compose.insecure.yml"], ["docker-compose.gpu.yml"]])
def test_compose_config_parses(compose_env, overrides):
    if shutil.which("docker-compose"):
        cmd = ["docker-compose"]
    else:
        probe = subprocess.run(["docker", "compose", "version"], check=False, capture_output=True)
        if probe.returncode != 0:
            pytest.skip("docker has no compose plugin and docker-compose is not installed")
        cmd = ["docker", "compose"]
    for f in ["docker-compose.yml", *overrides]:
        cmd += ["-f", str(ROOT / f)]
    res = subprocess.run([*cmd, "config", "-q"], check=False, capture_output=True, text=True, cwd=ROOT,
                         env=compose_env, timeout=120)
    assert res.returncode == 0, res.stderr
