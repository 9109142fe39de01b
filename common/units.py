"""Sizes as people write and read them.

Every multiple is binary, as QEMU's `-m 4G`: K, KB and KiB all mean 1024 bytes, M, MB and MiB
1024², G, GB and GiB 1024³, T, TB and TiB 1024⁴. A guest's RAM is counted in 4 KiB pages, so a
decimal gigabyte (10⁹ bytes, not a whole number of pages) would only ever be a typing error.
"""

from __future__ import annotations

import re

_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:I?B)?|B)?\s*$", re.IGNORECASE)
SIZE_SPELLINGS = "e.g. 4096, 64K, 1.5MiB, 1GB, 16GiB; K/M/G/T mean powers of 1024, with or without B/iB"


def parse_size(text: str) -> int:
    if re.search(r"[KMGTkmgt]i?b\s*$", text):
        raise ValueError(f"'{text}': a lowercase b means bits; sizes are bytes ({SIZE_SPELLINGS})")
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a size ({SIZE_SPELLINGS})")
    number, unit = match.group(1), (match.group(2) or "").upper()
    scale = 1 << (10 * _POWERS[unit])
    if "." not in number:
        return int(number) * scale
    value = float(number) * scale
    if value != int(value):
        raise ValueError(f"'{text}' is not a whole number of bytes")
    return int(value)


def format_size(count: float) -> str:
    """1536 -> '1.5 KiB', 17179869184 -> '16 GiB': three significant figures at most."""
    value, units = float(count), ["B", "KiB", "MiB", "GiB", "TiB"]
    while abs(value) >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    unit = units[0]
    if unit == "B" or value == int(value):
        return f"{int(value)} {unit}"
    return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"


def exact_size(count: int) -> str:
    """For error messages: the readable form only when it is exact ('17 GiB'), else the bytes."""
    text = format_size(count)
    number, unit = text.split()
    return text if "." not in number and parse_size(number + unit) == count else f"{count} bytes"


def format_rate(bytes_per_s: float) -> str:
    return f"{format_size(bytes_per_s)}/s"


def format_duration(seconds: float) -> str:
    """What an ETA reads as: '850 ms', '12.3 s', '4 min 05 s', '1 h 02 min'."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
