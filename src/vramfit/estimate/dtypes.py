"""The KV cache's element size."""

from __future__ import annotations

from vramfit.config import DTYPE_BYTES, KvDtype, Precision, Workload


def kv_bytes(workload: Workload) -> int:
    """KV cache element size: ``--kv-dtype`` or, by default, the compute dtype."""
    if workload.kv_dtype is None:
        return 4 if workload.precision is Precision.fp32 else 2  # the compute dtype
    return DTYPE_BYTES[
        workload.kv_dtype.value if isinstance(workload.kv_dtype, KvDtype) else workload.kv_dtype
    ]
