"""Start-up time of ``vramfit estimate`` against a bare import of its four dependencies.

Both run as whole processes, interleaved in one run so that machine noise hits both alike:

    vramfit:  python -m vramfit estimate --params 1B --layers 24 --hidden 1024 --seq 128 --batch 4
    baseline: python -c "import typer, rich, pydantic, yaml"

It prints the median (and minimum) wall time of each and the ratio of the medians; the target is
<= 1.3x. Run from the repository root with vramfit installed (``pip install -e '.[dev]'``):

    python benchmarks/startup.py --repeat 40 --out benchmarks/data/startup.txt

The report's first line is the command that produced it. ``--max-ratio R`` exits 1 when the ratio
is above R.
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
    "vramfit estimate": [sys.executable, "-m", "vramfit", "estimate", *ESTIMATE_ARGS],
    "bare import": [sys.executable, "-c", "import typer, rich, pydantic, yaml"],
}
TARGET_RATIO = 1.3


def _time_once(argv: list[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed_s = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    return elapsed_s


def measure(repeat: int, warmup: int) -> dict[str, list[float]]:
    """Wall seconds per command: ``warmup`` untimed rounds, then ``repeat`` interleaved ones."""
    for _ in range(warmup):
        for argv in COMMANDS.values():
            _time_once(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeat):
        for name, argv in COMMANDS.items():
            times[name].append(_time_once(argv))
    return times


def report(times: dict[str, list[float]], command_line: str) -> tuple[str, float]:
    """The report text and the ratio of the medians (vramfit / bare import)."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["vramfit estimate"] / medians["bare import"]
    versions = ", ".join(
        f"{package} {metadata.version(package)}"
        for package in ("typer", "rich", "pydantic", "PyYAML")
    )
    lines = [
        f"$ {command_line}",
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {versions}",
        f"{len(next(iter(times.values())))} interleaved runs of each, after warm-up",
        "",
    ]
    for name, argv in COMMANDS.items():
        shown = shlex.join(["python", *argv[1:]])
        lines.append(
            f"{name:<17} median {medians[name] * 1000:7.1f} ms   "
            f"min {min(times[name]) * 1000:7.1f} ms   {shown}"
        )
    verdict = "within" if ratio <= TARGET_RATIO else "ABOVE"
    lines.append("")
    lines.append(f"ratio of medians: {ratio:.2f}x ({verdict} the {TARGET_RATIO}x target)")
    return "\n".join(lines) + "\n", ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed runs of each command")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each first")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--max-ratio", type=float, help="exit 1 when the ratio is above this")
    args = parser.parse_args()
    times = measure(args.repeat, args.warmup)
    text, ratio = report(times, shlex.join(["python", *sys.argv]))
    sys.stdout.write(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 1 if args.max_ratio is not None and ratio > args.max_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
