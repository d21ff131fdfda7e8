"""The seed notebook's matmul cells: prediction arithmetic against measured figures."""

from __future__ import annotations

import pytest

from vramfit.errors import VramfitError
from vramfit.estimate.overhead import cublas_workspace_bytes, parse_workspace_config
from vramfit.measure.matmul import NOTEBOOK_CELLS, predict_matmul

MIB = 2**20

# The notebook printed memory_allocated() / 1024**2 with :.2f on a Colab T4 (sm75).
NOTEBOOK_T4_MB = ["28.12", "18.12", "26.12", "26.12", "152.12"]

# Measured on an NVIDIA H200 (sm90), torch 2.11.0+cu130, with
# `PYTHONPATH=src python3 benchmarks/collect.py --matmul --out matmul.json`:
# allocated after the op and max allocated during it, MiB; cuBLAS workspace 32 MiB.
H200_ALLOCATED_MIB = [52.0, 42.0, 50.0, 50.0, 176.0]
H200_PEAK_MIB = [52.0, 42.0, 58.0, 58.0, 240.0]


def predictions(compute_capability: tuple[int, int], torch_version: str = "2.6.0"):
    workspace = cublas_workspace_bytes(torch_version, compute_capability)
    return [
        predict_matmul(dtype, shape, batch, workspace_bytes=workspace)
        for dtype, shape, batch in NOTEBOOK_CELLS
    ]


def test_notebook_t4_figures() -> None:
    printed = [f"{p.allocated_bytes / 1024**2:.2f}" for p in predictions((7, 5))]
    assert printed == NOTEBOOK_T4_MB


def test_h200_measurements() -> None:
    cells = predictions((9, 0), "2.11.0+cu130")
    assert [p.allocated_bytes / MIB for p in cells] == H200_ALLOCATED_MIB
    assert [p.peak_bytes / MIB for p in cells] == H200_PEAK_MIB


def test_parts_sum_to_totals() -> None:
    for p in predictions((8, 0)):
        assert p.allocated_bytes == sum(p.parts.values()) - p.autocast_copies_bytes
        assert p.peak_bytes == sum(p.parts.values())


def test_autocast_copies_live_only_during_the_op() -> None:
    fp32, fp16, amp_fp16, amp_bf16, bmm = predictions((7, 5))
    assert fp32.autocast_copies_bytes == fp16.autocast_copies_bytes == 0
    assert amp_fp16.autocast_copies_bytes == (1024 * 2048 * 2) * 2  # A and B in 16 bits
    assert amp_fp16.output_bytes == fp16.output_bytes == 1024 * 1024 * 2
    assert bmm.inputs_bytes == 2 * 32 * 512 * 1024 * 4
    assert bmm.output_bytes == 32 * 512 * 512 * 2


@pytest.mark.parametrize(
    ("version", "capability", "expected"),
    [
        ("2.6.0", (7, 5), 8_519_680),  # T4: :4096:2:16:8 = 8.125 MiB
        ("2.11.0+cu130", (8, 0), 8_519_680),  # A100
        ("2.1.2", (9, 0), 32 * MIB),  # Hopper since 2.0
        ("2.11.0+cu130", (9, 0), 32 * MIB),  # measured on an H200
        ("2.10.0", (10, 0), 8_519_680),  # Blackwell before PR #175344
        ("2.11.0", (10, 0), 32 * MIB),
        ("2.12.0", (12, 0), 32 * MIB),
        ("1.13.1", (8, 0), 4 * MIB),
        ("1.12.1", (8, 0), 0),  # not from the caching allocator yet
    ],
)
def test_default_workspace(version: str, capability: tuple[int, int], expected: int) -> None:
    assert cublas_workspace_bytes(version, capability) == expected


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (":4096:8", 32 * MIB),
        (":16:8", 128 * 1024),
        (":4096:2:16:8", 8_519_680),
        (":4096:8:16:8", 32 * MIB + 128 * 1024),
        ("garbage", None),
        ("", None),
    ],
)
def test_parse_workspace_config(config: str, expected: int | None) -> None:
    assert parse_workspace_config(config) == expected


def test_workspace_config_overrides_default() -> None:
    assert cublas_workspace_bytes("2.6.0", (9, 0), ":16:8") == 128 * 1024
    assert cublas_workspace_bytes("2.6.0", (9, 0), "nonsense") == 32 * MIB  # torch warns


def test_unknown_dtype() -> None:
    with pytest.raises(VramfitError, match="unknown matmul dtype 'int8'"):
        predict_matmul("int8", workspace_bytes=0)


def test_measure_on_cpu_runs_the_cells() -> None:
    torch = pytest.importorskip("torch")
    from vramfit.measure.backend import CpuBackend
    from vramfit.measure.matmul import measure_matmul, measure_tflops

    expected = {"fp32": "float32", "bf16": "bfloat16", "amp-bf16": "bfloat16"}
    for dtype, output_dtype in expected.items():
        cell = measure_matmul(dtype, shape=(8, 16, 4), batch=2, backend=CpuBackend())
        assert cell.output_dtype == output_dtype
        assert cell.shape == (8, 16, 4)
        assert cell.prediction["workspace"] == 0  # no cuBLAS on CPU
        assert (
            cell.predicted_bytes
            == predict_matmul(dtype, (8, 16, 4), 2, workspace_bytes=0).allocated_bytes
        )
    assert measure_tflops(
        "fp32", n=32, iters=2, warmup=1, backend=CpuBackend(), windows=2, warmup_s=0.0
    ) > 0
    assert torch.backends.cuda.matmul.allow_tf32 is False  # restored
