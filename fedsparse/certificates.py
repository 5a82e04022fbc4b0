"""The secrets of a local deployment, made once per deployment by the repository's own scripts
(`deploy/gen-certs.sh`, `deploy/gen-keys.sh`, the same ones an operator runs for docker compose).

Invariants:
- `DeploymentSecrets.create` runs each script once, whatever the number of nodes: one CA, one SuperLink
  certificate, one SuperExec secret, and ONE certificate for the SuperNodes' Runtime APIs. Every SuperNode of a
  local deployment listens on 127.0.0.1, so the script's first node certificate (valid for `localhost` and
  `127.0.0.1`) serves them all; nodes added later need no new certificate. (In docker compose each SuperNode is
  its own host name and gets its own certificate: `gen-certs.sh --supernodes N`.)
- Node keys are identities (the SuperLink derives the node id from the public key), so there is one per node:
  `create` makes the first `nodes` in the same single call; `node_key(i)` of a node added later makes only its
  key. Existing files are never overwritten (the scripts keep what exists), so a key stays valid for the
  deployment's lifetime and a restarted node keeps its node id.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedsparse.deploy_processes import DeploymentError

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"  # gen-certs.sh, gen-keys.sh, register-supernodes.sh
SCRIPT_TIMEOUT = 300.0  # seconds; openssl and ssh-keygen take milliseconds, a loaded machine much longer
NODE_CERT_NAME = "supernode-1"  # the Runtime-API certificate every SuperNode of a local deployment presents


def run_script(name: str, *args: str, timeout: float = SCRIPT_TIMEOUT) -> None:
    """Run `deploy/<name>` with bash; DeploymentError with its stderr if it fails or does not finish."""
    script = DEPLOY_DIR / name
    try:
        result = subprocess.run(["bash", str(script), *args], check=False, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(f"{script} did not finish in {timeout:.0f} s") from err
    if result.returncode != 0:
        raise DeploymentError(f"{script} {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


@dataclass(frozen=True)
class DeploymentSecrets:
    """Where a deployment's certificates and node keys are; the paths every component is started with."""

    certs: Path  # ca.crt, ca.key, superlink.crt/.key, supernode-1.crt/.key, superexec.secret
    keys: Path  # supernode-I (private) and supernode-I.pub (public), I = 1, 2, ...

    @classmethod
    def create(cls, certs: Path, keys: Path, nodes: int) -> DeploymentSecrets:
        """Make the CA, the certificates, the SuperExec secret and the first `nodes` node keys (one call each)."""
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        run_script("gen-certs.sh", str(certs), "--supernodes", "1")
        run_script("gen-keys.sh", str(keys), "--supernodes", str(nodes))
        return cls(certs=Path(certs), keys=Path(keys))

    @property
    def ca_cert(self) -> Path:
        """The CA every client (SuperNode, SuperExec, flwr CLI, edge proxy) verifies servers against."""
        return self.certs / "ca.crt"

    @property
    def superlink_cert(self) -> Path:
        return self.certs / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.certs / "superlink.key"

    @property
    def node_cert(self) -> Path:
        """The certificate of every SuperNode's Runtime API (all listen on 127.0.0.1)."""
        return self.certs / f"{NODE_CERT_NAME}.crt"

    @property
    def node_cert_key(self) -> Path:
        return self.certs / f"{NODE_CERT_NAME}.key"

    @property
    def superexec_secret(self) -> Path:
        """Shared secret between a SuperLink/SuperNode and its SuperExecs (--superexec-auth-secret-file)."""
        return self.certs / "superexec.secret"

    def node_key(self, index: int) -> Path:
        """The private authentication key of SuperNode `index` (1-based); made now if this node is new."""
        if index < 1:
            raise ValueError(f"node index must be >= 1, got {index}")
        key = self.keys / f"supernode-{index}"
        if not key.exists():
            run_script("gen-keys.sh", str(self.keys), "--supernodes", str(index))  # keeps the existing keys
        return key

    @staticmethod
    def public_key(private_key: Path) -> Path:
        """The public half of a node key (what `flwr supernode register` takes)."""
        return private_key.with_suffix(".pub")
