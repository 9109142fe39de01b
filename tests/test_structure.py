"""The rule that keeps rooms small (no module over 500 lines, no class over 400), checked like
a lint: a change that grows a god class again fails the suite, not a later read."""

from __future__ import annotations

import importlib.util
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
