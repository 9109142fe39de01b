"""The rule that keeps rooms small (no module over 500 lines, no class over 400), checked like
a lint: a change that grows a god class again fails the suite, not a later read."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_sizes():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("sizes", ROOT / "scripts" / "sizes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_module_or_class_passes_its_limit() -> None:
    sizes = load_sizes()
    assert sizes.over_the_limits() == []


def test_the_count_sees_the_daemons_and_the_protocol() -> None:
    sizes = load_sizes()
    names = {name for _, name in sizes.classes()}
    assert {"dest_node/daemon.py::DestDaemon", "common/protocol/dest.py::DestSession"} <= names
    biggest = dict((name, n) for n, name in sizes.modules())
    assert biggest["common/protocol/dest.py"] == len(
        (ROOT / "common/protocol/dest.py").read_text().splitlines()
    )


def test_every_guarantee_probe_still_finds_the_code_it_breaks() -> None:
    """scripts/probe_guarantees.py breaks each guarantee by replacing a piece of code; a probe
    whose code moved would report STALE and check nothing. A refactoring that moves probed code
    fails here, where it happens."""
    spec = importlib.util.spec_from_file_location("probes", ROOT / "scripts" / "probe_guarantees.py")
    assert spec is not None and spec.loader is not None
    probes = importlib.util.module_from_spec(spec)
    sys.modules["probes"] = probes  # (a dataclass looks its module up while it is made)
    try:
        spec.loader.exec_module(probes)
    finally:
        del sys.modules["probes"]
    stale = [p.name for p in probes.PROBES if p.original not in (ROOT / p.path).read_text()]
    assert len(probes.PROBES) >= 39 and stale == []


# What the daemons may not touch: the guest's packed tag storage and the per-granule tag
# instructions are the emulated hardware's. A KVM VMM reaches tags only through
# KVM_ARM_MTE_COPY_TAGS, so the daemons do too (common/guest/tag_ioctl.py), and every tag they
# read or write is counted in the report.
_HARDWARE_TAG_ACCESS = re.compile(
    r"\.(page_tags|tag_bytes\[|set_tags\(|get_tag\(|granule_tags\(|place_tags\(|read_tags_packed|write_tags_packed)"
)
_VMM_SIDE = [
    "common/protocol",
    "common/wire",
    "common/transfer.py",
    "common/outgoing.py",
    "common/guest/digest.py",
    "common/guest/dirtylog.py",
    "dest_node",
    "source_node",
]


def test_the_daemons_reach_tags_only_through_the_kvm_interface() -> None:
    found = []
    for part in _VMM_SIDE:
        path = ROOT / part
        for module in sorted(path.rglob("*.py") if path.is_dir() else [path]):
            for number, line in enumerate(module.read_text().splitlines(), 1):
                if _HARDWARE_TAG_ACCESS.search(line) and not line.lstrip().startswith("#"):
                    found.append(f"{module.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
    assert _HARDWARE_TAG_ACCESS.search("rows = mem.page_tags[pages]"), "the rule sees a direct read"
