"""dest-node: receives a migrating MTE guest."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dest-node", description="Receive a migrating MTE guest.")
    parser.parse_args(argv)
    print("dest-node: incoming migration is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
