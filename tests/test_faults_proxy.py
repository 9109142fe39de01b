"""Network faults on loopback: the real daemons with a fault proxy between them.

Every test asserts from outside, through the reports and the guest digests against the
unmigrated reference run: completed and equal, or failed cleanly with a reason, the source's
guest running and the destination's never run. Never both, never neither, never a hang.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.control import request
from faultinject.proxy import FaultProxy, Milestones
from tests.e2e import (
    Dest,
    Finished,
    finish_source,
    make_keys,
    reference,
    run_source,
    same_guest,
    start_source,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]

STOP = "3000"
# A busy 512 MiB guest, paced so that the migration runs while it works.
BUSY_512 = [
    "--ram", "512MiB", "--working-set", "8MiB", "--dirty-pages-per-step", "16",
    "--steps-per-second", "1000", "--stop-at-step", STOP,
]  # fmt: skip
# Notice a broken link after 1 s of silence; go on reconnecting for 6 s.
LINK = ["--peer-timeout", "1", "--reconnect-timeout", "6"]


def migrate_through(
    tmp: Path,
    proxy_setup: Callable[[FaultProxy], None],
    *,
    seed: str = "3",
    extra: tuple[str, ...] = (),
    dest_extra: tuple[str, ...] = (),
) -> tuple[Finished, Finished, FaultProxy]:
    dest = Dest(tmp, "--stop-at-step", STOP, "--peer-timeout", "1", *dest_extra)
    try:
        with FaultProxy(("127.0.0.1", dest.port), seed=int(seed)) as proxy:
            proxy_setup(proxy)
            src = run_source(tmp, *BUSY_512, "--seed", seed, "--migrate-to", proxy.uri, *LINK, *extra)
            got = dest.finish()
    finally:
        dest.kill()
    return src, got, proxy


def assert_completed_and_equal(tmp: Path, src: Finished, got: Finished, seed: str = "3") -> None:
    assert src.code == 0, (
        f"{src.report.get('error')}\n{src.stderr[-2000:]}\n--- dest ---\n{got.stderr[-2000:]}"
    )
    assert src.report["status"] == "completed" and src.report["verification"]["ok"] is True
    assert got.code == 0 and got.report["guest"]["here"] is True
    assert same_guest(got.report["guest"], reference(tmp, *BUSY_512, "--seed", seed))


def assert_failed_cleanly(tmp: Path, src: Finished, got: Finished, seed: str = "3") -> None:
    assert src.code != 0 and src.report["status"] == "failed" and src.report["error"]
    assert src.report["guest"]["here"] is True, "the guest runs on at the source"
    assert same_guest(src.report["guest"], reference(tmp, *BUSY_512, "--seed", seed))
    assert got.code != 0
    if got.report:  # a killed destination writes none
        assert got.report["guest"] is None or got.report["guest"]["here"] is False
    # the exit line says the guest stayed here, and that it stops with the process
    assert "the guest stayed here and stops with this process" in src.stdout


def after(megabytes: int) -> Callable[[Milestones], bool]:
    return lambda m: m.bytes_down > megabytes << 20


def test_a_reset_and_a_stall_mid_stream_are_ridden_out(tmp_path: Path) -> None:
    def setup(proxy: FaultProxy) -> None:
        def blip() -> None:
            proxy.reset()
            proxy.stall(1.5)

        proxy.when(after(96), blip)

    src, got, proxy = migrate_through(tmp_path, setup)
    assert proxy.resets == 1
    assert_completed_and_equal(tmp_path, src, got)
    link = src.report["link"]
    assert link["resent_messages"] > 0 or link["reconnects"] > 0, link


def test_corrupted_chunks_are_sent_again(tmp_path: Path) -> None:
    def setup(proxy: FaultProxy) -> None:
        proxy.corrupt_down = 0.002  # 0.2% of 64 KiB chunks, source to destination
        proxy.corrupt_up = 0.002

    src, got, proxy = migrate_through(tmp_path, setup)
    assert proxy.corrupted > 0
    assert_completed_and_equal(tmp_path, src, got)
    assert got.report["link"]["corrupt_received"] > 0
    assert src.report["link"]["resent_messages"] > 0


def test_corruption_under_curve_is_ridden_out(tmp_path: Path) -> None:
    """With keys, a damaged message is a failed decryption: libzmq drops the connection (and
    reports it as a handshake failure), ZeroMQ reconnects with a new CURVE handshake, and the
    link resends what was lost. Nothing of it may fail the migration."""
    keys = make_keys(tmp_path / "keys")

    def setup(proxy: FaultProxy) -> None:
        proxy.corrupt_commands = True
        proxy.corrupt_down = 0.002
        proxy.corrupt_up = 0.002

    src, got, proxy = migrate_through(
        tmp_path, setup, extra=tuple(keys.source_args()), dest_extra=tuple(keys.dest_args())
    )
    assert proxy.corrupted > 0
    assert_completed_and_equal(tmp_path, src, got)
    assert got.stderr.count("peer key admitted") >= 3, "reconnected, and proved the key again"


def test_delay_jitter_and_a_rate_cap_slow_it_down_but_it_completes(tmp_path: Path) -> None:
    def setup(proxy: FaultProxy) -> None:
        proxy.delay_s = 0.005
        proxy.jitter_s = 0.005
        proxy.rate = 200e6

    src, got, _ = migrate_through(tmp_path, setup)
    assert_completed_and_equal(tmp_path, src, got)


@pytest.mark.parametrize(
    "milestone",
    [
        pytest.param(lambda m: m.round >= 1, id="after-round-1"),
        pytest.param(lambda m: m.switchover, id="switchover"),
        pytest.param(lambda m: m.verify_requests >= 1, id="verification"),
    ],
)
def test_a_reset_at_each_milestone_is_ridden_out(
    tmp_path: Path, milestone: Callable[[Milestones], bool]
) -> None:
    def setup(proxy: FaultProxy) -> None:
        def blip() -> None:
            proxy.reset()
            proxy.stall(1.2)

        proxy.when(milestone, blip)

    src, got, proxy = migrate_through(tmp_path, setup)
    assert proxy.resets == 1, "the milestone was reached and the fault fired"
    assert_completed_and_equal(tmp_path, src, got)


def test_a_link_cut_for_good_fails_cleanly_within_the_reconnect_timeout(tmp_path: Path) -> None:
    def setup(proxy: FaultProxy) -> None:
        proxy.when(after(96), proxy.cut)

    src, got, _ = migrate_through(tmp_path, setup, extra=("--reconnect-timeout", "3"))
    assert_failed_cleanly(tmp_path, src, got)
    assert "reconnecting for 3.0 s did not bring it back" in src.report["error"]
    lost = min(e["at_ms"] for e in src.report["timeline"] if e["event"].startswith("link lost"))
    # the source gave up 3 s after it last heard the destination: within its reconnect timeout
    assert src.report["total_time_ms"] - lost <= 3000 + 1500
    assert got.report["status"] == "failed" and "silent" in got.report["error"]


# -- postcopy: a broken link pauses both sides; they recover and finish ------------------------
POSTCOPY = ["--mode", "postcopy", "--postcopy-after-rounds", "0", "--postcopy-recover-timeout", "8"]
# The busy 512 MiB guest sends about 137 MiB after its switchover.
POSTCOPY_MIB = 137


@pytest.mark.parametrize(
    ("share", "fault"),
    [(0.1, "reset"), (0.5, "stall"), (0.9, "cut-and-restore")],
)
def test_postcopy_recovers_from_a_broken_link(tmp_path: Path, share: float, fault: str) -> None:
    def setup(proxy: FaultProxy) -> None:
        def reset() -> None:
            proxy.reset()
            proxy.stall(1.5)

        def stall() -> None:
            proxy.stall(2.5)  # longer than the peer timeout: both sides pause

        def cut_and_restore() -> None:
            proxy.cut()
            threading.Timer(3.0, proxy.restore).start()

        action = {"reset": reset, "stall": stall, "cut-and-restore": cut_and_restore}[fault]
        proxy.when(lambda m: m.switchover and m.bytes_down > int(share * POSTCOPY_MIB) << 20, action)

    src, got, proxy = migrate_through(tmp_path, setup, extra=tuple(POSTCOPY))
    assert any(fault.split("-")[0] in note for _, note in proxy.log), proxy.log
    assert_completed_and_equal(tmp_path, src, got)
    assert src.report["link"]["reconnects"] >= 1 or src.report["link"]["resent_messages"] > 0
    if fault != "reset":
        assert src.report["postcopy"]["recoveries"] >= 1
    assert src.report["guest"]["here"] is False


def test_postcopy_with_a_lost_destination_waits_for_the_operator_and_settles_once(tmp_path: Path) -> None:
    dest = Dest(tmp_path, "--stop-at-step", "100000000", "--peer-timeout", "1")
    control = dest.new_control_uri()
    try:
        with FaultProxy(("127.0.0.1", dest.port), seed=3) as proxy:
            proxy.when(lambda m: m.switchover and m.bytes_down > 40 << 20, proxy.cut)
            proc, report = start_source(
                tmp_path,
                *BUSY_512,
                "--seed",
                "3",
                "--migrate-to",
                proxy.uri,
                *LINK,
                *POSTCOPY[:-1],
                "3",
                "--control",
                control,
            )
            try:
                deadline = time.monotonic() + 40
                status: dict = {}
                while time.monotonic() < deadline:
                    reply = request(control, "status", timeout_s=2.0)
                    status = reply.get("result", {})
                    if status.get("status") == "unsettled":
                        break
                    time.sleep(0.2)
                assert status.get("status") == "unsettled", status
                assert "postcopy paused" in status["error"] and "ctl recover" in status["error"]
                assert status["guest"]["here"] is False, "never resumed here on its own"
                assert proc.poll() is None, "the source stays up: the destination needs its pages"
                there = request(dest.control, "status", timeout_s=2.0)["result"]
                assert there["phase"] == "postcopy" and there["guest"]["here"] is True
                # 'there' would drop the pages held only here: refused, and nothing changes
                refused = request(control, "settle", {"where": "there"}, timeout_s=5.0)
                assert not refused.get("ok") and "postcopy is not verified" in refused["error"], refused
                assert request(control, "status", timeout_s=2.0)["result"]["status"] == "unsettled"
                # the operator decides the destination is gone for good: the guest runs here again
                settled = request(control, "settle", {"where": "here"}, timeout_s=5.0)
                assert settled.get("ok"), settled
                assert settled["result"]["status"] == "cancelled" and settled["result"]["guest"]["here"]
                # the destination was not gone after all: when the link returns it hears that the
                # guest was taken back, and stops its copy rather than run it beside the source's
                proxy.restore()
                got = dest.finish(timeout=20)  # --once: it ends with the copy it stopped
                assert got.code != 0 and got.report["status"] == "failed", got.stderr[-2000:]
                assert "the source took the guest back" in got.report["error"]
                assert got.report["guest"] is None or got.report["guest"]["here"] is False
                assert "guest stopped here: the source runs it again" in got.stderr
                src = finish_source(proc, report, timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate(timeout=10)
    finally:
        dest.kill()
    assert src.report["status"] == "cancelled" and src.report["guest"]["here"] is True
