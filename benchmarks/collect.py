"""Collect real GPU memory measurements for the estimator's calibration.

Run on a machine with a CUDA GPU, from the repository root:

    PYTHONPATH=src python3 benchmarks/collect.py --cases benchmarks/cases.yaml \
        --out $OUT/train.jsonl
    PYTHONPATH=src python3 benchmarks/collect.py --matmul --out $OUT/matmul.json

Each case runs ``vramfit.measure.train.measure_train`` in a fresh subprocess, so the CUDA
context and the caching allocator start clean every time. One JSON line per case is
appended to ``--out`` (and flushed) as soon as it finishes:
``{"case": {...}, "result": {TrainMeasurement fields}}`` or ``{"case": {...}, "error": "..."}``.

The cases file is a YAML list; each case has a ``name``, a ``model`` (ModelSpec fields), a
``workload`` (Workload fields), optionally a ``parallel`` layout (Parallel fields: an FSDP2
case runs rank 0 under a fake process group), ``steps`` (default 3) and
``memory_limit_bytes`` (the caching allocator's limit, as on a smaller GPU:
``torch.cuda.set_per_process_memory_fraction``). A tiny example:

    - name: gpt2-small-b4-s512-amp-bf16
      model: {arch: gpt2, layers: 12, hidden: 768}
      workload: {batch: 4, seq: 512, precision: amp-bf16, optimizer: adamw}
    - name: llama-tiny-infer
      model: {arch: llama, layers: 4, hidden: 512, kv_heads: 2}
      workload: {mode: infer, batch: 8, seq: 1024, gen_tokens: 128, precision: bf16}

``--matmul`` runs the seed notebook's matmul cells (measured and predicted bytes) and
``measure_tflops`` for fp32, tf32, fp16 and bf16, and writes one JSON document to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

GIB = 2**30


def _worker() -> int:
    """Child process: read one case as JSON on stdin, print one JSON object on stdout."""
    case = json.loads(sys.stdin.read())
    try:
        from vramfit.config import RunSpec
        from vramfit.errors import VramfitError
        from vramfit.measure.train import measure_train

        run = RunSpec.model_validate(
            {
                "model": case["model"],
                "workload": case.get("workload", {}),
                "parallel": case.get("parallel", {}),
            }
        )
        try:
            result = measure_train(
                run,
                steps=int(case.get("steps", 3)),
                memory_limit_bytes=case.get("memory_limit_bytes"),
            )
        except VramfitError as exc:
            print(json.dumps({"error": str(exc)}))
            return 0
        print(json.dumps({"result": dataclasses.asdict(result)}))
    except Exception:  # a bug: keep the traceback in the record
        print(json.dumps({"error": traceback.format_exc()}))
    return 0


def _load_cases(path: Path) -> list[dict[str, Any]]:
    import yaml

    from vramfit.config import RunSpec

    cases = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cases, list):
        raise SystemExit(f"{path}: expected a YAML list of cases")
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or "name" not in case or "model" not in case:
            raise SystemExit(f"{path}: case {i} needs at least 'name' and 'model'")
        known = {"name", "model", "workload", "parallel", "steps", "memory_limit_bytes"}
        extra = set(case) - known
        if extra:
            raise SystemExit(f"{path}: case {case['name']}: unknown keys {sorted(extra)}")
        # Validate in the parent, so a typo fails before any GPU time is spent.
        RunSpec.model_validate(
            {
                "model": case["model"],
                "workload": case.get("workload", {}),
                "parallel": case.get("parallel", {}),
            }
        )
    return cases


def _run_case(case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker"],
            input=json.dumps(case),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-2000:]
        return {"error": f"worker exited {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def _summary(record: dict[str, Any]) -> str:
    if "error" in record:
        return "error: " + record["error"].strip().splitlines()[-1][:120]
    result = record["result"]
    if result["oom"]:
        return f"OOM at {result['reached']}"
    return (
        f"peak {result['peak_allocated_bytes'] / GIB:.2f} GiB allocated, "
        f"{result['total_bytes'] / GIB:.2f} GiB device used"
    )


def collect_cases(cases_path: Path, out: Path, timeout_s: float, part: slice) -> None:
    cases = _load_cases(cases_path)[part]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as sink:
        for i, case in enumerate(cases, 1):
            began = time.perf_counter()
            record = {"case": case, **_run_case(case, timeout_s)}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            elapsed_s = time.perf_counter() - began
            print(f"[{i}/{len(cases)}] {case['name']}: {_summary(record)} ({elapsed_s:.1f} s)")
            sys.stdout.flush()


def collect_matmul(out: Path) -> None:
    import torch

    from vramfit.measure.matmul import NOTEBOOK_CELLS, measure_matmul, measure_tflops

    cells = []
    for dtype, shape, batch in NOTEBOOK_CELLS:
        cell = dataclasses.asdict(measure_matmul(dtype, shape=shape, batch=batch))
        cells.append(cell)
        mib = {key: cell[key] / 2**20 for key in cell if key.endswith("bytes")}
        print(
            f"{dtype:9} {shape} batch={batch}: allocated {mib['allocated_bytes']:.2f} MiB"
            f" (predicted {mib['predicted_bytes']:.2f}), peak {mib['peak_bytes']:.2f}"
            f" (predicted {mib['predicted_peak_bytes']:.2f}), workspace"
            f" {mib['workspace_bytes']:.3f}"
        )
    tflops = {}
    for dtype in ("fp32", "tf32", "fp16", "bf16"):
        tflops[dtype] = measure_tflops(dtype)
        print(f"{dtype}: {tflops[dtype]:.1f} TFLOP/s")
    document = {
        "device_name": torch.cuda.get_device_name(),
        "compute_capability": list(torch.cuda.get_device_capability()),
        "torch_version": str(torch.__version__),
        "cells": cells,
        "tflops": tflops,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _part(text: str) -> slice:
    first, sep, last = text.partition(":")
    if not (sep and first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last)):
        raise argparse.ArgumentTypeError(f"--part wants FIRST:LAST (1-based), not {text!r}")
    return slice(int(first) - 1, int(last))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, help="YAML list of cases")
    parser.add_argument("--out", type=Path, help="JSONL to append to (JSON with --matmul)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    parser.add_argument(
        "--part",
        type=_part,
        default=slice(None),
        help="FIRST:LAST, 1-based and inclusive: only those cases (one device slot each)",
    )
    parser.add_argument("--matmul", action="store_true", help="run the notebook matmul cells")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker()
    if args.out is None or (args.cases is None) == (not args.matmul):
        parser.error("--out and exactly one of --cases / --matmul are required")
    if args.matmul:
        collect_matmul(args.out)
    else:
        collect_cases(args.cases, args.out, args.timeout, args.part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
