"""source-node's guest and migration flags, and what they make: the workload's configuration
and the migration's parameters (the demo takes the same flags)."""

from __future__ import annotations

import argparse
import os

from common.cli_types import (
    endpoint,
    non_negative,
    positive,
    positive_size,
    rounds_or_never,
    size,
)
from common.constants import (
    HEARTBEAT_INTERVAL_S,
    MAX_CHANNELS,
    MAX_RAM_BYTES,
    PEER_DEAD_AFTER_S,
    RECONNECT_TIMEOUT_S,
)
from common.guest.dirtylog import DirtyModel
from common.guest.workload import Fill, WorkloadConfig
from common.protocol.params import MigrationParameters
from common.units import parse_size


def add_guest_arguments(parser: argparse.ArgumentParser) -> None:
    guest = parser.add_argument_group("guest")
    guest.add_argument(
        "--ram",
        type=size,
        default=parse_size("64MiB"),
        metavar="SIZE",
        help="guest RAM, 1MiB .. 16GiB (default 64MiB)",
    )
    guest.add_argument(
        "--seed", type=non_negative(int), default=1, metavar="N", help="workload seed (default 1)"
    )
    guest.add_argument(
        "--fill",
        choices=[f.value for f in Fill],
        default=Fill.MIXED.value,
        help="initial RAM content (default mixed)",
    )
    guest.add_argument(
        "--working-set",
        type=size,
        default=parse_size("4MiB"),
        metavar="SIZE",
        help="memory the workload touches (default 4MiB)",
    )
    guest.add_argument(
        "--dirty-pages-per-step",
        type=non_negative(int),
        default=16,
        metavar="N",
        help="pages written or retagged per step (default 16)",
    )
    guest.add_argument(
        "--tag-only-share",
        type=non_negative(float),
        default=0.25,
        metavar="SHARE",
        help="share of steps that only retag, 0..1 (default 0.25)",
    )
    guest.add_argument(
        "--steps-per-second",
        type=non_negative(float),
        default=0.0,
        metavar="N",
        help="workload pace in steps per second; 0 = as fast as it can (default 0)",
    )
    guest.add_argument(
        "--from-qemu",
        metavar="FILE",
        help="migrate the guest a QEMU migration stream holds (a stopped virt,mte=on guest saved with "
        'migrate "exec:cat > FILE") instead of booting one: its RAM and tag blocks travel as pages and '
        "tags, the rest whole; it does not execute here (dest-node --to-qemu hands it back to QEMU)",
    )
    guest.add_argument(
        "--max-ram",
        type=positive_size,
        default=MAX_RAM_BYTES,
        metavar="SIZE",
        help="--from-qemu: refuse a stream with a RAM block larger than this (default 16 GiB)",
    )
    guest.add_argument(
        "--device-period",
        type=non_negative(int),
        default=8,
        metavar="N",
        help="a virtio-like device writes one page of guest RAM from the host side every N steps; "
        "0 = no device (default 8)",
    )
    guest.add_argument(
        "--stop-at-step",
        type=non_negative(int),
        default=None,
        metavar="N",
        help="stop the workload at this step (default: run until interrupted)",
    )


def add_migration_arguments(parser: argparse.ArgumentParser) -> None:
    mig = parser.add_argument_group("migration")
    mig.add_argument(
        "--migrate-to",
        type=endpoint("--migrate-to"),
        metavar="URI",
        help="migrate to a dest-node listening here (tcp://HOST:PORT); exit once it completed, or after "
        "a failure once the guest, still running here, stops (--stop-at-step or a signal)",
    )
    mig.add_argument(
        "--mode",
        choices=["precopy", "postcopy"],
        default="precopy",
        help="precopy: the guest runs here until everything is there; postcopy: the destination runs "
        "it after --postcopy-after-rounds and pulls the pages it touches (default precopy)",
    )
    mig.add_argument(
        "--postcopy-after-rounds",
        type=rounds_or_never,
        default=1,
        metavar="N|never",
        help="postcopy: precopy rounds before the switchover; 0 = at once after setup; never = only on "
        "'ctl postcopy-start', and a guest that converges first completes as precopy does (default 1)",
    )
    mig.add_argument(
        "--postcopy-recover-timeout",
        type=non_negative(float),
        default=60.0,
        metavar="S",
        help="postcopy: how long to reconnect after the link broke before waiting for an operator "
        "('ctl recover' or 'ctl settle'); the guest is never resumed here on its own (default 60 s)",
    )
    mig.add_argument(
        "--downtime-limit",
        type=non_negative(float),
        default=300.0,
        metavar="MS",
        help="switch over when the rest fits this downtime (default 300 ms)",
    )
    mig.add_argument(
        "--max-bandwidth",
        type=size,
        default=0,
        metavar="SIZE",
        help="bandwidth cap in bytes per second (e.g. 100MiB = 100 MiB/s); 0 = unlimited (default)",
    )
    mig.add_argument(
        "--max-postcopy-bandwidth",
        type=size,
        default=0,
        metavar="SIZE",
        help="the cap after a postcopy switchover (answers to page requests count, never wait); 0 = unlimited, else >= 16KiB",
    )
    mig.add_argument(
        "--channels",
        type=positive(int),
        default=1,
        metavar="N",
        help=f"connections that carry page and tag batches, N batches at a time encoded side by side "
        f"in N threads (QEMU's multifd channels; 1 .. {MAX_CHANNELS}, default 1)",
    )
    mig.add_argument(
        "--dirty-model",
        choices=[m.value for m in DirtyModel],
        default=DirtyModel.KVM.value,
        help="what this host shows of dirty pages: kvm = one bit per page for data and tag stores alike, "
        "the source compares with what it sent; tcg = data per page, tags per 32-page group (QEMU's tag "
        "block); split = data and tags apart, an ideal no host gives (default kvm)",
    )
    mig.add_argument(
        "--verify-rehash",
        action="store_true",
        help="the verification hashes this guest's whole written memory at the stop, catching writes "
        "no dirty log saw; the switchover counts its cost (the written memory hashed again) in the downtime",
    )
    mig.add_argument("--no-lz4", action="store_true", help="never compress pages (lz4 is used where it pays)")
    # test builds: the device forgets to mark its writes dirty (see common/guest/device.py)
    mig.add_argument("--debug-device-forgets", action="store_true", help=argparse.SUPPRESS)
    mig.add_argument(
        "--auth-token",
        default=os.environ.get("MTE_MIGRATION_TOKEN", ""),
        metavar="TOKEN",
        help="shared token the destination expects (default $MTE_MIGRATION_TOKEN)",
    )
    mig.add_argument(
        "--peer-timeout",
        type=positive(float),
        default=PEER_DEAD_AFTER_S,
        metavar="S",
        help=f"silence after which the link is presumed broken: setup gives up, a running migration "
        f"reconnects (default {PEER_DEAD_AFTER_S:g} s)",
    )
    mig.add_argument(
        "--reconnect-timeout",
        type=non_negative(float),
        default=RECONNECT_TIMEOUT_S,
        metavar="S",
        help=f"how long to go on reconnecting after the link broke before failing, the guest running here "
        f"(default {RECONNECT_TIMEOUT_S:g} s)",
    )
    mig.add_argument(
        "--convergence-timeout",
        type=non_negative(float),
        default=60.0,
        metavar="S",
        help="give up if precopy has not converged by then (default 60 s)",
    )
    mig.add_argument(
        "--control",
        type=endpoint("--control"),
        metavar="URI",
        help="serve control commands here (tcp://127.0.0.1:PORT or ipc://PATH)",
    )


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        seed=args.seed,
        working_set_bytes=args.working_set,
        dirty_pages_per_step=args.dirty_pages_per_step,
        tag_only_share=args.tag_only_share,
        steps_per_second=args.steps_per_second,
        fill=Fill(args.fill),
        device_period=args.device_period,
    )


def migration_parameters(args: argparse.Namespace) -> MigrationParameters:
    return MigrationParameters(
        downtime_limit_ms=args.downtime_limit,
        max_bandwidth=args.max_bandwidth,
        max_postcopy_bandwidth=args.max_postcopy_bandwidth,
        use_lz4=not args.no_lz4,
        auth_token=args.auth_token.encode(),
        peer_timeout_s=args.peer_timeout,
        heartbeat_interval_s=min(HEARTBEAT_INTERVAL_S, args.peer_timeout / 4),
        reconnect_timeout_s=args.reconnect_timeout,
        convergence_timeout_s=args.convergence_timeout,
        postcopy=args.mode == "postcopy",
        postcopy_after_rounds=args.postcopy_after_rounds,
        postcopy_recover_timeout_s=max(args.postcopy_recover_timeout, args.peer_timeout),
        channels=args.channels,
        dirty_model=DirtyModel(args.dirty_model),
        verify_rehash=args.verify_rehash,
    )
