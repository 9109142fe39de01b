"""Two protocol sessions joined by an in-memory link that can drop, repeat, reorder,
delay and corrupt messages, driven by a fake clock (the h11 ConnectionPair idea)."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from common.guest.guest import Guest
from common.guest.workload import Workload, WorkloadConfig, boot
from common.protocol.dest import DestParameters, DestSession
from common.protocol.params import MigrationParameters
from common.protocol.source import SourceSession
from common.wire import framing
from common.wire import mte_migration_pb2 as pb

PEER = b"source-peer"


@dataclass
class Faults:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    cut_after: int | None = None  # messages; after this many the link carries nothing
    seed: int = 0


@dataclass
class Link:
    faults: Faults
    queue: deque[list[bytes]] = field(default_factory=deque)
    carried: int = 0
    events: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.faults.seed)

    def put(self, frames: list[bytes]) -> None:
        f = self.faults
        self.carried += 1
        if f.cut_after is not None and self.carried > f.cut_after:
            return
        frames = [bytes(x) for x in frames]
        if self.rng.random() < f.drop:
            self.events.append("drop")
            return
        if self.rng.random() < f.corrupt:
            which = self.rng.randrange(len(frames))
            damaged = bytearray(frames[which])
            damaged[self.rng.randrange(len(damaged))] ^= 1 << self.rng.randrange(8)
            frames[which] = bytes(damaged)
            self.events.append("corrupt")
        self.queue.append(frames)
        if self.rng.random() < f.duplicate:
            self.queue.append(list(frames))
            self.events.append("duplicate")
        if len(self.queue) >= 2 and self.rng.random() < f.reorder:
            self.queue[-1], self.queue[-2] = self.queue[-2], self.queue[-1]
            self.events.append("reorder")

    def take(self) -> list[list[bytes]]:
        out = list(self.queue)
        self.queue.clear()
        return out


class FakeSourceHost:
    def __init__(self) -> None:
        self.running = True
        self.throttle = 0.0
        self.stops = 0
        self.resumes = 0
        self.session: SourceSession | None = None
        self.at_stop: dict[str, int] = {}  # what the session had outstanding when it stopped us

    def stop_guest(self) -> None:
        self.running = False
        self.stops += 1
        if self.session is not None:
            self.at_stop = {
                "in_flight": len(self.session._inflight),
                "dest_backlog": self.session.dest_backlog,
                "own_backlog": self.session.digests.stale_pages,
            }

    def resume_guest(self) -> None:
        self.running = True
        self.resumes += 1

    def set_throttle(self, share: float) -> None:
        self.throttle = share


class FakeDestHost:
    def __init__(self) -> None:
        self.started: Guest | None = None
        self.discarded = 0

    def start_guest(self, guest: Guest) -> None:
        self.started = guest

    def discard_guest(self, guest: Guest) -> None:
        self.discarded += 1

    def prefault(self, guest: Guest, pages: object) -> None:
        self.prefault_hint = pages


class Pair:
    def __init__(
        self,
        guest: Guest,
        params: MigrationParameters | None = None,
        dest_params: DestParameters | None = None,
        to_dest: Faults | None = None,
        to_source: Faults | None = None,
        steps_per_tick: float = 0.0,
        tick_s: float = 0.001,
    ) -> None:
        self.now = 0.0
        self.tick_s = tick_s
        self.guest = guest
        self.workload = Workload(guest)
        self.steps_per_tick = steps_per_tick
        self._step_credit = 0.0
        self.src_host = FakeSourceHost()
        self.dst_host = FakeDestHost()
        self.src = SourceSession(guest, self.src_host, params or MigrationParameters(), self.now)
        self.src_host.session = self.src
        self.dst = DestSession(self.dst_host, dest_params or DestParameters(), self.now)
        self.down = Link(to_dest or Faults())
        self.up = Link(to_source or Faults(seed=1))
        self.ticks = 0

    def tick(self) -> None:
        src, dst = self.src, self.dst
        src.poll(self.now)
        for frames in src.take_outgoing():
            self.down.put(frames)
        for frames in self.down.take():
            dst.receive(PEER, frames, self.now)
        dst.poll(self.now)
        for _, frames in dst.take_outgoing():
            self.up.put(frames)
        for frames in self.up.take():
            src.receive(frames, self.now)
        if self.src_host.running and self.steps_per_tick:
            # the guest is throttled the way the runner throttles a real vCPU thread
            self._step_credit += self.steps_per_tick * (1.0 - self.src_host.throttle)
            while self._step_credit >= 1:
                self.workload.step()
                self._step_credit -= 1
        self.now += self.tick_s
        self.ticks += 1

    def run(self, max_ticks: int = 200_000) -> Pair:
        self.src.start(self.now)
        while self.ticks < max_ticks:
            self.tick()
            if self.src.phase.terminal and (self.dst.phase.terminal or self.dst.phase.value == "waiting"):
                # let the last messages land
                for _ in range(3):
                    self.tick()
                break
        return self


def hello_of_version(version: int) -> pb.Envelope:
    """A hello that is right in every way but its protocol version."""
    return framing.envelope(
        b"x" * 8,
        1,
        hello=pb.Hello(
            protocol_version=version,
            page_size=4096,
            granule_size=16,
            ram_bytes=1 << 20,
            features=[pb.FEATURE_MTE, pb.FEATURE_VERIFY],
            mode=pb.MODE_PRECOPY,
            vcpu_count=1,
        ),
    )


def busy_guest(seed: int = 1, ram: int = 8 << 20, **knobs: object) -> Guest:
    config = WorkloadConfig(seed=seed, working_set_bytes=knobs.pop("working_set", 1 << 20), **knobs)  # type: ignore[arg-type]
    return boot(ram, config)
