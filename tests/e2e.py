"""Helpers for end-to-end tests: the real daemons as processes on loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.keys import generate
from source_node.demo import free_port, free_ports, wait_for_control

SOURCE = [sys.executable, "-m", "source_node.cli"]
DEST = [sys.executable, "-m", "dest_node.cli"]
SMALL_GUEST = ["--ram", "16MiB", "--working-set", "2MiB"]


def busy_small_guest(seed: int, stop: int, pace: str) -> list[str]:
    """A small guest dirtying 24 pages a step at `pace` steps/s ("0": as fast as it can)."""
    return [*SMALL_GUEST, "--seed", str(seed), "--stop-at-step", str(stop),
            "--steps-per-second", pace, "--dirty-pages-per-step", "24"]  # fmt: skip


@dataclass
class Finished:
    code: int
    report: dict[str, Any]
    stdout: str
    stderr: str


_REFERENCES: dict[tuple[str, ...], dict[str, Any]] = {}


def reference(tmp: Path, *args: str) -> dict[str, Any]:
    """The guest summary of an unmigrated run with the same arguments. Run once per arguments
    in a test session: the workload is deterministic (test_cli_reference holds it to that), and
    two dozen fault tests compare against the same busy 512 MiB guest."""
    if args not in _REFERENCES:
        out = tmp / f"reference-{time.monotonic_ns()}.json"
        done = subprocess.run(
            [*SOURCE, *args, "--report", str(out)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        _REFERENCES[args] = json.loads(out.read_text())["guest"]
    return dict(_REFERENCES[args])


class Dest:
    def __init__(self, tmp: Path, *args: str, prefix: Sequence[str] = (), listen: str | None = None) -> None:
        """A dest-node with --once, a report and a control endpoint; `prefix` runs it inside
        something (a network namespace), where `listen` is its address."""
        self.port, control_port = free_ports(2)
        self.uri = listen or f"tcp://127.0.0.1:{self.port}"
        self.control = f"ipc://{tmp}/dest-{self.port}.ctl" if prefix else f"tcp://127.0.0.1:{control_port}"
        self.report_path = tmp / f"dest-{self.port}.json"
        self.proc = subprocess.Popen(
            [
                *prefix,
                *DEST,
                "--listen",
                self.uri,
                "--once",
                "--control",
                self.control,
                "--report",
                str(self.report_path),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert wait_for_control(self.control).get("ok"), "dest-node did not come up"

    def new_control_uri(self) -> str:
        return f"tcp://127.0.0.1:{free_port()}"

    def finish(self, timeout: float = 60) -> Finished:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(
                f"dest-node did not exit within {timeout:g} s; its log ends:\n{err[-6000:]}"
            ) from None
        report = json.loads(self.report_path.read_text()) if self.report_path.exists() else {}
        return Finished(self.proc.returncode, report, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


def start_source(tmp: Path, *args: str, prefix: Sequence[str] = ()) -> tuple[subprocess.Popen[str], Path]:
    report = tmp / f"source-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(
        [*prefix, *SOURCE, *args, "--report", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, report


def finish_source(proc: subprocess.Popen[str], report: Path, timeout: float = 120) -> Finished:
    out, err = proc.communicate(timeout=timeout)
    data = json.loads(report.read_text()) if report.exists() else {}
    return Finished(proc.returncode, data, out, err)


def run_source(tmp: Path, *args: str, timeout: float = 120) -> Finished:
    proc, report = start_source(tmp, *args)
    return finish_source(proc, report, timeout)


def same_guest(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("step", "ram_digest", "tag_digest", "vcpu_digest", "tag_check_faults")
    return all(a[k] == b[k] for k in keys)


@dataclass(frozen=True)
class Keys:
    """Key pairs made for a test: `dest`, `source` (in the allow directory) and any others."""

    directory: Path

    def secret(self, name: str) -> str:
        return str(self.directory / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.directory / f"{name}.key")

    @property
    def allow(self) -> str:
        return str(self.directory / "allow")

    def dest_args(self) -> list[str]:
        return ["--key", self.secret("dest"), "--allow", self.allow]

    def source_args(self, name: str = "source") -> list[str]:
        return ["--key", self.secret(name), "--peer-key", self.public("dest")]


def make_keys(directory: Path, *others: str) -> Keys:
    """dest and source key pairs, source's public key allowed; `others` made but not allowed."""
    (directory / "allow").mkdir(parents=True)
    for name in ("dest", "source", *others):
        generate(str(directory / name))
    shutil.copy(directory / "source.key", directory / "allow")
    return Keys(directory)
