"""TFLOP/s of ``vramfit measure --all`` against a plain torch loop, on one GPU, in one process.

The plain loop is the reference the issue quotes: 8192 x 8192 x 8192 products, 3 warm-ups,
then the mean of 10 timed with CUDA events recorded around the loop. The former timing of
``measure_tflops`` (5 warm-ups, one window of 20 products) runs first, on a GPU idle until
then as ``measure --all`` found it; then the plain loop and the current ``measure_tflops``
(``vramfit.measure.matmul.TIMING`` says how it times) alternate twice:

    python benchmarks/matmul_timing.py

Prints one line per (method, dtype) and the ratio of vramfit's figure to the plain loop's.
"""

from __future__ import annotations

import statistics
import sys


def plain_loop(torch, dtype, n: int = 8192, warmup: int = 3, iters: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(warmup):
        a @ b
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    stop.record()
    stop.synchronize()
    return 2.0 * n**3 * iters / (start.elapsed_time(stop) / 1000) / 1e12


def former(torch, dtype, n: int = 8192, warmup: int = 5, iters: int = 20) -> float:
    """vramfit's timing before this change, transcribed."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.matmul(a, b)
    stop.record()
    stop.synchronize()
    return 2.0 * n**3 * iters / (start.elapsed_time(stop) / 1000) / 1e12


def main() -> int:
    import torch

    from vramfit.measure.matmul import TIMING, measure_tflops

    names = {"bf16": torch.bfloat16, "fp16": torch.float16}
    rows: dict[str, dict[str, list[float]]] = {}

    def add(method: str, dtype: str, value: float) -> None:
        rows.setdefault(method, {}).setdefault(dtype, []).append(value)
        print(f"{method:<28} {dtype:<5} {value:8.1f} TFLOP/s", flush=True)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"vramfit's timing: {TIMING}")
    # the former timing first, as ``measure --all`` ran it: on a GPU idle until then
    for dtype, kind in names.items():
        add("former vramfit (5 + 20)", dtype, former(torch, kind))
    for _ in range(2):
        for dtype, kind in names.items():
            add("plain loop (3 + 10)", dtype, plain_loop(torch, kind))
        for dtype in names:
            add("vramfit measure_tflops", dtype, measure_tflops(dtype))
    print()
    for dtype in names:
        plain = statistics.mean(rows["plain loop (3 + 10)"][dtype])
        ours = statistics.mean(rows["vramfit measure_tflops"][dtype])
        print(f"{dtype}: vramfit / plain loop = {ours / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
