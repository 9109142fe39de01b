"""Parsing of sizes given on the command line (4096, 64KiB, 1MiB, 16GiB)."""

from __future__ import annotations

import re

_SUFFIX = {
    "": 1,
    "B": 1,
    "KIB": 1 << 10,
    "K": 1 << 10,
    "MIB": 1 << 20,
    "M": 1 << 20,
    "GIB": 1 << 30,
    "G": 1 << 30,
}
_SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match or match.group(2).upper() not in _SUFFIX:
        raise ValueError(f"'{text}' is not a size (examples: 4096, 64KiB, 1MiB, 16GiB)")
    return int(match.group(1)) * _SUFFIX[match.group(2).upper()]
