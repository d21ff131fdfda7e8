"""Block shapes and the small per-block tensors the training and inference programs share.

``shape_of`` gives the sizes one transformer block works with; ``norm_stats`` and
``attention_stats`` give the statistics that norms and attention kernels keep. What a block
saves and frees, op by op, is written in ``vramfit.estimate.training`` and
``vramfit.estimate.inference``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramfit.config import (
    Attention,
    ModelSpec,
    Norm,
    Precision,
    Workload,
)
from vramfit.estimate.dtypes import dtypes_for

FP32 = 4
INT64 = 8

# Memory-efficient attention (used for fp32, where flash kernels do not exist) pads its
# logsumexp to a multiple of 32 queries (PyTorch aten/.../mem_eff_attention kernel_forward.h).
MEM_EFF_LSE_PAD = 32


@dataclass(frozen=True)
class Shape:
    """The sizes one block works with (``spec`` resolved)."""

    tokens: int  # b * s
    batch: int
    seq: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # intermediate width of one MLP (dense) or one expert
    active_ffn: int  # total intermediate width a token passes through
    vocab: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def scores(self) -> int:
        """Elements of one block's attention score matrix: b * heads * s * s."""
        return self.batch * self.heads * self.seq * self.seq


def shape_of(spec: ModelSpec, workload: Workload) -> Shape:
    """Block sizes for ``spec`` (resolved) under ``workload``."""
    spec = spec.resolved()
    assert spec.heads and spec.kv_heads and spec.head_dim and spec.ffn and spec.vocab
    assert spec.expert_ffn and spec.shared_expert_ffn
    if spec.experts > 1:
        ffn = spec.expert_ffn
        active = (
            spec.experts_per_token * spec.expert_ffn + spec.shared_experts * spec.shared_expert_ffn
        )
    else:
        ffn = active = spec.ffn
    return Shape(
        tokens=workload.batch * workload.seq,
        batch=workload.batch,
        seq=workload.seq,
        hidden=spec.hidden,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        ffn=ffn,
        active_ffn=active,
        vocab=spec.vocab,
    )


def norm_stats(tokens: int, norm: Norm) -> list[int]:
    """Per-row fp32 statistics a norm saves besides its input: LayerNorm mean and rstd
    (native_layer_norm), RMSNorm rstd (fused rms_norm)."""
    return [tokens * FP32] * (2 if norm is Norm.layernorm else 1)


def attention_stats(sh: Shape, workload: Workload) -> list[int]:
    """What attention itself saves besides q, k, v and its output.

    Flash (16-bit) saves a (b, heads, s) fp32 logsumexp; memory-efficient attention (fp32)
    pads it to 32 queries. Eager saves the softmax output (fp32 under autocast, which runs
    softmax in fp32) and, under autocast, the 16-bit copy that multiplies V.
    """
    dt = dtypes_for(workload.precision)
    if workload.attention is Attention.flash:
        padded = (
            sh.seq
            if workload.precision is not Precision.fp32
            else -(-sh.seq // MEM_EFF_LSE_PAD) * MEM_EFF_LSE_PAD
        )
        return [sh.batch * sh.heads * padded * FP32]
    saved = [sh.scores * dt.softmax]
    if dt.autocast:
        saved.append(sh.scores * dt.compute)
    return saved
