"""The rule that keeps rooms small (no module over 500 lines, no class over 400), checked like
a lint: a change that grows a god class again fails the suite, not a later read."""

from __future__ import annotations

import ast
import importlib.util
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


# What the daemons may not touch: the guest's packed tag storage, the per-granule tag
# instructions and the hardware's own dirty bitmaps are the emulated machine's. A KVM VMM reaches
# tags only through KVM_ARM_MTE_COPY_TAGS (common/guest/tag_ioctl.py) and learns what is dirty
# only through its host's dirty log (common/guest/dirtylog.py, which alone reads the bitmaps).
_HARDWARE_TAGS = {
    "page_tags", "tag_storage", "set_tags", "get_tag", "granule_tags", "place_tags",
    "read_tags_packed", "write_tags_packed", "unpack_tags",
}  # fmt: skip
_HARDWARE_DIRTY = {"data_dirty", "tag_dirty", "device_dirty", "dirty_sync", "populated_pages"}
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


def hardware_reaches(module: Path) -> list[str]:
    """Every use of a forbidden name in a module: attributes, imported names and bare names."""
    allowed_dirty = module.name == "dirtylog.py"
    found = []
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.alias):
            name = node.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value  # getattr(mem, "page_tags")
        else:
            continue
        if name in _HARDWARE_TAGS or (name in _HARDWARE_DIRTY and not allowed_dirty):
            found.append(f"{module.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}: {name}")
    return found


def test_the_daemons_reach_tags_and_dirt_only_as_a_kvm_vmm_can() -> None:
    found = []
    for part in _VMM_SIDE:
        path = ROOT / part
        for module in sorted(path.rglob("*.py") if path.is_dir() else [path]):
            found += hardware_reaches(module)
    assert found == []


def test_the_rule_sees_every_way_of_reaching_the_hardware(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from common.guest.memory import unpack_tags\n"
        "rows = mem.page_tags[pages]\n"
        "table = mem.tag_storage\n"
        "other = getattr(mem, 'page_tags')\n"
        "sync = mem.dirty_sync()\n"
    )
    assert [line.split(": ")[1] for line in hardware_reaches_at(sample, tmp_path)] == [
        "unpack_tags", "page_tags", "tag_storage", "page_tags", "dirty_sync",
    ]  # fmt: skip


def hardware_reaches_at(module: Path, root: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, root
    try:
        return sorted(hardware_reaches(module), key=lambda line: int(line.split(":")[1]))
    finally:
        ROOT = saved
