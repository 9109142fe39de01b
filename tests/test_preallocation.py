"""Guest memory placement: huge-page alignment and a destination's preallocation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.constants import HUGE_PAGE_ALIGN, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.memory import GuestMemory, lazy_zeroed
from common.guest.prefault import Preallocation, Prefaulter
from dest_node.cli import build_parser, main


@pytest.mark.parametrize("size", [PAGE_SIZE, 3 << 20, HUGE_PAGE_ALIGN * 3 + PAGE_SIZE])
def test_guest_memory_starts_on_a_huge_page_boundary(size: int) -> None:
    mapping, area = lazy_zeroed(size)
    try:
        assert area.ctypes.data % HUGE_PAGE_ALIGN == 0
        assert area.size == size and not area.any()
        area[-1] = 7  # the whole size is usable
    finally:
        del area
        mapping.close()


def test_preallocation_commits_then_serves_one_guest_that_fits() -> None:
    prealloc = Preallocation(8 << 20)
    prealloc.start()
    assert prealloc.wait(10.0), "committing 8 MiB did not finish"
    assert prealloc.seconds is not None and prealloc.committed_bytes >= 8 << 20
    assert prealloc.take(16 << 20) is None, "a larger guest does not fit"
    backing = prealloc.take(4 << 20)
    assert backing is not None
    assert prealloc.take(4 << 20) is None, "the storage serves one guest only"
    mem = GuestMemory(4 << 20, backing)
    del backing  # the guest's memory holds it now (and closes it)
    assert mem.page_count == 1024 and mem.tag_storage.size == 1024 * PACKED_TAG_BYTES_PER_PAGE
    assert not mem.ram.any() and not mem.tag_storage.any(), "a preallocated guest starts zeroed"
    mem.write(4096, b"\x01\x02")
    mem.set_tags(0, 64, 5)
    assert mem.read(4096, 2) == b"\x01\x02" and mem.get_tag(48) == 5
    mem.close()


def test_preallocate_option_is_checked_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        build_parser().parse_args(["--listen", "tcp://127.0.0.1:1", "--preallocate", "1GiB"]).preallocate
        == 1 << 30
    )
    for args, expected in (
        (["--preallocate", "4GiB", "--max-ram", "1GiB"], "is more than --max-ram 1 GiB"),
        (["--preallocate", "12345"], "is outside 1 MiB .. 16 GiB"),
        (["--preallocate", "1048577"], "not a whole number of 4 KiB pages"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--listen", "tcp://127.0.0.1:1", *args])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err


def test_a_hint_that_names_every_page_commits_no_more_than_a_lead_past_what_arrived() -> None:
    """The populated-pages hint costs a source a few bytes; it made the destination commit all of
    --max-ram before a single page arrived."""
    mem = GuestMemory(64 << 20)
    arrived = [0]
    lead = 8192  # 32 MiB: one madvise call's worth
    prefault = Prefaulter(mem, np.arange(mem.page_count), arrived=lambda: arrived[0], lead_pages=lead)
    prefault.start()
    try:
        deadline = time.monotonic() + 10
        while not prefault.held_back and time.monotonic() < deadline:
            time.sleep(0.01)
        assert prefault.held_back, "it stopped at its lead"
        time.sleep(0.1)
        assert prefault.faulted_pages <= lead
        arrived[0] = mem.page_count  # the source sent what it named: the rest may go ahead
        while prefault.faulted_pages < mem.page_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert prefault.faulted_pages == mem.page_count
    finally:
        prefault.join()
