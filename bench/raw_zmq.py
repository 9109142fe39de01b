"""Raw ZeroMQ loopback throughput between two processes: the ceiling a migration is measured
against. PUSH/PULL over tcp on 127.0.0.1, the sender reusing one zero-copy buffer.

Usage: python3 bench/raw_zmq.py [--total 1GiB] [--message 1MiB] [--place [--committed]] [--verified]
--place copies every received message into fresh anonymous memory, as a destination must;
--committed into memory committed before the first message (a preallocated destination): the
most any destination that receives over ZeroMQ and places what it got can do.
--verified (implies --committed): the floor of a verified migration, all of it in native code
with no protocol: the sender hashes each page of distinct memory (as a source reads its
guest's) and sends the pages with their digests; the receiver places each page and checks it
against its digest, as a destination does (common/guest/pagehash.py, one pass each side).
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.constants import PAGE_SIZE
from common.guest.pagehash import gather_content, place_checked
from common.units import parse_size


def _receiver(
    port: int,
    count: int,
    size: int,
    place: bool,
    committed: bool,
    ready: mp.Event,  # type: ignore[type-arg]
    took: mp.Value,  # type: ignore[type-arg]
    verified: bool = False,
) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 64)
    sock.bind(f"tcp://127.0.0.1:{port}")
    target = None
    if place:
        mm = mmap.mmap(-1, count * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        target = np.frombuffer(mm, dtype=np.uint8)
        if committed:
            target[:: mmap.PAGESIZE] = 1
    ready.set()
    first = sock.recv(copy=False)
    began = time.perf_counter()  # the first message is in: the clock starts (see `measure`)
    pages_per = size // PAGE_SIZE
    table = target.reshape(-1, PAGE_SIZE) if target is not None else None
    for i in range(count):
        frame = first if i == 0 else sock.recv(copy=False)
        if verified and table is not None:
            digests = np.frombuffer(sock.recv(copy=False).buffer, dtype=np.uint64)
            rows = np.frombuffer(frame.buffer, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            where = np.arange(i * pages_per, (i + 1) * pages_per, dtype=np.int64)
            if place_checked(table, where, rows, digests) != pages_per:
                raise SystemExit("a page did not land as its digest says")
        elif target is not None:
            target[i * size : (i + 1) * size] = np.frombuffer(frame.buffer, dtype=np.uint8)
    # scaled from count - 1 messages to count: the first one's receipt is outside the interval
    took.value = (time.perf_counter() - began) * count / max(1, count - 1)
    sock.close()
    ctx.term()


def measure(total: int, size: int, place: bool, committed: bool = False, verified: bool = False) -> float:
    """Seconds to move `total` bytes in messages of `size`, timed by the receiver from the first
    message received to the last one received and placed (the process's exit, which unmaps what
    it placed, and the connection's setup are outside it)."""
    count = total // size
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = mp.Event()
    took = mp.Value("d", 0.0)
    proc = mp.Process(target=_receiver, args=(port, count, size, place, committed, ready, took, verified))
    proc.start()
    ready.wait(60)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 64)
    sock.connect(f"tcp://127.0.0.1:{port}")
    if verified:  # distinct memory, committed, as a source's guest is
        memory = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        pages_per = size // PAGE_SIZE
        for i in range(count):
            where = np.arange(i * pages_per, (i + 1) * pages_per, dtype=np.int64)
            _, _, digests = gather_content(memory, where, copy=False)
            sock.send(memory[i * pages_per : (i + 1) * pages_per], copy=False, flags=zmq.SNDMORE)
            sock.send(digests, copy=False)
    else:
        payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        for _ in range(count):
            sock.send(payload, copy=False)
    proc.join()
    sock.close(linger=0)
    ctx.term()
    if proc.exitcode != 0 or took.value <= 0:
        raise RuntimeError(f"the receiver failed (exit code {proc.exitcode})")
    return float(took.value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--message", type=parse_size, default=parse_size("1MiB"))
    parser.add_argument("--place", action="store_true")
    parser.add_argument("--committed", action="store_true")
    parser.add_argument("--verified", action="store_true")
    args = parser.parse_args()
    committed = args.committed or args.verified
    seconds = measure(args.total, args.message, args.place or committed, committed, args.verified)
    print(
        f"{args.total / seconds / 1e9:.2f} GB/s ({args.total >> 20} MiB in {args.message >> 10} KiB messages, "
        f"place={args.place or committed}, committed={committed}, verified={args.verified})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
