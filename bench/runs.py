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


def migrate(
    tmp: Path,
    source_args: list[str],
    dest_args: list[str] = (),  # type: ignore[assignment]
    tree: Path | None = None,
    dest_stop: str = "0",
) -> Run:
    (port,) = free_ports(1)
    uri = f"tcp://127.0.0.1:{port}"
    cwd = tree or ROOT
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    dest_report, source_report = tmp / f"dest-{port}.json", tmp / f"source-{port}.json"
    dest = subprocess.Popen(
        [*DEST, "--listen", uri, "--once", "--stop-at-step", dest_stop, "--log-level", "error",
         "--report", str(dest_report), *dest_args],
        cwd=cwd, env=env,
    )  # fmt: skip
    watch = _PeakRss(dest.pid)
    watch.start()
    time.sleep(0.3)
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
