"""A report as a person reads it (HMP's `info migrate`): a dozen labelled lines, sizes and rates
in binary units, times in ms or s. `ctl status --json` and the report files keep the JSON."""

from __future__ import annotations

from typing import Any

from common.protocol.params import SIZE_PARAMETERS
from common.units import exact_size, format_duration, format_rate, format_size


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 1000 else format_duration(value / 1000.0)


def _size(value: int | None) -> str:
    return "-" if value is None else format_size(value)


def describe(report: dict[str, Any]) -> str:
    """A source's one migration; a destination's incoming one and the one it sends on, the one
    in progress first in full, the other in a line (or the last incoming one, and how it
    ended, while it waits for the next)."""
    lines: list[str] = []
    status = report.get("status")
    destination = "listen" in report
    outgoing = report.get("outgoing")
    if destination:
        incoming = report if status != "none" else report.get("last_incoming")
        blocks = [("incoming migration", incoming, status == "none"), ("outgoing migration", outgoing, False)]
        if outgoing is not None and outgoing.get("status") == "active":
            blocks.reverse()
        first = True
        for title, block, last in blocks:
            if block is None:
                continue
            lines.extend(_migration(("last " if last else "") + title, block, full=first))
            first = False
        if first:
            lines.append("migration: none yet")
        if status == "none":
            lines.append("waiting for a source")
    elif status == "none":
        lines.append("migration: none yet")
    elif status is not None:
        lines.extend(_migration("migration", report, full=True))
    guest = report.get("guest")
    if guest:
        where = "here" if guest.get("here") else "not here"
        state = "running" if guest.get("running") else "stopped"
        lines.append(
            f"guest: {where}, {state}, step {guest.get('step')}, {guest.get('tag_check_faults')} tag-check faults"
        )
    if report.get("parameters"):
        shown = " ".join(f"{name}={_parameter(name, value)}" for name, value in report["parameters"].items())
        lines.append(f"parameters: {shown}")
    return "\n".join(lines)


def _migration(title: str, report: dict[str, Any], full: bool) -> list[str]:
    status = report.get("status")
    head = f"{title}: {status} ({report.get('mode')}, phase {report.get('phase')})"
    if report.get("progress_percent") is not None and status == "active":
        head += f" [{report['progress_percent']:.1f} %]"
    lines = [head]
    if report.get("error"):
        lines.append(f"error: {report['error']}")
    if full:
        lines.extend(_transfer_lines(report))
    return lines


def _parameter(name: str, value: Any) -> str:
    if name in SIZE_PARAMETERS:  # read back exactly: what was set, not a rounding of it
        return "unlimited" if not value else f"{exact_size(value).replace(' bytes', ' B')}/s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _transfer_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    if "rounds" in report:
        lines.append(
            f"time: total {_ms(report.get('total_time_ms'))}, setup {_ms(report.get('setup_time_ms'))}, "
            + (
                f"round {report['rounds']}"
                if report.get("status") == "active"
                else f"{report['rounds']} round{'' if report['rounds'] == 1 else 's'}"
            )
        )
    if report.get("downtime_limit_ms") is not None or report.get("downtime_ms") is not None:
        lines.append(
            f"downtime: {_ms(report.get('downtime_ms'))} (expected {_ms(report.get('expected_downtime_ms'))}"
            + (f", limit {_ms(report['downtime_limit_ms'])}" if report.get("downtime_limit_ms") else "")
            + ")"
        )
    if report.get("remaining_bytes") is not None and report.get("status") == "active":
        eta = report.get("eta_s")
        lines.append(
            f"remaining: {_size(report['remaining_bytes'])}"
            + (f", about {format_duration(eta)} at the current rate" if eta is not None else "")
        )
    throttle = report.get("throttle")
    rate = report.get("dirty_pages_rate")
    now = report.get("rate_bytes_per_s")
    lines.append(
        f"throughput: {format_rate(report.get('throughput_bytes_per_s') or 0)} on average"
        + (f", {format_rate(now)} over the last second" if now else "")
        + (f", dirtied {rate:.0f} pages/s" if rate else "")
        + (f", throttle {throttle:.0%}" if throttle else "")
    )
    ram, tags = report.get("ram"), report.get("tags")
    if ram:
        skipped = f", {ram['skipped_pages']} never written (not sent)" if ram.get("skipped_pages") else ""
        lines.append(
            f"ram: {_size(ram['guest_bytes'])} guest, {ram['pages']} pages ({ram['zero_pages']} zero){skipped}, "
            f"{_size(ram['wire_bytes'])} on the wire"
        )
    if tags:
        skipped = f", {tags['skipped_pages']} never tagged (not sent)" if tags.get("skipped_pages") else ""
        lines.append(
            f"tags: {tags['sections']} pages' tags ({tags['untagged_pages']} untagged){skipped}, "
            f"{_size(tags['wire_bytes'])} on the wire"
        )
    model = report.get("dirty_model")
    if model:
        line = f"dirty model: {model['model']}, {model['dirty_pages']} dirty pages in {model['syncs']} syncs"
        if model["compared_pages"]:
            line += (
                f"; compared with what was sent: {model['changed_tags_only']} tags only, "
                f"{model['changed_data_only']} data only, {model['changed_both']} both, "
                f"{model['changed_neither']} unchanged, {_ms(model['compare_ms'])}"
            )
        lines.append(line)
    ioctl = report.get("tag_ioctl")
    if ioctl:
        lines.append(
            f"tag copies (KVM_ARM_MTE_COPY_TAGS): {ioctl['calls']} calls, {_size(ioctl['bytes_from_guest'])} "
            f"from the guest, {_size(ioctl['bytes_to_guest'])} to it"
        )
    link = report.get("link")
    if link:
        reconnects = link.get("reconnects", link.get("resumes", 0))
        lines.append(
            f"link: epoch {link['epoch']}, {reconnects} reconnects, {link['resent_messages']} messages resent, "
            f"{link['corrupt_received']} corrupt received"
        )
    pc = report.get("postcopy")
    if pc:
        shown = (
            f"{k.replace('_', ' ')} {v}"
            for k, v in pc.items()
            if v is not None and not isinstance(v, list | dict)
        )
        lines.append("postcopy: " + ", ".join(shown))
    verification = report.get("verification")
    if verification and verification.get("ok") is not None:
        verdict = "ok" if verification["ok"] else "MISMATCH"
        # postcopy proves one manifest digest over every page's data and tags
        what = (
            f"ram {verification.get('ram_digest')}, tags {verification.get('tag_digest')}"
            if verification.get("tag_digest")
            else f"manifest {verification.get('ram_digest')}"
        )
        repaired = verification.get("repaired_pages")
        lines.append(
            f"verification: {verdict} ({what}, vcpu {verification.get('vcpu_digest')})"
            + (f"; {repaired} pages found different and sent again" if repaired else "")
        )
    return lines
