"""Start-up time of ``vramfit estimate`` against a bare import of its four dependencies.

All run as whole processes, interleaved in one run so that machine noise hits them alike:

    vramfit --json: python -m vramfit estimate --params 1B --layers 24 --hidden 1024 --seq 128 \
                    --batch 4 --json
    vramfit table:  the same without --json (rich's tables)
    preset and gpu: python -m vramfit estimate --preset llama-3.2-1b --gpu H100 --json (a
                    preset file and the GPU catalog read)
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

``--stages N`` adds where the ``--json`` run's time goes: N more processes of
``benchmarks/startup_stages.py``, which runs the same estimate step by step with a clock read
between the steps (see its docstring), and the median of each step.
"""

from __future__ import annotations

import argparse
import json
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
PRESET_ARGS = ["--preset", "llama-3.2-1b", "--gpu", "H100"]
COMMANDS = {
    "vramfit --json": [sys.executable, "-m", "vramfit", "estimate", *ESTIMATE_ARGS, "--json"],
    "vramfit table": [sys.executable, "-m", "vramfit", "estimate", *ESTIMATE_ARGS],
    "preset and gpu": [sys.executable, "-m", "vramfit", "estimate", *PRESET_ARGS, "--json"],
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


STAGES_SCRIPT = Path(__file__).with_name("startup_stages.py")


def _stages_once(env: dict[str, str]) -> dict[str, float]:
    """One process of startup_stages.py: its stages, shutdown and the rest of its wall, in ms."""
    argv = [sys.executable, str(STAGES_SCRIPT), "estimate", *ESTIMATE_ARGS, "--json"]
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    ended_wall, ended = time.time(), time.perf_counter()
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr}")
    found = json.loads(done.stdout)
    stages = dict(found["stages_ms"])
    stages["shutdown"] = (ended_wall - float(done.stderr.split()[-1])) * 1000
    wall = (ended - began) * 1000
    stages["interpreter, site, rest"] = wall - sum(stages.values())
    stages["(gc, within the stages)"] = found["gc_ms"]
    stages["process wall"] = wall
    return stages


def measure_stages(samples: int, env: dict[str, str]) -> list[str]:
    """Report lines: the median of each stage over ``samples`` processes (after one warm-up)."""
    warm_env = dict(env)
    if "PYTHONPYCACHEPREFIX" in env:
        warm_env.pop("PYTHONDONTWRITEBYTECODE", None)
    _stages_once(warm_env)
    runs = [_stages_once(env) for _ in range(samples)]
    lines = [
        "",
        f"where the --json run's time goes: medians of {samples} processes of "
        f"{STAGES_SCRIPT.name}, ms",
    ]
    for name in runs[0]:
        lines.append(f"  {name:<24} {statistics.median(r[name] for r in runs):7.1f}")
    return lines


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
    parser.add_argument(
        "--stages", type=int, default=0, help="also time the --json run's stages in N processes"
    )
    args = parser.parse_args()
    env = dict(os.environ)
    if args.pycache_prefix is not None:
        env["PYTHONPYCACHEPREFIX"] = str(args.pycache_prefix)
    times = measure(args.repeat, args.warmup, env)
    text, ratio = report(times, shlex.join(["python", *sys.argv]), env)
    if args.stages:
        text += "\n".join(measure_stages(args.stages, env)) + "\n"
    sys.stdout.write(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 1 if args.max_ratio is not None and ratio > args.max_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
