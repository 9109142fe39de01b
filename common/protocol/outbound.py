"""What a source session hands its edge to send (shared by the session's parts)."""

from __future__ import annotations

from typing import NamedTuple

from common.wire.framing import Buffer


class Outbound(NamedTuple):
    """A message to send, and whether it is a bulk one (a page or tag batch): bulk messages may
    take any of the parallel channels, the rest keep to the first. The destination delivers in
    sequence order whatever the channel, so an end of round still follows its round's batches."""

    frames: list[Buffer]
    bulk: bool = False
    seq: int = 0  # a batch's sequence number: the edge counts what each channel has in flight
