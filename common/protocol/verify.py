"""The verification handshake: both sides' digests of RAM, tags and vCPU state, compared by
block and narrowed down to pages, so a mismatch is resent rather than failing the migration."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from common.constants import DIGEST_BLOCK_PAGES
from common.guest.digest import DigestCache, block_pages, read_digests
from common.guest.guest import Guest
from common.guest.pagehash import table_digests
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import WireError

Indices = npt.NDArray[np.int64]
# A resent page that still differs fails the migration: the second attempt is the last.
MAX_VERIFY_ATTEMPTS = 2
REHASH_SAMPLE_RUNS = 4
REHASH_SAMPLE_RUN = 256


def hex_digests(ram: bytes, tags: bytes, vcpu: bytes) -> dict[str, str]:
    return {"ram": ram.hex(), "tags": tags.hex(), "vcpu": vcpu.hex()}


class SourceVerifier:
    def __init__(
        self,
        guest: Guest,
        digests: DigestCache,
        *,
        rehash: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`rehash`: this side's digests come from its memory as it is, every written page
        hashed again, not from what the dirty log said was sent: a write that bypassed the
        dirty log then shows as a mismatch, and is repaired. `clock` times the hashing (its
        CPU cost, not protocol time)."""
        self.guest = guest
        self.digests = digests
        self.rehash = rehash
        self._clock = clock
        self._per_page_s: float | None = None
        self.rehashed_pages = 0
        self.repaired_pages = 0  # resent because the destination's digests differed
        self.attempt = 0
        self.verified: bool | None = None
        self.mismatched_pages: list[int] = []
        self.source_digests: dict[str, str] | None = None
        self.dest_digests: dict[str, str] | None = None

    def rehash_estimate_s(self) -> float:
        """What hashing every written page at the stop will add to the downtime (0 without
        `rehash`), at this side's hashing speed, measured once on a sample of pages: the
        switchover must fit it into the downtime limit like every other byte."""
        if not self.rehash:
            return 0.0
        mem = self.guest.memory
        backed = np.flatnonzero(mem.data_populated | mem.tags_populated)
        if self._per_page_s is None and backed.size:
            # a few stretches of written pages, spread over the guest, hashed as the refresh
            # will hash them (runs of consecutive pages read in place)
            last = max(0, backed.size - REHASH_SAMPLE_RUN)
            starts = sorted({int(i) for i in np.linspace(0, last, REHASH_SAMPLE_RUNS)})
            sample = [backed[i : i + REHASH_SAMPLE_RUN] for i in starts]
            began = self._clock()
            for pages in sample:
                table_digests(mem.pages, pages)
                read_digests(mem.tag_ioctl.read_pages, pages)
            self._per_page_s = (self._clock() - began) / sum(pages.size for pages in sample)
        return backed.size * (self._per_page_s or 0.0)

    def request(self) -> pb.VerifyRequest:
        if self.rehash:
            mem = self.guest.memory
            backed = np.flatnonzero(mem.data_populated | mem.tags_populated)
            self.digests.mark(backed, backed)
            self.rehashed_pages += int(backed.size)
        ours = self.digests.digests()
        vcpu = self.guest.state_digest()
        self.attempt += 1
        self.source_digests = hex_digests(ours.ram, ours.tags, vcpu)
        return pb.VerifyRequest(
            attempt=self.attempt,
            source=pb.GuestDigests(
                ram_digest=ours.ram,
                tag_digest=ours.tags,
                vcpu_digest=vcpu,
                ram_block_digests=ours.ram_blocks.astype("<u8").tobytes(),
                tag_block_digests=ours.tag_blocks.astype("<u8").tobytes(),
            ),
        )

    def expects(self, result: pb.VerifyResult) -> bool:
        return result.attempt == self.attempt

    def judge(self, result: pb.VerifyResult) -> tuple[Indices, Indices] | None:
        """None when the destination matched; else the pages whose data and tags to resend.
        Raises WireError for a malformed result, or when the last attempt still differs."""
        dest = result.destination
        self.dest_digests = hex_digests(dest.ram_digest, dest.tag_digest, dest.vcpu_digest)
        if result.ok:
            # the destination's word is not enough: its digests must be ours
            if self.dest_digests != self.source_digests:
                self.verified = False
                raise WireError(
                    pb.ERROR_VERIFICATION_FAILED,
                    "the destination reports a match but its digests differ from ours: not committing",
                )
            self.verified = True
            return None
        data, tags = self._pages_at_fault(result)
        self.mismatched_pages = sorted(set(data.tolist()) | set(tags.tolist()))
        if self.attempt >= MAX_VERIFY_ATTEMPTS:
            self.verified = False
            shown = ", ".join(map(str, self.mismatched_pages[:8])) or "vCPU state"
            raise WireError(
                pb.ERROR_VERIFICATION_FAILED,
                f"verification failed after resending: pages {shown} still differ",
            )
        self.repaired_pages += len(self.mismatched_pages)
        return data, tags

    def _pages_at_fault(self, result: pb.VerifyResult) -> tuple[Indices, Indices]:
        """Compare the destination's page digests with ours; hostile input is refused."""
        mem = self.guest.memory
        data: list[int] = []
        tags: list[int] = []
        if len(result.page_digests) > self.digests.ram.block_digests.size:
            raise WireError(pb.ERROR_BAD_MESSAGE, "verify_result names more blocks than the guest has")
        for block in result.page_digests:
            count = len(block.ram_digests) // 8
            if (
                block.first_page % DIGEST_BLOCK_PAGES
                or block.first_page >= mem.page_count
                or len(block.ram_digests) != len(block.tag_digests)
                or len(block.ram_digests) % 8
                or count > min(DIGEST_BLOCK_PAGES, mem.page_count - block.first_page)
            ):
                raise WireError(
                    pb.ERROR_BAD_MESSAGE,
                    f"verify_result page digests at page {block.first_page} are malformed",
                )
            ours_ram, ours_tags = self.digests.page_digests(block.first_page, count)
            theirs_ram = np.frombuffer(block.ram_digests, dtype="<u8")
            theirs_tags = np.frombuffer(block.tag_digests, dtype="<u8")
            data.extend((block.first_page + np.flatnonzero(ours_ram != theirs_ram)).tolist())
            tags.extend((block.first_page + np.flatnonzero(ours_tags != theirs_tags)).tolist())
        return np.array(sorted(data), dtype=np.int64), np.array(sorted(tags), dtype=np.int64)


def destination_verdict(
    request: pb.VerifyRequest, guest: Guest, digests: DigestCache
) -> tuple[pb.VerifyResult, dict[str, str]]:
    """The destination's answer to a verification request, with its own digests."""
    ours = digests.digests()
    blocks = ours.ram_blocks.size
    src = request.source
    if len(src.ram_block_digests) != blocks * 8 or len(src.tag_block_digests) != blocks * 8:
        raise WireError(
            pb.ERROR_BAD_MESSAGE,
            f"verify_request carries block digests for a guest of another size (expected {blocks} blocks)",
        )
    vcpu = guest.state_digest()
    theirs_ram = np.frombuffer(src.ram_block_digests, dtype="<u8")
    theirs_tags = np.frombuffer(src.tag_block_digests, dtype="<u8")
    bad_blocks = np.flatnonzero((theirs_ram != ours.ram_blocks) | (theirs_tags != ours.tag_blocks))
    vcpu_ok = hmac.compare_digest(vcpu, src.vcpu_digest)
    ok = bad_blocks.size == 0 and vcpu_ok and ours.ram == src.ram_digest and ours.tags == src.tag_digest
    result = pb.VerifyResult(
        ok=ok,
        attempt=request.attempt,
        vcpu_mismatch=not vcpu_ok,
        destination=pb.GuestDigests(ram_digest=ours.ram, tag_digest=ours.tags, vcpu_digest=vcpu),
    )
    for block in bad_blocks.tolist():
        first, count = block_pages(block, guest.memory.page_count)
        ram_pages, tag_pages = digests.page_digests(first, count)
        result.page_digests.add(
            first_page=first,
            ram_digests=ram_pages.astype("<u8").tobytes(),
            tag_digests=tag_pages.astype("<u8").tobytes(),
        )
    return result, hex_digests(ours.ram, ours.tags, vcpu)
