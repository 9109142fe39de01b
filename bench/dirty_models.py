"""What tags cost under each dirty model: the figures behind the README's advice to a KVM VMM.

Usage: python3 bench/dirty_models.py [--repeat 3] [--changes 4096] [--skip-daemons]

Table 1 (in process, one core): a 64 MiB guest with random data and tags, sent once; then
--changes pages changed one way (tag-only: an allocator's retag, two tags per page; tag-only,
random: a random tag on every granule; data-only: a 64-byte store; both), one dirty sync, and the pass that follows encoded and framed as the
source sends it. Per change: bytes on the wire and source CPU time (sync, comparison, tag
reads, encoding). `kvm, no compare` is the obvious alternative on KVM, measured beside it:
every dirty page sent with its data and its tags.
Table 2 (real daemons on loopback): the downtime case, 1 GiB guest, 128 MiB working set,
about 40k pages/s dirtied, half of them by tag-only steps, 50 ms limit; and the kvm model with
--verify-rehash, which hashes all written memory at the stop.
Table 3: an idle 1 GiB guest with random data and tags on every granule: tag bytes as a
share of RAM bytes on the wire.
Every run is printed, then medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import runs  # noqa: E402

from common.constants import PAGE_SIZE  # noqa: E402
from common.guest.digest import DigestCache  # noqa: E402
from common.guest.dirtylog import DirtyModel  # noqa: E402
from common.guest.memory import DirtySync, GuestMemory  # noqa: E402
from common.indices import union  # noqa: E402
from common.protocol.link import Link  # noqa: E402
from common.protocol.precopy import Precopy  # noqa: E402
from common.transfer import PagePass  # noqa: E402
from tests.sending import random_memory, send_pass  # noqa: E402

KINDS = ("tag-only", "tag-only, random", "data-only", "both")
NO_COMPARE = "kvm, no compare"
VARIANTS = ["kvm", NO_COMPARE, "tcg", "split"]


def change(mem: GuestMemory, kind: str, pages: np.ndarray, rng: np.random.Generator) -> None:
    half = PAGE_SIZE // 2
    if kind == "tag-only, random":
        # STGM over each page with a random tag per granule: the worst case for the wire
        with mem.lock:
            mem.page_tags[pages] = rng.integers(0, 256, (pages.size, mem.page_tags.shape[1]), dtype=np.uint8)
            mem.tag_dirty[pages] = True
        return
    for page in pages.tolist():
        addr = page * PAGE_SIZE
        if kind in ("tag-only", "both"):
            first, second = (int(t) for t in rng.integers(1, 16, 2))
            mem.set_tags(addr, half, first)
            mem.set_tags(addr + half, half, second)
        if kind in ("data-only", "both"):
            mem.write(addr + 64, rng.integers(0, 256, 64, dtype=np.uint8).tobytes())


def one_change_run(variant: str, kind: str, changes: int, seed: int) -> tuple[float, float, float]:
    """(wire bytes, source CPU µs, tag ioctl calls) per change."""
    mem = random_memory(16384, seed)
    model = DirtyModel.KVM if variant == NO_COMPARE else DirtyModel(variant)
    pre = Precopy(mem, DigestCache(mem), model)
    pre.first_round(0.0)
    link = Link(os.urandom(8), 0.0, rto_s=1.0)
    send_pass(pre, link)
    rng = np.random.default_rng(seed)
    change(mem, kind, rng.choice(mem.page_count, changes, replace=False), rng)
    calls = mem.tag_ioctl.counters.calls
    began = time.process_time()
    if variant == NO_COMPARE:
        hardware = mem.dirty_sync()
        dirty = union(hardware.data_pages, hardware.tag_pages)  # one bit per page, sent whole
        sync = DirtySync(dirty, dirty)
    else:
        sync = pre.log.sync()
    pre.digests.mark(sync.data_pages, sync.tag_pages)
    pre.pass_ = PagePass(sync.data_pages, sync.tag_pages)
    wire = send_pass(pre, link)
    cpu = time.process_time() - began
    return wire / changes, cpu / changes * 1e6, (mem.tag_ioctl.counters.calls - calls) / changes


def change_table(repeat: int, changes: int) -> None:
    print(
        f"Table 1: one dirty sync and its pass after {changes} changed pages, per change (64 MiB random guest)"
    )
    print(
        f"{'model':16} {'change':16} {'runs: bytes / CPU µs':48} {'median B':>9} {'median µs':>10} {'ioctls':>7}"
    )
    for kind in KINDS:
        for variant in VARIANTS:
            results = [one_change_run(variant, kind, changes, seed) for seed in range(1, repeat + 1)]
            shown = " ".join(f"{b:.0f}/{c:.1f}" for b, c, _ in results)
            b = statistics.median(r[0] for r in results)
            c = statistics.median(r[1] for r in results)
            calls = statistics.median(r[2] for r in results)
            print(f"{variant:16} {kind:16} {shown:48} {b:9.0f} {c:10.2f} {calls:7.2f}")


DOWNTIME_GUEST = ["--ram", "1GiB", "--working-set", "128MiB", "--dirty-pages-per-step", "32",
                  "--steps-per-second", "1250", "--tag-only-share", "0.5", "--seed", "5"]  # fmt: skip


def downtime_run(tmp: Path, model: str, extra: list[str]) -> dict[str, Any]:
    knobs = ["--dirty-model", model, "--downtime-limit", "50", "--convergence-timeout", "60", *extra]
    return runs.migrate(tmp, [*DOWNTIME_GUEST, *knobs]).source


def downtime_table(tmp: Path, repeat: int) -> None:
    print()
    print(
        "Table 2: the downtime case through the daemons: 1 GiB, 128 MiB working set, 32 pages a step at up to\n"
        "1250 steps/s (40k pages/s asked; the Python vCPU manages about 1050 steps/s alone, fewer while it\n"
        "migrates), half of the steps tag-only, 50 ms limit (300 ms with --verify-rehash, which cannot fit 50).\n"
        "'log pg/s': pages a second the model's dirty log gave in the last round (kvm: the changed ones)"
    )
    header = f"{'model':22} {'run':>3} {'status':>9} {'total s':>8} {'downtime ms':>12} {'rounds':>7} {'log pg/s':>10} {'wire MiB':>9} {'tags MiB':>9} {'compare ms':>11} {'ioctls':>8}"
    print(header)
    # the rehash of ~0.8 GiB of written memory cannot fit 50 ms (the switchover counts it): 300 ms
    rows = [
        ("kvm", []),
        ("tcg", []),
        ("split", []),
        ("kvm --verify-rehash", ["--verify-rehash", "--downtime-limit", "300"]),
    ]
    for label, extra in rows:
        results = []
        for i in range(repeat):
            r = downtime_run(tmp, label.split()[0], extra)
            results.append(r)
            wire = (r["ram"]["wire_bytes"] + r["tags"]["wire_bytes"]) / 2**20
            downtime = r["downtime_ms"] if r["downtime_ms"] is not None else float("nan")
            print(
                f"{label:22} {i + 1:>3} {r['status']:>9} {r['total_time_ms'] / 1000:8.2f} {downtime:12.1f} "
                f"{r['rounds']:>7} {r['dirty_pages_rate']:>10.0f} {wire:9.1f} {r['tags']['wire_bytes'] / 2**20:9.2f} "
                f"{r['dirty_model']['compare_ms']:11.1f} {r['tag_ioctl']['calls']:>8}"
            )
        done = [r for r in results if r["status"] == "completed"]
        if done:
            print(
                f"{label + ' median':22} {'':>3} {len(done):>6}/{repeat} "
                f"{statistics.median(r['total_time_ms'] for r in done) / 1000:8.2f} "
                f"{statistics.median(r['downtime_ms'] for r in done):12.1f} "
                f"{statistics.median(r['rounds'] for r in done):>7} "
                f"{statistics.median(r['dirty_pages_rate'] for r in done):>10.0f} "
                f"{statistics.median((r['ram']['wire_bytes'] + r['tags']['wire_bytes']) / 2**20 for r in done):9.1f} "
                f"{statistics.median(r['tags']['wire_bytes'] / 2**20 for r in done):9.2f} "
                f"{statistics.median(r['dirty_model']['compare_ms'] for r in done):11.1f}"
            )


def tag_share_table(tmp: Path, repeat: int) -> None:
    print()
    print("Table 3: an idle 1 GiB guest, random data and random tags on every granule")
    print(f"{'model':8} {'runs: tags / RAM bytes':40} {'median':>8} {'total s':>8}")
    guest = ["--ram", "1GiB", "--fill", "random", "--working-set", "1MiB", "--stop-at-step", "0"]
    for model in ("kvm", "tcg", "split"):
        results = [runs.migrate(tmp, [*guest, "--dirty-model", model]).source for _ in range(repeat)]
        shares = [r["tags"]["wire_bytes"] / r["ram"]["wire_bytes"] for r in results]
        shown = " ".join(f"{s:.3%}" for s in shares)
        seconds = statistics.median(r["total_time_ms"] / 1000 for r in results)
        print(f"{model:8} {shown:40} {statistics.median(shares):8.3%} {seconds:8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--changes", type=int, default=4096)
    parser.add_argument("--skip-daemons", action="store_true", help="table 1 only")
    args = parser.parse_args()
    change_table(max(5, args.repeat), args.changes)
    if not args.skip_daemons:
        with tempfile.TemporaryDirectory() as tmp:
            downtime_table(Path(tmp), args.repeat)
            tag_share_table(Path(tmp), args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
