#!/usr/bin/env bash
# The local multi-node deployment (SuperLink with TLS + SuperNode authentication, N SuperNodes, SuperExecs) on
# loopback, one SSFL run, final status from `flwr ls`; every process is stopped at the end.
#
#   simulations/deploy_local.sh --nodes 3 --set num-rounds=3 sparse.sparsity=0.9
#
# All arguments go to `python -m fedsparse.deploy` (see --help). Uses the repository's .venv if there is one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
[[ -x "$root/.venv/bin/python" ]] && python="$root/.venv/bin/python"
exec "$python" -m fedsparse.deploy "$@"
