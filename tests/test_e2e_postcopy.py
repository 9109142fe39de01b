"""Postcopy through the real daemons on loopback: the destination runs the guest at once, pulls
what it touches, and ends where the unmigrated run ends."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.control import request
from tests.e2e import (
    Dest,
    busy_small_guest,
    finish_source,
    make_keys,
    reference,
    run_source,
    same_guest,
    start_source,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("seed", "rounds", "keys"), [(31, "0", False), (32, "2", False), (33, "0", True)])
def test_postcopy_migrated_equals_unmigrated(tmp_path: Path, seed: int, rounds: str, keys: bool) -> None:
    """With keys, the urgent channel that carries requested pages is a CURVE connection too."""
    guest = busy_small_guest(seed, 3000, "1500")
    made = make_keys(tmp_path / "keys") if keys else None
    dest_keys = made.dest_args() if made else []
    source_keys = made.source_args() if made else []
    dest = Dest(tmp_path, "--stop-at-step", "3000", *dest_keys)
    src = run_source(
        tmp_path,
        *guest,
        "--migrate-to",
        dest.uri,
        "--mode",
        "postcopy",
        "--postcopy-after-rounds",
        rounds,
        *source_keys,
    )
    got = dest.finish()
    assert src.code == 0, src.stdout + src.stderr + "\n--- dest ---\n" + got.stderr
    assert got.code == 0, got.stderr
    assert src.report["mode"] == "postcopy" and src.report["verification"]["ok"] is True
    assert src.report["guest"]["here"] is False, "the source never runs it again"
    assert got.report["postcopy"]["pages_missing"] == 0
    assert src.report["guest"]["step"] < 3000, "the destination ran the rest"
    assert got.report["guest"]["step"] == 3000
    assert same_guest(got.report["guest"], reference(tmp_path, *guest))
    assert "postcopy completed" in src.stdout
    if rounds == "0":
        assert got.report["postcopy"]["requests"] > 0
        # asked on the urgent connection and answered by its thread, not the source's loop
        assert got.report["postcopy"]["requests_on_urgent_connection"] > 0
        assert src.report["postcopy"]["answered_by_urgent_thread"] > 0
    if keys:
        # the stream and the urgent channel each proved the source's key
        assert got.stderr.count("peer key admitted") >= 2, got.stderr[-2000:]


def test_postcopy_start_switches_a_running_precopy(tmp_path: Path) -> None:
    guest = busy_small_guest(34, 6000, pace="1500")
    dest = Dest(tmp_path, "--stop-at-step", "6000")
    control = dest.new_control_uri()
    proc, report = start_source(
        tmp_path,
        *guest,
        "--migrate-to",
        dest.uri,
        "--mode",
        "postcopy",
        "--postcopy-after-rounds",
        "1000",
        "--max-bandwidth",
        "1MiB",
        "--downtime-limit",
        "1",
        "--control",
        control,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = request(control, "status", timeout_s=2.0)
            if (
                status.get("ok")
                and status["result"].get("phase") == "active"
                and status["result"]["rounds"] >= 1
            ):
                break
            time.sleep(0.1)
        answer = request(control, "postcopy-start", timeout_s=5.0)
        assert answer.get("ok"), answer
        assert answer["result"]["phase"].startswith("postcopy")
        src = finish_source(proc, report)
    finally:
        if proc.poll() is None:
            proc.kill()
    got = dest.finish()
    assert src.code == 0 and got.code == 0, src.stderr + got.stderr
    assert same_guest(got.report["guest"], reference(tmp_path, *guest))
