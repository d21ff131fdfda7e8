"""Wall and CPU time of 512-layer estimates and of ``--solve``, in one process.

Each case is ``vramfit estimate ... --json``, run through the command line's ``main`` (so the
estimate, its validation and its JSON output are timed, not Python's start-up), a few times;
the report gives the median wall and CPU seconds of each. Run from the repository root:

    python benchmarks/speed.py --out benchmarks/data/speed.txt

``--label`` names the code measured, ``--append`` adds the report to ``--out`` instead of
replacing it (to keep a before and an after side by side: run the older checkout with
``PYTHONPATH=<its src>``). The machine's load average is printed with the results: other
processes on the same cores slow every case alike.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

L512 = ["--layers", "512"]
CASES: list[tuple[str, list[str], int]] = [  # name, arguments, runs
    ("train llama h64", [*L512, "--hidden", "64"], 3),
    ("train llama h1024 full ckpt", [*L512, "--hidden", "1024", "--checkpointing", "full"], 3),
    (
        "train gpt2 h768 eager b8 s1024",
        [*L512, "--hidden", "768", "--arch", "gpt2", "--attention", "eager"]
        + ["--seq", "1024", "--batch", "8"],
        3,
    ),
    ("train llama-3-8b", ["--preset", "llama-3-8b", *L512], 3),
    (
        "qlora llama-3-8b r16 nf4",
        ["--preset", "llama-3-8b", *L512, "--lora-rank", "16"] + ["--quant", "nf4"],
        3,
    ),
    (
        "infer llama h1024 gen 128",
        [*L512, "--hidden", "1024", "--mode", "infer", "--gen-tokens", "128"],
        3,
    ),
    ("reference train llama h64", [*L512, "--hidden", "64", "--impl", "reference"], 3),
    (
        "reference h1024 fp32 selective",
        [*L512, "--hidden", "1024", "--precision", "fp32", "--checkpointing", "selective"]
        + ["--impl", "reference"],
        3,
    ),
    ("solve seq h64 MI300X", [*L512, "--hidden", "64", "--solve", "seq", "--gpu", "MI300X"], 1),
    (
        "solve batch h64 MI300X",
        [*L512, "--hidden", "64", "--solve", "batch", "--gpu", "MI300X"],
        1,
    ),
    (
        "solve batch llama-3-8b H200",
        ["--preset", "llama-3-8b", "--solve", "batch", "--gpu", "H200"],
        1,
    ),
]


def _run(argv: list[str]) -> tuple[float, float]:
    from vramfit.cli import main

    wall, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(["estimate", *argv, "--json"])
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--append", action="store_true", help="append to --out")
    parser.add_argument("--label", default="", help="what code this measures")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    args = parser.parse_args()
    import vramfit

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = Path(vramfit.__file__).resolve().parent
    if where.is_relative_to(Path.cwd()):
        where = where.relative_to(Path.cwd())
    lines = [
        f"$ {shlex.join(['python', *sys.argv])}",
        f"{args.label or 'vramfit'} ({where}); python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs; load average {load:.2f} at start",
        "",
        f"{'case':<34} {'runs':>4} {'wall s':>8} {'cpu s':>8}   vramfit estimate ... --json",
    ]
    print("\n".join(lines), flush=True)
    for name, argv, runs in CASES:
        if args.only and args.only not in name:
            continue
        times = [_run(argv) for _ in range(runs)]
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        line = f"{name:<34} {runs:>4} {wall:8.2f} {cpu:8.2f}   {shlex.join(argv)}"
        lines.append(line)
        print(line, flush=True)
    text = "\n".join(lines) + "\n\n"
    if args.out is not None:
        with args.out.open("a" if args.append else "w", encoding="utf-8") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
