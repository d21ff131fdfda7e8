"""Tensors autograd saves for backward, per transformer block, and the block's transients.

Each term names a tensor the reference block (``vramfit.measure.models``, which follows
Hugging Face's GPT-2 / Llama modeling code) keeps alive between its forward and its
backward, in the dtype that tensor really has. The layout follows Korthikanti et al.
2022 ("Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198,
section 4.1: ``s*b*h*(34 + 5*a*s/h)`` bytes per 16-bit GPT layer with dropout); we drop the
dropout masks (no dropout), count SwiGLU's three projections, GQA K/V widened by
``repeat_kv``, fp32 norms and residuals under autocast, one 16-bit copy of the normed input
per projection under autocast (autocast does not cache casts of activations), and flash
attention's O(s) softmax statistics instead of the s x s probabilities (Dao et al. 2022).
Checked tensor by tensor against the forward-end memory of small models on an H200
(benchmarks/data/h200-run1/saved.json).
"""

from __future__ import annotations

from dataclasses import dataclass

from vramfit.config import (
    Arch,
    Attention,
    Checkpointing,
    Mlp,
    ModelSpec,
    Norm,
    Positions,
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


def block_tensors(spec: ModelSpec, workload: Workload) -> dict[str, list[int]]:
    """Tensors one block keeps between its forward and its backward, by part (bytes each).

    ``norm``: the two residual-stream inputs of the norms and their statistics.
    ``attention``: the normed input as the q/k/v projections see it, q/k/v as attention
    sees them (RoPE writes new q and k; ``repeat_kv`` widens K/V to every head), the
    attention output (saved by the output projection) and softmax statistics/probabilities.
    ``mlp``: the normed input as the up/gate projections see it and the intermediates.

    Selective checkpointing recomputes the attention core (``repeat_kv`` + attention): its
    inputs stay with the checkpoint, its output with the output projection, and the widened
    K/V and the statistics/probabilities go. Full checkpointing keeps only the block input.
    """
    spec = spec.resolved()
    assert spec.norm and spec.mlp
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c = sh.tokens, sh.hidden, dt.compute
    if workload.checkpointing is Checkpointing.full:
        return {"norm": [], "attention": [], "mlp": [], "checkpoint": [n * h * dt.residual]}
    core_recomputed = workload.checkpointing is Checkpointing.selective
    fused_qkv = spec.arch is Arch.gpt2  # GPT-2's c_attn is one projection; Llama has three

    norm = [n * h * dt.residual, *norm_stats(n, spec.norm)] * 2

    # under autocast every Linear casts its own copy of the fp32 normed input
    attn = [n * h * c] * (1 if fused_qkv or not dt.autocast else 3)
    if fused_qkv:
        attn.append(n * (sh.q_width + 2 * sh.kv_width) * c)  # c_attn output, split into views
    else:
        attn += [n * sh.q_width * c, n * sh.kv_width * c, n * sh.kv_width * c]
    if sh.kv_heads < sh.heads and not core_recomputed:
        # repeat_kv copies; for Llama they replace the narrow K/V, which nothing else keeps
        wide = [n * sh.q_width * c] * 2
        if fused_qkv:
            attn += wide
        else:
            attn[-2:] = wide
    attn.append(n * sh.q_width * c)  # attention output
    if not core_recomputed:
        attn += attention_stats(sh, workload)

    gated = spec.mlp is Mlp.swiglu
    mlp = [n * h * c] * (2 if gated and dt.autocast else 1)
    mlp += [n * sh.active_ffn * c] * (4 if gated else 2)  # gate, SiLU, up, product / GELU in, out
    if spec.experts > 1:
        # router logits (softmax in fp32 under autocast) and top-k weights and indices
        mlp += [
            n * spec.experts * c,
            n * spec.experts * FP32,
            n * spec.experts_per_token * (FP32 + INT64),
        ]
    return {"norm": norm, "attention": attn, "mlp": mlp}


def block_saved(spec: ModelSpec, workload: Workload) -> dict[str, int]:
    """Bytes one block keeps between forward and backward, by part."""
    return {part: sum(sizes) for part, sizes in block_tensors(spec, workload).items()}


def block_forward_transient(spec: ModelSpec, workload: Workload) -> int:
    """Largest short-lived bytes inside one block's forward beyond what it saves."""
    spec = spec.resolved()
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c = sh.tokens, sh.hidden, dt.compute
    norm_out = n * h * FP32 if dt.autocast else 0  # fp32 norm output before autocast casts it
    pre_rope = n * (sh.q_width + sh.kv_width) * c if spec.positions is Positions.rope else 0
    transient = max(norm_out, pre_rope)
    if workload.attention is Attention.eager:
        # raw scores and the masked copy exist before softmax (plus its fp32 input under autocast)
        transient = max(transient, sh.scores * (2 * c + (FP32 if dt.autocast else 0)))
    return transient


def block_backward_transient(spec: ModelSpec, workload: Workload) -> int:
    """Largest short-lived bytes inside one block's backward: activation gradients."""
    spec = spec.resolved()
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c = sh.tokens, sh.hidden, dt.compute
    grad_stream = 2 * n * h * dt.residual  # incoming and outgoing residual gradients
    mlp = (2 if spec.mlp is Mlp.gelu else 3) * n * sh.active_ffn * c
    attn = n * (sh.q_width * 3) * c + n * sh.q_width * c
    if workload.attention is Attention.eager:
        attn += sh.scores * (2 * dt.softmax + (c if dt.autocast else 0))
    return grad_stream + max(mlp, attn)


def rope_tables(spec: ModelSpec, workload: Workload) -> list[int]:
    """RoPE cos and sin tables, (s, head_dim) each in the compute dtype, shared by all blocks."""
    spec = spec.resolved()
    if spec.positions is not Positions.rope:
        return []
    assert spec.head_dim
    return [workload.seq * spec.head_dim * dtypes_for(workload.precision).compute] * 2
