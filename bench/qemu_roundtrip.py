"""A real MTE guest's memory through the pipeline, beside QEMU's own stream of the same guest.

Usage: python3 bench/qemu_roundtrip.py [--repeat 3] [--passes 2]

Boots the self-checking guest of scripts/qemu_guest.py (a Debian arm64 kernel, 256 MiB,
virt,mte=on, TCG), saves it stopped after --passes passes of its check, then migrates that
stream --repeat times through source-node --from-qemu and dest-node --to-qemu on loopback.
Prints every run and the medians: bytes on the wire (pages, tags, the rest), how far lz4 and
zero-page detection shrank the guest's written pages, the tag share, time and downtime, beside
the size of QEMU's own stream. Needs what scripts/install.sh installs for the round trip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import runs  # noqa: E402

from common.constants import PAGE_SIZE  # noqa: E402
from common.qemu.guest_io import RAM_BLOCK  # noqa: E402
from common.qemu.stream import read_stream  # noqa: E402
from scripts import qemu_guest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    if qemu_guest.missing():
        print("qemu_roundtrip: missing " + "; ".join(qemu_guest.missing()), file=sys.stderr)
        return 2
    qemu_guest.build()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        guest = qemu_guest.Guest(tmp)
        try:
            guest.wait_for_passes(args.passes, timeout_s=300)
            saved = tmp / "saved.stream"
            guest.save(saved)
        finally:
            guest.close()
        qemu_bytes = saved.stat().st_size
        ram = read_stream(saved.read_bytes(), 1 << 34).block(RAM_BLOCK).data.reshape(-1, PAGE_SIZE)
        written = int(ram.any(axis=1).sum())
        print(
            f"guest: {ram.shape[0] * PAGE_SIZE >> 20} MiB RAM, {written} pages written; QEMU's stream {qemu_bytes} bytes"
        )
        print(f"{'run':>3} {'status':>10} {'total ms':>9} {'downtime ms':>12} {'pages B':>10} {'tags B':>8} "
              f"{'other B':>8} {'wire / QEMU':>11} {'lz4+zero':>9} {'tags / RAM':>10}")  # fmt: skip
        results = []
        for i in range(args.repeat):
            run = runs.migrate(tmp, ["--from-qemu", str(saved)], ["--to-qemu", str(tmp / f"back-{i}.stream")])
            r = run.source
            # every byte the source sent: pages, tags, and the rest (the QEMU state, control)
            wire = r["ram"]["precopy_bytes"] + r["ram"]["downtime_bytes"]
            other = wire - r["ram"]["wire_bytes"] - r["tags"]["wire_bytes"]
            row = {
                "status": r["status"],
                "total": r["total_time_ms"],
                "downtime": r["downtime_ms"],
                "pages": r["ram"]["wire_bytes"],
                "tags": r["tags"]["wire_bytes"],
                "other": other,
                "ratio": wire / qemu_bytes,
                "shrink": r["ram"]["wire_bytes"] / (written * PAGE_SIZE),
                "tag_share": r["tags"]["wire_bytes"] / r["ram"]["wire_bytes"],
            }
            results.append(row)
            print(f"{i + 1:>3} {row['status']:>10} {row['total']:9.1f} {row['downtime']:12.1f} {row['pages']:>10} "
                  f"{row['tags']:>8} {row['other']:>8} {row['ratio']:11.3f} {row['shrink']:9.3f} {row['tag_share']:10.3%}")  # fmt: skip
        done = [r for r in results if r["status"] == "completed"]
        if done:
            med = {
                k: statistics.median(r[k] for r in done)
                for k in ("total", "downtime", "ratio", "shrink", "tag_share")
            }
            print(f"median of {len(done)}: total {med['total']:.1f} ms, downtime {med['downtime']:.1f} ms, "
                  f"wire / QEMU's stream {med['ratio']:.3f}, pages on the wire / written pages {med['shrink']:.3f}, "
                  f"tags / RAM bytes {med['tag_share']:.3%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
