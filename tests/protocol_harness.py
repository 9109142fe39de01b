"""Two protocol sessions joined by an in-memory link that can drop, repeat, reorder,
delay, tamper with and corrupt messages, driven by a fake clock the way the daemons drive
them (the h11 ConnectionPair idea)."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.constants import PROTOCOL_VERSION
from common.guest.guest import Guest
from common.guest.presence import PresenceGate, RestartableVcpu
from common.guest.runner import GuestRunner
from common.guest.workload import Workload, WorkloadConfig, boot
from common.outgoing import least_loaded, unacknowledged
from common.protocol.dest import DestParameters, DestSession
from common.protocol.events import Reconnect
from common.protocol.outbound import Outbound
from common.protocol.params import MigrationParameters
from common.protocol.reports import take_sample
from common.protocol.source import SourceSession
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.urgent_model import UrgentThread

PEER = b"source-peer"
# A monotonic clock is never zero: starting elsewhere keeps "time since start" honest in every sum.
CLOCK_START = 1000.0


@dataclass
class Faults:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    cut_after: int | None = None  # messages; after this many the link carries nothing
    drop_kinds: frozenset[str] = frozenset()  # drop every message with one of these bodies
    drop_seqs: frozenset[int] = frozenset()  # drop the messages with these sequence numbers
    # change a message in flight (the body is re-encoded with a valid checksum); return None to
    # leave it alone
    tamper: Callable[[framing.Message], framing.Message | None] | None = None
    outage: tuple[float, float] | None = None  # the link carries nothing from .. to (seconds)
    latency_s: float = 0.0001
    bandwidth: float = 1e9  # bytes per second: messages queue behind each other
    seed: int = 0
    # Frames are read when they arrive, not when they are put, as ZeroMQ reads a zero-copy
    # frame when its I/O thread sends it: a batch sent straight from guest memory shows any
    # write that slipped in meanwhile. (Only with no fault that reads the message on the way.)
    zero_copy: bool = False


@dataclass
class Link:
    faults: Faults
    queue: list[tuple[float, list[bytes]]] = field(default_factory=list)
    carried: int = 0
    carried_bytes: int = 0  # every byte put on the link, lost or not
    first_bytes: int = 0  # the size of the first message (a hello, on the way down)
    busy_until: float = 0.0
    events: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # of every message, when the link reads them

    def __post_init__(self) -> None:
        self.rng = random.Random(self.faults.seed)
        self.cut_when: Callable[[], bool] | None = None  # while true, the link carries nothing

    def put(self, frames: list[bytes], now: float) -> None:
        f = self.faults
        self.carried += 1
        size = sum(len(x) for x in frames)
        self.carried_bytes += size
        if self.carried == 1:
            self.first_bytes = size
        if f.cut_after is not None and self.carried > f.cut_after:
            return
        if (f.outage is not None and f.outage[0] <= now - CLOCK_START < f.outage[1]) or (
            self.cut_when and self.cut_when()
        ):
            self.events.append("outage")
            return
        reads = f.drop_kinds or f.drop_seqs or f.tamper or f.corrupt or f.duplicate
        frames = [memoryview(x) for x in frames] if f.zero_copy and not reads else [bytes(x) for x in frames]
        if f.drop_kinds or f.drop_seqs or f.tamper:
            message = framing.decode(frames)
            self.kinds.append(message.kind)
            if message.kind in f.drop_kinds or message.envelope.seq in f.drop_seqs:
                self.events.append(f"drop {message.kind}")
                return
            changed = f.tamper(message) if f.tamper else None
            if changed is not None:
                frames = [bytes(x) for x in framing.encode(changed.envelope, changed.payload)]
                self.events.append(f"tamper {message.kind}")
        if self.rng.random() < f.drop:
            self.events.append("drop")
            return
        if self.rng.random() < f.corrupt:
            which = self.rng.randrange(len(frames))
            damaged = bytearray(frames[which])
            damaged[self.rng.randrange(len(damaged))] ^= 1 << self.rng.randrange(8)
            frames[which] = bytes(damaged)
            self.events.append("corrupt")
        self.busy_until = max(now, self.busy_until) + sum(len(x) for x in frames) / f.bandwidth
        at = self.busy_until + f.latency_s
        self.queue.append((at, frames))
        if self.rng.random() < f.duplicate:
            self.queue.append((at, list(frames)))
            self.events.append("duplicate")
        if len(self.queue) >= 2 and self.rng.random() < f.reorder:
            (a, x), (b, y) = self.queue[-2], self.queue[-1]
            self.queue[-2], self.queue[-1] = (a, y), (b, x)
            self.events.append("reorder")

    def take(self, now: float) -> list[list[bytes]]:
        """What has arrived by now, in the order it was queued (a reorder swaps two)."""
        due = [[bytes(x) for x in frames] for at, frames in self.queue if at <= now]
        self.queue = [(at, frames) for at, frames in self.queue if at > now]
        return due

    def next_arrival(self) -> float | None:
        return min((at for at, _ in self.queue), default=None)


class FakeSourceHost:
    def __init__(self) -> None:
        self.running = True
        self.throttle = 0.0
        self.stops = 0
        self.resumes = 0
        self.session: SourceSession | None = None
        self.at_stop: dict[str, int] = {}  # what the session had outstanding when it stopped us
        self.runner: GuestRunner | None = None

    def stop_guest(self) -> None:
        self.running = False
        self.stops += 1
        if self.runner is not None:
            self.runner.pause()
        if self.session is not None:
            self.at_stop = {
                "in_flight": self.session.in_flight,
            }

    def resume_guest(self) -> None:
        self.running = True
        self.resumes += 1
        if self.runner is not None:
            self.runner.resume()

    def set_throttle(self, share: float) -> None:
        self.throttle = share
        if self.runner is not None:
            self.runner.throttle = share

    def guest_quiet(self) -> bool:
        return not (self.runner.running if self.runner is not None else self.running)


class FakeDestHost:
    def __init__(self) -> None:
        self.started: Guest | None = None
        self.discarded = 0
        self.gate: PresenceGate | None = None
        self.vcpu: RestartableVcpu | None = None
        # set by the Pair: how the destination runs a guest it starts (postcopy tests)
        self.make_runner: (
            Callable[[Guest, PresenceGate | None], tuple[GuestRunner, RestartableVcpu]] | None
        ) = None
        self.runner: GuestRunner | None = None
        self.started_at_step = 0

    def start_guest(self, guest: Guest, gate: PresenceGate | None = None) -> None:
        self.started = guest
        self.gate = gate
        if self.make_runner is not None:
            self.runner, self.vcpu = self.make_runner(guest, gate)
            self.runner.start()

    def take_page_misses(self) -> dict[int, float]:
        return self.vcpu.take_misses() if self.vcpu is not None else {}

    def create_guest(self, ram_bytes: int, vcpu_count: int) -> Guest:
        return Guest.create(ram_bytes, vcpu_count)

    def discard_guest(self, guest: Guest) -> None:
        self.discarded += 1

    def prefault(self, guest: Guest, pages: object) -> None:
        self.prefault_hint = pages


class TimedWorkload:
    """A CPU-bound workload whose every step costs fake time, driven by the daemons' own
    GuestRunner (slices, throttle and all) on the harness clock: the source's guest, and in
    postcopy tests the destination's."""

    steps_per_second = 0.0  # as fast as it can: the step cost sets its speed

    def __init__(self, pair: Pair, workload: Workload, step_cost_s: float) -> None:
        self.pair = pair
        self.workload = workload
        self.step_cost_s = step_cost_s

    @property
    def step_count(self) -> int:
        return self.workload.step_count

    def step(self) -> None:
        self.workload.step()
        self.pair.now += self.step_cost_s


# What a daemon's loop turn costs at the least (decoding, bookkeeping): a session whose next
# deadline is "now" still lets time pass, as it does on a real machine.
MIN_TURN_S = 0.00005
POLL_CAP_S = 0.05  # the daemons' own cap on one wait


class Pair:
    """A source and a destination session on a fake clock, driven as the daemons drive them:
    each turn polls, moves what arrived, gives the guest its slice, then sleeps until the
    earliest of the sessions' next deadlines, the next arrival on either link and the guest's
    next slice."""

    def __init__(
        self,
        guest: Guest,
        params: MigrationParameters | None = None,
        dest_params: DestParameters | None = None,
        to_dest: Faults | None = None,
        to_source: Faults | None = None,
        guest_speed: float = 0.0,
        dest_steps: int | None = None,
        lanes: list[Faults] | None = None,
    ) -> None:
        """`lanes`: the parallel channels past the first, each with its own faults (a latency
        of its own reorders batches across them); used once the destination grants them."""
        self.now = CLOCK_START
        self.guest = guest
        self.src_host = FakeSourceHost()
        self.dst_host = FakeDestHost()
        self.src = SourceSession(guest, self.src_host, params or MigrationParameters(), self.now)
        self.src_host.session = self.src
        self.src.postcopy_side.clock = lambda: self.now  # answers cost no fake time
        self.dst = DestSession(self.dst_host, dest_params or DestParameters(), self.now)
        self.down = Link(to_dest or Faults())
        # postcopy answers travel on a connection of their own: same faults, their own queue
        self.urgent = Link(self.down.faults)
        # requests on the source's urgent connection, answered by its thread (tests/urgent_model.py)
        self.urgent_up = Link(to_source or Faults(seed=1))
        self.urgent_thread = UrgentThread()
        self.up = Link(to_source or Faults(seed=1))
        self.lanes = [Link(faults) for faults in lanes or []]
        self._lane_sent: list[deque[int]] = [deque() for _ in range(len(self.lanes) + 1)]
        self._next_lane = 0
        self.turns = 0
        self.peer = PEER  # the source's connection as the destination sees it; new per epoch
        self.source_key = b""  # the key its connections prove, as a CURVE handshake would vouch
        self.events: list[object] = []
        self.runner: GuestRunner | None = None
        if dest_steps is not None:  # the destination runs this many steps once it starts the guest
            cost = 1.0 / (guest_speed or 2000.0)

            def make_runner(guest: Guest, gate: PresenceGate | None) -> tuple[GuestRunner, RestartableVcpu]:
                vcpu = RestartableVcpu(
                    guest,
                    gate or PresenceGate(guest.memory, np.ones(guest.memory.page_count, dtype=np.bool_)),
                    lambda g: TimedWorkload(self, Workload(g), cost),
                    clock=lambda: self.now,
                )
                self.dst_host.started_at_step = vcpu.step_count
                runner = GuestRunner(vcpu, stop_at_step=vcpu.step_count + dest_steps, clock=lambda: self.now)
                return runner, vcpu

            self.dst_host.make_runner = make_runner
        if guest_speed:
            # guest_speed: steps per second of fake time when nothing else runs
            self.runner = GuestRunner(
                TimedWorkload(self, Workload(guest), 1.0 / guest_speed), clock=lambda: self.now
            )
            self.runner.start()
            self.src_host.runner = self.runner

    def _source_events(self) -> None:
        for event in self.src.take_events():
            self.events.append(event)
            if isinstance(event, Reconnect):
                # a new connection: what was queued on the old one is gone, and the
                # destination sees a new peer, as with a new ZeroMQ socket
                for link in (self.down, self.urgent, self.up, self.urgent_up, *self.lanes):
                    link.queue.clear()
                for sent in self._lane_sent:
                    sent.clear()
                self.peer = PEER + b"-%d" % event.epoch
                self.urgent_thread = UrgentThread()

    def _serve_urgent(self) -> None:
        self.urgent_thread.serve(self.src, self.urgent, self.urgent_up, self.now)

    def _send_down(self) -> None:
        """The source's messages onto the link; batches over the channels granted, each to the
        one with the fewest in flight, as the daemons' edge chooses."""
        links = [self.down, *self.lanes[: self.src.channels - 1]]
        for message in self.src.take_outgoing():
            link = self.down
            if message.bulk and len(links) > 1:
                acked = self.src.link.peer_received
                chosen = least_loaded(
                    [unacknowledged(sent, acked) for sent in self._lane_sent], self._next_lane
                )
                self._next_lane = (chosen + 1) % len(links)
                self._lane_sent[chosen].append(message.seq)
                link = links[chosen]
            link.put(message.frames, self.now)

    def turn(self) -> None:
        src, dst = self.src, self.dst
        src.poll(self.now)
        take_sample(src, self.now)  # as the daemons' OutgoingMigration does
        self._source_events()
        self._send_down()
        self.urgent.cut_when = self.down.cut_when
        self.urgent_up.cut_when = self.up.cut_when
        self._serve_urgent()
        for frames in self.urgent.take(self.now):
            dst.receive(self.urgent_thread.peer(self.src), frames, self.now, peer_key=self.source_key)
        for frames in self.down.take(self.now):
            dst.receive(self.peer, frames, self.now, peer_key=self.source_key)
        for number, lane in enumerate(self.lanes, 1):
            for frames in lane.take(self.now):
                dst.receive(self.peer + b"D" + bytes([number]), frames, self.now, peer_key=self.source_key)
        dst.poll(self.now)
        for peer, frames in dst.take_outgoing():
            if peer == self.peer:
                self.up.put(frames, self.now)
            elif peer == self.urgent_thread.peer(self.src):
                self.urgent_up.put(frames, self.now)
        for frames in self.up.take(self.now):
            src.receive(frames, self.now)
        self._source_events()
        self._send_down()
        self._serve_urgent()
        if self.runner is not None:
            self.runner.run_slice()
        dest_runner = self.dst_host.runner
        if dest_runner is not None:
            dest_runner.run_slice()
        wake = [self.now + POLL_CAP_S]
        for session in (src, dst):
            if not session.phase.terminal:
                wake.append(session.next_deadline(self.now))
        for link in (self.down, self.up, self.urgent, self.urgent_up, *self.lanes):
            arrival = link.next_arrival()
            if arrival is not None:
                wake.append(arrival)
        for runner in (self.runner, dest_runner):
            if runner is not None:
                due = runner.seconds_until_due(self.now)
                if due is not None:
                    wake.append(self.now + due)
        if self.dst_host.vcpu is not None and self.dst_host.vcpu.misses:
            wake.append(self.now)  # the destination asks at its next turn
        self.now = max(min(wake), self.now + MIN_TURN_S)
        self.turns += 1

    def run(self, max_seconds: float = 120.0) -> Pair:
        """Migrate until both sides have settled, or max_seconds of fake time have passed."""
        self.src.start(self.now)
        return self.run_until(self.settled, max_seconds)

    @property
    def elapsed(self) -> float:
        """Seconds since the pair was made."""
        return self.now - CLOCK_START

    def settled(self) -> bool:
        return self.src.phase.terminal and (self.dst.phase.terminal or self.dst.phase.value == "waiting")

    def run_until(self, done: Callable[[], bool], max_seconds: float = 120.0) -> Pair:
        until = self.now + max_seconds
        while self.now < until and not done():
            self.turn()
        # let the last messages land
        settle = self.now + 0.01
        while self.now < settle:
            self.turn()
        return self


def good_hello(**changes: Any) -> pb.Hello:
    """A hello a destination accepts, with the named fields changed."""
    hello = pb.Hello(
        protocol_version=PROTOCOL_VERSION,
        page_size=4096,
        granule_size=16,
        ram_bytes=1 << 20,
        features=[pb.FEATURE_MTE, pb.FEATURE_VERIFY],
        mode=pb.MODE_PRECOPY,
        vcpu_count=1,
    )
    for name, value in changes.items():
        if name == "features":
            del hello.features[:]
            hello.features.extend(value)
        else:
            setattr(hello, name, value)
    return hello


def hello_of_version(version: int) -> pb.Envelope:
    """A hello that is right in every way but its protocol version."""
    return framing.envelope(b"x" * 8, 1, hello=good_hello(protocol_version=version))


def busy_guest(seed: int = 1, ram: int = 8 << 20, **knobs: object) -> Guest:
    config = WorkloadConfig(seed=seed, working_set_bytes=knobs.pop("working_set", 1 << 20), **knobs)  # type: ignore[arg-type]
    return boot(ram, config)


def running_postcopy(
    seed: int = 21,
    to_dest: Faults | None = None,
    dest_params: DestParameters | None = None,
    **params: Any,
) -> Pair:
    """A postcopy pair that hands the guest over at once, with short link timeouts (a broken
    link is noticed in 0.4 s), and a destination guest that runs on for good: for the tests of
    what the two sides do once the guest runs there."""
    timeouts: dict[str, Any] = {
        "peer_timeout_s": 0.4,
        "heartbeat_interval_s": 0.1,
        "reconnect_timeout_s": 1.0,
    }
    migration = MigrationParameters(postcopy=True, postcopy_after_rounds=0, **{**timeouts, **params})
    return Pair(busy_guest(seed=seed), migration, dest_params, to_dest, guest_speed=2000, dest_steps=100_000)


def pageless_postcopy(seed: int = 21, dest_params: DestParameters | None = None, **params: Any) -> Pair:
    """A running_postcopy pair whose destination runs the guest and is sent no page at all (every
    one dropped on the way): what the sides do while pages are missing, for as long as a test
    wants."""
    pair = running_postcopy(seed, Faults(drop_kinds=frozenset({"postcopy_pages"})), dest_params, **params)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase.value == "postcopy", 10.0)
    assert pair.dst.phase.value == "postcopy"
    return pair


def capped_precopy(until: Callable[[Pair], bool]) -> Pair:
    """A precopy of a 4 MiB working set capped at 1 MiB/s, several seconds long, run until
    `until` holds: for tests that act on a migration in flight."""
    pair = Pair(busy_guest(seed=3, working_set=4 << 20), MigrationParameters(max_bandwidth=1 << 20))
    pair.src.start(pair.now)
    pair.run_until(lambda: until(pair))
    return pair


def altered(
    kind: str, change: Callable[[pb.Envelope], None]
) -> Callable[[framing.Message], framing.Message | None]:
    """A Faults.tamper that changes every message of one kind in flight, through `change`."""

    def tamper(message: framing.Message) -> framing.Message | None:
        if message.kind != kind:
            return None
        env = pb.Envelope()
        env.CopyFrom(message.envelope)
        change(env)
        return framing.Message(env, message.payload)

    return tamper


def bulk_numbering(pair: Pair) -> list[bool]:
    """From now on, for every bulk message the source hands its edge: does the sequence number
    it names match the one inside its envelope? (The edge picks a channel by that number.)"""
    seen: list[bool] = []
    take = pair.src.take_outgoing

    def checked_take() -> list[Outbound]:
        sent = take()
        seen.extend(m.seq == framing.decode(m.frames).envelope.seq for m in sent if m.bulk)
        return sent

    pair.src.take_outgoing = checked_take  # type: ignore[method-assign]
    return seen
