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


LIBRARIES = ("vramfit", "torch/", "transformers/", "peft/", "bitsandbytes/", "accelerate/")


def _where(frames: list[dict]) -> str:
    """The innermost frames of vramfit's reference model or of the libraries it runs (torch,
    transformers, peft, bitsandbytes, accelerate: a quantized load's requests are theirs) that
    made an event: ``file:line name`` joined by " < ", innermost first."""
    keep = [
        f"{Path(f['filename']).name}:{f['line']} {f['name']}"
        for f in frames
        if any(lib in f["filename"] for lib in LIBRARIES)
    ]
    return " < ".join(keep[:6])


def _where_cpp(frames: list[dict]) -> str:
    """For a C++ stack (``--cpp``): the autograd node and the ATen ops that made the request,
    innermost first, then the reference model's Python lines. Backward runs on autograd's
    own thread, which has no Python frames; this names its requests too."""
    names = [f["name"] for f in frames]
    node = next((n.split("(")[0].split("::")[-1] for n in names if "Backward" in n), "")
    ops = []
    for n in names:
        if n.startswith("at::_ops::"):
            op = n.split("(")[0].removeprefix("at::_ops::").split("::")[0]
            if op not in ops:
                ops.append(op)
    python = _where([f for f in frames if f["filename"].endswith(".py")])
    return " < ".join(x for x in (node, " < ".join(ops[:3]), python) if x)


def _worker(case: dict, frames: bool, cpp: bool = False) -> dict:
    import torch

    from vramfit.config import RunSpec
    from vramfit.measure.train import measure_train

    torch.cuda.memory._record_memory_history(
        max_entries=2_000_000,
        context="all" if frames or cpp else None,
        stacks="all" if cpp else "python",
    )
    run = RunSpec.model_validate(
        {
            "model": case["model"],
            "workload": case.get("workload", {}),
            "parallel": case.get("parallel", {}),  # rank 0 under a fake process group
        }
    )
    result = measure_train(
        run, steps=int(case.get("steps", 3)), memory_limit_bytes=case.get("memory_limit_bytes")
    )
    snapshot = torch.cuda.memory._snapshot()
    events, streams, places, index = [], [], [], {}
    for e in snapshot["device_traces"][0]:
        if e["action"] not in ACTIONS:
            continue
        event = [ACTIONS[e["action"]], e["addr"], e["size"]]
        if frames or cpp:  # a 4th field: index into "places", where the event came from
            where = (_where_cpp if cpp else _where)(e.get("frames", []))
            if where not in index:
                index[where] = len(places)
                places.append(where)
            event.append(index[where])
        events.append(event)
        streams.append(e.get("stream", 0))
    out = {
        "name": case["name"],
        "events": events,
        "reserved_peak_bytes": result.reserved_peak_bytes,
        "peak_allocated_bytes": result.peak_allocated_bytes,
        "memory_limit_bytes": case.get("memory_limit_bytes"),
        "alloc_retries": result.alloc_retries,
        "oom": result.oom,
    }
    if any(streams):  # FSDP2's all-gather and reduce-scatter streams: each event's stream
        out["streams"] = streams
    if frames or cpp:
        out["places"] = places
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=Path)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case")
    parser.add_argument(
        "--frames", action="store_true", help="label each event with the source line behind it"
    )
    parser.add_argument(
        "--cpp",
        action="store_true",
        help="label each allocation with its autograd node and ATen ops (C++ stacks; slow)",
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(sys.stdin.read()), args.frames, args.cpp)))
        return
    cases = [
        c for c in yaml.safe_load(args.cases.read_text()) if not args.only or c["name"] in args.only
    ]
    traces = []
    for case in cases:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                *(["--frames"] if args.frames else []),
                *(["--cpp"] if args.cpp else []),
            ],
            input=json.dumps(case),
            capture_output=True,
            text=True,
            timeout=args.timeout,
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
