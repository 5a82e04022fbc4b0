"""The edge proxy in front of the SuperLink: nginx forwards only Flower's Fleet API on the public port and only its
Control API on an operator port bound to loopback.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (the `flwr` CLI: submit runs, register node keys)
and the Runtime API (SuperExecs) on one SuperLink port, as protobuf over HTTP under `/v1/fleet/`, `/v1/control/`
and `/v1/runtime/`; the open-source Control API authenticates no user. Whoever reaches that port can submit a run,
i.e. run code on the server and on every node. The proxy splits the port:

- public listener: `/v1/fleet/` and `/health`, nothing else (403);
- operator listener: `/v1/control/` and `/health`, nothing else (403); meant for 127.0.0.1 or a VPN address;
- `/v1/runtime/` on neither: SuperExecs dial the SuperLink directly on the private network.

One template, `deploy/edge/nginx.conf.template`, is rendered two ways: `render_local` for real processes on
loopback (`fedsparse.local_deployment.LocalDeployment(edge_proxy=True)`), `render_compose` for the `edge` service of
`docker-compose.yml` (committed as `deploy/edge/nginx-compose.conf`; a test checks it equals the rendering).
Regenerate that file with `python -m fedsparse.edge_proxy --compose > deploy/edge/nginx-compose.conf`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "edge" / "nginx.conf.template"
COMPOSE_CONFIG = TEMPLATE.with_name("nginx-compose.conf")

# The path prefixes of Flower 1.42's HTTP APIs (flwr/superlink/routers/*, flwr/supercore/routers/runtime).
FLEET_PREFIX = "/v1/fleet/"
CONTROL_PREFIX = "/v1/control/"
RUNTIME_PREFIX = "/v1/runtime/"

# Inside the compose network: the edge container listens here; docker-compose.yml publishes these ports.
COMPOSE_PUBLIC_PORT = 8443
COMPOSE_OPERATOR_PORT = 8444


class EdgeProxyError(RuntimeError):
    """nginx is missing, or rejected the rendered configuration; the message carries nginx's own words."""


@dataclass(frozen=True)
class EdgeProxySettings:
    """Every value the template needs; paths are as the nginx process sees them."""

    public_listen: str  # "host:port" of the Fleet-only listener
    operator_listen: str  # "host:port" of the Control-only listener
    upstream: str  # "host:port" of the SuperLink
    upstream_tls_name: str  # the name checked against the SuperLink's certificate (one of its SANs)
    tls_cert: str  # the certificate clients see (same SANs as the SuperLink's)
    tls_key: str
    ca_cert: str  # verifies the SuperLink
    pid_file: str
    error_log: str
    access_log: str
    temp_dir: str

    def __post_init__(self) -> None:
        for name in ("public_listen", "operator_listen", "upstream"):
            value = getattr(self, name)
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{name} must be 'host:port', got {value!r}")
        if self.public_listen == self.operator_listen:
            raise ValueError("the public and the operator listener must differ")


# `${NAME}` placeholders (upper case, braces); nginx's own `$variables` are left alone.
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")


def render(settings: EdgeProxySettings, template: Path = TEMPLATE) -> str:
    """The nginx configuration for these settings; a placeholder the settings do not fill raises KeyError."""
    values = {key.upper(): value for key, value in asdict(settings).items()}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template.read_text())


def render_local(workdir: Path, *, public_port: int, operator_port: int, superlink_port: int, certs: Path) -> str:
    """Configuration for real processes on loopback: both listeners on 127.0.0.1, state under `workdir`."""
    workdir = Path(workdir).resolve()
    settings = EdgeProxySettings(
        public_listen=f"127.0.0.1:{public_port}", operator_listen=f"127.0.0.1:{operator_port}",
        upstream=f"127.0.0.1:{superlink_port}", upstream_tls_name="localhost",
        tls_cert=str(certs / "superlink.crt"), tls_key=str(certs / "superlink.key"), ca_cert=str(certs / "ca.crt"),
        pid_file=str(workdir / "nginx.pid"), error_log=str(workdir / "error.log"),
        access_log=str(workdir / "access.log"), temp_dir=str(workdir / "tmp"))
    return render(settings)


def render_compose() -> str:
    """Configuration of the compose `edge` service: secrets under /run/secrets, the SuperLink at superlink:8000."""
    settings = EdgeProxySettings(
        public_listen=f"0.0.0.0:{COMPOSE_PUBLIC_PORT}", operator_listen=f"0.0.0.0:{COMPOSE_OPERATOR_PORT}",
        upstream="superlink:8000", upstream_tls_name="superlink",
        tls_cert="/run/secrets/superlink-cert", tls_key="/run/secrets/superlink-key",
        ca_cert="/run/secrets/ca-cert", pid_file="/tmp/nginx.pid", error_log="stderr",
        access_log="/dev/stdout", temp_dir="/tmp")
    return render(settings)


def nginx_binary() -> str | None:
    """Path of the nginx executable (PATH, then /usr/sbin, where Debian puts it), or None."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def write_local_config(workdir: Path, *, public_port: int, operator_port: int, superlink_port: int,
                       certs: Path) -> Path:
    """Render `render_local` into `workdir/nginx.conf`, create its folders, and check it with `nginx -t`."""
    nginx = nginx_binary()
    if nginx is None:
        raise EdgeProxyError("nginx is not installed (Debian: apt-get install nginx-light)")
    workdir = Path(workdir).resolve()
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    config = workdir / "nginx.conf"
    config.write_text(render_local(workdir, public_port=public_port, operator_port=operator_port,
                                   superlink_port=superlink_port, certs=certs))
    check = subprocess.run([nginx, "-t", "-q", *server_args(workdir)], check=False, capture_output=True,
                           text=True, timeout=60)
    if check.returncode != 0:
        raise EdgeProxyError(f"nginx -t rejected {config}: {check.stderr.strip()}")
    return config


def server_args(workdir: Path) -> list[str]:
    """nginx's arguments (after the binary) to run the configuration in `workdir` in the foreground."""
    workdir = Path(workdir).resolve()
    return ["-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log"),
            "-g", "daemon off;"]


def main(argv: list[str] | None = None) -> int:
    """Print the compose rendering (`--compose`), the file `deploy/edge/nginx-compose.conf` holds."""
    parser = argparse.ArgumentParser(prog="python -m fedsparse.edge_proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose", action="store_true", help="print the configuration of the compose edge service")
    args = parser.parse_args(argv)
    if not args.compose:
        parser.print_help()
        return 2
    sys.stdout.write(render_compose())
    return 0


if __name__ == "__main__":
    sys.exit(main())
