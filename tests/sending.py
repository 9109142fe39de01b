"""A precopy pass sent as a source session sends it, without the session: for the tests and the
benchmark of the dirty models (bench/dirty_models.py), which count its bytes."""

from __future__ import annotations

import os

import numpy as np

from common.constants import PAGE_SIZE
from common.guest.memory import GuestMemory
from common.protocol.link import Link
from common.protocol.precopy import Precopy
from common.transfer import encode_batch


def random_memory(pages: int, seed: int = 7) -> GuestMemory:
    """Guest memory with random data and a random tag on every granule, every page written."""
    mem = GuestMemory(pages * PAGE_SIZE)
    rng = np.random.default_rng(seed)
    mem.pages[:] = rng.integers(0, 256, mem.pages.shape, dtype=np.uint8)
    mem.page_tags[:] = rng.integers(0, 256, mem.page_tags.shape, dtype=np.uint8)
    mem.data_populated[:] = True
    mem.tags_populated[:] = True
    return mem


def send_pass(pre: Precopy, link: Link | None = None) -> int:
    """Encode the current pass as a source sends it, recording each batch's leaves (the tags
    the kvm comparison read are the ones sent, as in SourcePrecopySide.encode); the bytes framed."""
    link = link or Link(os.urandom(8), 0.0, rto_s=1.0)
    total = 0
    assert pre.pass_ is not None
    while not pre.pass_.done:
        for kind, chunk in pre.pass_.next_chunks(1):
            read = pre.log.read_tags(chunk) if kind == "tag_sections" else None
            batch = encode_batch(pre.mem, kind, chunk, use_lz4=True, round_no=pre.round, tag_rows=read)
            record = pre.digests.record_ram if kind == "ram_pages" else pre.digests.record_tags
            record(batch.stats.content, batch.stats.digests, batch.stats.empty)
            frames = link.sequenced(0.0, batch.payload, data=chunk, **{kind: batch.body})
            total += sum(len(f) for f in frames)
    return total
