"""Soak: one guest migrated back and forth between two dest-nodes many times, through fault
proxies that reset, stall and corrupt at random, verifying every hop; prints each node's open
file descriptors, threads and RSS at the start and at the end (a leak shows as growth).

    python3 bench/soak.py [--hops 30] [--ram 64MiB] [--seed 1] [--no-faults]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.control import request
from faultinject.proxy import FaultProxy
from source_node.demo import free_ports, wait_for_control

PY = sys.executable


def usage(pid: int) -> dict[str, int]:
    proc = Path(f"/proc/{pid}")
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
    return {
        "fds": len(list((proc / "fd").iterdir())),
        "threads": int(status["Threads"].strip()),
        "rss_mib": int(status["VmRSS"].split()[0]) // 1024,
    }


def wait_outgoing(control: str, session: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = request(control, "status")
        out = reply.get("result", {}).get("outgoing") if reply.get("ok") else None
        if out and out["status"] in ("completed", "failed", "cancelled", "unsettled"):
            return out
        time.sleep(0.1)
    raise SystemExit(f"soak: hop of session {session} did not finish within {timeout_s} s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hops", type=int, default=30, help="at least 4")
    parser.add_argument("--ram", default="64MiB")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-faults", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="mte-soak-"))
    ports = free_ports(4)
    nodes = []
    logs = [open(work / f"node{i}.log", "w") for i in range(2)]  # noqa: SIM115 - open for the run
    for i in range(2):
        listen, control = f"tcp://127.0.0.1:{ports[2 * i]}", f"tcp://127.0.0.1:{ports[2 * i + 1]}"
        proc = subprocess.Popen(
            [PY, "-m", "dest_node.cli", "--listen", listen, "--control", control, "--peer-timeout", "1",
             "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=logs[i],
        )  # fmt: skip
        nodes.append({"proc": proc, "listen": listen, "control": control, "port": ports[2 * i]})
    proxies = [FaultProxy(("127.0.0.1", n["port"]), seed=args.seed + i) for i, n in enumerate(nodes)]
    try:
        for n in nodes:
            if not wait_for_control(n["control"]).get("ok"):
                raise SystemExit("soak: a dest-node did not come up")
        # the guest boots on a source-node and makes its first hop to node 0
        first = subprocess.run(
            [PY, "-m", "source_node.cli", "--ram", args.ram, "--seed", str(args.seed), "--working-set", "4MiB",
             "--steps-per-second", "500", "--migrate-to", proxies[0].uri, "--log-level", "warning"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if first.returncode != 0:
            raise SystemExit(f"soak: the first migration failed: {first.stdout}{first.stderr}")
        time.sleep(0.5)
        start: list[dict[str, int]] = []
        here = 0
        faults = {"reset": 0, "stall": 0, "corrupt": 0, "none": 0}
        times: list[float] = []
        for hop in range(args.hops):
            there = 1 - here
            proxy = proxies[there]
            proxy.corrupt_down = proxy.corrupt_up = 0.0
            fault = "none" if args.no_faults else rng.choice(["reset", "stall", "corrupt", "none"])
            faults[fault] += 1
            at = rng.randint(1, 8) << 20  # bytes into the hop
            if fault == "reset":
                proxy.when(lambda m, at=at: m.bytes_down > at, proxy.reset)
            elif fault == "stall":
                proxy.when(lambda m, at=at: m.bytes_down > at, lambda p=proxy: p.stall(1.5))
            elif fault == "corrupt":
                proxy.corrupt_down = proxy.corrupt_up = 0.01
            reply = request(nodes[here]["control"], "migrate", {"uri": proxy.uri})
            if not reply.get("ok"):
                raise SystemExit(f"soak: hop {hop} refused: {reply.get('error')}")
            out = wait_outgoing(nodes[here]["control"], reply["result"]["session"])
            verified = out["verification"]["ok"]
            print(
                f"hop {hop + 1:3}: node {here} -> node {there}  {fault:8} {out['status']:10} "
                f"verified={verified} {out['total_time_ms']:8.0f} ms  downtime {out['downtime_ms']} ms  "
                f"resent {out['link']['resent_messages']}  reconnects {out['link']['reconnects']}",
                flush=True,
            )
            if out["status"] != "completed" or not verified:
                raise SystemExit(f"soak: hop {hop + 1} did not complete verified: {out['error']}")
            times.append(out["total_time_ms"])
            here = there
            time.sleep(0.2)
            if hop == 1:
                # the baseline once each node has held the guest once: first-use growth (malloc
                # arenas, imports, the guest's mapping) is not a leak
                start = [usage(n["proc"].pid) for n in nodes]
        end = [usage(n["proc"].pid) for n in nodes]
        print(
            f"\n{args.hops} hops, all verified; faults {faults}; median hop {sorted(times)[len(times) // 2]:.0f} ms"
        )
        print(f"{'node':6} {'':6} {'fds':>5} {'threads':>8} {'rss MiB':>8}   (start: after hop 2)")
        for i in range(2):
            for label, u in (("start", start[i]), ("end", end[i])):
                print(f"{i:<6} {label:6} {u['fds']:5} {u['threads']:8} {u['rss_mib']:8}")
        return 0
    finally:
        for p in proxies:
            p.close()
        for n in nodes:
            n["proc"].terminate()
            try:
                n["proc"].wait(timeout=10)
            except subprocess.TimeoutExpired:
                n["proc"].kill()


if __name__ == "__main__":
    sys.exit(main())
