#!/usr/bin/env bash
# Build the fedsparse image with podman and run the compose stack (edge proxy, SuperLink, 3 SuperNodes, their
# SuperExecs) through a 2-round SSFL run with TLS and SuperNode authentication. For machines that cannot pull
# python:3.11-slim: the base image is made from Debian's packages (debootstrap), and pip reads this machine's
# local indexes and CA bundle through build volumes.
#
#   deploy/podman-check.sh [--workdir DIR] [--keep] [--rebuild] [--stage base|build|up|run|all]
#
# Stages (each needs the ones before; --stage X runs only up to X, `all` is the default):
#   base   localhost/fedsparse-base:bookworm: debootstrap bookworm (python3.11, python3-venv, nginx-light), a venv
#          in /opt/venv first on PATH, `podman import` (skipped when the image exists)
#   build  localhost/fedsparse:0.1.0 from the Dockerfile with BASE_IMAGE=the base, TORCH_INDEX_URL empty (skipped
#          when the image exists, unless --rebuild)
#   up     certificates and node keys in WORKDIR; podman-compose up: superlink + edge, register the 3 node keys
#          through the edge's operator port, then the SuperExecs and SuperNodes (which dial edge:8443)
#   run    `flwr run` through the operator port (2 rounds, digits, 3 clients); waits for finished:completed;
#          `flwr run` through the public port must be refused
# Prints the seconds of every stage. Leaves the stack running with --keep, else `podman-compose down`.
#
# This machine's quirks (all handled here, each overridable):
#   - podman's default rlimits (nofile 1048576) exceed the hard limits a nested container may set, and crun
#     cannot use its hybrid cgroup layout: a containers.conf (CONTAINERS_CONF) with the host's limits and runc.
#   - pip: PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS / PIP_CERT are taken from `pip config list` of the host, and the
#     folders they name are mounted read-only into the build (torch comes from a local index here).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
workdir="${TMPDIR:-/tmp}/fedsparse-podman-check"
keep=0
rebuild=0
stage=all
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir) workdir="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --rebuild) rebuild=1; shift ;;
    --stage) stage="$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "podman-check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$stage" in base|build|up|run|all) ;; *) echo "podman-check.sh: unknown stage $stage" >&2; exit 2 ;; esac
for tool in podman podman-compose; do
  command -v "$tool" >/dev/null || { echo "podman-check.sh: $tool is not installed" >&2; exit 3; }
done
mkdir -p "$workdir"
workdir="$(cd "$workdir" && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
flwr="$(dirname "$python")/flwr"
base_image="${FEDSPARSE_BASE_IMAGE:-localhost/fedsparse-base:bookworm}"
image="localhost/fedsparse:${FEDSPARSE_VERSION:-0.1.0}"
project="${COMPOSE_PROJECT:-fedsparse-check}"
t_start=$SECONDS
stamp() { echo "[podman-check] $(( SECONDS - t_start ))s  $*" >&2; }
reached() {  # reached STAGE: true when the requested stage is STAGE or later
  local order=(base build up run all) i j
  for i in "${!order[@]}"; do [[ ${order[$i]} == "$1" ]] && break; done
  for j in "${!order[@]}"; do [[ ${order[$j]} == "$stage" ]] && break; done
  [[ $j -ge $i ]]
}

if [[ -z "${CONTAINERS_CONF:-}" ]]; then
  export CONTAINERS_CONF="$workdir/containers.conf"
  cat > "$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=8192:8192"]
[engine]
runtime = "${PODMAN_RUNTIME:-runc}"
EOF
fi

# ---------------------------------------------------------------------------------------------- base
if reached base; then
  if podman image exists "$base_image"; then
    stamp "base image $base_image exists"
  else
    command -v debootstrap >/dev/null || { echo "podman-check.sh: debootstrap is not installed" >&2; exit 3; }
    t=$SECONDS
    rm -rf "$workdir/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,passwd,ca-certificates,nginx-light \
      bookworm "$workdir/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$workdir/debootstrap.log"
    chroot "$workdir/rootfs" python3 -m venv /opt/venv
    tar -C "$workdir/rootfs" -c . | podman import \
      --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' - "$base_image" > /dev/null
    rm -rf "$workdir/rootfs"
    stamp "base image $base_image built in $(( SECONDS - t ))s"
  fi
fi

# ---------------------------------------------------------------------------------------------- build
if reached build && [[ $rebuild -eq 0 ]] && podman image exists "$image"; then
  stamp "image $image exists (--rebuild builds it again)"
elif reached build; then
  t=$SECONDS
  pip_value() { "$python" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | tail -1; }
  extra_index="${PIP_EXTRA_INDEX_URL:-$(pip_value extra-index-url)}"
  find_links="${PIP_FIND_LINKS:-$(pip_value find-links)}"
  cert="${PIP_CERT:-$(pip_value cert)}"
  build_args=(--build-arg "BASE_IMAGE=$base_image" --build-arg "TORCH_INDEX_URL=")
  volumes=()
  for url in $extra_index; do
    dir="${url#file://}"
    [[ "$url" == file://* && -d "$dir" ]] && volumes+=(--volume "$(dirname "$dir"):$(dirname "$dir"):ro")
  done
  [[ -n "$extra_index" ]] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra_index")
  for dir in $find_links; do
    [[ -d "$dir" ]] && volumes+=(--volume "$dir:$dir:ro")
  done
  [[ -n "$find_links" ]] && build_args+=(--build-arg "PIP_FIND_LINKS=$find_links")
  if [[ -n "$cert" && -f "$cert" ]]; then
    volumes+=(--volume "$cert:/run/host-ca-bundle.crt:ro")
    build_args+=(--build-arg "PIP_CERT=/run/host-ca-bundle.crt")
  fi
  stamp "podman build $image ${build_args[*]} ${volumes[*]}"
  podman build --tag "$image" --file "$root/Dockerfile" "${build_args[@]}" "${volumes[@]}" "$root" \
    > "$workdir/build.log" 2>&1 || { tail -40 "$workdir/build.log" >&2; exit 1; }
  stamp "image $image built in $(( SECONDS - t ))s ($(podman image inspect "$image" --format '{{.Size}}') bytes)"
  podman run --rm "$image" python -c "import flwr, torch, fedsparse; print('flwr', flwr.__version__, 'torch', \
torch.__version__)" >&2
fi

# ---------------------------------------------------------------------------------------------- up
compose() {
  FEDSPARSE_CERTS="$workdir/certs" FEDSPARSE_KEYS="$workdir/keys" \
  FEDSPARSE_EDGE_IMAGE="$base_image" EDGE_PUBLIC_BIND=127.0.0.1 EDGE_PUBLIC_PORT="$public_port" \
  EDGE_OPERATOR_PORT="$operator_port" \
  FEDSPARSE_DATA_HOST="${FEDSPARSE_DATA_HOST:-$(dirname "$root")/shared/data}" \
    podman-compose --project-name "$project" --file "$root/docker-compose.yml" "$@"
}
free_port() { "$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
public_port="${EDGE_PUBLIC_PORT:-$(free_port)}"
operator_port="${EDGE_OPERATOR_PORT:-$(free_port)}"
cleanup() {
  if [[ $keep -eq 0 ]] && reached up; then
    compose down --volumes > "$workdir/down.log" 2>&1 || true
  fi
}
trap cleanup EXIT

if reached up; then
  t=$SECONDS
  bash "$here/gen-certs.sh" "$workdir/certs" --supernodes 3 > /dev/null
  bash "$here/gen-keys.sh" "$workdir/keys" --supernodes 3 > /dev/null
  # Compose mounts the files with their host permissions; the containers run as UID 49999.
  chmod 0755 "$workdir/certs" "$workdir/keys"
  chmod 0644 "$workdir"/certs/*.crt "$workdir"/certs/*.key "$workdir"/certs/superexec.secret "$workdir"/keys/*
  rm -f "$workdir/certs/ca.key"  # nothing in the stack signs certificates
  compose up -d --no-build superlink edge > "$workdir/up.log" 2>&1 || { tail -40 "$workdir/up.log" >&2; exit 1; }
  for _ in $(seq 1 60); do
    (exec 3<>"/dev/tcp/127.0.0.1/$operator_port") 2>/dev/null && break
    sleep 2
  done
  sleep 5
  PATH="$(dirname "$python"):$PATH" bash "$here/register-supernodes.sh" --superlink "127.0.0.1:$operator_port" \
    --ca "$workdir/certs/ca.crt" "$workdir"/keys/supernode-*.pub
  compose up -d --no-build superexec-serverapp supernode-1 superexec-clientapp-1 supernode-2 superexec-clientapp-2 \
    supernode-3 superexec-clientapp-3 >> "$workdir/up.log" 2>&1 || { tail -40 "$workdir/up.log" >&2; exit 1; }
  stamp "stack up in $(( SECONDS - t ))s: public (Fleet) 127.0.0.1:$public_port, operator (Control) 127.0.0.1:$operator_port"
fi

# ---------------------------------------------------------------------------------------------- run
if reached run; then
  t=$SECONDS
  cli="$workdir/cli"
  mkdir -p "$cli"
  cat > "$cli/config.toml" <<EOF
[superlink]
default = "operator"

[superlink.operator]
address = "127.0.0.1:$operator_port"
root-certificates = "$workdir/certs/ca.crt"

[superlink.public]
address = "127.0.0.1:$public_port"
root-certificates = "$workdir/certs/ca.crt"
EOF
  run_config='strategy="ssfl" dataset="digits" num-clients=3 min-clients=3 num-rounds=2 local-epochs=1 round-timeout=300.0 output-dir="/results/podman-check"'
  refused="$(FLWR_HOME="$cli" "$flwr" run "$root" public --run-config "$run_config" --format json 2>&1 || true)"
  if grep -q '"success": true' <<<"$refused"; then
    echo "podman-check.sh: flwr run through the PUBLIC port was accepted: $refused" >&2
    exit 1
  fi
  stamp "flwr run through the public port refused"
  out="$(FLWR_HOME="$cli" "$flwr" run "$root" operator --run-config "$run_config" --format json)"
  run_id="$("$python" -c "import json, sys; print(json.loads(sys.argv[1][sys.argv[1].index('{'):])['run-id'])" "$out")"
  stamp "run $run_id submitted through the operator port"
  status=""
  for _ in $(seq 1 180); do
    status="$(FLWR_HOME="$cli" "$flwr" ls operator --run-id "$run_id" --format json \
      | "$python" -c "import json, sys; t = sys.stdin.read(); print(json.loads(t[t.index('{'):])['runs'][0]['status'])")"
    [[ "$status" == finished* ]] && break
    sleep 10
  done
  FLWR_HOME="$cli" "$flwr" log "$run_id" operator --show > "$workdir/run-$run_id.log" 2>&1 || true
  stamp "run $run_id: $status after $(( SECONDS - t ))s (ServerApp log: $workdir/run-$run_id.log)"
  [[ "$status" == "finished:completed" ]] || exit 1
  podman exec "${project}_superexec-serverapp_1" cat /results/podman-check/summary.json \
    > "$workdir/summary.json" 2>/dev/null || true
  stamp "summary: $workdir/summary.json"
fi
stamp "done"
