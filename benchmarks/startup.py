"""Start-up time of ``vramfit estimate`` against a bare import of its four dependencies.

All run as whole processes, interleaved in one run so that machine noise hits them alike:

    vramfit --json: python -m vramfit estimate --params 1B --layers 24 --hidden 1024 --seq 128 \
                    --batch 4 --json
    vramfit table:  the same without --json (rich's tables)
    baseline:       python -c "import typer, rich, pydantic, yaml"

It prints the median (and minimum) wall time of each and the ratio of the medians to the
baseline; the target is <= 1.3x for ``--json``. Run from the repository root with vramfit
installed (``pip install -e '.[dev]'``):

    python benchmarks/startup.py --repeat 40 --out benchmarks/data/startup.txt

The report's first line is the command that produced it. ``--max-ratio R`` exits 1 when the
``--json`` ratio is above R. Python compiles a module at every import when it may not write its
bytecode (``PYTHONDONTWRITEBYTECODE=1``) and none is cached: installed wheels come compiled,
a source checkout does not. The report says which case it measured; ``--pycache-prefix DIR``
runs every command with its bytecode cached under DIR (``PYTHONPYCACHEPREFIX``, written on
the warm-up runs), as an installed vramfit would have it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ESTIMATE_ARGS = ["--params", "1B", "--layers", "24", "--hidden", "1024", "--seq", "128"]
ESTIMATE_ARGS += ["--batch", "4"]
COMMANDS = {
    "vramfit --json": [sys.executable, "-m", "vramfit", "estimate", *ESTIMATE_ARGS, "--json"],
    "vramfit table": [sys.executable, "-m", "vramfit", "estimate", *ESTIMATE_ARGS],
    "bare import": [sys.executable, "-c", "import typer, rich, pydantic, yaml"],
}
TARGET = "vramfit --json"
TARGET_RATIO = 1.3


def _time_once(argv: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, env=env
    )
    elapsed_s = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    return elapsed_s


def measure(repeat: int, warmup: int, env: dict[str, str]) -> dict[str, list[float]]:
    """Wall seconds per command: ``warmup`` untimed rounds, then ``repeat`` interleaved ones."""
    warm_env = dict(env)
    if "PYTHONPYCACHEPREFIX" in env:  # the warm-up runs write the bytecode cache
        warm_env.pop("PYTHONDONTWRITEBYTECODE", None)
    for _ in range(warmup):
        for argv in COMMANDS.values():
            _time_once(argv, warm_env)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeat):
        for name, argv in COMMANDS.items():
            times[name].append(_time_once(argv, env))
    return times


def _bytecode(env: dict[str, str]) -> str:
    if "PYTHONPYCACHEPREFIX" in env:
        return "bytecode cached under --pycache-prefix for every module"
    if env.get("PYTHONDONTWRITEBYTECODE"):
        return (
            "PYTHONDONTWRITEBYTECODE is set: vramfit's own modules are compiled at every run "
            "unless their bytecode is cached; the dependencies' came with their wheels"
        )
    return "bytecode written and reused as Python does by default"


def report(
    times: dict[str, list[float]], command_line: str, env: dict[str, str]
) -> tuple[str, float]:
    """The report text and the ratio of the medians (vramfit --json / bare import)."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: medians[name] / medians["bare import"] for name in COMMANDS}
    ratio = ratios[TARGET]
    versions = ", ".join(
        f"{package} {metadata.version(package)}"
        for package in ("typer", "rich", "pydantic", "PyYAML")
    )
    lines = [
        f"$ {command_line}",
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {versions}",
        f"{len(next(iter(times.values())))} interleaved runs of each, after warm-up; "
        + _bytecode(env),
        "",
    ]
    for name, argv in COMMANDS.items():
        shown = shlex.join(["python", *argv[1:]])
        lines.append(
            f"{name:<15} median {medians[name] * 1000:7.1f} ms   "
            f"min {min(times[name]) * 1000:7.1f} ms   {ratios[name]:.2f}x   {shown}"
        )
    verdict = "within" if ratio <= TARGET_RATIO else "ABOVE"
    lines.append("")
    lines.append(f"ratio of medians, {TARGET}: {ratio:.2f}x ({verdict} the {TARGET_RATIO}x target)")
    return "\n".join(lines) + "\n", ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed runs of each command")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each first")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--max-ratio", type=float, help="exit 1 when the ratio is above this")
    parser.add_argument(
        "--pycache-prefix", type=Path, help="cache every module's bytecode under this directory"
    )
    args = parser.parse_args()
    env = dict(os.environ)
    if args.pycache_prefix is not None:
        env["PYTHONPYCACHEPREFIX"] = str(args.pycache_prefix)
    times = measure(args.repeat, args.warmup, env)
    text, ratio = report(times, shlex.join(["python", *sys.argv]), env)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 1 if args.max_ratio is not None and ratio > args.max_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
