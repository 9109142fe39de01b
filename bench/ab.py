"""An interleaved A/B of this tree against a baseline commit: an idle 1 GiB random guest, into a
preallocated destination, in precopy and in postcopy at once, pair by pair so that a drifting
machine hits both alike. For a change that should cost nothing (reports, operator commands):

    python3 bench/ab.py --baseline ebfaae4 --repeat 5

prints every run, then the medians and this tree's ratio to the baseline."""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.runs import ROOT, migrate, ok
from bench.speed_bench import baseline_tree

GUEST = ["--ram", "1GiB", "--fill", "random", "--stop-at-step", "0"]
MODES = {
    "precopy": [],
    "postcopy": ["--mode", "postcopy", "--postcopy-after-rounds", "0"],
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default="ebfaae4")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        tree = baseline_tree(args.baseline, tmp)
        for native in (ROOT / "common").glob("_pagehash*.so"):  # built here, not in a worktree
            shutil.copy(native, tree / "common")
        try:
            rows: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
            for n in range(args.repeat):
                for mode, extra in MODES.items():
                    pair = [("this tree", None), (args.baseline, tree)]
                    # each goes first in every other pair: the first of a pair may find the machine colder
                    for name, where in pair if n % 2 == 0 else pair[::-1]:
                        run = migrate(tmp, [*GUEST, *extra], ["--preallocate", "1GiB"], tree=where)
                        if not ok(run):
                            print(
                                f"run {n + 1} {mode} {name}: {run.source.get('status')} {run.source.get('error')}"
                            )
                            continue
                        total = run.source["total_time_ms"] / 1000.0
                        rows.setdefault((mode, name), []).append((total, run.source.get("downtime_ms")))
                        print(
                            f"run {n + 1} {mode:8} {name:10} total {total:.3f} s  downtime {run.source.get('downtime_ms')} ms",
                            flush=True,
                        )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print()
    print("| mode | tree | runs (s) | median total (s) | median downtime (ms) |")
    print("|---|---|---|---|---|")
    medians: dict[tuple[str, str], float] = {}
    for (mode, name), runs in rows.items():
        totals = [t for t, _ in runs]
        downs = [d for _, d in runs if d is not None]
        medians[(mode, name)] = statistics.median(totals)
        shown = ", ".join(f"{t:.2f}" for t in totals)
        down = f"{statistics.median(downs):.1f}" if downs else "-"
        print(f"| {mode} | {name} | {shown} | {medians[(mode, name)]:.3f} | {down} |")
    print()
    for mode in MODES:
        ours, base = medians.get((mode, "this tree")), medians.get((mode, args.baseline))
        if ours and base:
            print(f"{mode}: this tree / {args.baseline} = {ours / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
