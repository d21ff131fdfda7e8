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


# The CUDA context, PyTorch's kernels and the cuBLAS/cuDNN libraries loaded on first use,
# as device memory outside PyTorch's allocator (measured on an H200, torch 2.11: 527 MiB
# right after init; more once cuBLAS and attention kernels are loaded).
DEFAULT_CONTEXT_BYTES = 527 * MIB


def allocator_reserve_bytes(peak_allocated_bytes: int) -> int:
    """Bytes PyTorch's caching allocator holds beyond the allocated peak.

    Large requests are rounded up to 2 MiB and served from segments that, once freed, are
    kept for reuse, so reserved memory exceeds the allocated peak by rounding plus the
    fragmentation of freed segments (PyTorch docs, "CUDA memory management").
    """
    segment = 2 * MIB
    return -(-peak_allocated_bytes // segment) * segment - peak_allocated_bytes
