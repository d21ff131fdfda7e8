"""Which dtype each kind of tensor has, for each precision mode."""

from __future__ import annotations

from dataclasses import dataclass

from vramfit.config import DTYPE_BYTES, KvDtype, Precision, Workload


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of each kind of tensor in a step.

    Under ``torch.autocast`` (amp-*), parameters, gradients, optimizer state and the
    residual stream stay fp32 (embeddings are not autocast and fp32 + bf16 promotes to
    fp32), norms run in fp32 (autocast's fp32 op list), and matmul inputs and outputs
    are cast to 16 bits (PyTorch docs, "CUDA Ops that can autocast to float16").
    """

    weight: int  # parameters, gradients, optimizer state
    compute: int  # matmul inputs/outputs, attention
    residual: int  # the residual stream between blocks
    autocast: bool  # weights are cast per op (and the casts are cached for backward)
    softmax: int  # eager attention softmax output (fp32 under autocast: fp32 op list)
    softmax_upcast: bool  # softmax first copies its 16-bit input to fp32 (autocast bf16)


def dtypes_for(precision: Precision) -> Dtypes:
    """Dtype sizes for a precision mode."""
    if precision is Precision.fp32:
        return Dtypes(
            weight=4, compute=4, residual=4, autocast=False, softmax=4, softmax_upcast=False
        )
    if precision in (Precision.amp_bf16, Precision.amp_fp16):
        # autocast calls softmax(x, dtype=float32) (its fp32_set_opt_dtype policy); ATen runs
        # that on fp16 input with a half-to-float kernel, but copies bf16 input to fp32 first
        # (aten/src/ATen/native/SoftMax.cpp, softmax with dtype; measured on an H200:
        # benchmarks/data/h200-validation2)
        return Dtypes(
            weight=4,
            compute=2,
            residual=4,
            autocast=True,
            softmax=4,
            softmax_upcast=precision is Precision.amp_bf16,
        )
    return Dtypes(weight=2, compute=2, residual=2, autocast=False, softmax=2, softmax_upcast=False)


def kv_bytes(workload: Workload) -> int:
    """KV cache element size: ``--kv-dtype`` or, by default, the compute dtype."""
    if workload.kv_dtype is None:
        return dtypes_for(workload.precision).compute
    return DTYPE_BYTES[
        workload.kv_dtype.value if isinstance(workload.kv_dtype, KvDtype) else workload.kv_dtype
    ]
