"""Postcopy's decisions, apart from the sessions that carry them out (no I/O here).

Source: which pages the destination still lacks, requests first (strict priority), then the
background stream from just after the last requested page (its neighbours are likely next).
Destination: the manifest every page is checked against, the `present` bitmap the guest's
accesses go through, and placement of a page's data and tags as one step.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from common.constants import DIGEST_BLOCK_PAGES, PAGE_SIZE, PAGES_PER_BATCH
from common.guest.digest import DigestCache, known_manifest, manifest_digest, page_manifest
from common.guest.memory import GuestMemory
from common.guest.pagehash import row_digests
from common.indices import contiguous
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import PostcopyBatch
from common.wire.framing import WireError

Indices = npt.NDArray[np.int64]

# Pages per manifest message: 16 bytes each, so 128 KiB a message.
MANIFEST_CHUNK_PAGES = 8192
# While the guest faults (a request within GUEST_FAULTING_S, or no request yet within
# FIRST_FAULT_WAIT_S of the switchover): background pages per message,
# messages in flight on the main connection, and messages encoded per loop turn. Small, because
# the destination places an answer only between two messages: behind a precopy-sized batch
# (8 MiB, about 4 ms to check and place) a waiting vCPU would wait that long.
BACKGROUND_BATCH_PAGES = 128
BACKGROUND_WINDOW = 16
BACKGROUND_PER_TURN = 2
# Otherwise the background stream is precopy's (PAGES_PER_BATCH pages a message, the
# migration's window): a guest that does not fault loses nothing to it, and small messages
# cost the stream most of its throughput (measured: 1 GiB in 3.2 to 5.2 s, against 1.6 to
# 2.9 s by precopy in the same runs). Only on a link that moves such a message in an eighth
# of the retransmission timeout: on a slower one it would look lost before it arrived.
# (A busy guest's misses come tens of milliseconds apart once the stream has brought most of
# its working set: measured, with a 50 ms hold its waits reached 12 ms at p99 behind large
# batches.) A guest that never faults loses only the first 50 ms to small messages.
GUEST_FAULTING_S = 1.0
FIRST_FAULT_WAIT_S = 0.05
LARGE_BATCH_SHARE_OF_RTO = 8


@dataclass(frozen=True)
class BackgroundShape:
    pages: int  # per message
    window: int  # messages in flight
    per_turn: int  # messages encoded per loop turn


def background_shape(faulting: bool, window: int, rate: float | None, rto_s: float) -> BackgroundShape:
    """How the background stream goes now. `rate`: the bytes per second the destination
    acknowledges (None before it is known)."""
    large = PAGES_PER_BATCH * PAGE_SIZE
    if faulting or rate is None or rate * rto_s < LARGE_BATCH_SHARE_OF_RTO * large:
        return BackgroundShape(BACKGROUND_BATCH_PAGES, min(BACKGROUND_WINDOW, window), BACKGROUND_PER_TURN)
    return BackgroundShape(PAGES_PER_BATCH, window, 1)


@dataclass
class SourcePostcopy:
    """What the source still owes the destination after the switchover."""

    page_count: int
    needed: npt.NDArray[np.bool_] | None = None  # None until the destination says what it holds
    urgent: deque[int] = field(default_factory=deque)
    asked_at: dict[int, float] = field(default_factory=dict)  # requested page -> when the request was read
    cursor: int = 0
    requests: int = 0
    background_pages: int = 0
    recoveries: int = 0
    t_last_request: float = float("-inf")  # when the destination's guest last asked for a page
    urgent_thread_pages: int = 0  # of the requested, those the urgent connection's thread answered

    def holds(self, present: npt.NDArray[np.bool_]) -> None:
        """The destination's received bitmap: at the start, and again after a recovery."""
        self.needed = ~present

    def request(self, pages: list[int], now: float) -> None:
        if pages:
            self.t_last_request = max(self.t_last_request, now)
        for page in pages:
            self.requests += 1
            self.urgent.append(page)
            self.asked_at.setdefault(page, now)
            self.cursor = (page + 1) % self.page_count

    def next_urgent(self) -> Indices | None:
        """Requested pages, oldest first; a page asked for twice goes once. A request for a page
        already sent is answered again: the destination found that copy wrong (or it asks
        after a recovery), and only it knows."""
        if not self.urgent:
            return None
        pages = sorted(set(self.urgent))
        self.urgent.clear()
        if self.needed is not None:
            self.needed[pages] = False
        return np.asarray(pages, dtype=np.int64)

    def held_since(self, pages: Indices, now: float) -> float:
        """When the oldest request for these pages was read (their answer is going out)."""
        times = [self.asked_at.pop(page, now) for page in pages.tolist()]
        return min(times, default=now)

    def faulting(self, now: float) -> bool:
        """Whether the destination's guest is asking for pages: the background stream then
        keeps to small messages."""
        hold = GUEST_FAULTING_S if self.requests else FIRST_FAULT_WAIT_S
        return now - self.t_last_request < hold

    def next_background(self, size: int = BACKGROUND_BATCH_PAGES) -> Indices | None:
        if self.needed is None:
            return None
        n = self.page_count
        ahead = np.flatnonzero(self.needed[self.cursor :])[:size] + self.cursor
        if ahead.size < size:
            behind = np.flatnonzero(self.needed[: self.cursor])[: size - ahead.size]
            ahead = np.concatenate([ahead, behind])
        if not ahead.size:
            return None
        self.needed[ahead] = False
        self.cursor = int(ahead[-1] + 1) % n
        self.background_pages += int(ahead.size)
        return ahead.astype(np.int64)

    @property
    def background_left(self) -> bool:
        """Pages the destination lacks that the background stream has yet to send."""
        return self.needed is not None and bool(self.needed.any())

    def missing(self) -> int:
        return self.page_count if self.needed is None else int(np.count_nonzero(self.needed))


def manifest_messages(mem: GuestMemory) -> tuple[list[pb.PageDigests], bytes]:
    """The switchover manifest in messages, and its digest (compared at the end). Every
    written page is hashed: the source's own digests may be older than its guest's last writes
    (pages dirtied after the last sync of the dirty log)."""
    ram, tags = page_manifest(mem)
    messages = [
        pb.PageDigests(
            first_page=first,
            ram_digests=ram[first : first + MANIFEST_CHUNK_PAGES].astype("<u8").tobytes(),
            tag_digests=tags[first : first + MANIFEST_CHUNK_PAGES].astype("<u8").tobytes(),
        )
        for first in range(0, mem.page_count, MANIFEST_CHUNK_PAGES)
    ]
    return messages, manifest_digest(ram, tags)


@dataclass
class Placed:
    pages: Indices  # made present now
    rejected: Indices  # did not match the manifest: asked for again
    duplicates: int  # already present: never overwritten


class DestPostcopy:
    """The destination's side: manifest, presence, and what is outstanding."""

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self.ram = np.zeros(page_count, dtype=np.uint64)
        self.tags = np.zeros(page_count, dtype=np.uint64)
        self._have = np.zeros(page_count, dtype=np.bool_)
        self.present = np.zeros(page_count, dtype=np.bool_)
        self.outstanding: dict[int, float] = {}  # requested page -> when last asked
        # page the guest waits for -> (when first asked, when its vCPU missed it)
        self._waits: dict[int, tuple[float, float]] = {}
        self.latencies_s: list[float] = []  # each wait, from the vCPU's miss to the page present
        # and where it went, three doubles a wait (a guest may wait a million times): queued here
        # before the request left, held at the source, the rest (on the wire and in either
        # side's loop), in the order of latencies_s
        self._parts = array("d")
        self.missed_at = array("d")  # when each wait began, in the order of latencies_s (the plot)
        self.background_pages = 0
        self.requested_pages = 0
        self.rejected_pages = 0
        self.duplicate_pages = 0
        self.retried_requests = 0
        self.urgent_asks = 0  # requests sent on the source's urgent connection
        self.started = False
        self.vcpu_digest = b""
        # test builds only: place a page's data at once and its tags a turn later, as a VMM
        # with UFFDIO_COPY then KVM_ARM_MTE_COPY_TAGS would; proves the atomicity test can fail
        self.split_placement = False
        self.late_tags: list[tuple[float, int, npt.NDArray[np.uint8]]] = []
        self.t_last_data = 0.0
        self.t_last_bitmap = 0.0

    # -- the manifest ---------------------------------------------------------------------
    def add_manifest(self, msg: pb.PageDigests) -> None:
        count = len(msg.ram_digests) // 8
        first = msg.first_page
        if (
            first % DIGEST_BLOCK_PAGES
            or first >= self.page_count
            or len(msg.ram_digests) != len(msg.tag_digests)
            or len(msg.ram_digests) % 8
            or count == 0
            or count > self.page_count - first
        ):
            raise WireError(pb.ERROR_BAD_MESSAGE, f"page manifest at page {first} is malformed")
        self.ram[first : first + count] = np.frombuffer(msg.ram_digests, dtype="<u8")
        self.tags[first : first + count] = np.frombuffer(msg.tag_digests, dtype="<u8")
        self._have[first : first + count] = True

    @property
    def manifest_complete(self) -> bool:
        return bool(self._have.all())

    def digest(self) -> bytes:
        return manifest_digest(self.ram, self.tags)

    def start(self, mem: GuestMemory, known: DigestCache | None = None) -> None:
        """The switchover: what this side already holds as the source's version is present.
        `known`: the digests of the pages precopy placed here, each checked on arrival (so they
        are not hashed again; nothing else wrote this memory: its guest has not run yet)."""
        if not self.manifest_complete:
            missing = int(np.count_nonzero(~self._have))
            raise WireError(
                pb.ERROR_BAD_MESSAGE, f"postcopy start before the manifest ({missing} pages lack digests)"
            )
        ram, tags = page_manifest(mem) if known is None else known_manifest(known)
        self.present[:] = (ram == self.ram) & (tags == self.tags)
        self.started = True

    # -- requests and placement -------------------------------------------------------------
    def to_request(
        self,
        pages: list[int],
        now: float,
        *,
        miss: bool = False,
        missed_at: Mapping[int, float] | None = None,
    ) -> list[int]:
        """Of these pages, those not present and not asked for already. `miss` (or `missed_at`,
        when the vCPU missed each): the guest waits for them (only those count in the fault
        latency and the block time)."""
        wanted = sorted({p for p in pages if not self.present[p] and p not in self.outstanding})
        for page in wanted:
            self.outstanding[page] = now
            if miss or missed_at is not None:
                self._waits.setdefault(page, (now, min(now, (missed_at or {}).get(page, now))))
        return wanted

    def overdue(self, now: float, after_s: float) -> list[int]:
        """Requests unanswered this long (an urgent answer is not resent by the link): ask again."""
        # (the same sum as the deadline it answers: it must find what that deadline promised)
        late = [page for page, asked in self.outstanding.items() if asked + after_s <= now]
        for page in late:
            self.outstanding[page] = now
            self.retried_requests += 1
        return late

    def place(
        self, mem: GuestMemory, batch: PostcopyBatch, requested: bool, now: float, held_s: float = 0.0
    ) -> Placed:
        """Check each page against the manifest, then place data and tags together and make
        the page present, in one step no guest access can interleave (the vCPU runs on this
        same loop, between messages). A page already present is never overwritten: the guest
        may have written it since. `held_s`: how long the source held the request it answers."""
        idx, data, tags = batch.indices, batch.data, batch.tags
        fresh = ~self.present[idx]
        duplicates = int(idx.size - np.count_nonzero(fresh))
        if duplicates:  # (a mask copies: a batch of 8 MiB is copied only where it must be)
            idx, data, tags = idx[fresh], data[fresh], tags[fresh]
        good = (row_digests(data) == self.ram[idx]) & (row_digests(tags) == self.tags[idx])
        rejected = idx[~good]
        pages = idx
        if rejected.size:
            pages, data, tags = idx[good], data[good], tags[good]
        with mem.lock:
            if contiguous(pages):
                mem.pages[int(pages[0]) : int(pages[0]) + pages.size] = data
            else:
                mem.pages[pages] = data
            mem.data_populated[pages] = True
            if self.split_placement:
                self.late_tags.extend(
                    (now, page, row) for page, row in zip(pages.tolist(), tags, strict=True)
                )
            else:
                mem.tag_ioctl.write_pages(pages, tags)
            self.present[pages] = True
        # what was asked for is a few pages; a background batch is thousands
        asked_for = [p for p in self.outstanding if self.present[p]] if self.outstanding else []
        for page in asked_for:
            self.outstanding.pop(page, None)
        for page in [p for p in self._waits if self.present[p]] if self._waits else []:
            wait = self._waits.pop(page, None)
            if wait is not None:
                asked, missed = wait
                self.latencies_s.append(now - missed)
                self.missed_at.append(missed)
                held = min(held_s, max(0.0, now - asked)) if requested else 0.0
                self._parts.extend((asked - missed, held, max(0.0, now - asked - held)))
        if requested:
            self.requested_pages += int(pages.size)
        else:
            self.background_pages += int(pages.size)
        self.rejected_pages += int(rejected.size)
        self.duplicate_pages += duplicates
        for page in rejected.tolist():
            self.outstanding.pop(page, None)
        return Placed(pages, rejected.astype(np.int64), duplicates)

    def place_late_tags(self, mem: GuestMemory, now: float) -> None:
        """Test builds with split placement: the tags, a loop turn after their data."""
        due = [entry for entry in self.late_tags if entry[0] < now]
        with mem.lock:
            for _, page, tags in due:
                mem.tag_ioctl.write_pages(np.array([page], dtype=np.int64), tags)
        self.late_tags = [entry for entry in self.late_tags if entry[0] >= now]

    @property
    def complete(self) -> bool:
        return self.started and bool(self.present.all())

    def missing(self) -> int:
        return int(self.present.size - np.count_nonzero(self.present))

    @property
    def parts_s(self) -> npt.NDArray[np.float64]:
        """One row per wait: queued here, held at the source, the rest (seconds)."""
        return np.frombuffer(self._parts, dtype=np.float64).reshape(-1, 3)

    def parts_ms(self) -> dict[str, dict[str, float | None]]:
        """Where the guest's waits went, p50 and p99 of each part (they need not add up)."""
        names = ("queued_at_destination", "at_source", "in_flight")
        if not self._parts:
            return {name: {"p50": None, "p99": None} for name in names}
        values = self.parts_s * 1000.0
        return {
            name: {
                "p50": round(float(np.percentile(values[:, i], 50)), 3),
                "p99": round(float(np.percentile(values[:, i], 99)), 3),
            }
            for i, name in enumerate(names)
        }

    def latency_ms(self) -> dict[str, float | None]:
        if not self.latencies_s:
            return {"p50": None, "p99": None, "max": None}
        values = np.asarray(self.latencies_s) * 1000.0
        return {
            "p50": round(float(np.percentile(values, 50)), 3),
            "p99": round(float(np.percentile(values, 99)), 3),
            "max": round(float(values.max()), 3),
        }
