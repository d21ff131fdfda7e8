"""Real multi-GPU runs: torchrun (``torch.distributed.run``) with NCCL on N local GPUs.

``launch`` starts one process per GPU through ``python -m torch.distributed.run --standalone
--nproc-per-node N``, each running ``vramfit.measure.rank`` (``rank_main``): it joins the
process group, measures what the communicator costs (device bytes in use minus PyTorch's
reserved bytes, before and after the first collective: NCCL's buffers live outside PyTorch's
allocator), runs its job, and writes one JSON file. The parent reads every rank's file and
returns them busiest first.

The launch runs in a session of its own, so a timeout or an interrupt kills every rank, and
nothing is left on the GPUs. NVLink multicast stays off in the environment the ranks inherit
(``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``).
Failures come back as one line: too few GPUs (exit 2), a rank out of memory or dead (exit 1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramfit.errors import VramfitError

# what the ranks of a local NVLink machine need left off (multicast objects are not lent)
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
DEFAULT_JOB = "vramfit.measure.rank:measure_job"
RESULT = "rank{rank}.json"


@dataclass
class RankResult:
    """What one rank measured. ``nccl_bytes``: device bytes in use that PyTorch's allocator
    does not hold, after the first collective less before it (the communicator's buffers)."""

    rank: int
    world: int
    backend: str
    nccl_bytes: int
    nccl_version: str | None
    result: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def busiest(self) -> int:
        return int(self.result.get("peak_allocated_bytes", 0))


def visible_gpus() -> int:
    """How many CUDA devices this process can see (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(n: int, visible: int) -> None:
    if n > visible:
        raise VramfitError(
            f"a real {n}-rank run needs {n} GPUs and this machine has {visible}; "
            "on one GPU, measure runs rank 0 under a fake process group instead",
            field="--gpus",
        )


def launch(
    request: dict[str, Any],
    n: int,
    *,
    backend: str = "nccl",
    job: str = DEFAULT_JOB,
    timeout: float = 600.0,
    extra_path: str | None = None,
) -> list[RankResult]:
    """Run ``job`` (``module:function``, called with ``request`` on every rank) on ``n``
    local ranks; their results, the busiest rank first."""
    if backend == "nccl":
        check_gpus(n, visible_gpus())
    with tempfile.TemporaryDirectory(prefix="vramfit-ranks-") as folder:
        out = Path(folder)
        (out / "request.json").write_text(json.dumps({"job": job, "backend": backend,
                                                      "request": request}))
        env = {**os.environ, **NO_MULTICAST}
        paths = [p for p in (extra_path, env.get("PYTHONPATH")) if p]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={n}", "--max-restarts=0",
            "-m", "vramfit.measure.rank", str(out),
        ]
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise VramfitError(
                f"the {n} ranks did not finish in {timeout:g} s; all were stopped",
                field="--gpus", exit_code=1,
            ) from None
        except KeyboardInterrupt:
            _kill(proc)
            raise
        finally:
            _kill(proc)  # whatever the launcher left behind
        return _collect(out, n, proc.returncode, log.decode(errors="replace"))


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Stop the launcher's whole session: torchrun and every rank it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            proc.poll()  # reap the launcher itself: a zombie still counts in its group
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)


def _collect(out: Path, n: int, code: int | None, log: str) -> list[RankResult]:
    results: list[RankResult] = []
    for rank in range(n):
        path = out / RESULT.format(rank=rank)
        if not path.is_file():
            tail = log.strip().splitlines()[-1:] or ["no output"]
            raise VramfitError(
                f"rank {rank} of {n} died before reporting (launcher exit {code}): {tail[0]}",
                field="--gpus", exit_code=1,
            )
        record = json.loads(path.read_text())
        if "error" in record:
            raise VramfitError(f"rank {rank} of {n}: {record['error']}", field="--gpus",
                               exit_code=1)
        results.append(RankResult(**record))
    return sorted(results, key=lambda r: (-r.busiest, r.rank))
