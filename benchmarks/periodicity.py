"""Is the caching allocator's state periodic over a model's layers? Measured, per step.

A replay could skip identical layers if, after a few of them, the allocator's state at each
layer boundary were the one before it up to a shift. This replays the three training steps
of an estimate (first, steady, steady) through ``vramfit.estimate.allocator`` and prints, at
the first point of each block in the forward and the backward of each step: the change of
allocated and reserved bytes since the previous block, the number of free cached blocks and
whether the sizes of the free blocks are the previous boundary's. A state that repeats up to
a shift has the same free-block sizes, unless blocks never used again pile up (the number of
free blocks then grows by the same count each layer); a free-block count that falls layer
after layer is a cache being used up, which no shift repeats. Run from the repository root:

    PYTHONPATH=src python benchmarks/periodicity.py --layers 128 --hidden 1024 --every 8

Each ``--every``-th block is printed; the summary counts, per step and phase, the boundaries
whose free-block sizes repeat the previous boundary's.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections import Counter

from vramfit.config import RunSpec
from vramfit.estimate.allocator import CachingAllocator
from vramfit.estimate.overhead import cublas_workspace_bytes
from vramfit.estimate.profiles.reference import training_steps as reference_training_steps
from vramfit.estimate.schedule import hf_training_steps
from vramfit.estimate.timeline import Timeline

BLOCK = re.compile(r"block (\d+) ")


def _free_sizes(alloc: CachingAllocator) -> tuple[tuple[int, int], ...]:
    sizes = Counter(size for _, _, pool in alloc.pools() for size, _, _ in pool.entries())
    return tuple(sorted(sizes.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--impl", default="hf")
    parser.add_argument("--every", type=int, default=8, help="print every n-th block")
    args = parser.parse_args()
    run = RunSpec.model_validate(
        {"model": {"layers": args.layers, "hidden": args.hidden}, "workload": {"impl": args.impl}}
    )
    spec = run.model.resolved()
    build = hf_training_steps if args.impl == "hf" else reference_training_steps
    first, steady, _ = build(spec, run.workload, cublas_workspace_bytes(None, (9, 0)))
    print(f"$ {shlex.join(['python', *sys.argv])}")
    print(
        f"{'step':<10}{'phase':<10}{'block':>6}{'Δ allocated':>16}{'Δ reserved':>16}"
        f"{'free blocks':>13}  free sizes repeat"
    )
    alloc = CachingAllocator()
    made: set[str] = set()
    summary: dict[tuple[str, str], list[int]] = {}
    for label, timeline in (("first", first), ("steady", steady), ("steady 2", steady)):
        _replay_step(alloc, made, timeline, label, args.every, summary)
    print()
    for (label, phase), (repeats, boundaries) in summary.items():
        print(
            f"{label:<10}{phase:<10} free-block sizes repeat at {repeats} of "
            f"{boundaries} block boundaries"
        )
    return 0


def _replay_step(
    alloc: CachingAllocator,
    made: set[str],
    timeline: Timeline,
    label: str,
    every: int,
    summary: dict[tuple[str, str], list[int]],
) -> None:
    """``timeline.replay``'s rules for one step, stopping at each block's first point."""
    n_points = len(timeline.points)
    starts: dict[int, list] = {}
    for a in timeline.allocations:
        if not (a.persistent and a.name in made):
            starts.setdefault(a.start, []).append(a)
    ends: dict[int, list] = {}
    previous: tuple[str | None, str] = (None, "")
    before = (alloc.allocated, alloc.reserved, _free_sizes(alloc))
    for i, (phase, name) in enumerate(timeline.points):
        match = BLOCK.match(name)
        block = match.group(1) if match else None
        if block is not None and (block, phase) != previous:
            now = (alloc.allocated, alloc.reserved, _free_sizes(alloc))
            counts = summary.setdefault((label, phase), [0, 0])
            counts[0] += now[2] == before[2]
            counts[1] += 1
            if int(block) % every == 0:
                print(
                    f"{label:<10}{phase:<10}{block:>6}{now[0] - before[0]:>16,}"
                    f"{now[1] - before[1]:>16,}{sum(n for _, n in now[2]):>13}  "
                    f"{'yes' if now[2] == before[2] else 'no'}"
                )
            before = now
        previous = (block, phase)
        for a in starts.get(i, ()):
            if a.persistent:
                for size in a.sizes:
                    alloc.take(size)
                made.add(a.name)
            else:
                end = a.end if a.end < n_points - 1 else n_points
                ends.setdefault(end, []).extend(alloc.take(size) for size in a.sizes)
        for b in ends.pop(i, ()):
            alloc.give(b)
    for b in ends.pop(n_points, ()):
        alloc.give(b)


if __name__ == "__main__":
    sys.exit(main())
