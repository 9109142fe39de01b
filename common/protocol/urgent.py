"""What the source's urgent connection does with what comes on it, apart from the thread and the
socket that carry it (no I/O here).

In postcopy the source's guest is stopped: its memory changes no more, so a page request can be
answered from it by anyone, at any time, without the session. The urgent connection's own
thread does exactly that (QEMU's postcopy-preempt channel), so that an answer never waits for
the session's loop, which may be encoding a background batch. The session hears afterwards
which pages went (`Answered`), so that its background stream skips them and its cap and
statistics count them.

Anything on that connection that is not a page request of this session is dropped unread and
counted: the destination asks again on the sequenced connection when a request goes unanswered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.constants import MAX_PAGES_PER_MESSAGE, URGENT_SUFFIX
from common.guest.memory import GuestMemory
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import Buffer, WireError
from common.wire.postcopy_pages import encode_requested

Indices = npt.NDArray[np.int64]
MAX_HELD_US = (1 << 32) - 1


def routing_id(session_id: bytes, epoch: int) -> bytes:
    """A source connection's routing id starts with the session and epoch: ZeroMQ's own
    reconnects (after a reset) keep it, and the destination knows it as this session's."""
    return session_id + epoch.to_bytes(4, "big")


def urgent_routing_id(session_id: bytes, epoch: int) -> bytes:
    return routing_id(session_id, epoch) + URGENT_SUFFIX


def is_urgent_peer(peer: bytes, session_id: bytes) -> bool:
    """Whether a routing id is that of the session's urgent connection, of any epoch."""
    return peer.startswith(session_id) and peer[len(routing_id(session_id, 0)) :] == URGENT_SUFFIX


@dataclass(frozen=True)
class Answered:
    """Pages the urgent connection sent, and what that cost on the wire."""

    pages: Indices
    wire_bytes: int


class UrgentAnswerer:
    def __init__(
        self,
        session_id: bytes,
        epoch: int,
        mem: GuestMemory,
        *,
        use_lz4: bool,
        clock: Callable[[], float],
    ) -> None:
        self.session_id = session_id
        self.epoch = epoch
        self.mem = mem
        self.use_lz4 = use_lz4
        self.clock = clock
        self.dropped = 0  # messages on this connection that were not a request of ours

    def ready(self) -> list[Buffer]:
        """The first message on the connection: requests may come here."""
        return framing.encode(self._envelope(urgent_ready=pb.UrgentReady()))

    def answer(self, frames: Sequence[Buffer]) -> tuple[list[Buffer], Answered] | None:
        """The answer to one message, or None when it asks for nothing this side holds."""
        began = self.clock()
        pages = self.requested_pages(frames)
        if pages is None:
            self.dropped += 1
            return None
        body, payload = encode_requested(
            self.mem.pages, self.mem.tag_ioctl.read_pages(pages), pages, use_lz4=self.use_lz4
        )
        body.source_held_us = min(MAX_HELD_US, max(0, round((self.clock() - began) * 1e6)))
        out = framing.encode(self._envelope(postcopy_pages=body), payload)
        return out, Answered(pages, sum(len(f) for f in out))

    def requested_pages(self, frames: Sequence[Buffer]) -> Indices | None:
        """The pages a request of this session names, in range, each once, at most a message's
        worth; None for anything else (a malformed or foreign message, or no page of ours)."""
        try:
            message = framing.decode(frames)
        except WireError:
            return None
        env = message.envelope
        if message.kind != "page_request" or env.session_id != self.session_id or env.epoch != self.epoch:
            return None
        named = np.fromiter(
            env.page_request.page_index, dtype=np.uint64, count=len(env.page_request.page_index)
        )
        named = named[named < self.mem.page_count][:MAX_PAGES_PER_MESSAGE]
        if not named.size:
            return None
        return np.unique(named).astype(np.int64)

    def _envelope(self, **body: object) -> pb.Envelope:
        env = framing.envelope(self.session_id, 0, **body)
        env.epoch = self.epoch
        return env
