"""Kernel scratch sizes, checked against requests recorded on an H200.

Each expected figure is a caching-allocator request read from the allocator traces in
benchmarks/data/h200-traces (cpp-frames.json.gz names it ``structured_sum_out`` under
the bias's ExpandBackward; frames*.json.gz and traces*.json hold the others).
"""

from __future__ import annotations

import pytest

from vramfit.estimate.kernels import H200, Multiprocessors, column_sum_scratch_bytes


@pytest.mark.parametrize(
    ("rows", "cols", "recorded"),
    [
        (2048, 768, 12_582_912),  # GPT-2 124M, batch 4 x 512: c_proj and o_proj biases
        (2048, 3072, 50_331_648),  # its c_fc
        (2048, 2304, 37_748_736),  # its c_attn
        (2048, 128, 2_097_152),  # Qwen2.5-0.5B, batch 2 x 1024: a k/v bias
        (2048, 5120, 83_886_080),  # GPT-2 774M, batch 2 x 1024: c_fc
        (4096, 1280, 41_943_040),  # GPT-2 774M, batch 8 x 512: c_proj
        (4096, 5120, 138_936_320),  # its c_fc: 53 blocks per output, not 64
        (4096, 3840, 125_829_120),  # its c_attn
        (8192, 2304, 139_198_464),  # GPT-2 124M, batch 8 x 1024: c_attn, 118 blocks
    ],
)
def test_bias_gradient_reduction_scratch_matches_the_recorded_request(
    rows: int, cols: int, recorded: int
) -> None:
    assert column_sum_scratch_bytes(rows, cols, H200) == recorded


def test_a_short_reduction_needs_no_scratch() -> None:
    # 512 rows split over 4 warps leave 128 values per thread: one block per output
    assert column_sum_scratch_bytes(512, 4096, H200) == 0


def test_fewer_multiprocessors_split_a_wide_reduction_less() -> None:
    t4 = Multiprocessors(count=40, max_threads=1024)  # Turing: 40 SMs, 1024 threads each
    assert 0 < column_sum_scratch_bytes(4096, 5120, t4) < column_sum_scratch_bytes(4096, 5120, H200)


def test_a_per_row_gradient_is_reduced_without_a_column_sum_scratch() -> None:
    """RMSNorm's ``x * rsqrt(mean(x^2))``: the gradient of the (rows, 1) factor sums along
    the fastest-moving dimension, which stages nothing (no such request in the H200 trace of
    Gemma-2's norm backward); a (width,) factor's gradient is a column sum that does."""
    from vramfit.estimate.graph import DType, Graph, run_backward, run_forward
    from vramfit.estimate.ops import Ops
    from vramfit.estimate.timeline import Tape

    rows, width = 4096, 2304

    def scratch(per_row: bool) -> list[int]:
        g = Graph(grad=True)
        ops = Ops(g, None)
        x = g.leaf("x", rows * width, DType.fp32, requires_grad=True)
        if per_row:
            factor = ops.mean("variance", ops.pow("x^2", x), rows)
        else:
            factor = g.leaf("weight", width, DType.fp32, requires_grad=True)
        y = ops.binary("x * factor", x, factor, "mul")
        tape = Tape()
        sim = run_forward(g, tape)
        run_backward(sim, y)
        return [sum(r.sizes) for r in tape.records if r.name.endswith("reduction")]

    assert scratch(per_row=False) == [column_sum_scratch_bytes(rows, width)] != [0]
    assert scratch(per_row=True) == []


def test_the_rotary_bmm_is_the_first_matmul_of_a_step() -> None:
    """LlamaRotaryEmbedding's ``inv_freq @ positions`` is a bmm: the H200 trace of a Gemma-2
    step shows cuBLAS's workspace made right after its output, before the concatenated
    angles, and before any projection."""
    from vramfit.config import RunSpec
    from vramfit.estimate.overhead import cublas_workspace_bytes
    from vramfit.estimate.schedule import hf_training_steps

    run = RunSpec.model_validate(
        {"model": {"arch": "llama", "layers": 2, "hidden": 256, "heads": 4, "vocab": 512},
         "workload": {"impl": "hf", "loop": "drops", "batch": 1, "seq": 64,
                      "precision": "bf16", "optimizer": "adamw"}}
    )
    first, _, _ = hf_training_steps(
        run.model.resolved(), run.workload, cublas_workspace_bytes(None, (9, 0))
    )
    names = [a.name for a in sorted(first.allocations, key=lambda a: a.start) if not a.persistent
             or "workspace" in a.name]
    at = names.index
    assert at("RoPE frequencies") < at("cuBLAS workspace (forward)") < at("RoPE angles")
