"""What the destination tells its log about messages it refused or dropped unread, bounded so
that a hostile peer can neither flood the log nor go unseen."""

from __future__ import annotations

import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from common.constants import REFUSAL_LOG_LINES_PER_S
from common.protocol import events as ev
from common.protocol.ratelimit import PerSecond


class RefusalLog:
    def __init__(self, log: Any) -> None:
        self.log = log
        self.refusals_unlogged = 0  # refused messages not yet in the log
        self.dropped_unlogged = 0  # strangers' messages dropped unread, not yet in the log
        self._hello_lines = PerSecond(REFUSAL_LOG_LINES_PER_S)
        self._t_logged = float("-inf")
        self._last: ev.Refused | None = None

    def refused(self, event: ev.Refused) -> None:
        """Refused hellos are logged one by one while they are few (an operator needs to see a
        misconfigured source); beyond REFUSAL_LOG_LINES_PER_S, and for every other refused
        message, a count at most once a second."""
        if event.hello and self._hello_lines.take(time.monotonic()):
            self.log.warning("source refused", connection=event.peer.hex(), reason=event.reason)
            return
        self.refusals_unlogged += 1
        self._last = event
        self.flush()

    def dropped(self) -> None:
        self.dropped_unlogged += 1

    def flush(self, *, final: bool = False) -> None:
        now = time.monotonic()
        if not (final or now - self._t_logged >= 1.0):
            return
        event = self._last
        if event is not None and self.refusals_unlogged:
            self.log.warning(
                "messages refused",
                count=self.refusals_unlogged,
                last_reason=event.reason,
                connection=event.peer.hex(),
            )
            self.refusals_unlogged = 0
            self._t_logged = now
        if self.dropped_unlogged:
            self.log.warning("strangers' messages dropped unread", count=self.dropped_unlogged)
            self.dropped_unlogged = 0
            self._t_logged = now


class HandshakeWatch:
    """A source whose connection fails before any message (no keys at a keyed destination, or
    keys at a keyless one) is invisible to the session: the listening socket's monitor sees it,
    and the destination's log says why, through the refusal log's bounds."""

    def __init__(self, sock: zmq.Socket[bytes], refusals: RefusalLog, *, keyed: bool) -> None:
        self.socket = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self._owner = sock
        self.refusals = refusals
        self.keyed = keyed

    def service(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.socket, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            reason = self.reason(event["event"], event["value"])
            if reason is not None:
                self.refusals.refused(ev.Refused(peer=b"", reason=reason, hello=True))

    def reason(self, kind: int, value: int) -> str | None:
        mismatch = (
            kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        )
        if not mismatch and kind != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            return None  # a damaged handshake: the network's doing, and the peer tries again
        # The peer that sees the mismatch first hangs up: this side then sees only the end of
        # a handshake, which a connection lost mid-handshake also shows.
        cause = (
            "a source without keys (this destination requires CURVE keys: the source needs --key "
            "and --peer-key, and its .key in this node's --allow)"
            if self.keyed
            else "a source with keys (this destination runs without keys: drop the source's "
            "--key/--peer-key, or give this node --key and --allow)"
        )
        if mismatch:
            return f"{cause} tried to connect"
        return f"a connection ended in its handshake, before any message: most often {cause}"

    def close(self) -> None:
        self._owner.disable_monitor()
        self.socket.close(linger=0)


def watch_handshakes(
    watch: HandshakeWatch | None,
    daemon: Any,
    poller: zmq.Poller | None,
    events: dict[Any, int],
    *,
    waiting: bool,
) -> HandshakeWatch | None:
    """The watch runs only while the destination waits for a source, where a source that cannot
    get in is met: attached during a keyed migration, a monitor on the listening socket made
    libzmq's recovery from damaged CURVE messages stall for seconds
    (tests/test_faults_proxy.py::test_corruption_under_curve_is_ridden_out failed with it)."""
    if watch is not None and watch.socket in events:
        watch.service()
    if waiting and watch is None and poller is not None:
        watch = HandshakeWatch(daemon.sock, daemon.refusals, keyed=daemon.options.security.key is not None)
        poller.register(watch.socket, zmq.POLLIN)
    elif not waiting and watch is not None:
        watch.service()  # what came before the source got in
        if poller is not None:
            poller.unregister(watch.socket)
        watch.close()
        watch = None
    return watch
