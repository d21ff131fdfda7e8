"""Record the caching allocator's real event trace for a few cases (diagnostic).

For each case of a cases file (or the ones named with --only), run ``measure_train`` with
PyTorch's memory history recording on, and save the allocator's device trace: every
``alloc`` / ``free_completed`` / ``segment_alloc`` event with its address and size, as
``[action, addr, size]`` triples. ``vramfit``'s allocator model can then be checked on the
real sequence of requests (``tests/estimate/test_allocator.py`` replays one):

    PYTHONPATH=src python3 benchmarks/trace.py --cases benchmarks/cases.yaml \\
        --only gpt2-124m-b8-s1024-bf16-adamw-flash --out $OUT/traces.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ACTIONS = {"alloc": "a", "free_completed": "f", "segment_alloc": "s", "segment_free": "S"}


def _worker(case: dict) -> dict:
    import torch

    from vramfit.config import RunSpec
    from vramfit.measure.train import measure_train

    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None, stacks="python")
    run = RunSpec.model_validate({"model": case["model"], "workload": case.get("workload", {})})
    result = measure_train(run, steps=int(case.get("steps", 3)))
    snapshot = torch.cuda.memory._snapshot()
    events = [
        [ACTIONS[e["action"]], e["addr"], e["size"]]
        for e in snapshot["device_traces"][0]
        if e["action"] in ACTIONS
    ]
    return {
        "name": case["name"],
        "events": events,
        "reserved_peak_bytes": result.reserved_peak_bytes,
        "peak_allocated_bytes": result.peak_allocated_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=Path)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(sys.stdin.read()))))
        return
    cases = [
        c for c in yaml.safe_load(args.cases.read_text()) if not args.only or c["name"] in args.only
    ]
    traces = []
    for case in cases:
        out = subprocess.run(
            [sys.executable, __file__, "--worker"],
            input=json.dumps(case),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            print(case["name"], "failed:", out.stderr[-2000:])
            continue
        trace = json.loads(out.stdout.strip().splitlines()[-1])
        traces.append(trace)
        print(
            case["name"],
            len(trace["events"]),
            "events, reserved peak",
            trace["reserved_peak_bytes"],
        )
    args.out.write_text(json.dumps(traces))


if __name__ == "__main__":
    main()
