"""Block shapes: the sizes one transformer block works with (``shape_of``).

What a block saves and frees, op by op, is the op library's (``vramfit.estimate.ops``) and
each profile's (``vramfit.estimate.profiles``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vramfit.config import ModelSpec, Workload

FP32 = 4
INT64 = 8


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
