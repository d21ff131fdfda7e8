"""Wall and CPU time of ``vramfit plan`` up to 1,024 GPUs, in one process.

Each case is ``vramfit plan ... --json`` through the command line's ``main`` (validation, the
search and the JSON output are timed, not Python's start-up), a few times; the report gives the
median wall and CPU seconds and how many layouts were judged. Run from the repository root:

    PYTHONPATH=src python benchmarks/plan_speed.py --out benchmarks/data/plan-speed.txt

Target: under 1 s for every case (issue: "over 1,024 GPUs it answers in under 1 s").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

CASES = [  # preset, gpu, gpus, extra arguments
    ("llama-3.1-8b", "H100", 8, []),
    ("llama-3.1-70b", "H100", 64, []),
    ("llama-3.1-70b", "H100", 1024, []),
    ("llama-3.1-70b", "H100", 1024, ["--batch", "8", "--seq", "4096"]),
    ("llama-3.1-405b", "H100", 1024, []),
    ("llama-3.1-405b", "H200", 1024, ["--batch", "16", "--seq", "8192"]),
]
RUNS = 3


def _one(args: list[str]) -> tuple[float, float, dict]:
    from vramfit.cli import main

    out = io.StringIO()
    wall, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(args)
    return time.perf_counter() - wall, time.process_time() - cpu, json.loads(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"python {platform.python_version()}, {os.cpu_count()} CPUs; load average {load:.2f}",
        "",
        f"{'case':52s} {'runs':>4s} {'wall s':>7s} {'cpu s':>7s} {'layouts':>8s} {'fit':>4s}",
    ]
    _one(["plan", "--preset", "gpt2", "--gpu", "H100", "--gpus", "8", "--json"])  # warm-up
    worst = 0.0
    for preset, gpu, gpus, extra in CASES:
        argv_ = ["plan", "--preset", preset, "--gpu", gpu, "--gpus", str(gpus), *extra, "--json"]
        times = [_one(argv_) for _ in range(RUNS)]
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        doc = times[0][2]
        n = len(doc["fits"]) + len(doc["does_not_fit"])
        worst = max(worst, wall)
        name = f"{preset} {gpus}x{gpu} {' '.join(extra)}".strip()
        lines.append(f"{name:52s} {RUNS:4d} {wall:7.2f} {cpu:7.2f} {n:8d} {len(doc['fits']):4d}")
    lines += ["", f"slowest: {worst:.2f} s (target < 1 s)"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(f"$ PYTHONPATH=src python benchmarks/plan_speed.py\n{text}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
