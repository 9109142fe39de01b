"""source-node plot: one migration drawn from its report.

Per precopy round: the bytes of pages and of tags on the wire, the dirty rate and the
throughput, the auto-converge throttle; the downtime window (guest stopped to destination
running) on the time axis; with a postcopy destination's report (--dest), the latency of each
page the guest waited for. Plotting is an optional extra: pip install -e ".[plot]".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = 'source-node plot needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)'


def _load(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except OSError as exc:
        parser.error(f"cannot read {path}: {exc.strerror}")
    except ValueError:
        parser.error(f"{path} is not a JSON report")
    if not isinstance(report, dict) or "status" not in report:
        parser.error(f"{path} is not a migration report: write one with --report")
    return report


def _events(report: dict[str, Any]) -> dict[str, float]:
    return {entry["event"]: entry["at_ms"] for entry in report.get("timeline") or []}


def draw(source: dict[str, Any], dest: dict[str, Any] | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rounds = source.get("rounds_detail") or []
    latencies = ((dest or {}).get("postcopy") or {}).get("fault_latencies_ms") or []
    panels = 3 + (1 if latencies else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.6 * panels), constrained_layout=True)
    title = (
        f"{source.get('mode')} migration: {source.get('status')}, {source.get('rounds')} rounds, "
        f"downtime {source.get('downtime_ms')} ms (limit {source.get('downtime_limit_ms')} ms)"
    )
    fig.suptitle(title)
    numbers = [r["round"] for r in rounds]
    mib = 1 << 20

    ax = axes[0]
    pages = [r["ram_wire_bytes"] / mib for r in rounds]
    tags = [r["tag_wire_bytes"] / mib for r in rounds]
    ax.bar([n - 0.2 for n in numbers], pages, width=0.4, label="pages", color="tab:blue")
    ax.bar([n + 0.2 for n in numbers], tags, width=0.4, label="tags", color="tab:orange")
    ax.set_ylabel("MiB on the wire")
    ax.set_yscale("log")  # round 1 carries the whole guest; later rounds only what was dirtied
    ax.set_xlabel("round")
    ax.set_xticks(numbers)
    ax.legend(loc="upper right")

    ax = axes[1]
    ax.plot(
        numbers, [(r["throughput_bytes_per_s"] or 0) / mib for r in rounds], "o-", label="throughput (MiB/s)"
    )
    ax.set_ylabel("MiB/s")
    ax.set_xlabel("round (throttle under each point)")
    ax.set_xticks(numbers)
    for r in rounds:
        if r["throttle"]:
            ax.annotate(f"{r['throttle']:.0%}", (r["round"], (r["throughput_bytes_per_s"] or 0) / mib),
                        textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)  # fmt: skip
    twin = ax.twinx()
    twin.plot(
        numbers, [r["dirty_pages_rate"] or 0 for r in rounds], "s--", color="tab:red", label="dirty pages/s"
    )
    twin.set_ylabel("pages dirtied per second")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")

    ax = axes[2]
    for r in rounds:
        ax.barh(
            0,
            r["duration_ms"],
            left=r["start_ms"],
            height=0.5,
            color="tab:blue",
            alpha=0.4 + 0.6 * r["throttle"],
        )
        ax.text(
            r["start_ms"] + r["duration_ms"] / 2, 0, str(r["round"]), ha="center", va="center", fontsize=8
        )
    events = _events(source)
    stopped = events.get("guest stopped")
    running = events.get("destination running") or events.get("postcopy started")
    if stopped is not None and running is not None:
        ax.axvspan(stopped, max(running, stopped + 0.5), color="tab:red", alpha=0.5, label="downtime")
        ax.legend(loc="upper right")
    ax.set_yticks([])
    ax.set_xlabel("ms since the start (rounds; darker = more throttle)")

    if latencies:
        ax = axes[3]
        ax.hist(latencies, bins=min(50, max(5, len(latencies) // 4)), color="tab:green")
        ax.set_xlabel("postcopy page request latency (ms)")
        ax.set_ylabel("requests")
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="source-node plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("report", metavar="REPORT.json", help="a source-node report (--report)")
    parser.add_argument(
        "--dest", metavar="DEST.json", help="the dest-node's report: adds postcopy request latencies"
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="PNG",
        default="timeline.png",
        help="the picture to write (default timeline.png)",
    )
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    source = _load(args.report, parser)
    if "rounds_detail" not in source:
        parser.error(
            f"{args.report} is not a source-node report (a destination's? give the source's report, "
            "and the destination's with --dest)"
        )
    dest = _load(args.dest, parser) if args.dest else None
    if not Path(args.output).resolve().parent.is_dir():
        parser.error(f"-o {args.output}: folder {Path(args.output).parent} does not exist")
    draw(source, dest, Path(args.output))
    print(f"wrote {args.output}")
    return 0
