"""The destination side of a migration as a pure state machine.

It treats the incoming stream as hostile: a hello is checked (version, geometry, features,
token) before any memory is allocated; every data message is checked for session, sequence
and checksum before it is decoded, and decoded batches are range-checked before placement.
Messages from a peer other than the session's source change nothing; they are answered with
a refusal that says why.

The guest placed here runs only after the source's digests matched ours and the source
committed the handover; any failure before that discards what arrived.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common.constants import (
    DEST_DIGEST_BUDGET_PAGES,
    GRANULE_SIZE,
    HEARTBEAT_INTERVAL_S,
    INITIAL_CREDIT,
    MAX_RAM_BYTES,
    MIN_RAM_BYTES,
    PAGE_SIZE,
    PEER_DEAD_AFTER_S,
    PROTOCOL_VERSION,
)
from common.guest.digest import DigestCache, block_pages
from common.guest.guest import Guest
from common.guest.vcpu import vcpus_digest
from common.guest.workload import REG_STEP
from common.protocol.phases import DestPhase, Failure
from common.protocol.sequence import Arrival, Sequence
from common.protocol.stats import TransferStats, ms, verification_section
from common.transfer import apply_device_state, apply_ram_pages, apply_tag_sections
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.bitmap import decode_bitmap
from common.wire.framing import Buffer, WireError

_MAX_VCPUS = 64


class DestHost(Protocol):
    def start_guest(self, guest: Guest) -> None: ...
    def discard_guest(self, guest: Guest) -> None: ...
    def prefault(self, guest: Guest, pages: np.ndarray) -> None:
        """The source says these pages will arrive: fault them in ahead, if that helps."""


@dataclass(frozen=True)
class DestParameters:
    auth_token: bytes = b""
    window: int = INITIAL_CREDIT
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    peer_timeout_s: float = PEER_DEAD_AFTER_S
    digest_budget_pages: int = DEST_DIGEST_BUDGET_PAGES  # pages hashed per loop turn
    # Test builds only: flip a byte of this page after placing it, to prove verification.
    corrupt_page: int | None = None


class DestSession:
    def __init__(self, host: DestHost, params: DestParameters, now: float) -> None:
        self.host = host
        self.params = params
        self.phase = DestPhase.WAITING
        self.failure: Failure | None = None
        self.guest: Guest | None = None
        self.digests: DigestCache | None = None
        self.peer: bytes | None = None
        self.session_id = b""
        self.use_lz4 = False
        self.stats = TransferStats()
        self.refused_messages = 0
        self._outgoing: list[tuple[bytes, list[Buffer]]] = []
        self._seq = 0
        self._incoming = Sequence()
        self.source_stopped = False
        self.verified: bool | None = None
        self.mismatched_pages: list[int] = []
        self.my_digests: dict[str, str] | None = None
        self.rounds = 0
        self.t_start = now
        self.t_hello: float | None = None
        self.t_stop_seen: float | None = None
        self.t_first_data: float | None = None
        self.t_running: float | None = None
        self.t_end: float | None = None
        self.t_last_heard = now
        self.t_last_sent = now
        self._corrupted = False
        self._repairing = False

    # -- verbs ------------------------------------------------------------------------------
    def take_outgoing(self) -> list[tuple[bytes, list[Buffer]]]:
        out, self._outgoing = self._outgoing, []
        return out

    def receive(self, peer: bytes, frames: list[Buffer], now: float) -> None:
        try:
            message = framing.decode(frames)
        except WireError as exc:
            if peer == self.peer and not self.phase.terminal:
                self._fail(exc.code, f"source sent a bad message: {exc.reason}", now)
            else:
                self._refuse(peer, exc.code, exc.reason)
            return
        env = message.envelope
        if message.kind == "hello":
            self._on_hello(peer, env, now)
            return
        if peer != self.peer or env.session_id != self.session_id:
            self._refuse(peer, pb.ERROR_WRONG_SESSION, "no migration session of yours is open here")
            return
        if self.phase.terminal:
            return  # stragglers after the end change nothing
        arrival = self._incoming.arrive(env.seq)
        if arrival is Arrival.REPEAT:
            return  # already applied
        if arrival is Arrival.GAP:
            self._fail(pb.ERROR_SEQUENCE_GAP, self._incoming.gap_reason(env.seq, "source"), now)
            return
        self.t_last_heard = now
        handler = getattr(self, f"_on_{message.kind}", None)
        try:
            if handler is None:
                raise WireError(
                    pb.ERROR_BAD_MESSAGE,
                    f"unexpected {message.kind} from the source in phase {self.phase.value}",
                )
            handler(getattr(env, message.kind), message.payload, now)
        except WireError as exc:
            self._fail(exc.code, exc.reason, now)

    def poll(self, now: float) -> None:
        if self.phase in (DestPhase.RECEIVING, DestPhase.VERIFYING, DestPhase.AWAIT_COMMIT):
            if now - self.t_last_heard > self.params.peer_timeout_s:
                self._fail(pb.ERROR_TIMEOUT, f"source silent for {self.params.peer_timeout_s:.1f} s", now)
                return
            if now - self.t_last_sent >= self.params.heartbeat_interval_s:
                self._send(now, heartbeat=pb.Heartbeat())
            if self.digests is not None and not self.source_stopped and self.digests.stale_pages:
                self.digests.refresh(self.params.digest_budget_pages)
                # While the stream is quiet no ack carries the backlog; a source waiting for
                # us to catch up must hear that it shrank.
                if self.phase is DestPhase.RECEIVING and (
                    self.digests.stale_pages == 0 or now - self.t_last_sent > 0.005
                ):
                    self._ack(now)

    def next_deadline(self, now: float) -> float:
        if self.phase in (DestPhase.RECEIVING, DestPhase.VERIFYING, DestPhase.AWAIT_COMMIT):
            if self.digests is not None and self.digests.stale_pages and not self.source_stopped:
                return now
            return min(
                self.t_last_sent + self.params.heartbeat_interval_s,
                self.t_last_heard + self.params.peer_timeout_s,
            )
        return now + 3600.0

    def cancel(self, now: float, reason: str = "cancelled by the destination's operator") -> None:
        if self.phase in (DestPhase.WAITING, DestPhase.RUNNING, DestPhase.FAILED):
            raise RuntimeError(f"no incoming migration to cancel (phase {self.phase.value})")
        self._fail(pb.ERROR_CANCELLED, reason, now)

    # -- hello --------------------------------------------------------------------------
    def _check_hello(self, hello: pb.Hello) -> tuple[int, str] | None:
        if hello.protocol_version != PROTOCOL_VERSION:
            return (
                pb.ERROR_VERSION_MISMATCH,
                f"protocol version {hello.protocol_version} is not supported; this destination speaks version {PROTOCOL_VERSION}",
            )
        if self.params.auth_token and not hmac.compare_digest(hello.auth_token, self.params.auth_token):
            return pb.ERROR_UNAUTHORIZED, "authentication failed: the source's token does not match"
        if hello.page_size != PAGE_SIZE or hello.granule_size != GRANULE_SIZE:
            return (
                pb.ERROR_GEOMETRY_MISMATCH,
                f"page size {hello.page_size} / granule {hello.granule_size} differ from {PAGE_SIZE} / {GRANULE_SIZE}",
            )
        if not MIN_RAM_BYTES <= hello.ram_bytes <= MAX_RAM_BYTES or hello.ram_bytes % PAGE_SIZE:
            return (
                pb.ERROR_GEOMETRY_MISMATCH,
                f"guest RAM of {hello.ram_bytes} bytes is outside {MIN_RAM_BYTES} .. {MAX_RAM_BYTES} or not whole pages",
            )
        if not 1 <= hello.vcpu_count <= _MAX_VCPUS:
            return pb.ERROR_GEOMETRY_MISMATCH, f"{hello.vcpu_count} vCPUs is outside 1 .. {_MAX_VCPUS}"
        missing = {pb.FEATURE_MTE, pb.FEATURE_VERIFY} - set(hello.features)
        if missing:
            names = ", ".join(pb.Feature.Name(f) for f in sorted(missing))
            return pb.ERROR_FEATURE_MISMATCH, f"the source does not offer required features: {names}"
        if hello.mode != pb.MODE_PRECOPY:
            return (
                pb.ERROR_FEATURE_MISMATCH,
                f"migration mode {pb.MigrationMode.Name(hello.mode)} is not supported by this destination",
            )
        return None

    def _on_hello(self, peer: bytes, env: pb.Envelope, now: float) -> None:
        hello = env.hello
        if self.phase is not DestPhase.WAITING:
            if peer == self.peer and env.session_id == self.session_id:
                return  # a repeated hello of our own session
            self._reply(
                peer,
                env.session_id,
                hello_ack=pb.HelloAck(
                    accepted=False,
                    code=pb.ERROR_BUSY,
                    reason=f"destination busy with another migration (phase {self.phase.value})",
                    protocol_version=PROTOCOL_VERSION,
                ),
            )
            self.refused_messages += 1
            return
        problem = self._check_hello(hello)
        hint = None
        if problem is None and hello.populated_hint_lz4:
            try:
                hint = decode_bitmap(
                    hello.populated_hint_lz4, hello.ram_bytes // PAGE_SIZE, "populated-pages hint"
                )
            except WireError as exc:
                problem = (exc.code, exc.reason)
        if problem is not None:
            code, reason = problem
            self._reply(
                peer,
                env.session_id,
                hello_ack=pb.HelloAck(
                    accepted=False, code=code, reason=reason, protocol_version=PROTOCOL_VERSION
                ),
            )
            self.refused_messages += 1
            return
        self.peer = peer
        self.session_id = env.session_id
        self._incoming = Sequence(env.seq)
        self.t_hello = self.t_last_heard = now
        self.guest = Guest.create(hello.ram_bytes, hello.vcpu_count)
        self.digests = DigestCache(self.guest.memory)
        self.use_lz4 = pb.FEATURE_LZ4 in hello.features
        features = [pb.FEATURE_MTE, pb.FEATURE_VERIFY] + ([pb.FEATURE_LZ4] if self.use_lz4 else [])
        self.phase = DestPhase.RECEIVING
        if hint is not None:
            self.host.prefault(self.guest, np.flatnonzero(hint))
        self._send(
            now,
            hello_ack=pb.HelloAck(
                accepted=True,
                protocol_version=PROTOCOL_VERSION,
                features=features,
                initial_credit=self.params.window,
            ),
        )

    # -- data ---------------------------------------------------------------------------
    def _require(self, *phases: DestPhase) -> None:
        if self.phase not in phases:
            raise WireError(pb.ERROR_BAD_MESSAGE, f"message not expected in phase {self.phase.value}")

    def _on_ram_pages(self, msg: pb.RamPages, payload: Buffer, now: float) -> None:
        self._require(DestPhase.RECEIVING)
        assert self.guest is not None and self.digests is not None
        decoded = apply_ram_pages(self.guest.memory, msg, payload)
        if self.t_first_data is None:
            self.t_first_data = now
        self.digests.mark(decoded.indices, [])
        self.digests.mark(decoded.zero, [])
        self._note_repair(decoded.indices, decoded.zero)
        self.stats.pages_sent += int(decoded.indices.size + decoded.zero.size)
        self.stats.zero_pages += int(decoded.zero.size)
        self.stats.ram_bytes += len(payload)
        self._maybe_corrupt(decoded.indices)
        self._ack(now)

    def _on_tag_sections(self, msg: pb.TagSections, payload: Buffer, now: float) -> None:
        self._require(DestPhase.RECEIVING)
        assert self.guest is not None and self.digests is not None
        decoded = apply_tag_sections(self.guest.memory, msg, payload)
        self.digests.mark([], decoded.indices)
        self.digests.mark([], decoded.zero)
        self._note_repair(decoded.indices, decoded.zero)
        self.stats.tag_sections += int(decoded.indices.size + decoded.zero.size)
        self.stats.untagged_pages += int(decoded.zero.size)
        self.stats.tag_bytes += len(payload)
        self._ack(now)

    def _ack(self, now: float) -> None:
        backlog = self.digests.stale_pages if self.digests is not None else 0
        self._send(
            now, ack=pb.Ack(acked_seq=self._incoming.last, credit=self.params.window, digest_backlog=backlog)
        )

    def _note_repair(self, *placed: np.ndarray) -> None:
        if self._repairing:
            pages = set(self.mismatched_pages)
            for part in placed:
                pages.update(part.tolist())
            self.mismatched_pages = sorted(pages)

    def _maybe_corrupt(self, placed: np.ndarray) -> None:
        target = self.params.corrupt_page
        if target is None or self._corrupted or self.guest is None or not (placed == target).any():
            return
        # Only once, so a resend repairs it: this proves the handshake names and fixes pages.
        self._corrupted = True
        self.guest.memory.pages[target, 100] ^= 0xFF

    def _on_end_of_round(self, msg: pb.EndOfRound, _: Buffer, now: float) -> None:
        self._require(DestPhase.RECEIVING)
        self.rounds = msg.round
        if msg.final and not self.source_stopped:
            self.source_stopped = True
            self.t_stop_seen = now

    def _on_device_state(self, msg: pb.DeviceState, _: Buffer, now: float) -> None:
        self._require(DestPhase.RECEIVING)
        assert self.guest is not None
        apply_device_state(self.guest, msg)

    def _on_heartbeat(self, _: pb.Heartbeat, __: Buffer, now: float) -> None:
        pass

    def _on_abort(self, msg: pb.Abort, _: Buffer, now: float) -> None:
        self._fail(msg.code, f"source aborted: {msg.reason}", now, notify=False)

    # -- verification and handover -------------------------------------------------------------
    def _on_verify_request(self, msg: pb.VerifyRequest, _: Buffer, now: float) -> None:
        self._require(DestPhase.RECEIVING)
        assert self.guest is not None and self.digests is not None
        if not self.source_stopped:
            raise WireError(pb.ERROR_BAD_MESSAGE, "verify_request before the source stopped its guest")
        mem = self.guest.memory
        ours = self.digests.digests()
        blocks = ours.ram_blocks.size
        src = msg.source
        if len(src.ram_block_digests) != blocks * 8 or len(src.tag_block_digests) != blocks * 8:
            raise WireError(
                pb.ERROR_BAD_MESSAGE,
                f"verify_request carries block digests for a guest of another size (expected {blocks} blocks)",
            )
        vcpu = vcpus_digest(self.guest.vcpus)
        theirs_ram = np.frombuffer(src.ram_block_digests, dtype="<u8")
        theirs_tags = np.frombuffer(src.tag_block_digests, dtype="<u8")
        bad_blocks = np.flatnonzero((theirs_ram != ours.ram_blocks) | (theirs_tags != ours.tag_blocks))
        vcpu_ok = hmac.compare_digest(vcpu, src.vcpu_digest)
        ok = bad_blocks.size == 0 and vcpu_ok and ours.ram == src.ram_digest and ours.tags == src.tag_digest
        self.my_digests = {"ram": ours.ram.hex(), "tags": ours.tags.hex(), "vcpu": vcpu.hex()}
        result = pb.VerifyResult(
            ok=ok,
            attempt=msg.attempt,
            vcpu_mismatch=not vcpu_ok,
            destination=pb.GuestDigests(ram_digest=ours.ram, tag_digest=ours.tags, vcpu_digest=vcpu),
            mismatched_blocks=bad_blocks.tolist(),
        )
        for block in bad_blocks.tolist():
            first, count = block_pages(block, mem.page_count)
            ram_pages, tag_pages = self.digests.page_digests(first, count)
            result.page_digests.add(
                first_page=first,
                ram_digests=ram_pages.astype("<u8").tobytes(),
                tag_digests=tag_pages.astype("<u8").tobytes(),
            )
        self.verified = ok
        if ok:
            self.phase = DestPhase.AWAIT_COMMIT
        else:
            self._repairing = True  # what arrives before the next request is the repair
        self._send(now, verify_result=result)

    def _on_commit(self, _: pb.Commit, __: Buffer, now: float) -> None:
        self._require(DestPhase.AWAIT_COMMIT)
        assert self.guest is not None
        self.host.start_guest(self.guest)
        self.phase = DestPhase.RUNNING
        self.t_running = self.t_end = now
        self._send(now, started=pb.Started(step=self.guest.vcpus[0].x[REG_STEP]))

    # -- sending and failure -------------------------------------------------------------------
    def _send(self, now: float, **body: Any) -> None:
        assert self.peer is not None
        self._seq += 1
        frames = framing.encode(framing.envelope(self.session_id, self._seq, **body))
        self.stats.other_bytes += sum(len(f) for f in frames)
        self._outgoing.append((self.peer, frames))
        self.t_last_sent = now

    def _reply(self, peer: bytes, session_id: bytes, **body: Any) -> None:
        """Answer a peer outside the session: no sequence number of ours is spent."""
        self._outgoing.append((peer, framing.encode(framing.envelope(session_id, 0, **body))))

    def _refuse(self, peer: bytes, code: int, reason: str) -> None:
        self.refused_messages += 1
        self._reply(peer, b"", abort=pb.Abort(code=code, reason=reason))

    def _fail(self, code: int, reason: str, now: float, *, notify: bool = True) -> None:
        if self.failure is None:
            self.failure = Failure(code, reason, self.phase.value)
        self.phase = DestPhase.FAILING
        if notify and self.peer is not None:
            self._send(now, abort=pb.Abort(code=code, reason=reason))
        if self.guest is not None:
            self.host.discard_guest(self.guest)
        self.t_end = now
        self.phase = DestPhase.FAILED

    # -- reporting ---------------------------------------------------------------------------
    def report(self, now: float) -> dict[str, Any]:
        end = self.t_end or now
        status = {DestPhase.RUNNING: "completed", DestPhase.FAILED: "failed"}.get(self.phase, "active")
        if self.failure and self.failure.code == pb.ERROR_CANCELLED:
            status = "cancelled"
        downtime = self.t_running - self.t_stop_seen if self.t_running and self.t_stop_seen else None
        total = end - (self.t_hello or self.t_start)
        return {
            "status": status,
            "phase": self.phase.value,
            "mode": "precopy",
            "error": self.failure.reason if self.failure else None,
            "total_time_ms": ms(total),
            # what this side sees of setup: from the hello to the first page batch
            "setup_time_ms": ms(self.t_first_data - self.t_hello)
            if self.t_hello and self.t_first_data
            else None,
            "downtime_ms": ms(downtime),
            "expected_downtime_ms": None,
            "rounds": self.rounds,
            "ram": self.stats.ram_section(self.guest.memory.ram_bytes if self.guest else 0),
            "tags": self.stats.tags_section(),
            "throughput_mbps": round((self.stats.ram_bytes + self.stats.tag_bytes) * 8 / 1e6 / total, 1)
            if total > 0
            else 0.0,
            "dirty_pages_rate": None,
            "refused_messages": self.refused_messages,
            "verification": verification_section(self.verified, self.my_digests, self.mismatched_pages),
        }
