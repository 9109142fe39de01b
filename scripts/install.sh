#!/usr/bin/env bash
# Installs everything the project and its tests need: the Debian packages the network-namespace
# fault tests use (when root and missing), then the package with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v tc >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
# xxhash.h: the page-digest extension is built against it (without it, a slower Python loop)
[ -f /usr/include/xxhash.h ] || missing+=(libxxhash-dev)
command -v gcc >/dev/null || missing+=(gcc)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "install: ${missing[*]} missing and not installable here (needs root and apt);" \
             "the namespace fault tests will skip, and pages are hashed in Python" >&2
    fi
fi

python3 -m pip install -e ".[dev,plot]"
