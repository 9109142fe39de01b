"""argparse value types shared by both daemons' command lines: a bad value is refused with a
message naming the flag (argparse adds the flag), never a traceback."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from common.endpoints import check_endpoint
from common.report import check_report_path
from common.units import parse_size


def version_text(prog: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{prog} {version('mte-migration')}"
    except PackageNotFoundError:
        return f"{prog} (not installed: run scripts/install.sh)"


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_size(text: str) -> int:
    """A size that must be more than nothing (a limit of 0 would refuse everything)."""
    value = size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
    return value


def non_negative(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative")
        return value

    return parse


def rounds_or_never(text: str) -> int | None:
    """--postcopy-after-rounds: a number of rounds, or never (only on ctl postcopy-start)."""
    if text == "never":
        return None
    return int(non_negative(int)(text))


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    at_least_zero = non_negative(kind)

    def parse(text: str) -> int | float:
        value = at_least_zero(text)
        if value == 0:
            raise argparse.ArgumentTypeError("must be more than 0")
        return value

    return parse


def endpoint(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check_endpoint(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def writable_report(text: str) -> str:
    try:
        check_report_path(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
