"""Predicted vs measured GPU memory, per case, for the default estimator.

Reads the measurements committed under ``benchmarks/data/`` (``train.jsonl`` files written
by ``benchmarks/collect.py`` on a real GPU), runs ``vramfit``'s estimate for each case on
the same GPU, and prints per case the predicted and measured ``peak_allocated_bytes``
(torch.cuda.max_memory_allocated) and ``total_bytes`` (device used), the signed errors,
and the median and max absolute error of each:

    python benchmarks/accuracy.py benchmarks/data/h200-run1/train.jsonl [more.jsonl ...]

``--predict CASES.yaml`` prints only the predictions for a cases file on the H200, to be
committed before those cases are measured (a blind validation):

    python benchmarks/accuracy.py --predict benchmarks/validation3.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from vramfit.catalog import find_gpu
from vramfit.config import RunSpec
from vramfit.estimate.core import Estimate, Hardware, estimate

GIB = 2**30


def workload_of(case: dict) -> dict:
    """A case's workload. Cases measured before implementation profiles existed ran
    vramfit's reference loop: they name no ``impl``."""
    return {"impl": "reference", **case.get("workload", {})}


_ESTIMATES: dict[tuple[str, Hardware], Estimate] = {}


def _estimate(run: RunSpec, hardware: Hardware) -> Estimate:
    """``estimate``, remembered: the tests print several tables over the same cases in one
    process (the estimator is pure, so a case's estimate never changes within it)."""
    key = (run.model_dump_json(), hardware)
    if key not in _ESTIMATES:
        _ESTIMATES[key] = estimate(run, hardware)
    return _ESTIMATES[key]


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if "result" in record and not record["result"]["oom"]:
                    rows.append(record)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--phases", action="store_true", help="also print per-phase peaks")
    parser.add_argument("--predict", type=Path, help="a cases file: print predictions only")
    args = parser.parse_args(argv)
    if args.predict:
        return predict(args.predict)
    errors: dict[str, list[float]] = {"peak_allocated_bytes": [], "total_bytes": []}
    header = f"{'peak alloc GiB (pred/meas)':>28s} {'err':>7s} {'total GiB (pred/meas)':>24s}"
    print(f"{'case':58s} {header} {'err':>7s}")
    for record in load(args.files):
        case, measured = record["case"], record["result"]
        gpu = find_gpu(measured["device_name"])
        hardware = Hardware(
            name=gpu.name, memory_bytes=measured["device_total_bytes"], compute_capability=(9, 0)
        )
        run = RunSpec(
            model=case["model"], workload=workload_of(case), parallel=case.get("parallel", {})
        )
        est = _estimate(run, hardware)
        predicted = {
            "peak_allocated_bytes": est.peak_allocated_bytes,
            # a fake process group allocates no NCCL memory (zero on one GPU)
            "total_bytes": est.total_bytes - est.nccl_bytes,
        }
        cells = []
        for key in errors:
            err = (predicted[key] - measured[key]) / measured[key] * 100
            errors[key].append(err)
            cells.append(f"{predicted[key] / GIB:12.2f} / {measured[key] / GIB:8.2f}  {err:+6.1f}%")
        print(f"{case['name'][:58]:58s} {cells[0]:>36s} {cells[1]:>33s}")
        if args.phases:
            pred = {k: round(v / GIB, 2) for k, v in est.phases.items()}
            meas = {k: round(v / GIB, 2) for k, v in measured["phases"].items()}
            print(f"    predicted {pred}\n    measured  {meas}")
    print()
    for key, values in errors.items():
        absolute = [abs(v) for v in values]
        print(
            f"{key}: {len(values)} cases, median |error| {statistics.median(absolute):.1f}%, "
            f"max |error| {max(absolute):.1f}%"
        )
    return 0


def predict(cases_file: Path) -> int:
    import yaml

    gpu = find_gpu("H200")
    hardware = Hardware(name=gpu.name, memory_bytes=gpu.memory_bytes, compute_capability=(9, 0))
    for case in yaml.safe_load(cases_file.read_text()):
        run = RunSpec(
            model=case["model"],
            workload=case.get("workload", {}),
            parallel=case.get("parallel", {}),
        )
        est = estimate(run, hardware)
        line = (
            f"{case['name'][:58]:58s} peak {est.peak_allocated_bytes / GIB:8.2f} "
            f"total {est.total_bytes / GIB:8.2f}"
        )
        if "parallel" in case:  # the device total a fake process group can show, and phases
            phases = " ".join(f"{k} {v / GIB:.2f}" for k, v in est.phases.items())
            line += f" less-nccl {(est.total_bytes - est.nccl_bytes) / GIB:8.2f} | {phases}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
