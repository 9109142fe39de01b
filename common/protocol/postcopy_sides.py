"""Postcopy as each session carries it out, both sides in one place: the source hands the guest
over and then serves pages (requests first, then the background stream) until the destination
proves it holds them all; the destination runs the guest at once, asks for what it misses,
places each page with its tags in one step, and gives the verdict.

Each side is a part of its session (a SourceSession or a DestSession): it sends, moves and
ends through the session, whose phase table dispatches to it. The decisions themselves (what
to send next, what to accept) are `postcopy`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from common.constants import MAX_PAGES_PER_MESSAGE
from common.guest.presence import PresenceGate
from common.protocol import events as ev
from common.protocol.outbound import Outbound
from common.protocol.phases import DestPhase, Failure, SourcePhase
from common.protocol.postcopy import (
    BackgroundShape,
    DestPostcopy,
    SourcePostcopy,
    background_shape,
    manifest_messages,
)
from common.protocol.ratelimit import TokenBucket
from common.protocol.stats import Downtime
from common.protocol.timers import Timer
from common.protocol.urgent import MAX_HELD_US, Answered, UrgentAnswerer, urgent_routing_id
from common.transfer import device_state
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.bitmap import decode_bitmap, encode_bitmap
from common.wire.codec import batch_pages, decode_postcopy_pages
from common.wire.framing import Buffer, WireError
from common.wire.postcopy_pages import encode_background, encode_requested

if TYPE_CHECKING:
    from common.protocol.dest import DestSession
    from common.protocol.source import SourceSession

_S = SourcePhase
_D = DestPhase


class SourcePostcopySide:
    def __init__(self, session: SourceSession) -> None:
        self.s = session
        self.manifest_digest = b""  # of every page's data and tags at the switchover
        self.switchover_vcpus = b""  # the vCPU digest at the switchover
        # what encoding an answer costs is read from this clock, not the session's `now` (a
        # figure for the destination's report, never a decision): the protocol tests' harness
        # gives its fake one
        self.clock: Callable[[], float] = time.perf_counter

    def switchover(self, now: float) -> None:
        """Stop here, send the vCPU state and the manifest, and let the destination run."""
        s = self.s
        began = self.clock()  # hashing the manifest below is downtime the session's `now` misses
        s.host.stop_guest()
        s.guest_stopped = True
        s.t_stop = now
        s._mark_time("guest stopped", now)
        s.precopy.pass_ = None
        s._catching_up = False
        if s.throttle:
            s.host.set_throttle(0.0)
        s._send(now, end_of_round=pb.EndOfRound(round=s.round + 1, final=True))
        s._send(now, device_state=device_state(s.guest))
        messages, self.manifest_digest = manifest_messages(s.mem)
        for message in messages:
            s._send(now, page_manifest=message)
        self.switchover_vcpus = s.guest.state_digest()
        s.stats.downtime.source_s = self.clock() - began
        start = pb.PostcopyStart(
            page_count=s.mem.page_count, source_downtime_us=Downtime.to_us(s.stats.downtime.source_s)
        )
        s._send(now, postcopy_start=start)
        s.postcopy = SourcePostcopy(s.mem.page_count)
        # the guest starts there now and is likely to fault soon: small background messages
        # until it has not for a while
        s.postcopy.t_last_request = now
        s.bucket = TokenBucket(s.cap(), now, min_burst=s.bucket.min_burst)  # no precopy debt
        s._move(_S.POSTCOPY)
        s._mark_time("postcopy started", now)

    # -- what the destination says ---------------------------------------------------------
    def on_page_request(self, msg: pb.PageRequest, now: float) -> None:
        s = self.s
        assert s.postcopy is not None
        pages = [p for p in msg.page_index[:MAX_PAGES_PER_MESSAGE] if p < s.mem.page_count]
        # a request naming pages out of range, or too many, is cut down, never fatal: the
        # destination's guest needs this side's pages whatever else it says
        s.refused_pages += len(msg.page_index) - len(pages)
        s.postcopy.request(pages, now)
        if s.connected:
            self.answer_requests(now)  # at once, before any background page is encoded

    def on_received_bitmap(self, msg: pb.ReceivedBitmap, now: float) -> None:
        s = self.s
        assert s.postcopy is not None
        if msg.page_count != s.mem.page_count:
            raise WireError(pb.ERROR_BAD_MESSAGE, f"received bitmap for {msg.page_count} pages")
        if s.t_dest_running is None:
            s.t_dest_running = now
            s._mark_time("destination running", now)
            s.stats.downtime.destination_s = Downtime.from_us(msg.destination_downtime_us)
        if msg.complete:
            s.dest_missing = 0
            if s.phase is _S.POSTCOPY:
                self._ask_verdict(now)
            return
        present = decode_bitmap(msg.bitmap_lz4, s.mem.page_count, "received bitmap")
        s.dest_missing = int(present.size - np.count_nonzero(present))
        s.postcopy.holds(present)
        s._pump(now)

    def _ask_verdict(self, now: float) -> None:
        s = self.s
        s._move(_S.POSTCOPY_VERIFYING)
        digests = pb.GuestDigests(ram_digest=self.manifest_digest, vcpu_digest=self.switchover_vcpus)
        s._send(now, verify_request=pb.VerifyRequest(attempt=1, source=digests))
        s.verifier.attempt = 1
        s.verifier.source_digests = {
            "ram": self.manifest_digest.hex(),
            "tags": "",
            "vcpu": self.switchover_vcpus.hex(),
        }
        s._mark_time("verify request 1 sent", now)

    def on_verify_result(self, result: pb.VerifyResult, now: float) -> None:
        s = self.s
        verifier = s.verifier
        verifier.verified = result.ok
        verifier.dest_digests = {
            "ram": result.destination.ram_digest.hex(),
            "tags": result.destination.tag_digest.hex(),
            "vcpu": result.destination.vcpu_digest.hex(),
        }
        # the manifest digest covers every page's data and tags as the source sent them, so
        # comparing it and the vCPU digest is the whole check
        ours = verifier.source_digests or {}
        theirs = verifier.dest_digests
        agrees = theirs["ram"] == ours.get("ram") and theirs["vcpu"] == ours.get("vcpu")
        if result.ok and not agrees:
            verifier.verified = False
            why = "postcopy verification: the destination reports a match but its manifest or vCPU digest differs from ours"
            s._unsettled(now, why, postcopy=True)
        elif result.ok:
            s._complete(now, "postcopy completed: every page placed and verified")
        else:
            why = "postcopy verification failed: the destination's manifest or vCPU state differs from ours"
            s._unsettled(now, why, postcopy=True)

    def refused(self, body: pb.Abort, now: float) -> None:
        s = self.s
        if s.t_dest_running is None and s.phase is _S.POSTCOPY_PAUSED:
            # Our resume was answered by a node that holds no session of ours and never said
            # it runs the guest; a postcopy destination never discards a guest it started, so
            # whatever ran there went with the process. (On a live connection a refusal is no
            # such proof: the guest may run there with its word of it still on the way.)
            reason = f"destination refused before it ran the guest: {body.reason}; the guest runs here again"
            s._fail(body.code, reason, now, notify=False, after_commit_ok=True)
            return
        # It ran the guest (or may have): whatever refuses us now, never resume here.
        if s.phase is not _S.UNSETTLED:
            s._unsettled(now, f"postcopy: the destination refused us ({body.reason})", postcopy=True)

    # -- what goes out ---------------------------------------------------------------------
    def send_at(self, now: float) -> float | None:
        """Requests that waited out a broken link go at once; background pages need room, and
        wait for the postcopy cap."""
        s = self.s
        assert s.postcopy is not None
        if s.postcopy.urgent:
            return now
        shape = self._background_shape(now)
        if not s.postcopy.background_left or s.in_flight >= shape.window:
            return None
        return s.bucket.ready_at(now) or now

    def pump(self, now: float) -> None:
        """Strict priority: every requested page goes before any background page, and little
        background is in flight, so an answer never queues behind much."""
        s = self.s
        assert s.postcopy is not None
        self.answer_requests(now)
        shape = self._background_shape(now)
        for _ in range(shape.per_turn):
            if s.in_flight >= shape.window or s.bucket.ready_at(now) is not None:
                return
            pages = s.postcopy.next_background(shape.pages)
            if pages is None:
                return
            self._send_background(pages, now)

    def _background_shape(self, now: float) -> BackgroundShape:
        s = self.s
        assert s.postcopy is not None
        rate, cap = s.meter.rate(), s.cap()
        if rate is not None and cap:
            rate = min(rate, cap)  # what the link carried before the cap bites is no promise
        return background_shape(s.postcopy.faulting(now), s.params.window, rate, s.link.rto_s)

    def answer_requests(self, now: float) -> None:
        """Answers go unsequenced on the urgent connection (QEMU's preempt channel); a lost one
        is asked for again."""
        s = self.s
        assert s.postcopy is not None
        urgent = s.postcopy.next_urgent()
        if urgent is None:
            return
        began = self.clock()
        for first in range(0, urgent.size, MAX_PAGES_PER_MESSAGE):
            pages = urgent[first : first + MAX_PAGES_PER_MESSAGE]
            body, payload, count = self.encode(pages, requested=True)
            held = now - s.postcopy.held_since(pages, now) + self.clock() - began
            body.source_held_us = min(MAX_HELD_US, max(0, round(held * 1e6)))
            frames = framing.encode(s.link.envelope(0, postcopy_pages=body), payload)
            s._urgent.append(frames)
            self._count(sum(len(f) for f in frames), count, now)

    def urgent_answerer(self) -> UrgentAnswerer:
        """What the urgent connection's own thread answers requests with (this epoch's)."""
        s = self.s
        return UrgentAnswerer(s.session_id, s.link.epoch, s.mem, use_lz4=s._use_lz4, clock=self.clock)

    def answered(self, answered: Answered, now: float) -> None:
        """Pages the urgent connection's thread sent: the background stream skips them, and
        they count as any answer does."""
        s = self.s
        if s.postcopy is None:
            return
        s.postcopy.requests += int(answered.pages.size)
        s.postcopy.t_last_request = max(s.postcopy.t_last_request, now)
        s.postcopy.urgent_thread_pages += int(answered.pages.size)
        if s.postcopy.needed is not None:
            s.postcopy.needed[answered.pages] = False
        self._count(answered.wire_bytes, int(answered.pages.size), now)

    def _send_background(self, pages: np.ndarray, now: float) -> None:
        s = self.s
        body, payload, count = self.encode(pages, requested=False)
        frames = s.link.sequenced(now, payload, data=(pages, False), postcopy_pages=body)
        s._outgoing.append(Outbound(frames, True, s.link.next_seq - 1))
        self._count(sum(len(f) for f in frames), count, now)

    def encode(self, pages: np.ndarray, *, requested: bool) -> tuple[pb.PostcopyPages, bytes, int]:
        mem = self.s.mem
        tags = mem.tag_ioctl.read_pages(pages)
        encode = encode_requested if requested else encode_background
        return (*encode(mem.pages, tags, pages, use_lz4=self.s._use_lz4), int(pages.size))

    def _count(self, size: int, pages: int, now: float) -> None:
        """What a postcopy message of pages cost: in the stats, and against the postcopy cap
        (answers pay too, so the background waits for them; they never wait on it)."""
        stats = self.s.stats
        stats.postcopy_bytes += size
        stats.ram_bytes += size
        stats.pages += pages
        stats.tag_sections += pages  # each page's tags travel with it (their bytes are in ram's)
        self.s.bucket.spend(size, now)


class DestPostcopySide:
    def __init__(self, session: DestSession) -> None:
        self.s = session
        # the source's urgent connection, once it spoke (its routing id and epoch): a first ask
        # for a page the guest waits on goes there, to the thread that serves it alone
        self.urgent_peer: bytes | None = None
        self.urgent_epoch = 0

    # -- what the source sends -------------------------------------------------------------
    def on_page_manifest(self, msg: pb.PageDigests, _: Buffer, now: float) -> None:
        s = self.s
        assert s.guest is not None
        if not s.postcopy_mode:
            raise WireError(pb.ERROR_BAD_MESSAGE, "page manifest in a precopy migration")
        if s.postcopy is None:
            s.postcopy = DestPostcopy(s.guest.memory.page_count)
            s.postcopy.split_placement = s.params.split_placement
        s.postcopy.add_manifest(msg)

    def on_postcopy_start(self, msg: pb.PostcopyStart, _: Buffer, now: float) -> None:
        s = self.s
        assert s.guest is not None
        began = time.perf_counter()  # taking the known digests and starting cost real time
        pc = s.postcopy
        if pc is None or not s.source_stopped:
            raise WireError(pb.ERROR_BAD_MESSAGE, "postcopy start before the switchover and its manifest")
        if msg.page_count != s.guest.memory.page_count:
            raise WireError(pb.ERROR_BAD_MESSAGE, f"postcopy start for {msg.page_count} pages")
        mem = s.guest.memory
        pc.start(mem, s.digests)
        pc.vcpu_digest = s.guest.state_digest()
        s.digests = None  # pages are checked one by one against the manifest from here
        # every page already here (a guest that converged): no access needs checking
        gate = None if pc.complete else PresenceGate(mem, pc.present)
        mem.gate = gate
        s.host.start_guest(s.guest, gate)
        s._move(_D.POSTCOPY)
        s.t_running = now
        s._events.append(ev.PostcopyStarted(pc.missing()))
        s.stats.downtime.source_s = Downtime.from_us(msg.source_downtime_us)
        s.stats.downtime.destination_s = time.perf_counter() - began
        self.send_bitmap(now, started_after_s=s.stats.downtime.destination_s)

    def on_postcopy_pages(
        self, msg: pb.PostcopyPages, payload: Buffer, now: float, *, urgent: bool = False
    ) -> None:
        s = self.s
        assert s.guest is not None and s.postcopy is not None
        pc = s.postcopy
        pc.t_last_data = now
        try:
            batch = decode_postcopy_pages(msg, payload, s.guest.memory.page_count)
        except WireError as exc:
            # Refused, never placed. From the stream, its pages are asked for again; an urgent
            # one is dropped (anyone may send those): a page the guest waits for is asked again
            # when overdue.
            s.refused_messages += 1
            s.last_refusal = exc.reason
            if urgent:
                return
            named = [p for p in batch_pages(msg.data)[:MAX_PAGES_PER_MESSAGE].tolist() if p < pc.page_count]
            for page in named:
                pc.outstanding.pop(page, None)
            s._ack(now)
            self.request(pc.to_request(named, now), now)
            return
        # the source's word for how long it held the request, never more than the whole wait
        placed = pc.place(s.guest.memory, batch, msg.requested, now, held_s=msg.source_held_us / 1e6)
        if placed.pages.size:
            s.t_last_placed = now  # progress, which a stream of refused or repeated pages is not
        s.stats.pages += int(batch.indices.size)
        s.stats.tag_sections += int(batch.indices.size)  # with their pages, in ram's bytes
        s.stats.ram_bytes += s._arrived_bytes
        s.stats.postcopy_bytes += s._arrived_bytes
        if not urgent:
            s._ack(now)
        if placed.rejected.size:
            # a copy that does not match the manifest is never shown to the guest: ask again
            self.request(pc.to_request(placed.rejected.tolist(), now), now)
        if pc.complete and not pc.late_tags:
            self._all_present(now)

    def on_urgent(self, peer: bytes, message: framing.Message, now: float) -> None:
        """The source's urgent connection (its UrgentReady, or an answer on it) from this
        session's epoch or a newer one. Its answers are checked against the manifest like any
        page, so from wherever they came they can only place the source's own version; a peer
        that only claims to be that connection costs the guest a re-ask on the sequenced one. Only
        the routing id the source gives that connection counts, of this epoch or the next (a
        source that reconnects opens it before its Resume arrives), never one further ahead."""
        s = self.s
        epoch = message.envelope.epoch
        own = peer == urgent_routing_id(s.session_id, epoch)
        if own and self.urgent_epoch <= epoch <= s.link.epoch + 1:
            self.urgent_peer, self.urgent_epoch = peer, epoch
        if message.kind == "postcopy_pages" and s.machine.handles("postcopy_pages"):
            body, payload = message.envelope.postcopy_pages, message.payload
            s._fire("postcopy_pages", partial(self.on_postcopy_pages, body, payload, now, urgent=True), now)

    def unreachable(self, peer: bytes) -> None:
        """A message to `peer` could not be sent (its connection is gone): if that was the urgent
        connection, requests go sequenced until the source opens another."""
        if peer == self.urgent_peer:
            self.urgent_peer = None

    def verdict(self, msg: pb.VerifyRequest, now: float) -> None:
        s = self.s
        pc = s.postcopy
        assert pc is not None and s.guest is not None
        if not pc.complete:
            raise WireError(
                pb.ERROR_BAD_MESSAGE, f"verify_request while {pc.missing()} pages are still missing"
            )
        ours = pc.digest()
        ok = msg.source.ram_digest == ours and msg.source.vcpu_digest == pc.vcpu_digest
        s.verified = ok
        s.my_digests = {"ram": ours.hex(), "tags": "", "vcpu": pc.vcpu_digest.hex()}
        result = pb.VerifyResult(
            ok=ok,
            attempt=msg.attempt,
            vcpu_mismatch=msg.source.vcpu_digest != pc.vcpu_digest,
            destination=pb.GuestDigests(ram_digest=ours, vcpu_digest=pc.vcpu_digest),
        )
        s._send(now, verify_result=result)
        why = "postcopy verification failed: the manifest or the vCPU state differs from the source's"
        if not ok and s.failure is None:
            s.failure = Failure(pb.ERROR_VERIFICATION_FAILED, why, s.phase.value)
        s._move(_D.RUNNING)
        s.t_end = now
        s._events.append(ev.Finished("completed" if ok else "failed", None if ok else why))

    # -- on time ---------------------------------------------------------------------------
    def timers(self, now: float) -> list[Timer]:
        """While the source is silent nothing piles up or stalls: the resume carries on."""
        s, pc = self.s, self.s.postcopy
        if pc is None:
            return []
        timers = [Timer("late-tags", now, self._place_late_tags, work=True)] if pc.late_tags else []
        if s.link.silence(now) >= s.params.peer_timeout_s:
            return timers
        if not pc.complete:
            at = max(s.t_last_placed, s.t_running or now) + s.params.max_source_wait_s
            timers.append(Timer("postcopy-stalled", at, self._stalled))
            if not any(e.kind == "received_bitmap" for e in s.link.unacked):
                # quiet while pages are missing (a batch refused as malformed, a source that
                # lost track): say again what we hold, and the source sends the rest
                at = max(pc.t_last_data, pc.t_last_bitmap) + s.link.rto_s
                timers.append(Timer("bitmap-again", at, self.send_bitmap))
        if pc.outstanding:
            at = min(pc.outstanding.values()) + s.link.rto_s
            timers.append(Timer("ask-again", at, self._ask_overdue))
        return timers

    def take_misses(self, now: float) -> None:
        """The pages the guest found missing: asked for at once (the source may be silent: the
        guest runs on the pages it holds and waits only on missing ones)."""
        assert self.s.postcopy is not None
        misses = self.s.host.take_page_misses()
        self.request(self.s.postcopy.to_request(list(misses), now, missed_at=misses), now, first_ask=True)

    def _place_late_tags(self, now: float) -> None:
        s = self.s
        pc = s.postcopy
        assert pc is not None and s.guest is not None
        pc.place_late_tags(s.guest.memory, now)
        if pc.complete and not pc.late_tags:
            self._all_present(now)

    def _ask_overdue(self, now: float) -> None:
        assert self.s.postcopy is not None
        self.request(sorted(self.s.postcopy.overdue(now, self.s.link.rto_s)), now)

    def _stalled(self, now: float) -> None:
        """A source that is heard but sends none of the pages this guest lacks holds this node
        for good (a postcopy guest is otherwise never discarded): past the operator's bound the
        copy here stops, and the source, which keeps the guest as at the switchover, is told."""
        s = self.s
        assert s.postcopy is not None
        waited = now - max(s.t_last_placed, s.t_running or now)
        why = (
            f"postcopy stalled: no page arrived for {waited:.1f} s while {s.postcopy.missing()} pages "
            "were missing and the source was heard; the guest here is stopped (the source keeps it "
            "as at the switchover)"
        )
        s._stop_copy(pb.ERROR_TIMEOUT, why, now, notify=True)

    # -- what goes out ---------------------------------------------------------------------
    def request(self, pages: list[int], now: float, *, first_ask: bool = False) -> None:
        """A first ask for pages the guest waits on goes on the source's urgent connection when
        it spoke in this epoch (unsequenced: unanswered, it is asked again here, sequenced)."""
        s, pc = self.s, self.s.postcopy
        assert pc is not None
        urgent = self.urgent_peer if first_ask and self.urgent_epoch == s.link.epoch else None
        for first in range(0, len(pages), MAX_PAGES_PER_MESSAGE):
            request = pb.PageRequest(page_index=pages[first : first + MAX_PAGES_PER_MESSAGE])
            if urgent is None:
                s._send(now, page_request=request)
            else:
                pc.urgent_asks += 1
                # not the link's own sending: the source's loop hears nothing of it, so it may
                # not stand in for a heartbeat
                s._outgoing.append((urgent, framing.encode(s.link.envelope(0, page_request=request))))

    def _all_present(self, now: float) -> None:
        s = self.s
        assert s.guest is not None
        if s.guest.memory.gate is not None:
            s.guest.memory.gate = None  # no more journaling: every access is to a present page
            self.send_bitmap(now)

    def send_bitmap(self, now: float, started_after_s: float = 0.0) -> None:
        pc = self.s.postcopy
        assert pc is not None
        pc.t_last_bitmap = now
        bitmap = b"" if pc.complete else encode_bitmap(pc.present)
        received = pb.ReceivedBitmap(
            page_count=pc.page_count,
            bitmap_lz4=bitmap,
            complete=pc.complete,
            destination_downtime_us=Downtime.to_us(started_after_s),
        )
        self.s._send(now, received_bitmap=received)
