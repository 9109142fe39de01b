"""Choices made per migration from ctl, on both daemons, with the events and the status that
follow them: a precopy cancelled and tried again in postcopy without restarting the guest's
process, postcopy started by hand, a middle node's onward hop capped and run in postcopy,
and what a destination's status says of both directions."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from common.control import request
from tests.e2e import (
    DEST,
    SMALL_GUEST,
    SOURCE,
    Dest,
    finish_source,
    free_ports,
    reference,
    same_guest,
    start_source,
)
from tests.test_e2e_chain import wait_for

pytestmark = pytest.mark.slow

PACED = [*SMALL_GUEST, "--seed", "12", "--steps-per-second", "500", "--dirty-pages-per-step", "8"]


def ctl(prog: list[str], control: str, *args: str, json_out: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prog, "ctl", "--control", control, *args, *(["--json"] if json_out else [])],
        capture_output=True,
        text=True,
        timeout=30,
    )


def answer(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def phase_is(control: str, phase: str) -> Any:
    return lambda: (lambda s: s if s.get("phase") == phase else None)(
        request(control, "status", timeout_s=1.0).get("result") or {}
    )


def test_a_precopy_is_cancelled_and_tried_again_in_postcopy_started_by_hand(tmp_path: Path) -> None:
    stop = 2000
    first_dest_port, control_port = free_ports(2)
    control = f"tcp://127.0.0.1:{control_port}"
    # the first destination lives on after an incoming migration fails (no --once)
    kept = subprocess.Popen(
        [*DEST, "--listen", f"tcp://127.0.0.1:{first_dest_port}", "--control", f"ipc://{tmp_path}/kept.ctl"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    dest = Dest(tmp_path, "--stop-at-step", str(stop))
    source, report = start_source(tmp_path, *PACED, "--stop-at-step", str(stop), "--control", control)
    events = None
    try:
        wait_for("the source's control endpoint", lambda: request(control, "status", timeout_s=1.0).get("ok"))
        assert (
            answer(ctl(SOURCE, control, "set-parameters", "max_bandwidth=1MiB"))["max_bandwidth"] == 1 << 20
        )
        # a precopy: postcopy was not allowed for it, and the advice is a per-migration one
        answer(ctl(SOURCE, control, "migrate", f"tcp://127.0.0.1:{first_dest_port}", "--mode", "precopy"))
        wait_for("the precopy to be active", phase_is(control, "active"))
        refused = ctl(SOURCE, control, "postcopy-start")
        assert refused.returncode == 1 and json.loads(refused.stdout)["ok"] is False
        assert "ctl migrate URI --mode postcopy" in refused.stderr, refused.stderr
        answer(ctl(SOURCE, control, "cancel"))
        wait_for(
            "the first destination to remember the cancelled migration",
            lambda: (request(f"ipc://{tmp_path}/kept.ctl", "status", timeout_s=1.0).get("result") or {}).get(
                "last_incoming"
            ),
        )
        kept_text = ctl(DEST, f"ipc://{tmp_path}/kept.ctl", "status", json_out=False).stdout
        assert kept_text.startswith("last incoming migration: cancelled (precopy"), kept_text
        assert "waiting for a source" in kept_text
        # plaintext off this machine is a choice of the migration, named as ctl spells it
        far = ctl(SOURCE, control, "migrate", "tcp://10.0.0.1:4444")
        assert far.returncode == 1 and "ctl migrate --insecure" in far.stderr, far.stderr
        # the same process tries again, postcopy allowed, switched over only when told (the
        # 1 MiB/s cap holds the precopy back; postcopy's background has a cap of its own)
        events = subprocess.Popen(
            [*SOURCE, "ctl", "--control", control, "events", "--until-finished"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        answer(
            ctl(
                SOURCE, control, "migrate", dest.uri, "--mode", "postcopy", "--postcopy-after-rounds", "never"
            )
        )
        status = wait_for("the postcopy-allowed precopy to be active", phase_is(control, "active"))
        assert status["postcopy_allowed"] is True and status["mode"] == "precopy" and status["rounds"] >= 1
        time.sleep(0.5)
        assert request(control, "status")["result"]["phase"] == "active", "no switchover on its own"
        answer(ctl(SOURCE, control, "postcopy-start"))
        out, err = events.communicate(timeout=90)
        assert events.returncode == 0, err
        # a source with a control endpoint is a daemon: it stays (QEMU's postmigrate) until told
        wait_for("the source to see it completed", phase_is(control, "completed"))
        source.send_signal(signal.SIGTERM)
        got = finish_source(source, report, timeout=30)
        finished = dest.finish(timeout=60)
    finally:
        for proc in (source, kept, *([events] if events else [])):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=10)
        dest.kill()
    assert got.code == 0, got.stderr[-3000:]
    assert got.report["mode"] == "postcopy" and got.report["status"] == "completed"
    # one downtime, the same on both sides, its parts each measured where they happen
    assert got.report["downtime_ms"] == finished.report["downtime_ms"] is not None
    assert got.report["downtime_parts_ms"] == finished.report["downtime_parts_ms"]
    assert finished.code == 0 and same_guest(
        finished.report["guest"], reference(tmp_path, *PACED, "--stop-at-step", str(stop))
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["seq"] for e in lines] == sorted({e["seq"] for e in lines}), "each event once, in order"
    sessions = {e["session"] for e in lines}
    assert len(sessions) == 2, "the cancelled precopy and the postcopy"
    last = [e for e in lines if e["session"] == lines[-1]["session"]]
    phases = [e["phase"] for e in last if e["event"] == "MIGRATION"]
    assert phases[:2] == ["setup", "active"] and "postcopy" in phases and phases[-1] == "completed", phases
    assert any(e["event"] == "MIGRATION_PASS" and e["round"] == 1 for e in last)
    assert last[-1]["event"] == "MIGRATION_FINISHED" and last[-1]["status"] == "completed"
    first = [e for e in lines if e["session"] != last[0]["session"]]
    assert first[-1]["event"] == "MIGRATION_FINISHED" and first[-1]["status"] == "cancelled"
    assert all(e["direction"] == "outgoing" for e in lines)


def test_a_middle_node_caps_its_onward_hop_and_runs_it_in_postcopy(tmp_path: Path) -> None:
    b_stop, c_stop = 1500, 2500
    c = Dest(tmp_path, "--stop-at-step", str(c_stop))
    b = Dest(tmp_path, "--stop-at-step", str(b_stop))
    try:
        a_proc, a_report = start_source(
            tmp_path, *PACED, "--stop-at-step", str(c_stop), "--migrate-to", b.uri
        )
        wait_for("the guest to run on B", phase_is(b.control, "running"))
        assert finish_source(a_proc, a_report, timeout=60).code == 0
        # B's parameters are those of the hops it sends on
        assert (
            answer(ctl(DEST, b.control, "set-parameters", "max_bandwidth=2MiB"))["max_bandwidth"] == 2 << 20
        )
        assert answer(ctl(DEST, b.control, "parameters"))["max_bandwidth"] == 2 << 20
        answer(
            ctl(DEST, b.control, "migrate", c.uri, "--mode", "postcopy", "--postcopy-after-rounds", "never")
        )

        def onward_active() -> dict | None:
            status = request(b.control, "status", timeout_s=1.0).get("result") or {}
            return status if (status.get("outgoing") or {}).get("phase") == "active" else None

        wait_for("B's onward hop to be active", onward_active)
        text = ctl(DEST, b.control, "status", json_out=False).stdout
        # the hop in progress comes first, in full; the incoming one that brought the guest in a line
        assert text.startswith("outgoing migration: active (precopy, phase active)"), text
        assert "\nincoming migration: completed (precopy" in text
        answer(ctl(DEST, b.control, "postcopy-start"))
        got_b = b.finish(timeout=60)
        got_c = c.finish(timeout=60)
    finally:
        b.kill()
        c.kill()
    assert got_b.code == 0, got_b.stderr[-3000:]
    outgoing = got_b.report["outgoing"]
    assert outgoing["status"] == "completed" and outgoing["mode"] == "postcopy", outgoing.get("error")
    assert got_c.code == 0 and got_c.report["mode"] == "postcopy"
    assert outgoing["downtime_ms"] == got_c.report["downtime_ms"] is not None, "one figure on both sides"
    assert same_guest(got_c.report["guest"], reference(tmp_path, *PACED, "--stop-at-step", str(c_stop)))


@pytest.mark.faults
def test_recover_takes_the_destinations_new_address(tmp_path: Path) -> None:
    """QMP's migrate with resume=true takes a new URI: the path to the destination through proxy
    A is gone for good, and `ctl recover URI` resumes the postcopy through proxy B."""
    from faultinject.proxy import FaultProxy

    stop = 1500
    guest = [*PACED, "--ram", "32MiB", "--fill", "random", "--stop-at-step", str(stop)]
    dest = Dest(tmp_path, "--stop-at-step", str(stop), "--peer-timeout", "1")
    control = dest.new_control_uri()
    link = ["--peer-timeout", "1", "--postcopy-recover-timeout", "2", "--max-postcopy-bandwidth", "16MiB"]
    try:
        with FaultProxy(("127.0.0.1", dest.port)) as first, FaultProxy(("127.0.0.1", dest.port)) as second:
            first.when(lambda m: m.switchover and m.bytes_down > 4 << 20, first.cut)
            source, report = start_source(
                tmp_path,
                *guest,
                "--mode",
                "postcopy",
                "--postcopy-after-rounds",
                "0",
                *link,
                "--migrate-to",
                first.uri,
                "--control",
                control,
            )
            wait_for(
                "the postcopy to wait for an operator",
                lambda: (
                    (request(control, "status", timeout_s=1.0).get("result") or {}).get("status")
                    == "unsettled"
                ),
                timeout_s=60,
            )
            recovered = ctl(SOURCE, control, "recover", second.uri)
            assert recovered.returncode == 0, recovered.stderr
            got = finish_source(source, report, timeout=90)
            finished = dest.finish(timeout=60)
            assert second.milestones.bytes_down > 0, "the recovery went through the new address"
    finally:
        dest.kill()
    assert got.code == 0, got.stderr[-3000:]
    assert got.report["status"] == "completed" and got.report["postcopy"]["recoveries"] >= 1
    assert "recovering to a new address" in got.stderr
    assert finished.code == 0 and same_guest(finished.report["guest"], reference(tmp_path, *guest))
