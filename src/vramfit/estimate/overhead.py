"""Memory outside the model's own tensors: cuBLAS workspaces, CUDA context, allocator slack.

These decide an out-of-memory as much as the tensors do, yet
``torch.cuda.max_memory_allocated`` sees only the workspaces (PyTorch allocates them
through its caching allocator). Figures marked "measured" come from this project's runs
committed under ``benchmarks/data/``.
"""

from __future__ import annotations

import re

from vramfit.errors import VramfitError

MIB = 2**20


MEASURED_TORCH = (2, 11)  # the PyTorch version every figure marked "measured" comes from

_CONFIG_RE = re.compile(r":([0-9]+):([0-9]+)")


def _version_tuple(torch_version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if not match:
        raise VramfitError(f"cannot read torch version {torch_version!r}", field="torch")
    return int(match.group(1)), int(match.group(2))


def parse_workspace_config(config: str) -> int | None:
    """Bytes that ``CUBLAS_WORKSPACE_CONFIG`` asks for: the sum of SIZE KiB x COUNT over every
    ``:SIZE:COUNT`` pair (``:4096:8`` -> 32 MiB). None when nothing parses (PyTorch then
    warns and uses its default)."""
    pairs = _CONFIG_RE.findall(config)
    if not pairs:
        return None
    return sum(int(size) * 1024 * int(count) for size, count in pairs)


def cublas_workspace_bytes(
    torch_version: str | None,
    compute_capability: tuple[int, int] | None,
    config: str | None = None,
) -> int:
    """The cuBLAS workspace PyTorch allocates through its caching allocator per (handle, stream).

    Source: aten/src/ATen/cuda/CublasHandlePool.cpp, ``parseChosenWorkspaceSize`` (read by
    ``getChosenWorkspaceSize``): ``CUBLAS_WORKSPACE_CONFIG`` (``config`` here) if set and
    parseable, else ``:4096:2:16:8`` = 2 x 4 MiB + 8 x 16 KiB = 8.125 MiB, or 32 MiB
    (``4096 * 8 * 1024``) on Hopper (sm90, since PyTorch 2.0, PR #89027) and, since PyTorch
    2.11 (PR #175344), Blackwell (sm100/sm110/sm120). Allocating it from the caching allocator
    began with PR #83461 (PyTorch 1.13, default 4 MiB then); before that it was cuBLAS's own,
    outside ``memory_allocated``. Measured: 8.125 MiB on a T4 (the seed notebook), 32 MiB on an
    H200 with torch 2.11.

    ``torch_version`` None (an estimate, with no torch at hand) means the version measured
    here, 2.11; ``compute_capability`` None (a GPU we know nothing of) means pre-Hopper.
    """
    version = MEASURED_TORCH if torch_version is None else _version_tuple(torch_version)
    if compute_capability is None:
        compute_capability = (0, 0)
    if version < (1, 13):
        return 0
    major = compute_capability[0]
    if version < (2, 0):
        default = 4096 * 1024
    elif major == 9 or (version >= (2, 11) and major in (10, 11, 12)):
        default = 4096 * 8 * 1024
    else:
        default = 4096 * 1024 * 2 + 16 * 1024 * 8
    if config is not None:
        parsed = parse_workspace_config(config)
        if parsed is not None:
            return parsed
    return default


# cuBLASLt, which runs a projection with a bias (addmm's fused epilogue), takes its own workspace
# per thread from the caching allocator on its first call: 1 MiB (aten/src/ATen/cuda/CUDABlas.cpp,
# ``CUBLASLT_WORKSPACE_SIZE`` default 1024 KiB; measured: the labelled H200 allocator traces in
# benchmarks/data/h200-traces/cpp-frames.json.gz).
CUBLASLT_WORKSPACE_BYTES = 1 * MIB


# Device memory outside PyTorch's allocator, measured on an H200 with torch 2.11
# (benchmarks/data/h200-run1: device used minus max_memory_reserved, stable to +-8 MiB over
# 28 runs): the CUDA context right after initialisation (527 MiB), then the kernel images
# CUDA's lazy loading brings in on first use: those of a forward pass (~173 MiB), of a
# backward pass (~51 MiB more) and of the flash-attention kernels (~16 MiB).
CONTEXT_INIT_BYTES = 527 * MIB
FORWARD_KERNELS_BYTES = 173 * MIB
BACKWARD_KERNELS_BYTES = 51 * MIB
FLASH_KERNELS_BYTES = 16 * MIB


def cuda_context_bytes(*, training: bool, flash: bool) -> int:
    """Device memory held by the CUDA context and loaded kernels, outside the allocator."""
    total = CONTEXT_INIT_BYTES + FORWARD_KERNELS_BYTES
    if training:
        total += BACKWARD_KERNELS_BYTES + (FLASH_KERNELS_BYTES if flash else 0)
    return total
