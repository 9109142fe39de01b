"""What the daemons say when things end, checked against what really happens: a keyless source
at a keyed destination is named on both sides, a one-shot source whose migration failed says
that it lives on with its guest, Ctrl-C says the guest stops with the process, and a source
that simply left after a good handover is not reported unreachable."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e import (
    DEST,
    SMALL_GUEST,
    SOURCE,
    Dest,
    finish_source,
    free_ports,
    make_keys,
    run_source,
    start_source,
)
from tests.test_e2e_precopy import slow_migration

pytestmark = pytest.mark.slow


def test_a_keyless_source_at_a_keyed_destination_is_told_why_on_both_sides(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    dest = Dest(tmp_path, *keys.dest_args())
    try:
        # a failed one-shot migration leaves the guest running: it ends at its --stop-at-step
        got = run_source(
            tmp_path,
            *SMALL_GUEST,
            "--steps-per-second",
            "200",
            "--stop-at-step",
            "400",
            "--migrate-to",
            dest.uri,
        )
        time.sleep(0.3)
    finally:
        dest.proc.send_signal(signal.SIGTERM)
        finished = dest.finish(timeout=30)
    assert got.code == 1
    assert "requires keys: give --key and --peer-key" in got.stderr
    assert "the guest keeps running here; this process ends when it stops" in got.stderr
    assert "the guest stayed here and stops with this process, at step 400" in got.stdout
    assert "a source without keys (this destination requires CURVE keys" in finished.stderr


def test_ctrl_c_mid_migration_says_the_guest_stops_with_the_process(tmp_path: Path) -> None:
    guest, knobs = slow_migration(tmp_path)
    dest = Dest(tmp_path)
    try:
        proc, report = start_source(tmp_path, *guest, *knobs, "--migrate-to", dest.uri)
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        got = finish_source(proc, report, timeout=30)
        finished = dest.finish(timeout=30)
    finally:
        dest.kill()
    assert got.code == 130, got.stderr[-2000:]
    last = got.stdout.strip().splitlines()[-1]
    assert last.startswith("migration cancelled: interrupted by SIGINT (the guest stayed here and stops"), (
        last
    )
    assert "keeps running" not in last
    assert finished.report["status"] == "cancelled"


def test_a_source_that_left_after_a_good_handover_is_not_called_unreachable(tmp_path: Path) -> None:
    dest = Dest(tmp_path, "--stop-at-step", "3000")
    got = run_source(
        tmp_path,
        *SMALL_GUEST,
        "--steps-per-second",
        "1000",
        "--stop-at-step",
        "3000",
        "--migrate-to",
        dest.uri,
    )
    finished = dest.finish(timeout=60)
    assert got.code == 0 and finished.code == 0, finished.stderr[-2000:]
    assert "source unreachable" not in finished.stderr


def test_the_help_says_when_a_one_shot_source_exits() -> None:
    text = subprocess.run([*SOURCE, "--help"], capture_output=True, text=True, timeout=30).stdout
    flat = " ".join(text.split())
    assert "exit once it completed, or after a failure once the guest, still running here, stops" in flat


def test_small_edges_of_the_cli(tmp_path: Path) -> None:
    # ctl on an ipc path where nothing listens answers at once, and --json keeps its shape
    missing = subprocess.run(
        [*SOURCE, "ctl", "--control", f"ipc://{tmp_path}/none.ctl", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1
    assert json.loads(missing.stdout) == {
        "ok": False,
        "error": f"no daemon at ipc://{tmp_path}/none.ctl: there is no such socket file (is its --control this?)",
    }
    zero = subprocess.run([*SOURCE, "--max-ram", "0"], capture_output=True, text=True, timeout=30)
    assert zero.returncode == 2 and "--max-ram: 0: must be more than 0" in zero.stderr


def test_a_guest_arriving_past_the_destinations_stop_step_is_said_and_stays_stopped(tmp_path: Path) -> None:
    dest = Dest(tmp_path, "--stop-at-step", "10")
    got = run_source(
        tmp_path, *SMALL_GUEST, "--steps-per-second", "400", "--stop-at-step", "800", "--migrate-to", dest.uri
    )
    finished = dest.finish(timeout=60)
    assert got.code == 0 and finished.code == 0, finished.stderr[-2000:]
    assert "the guest arrived past this node's --stop-at-step: it stays stopped here" in finished.stderr
    assert finished.report["guest"]["step"] == got.report["guest"]["step"] > 10, "not one step run here"


def test_reports_say_how_a_migration_ended_when_a_signal_ended_it(tmp_path: Path) -> None:
    """A second signal during postcopy: the source's report said "active" with no error, and
    the pages only it held were lost without a word. A destination stopped by SIGTERM mid-
    precopy wrote the report of the next migration it would have waited for (status none)."""
    port = free_ports(1)[0]
    report = tmp_path / "waiting.json"
    dest = subprocess.Popen(
        [*DEST, "--listen", f"tcp://127.0.0.1:{port}", "--report", str(report)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    guest, knobs = slow_migration(tmp_path)
    proc, _ = start_source(tmp_path, *guest, *knobs, "--migrate-to", f"tcp://127.0.0.1:{port}")
    time.sleep(2.0)
    dest.send_signal(signal.SIGTERM)
    dest.communicate(timeout=30)
    proc.kill()
    proc.communicate(timeout=10)
    written = json.loads(report.read_text())
    assert written["status"] == "cancelled" and "interrupted by SIGTERM" in written["error"], written[
        "status"
    ]

    post = Dest(tmp_path, "--stop-at-step", "100000000")
    try:
        source, path = start_source(
            tmp_path,
            *SMALL_GUEST,
            "--ram",
            "64MiB",
            "--fill",
            "random",
            "--mode",
            "postcopy",
            "--postcopy-after-rounds",
            "0",
            "--max-postcopy-bandwidth",
            "1MiB",
            "--migrate-to",
            post.uri,
        )
        time.sleep(2.5)
        source.send_signal(signal.SIGINT)  # refused: the destination needs pages held here
        time.sleep(0.5)
        source.send_signal(signal.SIGINT)
        got = finish_source(source, path, timeout=30)
    finally:
        post.kill()
    assert got.code == 130
    assert got.report["status"] == "failed", got.report["status"]
    assert got.report["error"].startswith(
        "abandoned by SIGINT in phase postcopy: the destination runs the guest"
    )
    assert "now lost" in got.stdout.strip().splitlines()[-1]
