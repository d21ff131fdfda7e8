"""Dtypes a run's precision implies (the weights', autocast's) and the KV cache's size."""

from __future__ import annotations

from vramfit.config import DTYPE_BYTES, KvDtype, Precision, Workload
from vramfit.estimate.graph import DType

# the parameters' dtype under each precision, and the dtype autocast computes in (if any)
WEIGHT_DTYPE = {
    Precision.fp32: DType.fp32,
    Precision.amp_bf16: DType.fp32,
    Precision.amp_fp16: DType.fp32,
    Precision.bf16: DType.bf16,
    Precision.fp16: DType.fp16,
}
AUTOCAST_DTYPE = {Precision.amp_bf16: DType.bf16, Precision.amp_fp16: DType.fp16}


def kv_bytes(workload: Workload) -> int:
    """KV cache element size: ``--kv-dtype`` or, by default, the compute dtype."""
    if workload.kv_dtype is None:
        return 4 if workload.precision is Precision.fp32 else 2  # the compute dtype
    return DTYPE_BYTES[
        workload.kv_dtype.value if isinstance(workload.kv_dtype, KvDtype) else workload.kv_dtype
    ]
