"""source-node plot: one migration drawn from its report, over time.

What was left to send; pages and tags on the wire per second, and the auto-converge throttle;
the dirty rate during precopy rounds; the rounds, the downtime, postcopy and any time the link
was down, shaded across all of them; with the destination's report (--dest), each wait of a
vCPU for a postcopy page. The numbers come from source_node/plot_data.py. Plotting is an
optional extra: pip install -e ".[plot]".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from source_node.plot_data import PlotData, plot_data

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


def draw(source: dict[str, Any], dest: dict[str, Any] | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    data = plot_data(source, dest)
    dirty = any(v == v for v in data.dirty_pages_s)  # (nan != nan) a rate was measured
    panels = 2 + (1 if dirty else 0) + (1 if data.latency_ms else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(10, 2.4 * panels), sharex=True, constrained_layout=True)
    fig.suptitle(data.title)
    for ax in axes:
        _shade(ax, data)

    ax = axes[0]
    ax.plot(data.t_s, data.remaining_mib, color="tab:blue", label="left to send")
    ax.set_ylabel("MiB left")
    ax.set_ylim(bottom=0)
    _round_labels(ax, data)
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[1]
    ax.plot(data.t_s, data.pages_mib_s, color="tab:blue", label="pages")
    ax.plot(data.t_s, data.tags_mib_s, color="tab:orange", label="tags")
    ax.set_ylabel("MiB/s on the wire")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot(data.t_s, data.throttle_pct, color="tab:gray", linestyle=":", label="throttle")
    twin.set_ylabel("throttle %")
    twin.set_ylim(0, 100)
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)

    if dirty:
        ax = axes[2]
        ax.plot(data.t_s, data.dirty_pages_s, color="tab:red", label="dirtied (at each round's end)")
        ax.set_ylabel("pages dirtied/s")
        ax.set_ylim(bottom=0, top=max(v for v in data.dirty_pages_s if v == v) * 1.1 or 1.0)
        ax.legend(loc="upper right", fontsize=8)

    if data.latency_ms:
        ax = axes[-1]
        ax.scatter(
            data.latency_t_s, data.latency_ms, s=4, color="tab:green", label="a vCPU's wait for a page"
        )
        ax.set_ylabel("request latency (ms)")
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds since the migration started")
    axes[-1].set_xlim(0, max(data.end_s, max(data.t_s, default=0.0)) or 1.0)
    fig.savefig(out, dpi=100)
    plt.close(fig)


_COLOURS = {"downtime": ("tab:red", 0.35), "postcopy": ("tab:green", 0.12), "paused": ("black", 0.25)}


def _shade(ax: Any, data: PlotData) -> None:
    """Rounds as alternate light bands; downtime, postcopy and a link down on top, in colour."""
    for i, band in enumerate(b for b in data.bands if b.kind == "round"):
        ax.axvspan(band.start_s, band.end_s, color="tab:blue", alpha=0.04 if i % 2 else 0.10, lw=0)
    for band in data.bands:
        if band.kind in _COLOURS:
            colour, alpha = _COLOURS[band.kind]
            # a downtime of a few ms is still drawn wide enough to see
            end = max(band.end_s, band.start_s + data.end_s / 300)
            ax.axvspan(band.start_s, end, color=colour, alpha=alpha, lw=0, label=None)


def _round_labels(ax: Any, data: PlotData) -> None:
    """Labels above the bands where there is room: downtime, a link down and postcopy first,
    then a round's number only clear of every label placed (no "34 5", no round over
    "downtime")."""
    room = data.end_s / 25
    placed: list[float] = []
    specials = {
        "downtime": ("tab:red", "left"),
        "paused": ("black", "center"),
        "postcopy": ("tab:green", "right"),
    }
    for band in data.bands:
        if band.kind not in specials:
            continue
        colour, align = specials[band.kind]
        x = {"left": band.start_s, "center": (band.start_s + band.end_s) / 2, "right": band.end_s}[align]
        ax.annotate(band.label, (x, 1.0), xycoords=("data", "axes fraction"), ha=align, va="bottom",
                    fontsize=7, color=colour)  # fmt: skip
        placed.append(x if align == "center" else x + (room / 2 if align == "left" else -room / 2))
    for band in data.bands:
        centre = (band.start_s + band.end_s) / 2
        if (
            band.kind != "round"
            or band.end_s - band.start_s < room
            or any(abs(centre - x) < room for x in placed)
        ):
            continue
        ax.annotate(f"round {band.label}", (centre, 1.0), xycoords=("data", "axes fraction"), ha="center",
                    va="bottom", fontsize=7)  # fmt: skip
        placed.append(centre)


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
