"""Precopy through the real daemons on loopback, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import zmq

from common.control import request
from common.wire import framing
from source_node.demo import free_port, wait_for_control
from tests.e2e import (
    SMALL_GUEST,
    SOURCE,
    Dest,
    busy_small_guest,
    finish_source,
    reference,
    run_source,
    same_guest,
    start_source,
)
from tests.protocol_harness import hello_of_version

pytestmark = pytest.mark.slow


def test_idle_guest_migrates_and_matches_reference(tmp_path: Path) -> None:
    guest = [*SMALL_GUEST, "--seed", "3", "--stop-at-step", "0"]
    dest = Dest(tmp_path, "--stop-at-step", "0")
    src = run_source(tmp_path, *guest, "--migrate-to", dest.uri)
    got = dest.finish()
    assert src.code == 0, src.stderr + "\n--- dest ---\n" + got.stderr
    assert got.code == 0, got.stderr
    report = src.report
    assert report["status"] == "completed" and report["error"] is None
    assert report["verification"]["ok"] is True
    assert report["downtime_ms"] is not None and report["downtime_ms"] > 0
    assert report["ram"]["skipped_pages"] > 0
    assert set(report) >= {
        "status",
        "mode",
        "error",
        "total_time_ms",
        "setup_time_ms",
        "downtime_ms",
        "expected_downtime_ms",
        "rounds",
        "ram",
        "tags",
        "throughput_bytes_per_s",
        "progress_percent",
        "remaining_bytes",
        "eta_s",
        "timeline",
        "rounds_detail",
        "dirty_pages_rate",
        "verification",
        "guest",
    }
    assert report["guest"]["here"] is False and report["guest"]["running"] is False
    assert got.report["guest"]["here"] is True
    assert got.report["guest"]["running"] is False, "stopped at --stop-at-step: here, but not running"
    assert same_guest(got.report["guest"], reference(tmp_path, *guest))
    assert "migration completed" in src.stdout


@pytest.mark.parametrize(
    "seed, stop, pace",
    [(7, 1500, "0"), (8, 2500, "800"), (9, 4000, "1000")],
)
def test_busy_guest_migrated_equals_unmigrated(tmp_path: Path, seed: int, stop: int, pace: str) -> None:
    guest = busy_small_guest(seed, stop, pace)
    # one destination places into memory it committed before the source came, one into fresh
    preallocate = ["--preallocate", "32MiB"] if seed == 8 else []
    dest = Dest(tmp_path, "--stop-at-step", str(stop), *preallocate)
    src = run_source(tmp_path, *guest, "--migrate-to", dest.uri, "--downtime-limit", "50")
    got = dest.finish()
    assert src.code == 0, src.stdout + src.stderr + "\n--- dest ---\n" + got.stderr
    assert got.code == 0
    switched_at = src.report["guest"]["step"]
    assert src.report["verification"]["ok"] is True
    # the paced guests need 3-4 s to reach their stop step: the switchover happens mid-run
    # and the destination runs the rest
    if pace != "0":
        assert switched_at < stop
    assert got.report["guest"]["step"] == stop
    assert same_guest(got.report["guest"], reference(tmp_path, *guest))
    # Nothing arrived damaged on a clean loopback: a guest write slipping into a batch sent
    # straight from guest memory (an in-process harness copies frames, so only here) would be.
    assert got.report["link"]["corrupt_received"] == 0 and src.report["link"]["resent_messages"] == 0
    if preallocate:
        assert got.report["preallocation"]["bytes"] == 32 << 20
        assert got.report["preallocation"]["seconds"] is not None
    else:
        assert got.report["preallocation"] is None


def test_a_busy_guest_over_three_channels_equals_unmigrated(tmp_path: Path) -> None:
    guest = [*busy_small_guest(12, 3000, "1000"), "--ram", "64MiB", "--fill", "random"]
    dest = Dest(tmp_path, "--stop-at-step", "3000")
    src = run_source(tmp_path, *guest, "--migrate-to", dest.uri, "--channels", "3", "--downtime-limit", "50")
    got = dest.finish()
    assert src.code == 0, src.stdout + src.stderr + "\n--- dest ---\n" + got.stderr
    assert src.report["verification"]["ok"] is True
    assert src.report["link"]["channels"] == got.report["link"]["channels"] == 3
    batches = got.report["link"]["channel_batches"]
    assert len(batches) == 3 and min(batches) > 0, f"every channel carried batches: {batches}"
    assert src.report["guest"]["step"] < 3000, "switched over while the guest ran"
    assert same_guest(got.report["guest"], reference(tmp_path, *guest))


def test_tag_only_workload_resends_tag_sections(tmp_path: Path) -> None:
    """Under the default kvm model, where a retagged page is only 'dirty': the source finds
    that its data did not change, and sends tag sections alone (no device writes data here)."""
    common = [*SMALL_GUEST, "--seed", "4", "--steps-per-second", "2000", "--stop-at-step", "3000"]
    common += ["--device-period", "0"]
    idle_dest = Dest(tmp_path, "--stop-at-step", "0")
    idle = run_source(
        tmp_path, *SMALL_GUEST, "--seed", "4", "--stop-at-step", "0", "--device-period", "0",
        "--migrate-to", idle_dest.uri,
    )  # fmt: skip
    idle_dest.finish()
    dest = Dest(tmp_path, "--stop-at-step", "3000")
    busy = run_source(
        tmp_path, *common, "--tag-only-share", "1", "--migrate-to", dest.uri, "--downtime-limit", "20"
    )
    got = dest.finish()
    assert busy.code == 0 and idle.code == 0
    assert busy.report["rounds"] >= 2
    # no data page changed after boot: exactly the pages of the idle migration, no more
    assert busy.report["ram"]["pages"] == idle.report["ram"]["pages"]
    assert busy.report["tags"]["sections"] > idle.report["tags"]["sections"]
    model = busy.report["dirty_model"]
    assert model["model"] == "kvm" and model["changed_tags_only"] > 0 and model["changed_data_only"] == 0
    assert same_guest(got.report["guest"], reference(tmp_path, *common, "--tag-only-share", "1"))


def test_guest_faster_than_bandwidth_cap_is_throttled_to_convergence(tmp_path: Path) -> None:
    # A CPU-bound guest dirties its 4 MiB working set many times a second; at 4 MiB/s the
    # expected downtime stays near a second until auto-converge holds the vCPU back to a few
    # percent of its time: without the throttle this migration cannot finish.
    guest = [
        "--ram",
        "16MiB",
        "--working-set",
        "4MiB",
        "--seed",
        "5",
        "--dirty-pages-per-step",
        "16",
        "--stop-at-step",
        "15000",
    ]
    dest = Dest(tmp_path, "--stop-at-step", "15000")
    src = run_source(
        tmp_path,
        *guest,
        "--migrate-to",
        dest.uri,
        "--max-bandwidth",
        "4MiB",
        "--downtime-limit",
        "100",
        "--convergence-timeout",
        "25",
    )
    got = dest.finish()
    report = src.report
    assert src.code == 0 and report["status"] == "completed", report["error"]
    assert report["throttle"] >= 0.5, report["throttle"]
    assert report["rounds"] >= 4
    assert src.report["guest"]["step"] < 15000, "the switchover came before the guest finished"
    assert report["verification"]["ok"] is True
    assert same_guest(got.report["guest"], reference(tmp_path, *guest))


def slow_migration(tmp_path: Path) -> tuple[list[str], list[str]]:
    guest = [
        "--ram",
        "64MiB",
        "--fill",
        "random",
        "--working-set",
        "2MiB",
        "--seed",
        "6",
        "--steps-per-second",
        "2000",
        "--stop-at-step",
        "8000",
    ]
    return guest, ["--max-bandwidth", "8MiB", "--peer-timeout", "1.5"]


def test_cancel_keeps_guest_on_source(tmp_path: Path) -> None:
    guest, knobs = slow_migration(tmp_path)
    dest = Dest(tmp_path, "--stop-at-step", "8000")
    control = dest.new_control_uri()
    proc, path = start_source(tmp_path, *guest, *knobs, "--migrate-to", dest.uri, "--control", control)
    time.sleep(1.5)
    status = request(control, "status")
    assert status["ok"] and status["result"]["status"] == "active", status
    cancel = subprocess.run(
        [*SOURCE, "ctl", "--control", control, "cancel"], capture_output=True, text=True, timeout=30
    )
    assert cancel.returncode == 0, cancel.stderr
    src = finish_source(proc, path)
    got = dest.finish()
    assert src.code != 0
    assert src.report["status"] == "cancelled" and "cancelled" in src.report["error"]
    assert src.report["guest"]["here"] is True
    assert src.report["guest"]["step"] == 8000  # it kept running here to the end
    assert same_guest(src.report["guest"], reference(tmp_path, *guest))
    assert got.code != 0
    assert got.report["status"] == "cancelled" and got.report["guest"]["here"] is False


def test_destination_killed_mid_migration_keeps_guest_on_source(tmp_path: Path) -> None:
    guest, knobs = slow_migration(tmp_path)
    dest = Dest(tmp_path, "--stop-at-step", "8000")
    # nothing comes back: 3 s of reconnecting (not the default 10) shows it as well
    proc, path = start_source(tmp_path, *guest, *knobs, "--reconnect-timeout", "3", "--migrate-to", dest.uri)
    time.sleep(1.5)
    dest.kill()
    src = finish_source(proc, path)
    assert src.code != 0
    assert src.report["status"] == "failed"
    assert "silent" in src.report["error"] or "lost" in src.report["error"]
    assert src.report["guest"]["here"] is True
    assert same_guest(src.report["guest"], reference(tmp_path, *guest))
    assert "the guest stayed here and stops with this process, at step 8000" in src.stdout
    assert "the guest keeps running here; this process ends when it stops" in src.stderr


def test_injected_mismatch_is_repaired(tmp_path: Path) -> None:
    guest = [*SMALL_GUEST, "--seed", "12", "--stop-at-step", "200"]
    page = 600  # past the working set, in a random-filled stripe: sent once, never rewritten
    dest = Dest(tmp_path, "--stop-at-step", "200", "--debug-corrupt-page", str(page))
    src = run_source(tmp_path, *guest, "--migrate-to", dest.uri)
    got = dest.finish()
    assert src.code == 0, src.stderr
    assert src.report["verification"]["ok"] is True
    assert src.report["verification"]["mismatched_pages"] == [page]
    assert same_guest(got.report["guest"], reference(tmp_path, *guest))


def test_hostile_peers_change_nothing(tmp_path: Path) -> None:
    dest = Dest(tmp_path, "--stop-at-step", "100", "--auth-token", "s3cret")
    ctx = zmq.Context.instance()
    stranger = ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(dest.uri)
    stranger.send_multipart([b"garbage", b"more", b"frames"])
    stranger.send_multipart(framing.encode(hello_of_version(99)))
    for _ in range(20):  # a flood: counted in the log, not a line each
        stranger.send_multipart([b"junk"])
    replies = []
    while stranger.poll(3000) and len(replies) < 2:
        replies.append(framing.decode(stranger.recv_multipart()))
    stranger.close()
    assert [r.kind for r in replies[:2]] == ["abort", "hello_ack"]
    assert "frames" in replies[0].envelope.abort.reason
    assert "protocol version 99 is not supported" in replies[1].envelope.hello_ack.reason
    status = request(dest.control, "status")["result"]
    assert status["phase"] == "waiting" and status["refused_messages"] == 22
    # a source without the token is refused, and keeps its guest
    guest = [*SMALL_GUEST, "--seed", "2", "--stop-at-step", "100"]
    refused = run_source(tmp_path, *guest, "--migrate-to", dest.uri)
    assert refused.code != 0 and "the source gave none" in refused.report["error"], "not 'does not match'"
    assert refused.report["guest"]["here"] is True
    # and the right source still gets in
    ok = run_source(tmp_path, *guest, "--migrate-to", dest.uri, "--auth-token", "s3cret")
    got = dest.finish()
    assert ok.code == 0, ok.stderr
    assert got.code == 0 and same_guest(got.report["guest"], reference(tmp_path, *guest))
    # the destination's operator sees each refused source, and why
    refusals = [json.loads(line) for line in got.stderr.splitlines() if '"source refused"' in line]
    assert len(refusals) == 2, got.stderr
    assert "protocol version 99" in refusals[0]["reason"] and "gave none" in refusals[1]["reason"]
    flood = [json.loads(line) for line in got.stderr.splitlines() if '"messages refused"' in line]
    assert sum(e["count"] for e in flood) == 21 and len(flood) <= 3, "all counted, in a few lines"


def test_control_endpoint_refuses_bad_requests(tmp_path: Path) -> None:
    dest = Dest(tmp_path)
    try:
        assert "unknown command" in request(dest.control, "reboot")["error"]
        assert request(dest.control, "cancel")["ok"] is False
        ctx = zmq.Context.instance()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(dest.control)
        req.send(b"{not json")
        assert req.poll(3000)
        assert json.loads(req.recv())["error"] == "request is not JSON"
        req.close()
    finally:
        dest.kill()


def test_source_with_no_destination_fails_clearly(tmp_path: Path) -> None:
    src = run_source(
        tmp_path,
        *SMALL_GUEST,
        "--stop-at-step",
        "50",
        "--migrate-to",
        f"tcp://127.0.0.1:{free_port()}",
        "--peer-timeout",
        "1",
    )
    assert src.code != 0
    assert "no answer from the destination" in src.report["error"]
    assert src.report["guest"]["here"] is True and src.report["guest"]["step"] == 50
    assert "Traceback" not in src.stderr


def test_demo_runs_a_watchable_migration(tmp_path: Path) -> None:
    # the tree under test, through this interpreter: not whatever source-node is on PATH; its
    # temporary folder goes under tmp_path, so that one left behind is seen
    done = subprocess.run(
        [*SOURCE, "demo", "--ram", "32MiB", "--working-set", "4MiB"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "migration completed" in done.stdout
    assert "\nverification: ok (ram " in done.stdout, "the report in short, as ctl status prints it"
    assert list(tmp_path.iterdir()) == [], "the demo cleans up after itself"
    stepping = re.search(
        r"the guest runs on the destination: step (\d+) -> (\d+) one second later", done.stdout
    )
    assert stepping, done.stdout
    assert int(stepping[2]) > int(stepping[1]), "the guest must advance on the destination"


def wait_status(control: str, want: set[str], timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = request(control, "status")
        if reply.get("ok") and reply["result"]["status"] in want:
            return reply["result"]
        time.sleep(0.1)
    raise AssertionError(f"status never became one of {want}")


def test_daemon_migrates_on_command_and_takes_new_parameters(tmp_path: Path) -> None:
    guest = [
        "--ram",
        "64MiB",
        "--fill",
        "random",
        "--working-set",
        "2MiB",
        "--seed",
        "10",
        "--steps-per-second",
        "500",
        "--stop-at-step",
        "3000",
    ]
    dest = Dest(tmp_path, "--stop-at-step", "3000")
    control = dest.new_control_uri()
    # a long-running source: no --migrate-to, steered only through its control endpoint
    proc, path = start_source(tmp_path, *guest, "--control", control, "--max-bandwidth", "2MiB")
    assert wait_for_control(control).get("ok")
    assert request(control, "status")["result"]["status"] == "none"
    bad = request(control, "migrate", {"uri": "http://example"})
    assert bad["ok"] is False and "not a tcp://" in bad["error"]
    no_port = request(control, "migrate", {"uri": "tcp://127.0.0.1"})
    assert no_port["ok"] is False and "is not tcp://HOST:PORT" in no_port["error"]
    assert request(control, "status")["result"]["guest"]["here"] is True, "the daemon and guest live on"
    assert request(control, "migrate", {"uri": dest.uri})["ok"]
    busy = request(control, "migrate", {"uri": dest.uri})
    assert busy["ok"] is False and "already in progress" in busy["error"]
    time.sleep(1.0)
    assert request(control, "status")["result"]["status"] == "active"  # 64 MiB at 2 MiB/s
    refused = request(control, "set-parameters", {"window": 3})
    assert refused["ok"] is False and "cannot set window" in refused["error"]
    not_finite = request(control, "set-parameters", {"convergence_timeout_s": "nan"})
    assert not_finite["ok"] is False and "finite" in not_finite["error"]
    lifted = request(control, "set-parameters", {"max_bandwidth": 0, "downtime_limit_ms": 100})
    assert lifted["ok"] and lifted["result"]["max_bandwidth"] == 0
    done = wait_status(control, {"completed", "failed"})
    assert done["status"] == "completed", done["error"]
    assert done["downtime_limit_ms"] == 100
    proc.terminate()  # a daemon runs until told to stop
    src = finish_source(proc, path)
    got = dest.finish()
    assert src.code == 0 and src.report["verification"]["ok"] is True
    assert same_guest(got.report["guest"], reference(tmp_path, *guest))
