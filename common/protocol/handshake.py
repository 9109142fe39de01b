"""The hello: what a source offers, and the destination's checks before it allocates anything."""

from __future__ import annotations

import hmac

from common.constants import (
    GRANULE_SIZE,
    MAX_CHANNELS,
    MAX_RAM_BYTES,
    MAX_VCPUS,
    MIN_RAM_BYTES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
)
from common.guest.guest import Guest
from common.protocol.params import MigrationParameters
from common.units import format_size
from common.wire import mte_migration_pb2 as pb
from common.wire.bitmap import encode_bitmap

REQUIRED_FEATURES = frozenset({pb.FEATURE_MTE, pb.FEATURE_VERIFY})


def offered_features(use_lz4: bool) -> list[int]:
    return sorted(REQUIRED_FEATURES) + ([pb.FEATURE_LZ4] if use_lz4 else [])


def link_timeouts(params: MigrationParameters) -> pb.LinkTimeouts:
    """How long this source goes on reconnecting, as the destination is told it (in the hello,
    and again when an operator changes it)."""
    return pb.LinkTimeouts(
        reconnect_timeout_ms=min(round(params.reconnect_timeout_s * 1000), 2**32 - 1),
        postcopy_recover_timeout_ms=min(round(params.postcopy_recover_timeout_s * 1000), 2**32 - 1)
        if params.postcopy
        else 0,
    )


def source_hello(guest: Guest, params: MigrationParameters, node_name: str) -> pb.Hello:
    timeouts = link_timeouts(params)
    return pb.Hello(
        protocol_version=PROTOCOL_VERSION,
        page_size=PAGE_SIZE,
        granule_size=GRANULE_SIZE,
        ram_bytes=guest.memory.ram_bytes,
        features=offered_features(params.use_lz4)
        + ([pb.FEATURE_POSTCOPY] if params.postcopy else [])
        + ([pb.FEATURE_MULTI_CHANNEL] if params.channels > 1 else []),
        mode=pb.MODE_POSTCOPY if params.postcopy else pb.MODE_PRECOPY,
        vcpu_count=len(guest.vcpus),
        node_name=node_name,
        auth_token=params.auth_token,
        populated_hint_lz4=encode_bitmap(guest.memory.data_populated),
        reconnect_timeout_ms=timeouts.reconnect_timeout_ms,
        postcopy_recover_timeout_ms=timeouts.postcopy_recover_timeout_ms,
        channels=params.channels if params.channels > 1 else 0,
    )


def granted_channels(hello: pb.Hello) -> int:
    """How many connections the destination takes this source's batches over: what it asked
    for, up to MAX_CHANNELS; 1 without the feature."""
    if pb.FEATURE_MULTI_CHANNEL not in hello.features or hello.channels < 2:
        return 1
    return min(hello.channels, MAX_CHANNELS)


def check_hello(
    hello: pb.Hello, auth_token: bytes, max_ram_bytes: int = MAX_RAM_BYTES
) -> tuple[int, str] | None:
    """None if the destination can take this migration; else an error code and a reason.
    `max_ram_bytes`: the most this destination lets a source make it allocate."""
    if hello.protocol_version != PROTOCOL_VERSION:
        return (
            pb.ERROR_VERSION_MISMATCH,
            f"protocol version {hello.protocol_version} is not supported; this destination speaks version {PROTOCOL_VERSION}",
        )
    if auth_token and not hello.auth_token:
        return (
            pb.ERROR_UNAUTHORIZED,
            "authentication failed: this destination requires a token and the source gave none "
            "(--auth-token or $MTE_MIGRATION_TOKEN)",
        )
    if auth_token and not hmac.compare_digest(hello.auth_token, auth_token):
        return pb.ERROR_UNAUTHORIZED, "authentication failed: the source's token does not match"
    if hello.page_size != PAGE_SIZE or hello.granule_size != GRANULE_SIZE:
        return (
            pb.ERROR_GEOMETRY_MISMATCH,
            f"page size {hello.page_size} / granule {hello.granule_size} differ from {PAGE_SIZE} / {GRANULE_SIZE}",
        )
    if not MIN_RAM_BYTES <= hello.ram_bytes <= MAX_RAM_BYTES or hello.ram_bytes % PAGE_SIZE:
        return (
            pb.ERROR_GEOMETRY_MISMATCH,
            f"guest RAM of {hello.ram_bytes} bytes is outside {MIN_RAM_BYTES} .. {MAX_RAM_BYTES} or not whole pages",
        )
    if hello.ram_bytes > max_ram_bytes:
        return (
            pb.ERROR_GEOMETRY_MISMATCH,
            f"a guest of {format_size(hello.ram_bytes)} exceeds this destination's limit of "
            f"{format_size(max_ram_bytes)} (dest-node --max-ram)",
        )
    if not 1 <= hello.vcpu_count <= MAX_VCPUS:
        return pb.ERROR_GEOMETRY_MISMATCH, f"{hello.vcpu_count} vCPUs is outside 1 .. {MAX_VCPUS}"
    missing = REQUIRED_FEATURES - set(hello.features)
    if missing:
        names = ", ".join(pb.Feature.Name(f) for f in sorted(missing))
        return pb.ERROR_FEATURE_MISMATCH, f"the source does not offer required features: {names}"
    if hello.mode == pb.MODE_POSTCOPY and pb.FEATURE_POSTCOPY not in hello.features:
        return pb.ERROR_FEATURE_MISMATCH, "postcopy mode without the postcopy feature"
    if hello.mode not in (pb.MODE_PRECOPY, pb.MODE_POSTCOPY):
        return (
            pb.ERROR_FEATURE_MISMATCH,
            f"migration mode {hello.mode} is not supported by this destination",
        )
    return None
