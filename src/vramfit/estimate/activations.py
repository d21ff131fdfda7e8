"""Bytes autograd saves for backward, per transformer block, and the block's transients.

Each term names the tensor a reference block (``vramfit.measure.models``, which follows
Hugging Face's GPT-2 / Llama modeling code) keeps alive between its forward and its
backward, in the dtype that tensor really has. The layout follows Korthikanti et al.
2022 ("Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198,
section 4.1): per layer ``s*b*h*(34 + 5*a*s/h)`` bytes for 16-bit GPT blocks with
dropout; we drop the dropout masks (no dropout), count SwiGLU's three projections,
GQA's narrower K/V (widened again by ``repeat_kv``), fp32 norms and residuals under
autocast, and flash attention's O(s) softmax statistics instead of the s x s scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramfit.config import Attention, Checkpointing, Mlp, ModelSpec, Norm, Positions, Workload
from vramfit.estimate.dtypes import Dtypes, dtypes_for

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
    ffn: int  # intermediate width a token passes through (dense MLP or one expert)
    active_ffn: int  # total intermediate width per token (experts_per_token * expert + shared)
    vocab: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def shape_of(spec: ModelSpec, workload: Workload) -> Shape:
    """Block sizes for ``spec`` (resolved) under ``workload``."""
    spec = spec.resolved()
    assert spec.heads and spec.kv_heads and spec.head_dim and spec.ffn and spec.vocab
    assert spec.expert_ffn and spec.shared_expert_ffn
    if spec.experts > 1:
        ffn = spec.expert_ffn
        active = spec.experts_per_token * spec.expert_ffn + spec.shared_experts * spec.shared_expert_ffn
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


def _norm_saved(n: int, hidden: int, norm: Norm, dt: Dtypes) -> int:
    """A norm saves its input (counted with the residual) plus per-row fp32 statistics:
    LayerNorm mean and rstd, RMSNorm rstd (PyTorch native_layer_norm / _fused_rms_norm)."""
    del hidden, dt
    return (2 if norm is Norm.layernorm else 1) * n * FP32


def block_saved(spec: ModelSpec, workload: Workload) -> dict[str, int]:
    """Bytes one block saves for backward without checkpointing, by part.

    Parts: ``norm`` (norm inputs are the residual stream, plus statistics), ``attention``
    (the normed input cast for the q/k/v projections, q/k/v as attention sees them, its
    output, softmax statistics or probabilities), ``mlp`` (the normed input and the
    intermediate activations).
    """
    spec = spec.resolved()
    assert spec.norm and spec.mlp
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c = sh.tokens, sh.hidden, dt.compute

    norm = 2 * n * h * dt.residual + 2 * _norm_saved(n, h, spec.norm, dt)

    # q/k/v projections save their (cast) input; attention saves q, k, v as it receives them.
    # RoPE writes new q and k; repeat_kv widens K and V to all heads (HF ``repeat_kv``).
    kv_seen = sh.q_width if sh.kv_heads < sh.heads else sh.kv_width
    attn = n * h * c  # normed input as the projections see it
    attn += n * (sh.q_width + 2 * kv_seen) * c  # q, k, v given to attention
    attn += n * sh.q_width * c  # attention output (saved by the output projection)
    if workload.attention is Attention.flash:
        attn += sh.batch * sh.heads * sh.seq * FP32  # logsumexp (Dao et al. 2022)
    else:
        scores = sh.batch * sh.heads * sh.seq * sh.seq
        # softmax saves its output; under autocast softmax runs in fp32 and the matmul with V
        # saves a 16-bit copy of the probabilities (Korthikanti's 5as/h term, without dropout)
        attn += scores * dt.softmax + (scores * c if dt.autocast else 0)

    mlp = n * h * c  # normed input for the up/gate projections
    if spec.mlp is Mlp.gelu:
        mlp += 2 * n * sh.active_ffn * c  # GELU input and output
    else:
        mlp += 4 * n * sh.active_ffn * c  # gate, SiLU(gate), up, and the product
    if spec.experts > 1:
        # router logits (fp32 softmax under autocast) and routing weights per token
        mlp += n * spec.experts * (FP32 + c) + n * spec.experts_per_token * (FP32 + INT64)
    return {"norm": norm, "attention": attn, "mlp": mlp}


def block_saved_checkpointed(spec: ModelSpec, workload: Workload) -> dict[str, int]:
    """What one block keeps between forward and backward under ``workload.checkpointing``."""
    full = block_saved(spec, workload)
    if workload.checkpointing is Checkpointing.none:
        return full
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    if workload.checkpointing is Checkpointing.full:
        # only the block input survives; the rest is recomputed in backward
        return {"norm": 0, "attention": 0, "mlp": 0, "checkpoint": sh.tokens * sh.hidden * dt.residual}
    # selective: the attention core (softmax(QK^T)V) is recomputed; its inputs q, k, v and its
    # output stay (they are saved by the projections around it); statistics/probabilities go
    kept = dict(full)
    if workload.attention is Attention.flash:
        kept["attention"] -= sh.batch * sh.heads * sh.seq * FP32
    else:
        scores = sh.batch * sh.heads * sh.seq * sh.seq
        kept["attention"] -= scores * dt.softmax + (scores * dt.compute if dt.autocast else 0)
    return kept


def block_forward_transient(spec: ModelSpec, workload: Workload) -> int:
    """Largest short-lived bytes inside one block's forward beyond what it saves."""
    spec = spec.resolved()
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c = sh.tokens, sh.hidden, dt.compute
    # the fp32 norm output before autocast casts it, or the pre-RoPE q/k
    norm_out = n * h * FP32 if dt.autocast else 0
    pre_rope = n * (sh.q_width + sh.kv_width) * c if spec.positions is Positions.rope else 0
    transient = max(norm_out, pre_rope)
    if workload.attention is Attention.eager:
        scores = sh.batch * sh.heads * sh.seq * sh.seq
        # raw scores and the masked copy exist before softmax (plus its fp32 input under autocast)
        transient = max(transient, scores * (2 * c + (FP32 if dt.autocast else 0)))
    return transient


def block_backward_transient(spec: ModelSpec, workload: Workload) -> int:
    """Largest short-lived bytes inside one block's backward: activation gradients."""
    spec = spec.resolved()
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c = sh.tokens, sh.hidden, dt.compute
    grad_stream = 2 * n * h * dt.residual  # incoming and outgoing residual gradients
    if spec.mlp is Mlp.gelu:
        mlp = 2 * n * sh.active_ffn * c
    else:
        mlp = 3 * n * sh.active_ffn * c
    attn = n * (sh.q_width * 3) * c + n * sh.q_width * c
    if workload.attention is Attention.eager:
        scores = sh.batch * sh.heads * sh.seq * sh.seq
        attn += scores * (2 * dt.softmax + (c if dt.autocast else 0))
    return grad_stream + max(mlp, attn)
