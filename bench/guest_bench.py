"""Foundation benchmark: digest, encode, decode and dirty-sync cost for a 1 GiB guest.

Usage: python3 bench/guest_bench.py [--ram 1GiB] [--repeat 5]

Every figure is the median of --repeat runs; the baseline is a plain numpy copy of the same
bytes, measured in the same run, so the ratio column says what each step costs next to the
copy a migration cannot avoid.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.guest.digest import DigestCache, memory_digests
from common.guest.guest import Guest
from common.guest.workload import Fill, WorkloadConfig, boot
from common.transfer import PagePass, apply_ram_pages, apply_tag_sections, encode_batch
from common.units import parse_size
from common.wire import framing


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def encode_all(guest: Guest, use_lz4: bool, tags: bool, keep: bool = True) -> list[list[object]]:
    """Frame every page (or tag section); keep=False drops each batch as a sender does once
    it is sent, so the figure is not page faults on a gigabyte of retained output."""
    mem = guest.memory
    every = np.arange(mem.page_count, dtype=np.int64)
    out: list[list[object]] = []
    nothing = np.zeros(0, dtype=np.int64)
    whole = PagePass(nothing, every) if tags else PagePass(every, nothing)
    while chunks := whole.next_chunks(1):
        batch = encode_batch(mem, *chunks[0], use_lz4=use_lz4, round_no=1)
        frames = framing.encode(framing.envelope(b"bench", 1, **{batch.kind: batch.body}), batch.payload)
        if keep:
            out.append(frames)
    return out


def decode_all(dst: Guest, encoded: list[list[object]]) -> None:
    for frames in encoded:
        message = framing.decode(frames)  # type: ignore[arg-type]
        if message.kind == "ram_pages":
            apply_ram_pages(dst.memory, message.envelope.ram_pages, message.payload)
        else:
            apply_tag_sections(dst.memory, message.envelope.tag_sections, message.payload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ram", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ram = args.ram
    rows: list[tuple[str, float, float]] = []  # name, seconds, bytes

    random_guest = boot(ram, WorkloadConfig(seed=1, fill=Fill.RANDOM))
    mixed_guest = boot(ram, WorkloadConfig(seed=1, fill=Fill.MIXED))
    scratch = np.empty_like(random_guest.memory.ram)
    baseline = median_seconds(lambda: np.copyto(scratch, random_guest.memory.ram), args.repeat)
    rows.append(("baseline: numpy copy of RAM", baseline, ram))
    tag_bytes = random_guest.memory.tag_storage.nbytes

    rows.append(
        (
            "digest RAM+tags (random, tagged)",
            median_seconds(lambda: memory_digests(random_guest.memory), args.repeat),
            ram + tag_bytes,
        )
    )
    for name, guest, lz in (
        ("random", random_guest, False),
        ("random", random_guest, True),
        ("mixed", mixed_guest, True),
    ):
        label = f"{name}, lz4 {'on' if lz else 'off'}"
        rows.append(
            (
                f"encode pages ({label})",
                median_seconds(lambda g=guest, z=lz: encode_all(g, z, False, keep=False), args.repeat),
                ram,
            )
        )
        encoded = encode_all(guest, lz, False)
        dst = Guest.create(ram)
        rows.append(
            (
                f"decode+place pages ({label})",
                median_seconds(lambda d=dst, e=encoded: decode_all(d, e), args.repeat),
                ram,
            )
        )
    rows.append(
        (
            "encode tags (random tags, lz4 on)",
            median_seconds(lambda: encode_all(random_guest, True, True, keep=False), args.repeat),
            tag_bytes,
        )
    )
    encoded_tags = encode_all(random_guest, True, True)
    dst = Guest.create(ram)
    rows.append(
        ("decode+place tags", median_seconds(lambda: decode_all(dst, encoded_tags), args.repeat), tag_bytes)
    )

    mem = random_guest.memory
    rng = np.random.default_rng(0)
    cache = DigestCache(mem)
    cache.digests()
    scattered = rng.choice(mem.page_count, size=2000, replace=False)

    def incremental() -> None:
        cache.mark(scattered, scattered)
        cache.digests()

    rows.append(("digest after 2000 scattered pages changed", median_seconds(incremental, args.repeat), 0))
    dirty = rng.choice(mem.page_count, size=min(40_000, mem.page_count), replace=False)

    def sync_with_dirty() -> None:
        mem.data_dirty[dirty] = True
        mem.tag_dirty[dirty] = True
        mem.dirty_sync()

    rows.append((f"dirty sync, {dirty.size} pages dirty", median_seconds(sync_with_dirty, args.repeat), 0))
    rows.append(("dirty sync, nothing dirty", median_seconds(mem.dirty_sync, args.repeat), 0))

    print(f"guest RAM {ram / 2**30:.2f} GiB, median of {args.repeat}")
    print(f"{'step':44} {'median':>10} {'GB/s':>8} {'vs copy':>8}")
    for name, seconds, nbytes in rows:
        rate = f"{nbytes / seconds / 1e9:8.2f}" if nbytes else f"{'':>8}"
        ratio = f"{seconds / baseline:8.2f}x" if nbytes else f"{'':>8}"
        print(f"{name:44} {seconds * 1e3:8.1f}ms {rate} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
