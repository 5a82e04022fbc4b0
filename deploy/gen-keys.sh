#!/usr/bin/env bash
# Make the SuperNodes' authentication keys: ECDSA P-384 in OpenSSH format, the type Flower 1.42 requires.
#
#   deploy/gen-keys.sh [OUT_DIR] [--supernodes N] [--force]
#
# OUT_DIR (default deploy/keys, git-ignored) receives supernode-I (private: stays on that SuperNode's host)
# and supernode-I.pub (public: registered on the SuperLink with deploy/register-supernodes.sh), I = 1..N.
# Existing keys are kept unless --force is given: a new key must be registered again.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/keys"
supernodes="${FEDSPARSE_SUPERNODES:-3}"
force=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --supernodes) supernodes="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    -*) echo "gen-keys.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
command -v ssh-keygen >/dev/null || { echo "gen-keys.sh: ssh-keygen is not installed (openssh-client)" >&2; exit 1; }
mkdir -p "$out"
for ((i = 1; i <= supernodes; i++)); do
  key="$out/supernode-$i"
  if [[ $force -eq 1 || ! -s "$key" || ! -s "$key.pub" ]]; then
    rm -f "$key" "$key.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$key"
  fi
done
# Same reasoning as gen-certs.sh: a private folder, files readable by the containers' non-root user.
chmod 644 "$out"/supernode-*
chmod 700 "$out"
echo "SuperNode keys in $out: $(cd "$out" && ls | tr '\n' ' ')"
