#!/usr/bin/env bash
# Builds shoal-prometheus:latest, the Prometheus of deploy/docker-compose.yml's "monitoring"
# profile, from Debian's `prometheus` package, without pulling any image (no registry is
# reachable from the machines this runs on), the way build-image.sh builds the shoal image:
#   1. takes /usr/bin/prometheus (installs the package with apt-get when it is missing);
#   2. stages it in target/prometheus-image/rootfs/ with every shared library and the dynamic
#      loader `ldd` lists (Debian builds it with cgo, so it needs glibc), an nsswitch.conf, and
#      deploy/prometheus/{prometheus.yml,alerts.yml} as its default configuration;
#   3. checks the staged tree runs on its own (chroot, when root) and `docker build`s
#      deploy/prometheus/Dockerfile (FROM scratch).
#
# Usage: deploy/build-prometheus-image.sh
# Environment:
#   IMAGE=shoal-prometheus:latest   tag of the image
#   PROMETHEUS_BIN=path             the prometheus binary to package (default /usr/bin/prometheus)
#   NO_DOCKER=1                     stage and check only (no docker build)
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-shoal-prometheus:latest}
bin=${PROMETHEUS_BIN:-/usr/bin/prometheus}
t0=$(date +%s)

if [[ ! -x $bin && -z ${PROMETHEUS_BIN:-} ]]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing Debian's prometheus package (apt)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq prometheus >/dev/null
fi
if [[ ! -x $bin ]]; then
    echo "error: no prometheus binary at $bin" >&2
    exit 1
fi

context=target/prometheus-image
rootfs=$context/rootfs
rm -rf "$context"
mkdir -p "$rootfs/bin" "$rootfs/etc/prometheus" "$rootfs/prometheus"
cp "$bin" "$rootfs/bin/prometheus"

# Libraries and loader: every absolute path in ldd's output, copied (symlinks resolved) to the
# same path inside the image. A static binary has none.
if ldd "$bin" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
    echo "$bin is statically linked"
else
    libs=$(ldd "$bin" | grep -Eo '/[^ ]+' | sort -u)
    for lib in $libs; do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done
    echo "$bin is dynamically linked: copied $(echo "$libs" | wc -w) libraries and loader:" $libs
fi

# Go's cgo resolver reads this (targets are IP addresses, but a name in a config must resolve).
printf 'hosts: files dns\nnetworks: files\n' > "$rootfs/etc/nsswitch.conf"
cp deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml "$rootfs/etc/prometheus/"

# The staged tree must run alone: what would fail inside the image fails here, with a reason.
if [ "$(id -u)" = 0 ] && command -v chroot >/dev/null; then
    chroot "$rootfs" /bin/prometheus --version >/dev/null
    echo "staged prometheus runs in a chroot of $rootfs"
fi
if command -v promtool >/dev/null; then
    promtool check config "$rootfs/etc/prometheus/prometheus.yml" >/dev/null
fi

if [[ -n ${NO_DOCKER:-} ]]; then
    echo "staged in $rootfs (NO_DOCKER: no image built)"
    exit 0
fi
cp deploy/prometheus/Dockerfile "$context/Dockerfile"
echo "docker build -t $image"
docker build --quiet -t "$image" -f "$context/Dockerfile" "$context"
size=$(docker image inspect --format '{{.Size}}' "$image")
echo "built $image ($(( size / 1024 / 1024 )) MiB) in $(( $(date +%s) - t0 ))s"
