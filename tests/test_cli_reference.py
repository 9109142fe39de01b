"""The reference run from the command line, as a user runs it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def reference(tmp_path: Path, *args: str) -> dict:
    report = tmp_path / f"ref-{abs(hash(args))}.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "source_node.cli",
            "--ram",
            "8MiB",
            "--working-set",
            "1MiB",
            *args,
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(report.read_text())


def test_reference_run_is_reproducible_and_seed_dependent(tmp_path: Path) -> None:
    a = reference(tmp_path, "--seed", "7", "--stop-at-step", "400")
    b = reference(tmp_path, "--seed", "7", "--stop-at-step", "400")
    c = reference(tmp_path, "--seed", "8", "--stop-at-step", "400")
    assert a["guest"]["step"] == 400
    assert set(a["guest"]) >= {"step", "ram_digest", "tag_digest", "vcpu_digest", "tag_check_faults"}
    assert a["guest"] == b["guest"]
    assert a["guest"]["ram_digest"] != c["guest"]["ram_digest"]
    assert a["guest"]["tag_check_faults"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ram", "3XB"], "argument --ram: '3XB' is not a size (e.g. 4096, 64K"),
        (["--ram", "17GB"], "--ram: RAM size 17 GiB is outside 1 MiB .. 16 GiB"),
        (["--seed", "x"], "argument --seed"),
        (["--tag-only-share", "2"], "--tag-only-share"),
        (["--fill", "ones"], "argument --fill"),
        (["--ram", "1MiB", "--working-set", "2MiB"], "--working-set"),
        (
            ["--migrate-to", "127.0.0.1:4444"],
            "argument --migrate-to: --migrate-to '127.0.0.1:4444' is not a tcp://",
        ),
        (["--migrate-to", "tcp://127.0.0.1"], "is not tcp://HOST:PORT"),
        (["--migrate-to", "tcp://127.0.0.1:99999"], "port 99999 is outside 1 .. 65535"),
        (["--control", "127.0.0.1:5555"], "argument --control"),
        (["--report", "/nonexistent-dir/r.json"], "folder /nonexistent-dir does not exist"),
        (["--report", "/"], "is a directory"),
        (["--convergence-timeout", "nan"], "'nan' is not a finite number"),
        (["--peer-timeout", "inf"], "'inf' is not a finite number"),
        (
            ["--peer-timeout", "0", "--migrate-to", "tcp://127.0.0.1:4444"],
            "argument --peer-timeout: must be more than 0",
        ),
        (
            ["--peer-timeout", "20", "--migrate-to", "tcp://127.0.0.1:4444"],
            "reconnect timeout 10.0 s must be at least",
        ),
    ],
)
def test_bad_flags_are_refused_with_the_flag_named(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "source_node.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "guest booted" not in result.stdout + result.stderr, "refused before the guest boots"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "tcp://127.0.0.1:99999"], "port 99999 is outside 1 .. 65535"),
        (["--listen", "127.0.0.1:4444"], "is not a tcp://HOST:PORT or ipc://PATH"),
        (["--listen", "tcp://127.0.0.1:4444", "--control", "tcp://127.0.0.1"], "argument --control"),
        (["--listen", "tcp://127.0.0.1:4444", "--report", "/nonexistent-dir/r.json"], "does not exist"),
        (["--listen", "tcp://127.0.0.1:4444", "--peer-timeout", "nan"], "not a finite number"),
    ],
)
def test_bad_dest_flags_are_refused_with_the_flag_named(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dest_node.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_address_in_use_is_one_line_before_the_guest_boots() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv in (
            ["source_node.cli", "--control", f"tcp://127.0.0.1:{port}"],
            ["dest_node.cli", "--listen", f"tcp://127.0.0.1:{port}"],
            ["dest_node.cli", "--listen", "tcp://127.0.0.1:1", "--control", f"tcp://127.0.0.1:{port}"],
        ):
            result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60)
            assert result.returncode == 2, result.stderr
            assert "Address already in use" in result.stderr and "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert "guest booted" not in result.stdout + result.stderr
