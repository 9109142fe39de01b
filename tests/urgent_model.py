"""The source's urgent connection in the protocol harness, as OutgoingMigration runs it: its
thread starts with postcopy and says so, answers what comes on it with the very answerer the
thread runs (at once, on the fake clock), and sends the session's own answers."""

from __future__ import annotations

from typing import Protocol

from common.protocol.source import SourceSession
from common.protocol.urgent import UrgentAnswerer, urgent_routing_id


class FakeLink(Protocol):
    def put(self, frames: list[bytes], now: float) -> None: ...

    def take(self, now: float) -> list[list[bytes]]: ...


class UrgentThread:
    def __init__(self) -> None:
        self.answerer: UrgentAnswerer | None = None

    @staticmethod
    def peer(src: SourceSession) -> bytes:
        """The routing id the destination knows that connection by."""
        return urgent_routing_id(src.session_id, src.link.epoch)

    def serve(self, src: SourceSession, down: FakeLink, up: FakeLink, now: float) -> None:
        if src.postcopy is None or src.phase.ended:
            self.answerer = None  # stopped: the guest may run at the source again
        elif self.answerer is None:
            self.answerer = src.postcopy_side.urgent_answerer()
            down.put(self.answerer.ready(), now)
        for frames in up.take(now):
            answer = self.answerer.answer(frames) if self.answerer is not None else None
            if answer is not None:
                down.put(answer[0], now)
                src.postcopy_side.answered(answer[1], now)
        for frames in src.take_urgent():
            down.put(frames, now)
