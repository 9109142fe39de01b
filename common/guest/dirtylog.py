"""What a VMM learns at a dirty sync, under the dirty model of the host it runs on.

The emulated hardware knows exactly which pages' data and which pages' tags changed; no real
VMM does. `--dirty-model` picks what the source may see:

- `kvm` (the default): stage-2 write protection or the dirty ring, one bit per page. A tag
  store (STG, STGM, DC GZVA) needs write permission as a data store does, so it marks the page,
  and nothing says whether data, tags or both changed. The source finds out by comparing each
  dirty page with what it last sent: the per-page digests of data and of tags it keeps anyway
  for the verification. Unchanged data costs no page on the wire, unchanged tags no section;
  the comparison costs a hash of the page and a tag read through KVM_ARM_MTE_COPY_TAGS, and
  is counted.
- `tcg`: QEMU's full emulation, where tags live in their own RAM block (`mach-virt.tag`, RAM
  size / 32) dirty-tracked like any RAM, per 4 KiB of tag storage: one tag store dirties the
  tags of TCG_TAG_GROUP_PAGES data pages, all sent again. Data pages are tracked alone.
- `split`: a bitmap for data and one for tags per page, which no real host gives: the ideal
  to compare with.

In every model the VMM's own writes (device emulation) are in the dirty log only if the
device marked them (GuestMemory.dma_write).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from common.constants import PACKED_TAG_BYTES_PER_PAGE, TCG_TAG_GROUP_PAGES
from common.guest.digest import ZERO_PAGE_DIGEST, DigestCache
from common.guest.memory import DirtySync, GuestMemory
from common.guest.pagehash import gather_content, row_digests
from common.indices import union

Indices = npt.NDArray[np.int64]


class DirtyModel(Enum):
    KVM = "kvm"
    TCG = "tcg"
    SPLIT = "split"


@dataclass
class DirtyCounts:
    """What the dirty syncs of one migration found, for the report."""

    syncs: int = 0
    dirty_pages: int = 0  # as the model reports them (kvm: one bit per page; tcg: data + tag groups)
    # kvm: what the comparison with the last sent version found the dirty pages to hold
    data_only: int = 0
    tags_only: int = 0
    both: int = 0
    neither: int = 0
    compared_pages: int = 0
    compare_s: float = 0.0

    def as_report(self) -> dict[str, int | float]:
        return {
            "syncs": self.syncs,
            "dirty_pages": self.dirty_pages,
            "changed_data_only": self.data_only,
            "changed_tags_only": self.tags_only,
            "changed_both": self.both,
            "changed_neither": self.neither,
            "compared_pages": self.compared_pages,
            "compare_ms": round(self.compare_s * 1000, 3),
        }


class DirtyLog:
    """The source's view of its guest's dirty pages under one model. `digests` hold what the
    source last sent of each page (the kvm model compares with them)."""

    def __init__(self, model: DirtyModel, mem: GuestMemory, digests: DigestCache) -> None:
        self.model = model
        self.mem = mem
        self.digests = digests
        self.counts = DirtyCounts()
        # kvm: the tags the last comparison read, of the pages whose tags changed, so that
        # sending them reads nothing again (a VMM keeps what its ioctl returned)
        self._tag_pages: Indices = np.empty(0, dtype=np.int64)
        self._tag_rows: npt.NDArray[np.uint8] = np.empty((0, PACKED_TAG_BYTES_PER_PAGE), dtype=np.uint8)

    def first(self) -> DirtySync:
        """What round 1 sends: every page that may differ from a fresh guest."""
        hardware = self.mem.populated_pages()
        if self.model is DirtyModel.KVM:
            # a KVM VMM knows which pages are backed, not which hold tags: it reads the tags of all
            return DirtySync(hardware.data_pages, union(hardware.data_pages, hardware.tag_pages))
        if self.model is DirtyModel.TCG:
            return DirtySync(hardware.data_pages, self._tag_groups(hardware.tag_pages))
        return hardware

    def sync(self) -> DirtySync:
        """Take and clear the dirty log; the pages whose data, and whose tags, to send again."""
        hardware = self.mem.dirty_sync()
        self.counts.syncs += 1
        if self.model is DirtyModel.SPLIT:
            self.counts.dirty_pages += int(hardware.data_pages.size + hardware.tag_pages.size)
            return hardware
        if self.model is DirtyModel.TCG:
            tags = self._tag_groups(hardware.tag_pages)
            self.counts.dirty_pages += int(hardware.data_pages.size + tags.size)
            return DirtySync(hardware.data_pages, tags)
        # kvm: one bit per page, for data and tag stores alike
        dirty = union(hardware.data_pages, hardware.tag_pages)
        self.counts.dirty_pages += int(dirty.size)
        return self.classify(dirty)

    def classify(self, dirty: Indices) -> DirtySync:
        """kvm: which of the dirty pages changed their data, and which their tags, since they
        were last sent (a stale digest counts as changed: what was sent is not known)."""
        began = time.perf_counter()
        mem = self.mem
        with mem.lock:
            zero, _, content = gather_content(mem.pages, dirty, copy=False)
            data_now = np.full(dirty.size, ZERO_PAGE_DIGEST, dtype=np.uint64)
            data_now[~zero] = content
            tag_rows = mem.tag_ioctl.read_pages(dirty)
        tags_now = row_digests(tag_rows)
        data_sent, data_stale = self.digests.ram.known(dirty)
        tags_sent, tags_stale = self.digests.tags.known(dirty)
        data_changed = data_stale | (data_now != data_sent)
        tags_changed = tags_stale | (tags_now != tags_sent)
        counts = self.counts
        counts.compared_pages += int(dirty.size)
        counts.both += int(np.count_nonzero(data_changed & tags_changed))
        counts.data_only += int(np.count_nonzero(data_changed & ~tags_changed))
        counts.tags_only += int(np.count_nonzero(tags_changed & ~data_changed))
        counts.neither += int(np.count_nonzero(~(data_changed | tags_changed)))
        counts.compare_s += time.perf_counter() - began
        self._tag_pages, self._tag_rows = dirty[tags_changed], tag_rows[tags_changed]
        return DirtySync(dirty[data_changed], dirty[tags_changed])

    def read_tags(self, pages: Indices) -> npt.NDArray[np.uint8] | None:
        """The packed tags of `pages` (ascending) as the last comparison read them, if it read
        them all; None otherwise (read them through the ioctl). What was read is what is sent:
        a tag store since then dirtied the page again, and the next sync sends it."""
        known = self._tag_pages
        if pages.size == 0 or known.size == 0:
            return None
        at = np.searchsorted(known, pages)
        if int(at[-1]) >= known.size or not (known[np.minimum(at, known.size - 1)] == pages).all():
            return None
        return self._tag_rows[at]

    def _tag_groups(self, tag_pages: Indices) -> Indices:
        """Every page whose tags share a 4 KiB page of QEMU's tag block with a dirty one."""
        if tag_pages.size == 0:
            return tag_pages
        groups = tag_pages // TCG_TAG_GROUP_PAGES  # ascending, as the sync gives pages
        groups = groups[np.concatenate(([True], groups[1:] != groups[:-1]))]
        pages = (groups[:, None] * TCG_TAG_GROUP_PAGES + np.arange(TCG_TAG_GROUP_PAGES)).reshape(-1)
        return pages[pages < self.mem.page_count]
