"""The front half of both sessions: what every arriving message goes through before its kind
matters (decoding and version, the connection's epoch, what it acknowledges, its sequence
number), and the link's own requests (an ack that asks for a resend). Written once, for the
source and the destination alike; what each side does with the verdict stays with it.
"""

from __future__ import annotations

from enum import Enum

from common.constants import PROTOCOL_VERSION
from common.protocol.link import Arrival, Link, Unacked
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import Buffer, WireError


class Intake(Enum):
    STALE = "stale"  # from a connection the session has left behind: ignored
    UNSEQUENCED = "unsequenced"  # link traffic (ack, heartbeat, resume, resume_ack)
    REPEAT = "repeat"  # handled already: our ack may be what was lost, so it goes again
    AHEAD = "ahead"  # something before it is missing: held (parallel channels) or asked for
    NEXT = "next"  # the one expected: handle it


_ARRIVAL = {Arrival.NEXT: Intake.NEXT, Arrival.REPEAT: Intake.REPEAT, Arrival.AHEAD: Intake.AHEAD}


def decode(frames: list[Buffer], listener: str) -> framing.Message:
    """The message, checksum and version checked; WireError says why not (ERROR_CHECKSUM or
    ERROR_BAD_MESSAGE: damaged in transit or malformed; ERROR_VERSION_MISMATCH, naming both
    versions)."""
    message = framing.decode(frames)
    version = message.envelope.protocol_version
    if version != PROTOCOL_VERSION:
        raise WireError(
            pb.ERROR_VERSION_MISMATCH,
            f"protocol version {version} is not supported; this {listener} speaks version {PROTOCOL_VERSION}",
        )
    return message


def admit(link: Link, env: pb.Envelope, now: float, speaker: str) -> tuple[Intake, list[Unacked]]:
    """A message of this session: its epoch, what it acknowledges (released from the resend
    queue, returned) and its place in the sequence. WireError for an acknowledgement of a
    message never sent."""
    if link.stale(env):
        return Intake.STALE, []
    try:
        released = link.heard(env, now)
    except ValueError as exc:
        raise WireError(pb.ERROR_BAD_MESSAGE, f"{speaker} {exc}") from None
    if env.seq == 0:
        return Intake.UNSEQUENCED, released
    return _ARRIVAL[link.arrive(env.seq)], released


def ack(link: Link, now: float, *, resend: bool = False) -> list[Buffer]:
    """What we received; with `resend`, asking for everything after it again (go-back-N)."""
    return link.unsequenced(now, ack=pb.Ack(resend_from=link.received + 1 if resend else 0))


def resend_after(link: Link, request: pb.Ack, speaker: str) -> list[Unacked]:
    """What the peer's ack asks to have again (nothing, without a request); WireError for a
    request of a message never sent."""
    if not request.resend_from:
        return []
    if request.resend_from > link.next_seq:
        raise WireError(
            pb.ERROR_BAD_MESSAGE, f"{speaker} asked for message {request.resend_from}, never sent"
        )
    return link.to_resend(request.resend_from - 1)
