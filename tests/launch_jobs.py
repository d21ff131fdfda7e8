"""Jobs the launcher tests run on every rank (gloo on the CPU): report, die, fail, hang."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def report(request: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    return {"peak_allocated_bytes": request["peaks"][rank], "sum": float(total.item()),
            "pid": os.getpid()}


def die(request: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    if dist.get_rank() == request["rank"]:
        os._exit(3)
    return {"peak_allocated_bytes": 0}


def out_of_memory(request: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    if dist.get_rank() == request["rank"]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore")
    return {"peak_allocated_bytes": 0}


def hang(request: dict[str, Any]) -> dict[str, Any]:
    Path(request["pids"], f"{os.getpid()}").touch()
    time.sleep(600)
    return {}
