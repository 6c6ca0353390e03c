#!/usr/bin/env bash
# `make image`: the OCI image Istio's WasmPlugin pulls (FROM scratch, /plugin.wasm; see
# envoy/istio/Dockerfile), built with docker (if its engine answers), podman or buildah, and
# checked to hold plugin.wasm alone, byte for byte the built plugin.
set -euo pipefail
image=${1:?usage: tools/image.sh IMAGE}
wasm=target/wasm32-wasip1/release/breakwater.wasm
cd "$(dirname "$0")/.."
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then tool=docker build=(docker build)
elif command -v podman >/dev/null; then tool=podman build=(podman build)
elif command -v buildah >/dev/null; then tool=buildah build=(buildah bud)
else echo "make image: needs docker (with a running engine), podman or buildah"; exit 1; fi
"${build[@]}" -q -f envoy/istio/Dockerfile -t "$image" . >/dev/null

# What is in the image: save it and read its one layer.
tmp=$(mktemp -d -t breakwater-image.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if [ "$tool" = buildah ]; then buildah push -q "$image" "oci-archive:$tmp/image.tar" >/dev/null
else $tool save -q -o "$tmp/image.tar" "$image" >/dev/null; fi
mkdir "$tmp/x" && tar -xf "$tmp/image.tar" -C "$tmp/x"
layers=$(find "$tmp/x" -type f -size +1k -exec sh -c 'tar -tf "$1" >/dev/null 2>&1 && echo "$1"' _ {} \;)
[ "$(echo "$layers" | wc -l)" = 1 ] || { echo "make image: expected one layer, found: $layers"; exit 1; }
files=$(tar -tf "$layers" | grep -v '/$')
[ "$files" = plugin.wasm ] || { echo "make image: the layer holds more than plugin.wasm: $files"; exit 1; }
tar -xf "$layers" -C "$tmp" plugin.wasm
cmp -s "$tmp/plugin.wasm" "$wasm" || { echo "make image: plugin.wasm differs from $wasm"; exit 1; }
echo "built $image with $tool: one layer holding plugin.wasm ($(stat -c %s "$wasm") bytes, the plugin as built)"
echo "push it to any OCI registry:  $tool push $image    then set the WasmPlugin's url to oci://$image"
