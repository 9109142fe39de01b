"""argparse value types shared by both daemons' command lines: a bad value is refused with a
message naming the flag (argparse adds the flag), never a traceback."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from common.endpoints import check_endpoint
from common.report import check_report_path
from common.units import parse_size


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
