#!/usr/bin/env bash
# Make a private CA and the TLS certificates of a fedsparse deployment with openssl (ECDSA P-256 keys: as strong
# as RSA-3072 and generated in milliseconds, which matters for the tests that make a CA per run).
#
#   deploy/gen-certs.sh [OUT_DIR] [--supernodes N] [--force]
#
# OUT_DIR (default deploy/certs, git-ignored) receives:
#   ca.crt, ca.key            the CA: ca.crt goes to every host (SuperNodes, SuperExecs, the flwr CLI);
#                             ca.key stays where certificates are signed (never mount it in a container)
#   superlink.crt/.key        the SuperLink's certificate (Fleet, Control and Runtime API on one port)
#   supernode-I.crt/.key      each SuperNode's Runtime API certificate, I = 1..N (the ClientApp SuperExec
#                             dials it in docker compose, where SuperNode and SuperExec are separate containers)
#   superexec.secret          shared secret between a SuperLink/SuperNode and its SuperExecs (Flower's
#                             --superexec-auth-secret-file): only holders may pull ServerApp/ClientApp tasks
#                             from the Runtime API, which shares the SuperLink's public port
#
# SANs: the SuperLink certificate (the edge proxy presents it too) is valid for DNS:superlink and DNS:edge
# (compose service names), DNS:localhost and IP:127.0.0.1, plus whatever SUPERLINK_SANS adds for a multi-host
# setup, e.g.
#   SUPERLINK_SANS="DNS:fl.example.org,IP:10.0.0.5" deploy/gen-certs.sh
# A client checks the name it dialled against the SAN list, so every address a SuperNode, SuperExec or the
# flwr CLI uses to reach the SuperLink must be listed.
#
# Existing files are kept (so a running deployment is not invalidated) unless --force is given.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/certs"
supernodes="${FEDSPARSE_SUPERNODES:-3}"
force=0
days="${CERT_DAYS:-365}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --supernodes) supernodes="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "gen-certs.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
command -v openssl >/dev/null || { echo "gen-certs.sh: openssl is not installed" >&2; exit 1; }
mkdir -p "$out"
cd "$out"

if [[ $force -eq 1 || ! -s ca.crt || ! -s ca.key ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes -days "$days" \
    -subj "/CN=fedsparse-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout ca.key -out ca.crt 2>/dev/null
  force=1  # a new CA invalidates every certificate it signed before
fi

# sign NAME SANS: a server certificate NAME.crt/NAME.key signed by the CA, with the given subjectAltName.
sign() {
  local name="$1" sans="$2"
  if [[ $force -eq 0 && -s "$name.crt" && -s "$name.key" ]]; then
    return
  fi
  local ext
  ext="$(mktemp)"
  printf '%s\n' "subjectAltName=$sans" "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" >"$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes -subj "/CN=$name" \
    -keyout "$name.key" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 \
    -extfile "$ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$ext"
}

sign superlink "DNS:superlink,DNS:edge,DNS:localhost,IP:127.0.0.1${SUPERLINK_SANS:+,$SUPERLINK_SANS}"
for ((i = 1; i <= supernodes; i++)); do
  sign "supernode-$i" "DNS:supernode-$i,DNS:localhost,IP:127.0.0.1"
done
if [[ $force -eq 1 || ! -s superexec.secret ]]; then
  openssl rand -hex 32 | tr -d '\n' >superexec.secret
fi
rm -f ca.srl
# Compose bind-mounts each secret file with its host permissions, and the containers run as a non-root user
# whose UID need not match yours: the files are world-readable, and the folder (which a bind mount of a single
# file does not expose) is private to you. ca.key is never mounted.
chmod 644 ./*.crt ./*.key superexec.secret
chmod 600 ca.key
chmod 700 .
echo "certificates in $out: $(ls | tr '\n' ' ')"
