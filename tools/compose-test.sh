#!/usr/bin/env bash
# `make compose-test`: brings envoy/docker-compose.yml up, runs the README's walk-through and the
# one `make run` prints against it (tools/walkthrough.py), takes it down, and checks that no
# container, pod, network, stand-in image or temporary folder of it is left behind.
#
# The runtime: `docker compose` where a Docker engine answers, else podman with podman-compose
# (installed into .venv by the Makefile). Podman runs with COMPOSE_PODMAN_RUNTIME (default runc
# when installed: crun fails on some kernels' cgroups) and COMPOSE_PODMAN_RUN_ARGS (default
# "--ulimit nofile=1024:20000 --ulimit nproc=1024:1024").
#
# Images are never pulled here. An image the compose file names that is not already local is
# built as a stand-in, under the same name, from files on disk, and removed afterwards:
#   docker.io/envoyproxy/envoy:v1.40.0      the Envoy binary `make envoy` installed, and its shared libraries
#   docker.io/library/debian:bookworm-slim  the shared libraries target/release/breakwater-upstream needs
#
# `tools/compose-test.sh --check` only says whether a container runtime works here (exit 0 or 1).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
project=breakwater-compose-test
compose_file=envoy/docker-compose.yml
run_args=${COMPOSE_PODMAN_RUN_ARGS:---ulimit nofile=1024:20000 --ulimit nproc=1024:1024}
podman_runtime=${COMPOSE_PODMAN_RUNTIME:-$(command -v runc >/dev/null && echo runc || true)}

say() { echo "compose-test: $*"; }

# Copies a dynamically linked binary to $root$dest, with the shared libraries it loads.
with_libs() {
  local bin=$1 dest=$2 root=$3 lib
  install -D -m 755 "$bin" "$root$dest"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    install -D -m 755 "$(readlink -f "$lib")" "$root$lib"
  done
}

podman_cmd() { podman ${podman_runtime:+--runtime "$podman_runtime"} "$@"; }

# Whether podman can run a container here: a throw-away root holding /bin/true.
podman_works() {
  local dir
  command -v podman >/dev/null || return 1
  dir=$(mktemp -d -t breakwater-podman-check.XXXXXX)
  with_libs "$(type -P true)" /bin/true "$dir/root"
  # shellcheck disable=SC2086
  podman_cmd run --rm --network none $run_args --rootfs "$dir/root" /bin/true >/dev/null 2>&1
  local ok=$?
  rm -rf "$dir"
  return $ok
}

docker_works() { command -v docker >/dev/null && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; }

if docker_works; then
  engine=docker
elif podman_works; then
  engine=podman
else
  engine=
fi
if [ "${1:-}" = --check ]; then
  if [ -n "$engine" ]; then say "container runtime: $engine"; exit 0; fi
  say "no working container runtime (a Docker engine with compose, or podman)"; exit 1
fi
[ -n "$engine" ] || { say "no working container runtime: install podman (Debian: apt-get install podman runc) or Docker"; exit 1; }

compose() {
  if [ "$engine" = docker ]; then
    docker compose -p "$project" -f "$compose_file" "$@"
  else
    "$(dirname "$python")/podman-compose" -p "$project" -f "$compose_file" --in-pod false \
      ${podman_runtime:+--podman-args="--runtime $podman_runtime"} --podman-run-args="$run_args --pull never" "$@"
  fi
}
image_exists() { if [ "$engine" = docker ]; then docker image inspect "$1" >/dev/null 2>&1; else podman image exists "$1"; fi; }

tmp=$(mktemp -d -t breakwater-compose.XXXXXX)
built=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ "$status" != 0 ] && [ -n "${up:-}" ]; then compose logs 2>&1 | tail -40 || true; fi
  compose down >/dev/null 2>&1 || true
  # Whatever compose left (an interrupted `up`, say): by the project label, never by a broad name.
  local label="label=com.docker.compose.project=$project" ids
  if [ "$engine" = podman ]; then
    ids=$(podman ps -aq --filter "$label"); [ -z "$ids" ] || podman rm -f $ids >/dev/null
    ids=$(podman pod ps -q --filter "name=^pod_$project\$"); [ -z "$ids" ] || podman pod rm -f $ids >/dev/null
    ids=$(podman network ls -q --filter "$label"); [ -z "$ids" ] || podman network rm $ids >/dev/null
  else
    ids=$(docker ps -aq --filter "$label"); [ -z "$ids" ] || docker rm -f $ids >/dev/null
    ids=$(docker network ls -q --filter "$label"); [ -z "$ids" ] || docker network rm $ids >/dev/null
  fi
  for image in "${built[@]}"; do $engine rmi -f "$image" >/dev/null 2>&1 || true; done
  rm -rf "$tmp"
  local left
  left=$($engine ps -aq --filter "$label"; $engine network ls -q --filter "$label"; \
    for image in "${built[@]}"; do if image_exists "$image"; then echo "$image"; fi; done)
  if [ -n "$left" ]; then say "left behind: $left"; status=1; else say "taken down; nothing left behind"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in 10000 9901 8081; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    say "port $port is in use (make run?); the compose demo uses host networking"; exit 1
  fi
done
envoy_bin=${ENVOY_BIN:?set ENVOY_BIN to the Envoy binary (make compose-test does)}

# Stand-ins for the images that are not here, built from files on disk.
for image in $("$python" -c 'import sys, yaml; print(" ".join(s["image"] for s in yaml.safe_load(open(sys.argv[1]))["services"].values()))' "$compose_file"); do
  if image_exists "$image"; then say "image $image: present"; continue; fi
  ctx="$tmp/$(echo "$image" | tr '/:' '__')"
  case "$image" in
    docker.io/envoyproxy/envoy:v1.40.0) with_libs "$envoy_bin" /usr/local/bin/envoy "$ctx/root"; from="$envoy_bin" ;;
    docker.io/library/debian:bookworm-slim) with_libs target/release/breakwater-upstream /tmp/libs-of-the-upstream "$ctx/root"
      rm "$ctx/root/tmp/libs-of-the-upstream"; from="the shared libraries of target/release/breakwater-upstream" ;;
    *) say "image $image is not here, and this test pulls nothing"; exit 1 ;;
  esac
  printf 'FROM scratch\nCOPY root/ /\nENV PATH=/usr/local/bin:/usr/bin:/bin\nLABEL org.breakwater.stand-in="%s"\n' "$from" >"$ctx/Containerfile"
  $engine build -q -t "$image" -f "$ctx/Containerfile" "$ctx" >/dev/null
  built+=("$image")
  say "image $image: not here and not pulled; built a STAND-IN under that name from $from"
done

say "up ($engine${podman_runtime:+, runtime $podman_runtime})"
up=1
compose up -d >/dev/null
for _ in $(seq 150); do
  curl -fs localhost:9901/ready >/dev/null 2>&1 && curl -fs -o /dev/null localhost:8081/ 2>/dev/null && break
  sleep 0.2
done
curl -fs localhost:9901/ready >/dev/null || { say "Envoy did not become ready"; exit 1; }
"$python" tools/walkthrough.py readme demo
