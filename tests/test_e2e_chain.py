"""A guest sent on from the node it was migrated to (A -> B -> C), through the real daemons."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.control import request
from faultinject.proxy import FaultProxy
from tests.e2e import SMALL_GUEST, Dest, finish_source, reference, same_guest, start_source

pytestmark = pytest.mark.slow

# Paced, so that B is still running the guest when it is told to send it on.
GUEST = [*SMALL_GUEST, "--seed", "8", "--steps-per-second", "500", "--dirty-pages-per-step", "8"]
B_STOPS, C_STOPS = 1500, 2500


def wait_for(what: str, holds, timeout_s: float = 30.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = holds()
        if status:
            return status
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_middle_node_whose_guest_stops_sees_its_onward_migration_through(tmp_path: Path) -> None:
    """B's guest reached --stop-at-step while B -> C still ran: B exited 0 without a word, and C
    waited, then discarded the guest."""
    c = Dest(tmp_path, "--stop-at-step", str(C_STOPS))
    b = Dest(tmp_path, "--stop-at-step", str(B_STOPS))
    try:
        a_proc, a_report = start_source(
            tmp_path, *GUEST, "--stop-at-step", str(C_STOPS), "--migrate-to", b.uri
        )

        def b_runs_it() -> dict | None:
            status = request(b.control, "status", timeout_s=1.0).get("result") or {}
            return status if status.get("phase") == "running" else None

        wait_for("the guest to run on B", b_runs_it)
        a = finish_source(a_proc, a_report, timeout=60)
        assert a.code == 0, a.stderr[-2000:]
        with FaultProxy(("127.0.0.1", c.port)) as proxy:
            # the onward stream is held up once it has begun, until B's guest has stopped there
            proxy.when(lambda m: m.bytes_down > 256 << 10, lambda: proxy.stall(20.0))
            started = request(b.control, "migrate", {"uri": proxy.uri})
            assert started.get("ok"), started

            def b_guest_stopped() -> dict | None:
                status = request(b.control, "status", timeout_s=1.0).get("result") or {}
                guest = status.get("guest") or {}
                return status if guest.get("step") == B_STOPS and not guest.get("running") else None

            wait_for("B's guest to reach its --stop-at-step", b_guest_stopped)
            time.sleep(1.0)  # B exited here, its migration to C abandoned
            assert b.proc.poll() is None, "B waits for its onward migration to end"
            proxy.stall(0.0)
            got_b = b.finish(timeout=60)
            got_c = c.finish(timeout=60)
    finally:
        b.kill()
        c.kill()
    assert got_b.code == 0, got_b.stderr[-2000:]
    assert got_b.report["outgoing"]["status"] == "completed", got_b.report["outgoing"].get("error")
    assert got_c.code == 0 and got_c.report["guest"]["here"] is True, got_c.stderr[-2000:]
    assert same_guest(got_c.report["guest"], reference(tmp_path, *GUEST, "--stop-at-step", str(C_STOPS)))
