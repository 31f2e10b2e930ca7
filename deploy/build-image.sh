#!/usr/bin/env bash
# Builds the shoal container image from the local source tree, without any network access:
#   1. compiles a statically linked `shoal` (glibc, +crt-static) for x86_64-unknown-linux-gnu;
#   2. stages it with the build host's CA bundle and an nsswitch.conf in target/image/;
#   3. `docker build`s deploy/Dockerfile (FROM scratch: no base image is pulled);
#   4. creates deploy/secrets/ for deploy/docker-compose.yml when missing (never overwritten: the
#      nodes must keep their CA): the cluster CA (ca/), one --cluster-tls directory per node
#      (shoal-1..5/: node certificate and key, CA certificate, gossip key) and admin.token.
#
# Usage: deploy/build-image.sh
# Environment:
#   IMAGE=shoal:latest      tag of the image
#   SHOAL_BIN=path          use this static binary instead of building one (e.g. in CI, built once)
#   CA_BUNDLE=path          CA certificates to copy in (default /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-shoal:latest}
target=x86_64-unknown-linux-gnu
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
t0=$(date +%s)

if [[ -n ${SHOAL_BIN:-} ]]; then
    bin=$SHOAL_BIN
    echo "using $bin"
else
    echo "building a static shoal (release, $target)"
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$target" -p shoal-node --bin shoal
    bin=target/$target/release/shoal
fi

# A scratch image has no dynamic loader: refuse a binary that needs one.
if ! ldd "$bin" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
    echo "error: $bin is not statically linked:" >&2
    ldd "$bin" >&2 || true
    exit 1
fi
if [[ ! -s $ca_bundle ]]; then
    echo "error: no CA bundle at $ca_bundle (set CA_BUNDLE)" >&2
    exit 1
fi

context=target/image
rm -rf "$context"
mkdir -p "$context"
cp "$bin" "$context/shoal"
strip "$context/shoal" 2>/dev/null || true
cp "$ca_bundle" "$context/ca-certificates.crt"
# glibc's resolver in a static binary reads this to resolve --join names and GATEWAY_LIST hosts
# from /etc/hosts and Docker's DNS.
printf 'hosts: files dns\nnetworks: files\n' > "$context/nsswitch.conf"

echo "docker build -t $image"
docker build --quiet -t "$image" -f deploy/Dockerfile "$context"

# Shared secrets of the compose cluster (mounted read-only into every node).
secrets=deploy/secrets
mkdir -p "$secrets"
chmod 700 "$secrets"
if [[ ! -s $secrets/ca/ca.key ]]; then
    "$bin" cert ca --cluster shoal --out "$secrets/ca" >/dev/null
    echo "created the cluster CA in $secrets/ca"
fi
# shoal-4 and shoal-5 are the compose profile "grow" (scenarios: a cluster grown to five).
for node in shoal-1 shoal-2 shoal-3 shoal-4 shoal-5; do
    if [[ ! -s $secrets/$node/node.key ]]; then
        "$bin" cert node --ca "$secrets/ca" --id "$node" --out "$secrets/$node" >/dev/null
        echo "created $secrets/$node (certificate of node $node)"
    fi
done
if [[ ! -s $secrets/admin.token ]]; then
    (umask 077 && od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' > "$secrets/admin.token")
    echo "created $secrets/admin.token"
fi

size=$(docker image inspect --format '{{.Size}}' "$image")
echo "built $image ($(( size / 1024 / 1024 )) MiB) in $(( $(date +%s) - t0 ))s"
