"""Regenerate common/wire/mte_migration_pb2.py(.pyi) from proto/ with the pinned generator.

Usage: python scripts/gen_proto.py [--check]
--check writes nothing and exits 1 when the committed code differs from a fresh generation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "common" / "wire"
GENERATED = ("mte_migration_pb2.py", "mte_migration_pb2.pyi")
# The generator is pinned in pyproject.toml (grpcio-tools bundles protoc).
PINNED_GRPCIO_TOOLS = "1.85.1"


def generate(out_dir: Path) -> None:
    from importlib.metadata import version

    from grpc_tools import protoc

    found = version("grpcio-tools")
    if found != PINNED_GRPCIO_TOOLS:
        raise SystemExit(f"gen_proto: grpcio-tools {found} installed, {PINNED_GRPCIO_TOOLS} pinned")
    status = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(PROTO_DIR / "mte_migration.proto"),
        ]
    )
    if status != 0:
        raise SystemExit(f"gen_proto: protoc failed with status {status}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if not args.check:
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in GENERATED if (Path(tmp) / n).read_bytes() != (OUT_DIR / n).read_bytes()]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python scripts/gen_proto.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
