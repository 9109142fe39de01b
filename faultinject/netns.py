"""Real kernel faults: two network namespaces joined by a veth pair, one daemon in each, and the
kernel's own tools between them: nftables for random loss, duplication, payload corruption and
TCP resets; a tbf qdisc for a rate limit; the link set down and up. (This kernel has no netem.)

Needs root (CI runs as root) and the `ip`, `nft` and `tc` commands. Every name is unique to the
process, and `close()` (or the context manager) removes both namespaces, which removes the veth
pair and every rule with them, even when a test fails.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence

_counter = itertools.count()


class NamespaceError(RuntimeError):
    """Namespaces cannot be made here (not root, or no ip command)."""


def _run(*argv: str, stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NamespaceError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")


class NetPair:
    """`source` and `dest` namespaces; the destination is reachable at `dest_ip`."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise NamespaceError("network namespaces need root")
        for tool in ("ip", "nft", "tc"):
            if shutil.which(tool) is None:
                raise NamespaceError(f"the '{tool}' command is missing (Debian packages iproute2, nftables)")
        n = next(_counter)
        tag = f"{os.getpid() % 100000}x{n}"
        self.source = f"mtes{tag}"
        self.dest = f"mted{tag}"
        self.source_if = f"vs{tag}"[:15]
        self.dest_if = f"vd{tag}"[:15]
        subnet = (os.getpid() + n) % 250 + 1
        self.source_ip = f"10.231.{subnet}.1"
        self.dest_ip = f"10.231.{subnet}.2"
        self._made: list[str] = []
        try:
            for ns in (self.source, self.dest):
                _run("ip", "netns", "add", ns)
                self._made.append(ns)
            _run("ip", "link", "add", self.source_if, "type", "veth", "peer", "name", self.dest_if)
            _run("ip", "link", "set", self.source_if, "netns", self.source)
            _run("ip", "link", "set", self.dest_if, "netns", self.dest)
            for ns, dev, ip in (
                (self.source, self.source_if, self.source_ip),
                (self.dest, self.dest_if, self.dest_ip),
            ):
                _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
        except NamespaceError:
            self.close()
            raise

    def command(self, ns: str, argv: Sequence[str]) -> list[str]:
        """argv run inside a namespace."""
        return ["ip", "netns", "exec", ns, *argv]

    # -- faults -----------------------------------------------------------------------------
    def nft(self, ns: str, ruleset: str) -> None:
        _run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=ruleset)

    def clear_nft(self, ns: str) -> None:
        _run("ip", "netns", "exec", ns, "nft", "flush", "ruleset")

    def nft_counters(self, ns: str) -> str:
        result = subprocess.run(
            self.command(ns, ["nft", "list", "ruleset"]), capture_output=True, text=True, timeout=30
        )
        return result.stdout

    def loss(self, per_mille: int) -> None:
        """Drop packets at random, both ways, at the destination's side."""
        self.nft(
            self.dest,
            f"""table inet faults {{
  chain input {{ type filter hook input priority 0; numgen random mod 1000 < {per_mille} counter drop; }}
  chain output {{ type filter hook output priority 0; numgen random mod 1000 < {per_mille} counter drop; }}
}}""",
        )

    def duplicate(self, per_mille: int) -> None:
        """Send packets twice at random, source to destination (on the source's veth egress)."""
        self.nft(
            self.source,
            f"""table netdev faults {{
  chain egress {{ type filter hook egress device "{self.source_if}" priority 0;
    numgen random mod 1000 < {per_mille} counter dup to "{self.source_if}"; }}
}}""",
        )

    def corrupt(self, per_mille: int) -> None:
        """Overwrite a payload byte of TCP segments at random as they reach the destination. The
        kernel does not fix the TCP checksum, so the receiving stack drops them: over TCP,
        corruption on the wire shows as loss."""
        self.nft(
            self.dest,
            f"""table inet faults {{
  chain input {{ type filter hook input priority 0;
    meta l4proto tcp meta length > 200 numgen random mod 1000 < {per_mille} counter @ih,64,8 set 0x41; }}
}}""",
        )

    def reset_connections(self, port: int) -> None:
        """Answer the source's next packets to the port with TCP resets (call clear_nft after)."""
        self.nft(
            self.dest,
            f"""table inet faults {{
  chain input {{ type filter hook input priority 0; tcp dport {port} counter reject with tcp reset; }}
}}""",
        )

    def rate_limit(self, rate: str, burst: str = "256kb", latency: str = "100ms") -> None:
        """A token-bucket rate limit on the source's egress (tc tbf)."""
        _run("ip", "netns", "exec", self.source, "tc", "qdisc", "add", "dev", self.source_if, "root", "tbf",
             "rate", rate, "burst", burst, "latency", latency)  # fmt: skip

    def link(self, up: bool) -> None:
        _run("ip", "-n", self.source, "link", "set", self.source_if, "up" if up else "down")

    # -- cleanup ----------------------------------------------------------------------------
    def close(self) -> None:
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()

    def __enter__(self) -> NetPair:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
