"""Memory outside the model's own tensors: cuBLAS workspaces, CUDA context, allocator slack.

These decide an out-of-memory as much as the tensors do, yet
``torch.cuda.max_memory_allocated`` sees only the workspaces (PyTorch allocates them
through its caching allocator). Figures marked "measured" come from this project's runs
committed under ``benchmarks/data/``.
"""

from __future__ import annotations

MIB = 2**20


# PyTorch allocates one cuBLAS workspace per (handle, stream) through its caching allocator
# (aten/src/ATen/cuda/CublasHandlePool.cpp, getChosenWorkspaceSize): 4096 KiB x 2 + 16 KiB x 8
# = 8.125 MiB by default before Hopper (the seed notebook's T4 cells), 32 MiB on Hopper (sm_90)
# and newer (measured: 32 MiB on an H200, torch 2.11).
def cublas_workspace_bytes(compute_capability: tuple[int, int] | None) -> int:
    """Default size of one cuBLAS workspace for a GPU of this compute capability."""
    if compute_capability is not None and compute_capability >= (9, 0):
        return 32 * MIB
    return 4096 * 1024 * 2 + 16 * 1024 * 8


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
