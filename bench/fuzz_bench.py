"""Fuzz benchmark: a million hostile messages against a live dest-node (phase 1), then a real
migration through the same daemon while a second flood goes on (phase 2).

Usage: python3 bench/fuzz_bench.py [--messages 1000000] [--connections 8]

The messages are those of the fuzz tests (tests/fuzz_messages.py: structure-aware, from the
schema, some damaged), sent by several stranger connections as fast as the destination takes
them. Printed: messages sent, how many the destination counted as refused, crashes (the
daemon's exit: 0 while it lives), guest changes (the migrated guest against an unmigrated
run of the same guest: 0 means identical), the destination's peak RSS against its RSS before
the flood, and the rate. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from runs import rss_kib  # noqa: E402

from common.control import request  # noqa: E402
from source_node.demo import free_ports, wait_for_control  # noqa: E402
from tests.fuzz_messages import Draw, hostile_frames  # noqa: E402

SOURCE = [sys.executable, "-m", "source_node.cli"]
DEST = [sys.executable, "-m", "dest_node.cli"]
GUEST = ["--ram", "64MiB", "--working-set", "8MiB", "--seed", "5", "--stop-at-step", "2000",
         "--steps-per-second", "2000"]  # fmt: skip


class Flood:
    def __init__(self, uri: str, connections: int, total: int) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socks = []
        for _ in range(connections):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 2000)
            sock.connect(uri)
            self.socks.append(sock)
        self.total = total
        self.sent = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(2026)
        draw = Draw.of_random(rng)
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLOUT)
        session = rng.randbytes(8)
        while self.sent < self.total:
            frames = hostile_frames(draw, session, rng.randint(0, 50), 16384)
            sock = self.socks[self.sent % len(self.socks)]
            while self.sent < self.total:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:
                    poller.poll(50)
            self.sent += 1
        self.done.set()

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self.ctx.term()


def reference_guest(tmp: Path) -> dict[str, Any]:
    out = tmp / "reference.json"
    subprocess.run([*SOURCE, *GUEST, "--report", str(out), "--log-level", "error"], check=True, timeout=300)
    guest: dict[str, Any] = json.loads(out.read_text())["guest"]
    return guest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        expected = reference_guest(tmp)
        port, control_port = free_ports(2)
        uri, control = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{control_port}"
        report = tmp / "dest.json"
        dest = subprocess.Popen(
            [
                *DEST,
                "--listen",
                uri,
                "--control",
                control,
                "--once",
                "--stop-at-step",
                "2000",
                "--report",
                str(report),
                "--log-level",
                "error",
            ],
        )
        wait_for_control(control)
        rss_before = rss_kib(dest.pid, "VmRSS")
        # phase 1: the whole flood against the waiting destination
        flood = Flood(uri, args.connections, args.messages)
        began = time.monotonic()
        flood.thread.start()
        while not flood.done.wait(1.0):
            print(f"\r{flood.sent:>9} sent", end="", file=sys.stderr, flush=True)
        flood_s = time.monotonic() - began
        time.sleep(0.5)  # what was queued is drained
        status = request(control, "status", timeout_s=10)
        refused_before = status["result"]["refused_messages"] if status.get("ok") else None
        flood_peak = rss_kib(dest.pid, "VmHWM")  # the flood alone, before a guest arrives
        # phase 2: a real migration through the same daemon, a second flood on while it runs
        during = Flood(uri, args.connections, 10**9)
        during.thread.start()
        src_report = tmp / "source.json"
        subprocess.run(
            [*SOURCE, *GUEST, "--migrate-to", uri, "--report", str(src_report), "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        peak = rss_kib(dest.pid, "VmHWM") if dest.poll() is None else 0
        try:
            code = dest.wait(timeout=120)
        except subprocess.TimeoutExpired:
            dest.kill()
            code = -1
        during.total = 0  # stop
        during.thread.join(timeout=5)
        during.close()
        flood.close()
        print(file=sys.stderr)
        src = json.loads(src_report.read_text()) if src_report.exists() else {}
        got = json.loads(report.read_text()) if report.exists() else {}
        keys = ("step", "ram_digest", "tag_digest", "vcpu_digest")
        guest = got.get("guest") or {}
        changes = sum(guest.get(k) != expected[k] for k in keys)
        crashed = code not in (0,)
        rows = [
            ("messages sent (phase 1, destination waiting)", f"{flood.sent:,}"),
            ("refused by the destination (phase 1)", f"{refused_before:,}" if refused_before is not None else "?"),
            ("rate (phase 1)", f"{flood.sent / flood_s:,.0f} messages/s"),
            ("messages sent during the migration (phase 2)", f"{during.sent:,}"),
            ("crashes", f"{int(crashed)} (dest-node exit {code})"),
            ("migration", f"{src.get('status')} ({src.get('error') or 'no error'})"),
            ("guest changes", f"{changes} of {len(keys)} digests differ from the unmigrated run"),
            ("dest RSS idle / peak under the flood", f"{rss_before / 1024:.0f} / {flood_peak / 1024:.0f} MiB ({flood_peak / max(1, rss_before):.2f}x)"),
            ("dest peak RSS with the 64 MiB guest", f"{peak / 1024:.0f} MiB" if peak else "(exited)"),
        ]  # fmt: skip
        width = max(len(r[0]) for r in rows)
        print(f"| {'fuzz benchmark':<{width}} | value |\n| {'-' * width} | --- |")
        for name, value in rows:
            print(f"| {name:<{width}} | {value} |")
        return 0 if not crashed and changes == 0 and src.get("status") == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
