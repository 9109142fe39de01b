"""Sizes as operators type them and as the tools print them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.units import format_duration, format_rate, format_size, parse_size


@pytest.mark.parametrize(
    "text, value",
    [
        ("4096", 4096),
        ("64K", 64 << 10),
        ("64KiB", 64 << 10),
        ("64kB", 64 << 10),
        ("1.5MiB", 3 << 19),
        ("1G", 1 << 30),
        ("1GB", 1 << 30),
        ("1 GiB", 1 << 30),
        ("2T", 2 << 40),
        ("512B", 512),
    ],
)
def test_every_usual_spelling_is_a_binary_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "1PB", "-1K", "1.3B", "1.5", "K", "1 G B"])
def test_what_is_not_a_size_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="not a"):
        parse_size(text)


@pytest.mark.parametrize("text", ["100Mb", "1gib", "64kb"])
def test_a_lowercase_b_is_bits_and_refused_rather_than_read_as_bytes(text: str) -> None:
    with pytest.raises(ValueError, match="a lowercase b means bits; sizes are bytes"):
        parse_size(text)


@pytest.mark.parametrize(
    "count, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (4096, "4 KiB"),
        (17 << 30, "17 GiB"),
        (123456789, "118 MiB"),
    ],
)
def test_sizes_read_as_a_person_writes_them(count: int, text: str) -> None:
    assert format_size(count) == text


@given(st.integers(min_value=0, max_value=1 << 44))
def test_a_printed_size_reads_back_within_its_rounding(count: int) -> None:
    number, unit = format_size(count).split()
    back = parse_size(f"{number}{unit}") if "." not in number else float(number) * parse_size(f"1{unit}")
    assert abs(back - count) <= max(0.005 * count, 0.5)


def test_rates_and_durations() -> None:
    assert format_rate(20 << 20) == "20 MiB/s"
    assert [format_duration(s) for s in (0.25, 12.34, 245, 3725)] == [
        "250 ms",
        "12.3 s",
        "4 min 05 s",
        "1 h 02 min",
    ]
