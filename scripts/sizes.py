"""The largest modules and classes of the tree, against the rule that keeps rooms small.

    python3 scripts/sizes.py            # the ten largest of each, and any over the limits

A class counts from its `class` line to its last line; a module counts every line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["common", "source_node", "dest_node"]
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 400


def modules() -> list[tuple[int, str]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue  # generated from proto/: not written by hand
            found.append((len(path.read_text().splitlines()), str(path.relative_to(ROOT))))
    return sorted(found, reverse=True)


def classes() -> list[tuple[int, str]]:
    found = []
    for _, name in modules():
        tree = ast.parse((ROOT / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                found.append((node.end_lineno - node.lineno + 1, f"{name}::{node.name}"))
    return sorted(found, reverse=True)


def over_the_limits() -> list[str]:
    return [
        f"{name}: {n} lines (limit {MAX_MODULE_LINES})" for n, name in modules() if n > MAX_MODULE_LINES
    ] + [f"{name}: {n} lines (limit {MAX_CLASS_LINES})" for n, name in classes() if n > MAX_CLASS_LINES]


def main() -> int:
    for title, rows in (("modules", modules()), ("classes", classes())):
        print(f"{'lines':>6}  largest {title}")
        for n, name in rows[:10]:
            print(f"{n:6}  {name}")
        print()
    over = over_the_limits()
    for line in over:
        print("over the limit:", line)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
