#!/bin/sh
# Build a Python base image locally, for machines that cannot pull from a registry:
#
#   sh docker/local-base.sh [IMAGE]        (default localhost/mmjobs-base:py311)
#   make images BASE_IMAGE=localhost/mmjobs-base:py311 ...
#
# debootstrap writes a Debian bookworm minbase with python3 (3.11), python3-venv and
# ca-certificates into a temporary directory (~275 MB, needs root and a Debian mirror), which is
# imported as IMAGE. Does nothing if IMAGE already exists. Environment: PODMAN (the podman
# command with its global flags, default "podman"), DEBIAN_MIRROR (default debootstrap's).
# Only for local builds and tests: production images use the Dockerfiles' BASE_IMAGE defaults.
set -eu
image="${1:-localhost/mmjobs-base:py311}"
podman_cmd="${PODMAN:-podman}"
if $podman_cmd image exists "$image"; then
    echo "local-base: $image exists"
    exit 0
fi
command -v debootstrap >/dev/null 2>&1 || {
    echo "local-base: debootstrap not installed (apt-get install debootstrap)" >&2
    exit 3
}
rootfs="$(mktemp -d "${TMPDIR:-/tmp}/mmjobs-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT
echo "local-base: debootstrap bookworm into $rootfs"
# shellcheck disable=SC2086  # DEBIAN_MIRROR is optional: empty means debootstrap's default
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" ${DEBIAN_MIRROR:-} >"$rootfs.log" 2>&1 || {
    echo "local-base: debootstrap failed; last lines of its log:" >&2
    tail -n 20 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    exit 4
}
rm -f "$rootfs.log"
# apt lists and caches are not needed at run time.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | $podman_cmd import \
    --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$image"
echo "local-base: imported $image"
