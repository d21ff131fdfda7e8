"""Runs whose segments outgrow the GPU: the allocator's cache flushes, predicted and measured.

When a cudaMalloc fails, PyTorch's caching allocator frees every cached segment that holds
no block and retries (``num_alloc_retries``); the run goes on as long as what is in use
fits. vramfit replays a step within the room the GPU grants (``vramfit.estimate.core``):

    python benchmarks/flushes.py --predict benchmarks/flush-validation.yaml

prints, per case, what it predicts on the H200: fits or where it runs out of memory, the
retries, the peak allocated, the most reserved and the total where nothing limits the
allocator. A case may set ``memory_limit_bytes``: the allocator's own limit
(``torch.cuda.set_per_process_memory_fraction``), as on a GPU that much smaller; the
measurement (``benchmarks/collect.py``) runs it under the same limit. Then

    python benchmarks/flushes.py --compare MEASURED.jsonl

prints predicted against measured for every case measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vramfit.catalog import find_gpu
from vramfit.config import RunSpec
from vramfit.estimate.core import Estimate, Hardware, estimate

GIB = 2**30


def _predict(case: dict, memory_bytes: int) -> Estimate:
    run = RunSpec(
        model=case["model"], workload=case.get("workload", {}), parallel=case.get("parallel", {})
    )
    hardware = Hardware(
        name="H200-SXM",
        memory_bytes=memory_bytes,
        compute_capability=(9, 0),
        allocator_limit_bytes=case.get("memory_limit_bytes"),
    )
    return estimate(run, hardware)


def _reserved(est: Estimate) -> int:
    return est.peak_allocated_bytes + est.breakdown.get("allocator_reserve", 0)


def _verdict(fits: bool, where: str | None) -> str:
    return "fits" if fits else f"OOM at {where or '?'}"


def predict(cases_file: Path) -> int:
    import yaml

    memory = find_gpu("H200").memory_bytes
    for case in yaml.safe_load(cases_file.read_text()):
        est = _predict(case, memory)
        limit = case.get("memory_limit_bytes")
        unlimited = est.unflushed_total_bytes
        print(
            f"{case['name']}: limit {'none' if limit is None else f'{limit / GIB:.2f} GiB'}; "
            f"{_verdict(bool(est.fits), est.out_of_memory)}; retries {est.cache_flushes}; "
            f"peak allocated {est.peak_allocated_bytes:,} ({est.peak_allocated_bytes / GIB:.2f} "
            f"GiB); reserved {_reserved(est):,} ({_reserved(est) / GIB:.2f} GiB); total "
            f"{est.total_bytes / GIB:.2f} GiB"
            + ("" if unlimited is None else f"; unlimited total {unlimited / GIB:.2f} GiB")
        )
    return 0


def compare(paths: list[Path]) -> int:
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            case = record["case"]
            if "result" not in record:
                print(f"{case['name']}: not measured ({record.get('error', '?')[-200:]})")
                continue
            measured = record["result"]
            est = _predict(case, measured["device_total_bytes"])
            print(f"{case['name']}:")
            print(
                f"  predicted {_verdict(bool(est.fits), est.out_of_memory)}, retries "
                f"{est.cache_flushes}, peak {est.peak_allocated_bytes:,}, reserved "
                f"{_reserved(est):,}"
            )
            print(
                f"  measured  {_verdict(not measured['oom'], measured['reached'])}, retries "
                f"{measured.get('alloc_retries')}, peak {measured['peak_allocated_bytes']:,}, "
                f"reserved {measured['reserved_peak_bytes']:,}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict", type=Path, help="a cases file: print predictions")
    parser.add_argument("--compare", type=Path, nargs="+", help="measured jsonl files")
    args = parser.parse_args(argv)
    if args.predict:
        return predict(args.predict)
    if args.compare:
        return compare(args.compare)
    parser.error("give --predict or --compare")
    return 2


if __name__ == "__main__":
    sys.exit(main())
