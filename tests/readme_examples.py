"""The README's ```console examples, run for real.

Every ``$ vramfit ...`` command in a console block that needs no GPU (not ``measure``) is run
in-process at 80 columns (what a pipe or a log gets), and every ``$ python benchmarks/...``
command (they read committed measurements) in a child process; its stdout is what the block must
show: line for line, or, where the block's output starts with ``...``, its last lines. A
command shown without output is run too (it must not fail with a usage error) but not
compared. ``tests/test_readme.py`` holds the README to this; after a change to the estimator
or the tables, regenerate the blocks with one command:

    PYTHONPATH=src python tests/readme_examples.py

(``--check`` only reports, and exits 1 when a block is out of date.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WIDTH = "80"
ELISION = "..."

_BLOCK = re.compile(r"^```console\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass
class Example:
    """One ``$ command`` line (with its ``\\`` continuations) and the output shown under it."""

    command_lines: list[str]
    output: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        text = " ".join(line.removeprefix("$ ").rstrip("\\").strip() for line in self.command_lines)
        return shlex.split(text, comments=True)

    @property
    def runnable(self) -> bool:
        argv = self.argv
        if argv[:1] == ["python"]:
            return len(argv) > 1 and argv[1].startswith("benchmarks/")
        return argv[:1] == ["vramfit"] and argv[1:2] != ["measure"]

    @property
    def elided(self) -> bool:
        return self.output[:1] == [ELISION]

    def text(self) -> str:
        return "".join(f"{line}\n" for line in (*self.command_lines, *self.output))


def parse_block(body: str) -> list[Example]:
    examples: list[Example] = []
    continued = False
    for line in body.splitlines():
        if line.startswith("$ ") and not continued:
            examples.append(Example([line]))
        elif continued:
            examples[-1].command_lines.append(line)
        else:
            examples[-1].output.append(line)
        continued = line.endswith("\\") and not examples[-1].output
    return examples


def blocks(text: str) -> list[tuple[re.Match[str], list[Example]]]:
    return [(match, parse_block(match.group(1))) for match in _BLOCK.finditer(text)]


def benchmark(path: str) -> Any:
    """A script under benchmarks/ imported once per process (``main(argv)`` runs it)."""
    name = "_benchmark_" + Path(path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# the pytest-xdist group of the tests that run benchmarks/accuracy.py (addopts: --dist
# loadgroup): one worker runs them all, so each case is estimated once (run_benchmark)
MEASURED_TABLES = "measured-tables"


def run_benchmark(path: str, args: list[str]) -> tuple[int, list[str], str]:
    """``python <path> args`` from the checkout, in this process: (exit code, stdout lines,
    stderr). benchmarks/accuracy.py remembers its estimates, so tables that share cases
    (the README's and the committed ones) are estimated once per test run."""
    out, err = io.StringIO(), io.StringIO()
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = benchmark(path).main(args)
    finally:
        os.chdir(cwd)
    return code, [line.rstrip() for line in out.getvalue().splitlines()], err.getvalue()


def run(argv: list[str]) -> tuple[int, list[str], str]:
    """``vramfit argv[1:]`` in-process at 80 columns, or ``python benchmarks/...`` in a child
    process: (exit code, stdout lines, stderr)."""
    if argv[0] == "python" and argv[1:2] == ["benchmarks/accuracy.py"]:
        return run_benchmark(argv[1], argv[2:])
    if argv[0] == "python":
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": WIDTH, "NO_COLOR": "1"}
        done = subprocess.run(
            [sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True
        )
        return done.returncode, [line.rstrip() for line in done.stdout.splitlines()], done.stderr
    from vramfit.cli import main

    saved = {name: os.environ.get(name) for name in ("COLUMNS", "TERMINAL_WIDTH", "NO_COLOR")}
    os.environ.update(COLUMNS=WIDTH, TERMINAL_WIDTH=WIDTH, NO_COLOR="1")
    out, err = io.StringIO(), io.StringIO()
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)  # paths in the README are relative to the checkout
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv[1:])
                code = 0
            except SystemExit as exit:
                code = int(exit.code or 0)
    finally:
        os.chdir(cwd)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return code, [line.rstrip() for line in out.getvalue().splitlines()], err.getvalue()


def expected_output(example: Example, real: list[str]) -> list[str]:
    """What the block should show under ``example`` given the command's real stdout."""
    if not example.output:
        return []
    if example.elided:
        kept = len(example.output) - 1
        return [ELISION, *real[len(real) - kept :]] if kept else [ELISION]
    return real


def regenerate(text: str) -> str:
    """``text`` (the README) with every runnable example's output replaced by the real one."""
    pieces, last = [], 0
    for match, examples in blocks(text):
        for example in examples:
            if example.runnable and example.output:
                _, real, _ = run(example.argv)
                example.output = expected_output(example, real)
        pieces += [text[last : match.start(1)], "".join(e.text() for e in examples)]
        last = match.end(1)
    return "".join(pieces) + text[last:]


def main() -> int:
    text = README.read_text(encoding="utf-8")
    new = regenerate(text)
    if new == text:
        print("README.md examples are up to date")
        return 0
    if "--check" in sys.argv[1:]:
        print(
            "README.md examples are out of date: run PYTHONPATH=src python tests/readme_examples.py"
        )
        return 1
    README.write_text(new, encoding="utf-8")
    print("README.md examples rewritten from the real output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
