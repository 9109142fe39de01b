"""The rule that keeps rooms small (no module over 500 lines, no class over 400), checked like
a lint: a change that grows a god class again fails the suite, not a later read."""

from __future__ import annotations

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
