"""What the measurements need from a device: memory counters and a clock.

``CudaBackend`` reads PyTorch's caching-allocator counters and the driver's free/total
figure. ``CpuBackend`` reads nothing (every counter is 0); it lets the whole measurement
code path run on a machine without a GPU, so CI exercises the logic with tiny models.
Tests inject their own fakes through the same ``Backend`` protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

from vramfit.errors import VramfitError
from vramfit.estimate.kernels import Multiprocessors


class Backend(Protocol):
    """The device operations ``measure_train`` and ``measure_matmul`` use. Bytes are ints."""

    device: str  # a torch device string: "cuda", "cuda:1", "cpu"

    def name(self) -> str: ...

    def memory_allocated(self) -> int: ...

    def max_memory_allocated(self) -> int: ...

    def reset_peak(self) -> None: ...

    def memory_reserved(self) -> int: ...

    def max_memory_reserved(self) -> int: ...

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the whole device, as the driver reports them."""
        ...

    def synchronize(self) -> None: ...

    def empty_cache(self) -> None: ...

    def compute_capability(self) -> tuple[int, int]: ...

    def multiprocessors(self) -> Multiprocessors | None:
        """The SM count and threads per SM (None where there are none: the CPU)."""
        ...

    def limit_memory(self, n_bytes: int) -> None:
        """Let the caching allocator hold at most ``n_bytes`` of segments."""
        ...

    def alloc_retries(self) -> int:
        """How often the allocator freed its cache to retry a failed cudaMalloc."""
        ...


def import_torch() -> Any:
    """Import torch, or raise the one message that says how to install it."""
    try:
        import torch
    except ImportError:
        raise VramfitError(
            "torch is not installed; pip install 'vramfit[measure]'", field="measure"
        ) from None
    return torch


class CudaBackend:
    """PyTorch's CUDA counters for one device (``torch.cuda.*``)."""

    def __init__(self, index: int = 0) -> None:
        torch = import_torch()
        if not torch.cuda.is_available():
            raise VramfitError("no CUDA device available", field="measure")
        if not 0 <= index < torch.cuda.device_count():
            raise VramfitError(f"no CUDA device {index}", field="measure")
        self._cuda = torch.cuda
        self.index = index
        self.device = f"cuda:{index}"

    def name(self) -> str:
        return str(self._cuda.get_device_name(self.index))

    def memory_allocated(self) -> int:
        return int(self._cuda.memory_allocated(self.index))

    def max_memory_allocated(self) -> int:
        return int(self._cuda.max_memory_allocated(self.index))

    def reset_peak(self) -> None:
        self._cuda.reset_peak_memory_stats(self.index)

    def memory_reserved(self) -> int:
        return int(self._cuda.memory_reserved(self.index))

    def max_memory_reserved(self) -> int:
        return int(self._cuda.max_memory_reserved(self.index))

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._cuda.mem_get_info(self.index)
        return int(free), int(total)

    def synchronize(self) -> None:
        # The first call creates the CUDA context (torch initialises lazily).
        self._cuda.synchronize(self.index)

    def empty_cache(self) -> None:
        self._cuda.empty_cache()

    def compute_capability(self) -> tuple[int, int]:
        major, minor = self._cuda.get_device_capability(self.index)
        return int(major), int(minor)

    def multiprocessors(self) -> Multiprocessors:
        props = self._cuda.get_device_properties(self.index)
        return Multiprocessors(
            int(props.multi_processor_count), int(props.max_threads_per_multi_processor)
        )

    def limit_memory(self, n_bytes: int) -> None:
        # set_per_process_memory_fraction: allowed_memory_maximum = fraction * total, cast to
        # size_t (CUDACachingAllocator.cpp setMemoryFraction); half a byte over n_bytes makes
        # the cast land on n_bytes itself
        _, total = self.mem_get_info()
        self._cuda.set_per_process_memory_fraction((n_bytes + 0.5) / total, self.index)

    def alloc_retries(self) -> int:
        return int(self._cuda.memory_stats(self.index).get("num_alloc_retries", 0))


class CpuBackend:
    """Runs the code path on the CPU and measures nothing: every counter reads 0."""

    device = "cpu"

    def name(self) -> str:
        return "cpu"

    def memory_allocated(self) -> int:
        return 0

    def max_memory_allocated(self) -> int:
        return 0

    def reset_peak(self) -> None:
        pass

    def memory_reserved(self) -> int:
        return 0

    def max_memory_reserved(self) -> int:
        return 0

    def mem_get_info(self) -> tuple[int, int]:
        return 0, 0

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def compute_capability(self) -> tuple[int, int]:
        return 0, 0

    def multiprocessors(self) -> Multiprocessors | None:
        return None

    def limit_memory(self, n_bytes: int) -> None:
        pass

    def alloc_retries(self) -> int:
        return 0
