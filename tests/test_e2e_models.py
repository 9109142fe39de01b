"""Each dirty model through the real daemons, and a device that forgets to mark its writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import SMALL_GUEST, Dest, reference, run_source, same_guest

pytestmark = pytest.mark.slow

# A busy guest with half its steps tag-only and its device writing a page every 4 steps.
GUEST = [*SMALL_GUEST, "--seed", "12", "--steps-per-second", "1500", "--dirty-pages-per-step", "16",
         "--tag-only-share", "0.5", "--device-period", "4", "--stop-at-step", "2500"]  # fmt: skip


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
@pytest.mark.parametrize("model", ["kvm", "tcg", "split"])
def test_migrated_equals_unmigrated_under_each_dirty_model(tmp_path: Path, model: str, mode: str) -> None:
    dest = Dest(tmp_path, "--stop-at-step", "2500")
    # postcopy after three precopy rounds: two dirty syncs under the model, then the pull
    src = run_source(
        tmp_path, *GUEST, "--dirty-model", model, "--mode", mode, "--postcopy-after-rounds", "3",
        "--downtime-limit", "30", "--migrate-to", dest.uri,
    )  # fmt: skip
    got = dest.finish()
    assert src.code == 0, src.stderr[-3000:] + "\n--- dest ---\n" + got.stderr[-3000:]
    assert got.code == 0, got.stderr[-3000:]
    report = src.report
    assert report["dirty_model"]["model"] == model
    assert report["dirty_model"]["syncs"] >= 1
    if model == "kvm":
        # one bit per page: the source compared what it found with what it had sent
        assert report["dirty_model"]["compared_pages"] > 0
        assert report["dirty_model"]["changed_tags_only"] > 0, "half the steps only retag"
    else:
        assert report["dirty_model"]["compared_pages"] == 0
    assert report["tag_ioctl"]["calls"] > 0 and report["tag_ioctl"]["bytes_to_guest"] == 0
    assert got.report["tag_ioctl"]["bytes_to_guest"] > 0, "the destination placed tags through the edge"
    assert same_guest(got.report["guest"], reference(tmp_path, *GUEST))


# The device writes its ring of 16 pages behind every dirty log; no vCPU store touches those
# pages (no tag-only steps retag the arena they lie in), so nothing else sends them again.
FORGETFUL = [*SMALL_GUEST, "--seed", "13", "--steps-per-second", "1500", "--tag-only-share", "0",
             "--device-period", "2", "--stop-at-step", "2000", "--debug-device-forgets"]  # fmt: skip
UNMIGRATED = [arg for arg in FORGETFUL if arg != "--debug-device-forgets"]


def test_pages_a_device_forgot_to_mark_are_named_and_repaired_by_the_verification(tmp_path: Path) -> None:
    dest = Dest(tmp_path, "--stop-at-step", "2000")
    src = run_source(tmp_path, *FORGETFUL, "--verify-rehash", "--migrate-to", dest.uri)
    got = dest.finish()
    assert src.code == 0, src.stderr[-3000:]
    verification = src.report["verification"]
    assert verification["ok"] is True
    assert verification["repaired_pages"] > 0, "the device's unmarked pages were found and sent again"
    assert verification["rehashed_pages"] > 0
    # the pages named are the device's ring (the first pages of the arena), nothing else
    assert 0 < len(verification["mismatched_pages"]) <= 16
    assert same_guest(got.report["guest"], reference(tmp_path, *UNMIGRATED))


def test_without_the_rehash_the_forgotten_pages_go_unseen(tmp_path: Path) -> None:
    """Why the option exists: the same run verified against what the dirty log said was sent
    completes, and the destination's guest is not the unmigrated one."""
    dest = Dest(tmp_path, "--stop-at-step", "2000")
    src = run_source(tmp_path, *FORGETFUL, "--migrate-to", dest.uri)
    got = dest.finish()
    assert src.code == 0 and src.report["verification"]["repaired_pages"] == 0
    assert not same_guest(got.report["guest"], reference(tmp_path, *UNMIGRATED))
