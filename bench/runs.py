"""One migration through the real daemons, for every benchmark: a dest-node, then a
source-node that migrates to it; the reports of both and the destination's peak RSS.

`tree` runs the daemons of another checkout (a baseline commit measured in the same run):
they start with that tree as their working directory, so `python3 -m` imports its code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.control import request  # noqa: E402
from source_node.demo import free_ports  # noqa: E402

SOURCE = [sys.executable, "-m", "source_node.cli"]
DEST = [sys.executable, "-m", "dest_node.cli"]


@dataclass
class Run:
    source: dict[str, Any]
    dest: dict[str, Any]
    dest_peak_rss: int  # bytes, sampled every 10 ms


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A /proc/PID/status size (VmRSS, VmHWM) in KiB; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, rss_kib(self.pid) * 1024)


def _committed(control: str, timeout_s: float = 120.0) -> None:
    """Wait until a `dest-node --preallocate` has committed its memory: the source comes after,
    as to a QEMU started with -mem-prealloc, and committing is timed apart (its report says)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = request(control, "status", timeout_s=2.0)
        prealloc = (reply.get("result") or {}).get("preallocation") if reply.get("ok") else None
        if prealloc and prealloc.get("seconds") is not None:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the destination did not commit its memory within {timeout_s:.0f} s")


def migrate(
    tmp: Path,
    source_args: list[str],
    dest_args: list[str] = (),  # type: ignore[assignment]
    tree: Path | None = None,
    dest_stop: str = "0",
) -> Run:
    port, control_port = free_ports(2)
    uri = f"tcp://127.0.0.1:{port}"
    cwd = tree or ROOT
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    dest_report, source_report = tmp / f"dest-{port}.json", tmp / f"source-{port}.json"
    preallocated = "--preallocate" in dest_args
    control = f"tcp://127.0.0.1:{control_port}"
    dest = subprocess.Popen(
        [*DEST, "--listen", uri, "--once", "--stop-at-step", dest_stop, "--log-level", "error",
         "--report", str(dest_report), *(["--control", control] if preallocated else []), *dest_args],
        cwd=cwd, env=env,
    )  # fmt: skip
    watch = _PeakRss(dest.pid)
    watch.start()
    time.sleep(0.3)
    if preallocated:
        _committed(control)
    try:
        subprocess.run(
            [*SOURCE, *source_args, "--migrate-to", uri, "--report", str(source_report), "--log-level", "error"],
            check=False, capture_output=True, timeout=600, cwd=cwd, env=env,
        )  # fmt: skip
    finally:
        try:
            dest.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dest.kill()
        watch.done.set()
        watch.join()
    source: dict[str, Any] = json.loads(source_report.read_text())
    dest_result: dict[str, Any] = json.loads(dest_report.read_text()) if dest_report.exists() else {}
    return Run(source, dest_result, watch.peak)


def ok(run: Run) -> bool:
    return run.source.get("status") == "completed" and bool(run.source.get("verification", {}).get("ok"))
