#!/usr/bin/env bash
# Register SuperNode public keys on a SuperLink started with --enable-supernode-auth (run where the flwr CLI
# can reach the SuperLink's port: its host, or an operator's machine holding ca.crt).
#
#   deploy/register-supernodes.sh --superlink HOST:PORT [--ca CA_CERT] [PUBLIC_KEY ...]
#   deploy/register-supernodes.sh --connection NAME [PUBLIC_KEY ...]
#
# --superlink: a throw-away flwr config pointing at HOST:PORT, trusting CA_CERT (default deploy/certs/ca.crt);
# --connection: a connection of your own $FLWR_HOME/config.toml (default ~/.flwr). Keys default to
# deploy/keys/supernode-*.pub. A key registered before is reported and skipped; any other error fails.
# Prints "<key> <node id>" per key: the SuperLink knows that node by this id from now on.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
superlink="" ca="$here/certs/ca.crt" connection="" insecure=0
keys=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --connection) connection="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "register-supernodes.sh: unknown option $1" >&2; exit 2 ;;
    *) keys+=("$1"); shift ;;
  esac
done
if [[ ${#keys[@]} -eq 0 ]]; then
  shopt -s nullglob
  keys=("$here"/keys/supernode-*.pub)
  [[ ${#keys[@]} -gt 0 ]] || { echo "register-supernodes.sh: no keys given and none in $here/keys" >&2; exit 2; }
fi
flwr="$(command -v flwr || true)"
[[ -z "$flwr" && -x "$root/.venv/bin/flwr" ]] && flwr="$root/.venv/bin/flwr"
[[ -n "$flwr" ]] || { echo "register-supernodes.sh: the flwr CLI is not installed" >&2; exit 1; }
python="$(dirname "$flwr")/python"
[[ -x "$python" ]] || python=python3
export FLWR_DISABLE_UPDATE_CHECK=1

if [[ -n "$superlink" ]]; then
  # A private FLWR_HOME: never touch the operator's config, never put connections in pyproject.toml.
  FLWR_HOME="$(mktemp -d)"
  export FLWR_HOME
  trap 'rm -rf "$FLWR_HOME"' EXIT
  connection="register"
  {
    echo "[superlink]"
    echo "default = \"$connection\""
    echo "[superlink.$connection]"
    echo "address = \"$superlink\""
    if [[ $insecure -eq 1 ]]; then echo "insecure = true"; else echo "root-certificates = \"$(realpath "$ca")\""; fi
  } >"$FLWR_HOME/config.toml"
fi
if [[ -z "$connection" ]]; then
  echo "register-supernodes.sh: give --superlink HOST:PORT or --connection NAME" >&2
  exit 2
fi

status=0
for key in "${keys[@]}"; do
  out="$("$flwr" supernode register "$key" "$connection" --format json 2>&1 || true)"
  # `flwr ... --format json` exits 0 on errors too: read its "success" field.
  verdict="$(printf '%s' "$out" | "$python" -c '
import json, sys
text = sys.stdin.read()
try:
    res = json.loads(text[text.index("{"):])
except ValueError:
    print("error " + text.strip().replace("\n", " ")[-300:])
    sys.exit()
if res.get("success"):
    print("ok", res["node-id"])
elif "already in use" in res.get("error-message", ""):
    print("known")
else:
    print("error " + res.get("error-message", text).replace("\n", " "))
')"
  case "$verdict" in
    ok\ *) echo "$key ${verdict#ok }" ;;
    known) echo "$key already-registered" ;;
    *) echo "register-supernodes.sh: $key: ${verdict#error }" >&2; status=1 ;;
  esac
done
exit $status
