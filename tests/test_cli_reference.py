"""The reference run from the command line, as a user runs it."""

from __future__ import annotations

import json
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
        (["--ram", "3GB"], "argument --ram: '3GB' is not a size"),
        (["--ram", "32GiB"], "--ram: RAM size"),
        (["--seed", "x"], "argument --seed"),
        (["--tag-only-share", "2"], "--tag-only-share"),
        (["--fill", "ones"], "argument --fill"),
        (["--ram", "1MiB", "--working-set", "2MiB"], "--working-set"),
    ],
)
def test_bad_flags_are_refused_with_the_flag_named(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "source_node.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
