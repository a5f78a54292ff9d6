#!/bin/sh
# pip install into the image's venv, for proxied and air-gapped builds. Used by every
# Dockerfile here as: RUN --mount=type=secret,id=ca sh /opt/build/pip-install.sh ARGS...
#
# - PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS come from build args; an empty one is
#   unset (pip would read "" as a URL or path and fail).
# - A CA bundle passed as the build secret `ca` (podman/docker build --secret id=ca,src=FILE)
#   replaces pip's own bundle: give the full bundle your proxy or mirror needs (for example the
#   host's /etc/ssl/certs/ca-certificates.crt). It is never a build arg, so it never lands in a
#   layer or in the image history.
set -eu
for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS; do
    eval "value=\${$name:-}"
    if [ -z "$value" ]; then unset "$name"; else export "$name"; fi
done
if [ -s /run/secrets/ca ]; then
    export PIP_CERT=/run/secrets/ca
fi
exec "${VENV:-/opt/venv}/bin/python" -m pip install --no-cache-dir --disable-pip-version-check \
    --no-input "$@"
