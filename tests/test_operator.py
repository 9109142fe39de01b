"""What an operator sees and types: the live line on a terminal, progress in a log, the short
status, parameters read back and changed, help texts, an interrupted reference run, a cancel
followed by a second migration, and the plot."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from common.control import request
from common.ctl import build_parser, commands_for
from common.endpoints import same_endpoint
from common.progress import Progress, progress_line
from tests.e2e import DEST, SMALL_GUEST, SOURCE, Dest, finish_source, free_port, start_source
from tests.test_e2e_precopy import slow_migration, wait_status

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


# -- the live line and progress in a log ------------------------------------------------------------
@pytest.mark.slow
def test_the_live_line_on_a_terminal_is_never_run_into_by_a_log_line(tmp_path: Path) -> None:
    guest, knobs = slow_migration(tmp_path)
    dest = Dest(tmp_path, "--stop-at-step", "8000")
    master, slave = pty.openpty()
    report = tmp_path / "source.json"
    proc = subprocess.Popen(
        [*SOURCE, *guest, *knobs, "--migrate-to", dest.uri, "--report", str(report)],
        stdout=slave,
        stderr=slave,
        stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    dest.finish()
    text = screen.decode(errors="replace")
    assert proc.returncode == 0, text
    live = [part for part in re.split(r"[\r\n]", text) if part.startswith("[precopy] [")]
    assert live, text
    assert any(
        re.search(r"\[ *\d+\.\d %\] active round \d+ \| [\d.]+ [KMG]iB left", part) for part in live
    ), live
    assert all("/s | expected downtime" in part or "completed" in part for part in live)
    # every log line starts at the left margin: none continues a live line
    for part in live:
        assert not TIMESTAMP.search(part), f"a log line ran into the live line: {part!r}"
    assert any(TIMESTAMP.search(part) for part in re.split(r"[\r\n]", text)), "the log lines are there"
    assert "\x1b[K" in text


def test_off_a_terminal_progress_is_an_event_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    events: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def info(self, event: str, **fields: Any) -> None:
            events.append((event, fields))

    clock = [100.0]
    monkeypatch.setattr("common.progress.time.monotonic", lambda: clock[0])
    progress = Progress(io.StringIO(), log=Log(), log_interval_s=5.0)
    report = {
        "status": "active",
        "phase": "active",
        "rounds": 2,
        "progress_percent": 40.0,
        "remaining_bytes": 3 << 20,
    }
    for _ in range(60):  # 12 s of loop turns, 0.2 s apart
        if progress.wanted():
            progress.update(report)
        clock[0] += 0.2
    assert [e for e, _ in events] == ["migration progress", "migration progress"], "at 5 s and 10 s"
    assert events[0][1]["progress_percent"] == 40.0 and events[0][1]["remaining_bytes"] == 3 << 20
    progress.update({**report, "status": "completed"}, force=True)
    assert len(events) == 2, "the end is its own event, not a progress one"


def test_the_live_line_names_its_units_and_says_how_a_migration_ended() -> None:
    line = progress_line(
        {
            "status": "active",
            "mode": "precopy",
            "phase": "active",
            "rounds": 3,
            "progress_percent": 45.0,
            "remaining_bytes": 300 << 20,
            "eta_s": 12.34,
            "throughput_bytes_per_s": 25 << 20,
            "expected_downtime_ms": 120.0,
            "throttle": 0.2,
        }
    )
    assert line == (
        "[precopy] [ 45.0 %] active round 3 | 300 MiB left, ~12.3 s | 25 MiB/s | "
        "expected downtime 120.0 ms | throttle 20%"
    )
    cancelled = progress_line(
        {
            "status": "cancelled",
            "mode": "precopy",
            "error": "cancelled by the operator",
            "remaining_bytes": None,
        }
    )
    assert "cancelled: cancelled by the operator" in cancelled and "left" not in cancelled


# -- reports -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_interrupted_reference_run_says_so_and_fails(tmp_path: Path) -> None:
    report = tmp_path / "ref.json"
    proc = subprocess.Popen(
        [*SOURCE, *SMALL_GUEST, "--stop-at-step", "100000000", "--report", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert "guest booted" in proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    written = json.loads(report.read_text())
    assert written["status"] == "interrupted"
    assert re.fullmatch(r"interrupted by SIGINT at step \d+ of 100000000", written["error"])
    assert written["guest"]["here"] is True and written["guest"]["running"] is False


# -- parameters and commands ------------------------------------------------------------------------
@pytest.mark.slow
def test_parameters_are_read_back_changed_in_any_size_spelling_and_logged(tmp_path: Path) -> None:
    control = f"tcp://127.0.0.1:{free_port()}"
    proc, _ = start_source(tmp_path, *SMALL_GUEST, "--stop-at-step", "100000000", "--control", control)
    try:
        wait_status(control, {"none"})
        ctl = [*SOURCE, "ctl", "--control", control]
        before = run(*ctl, "parameters")
        assert before.returncode == 0, before.stderr
        assert before.stdout.strip() == (
            "parameters: convergence_timeout_s=60 downtime_limit_ms=300 max_bandwidth=unlimited "
            "max_postcopy_bandwidth=unlimited reconnect_timeout_s=10"
        )
        listed = json.loads(run(*ctl, "parameters", "--json").stdout)
        assert list(listed) == [p.split("=")[0] for p in before.stdout.split()[1:]], "the JSON's order"
        changed = run(*ctl, "set-parameters", "max_bandwidth=20MiB", "downtime-limit-ms=50")
        assert changed.returncode == 0, changed.stderr
        assert "max_bandwidth=20 MiB/s" in changed.stdout and "downtime_limit_ms=50" in changed.stdout
        back = json.loads(run(*ctl, "parameters", "--json").stdout)
        assert back["max_bandwidth"] == 20 << 20 and back["downtime_limit_ms"] == 50.0
        for bad, why in (("downtime_limit_ms=nan", "finite"), ("max_bandwidth=fast", "not a size")):
            refused = run(*ctl, "set-parameters", bad)
            assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        # the connection options go before or after the command
        status = run(*SOURCE, "ctl", "status", "--control", control, "--timeout", "2")
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith("migration: none yet\nguest: here, running, step ")
        assert len(status.stdout.splitlines()) <= 4, "a short form; --json has the whole report"
        assert json.loads(run(*ctl, "status", "--json").stdout)["guest"]["here"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    logged = [json.loads(line) for line in err.splitlines() if '"parameters changed"' in line]
    assert logged == [
        {**logged[0], "max_bandwidth": "0 -> 20971520", "downtime_limit_ms": "300.0 -> 50.0"}
    ], "each change logged once, old -> new; refused ones not at all"


@pytest.mark.slow
def test_each_daemon_is_offered_exactly_the_commands_it_answers(tmp_path: Path) -> None:
    dest = Dest(tmp_path)
    control = f"tcp://127.0.0.1:{free_port()}"
    proc, _ = start_source(tmp_path, *SMALL_GUEST, "--stop-at-step", "100000000", "--control", control)
    try:
        wait_status(control, {"none"})
        for address, source in ((control, True), (dest.control, False)):
            error = request(address, "no-such-command")["error"]
            known = error.split("known: ")[1].split(", ")
            assert sorted(known) == sorted(commands_for(source=source))
        dest_help = run(*DEST, "ctl", "--help").stdout
        # a destination sends its guest on as a source does: the same choices for that hop
        for command in ("postcopy-start", "set-parameters", "parameters", "migrate", "recover", "events"):
            assert command in dest_help
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        dest.kill()


def test_ctl_takes_its_options_on_either_side_of_the_command() -> None:
    parser = build_parser("source-node ctl", source=True)
    late = parser.parse_args(["status", "--control", "tcp://127.0.0.1:5555", "--timeout", "1"])
    early = parser.parse_args(["--control", "tcp://127.0.0.1:5555", "--timeout", "1", "status"])
    assert (late.control, late.timeout) == (early.control, early.timeout) == ("tcp://127.0.0.1:5555", 1.0)
    assert parser.parse_args(["--control", "ipc:///tmp/x", "status"]).timeout == 5.0


@pytest.mark.slow
def test_help_texts_name_every_subcommand_and_unit() -> None:
    main = run(*SOURCE, "--help").stdout
    for words in ("source-node ctl", "source-node demo", "source-node plot", "--ram SIZE", "--downtime-limit MS",
                  "--peer-timeout S", "--stop-at-step N", "powers of 1024"):  # fmt: skip
        assert words in main, words
    assert "dest-node ctl" in run(*DEST, "--help").stdout
    for command in (SOURCE, DEST):
        version = run(*command, "--version")
        assert version.returncode == 0 and re.fullmatch(r"(source|dest)-node \d+\.\d+\.\d+\n", version.stdout)
    demo_help = run(*SOURCE, "demo", "--help").stdout
    for option in (
        "--ram SIZE",
        "--working-set SIZE",
        "--dirty-pages-per-step N",
        "--downtime-limit MS",
        "--seed N",
    ):
        assert option in demo_help, option
    # 1GB is a gibibyte: the demo checks the guest before it starts a destination
    too_small = run(*SOURCE, "demo", "--ram", "1GB", "--working-set", "2G")
    assert too_small.returncode == 2 and "--working-set 2 GiB does not fit in --ram 1 GiB" in too_small.stderr
    assert "demo: destination listening" not in too_small.stdout
    bad = run(*SOURCE, "demo", "--ram", "1XB")
    assert bad.returncode == 2 and "source-node demo: error: argument --ram" in bad.stderr
    assert "usage: source-node demo" in bad.stderr, "the demo's usage, not the main one"
    zero = run(*SOURCE, "--peer-timeout", "0", "--migrate-to", "tcp://127.0.0.1:4444")
    assert "argument --peer-timeout: must be more than 0" in zero.stderr and "heartbeat" not in zero.stderr


@pytest.mark.slow
def test_a_cancel_then_a_new_migration_logs_each_once(tmp_path: Path) -> None:
    guest, knobs = slow_migration(tmp_path)
    first, second = Dest(tmp_path, "--stop-at-step", "8000"), Dest(tmp_path, "--stop-at-step", "8000")
    control = f"tcp://127.0.0.1:{free_port()}"
    proc, path = start_source(tmp_path, *guest, *knobs, "--control", control)
    try:
        assert request(control, "migrate", {"uri": first.uri})["ok"]
        wait_status(control, {"active"})
        assert request(control, "cancel")["ok"]
        wait_status(control, {"cancelled"})
        assert request(control, "set-parameters", {"max_bandwidth": "0"})["ok"]
        assert request(control, "migrate", {"uri": second.uri})["ok"]
        wait_status(control, {"completed"})
    finally:
        proc.send_signal(signal.SIGTERM)  # a daemon with --control lives on after its migrations
        src = finish_source(proc, path)
        first.kill()
        second.kill()
    events = [json.loads(line) for line in src.stderr.splitlines() if line.startswith("{")]
    ends = [
        e["event"]
        for e in events
        if e["event"].startswith("migration ") and e["event"] != "migration progress"
    ]
    assert ends == ["migration started", "migration cancelled", "migration started", "migration completed"], (
        ends
    )
    started = [e["session"] for e in events if e["event"] == "migration started"]
    assert len(set(started)) == 2
    assert src.report["status"] == "completed"


# -- the plot -------------------------------------------------------------------------------------
def report_of_a_busy_migration() -> dict[str, Any]:
    from common.protocol.params import MigrationParameters
    from tests.protocol_harness import Pair, busy_guest

    pair = Pair(
        busy_guest(seed=3, dirty_pages_per_step=8),
        params=MigrationParameters(downtime_limit_ms=5, max_bandwidth=8 << 20),
        guest_speed=2000,
    ).run()
    return pair.src.report(pair.now)


@pytest.mark.slow
def test_plot_draws_a_report_and_says_what_to_install_without_matplotlib(tmp_path: Path) -> None:
    report = tmp_path / "source.json"
    report.write_text(json.dumps(report_of_a_busy_migration()))
    picture = tmp_path / "timeline.png"
    drawn = run(*SOURCE, "plot", str(report), "-o", str(picture), timeout=120)
    assert drawn.returncode == 0, drawn.stderr
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000
    hide = "import sys; sys.modules['matplotlib'] = None; from source_node.cli import main; sys.exit(main())"
    missing = run(sys.executable, "-c", hide, "plot", str(report))
    assert missing.returncode == 2 and 'pip install -e ".[plot]"' in missing.stderr
    not_a_report = tmp_path / "x.json"
    not_a_report.write_text("[1, 2]")
    refused = run(*SOURCE, "plot", str(not_a_report))
    assert refused.returncode == 2 and "is not a migration report" in refused.stderr
    nowhere = run(*SOURCE, "plot", str(report), "-o", str(tmp_path / "no" / "such.png"))
    assert (
        nowhere.returncode == 2 and "does not exist" in nowhere.stderr and "Traceback" not in nowhere.stderr
    )


@pytest.mark.slow
def test_plot_adds_postcopy_request_latencies_from_the_destinations_report(tmp_path: Path) -> None:
    from tests.test_postcopy import postcopy_pair, run_to_end

    pair = run_to_end(postcopy_pair(seed=5, after_rounds=1))
    source, dest = tmp_path / "source.json", tmp_path / "dest.json"
    source.write_text(json.dumps(pair.src.report(pair.now)))
    dest.write_text(json.dumps(pair.dst.report(pair.now)))
    assert json.loads(dest.read_text())["postcopy"]["fault_latencies_ms"], "the destination keeps them"
    alone, both = tmp_path / "alone.png", tmp_path / "both.png"
    assert run(*SOURCE, "plot", str(source), "-o", str(alone), timeout=120).returncode == 0
    drawn = run(*SOURCE, "plot", str(source), "--dest", str(dest), "-o", str(both), timeout=120)
    assert drawn.returncode == 0, drawn.stderr
    from matplotlib import image

    assert image.imread(both).shape[0] > image.imread(alone).shape[0], "a fourth panel: the latencies"
    swapped = run(*SOURCE, "plot", str(dest))
    assert (
        swapped.returncode == 2
        and "give the source's report, and the destination's with --dest" in swapped.stderr
    )


def test_the_short_form_reads_parameters_back_exactly_and_an_idle_destination_as_waiting() -> None:
    from common.human import describe

    assert describe({"parameters": {"max_bandwidth": 1_000_000}}) == "parameters: max_bandwidth=1000000 B/s"
    assert describe({"parameters": {"max_bandwidth": 20 << 20}}) == "parameters: max_bandwidth=20 MiB/s"
    idle = describe({"status": "none", "phase": "waiting", "listen": "tcp://127.0.0.1:1", "guest": None})
    assert idle == "migration: none yet\nwaiting for a source"


@pytest.mark.slow
def test_the_short_form_of_a_postcopy_report() -> None:
    from common.human import describe
    from tests.test_postcopy import postcopy_pair, run_to_end

    pair = run_to_end(postcopy_pair(seed=5, after_rounds=1))
    text = describe(pair.src.report(pair.now))
    assert text.startswith("migration: completed (postcopy, phase completed)\ntime: ")
    assert ", 1 round\n" in text and "None" not in text
    assert re.search(r"verification: ok \(manifest [0-9a-f]{32}, vcpu [0-9a-f]{32}\)", text), text
    assert "postcopy: requests " in describe(pair.dst.report(pair.now))


# -- a migration pointed at the node itself ---------------------------------------------------------
def test_a_migration_to_the_nodes_own_control_endpoint_is_refused_and_signals_still_end_it(
    tmp_path: Path,
) -> None:
    control = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [*SOURCE, *SMALL_GUEST, "--control", control, "--migrate-to", control.replace("127.0.0.1", "localhost")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = ""
        deadline = time.monotonic() + 30
        while "migration not started" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert "is this node's own endpoint" in seen, seen
        # a control client that is no REQ (what the refused migration would have been) is answered
        # with nothing and holds nothing: the node still serves ctl
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.connect(control)
        rogue.send_multipart([b"not", b"a request"])
        time.sleep(0.3)
        assert request(control, "status", timeout_s=5.0)["ok"] is True
        rogue.close(linger=0)
        ctx.term()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_two_spellings_of_one_local_endpoint_are_the_same() -> None:
    assert same_endpoint("tcp://127.0.0.1:4444", "tcp://localhost:4444")
    assert same_endpoint("tcp://*:4444", "tcp://127.0.0.1:4444")
    assert not same_endpoint("tcp://127.0.0.1:4444", "tcp://127.0.0.1:4445")
    assert not same_endpoint("tcp://10.0.0.1:4444", "tcp://127.0.0.1:4444")
    assert same_endpoint("ipc:///tmp/a", "ipc:///tmp/a") and not same_endpoint("ipc:///tmp/a", "ipc:///tmp/b")


def test_limits_of_nothing_are_refused_and_a_closed_pipe_ends_ctl_quietly(tmp_path: Path) -> None:
    for args in (["--max-ram", "0"], ["ctl", "--control", f"ipc://{tmp_path}/x", "--timeout", "0", "status"]):
        done = run(*DEST, *args)
        assert done.returncode == 2 and "must be more than 0" in done.stderr, done.stderr
    dest = Dest(tmp_path)
    try:
        ctl = subprocess.Popen(
            [*DEST, "ctl", "--control", dest.control, "status", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert ctl.stdout is not None and ctl.stderr is not None
        ctl.stdout.close()  # as `| head` does once it has its lines
        _, err = ctl.communicate(timeout=30)
        assert ctl.returncode == 0 and b"Traceback" not in err, err
    finally:
        dest.kill()


def test_the_live_line_fits_a_narrow_terminal_and_postcopy_progress_never_shows_everything_left() -> None:
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    stream = os.fdopen(slave, "w")
    report = {
        "status": "active",
        "mode": "postcopy",
        "phase": "postcopy",
        "rounds": 1,
        "progress_percent": None,  # the source does not know yet what the destination holds
        "remaining_bytes": None,
        "postcopy": {"pages_missing_at_destination": None, "requests": 3, "requests_per_s": 1.5},
    }
    Progress(stream).update(report, force=True)
    stream.close()
    shown = os.read(master, 4096).decode()
    os.close(master)
    text = shown.removeprefix("\r").removesuffix("\x1b[K")
    assert len(text) == 59 and text.endswith("~"), repr(shown)
    assert text.startswith("[postcopy] [  ?   %] postcopy |"), "unknown, not 0 %"
