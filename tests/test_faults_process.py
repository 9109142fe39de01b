"""Process faults: SIGKILL of either daemon in each phase, and SIGSTOP of either for longer than
the peer timeout followed by SIGCONT. The fault proxy sits in the path only to see milestones
(it injects nothing itself), so each signal lands in the phase it names."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from faultinject.proxy import FaultProxy, Milestones
from tests.e2e import Dest, finish_source, reference, same_guest, start_source
from tests.test_faults_proxy import BUSY_512, LINK, STOP, assert_completed_and_equal, assert_failed_cleanly

pytestmark = [pytest.mark.slow, pytest.mark.faults]

PHASES = [
    pytest.param(lambda m: m.bytes_down > 48 << 20, id="precopy"),
    pytest.param(lambda m: m.switchover, id="switchover"),
    pytest.param(lambda m: m.verify_requests >= 1, id="verification"),
]


def run_with(
    tmp: Path,
    milestone: Callable[[Milestones], bool],
    act: Callable[[subprocess.Popen[str], Dest], None],
    reconnect_s: str = "6",
) -> tuple[object, object]:
    """A migration that `act` upsets at `milestone`; the source reconnects for `reconnect_s`."""
    dest = Dest(tmp, "--stop-at-step", STOP, "--peer-timeout", "1")
    try:
        with FaultProxy(("127.0.0.1", dest.port)) as proxy:
            proc, report = start_source(
                tmp,
                *BUSY_512,
                "--seed",
                "3",
                "--migrate-to",
                proxy.uri,
                *LINK,
                "--reconnect-timeout",
                reconnect_s,
            )
            proxy.when(milestone, lambda: act(proc, dest))
            src = finish_source(proc, report)
            got = dest.finish()
            assert any(what.startswith("trigger") for _, what in proxy.log), "the signal was sent"
    finally:
        dest.kill()
    return src, got


@pytest.mark.parametrize("milestone", PHASES)
def test_a_killed_destination_leaves_the_guest_running_on_the_source(
    tmp_path: Path, milestone: Callable[[Milestones], bool]
) -> None:
    # nothing comes back: 2 s of reconnecting shows that as well as the usual 6
    src, got = run_with(tmp_path, milestone, lambda _, dest: dest.proc.send_signal(signal.SIGKILL), "2")
    assert_failed_cleanly(tmp_path, src, got)  # type: ignore[arg-type]
    assert got.code == -signal.SIGKILL  # type: ignore[attr-defined]


@pytest.mark.parametrize("milestone", PHASES)
def test_a_killed_source_is_never_run_on_the_destination(
    tmp_path: Path, milestone: Callable[[Milestones], bool]
) -> None:
    killed_at: list[float] = []

    def kill(proc: subprocess.Popen[str], _: Dest) -> None:
        killed_at.append(time.monotonic())
        proc.send_signal(signal.SIGKILL)

    dest = Dest(tmp_path, "--stop-at-step", STOP, "--peer-timeout", "1")
    try:
        with FaultProxy(("127.0.0.1", dest.port)) as proxy:
            proc, _ = start_source(tmp_path, *BUSY_512, "--seed", "3", "--migrate-to", proxy.uri, *LINK)
            proxy.when(milestone, lambda: kill(proc, dest))
            proc.wait(timeout=60)
            got = dest.finish(timeout=30)
    finally:
        dest.kill()
    waited = time.monotonic() - killed_at[0]
    assert got.code != 0
    assert got.report["status"] == "failed" and "silent" in got.report["error"]
    assert got.report["guest"]["here"] is False, "the destination never runs the guest"
    # it gives the source its reconnect timeout (6 s), not forever
    assert waited < 6 + 5


@pytest.mark.parametrize("which", ["source", "destination"])
def test_a_daemon_stopped_longer_than_the_peer_timeout_then_continued_is_ridden_out(
    tmp_path: Path, which: str
) -> None:
    def pause(proc: subprocess.Popen[str], dest: Dest) -> None:
        pid = proc.pid if which == "source" else dest.proc.pid
        os.kill(pid, signal.SIGSTOP)
        # past the 1 s peer timeout, within the 6 s reconnect timeout; the proxy forwards on
        threading.Timer(2.5, os.kill, (pid, signal.SIGCONT)).start()

    src, got = run_with(tmp_path, lambda m: m.bytes_down > 48 << 20, pause)
    assert_completed_and_equal(tmp_path, src, got)  # type: ignore[arg-type]


def test_a_signal_cancels_the_migration_and_tells_the_destination_at_once(tmp_path: Path) -> None:
    dest = Dest(tmp_path, "--stop-at-step", STOP, "--peer-timeout", "30")
    guest = [*BUSY_512, "--seed", "3", "--max-bandwidth", "32MiB"]
    try:
        proc, report = start_source(tmp_path, *guest, "--migrate-to", dest.uri)
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        src = finish_source(proc, report, timeout=30)
        began = time.monotonic()
        got = dest.finish(timeout=10)
    finally:
        dest.kill()
    assert src.report["status"] == "cancelled" and "interrupted by SIGINT" in src.report["error"]
    assert src.report["guest"]["here"] is True
    # the destination heard it at once, not after its 30 s peer timeout
    assert time.monotonic() - began < 5
    assert got.report["status"] == "cancelled" and "interrupted by SIGINT" in got.report["error"]
    assert got.report["guest"]["here"] is False
    assert src.report["guest"]["step"] < int(STOP)
    assert same_guest(
        src.report["guest"], reference(tmp_path, *guest, "--stop-at-step", str(src.report["guest"]["step"]))
    )
