"""The seed notebook's matmul experiment, measured and predicted byte for byte.

The notebook (T4, Colab) printed ``torch.cuda.memory_allocated()`` after ``C = A @ B`` with A
and B still alive: 28.12 MB (fp32 1024x2048 @ 2048x1024), 18.12 (fp16), 26.12 (fp32 inputs
under fp16 autocast), 26.12 (bf16 autocast), 152.12 (bmm 32x512x1024 @ 32x1024x512 under
bf16 autocast); its "MB" is MiB (it divides by 1024**2). Each figure is the live tensors
plus the cuBLAS workspace that PyTorch allocates through its caching allocator on the first
matmul of a (handle, stream) and keeps: 8.125 MiB on the T4.

Prediction, per cell: inputs (in their storage dtype) + output (in the result dtype) +
cuBLAS workspace stays allocated; autocast's 16-bit copies of fp32 inputs exist only during
the op, so they add to the peak, not to what stays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from vramfit.errors import VramfitError
from vramfit.estimate.overhead import cublas_workspace_bytes
from vramfit.measure.backend import Backend, CudaBackend, import_torch

MIB = 2**20
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# dtype label -> (input storage dtype, autocast dtype or None)
MATMUL_DTYPES: dict[str, tuple[str, str | None]] = {
    "fp32": ("float32", None),
    "fp16": ("float16", None),
    "bf16": ("bfloat16", None),
    "amp-fp16": ("float32", "float16"),
    "amp-bf16": ("float32", "bfloat16"),
}

# The notebook's cells, in its order: (dtype, (m, k, n), batch).
NOTEBOOK_CELLS: list[tuple[str, tuple[int, int, int], int | None]] = [
    ("fp32", (1024, 2048, 1024), None),
    ("fp16", (1024, 2048, 1024), None),
    ("amp-fp16", (1024, 2048, 1024), None),
    ("amp-bf16", (1024, 2048, 1024), None),
    ("amp-bf16", (512, 1024, 512), 32),
]


@dataclass(frozen=True)
class MatmulPrediction:
    """Itemised bytes of one matmul cell. ``allocated_bytes`` is what stays after the op."""

    inputs_bytes: int
    output_bytes: int
    autocast_copies_bytes: int  # live only during the op
    workspace_bytes: int

    @property
    def allocated_bytes(self) -> int:
        return self.inputs_bytes + self.output_bytes + self.workspace_bytes

    @property
    def peak_bytes(self) -> int:
        return self.allocated_bytes + self.autocast_copies_bytes

    @property
    def parts(self) -> dict[str, int]:
        return {
            "inputs": self.inputs_bytes,
            "output": self.output_bytes,
            "autocast_copies": self.autocast_copies_bytes,
            "workspace": self.workspace_bytes,
        }


def _dtype_entry(dtype: str) -> tuple[str, str | None]:
    try:
        return MATMUL_DTYPES[dtype]
    except KeyError:
        choices = ", ".join(MATMUL_DTYPES)
        raise VramfitError(
            f"unknown matmul dtype {dtype!r} (one of {choices})", field="dtype"
        ) from None


def predict_matmul(
    dtype: str,
    shape: tuple[int, int, int] = (1024, 2048, 1024),
    batch: int | None = None,
    *,
    workspace_bytes: int,
) -> MatmulPrediction:
    """Bytes of ``A (m x k) @ B (k x n)`` (each ``batch`` times for bmm) with A, B and C alive.

    Inputs are stored in the storage dtype (fp32 under autocast); the output is in the
    compute dtype; autocast casts each fp32 input to 16 bits for the op (PyTorch autocast op
    list: matmul/bmm run in lower precision) and frees the copies afterwards.
    """
    storage, autocast = _dtype_entry(dtype)
    m, k, n = shape
    count = batch or 1
    compute_bytes = DTYPE_BYTES[autocast or storage]
    input_elements = count * (m * k + k * n)
    return MatmulPrediction(
        inputs_bytes=input_elements * DTYPE_BYTES[storage],
        output_bytes=count * m * n * compute_bytes,
        autocast_copies_bytes=input_elements * compute_bytes if autocast else 0,
        workspace_bytes=workspace_bytes,
    )


@dataclass(frozen=True)
class MatmulMeasurement:
    """One matmul cell, measured and predicted (bytes)."""

    dtype: str
    shape: tuple[int, int, int]
    batch: int | None
    output_dtype: str
    allocated_bytes: int  # memory_allocated after the op, inputs and output alive
    peak_bytes: int  # max_memory_allocated during the op
    workspace_bytes: int  # measured: allocated after a warm-up op, less the inputs
    predicted_bytes: int
    predicted_peak_bytes: int
    prediction: dict[str, int] = field(default_factory=dict)


def _run_op(torch: Any, a: Any, b: Any, autocast: str | None, device: str) -> Any:
    op = torch.bmm if a.dim() == 3 else torch.matmul
    if autocast is None:
        return op(a, b)
    with torch.autocast(torch.device(device).type, dtype=getattr(torch, autocast)):
        return op(a, b)


def measure_matmul(
    dtype: str,
    *,
    shape: tuple[int, int, int] = (1024, 2048, 1024),
    batch: int | None = None,
    backend: Backend | None = None,
) -> MatmulMeasurement:
    """Run one notebook cell and compare it with ``predict_matmul``.

    The cell starts clean (``empty_cache``, peak reset); the cuBLAS workspace persists across
    cells, as it does in PyTorch. A warm-up op on the same inputs creates it if this is the
    first matmul, and ``workspace_bytes`` is what is allocated then beyond the inputs, so
    nothing else may hold device memory while this runs.
    """
    torch = import_torch()
    storage, autocast = _dtype_entry(dtype)
    if backend is None:
        backend = CudaBackend()
    device = backend.device
    m, k, n = shape
    lead = (batch,) if batch else ()
    backend.synchronize()
    backend.empty_cache()

    a = torch.randn(*lead, m, k, device=device, dtype=getattr(torch, storage))
    b = torch.randn(*lead, k, n, device=device, dtype=getattr(torch, storage))
    input_bytes = a.numel() * a.element_size() + b.numel() * b.element_size()
    warm = _run_op(torch, a, b, autocast, device)
    del warm
    backend.synchronize()
    workspace = backend.memory_allocated() - input_bytes

    backend.empty_cache()
    backend.reset_peak()
    c = _run_op(torch, a, b, autocast, device)
    backend.synchronize()
    allocated = backend.memory_allocated()
    peak = backend.max_memory_allocated()
    output_dtype = str(c.dtype).removeprefix("torch.")
    del a, b, c
    backend.empty_cache()

    predicted_workspace = 0
    if torch.device(device).type == "cuda":
        predicted_workspace = cublas_workspace_bytes(
            str(torch.__version__),
            backend.compute_capability(),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        )
    prediction = predict_matmul(dtype, shape, batch, workspace_bytes=predicted_workspace)
    return MatmulMeasurement(
        dtype=dtype,
        shape=shape,
        batch=batch,
        output_dtype=output_dtype,
        allocated_bytes=allocated,
        peak_bytes=peak,
        workspace_bytes=workspace,
        predicted_bytes=prediction.allocated_bytes,
        predicted_peak_bytes=prediction.peak_bytes,
        prediction=prediction.parts,
    )


_TFLOPS_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# How ``measure_tflops`` times, in words for the table and the JSON (``TIMING``).
TIMING = (
    "n x n x n products into a preallocated output: warm-up products for at least 0.5 s "
    "(the clocks ramp up from idle), then the median of 5 windows of 10 back-to-back "
    "products, each window timed with CUDA events around the loop"
)


def measure_tflops(
    dtype: str,
    n: int = 8192,
    iters: int = 10,
    warmup: int = 3,
    backend: Backend | None = None,
    *,
    windows: int = 5,
    warmup_s: float = 0.5,
) -> float:
    """Dense matmul throughput, ``2 n^3`` flops per ``n x n x n`` product (``TIMING``).

    A plain loop's figure, made robust: at least ``warmup`` products and at least
    ``warmup_s`` seconds of them first (from idle the GPU's clocks take a while to ramp up:
    on the H200 345 MHz idle, 1980 MHz under load, and a few warm-up products of 1.4 ms each
    end before they have), then ``windows`` timed windows of ``iters`` back-to-back
    products into a preallocated output (no allocation in the loop), each window timed with
    CUDA events recorded around it, so one window's time is the GPU's, with no host
    synchronisation inside; the median window gives the rate. On CPU ``time.perf_counter``
    times the windows. ``tf32`` is fp32 storage with
    ``torch.backends.cuda.matmul.allow_tf32`` on; ``fp32`` turns it off for the run."""
    import statistics
    import time

    torch = import_torch()
    if dtype not in _TFLOPS_DTYPES:
        choices = ", ".join(_TFLOPS_DTYPES)
        raise VramfitError(f"unknown dtype {dtype!r} (one of {choices})", field="dtype")
    if backend is None:
        backend = CudaBackend()
    device = backend.device
    on_cuda = torch.device(device).type == "cuda"
    kind = getattr(torch, _TFLOPS_DTYPES[dtype])
    a = torch.randn(n, n, device=device, dtype=kind)
    b = torch.randn(n, n, device=device, dtype=kind)
    out = torch.empty(n, n, device=device, dtype=kind)
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        began, done = time.perf_counter(), 0
        while done < warmup or time.perf_counter() - began < warmup_s:
            torch.matmul(a, b, out=out)
            done += 1
            if done % 8 == 0 or done == warmup:
                backend.synchronize()  # the wall clock measures the GPU's work, not launches
        backend.synchronize()
        seconds = []
        for _ in range(windows):
            if on_cuda:
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    torch.matmul(a, b, out=out)
                stop.record()
                stop.synchronize()
                seconds.append(start.elapsed_time(stop) / 1000.0)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    torch.matmul(a, b, out=out)
                seconds.append(time.perf_counter() - t0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return 2.0 * n**3 * iters / statistics.median(seconds) / 1e12
