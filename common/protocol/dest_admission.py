"""Who may open a session on a destination and keep it: the hello's checks and the allocation
they allow, a busy node's answer to a second source, a resumed connection, the sessions whose
guest ran here and left (their sources may still be reconnecting), and how long a silent source
is waited for. A part of its DestSession.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from common.constants import PAGE_SIZE, PROTOCOL_VERSION, REFUSAL_ANSWERS_PER_S
from common.guest.digest import DigestCache
from common.protocol import events as ev
from common.protocol.handshake import REQUIRED_FEATURES, check_hello, granted_channels
from common.protocol.link import Link
from common.protocol.phases import DestPhase
from common.protocol.ratelimit import PerSecond
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.bitmap import decode_bitmap
from common.wire.framing import Buffer, WireError

if TYPE_CHECKING:
    from common.protocol.dest import DestSession

_D = DestPhase


@dataclass(frozen=True)
class HandedOver:
    """A session whose guest ran here, kept after it ended (the guest may have moved on since):
    its source may still be reconnecting, unsure whether the commit took, and must hear that it
    did, never a "wrong session" that it would read as "the guest is yours again"."""

    key: bytes  # the key that opened it: only that source hears about it
    received: int  # what had arrived from it in order


# Sessions remembered that way: a source reconnects for seconds, not for many migrations.
REMEMBERED_HANDOVERS = 64


class DestAdmission:
    def __init__(self, session: DestSession, handed_over: dict[bytes, HandedOver]) -> None:
        self.s = session
        self.handed_over = dict(handed_over)  # by session id: sessions whose guest ran here
        # A flood of bad messages gets this many answers a second, not one each: refusing
        # must not cost more than sending garbage does. Hellos have a budget of their own.
        self._refusal_answers = PerSecond(REFUSAL_ANSWERS_PER_S)
        self._hello_answers = PerSecond(REFUSAL_ANSWERS_PER_S)

    def answer_handed_over(self, peer: bytes, env: pb.Envelope, kind: str, peer_key: bytes) -> None:
        """A message of a session whose guest ran here: a resume hears that the guest runs here
        (whatever became of it since, it is no longer the source's); anything else is ignored.
        Never refused: a refusal tells a source that the commit did not take."""
        s = self.s
        record = self.handed_over[env.session_id]
        if peer_key != record.key:
            s._refuse(peer, pb.ERROR_UNAUTHORIZED, "this session belongs to another source's key")
            return
        if kind != "resume":
            return
        answer = framing.envelope(
            env.session_id,
            0,
            resume_ack=pb.ResumeAck(
                epoch=env.resume.epoch, last_received=record.received, guest_running=True
            ),
        )
        answer.epoch = env.resume.epoch
        answer.received = record.received
        s._outgoing.append((peer, framing.encode(answer)))

    def handed_over_sessions(self) -> dict[bytes, HandedOver]:
        """What the next session on this node must remember: this one too, if its guest ran here."""
        s = self.s
        past = dict(self.handed_over)
        if s.phase is _D.RUNNING and s.failure is None and s.session_id:
            # (not one whose copy stopped, taken back or stalled, nor a failed verdict: its
            # source must not read "the guest runs there")
            past[s.session_id] = HandedOver(s.peer_key, s.link.received)
        while len(past) > REMEMBERED_HANDOVERS:
            del past[next(iter(past))]
        return past

    def from_source(self, peer: bytes) -> bool:
        """The session's own connection, or one of its parallel channels (the same routing id
        with b"D" and the channel's number after it)."""
        s = self.s
        if peer == s.peer:
            return True
        return (
            s.channels > 1
            and s.peer is not None
            and len(peer) == len(s.peer) + 2
            and peer.startswith(s.peer + b"D")
            and 1 <= peer[-1] < s.channels
        )

    def hello_while_busy(self, peer: bytes, env: pb.Envelope, now: float, peer_key: bytes) -> None:
        s = self.s
        if peer == s.peer and env.session_id == s.session_id and peer_key == s.peer_key:
            # our source's hello again: our answer was lost, so send it again now
            s._resend_from(s.link.peer_received, now)
            return
        reason = f"destination busy with another migration (phase {s.phase.value})"
        s._refuse_hello(peer, env.session_id, pb.ERROR_BUSY, reason)

    def on_hello(self, peer: bytes, env: pb.Envelope, now: float, peer_key: bytes) -> None:
        s = self.s
        hello = env.hello
        problem = check_hello(hello, s.params.auth_token, s.params.max_ram_bytes)
        hint = None
        if problem is None and env.seq != 1:
            problem = (pb.ERROR_BAD_MESSAGE, f"a hello must be message 1 of its session, not {env.seq}")
        if problem is None and hello.populated_hint_lz4:
            try:
                hint = decode_bitmap(
                    hello.populated_hint_lz4, hello.ram_bytes // PAGE_SIZE, "populated-pages hint"
                )
            except WireError as exc:
                problem = (exc.code, exc.reason)
        if problem is not None:
            s._refuse_hello(peer, env.session_id, *problem)
            return
        try:
            guest = s.host.create_guest(hello.ram_bytes, hello.vcpu_count)
        except Exception as exc:  # any host error refuses this source, never the node
            # nothing of the session was set yet: the next hello finds this node as it was
            reason = f"the destination cannot hold a guest of {hello.ram_bytes} bytes: {exc}"
            s._refuse_hello(peer, env.session_id, pb.ERROR_INTERNAL, reason)
            return
        s.peer = peer
        s.peer_key = peer_key
        s.session_id = env.session_id
        s.link = Link(env.session_id, now, rto_s=s.params.retransmit_after_s)
        s.link.epoch = env.epoch or 1
        s.link.arrive(env.seq)
        self.keep_for(hello.reconnect_timeout_ms, hello.postcopy_recover_timeout_ms)
        s.t_hello = now
        s.guest = guest
        s.digests = DigestCache(s.guest.memory)
        s.use_lz4 = pb.FEATURE_LZ4 in hello.features
        s.postcopy_mode = hello.mode == pb.MODE_POSTCOPY
        features = sorted(REQUIRED_FEATURES) + ([pb.FEATURE_LZ4] if s.use_lz4 else [])
        if s.postcopy_mode:
            features.append(pb.FEATURE_POSTCOPY)
        s.channels = granted_channels(hello)
        s.channel_batches = [0] * s.channels
        if s.channels > 1:
            features.append(pb.FEATURE_MULTI_CHANNEL)
        s._move(_D.RECEIVING)
        if hint is not None:
            s.host.prefault(s.guest, np.flatnonzero(hint))
        s._send(
            now,
            hello_ack=pb.HelloAck(
                accepted=True,
                protocol_version=PROTOCOL_VERSION,
                features=features,
                initial_credit=s.params.window,
                channels=s.channels if s.channels > 1 else 0,
            ),
        )

    def keep_for(self, reconnect_ms: int, postcopy_recover_ms: int) -> None:
        s = self.s
        s.reconnect_wait_s = self._bounded_wait(reconnect_ms)
        s.postcopy_keep_s = self._bounded_wait(postcopy_recover_ms)

    def on_link_timeouts(self, msg: pb.LinkTimeouts, _: Buffer, now: float) -> None:
        self.keep_for(msg.reconnect_timeout_ms, msg.postcopy_recover_timeout_ms)

    def _bounded_wait(self, asked_ms: int) -> float:
        """How long a silent source is waited for: what its hello asks, at least this node's
        peer timeout and at most its operator's bound (a uint32 of milliseconds is 49 days)."""
        s = self.s
        asked = max(s.params.peer_timeout_s, asked_ms / 1000.0)
        return min(asked, max(s.params.max_source_wait_s, s.params.peer_timeout_s))

    def on_resume(self, peer: bytes, env: pb.Envelope, now: float) -> None:
        s = self.s
        resume = env.resume
        if resume.epoch < s.link.epoch or (resume.epoch == s.link.epoch and peer != s.peer):
            return  # an old attempt, or a stranger replaying one
        # both acknowledgements it carries are checked before anything changes (the envelope's
        # too: a resume is where a connection's state is rebuilt from what the peer claims)
        claimed = max(resume.last_received, env.received)
        if claimed >= s.link.next_seq:
            s._refuse(peer, pb.ERROR_BAD_MESSAGE, f"resume claims message {claimed}, never sent")
            return
        s.peer = peer
        fresh = resume.epoch > s.link.epoch
        s.link.epoch = resume.epoch
        s.link.heard(env, now)
        s.link.acknowledged(resume.last_received, now)
        if fresh:
            s.reorder.clear()  # the source sends all of it again, encoded afresh
            s.link.stats.resumes += 1
            s._events.append(ev.LinkRestored(resume.epoch, len(s.link.unacked)))
            # a postcopy stall is measured over time the source was heard: a source back from a
            # long outage gets the whole bound again to send what is missing
            s.t_last_placed = max(s.t_last_placed, now)
        # (the guest runs here as the handover meant it to: a postcopy whose verdict failed
        # runs too, but says no; the source then stays unsettled for an operator)
        running = s.phase is _D.RUNNING and s.failure is None
        s._unsequenced(
            now,
            resume_ack=pb.ResumeAck(epoch=resume.epoch, last_received=s.link.received, guest_running=running),
        )
        s._resend_from(resume.last_received, now)
        s.link.restart_retransmit_clock(now)
        if fresh and s.phase is _D.POSTCOPY and s.postcopy is not None and not s.postcopy.complete:
            s.postcopy_side.send_bitmap(now)  # what arrived before the break: the source sends the rest

    def taken_back(self, reason: str, now: float) -> None:
        """The source runs the guest again, by its operator's word: whatever ran here stops,
        even a postcopy guest or one handed over, or the guest would run twice."""
        self.s._stop_copy(
            pb.ERROR_GUEST_TAKEN_BACK, f"the source took the guest back: {reason}", now, notify=False
        )

    # -- refusals ----------------------------------------------------------------------------
    def refuse(self, peer: bytes, code: int, reason: str) -> None:
        s = self.s
        s.refused_messages += 1
        s._events.append(ev.Refused(peer, reason, hello=False))
        if self.from_source(peer) and s.phase in (_D.RECEIVING, _D.AWAIT_COMMIT, _D.POSTCOPY):
            # Refused under our source's connection name: a correct source never sends this, so
            # it came from a connection that took the name over (ROUTER_HANDOVER) or a source
            # past talking to. An answer would reach the impostor at best, and at worst our
            # source, as this side's verdict on its migration: counted, not answered.
            return
        if self._refusal_answers.take(s._t_received):
            self._reply(peer, b"", abort=pb.Abort(code=code, reason=reason))

    def refuse_hello(self, peer: bytes, session_id: bytes, code: int, reason: str) -> None:
        s = self.s
        s.refused_messages += 1
        s._events.append(ev.Refused(peer, reason, hello=True))
        # a budget of their own: a flood of bad messages must not silence the answer a real
        # (if refused) source needs to hear, such as busy or too large
        if self._hello_answers.take(s._t_received):
            ack = pb.HelloAck(accepted=False, code=code, reason=reason, protocol_version=PROTOCOL_VERSION)
            self._reply(peer, session_id, hello_ack=ack)

    def _reply(self, peer: bytes, session_id: bytes, **body: Any) -> None:
        """Answer a peer outside the session: no sequence number of ours is spent."""
        self.s._outgoing.append((peer, framing.encode(framing.envelope(session_id, 0, **body))))
