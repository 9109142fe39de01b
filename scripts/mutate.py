"""Mutation testing of the pure modules: does the fast suite notice when the code is wrong?

    python3 scripts/mutate.py                      # every pure module, 2 workers
    python3 scripts/mutate.py common/wire/codec.py --show-survivors

Each mutant changes one thing inside one function (a comparison, an operator, a boolean, a
number, a condition, a statement dropped). Tests are collected once; the lines each test runs
in the mutated files are recorded, so a mutant runs only the tests that ran its lines (a test
that never ran them behaves exactly as before the mutation). Each mutant runs in a forked
child that swaps the function's code object in place (so every `from x import f` sees it) and
runs those tests with `-x`. A mutant is killed when a test fails or runs past its own time
bound (five times its unmutated time, plus 5 s). Not part of CI: it takes minutes to hours;
the fast tests it uses are.

Left unmutated on purpose: string constants (error texts are read by people; tests check their
key words), module and class level statements (constants and declarations, which the generated
schema and the type checker pin), docstrings, and log calls.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import os
import random
import signal
import sys
import time
import types
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_TERMINAL = os.dup(1)  # progress goes here: pytest captures stdout while the session runs


def say(text: str) -> None:
    os.write(_TERMINAL, (text + "\n").encode())


PER_TEST_S = 5.0  # added to five times a test's own time: its bound inside a mutant
TIMED_OUT = 4  # a child's exit status when a test ran past its bound

PURE = ["common/wire", "common/protocol", "common/guest/mte.py", "common/guest/memory.py"]
FAST_TESTS = ["tests", "-m", "not slow and not faults"]


# Every source read once at start: editing the tree while a run goes on cannot mix versions.
_SOURCES: dict[str, str] = {}


def source_digest(path: str) -> str:
    return hashlib.blake2b(source_of(path).encode(), digest_size=8).hexdigest()


def journal_verdicts(journal: Path) -> dict[tuple[str, int], str]:
    """The latest verdict a journal holds for each mutant, keyed by file and mutant index, for
    the files whose source is unchanged since (a verdict on other code says nothing)."""
    found: dict[tuple[str, int], str] = {}
    if not journal.exists():
        return found
    for line in journal.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a stopped run
        path = entry["path"]
        if (ROOT / path).exists() and entry["source"] == source_digest(path):
            found[(path, entry["index"])] = str(entry["result"])
    return found


def killed_before(journal: Path) -> dict[tuple[str, int], str]:
    """What a journal says was killed at the same source. Tests only ever kill more as they
    are added, so a mutant killed at the same source stays killed; a survivor is judged again."""
    return {
        key: verdict for key, verdict in journal_verdicts(journal).items() if verdict.startswith("killed")
    }


def source_of(path: str) -> str:
    if path not in _SOURCES:
        _SOURCES[path] = (ROOT / path).read_text()
    return _SOURCES[path]


@dataclass(frozen=True)
class Mutant:
    path: str
    index: int  # the index-th mutation point of the file, in a fixed walk order
    line: int
    description: str
    end_line: int = 0  # the mutated node's last line: a test that ran none of its lines cannot see it


# -- finding and applying mutations ---------------------------------------------------------
_COMPARE_SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BINOP_SWAPS: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.BitXor: ast.BitOr,
}


def _is_docstring_or_log(stmt: ast.stmt) -> bool:
    if not isinstance(stmt, ast.Expr):
        return False
    value = stmt.value
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return True
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr in {"debug", "info", "warning", "error", "exception"}
    )


def _points(tree: ast.Module) -> Iterator[tuple[ast.AST, str, str]]:
    """(node, kind, description) for every mutation point inside a function, in walk order."""
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        # only the body of top-level functions and methods; nested defs come with their parent
        for node in _walk_body(func):
            yield from _node_points(node)


def _walk_body(func: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[ast.AST]:
    stack: list[ast.AST] = [s for s in func.body if not _is_docstring_or_log(s)]
    while stack:
        node = stack.pop(0)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue  # visited as a function of its own
        if isinstance(node, ast.Expr) and _is_docstring_or_log(node):
            continue
        yield node
        stack[0:0] = list(ast.iter_child_nodes(node))


def _node_points(node: ast.AST) -> Iterator[tuple[ast.AST, str, str]]:
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _COMPARE_SWAPS:
                new = _COMPARE_SWAPS[type(op)].__name__
                yield node, f"cmp:{i}", f"{type(op).__name__} -> {new}"
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
        yield node, "binop", f"{type(node.op).__name__} -> {_BINOP_SWAPS[type(node.op)].__name__}"
    elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAPS:
        yield node, "binop", f"{type(node.op).__name__}= -> {_BINOP_SWAPS[type(node.op)].__name__}="
    elif isinstance(node, ast.BoolOp):
        yield node, "boolop", "and <-> or"
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield node, "not", "drop not"
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield node, "neg", "drop unary minus"
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        yield node, "bool", f"{node.value} -> {not node.value}"
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        yield node, "num", f"{node.value!r} -> {_bump(node.value)!r}"
    elif isinstance(node, ast.If | ast.While | ast.IfExp):
        yield node, "cond", "negate condition"
    elif isinstance(node, ast.Return) and node.value is not None:
        yield node, "return", "return None"
    elif isinstance(node, ast.Expr | ast.Assign | ast.AugAssign | ast.Raise | ast.AnnAssign):
        yield node, "drop", f"drop {type(node).__name__.lower()} statement"


def _bump(value: float) -> float:
    if value == 0:
        return 1
    if value == 1:
        return 0
    return value + 1


def find_mutants(path: str) -> list[Mutant]:
    tree = ast.parse(source_of(path), path)
    return [
        Mutant(path, i, getattr(node, "lineno", 0), description, getattr(node, "end_lineno", 0) or 0)
        for i, (node, _, description) in enumerate(_points(tree))
    ]


def _apply(tree: ast.Module, index: int) -> ast.Module:
    tree = copy.deepcopy(tree)
    for i, (node, kind, _) in enumerate(_points(tree)):
        if i != index:
            continue
        if kind.startswith("cmp:"):
            k = int(kind[4:])
            node.ops[k] = _COMPARE_SWAPS[type(node.ops[k])]()  # type: ignore[attr-defined]
        elif kind == "binop":
            node.op = _BINOP_SWAPS[type(node.op)]()  # type: ignore[attr-defined]
        elif kind == "boolop":
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()  # type: ignore[attr-defined]
        elif kind in ("not", "neg"):
            _replace(tree, node, node.operand)  # type: ignore[attr-defined]
        elif kind == "bool":
            node.value = not node.value  # type: ignore[attr-defined]
        elif kind == "num":
            node.value = _bump(node.value)  # type: ignore[attr-defined]
        elif kind == "cond":
            test = node.test  # type: ignore[attr-defined]
            node.test = ast.copy_location(ast.UnaryOp(ast.Not(), test), test)  # type: ignore[attr-defined]
        elif kind == "return":
            node.value = ast.copy_location(ast.Constant(None), node)  # type: ignore[attr-defined]
        elif kind == "drop":
            _replace(tree, node, ast.copy_location(ast.Pass(), node))
        ast.fix_missing_locations(tree)
        return tree
    raise IndexError(index)


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                value[next(i for i, v in enumerate(value) if v is old)] = new
                return


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield const
            yield from _code_objects(const)


def _functions(module: types.ModuleType) -> dict[str, types.FunctionType]:
    """qualname -> the live function object, for module functions and methods."""
    found: dict[str, types.FunctionType] = {}

    def visit(obj: Any, depth: int = 0) -> None:
        if depth > 3:
            return
        for value in list(vars(obj).values()):
            for candidate in (value, getattr(value, "__func__", None), getattr(value, "fget", None)):
                if isinstance(candidate, types.FunctionType) and candidate.__module__ == module.__name__:
                    found.setdefault(candidate.__code__.co_qualname, candidate)
            if isinstance(value, type) and value.__module__ == module.__name__:
                visit(value, depth + 1)

    visit(module)
    return found


def install(mutant: Mutant) -> bool:
    """Swap the mutated function's code into the live module; False when it cannot be placed."""
    source = source_of(mutant.path)
    tree = _apply(ast.parse(source, mutant.path), mutant.index)
    module_code = compile(tree, str(ROOT / mutant.path), "exec")
    name = mutant.path.removesuffix(".py").replace("/", ".")
    module = sys.modules.get(name)
    if module is None:
        return False
    live = _functions(module)
    original = compile(source, str(ROOT / mutant.path), "exec")
    before = {c.co_qualname: c for c in _code_objects(original)}
    placed = False
    for code in _code_objects(module_code):
        target = live.get(code.co_qualname)
        if target is None or code.co_qualname not in before:
            continue
        if (
            code.co_code != before[code.co_qualname].co_code
            or code.co_consts != before[code.co_qualname].co_consts
        ):
            try:
                target.__code__ = code
                placed = True
            except ValueError:
                return False
    return placed


# -- which tests run which lines, and the mutants run inside one pytest session --------
class MutationSession:
    """A pytest plugin that takes over the test loop: it runs every fast test once, recording
    which lines of the mutated files each test runs, then forks a child per mutant that swaps
    the mutated code in and runs only the tests that ran its lines, stopping at the first
    failure. Collection and start-up happen once, not once per mutant."""

    def __init__(
        self, files: list[str], mutants: list[Mutant], workers: int, journal: Path | None = None
    ) -> None:
        self.journal = journal
        self.files = {str(ROOT / f) for f in files}
        self.mutants = mutants
        self.workers = workers
        self.current: str | None = None
        self.reached: dict[tuple[str, int], set[str]] = defaultdict(set)
        self.durations: dict[str, float] = {}
        self.failed: list[str] = []
        self.results: dict[Mutant, str] = {}
        self.baseline_s = 0.0
        self.kills: dict[str, int] = defaultdict(int)
        self.verbose = False  # which test failed first, per mutant
        self.stop_requested = False  # set by SIGINT/SIGTERM: finish the running mutants, then report

    def _trace(self, frame: types.FrameType, event: str, _: Any) -> Any:
        # only frames of the mutated files are traced line by line; the rest run untraced
        if event == "call" and self.current is not None and frame.f_code.co_filename in self.files:
            return self._trace_lines
        return None

    def _trace_lines(self, frame: types.FrameType, event: str, _: Any) -> Any:
        if event == "line" and self.current is not None:
            self.reached[(frame.f_code.co_filename, frame.f_lineno)].add(self.current)
        return self._trace_lines

    def pytest_runtestloop(self, session: Any) -> bool:
        from _pytest.runner import runtestprotocol

        items = {item.nodeid: item for item in session.items}
        began = time.monotonic()
        for i, item in enumerate(session.items):
            nextitem = session.items[i + 1] if i + 1 < len(session.items) else None
            self.current = item.nodeid
            sys.settrace(self._trace)
            t = time.monotonic()
            try:
                reports = runtestprotocol(item, nextitem=nextitem, log=False)
            finally:
                sys.settrace(None)
                self.current = None
            self.durations[item.nodeid] = time.monotonic() - t
            if any(r.failed for r in reports):
                self.failed.append(item.nodeid)
        self.baseline_s = time.monotonic() - began
        say(f"fast tests: {len(items)} in {self.baseline_s:.1f} s; {len(self.mutants)} mutants to run")
        if self.failed:
            return True
        self._run_mutants(items, runtestprotocol)
        return True

    def _run_mutants(self, items: dict[str, Any], runtestprotocol: Any) -> None:
        # A seeded shuffle: a run stopped early (Ctrl-C, SIGTERM) has judged a uniform random
        # sample of the mutants, and its table says so; the order changes nothing else.
        queue = random.Random(1).sample(self.mutants, len(self.mutants))
        running: dict[int, tuple[Mutant, float, float, list[str]]] = {}
        while queue or running:
            if self.stop_requested and queue:
                say(f"  stopping: {len(running)} mutants still running, {len(queue)} not started")
                queue.clear()
            while queue and len(running) < self.workers:
                mutant = queue.pop(0)
                tests = self.tests_for(mutant)
                if not tests:
                    self.results[mutant] = "no test reaches it"
                    self._record(mutant)
                    continue
                bound = 10.0 + 3.0 * sum(self.durations.get(t, 0.0) for t in tests)
                pid = os.fork()
                if pid == 0:
                    bounds = [PER_TEST_S + 5.0 * self.durations.get(t, 0.0) for t in tests]
                    _run_child(mutant, [items[t] for t in tests], bounds, runtestprotocol)
                running[pid] = (mutant, time.monotonic(), bound, tests)
            if not running:
                continue
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                for child, (_, began, bound, _tests) in list(running.items()):
                    if time.monotonic() - began > bound:
                        os.kill(child, signal.SIGKILL)
                time.sleep(0.005)
                continue
            mutant, began, bound, tests = running.pop(pid)
            if os.WIFSIGNALED(status):
                self.results[mutant] = (
                    "killed (timeout)" if time.monotonic() - began > bound else "killed (crash)"
                )
            else:
                rc = os.WEXITSTATUS(status)
                self.results[mutant] = {0: "survived", 3: "not placeable", TIMED_OUT: "killed (timeout)"}.get(
                    rc, "killed"
                )
                if rc == 0 and self.verbose:
                    say(f"  survived: {mutant.path}:{mutant.line}  {mutant.description}")
                if rc >= 10 and rc - 10 < len(tests):
                    self.kills[tests[rc - 10]] += 1
            self._record(mutant)
            if len(self.results) % 25 == 0:
                killed = sum(r.startswith("killed") for r in self.results.values())
                say(f"  {len(self.results)}/{len(self.mutants)} mutants, {killed} killed")

    def _record(self, mutant: Mutant) -> None:
        # one line per judged mutant, flushed at once: a run stopped at any point leaves what
        # it judged, and --resume judges again only what was not killed at the same source
        if self.journal is None:
            return
        entry = {
            "path": mutant.path,
            "index": mutant.index,
            "source": source_digest(mutant.path),
            "line": mutant.line,
            "description": mutant.description,
            "result": self.results[mutant],
        }
        with self.journal.open("a") as out:
            out.write(json.dumps(entry) + "\n")

    def tests_for(self, mutant: Mutant) -> list[str]:
        filename = str(ROOT / mutant.path)
        tests: set[str] = set()
        for line in range(mutant.line, max(mutant.line, mutant.end_line) + 1):
            tests |= self.reached.get((filename, line), set())
        # the tests that killed most mutants so far go first, then the quickest: a mutant that
        # dies, dies early; only a survivor runs them all
        return sorted(tests, key=lambda t: (-self.kills[t], self.durations.get(t, 0.0)))


def _run_child(mutant: Mutant, items: list[Any], bounds: list[float], runtestprotocol: Any) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    # Each test gets its own time bound (its unmutated time, traced, five times over): a mutant
    # that makes one test loop is judged in seconds, not after every test's bound added up.
    signal.signal(signal.SIGALRM, lambda *_: os._exit(TIMED_OUT))
    try:
        if not install(mutant):
            os._exit(3)
        for i, item in enumerate(items):
            signal.setitimer(signal.ITIMER_REAL, bounds[i])
            reports = runtestprotocol(item, nextitem=None, log=False)
            signal.setitimer(signal.ITIMER_REAL, 0)
            if any(r.failed for r in reports):
                os._exit(10 + i if i < 240 else 1)  # which test killed it: it goes first next time
    except BaseException:  # a mutant that breaks the machinery itself is caught too
        os._exit(1)
    os._exit(0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="*", help="files or folders to mutate (default: the pure modules)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--show-survivors", action="store_true")
    parser.add_argument(
        "--sample", type=int, default=0, help="a seeded random sample of this many mutants (0: all)"
    )
    parser.add_argument(
        "--journal",
        type=Path,
        help="append each judged mutant to this file (JSON lines) as soon as it is judged",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --journal: count as killed what the journal says was killed at the same "
        "source, and run only the rest",
    )
    args = parser.parse_args()

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    files: list[str] = []
    for p in args.paths or PURE:
        target = ROOT / p
        found = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        files += [str(f.relative_to(ROOT)) for f in found if "_pb2" not in f.name and f.name != "__init__.py"]
    os.environ.setdefault("HYPOTHESIS_PROFILE", "mutation")
    mutants = [m for f in files for m in find_mutants(f)]
    total = len(mutants)
    if args.sample and args.sample < total:
        mutants = sorted(random.Random(0).sample(mutants, args.sample), key=lambda m: (m.path, m.index))

    earlier: dict[Mutant, str] = {}
    if args.resume and args.journal:
        known = killed_before(args.journal)
        earlier = {m: known[(m.path, m.index)] for m in mutants if (m.path, m.index) in known}
        mutants = [m for m in mutants if m not in earlier]
        say(f"{len(earlier)} mutants killed before at the same source (journal); {len(mutants)} to run")

    import pytest

    plugin = MutationSession(files, mutants, args.workers, args.journal)
    plugin.verbose = args.show_survivors

    def stop(*_: Any) -> None:
        plugin.stop_requested = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    pytest.main(
        [*FAST_TESTS, "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--timeout=0"], plugins=[plugin]
    )
    if plugin.failed:
        print(f"the fast tests do not pass unmutated ({plugin.failed}); fix them first", file=sys.stderr)
        return 2
    results = {**earlier, **plugin.results}
    kept: dict[Mutant, str] = {}
    if args.resume and args.journal:
        # A resumed run stopped before it judged every survivor again: those keep the verdict
        # the journal holds (survived), so the table still covers every mutant and can only
        # understate what the tests kill.
        latest = journal_verdicts(args.journal)
        kept = {
            m: latest[(m.path, m.index)] for m in mutants if m not in results and (m.path, m.index) in latest
        }
        if kept:
            say(f"{len(kept)} mutants not judged again keep the journal's verdict")
        results.update(kept)
    placeable = {m: r for m, r in results.items() if r != "not placeable"}
    per_file: dict[str, list[str]] = defaultdict(list)
    for m, r in placeable.items():
        per_file[m.path].append(r)
    judged = len(results)
    sampled = (
        f" (a seeded sample of {len(mutants)} of {total})" if args.sample and len(mutants) < total else ""
    )
    if judged < len(mutants) + len(earlier):
        sampled = f" (stopped early: a random sample of {judged} of {total})"
    print(f"\n{'module':40} {'mutants':>8} {'killed':>8} {'score':>7}{sampled}")
    all_total = killed = 0
    for path in files:
        rs = per_file.get(path, [])
        k = sum(r.startswith("killed") for r in rs)
        all_total += len(rs)
        killed += k
        print(f"{path:40} {len(rs):8} {k:8} {k / len(rs) if rs else 1:7.1%}")
    print(f"{'all':40} {all_total:8} {killed:8} {killed / max(all_total, 1):7.1%}")
    print(
        f"({len(results) - len(placeable)} mutants could not be placed; {time.monotonic() - started:.0f} s"
        + (
            f"; {len(earlier)} counted killed from the journal, {len(plugin.results)} run now, "
            f"{len(kept)} not run again kept the journal's verdict)"
            if earlier
            else ")"
        )
    )
    if args.show_survivors:
        print("\nsurvivors:")
        for m, r in sorted(placeable.items(), key=lambda x: (x[0].path, x[0].line)):
            if not r.startswith("killed"):
                print(f"  {m.path}:{m.line}  {m.description}  [{r}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
