"""The control commands that steer a node's outgoing migration, the same on both daemons (a
dest-node sends a guest on as a source-node does): the choices a `migrate` makes for this
migration alone (mode, channels, the peer's key, plaintext), the parameters, and
postcopy-start, recover and settle.

As in QMP, the parameters belong to the node and hold for each later migration until changed;
mode, channels and keys belong to one `migrate` (QEMU's capabilities and URI), so a migration
that went wrong can be tried again differently without restarting the guest's process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from common.constants import MAX_CHANNELS
from common.control import ControlError, peer_key_arg
from common.endpoints import check_endpoint
from common.keys import KeyFileError, Security
from common.protocol.params import SETTABLE, MigrationParameters

if TYPE_CHECKING:
    from common.outgoing import OutgoingMigration

MODES = ("precopy", "postcopy")


@dataclass(frozen=True)
class MigrateChoices:
    uri: str
    params: MigrationParameters
    peer_key: bytes | None


def migrate_choices(
    args: dict[str, Any], base: MigrationParameters, security: Security, default_peer_key: bytes | None
) -> MigrateChoices:
    """What one `migrate` asks for, checked: the node's parameters with this migration's mode,
    postcopy rounds and channels; its peer's key (or the node's default); plaintext only if
    this migration allows it or the node was started --insecure."""
    uri = _destination(args.get("uri"), 'migrate needs "uri", e.g. tcp://127.0.0.1:4444')
    changes: dict[str, Any] = {}
    mode = args.get("mode")
    if mode is not None:
        if mode not in MODES:
            raise ControlError(f'"mode" is precopy or postcopy, not {mode!r}')
        changes["postcopy"] = mode == "postcopy"
    if "postcopy_after_rounds" in args:
        changes["postcopy_after_rounds"] = _after_rounds(args["postcopy_after_rounds"])
    if "channels" in args:
        channels = args["channels"]
        if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
            raise ControlError(f'"channels" is a whole number from 1 to {MAX_CHANNELS}, not {channels!r}')
        changes["channels"] = channels
    try:
        params = replace(base, **changes).check()
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    insecure = args.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ControlError('"insecure" is true or false')
    peer_key = peer_key_arg(args) or default_peer_key
    try:
        security.check_peer(uri, peer_key, insecure=insecure or None)
    except KeyFileError as exc:
        raise ControlError(_for_ctl(str(exc))) from None
    return MigrateChoices(uri, params, peer_key)


def _destination(uri: Any, not_text: str) -> str:
    """A destination's URI from a control request, or the error `not_text` if it is no text."""
    if not isinstance(uri, str):
        raise ControlError(not_text)
    try:
        check_endpoint(uri, "destination")
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    return uri


def _after_rounds(value: Any) -> int | None:
    if value is None or value == "never":
        return None  # only when an operator says so (ctl postcopy-start)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ControlError(
            f'"postcopy_after_rounds" is a whole number of 0 or more, or "never"; not {value!r}'
        )
    return value


def _for_ctl(message: str) -> str:
    # the start-up flags' names, as a migration started from ctl spells them
    return (
        message.replace("--peer-key FILE", "ctl migrate --peer-key FILE")
        .replace("or --insecure", "or ctl migrate --insecure")
        .replace(
            "give keys (--key, and --peer-key or --allow)",
            "give keys (this node's --key at start-up, and ctl migrate --peer-key FILE)",
        )
    )


class OutgoingCommands:
    """The handlers; `outgoing` reads the node's migration in progress (or last one), `after`
    lets the daemon act on what a call changed, `status` is what each answers with."""

    def __init__(
        self,
        params: MigrationParameters,
        outgoing: Callable[[], OutgoingMigration | None],
        after: Callable[[], None],
        status: Callable[[], dict[str, Any]],
        log: Any,
    ) -> None:
        self.params = params
        self._outgoing = outgoing
        self._after = after
        self._status = status
        self.log = log

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "parameters": lambda _: self.params.settable(),
            "set-parameters": self.set_parameters,
            "postcopy-start": self.postcopy_start,
            "recover": self.recover,
            "settle": self.settle,
        }

    def set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        before = self.params.settable()
        self.params = self.params.updated(args)
        outgoing = self._outgoing()
        if outgoing is not None and not outgoing.session.phase.terminal:
            # a migration in progress keeps its own mode and channels: only the tunables change
            tunables = {name: getattr(self.params, name) for name in SETTABLE}
            outgoing.session.set_parameters(replace(outgoing.session.params, **tunables), time.monotonic())
        after = self.params.settable()
        changed = {name: f"{before[name]} -> {after[name]}" for name in after if before[name] != after[name]}
        if changed:
            self.log.info("parameters changed", **changed)
        return after

    def _session_call(self, what: str, call: Callable[[Any], None]) -> dict[str, Any]:
        outgoing = self._outgoing()
        if outgoing is None:
            raise ControlError(f"{what}: no migration has run from this node")
        try:
            call(outgoing)
        except RuntimeError as exc:
            raise ControlError(str(exc)) from None
        self._after()
        return self._status()

    def postcopy_start(self, _: dict[str, Any]) -> dict[str, Any]:
        return self._session_call(
            "nothing to switch to postcopy", lambda o: o.session.start_postcopy(time.monotonic())
        )

    def settle(self, args: dict[str, Any]) -> dict[str, Any]:
        where = args.get("where")
        if where not in ("here", "there"):
            raise ControlError('settle needs "where": "here" (resume the guest on this node) or "there"')
        return self._session_call(
            "nothing to settle", lambda o: o.session.settle(where == "here", time.monotonic())
        )

    def recover(self, args: dict[str, Any]) -> dict[str, Any]:
        """After postcopy broke the link: reconnect now, to `uri` if given (the destination
        moved, as QMP's migrate with resume=true takes a new URI)."""
        uri = args.get("uri")
        if uri is not None:
            uri = _destination(uri, '"uri" is the destination\'s tcp://HOST:PORT')

        def call(outgoing: OutgoingMigration) -> None:
            outgoing.session.recover(time.monotonic())
            if uri is not None and uri != outgoing.uri:
                self.log.info("recovering to a new address", old=outgoing.uri, new=uri)
                outgoing.retarget(uri)

        return self._session_call("nothing to recover", call)
