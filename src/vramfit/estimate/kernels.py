"""Scratch memory that PyTorch's CUDA kernels take from the caching allocator.

Most kernels write only their outputs, but a reduction split across thread blocks stages
partial results in global memory, and that buffer is a caching-allocator request of its own.
A bias gradient is such a reduction: a column sum of the (tokens, width) output gradient.
Its size depends on the launch configuration PyTorch picks, which depends on the GPU's
multiprocessors, so the GPU's figures are inputs here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramfit.estimate.activations import FP32


@dataclass(frozen=True)
class Multiprocessors:
    """What a kernel launch configuration reads from the device properties."""

    count: int  # cudaDeviceProp::multiProcessorCount
    max_threads: int  # cudaDeviceProp::maxThreadsPerMultiProcessor


# The GPU every "measured" figure comes from (torch.cuda.get_device_properties on an H200).
H200 = Multiprocessors(count=132, max_threads=2048)

_MAX_NUM_THREADS = 512  # mnt_wrapper<T>::MAX_NUM_THREADS (512 for all but complex double)
_MIN_VALUES_PER_THREAD = 16
_MAX_VALUES_PER_THREAD = 256
_WARP = 32


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _last_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def column_sum_scratch_bytes(rows: int, cols: int, mp: Multiprocessors = H200) -> int:
    """Bytes of global-memory staging a sum over the rows of a contiguous (rows, cols)
    tensor allocates (0 when one thread block per output suffices).

    Follows aten/src/ATen/native/cuda/Reduce.cuh, ``setReduceConfig`` for a reduction
    that is not along the fastest-moving dimension: outputs are vectorised by 4 (or 2, 1,
    ``get_output_vec_size``), lanes of a 32-wide block take outputs, warps split the rows
    when each keeps 16 values or more, and when every thread would still sum 256 values
    and the grid is smaller than the GPU can hold (``maxThreadsPerMultiProcessor /
    threads`` blocks per multiprocessor), the rows are split across
    ``ctas_per_output`` blocks, which stage ``ReduceConfig::global_memory_size()`` =
    4 (fp32 accumulator) x cols x ctas_per_output x block width x vector size bytes.
    Measured on an H200 (benchmarks/data/h200-traces/cpp-frames.json.gz, frames3.json.gz):
    4096 rows x 5120 columns -> 53 blocks per output, 138,936,320 B.
    """
    if rows <= 0 or cols <= 0:
        return 0
    vec = 4 if cols % 4 == 0 else 2 if cols % 2 == 0 else 1
    max_threads = _MAX_NUM_THREADS // vec
    dim_x, dim_y = cols // vec, rows

    def capped_pow2(n: int) -> int:
        return _last_pow2(n) if n < max_threads else max_threads

    width = min(capped_pow2(dim_x), _WARP)  # ReduceConfig::set_block_dimension
    height = min(capped_pow2(dim_y), max_threads // width)
    width = min(capped_pow2(dim_x), max_threads // height)
    step_output, step_input = width, 1  # lanes take outputs
    if rows >= height * _MIN_VALUES_PER_THREAD or rows >= _MAX_VALUES_PER_THREAD:
        step_input = height  # warps split the rows
        rows_split = True
    else:
        step_output *= height
        rows_split = False
    grid = _div_up(dim_x, step_output)
    target_grid = mp.count * (mp.max_threads // (width * height))
    values_per_thread = _div_up(rows, step_input)
    if not (rows_split and values_per_thread >= _MAX_VALUES_PER_THREAD and grid <= target_grid):
        return 0
    ctas = max(
        min(_div_up(target_grid, grid), _div_up(values_per_thread, _MIN_VALUES_PER_THREAD)),
        _div_up(values_per_thread, _MAX_VALUES_PER_THREAD),
    )
    if ctas <= 1:
        return 0
    return FP32 * cols * ctas * width * vec
