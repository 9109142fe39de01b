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
# the QEMU round trip (tests/test_e2e_qemu.py): QEMU 7.2, and a cross compiler for the guest's check
command -v qemu-system-aarch64 >/dev/null || missing+=(qemu-system-arm)
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "install: ${missing[*]} missing and not installable here (needs root and apt);" \
             "the namespace fault tests and the QEMU round trip will skip, and pages are hashed in Python" >&2
    fi
fi

# An arm64 Linux kernel with CONFIG_ARM64_MTE for the QEMU guest: Debian's, unpacked from its
# package (about 60 MB) into /opt/mte-guest/kernel, where scripts/qemu_guest.py looks for it.
kernel_dir=/opt/mte-guest/kernel
fetch_kernel() {
    dpkg --add-architecture arm64 &&
    apt-get update -qq &&
    package=$(apt-cache depends linux-image-arm64:arm64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') &&
    [ -n "$package" ] &&
    work=$(mktemp -d) &&
    chmod 777 "$work" &&  # apt downloads as _apt where it can write
    (cd "$work" && apt-get download -qq "$package" && dpkg-deb -x ./*.deb root) &&
    mkdir -p "$kernel_dir" &&
    cp "$work"/root/boot/vmlinuz-* "$kernel_dir"/ &&
    rm -rf "$work"
}
if ! ls "$kernel_dir"/vmlinuz-* >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        # not fatal: without the kernel only the QEMU round-trip tests skip
        fetch_kernel || echo "install: could not fetch Debian's arm64 kernel; the QEMU round-trip tests will skip" >&2
    else
        echo "install: no arm64 kernel in $kernel_dir and not installable here (needs root and apt);" \
             "the QEMU round-trip tests will skip" >&2
    fi
fi

if python3 -c 'import sys; sys.exit(0 if sys.prefix == sys.base_prefix else 1)'; then
    # said, not refused: CI installs into its own throwaway Python on purpose
    echo "install: no virtual environment is active: installing into $(python3 -c 'import sys; print(sys.prefix)')" \
         "(this Python's own packages); to keep the project apart, run 'python3 -m venv .venv && . .venv/bin/activate' first" >&2
fi
python3 -m pip install -e ".[dev,plot]"
