"""One rank of a ``vramfit.measure.launch`` run: ``python -m vramfit.measure.rank FOLDER``.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. The rank joins the process group,
records the device bytes in use that PyTorch's allocator does not hold before and after its
first collective (the difference is what the communicator allocated: NCCL's buffers), runs
the requested job and writes ``FOLDER/rank<r>.json``, or ``{"error": ...}`` in one line. It
writes through a temporary name, so the parent never reads half a file.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from vramfit.errors import VramfitError
from vramfit.measure.launch import NO_MULTICAST, RESULT


def _outside_allocator(torch: Any, cuda: bool) -> int:
    """Device bytes in use that PyTorch's caching allocator does not hold."""
    if not cuda:
        return 0
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def measure_job(request: dict[str, Any]) -> dict[str, Any]:
    """``measure_train`` of ``request["run"]`` on this rank's GPU, with the real group."""
    import dataclasses

    from vramfit.config import RunSpec
    from vramfit.measure.train import measure_train

    run = RunSpec.model_validate(request["run"])
    return dataclasses.asdict(measure_train(run, steps=int(request.get("steps", 3))))


def _run(spec: dict[str, Any], rank: int, local: int, world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    backend = spec["backend"]
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    try:
        before = _outside_allocator(torch, cuda)
        probe = torch.ones(1, device=f"cuda:{local}" if cuda else "cpu")
        dist.all_reduce(probe)
        after = _outside_allocator(torch, cuda)
        if int(probe.item()) != world:
            raise VramfitError(f"the first all-reduce summed {probe.item()}, not {world}")
        del probe
        module, name = spec["job"].split(":")
        result = getattr(importlib.import_module(module), name)(spec["request"])
        nccl = torch.cuda.nccl.version() if cuda else None
        return {
            "rank": rank,
            "world": world,
            "backend": backend,
            "nccl_bytes": after - before,
            "nccl_version": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            "result": result,
            "env": {k: os.environ.get(k, "") for k in NO_MULTICAST},
        }
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    folder = Path(argv[1])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    world = int(os.environ["WORLD_SIZE"])
    spec = json.loads((folder / "request.json").read_text())
    try:
        record = _run(spec, rank, local, world)
    except VramfitError as exc:
        record = {"error": str(exc)}
    except Exception as exc:  # one line for the parent; out of memory is the expected one
        if type(exc).__name__ == "OutOfMemoryError":
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            record = {"error": f"out of memory: {first}"}
        else:
            last = traceback.format_exc().strip().splitlines()[-1]
            record = {"error": f"{type(exc).__name__}: {last}"}
    target = folder / RESULT.format(rank=rank)
    partial = target.with_suffix(".part")
    partial.write_text(json.dumps(record))
    partial.replace(target)
    return 0 if "error" not in record else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
