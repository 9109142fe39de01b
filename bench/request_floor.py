"""The floor of a postcopy page request on this machine: a ZeroMQ request and a 4 KiB answer
between two processes over loopback TCP, with no protocol, no guest and no Python between the
socket calls but the loop itself. What a migration's request latency is measured against.

Usage: python3 bench/request_floor.py [--requests 2000] [--repeat 3]

Two rows: idle, and under load, where as many processes as there are cores spin meanwhile,
as a postcopy's two daemons do while the background stream saturates the link (a woken socket
thread must then wait for a core). Each row: p50, p99 and max of the round trip in ms, per run
and the median of the runs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from source_node.demo import free_ports

ANSWER = os.urandom(4096 + 128)


def _answerer(port: int, count: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(b"ready")
    for _ in range(count):
        sock.recv()
        sock.send(ANSWER)
    sock.close(linger=1000)
    ctx.term()


def _spin(stop: mp.Event) -> None:  # type: ignore[type-arg]
    x = 0
    while not stop.is_set():
        for _ in range(10_000):
            x += 1


def round_trips(count: int, spinners: int) -> list[float]:
    (port,) = free_ports(1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    stop = mp.Event()
    burners = [mp.Process(target=_spin, args=(stop,)) for _ in range(spinners)]
    for proc in burners:
        proc.start()
    peer_proc = mp.Process(target=_answerer, args=(port, count))
    peer_proc.start()
    peer, _ = sock.recv_multipart()
    times = []
    try:
        for i in range(count):
            began = time.perf_counter()
            sock.send_multipart([peer, i.to_bytes(8, "little")])
            sock.recv_multipart()
            times.append(time.perf_counter() - began)
            time.sleep(0.0005)  # a guest between misses: requests do not queue
    finally:
        stop.set()
        for proc in [*burners, peer_proc]:
            proc.join(timeout=10)
        sock.close(linger=0)
        ctx.term()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"request (8 B) and answer (4 KiB + 128 B), ms; {cores} cores")
    print(f"{'':<24} {'runs: p50 / p99 / max':<48} {'median p50':>10} {'median p99':>10}")
    for label, spinners in (("idle", 0), (f"under load ({cores} spinning)", cores)):
        runs = []
        for _ in range(args.repeat):
            ms = np.asarray(round_trips(args.requests, spinners)) * 1000
            runs.append((float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.max())))
        shown = ", ".join(f"{a:.3f}/{b:.3f}/{c:.1f}" for a, b, c in runs)
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        print(f"{label:<24} {shown:<48} {p50:10.3f} {p99:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
