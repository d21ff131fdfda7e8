"""Exact parameter counts derived from a ModelSpec.

Each part counts the tensors a reference implementation holds (the Hugging Face
``modeling_*.py`` files for GPT-2 / Llama / Mistral / Qwen2 / Gemma, which
vramfit's own torch models in ``vramfit.measure.models`` mirror). Checked against
published counts in the tests (GPT-2 small 124,439,808; Llama-2-7B 6,738,415,616).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vramfit.config import Arch, Mlp, ModelSpec, Norm, Positions


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts by part. ``total`` is computed from the parts."""

    embeddings: int
    positions: int
    attention: int  # all layers
    mlp: int  # all layers: dense MLP, or every expert + shared experts
    router: int  # all layers (MoE only)
    norms: int  # all layers + the final norm
    lm_head: int  # 0 when tied
    active_mlp: int  # MLP parameters one token passes through (== mlp when dense)

    @property
    def parts(self) -> dict[str, int]:
        return {
            "embeddings": self.embeddings,
            "positions": self.positions,
            "attention": self.attention,
            "mlp": self.mlp,
            "router": self.router,
            "norms": self.norms,
            "lm_head": self.lm_head,
        }

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def active(self) -> int:
        """Parameters used per token: the total less the experts a token is not routed to."""
        return self.total - self.mlp + self.active_mlp


def mlp_params(hidden: int, ffn: int, mlp: Mlp, bias: bool) -> int:
    """One MLP: GELU has up + down (GPT-2 ``c_fc``/``c_proj``); SwiGLU has gate, up and down
    (Shazeer 2020; Llama ``gate_proj``/``up_proj``/``down_proj``)."""
    matrices = 2 if mlp is Mlp.gelu else 3
    weights = matrices * hidden * ffn
    biases = (ffn * (matrices - 1) + hidden) if bias else 0
    return weights + biases


def attention_params(spec: ModelSpec) -> int:
    """One attention block: q (h x heads*hd), k and v (h x kv_heads*hd each), o (heads*hd x h)."""
    assert spec.heads and spec.kv_heads and spec.head_dim
    q_width = spec.heads * spec.head_dim
    kv_width = spec.kv_heads * spec.head_dim
    weights = spec.hidden * (q_width + 2 * kv_width) + q_width * spec.hidden
    qkv_bias = (q_width + 2 * kv_width) if (spec.bias or spec.qkv_bias) else 0
    o_bias = spec.hidden if spec.bias else 0
    return weights + qkv_bias + o_bias


def norm_params(hidden: int, norm: Norm) -> int:
    """LayerNorm: weight + bias (Ba et al. 2016); RMSNorm: weight only (Zhang & Sennrich 2019)."""
    return 2 * hidden if norm is Norm.layernorm else hidden


def count_params(spec: ModelSpec) -> ParamCounts:
    """Count every parameter of ``spec`` (resolved first, so family defaults apply)."""
    spec = spec.resolved()
    assert spec.vocab and spec.ffn and spec.expert_ffn and spec.shared_expert_ffn
    assert spec.norm and spec.mlp and spec.positions is not None
    h, layers = spec.hidden, spec.layers
    bias = bool(spec.bias)

    if spec.experts > 1:
        expert = mlp_params(h, spec.expert_ffn, spec.mlp, bias)
        shared = spec.shared_experts * mlp_params(h, spec.shared_expert_ffn, spec.mlp, bias)
        gate = h if spec.shared_expert_gate else 0  # Qwen2-MoE shared_expert_gate: h -> 1
        per_layer_mlp = spec.experts * expert + shared + gate
        per_layer_active = spec.experts_per_token * expert + shared + gate
        router = layers * h * spec.experts  # Mixtral / Qwen2-MoE gate: h -> experts, no bias
    else:
        per_layer_mlp = per_layer_active = mlp_params(h, spec.ffn, spec.mlp, bias)
        router = 0

    positions = (spec.max_positions or 0) * h if spec.positions is Positions.learned else 0
    return ParamCounts(
        embeddings=spec.vocab * h,
        positions=positions,
        attention=layers * attention_params(spec),
        mlp=layers * per_layer_mlp,
        router=router,
        norms=(layers * spec.norms_per_layer + 1) * norm_params(h, spec.norm),
        lm_head=0 if spec.tied else spec.vocab * h,
        active_mlp=layers * per_layer_active,
    )


ParamShape = tuple[int, ...]


def _elements(shapes: tuple[ParamShape, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape) for shape in shapes)


@dataclass(frozen=True)
class ParamTensors:
    """Shapes of every parameter tensor, grouped as the step touches them."""

    embeddings: tuple[ParamShape, ...]  # token embedding (+ learned positions)
    block: tuple[ParamShape, ...]  # one block: norms, attention, MLP
    block_linear: tuple[ParamShape, ...]  # the part of ``block`` that autocast casts (not norms)
    head: tuple[ParamShape, ...]  # final norm (+ lm_head when untied)
    lm_head: ParamShape  # the matrix lm_head multiplies by (the embedding when tied)

    def all_shapes(self, layers: int) -> list[ParamShape]:
        return [*self.embeddings, *(self.block * layers), *self.head]

    def all(self, layers: int) -> list[int]:
        """Element count of every parameter tensor, in model order."""
        return list(_elements(tuple(self.all_shapes(layers))))


def param_tensors(spec: ModelSpec) -> ParamTensors:
    """Every parameter tensor of the reference implementation (see ``count_params``)."""
    spec = spec.resolved()
    assert spec.heads and spec.kv_heads and spec.head_dim and spec.vocab and spec.ffn
    assert spec.norm and spec.mlp and spec.expert_ffn and spec.shared_expert_ffn
    h = spec.hidden
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    qkv_bias, bias = bool(spec.bias or spec.qkv_bias), bool(spec.bias)

    def linear(n_in: int, n_out: int, with_bias: bool) -> list[ParamShape]:
        return [(n_out, n_in)] + ([(n_out,)] if with_bias else [])

    def mlp(ffn: int) -> list[ParamShape]:
        if spec.mlp is Mlp.gelu:
            return linear(h, ffn, bias) + linear(ffn, h, bias)
        return linear(h, ffn, bias) + linear(h, ffn, bias) + linear(ffn, h, bias)

    if spec.arch is Arch.gpt2:  # one fused c_attn projection
        attn = linear(h, q + 2 * kv, qkv_bias)
    else:
        attn = linear(h, q, qkv_bias) + linear(h, kv, qkv_bias) + linear(h, kv, qkv_bias)
    attn += linear(q, h, bias)
    if spec.experts > 1:
        ffn_part = [(spec.experts, h)] + mlp(spec.expert_ffn) * spec.experts
        ffn_part += mlp(spec.shared_expert_ffn) * spec.shared_experts
        ffn_part += [(1, h)] if spec.shared_expert_gate else []
    else:
        ffn_part = mlp(spec.ffn)
    norm: list[ParamShape] = [(h,), (h,)] if spec.norm is Norm.layernorm else [(h,)]
    embeddings: list[ParamShape] = [(spec.vocab, h)]
    if spec.positions is Positions.learned:
        embeddings.append((spec.max_positions or 0, h))
    head = list(norm) + ([] if spec.tied else [(spec.vocab, h)])
    # model.parameters() order, which is the order optimizers create their state in:
    # norm_1, attention, norm_2, MLP for the pre-norm block (measure.models.Block)
    if spec.norms_per_layer == 2:
        block = norm + attn + norm + ffn_part
    else:
        block = norm * spec.norms_per_layer + attn + ffn_part
    return ParamTensors(
        embeddings=tuple(embeddings),
        block=tuple(block),
        block_linear=tuple(attn + ffn_part),
        head=tuple(head),
        lm_head=(spec.vocab, h),
    )


def tied_copy_bytes(spec: ModelSpec, scale: float, weight_bytes: int) -> int:
    """Bytes of the lm_head copy that a tied model materialises once, then frees.

    A model built on the meta device and materialised with ``Module.to_empty`` (as FSDP's
    deferred init and ``vramfit measure`` do) gets a fresh tensor per module parameter, so
    the tied lm_head receives its own storage after every other weight; re-tying it to the
    embedding frees that storage, but its segment stays cached (allocator traces of tied
    models, benchmarks/data/h200-traces: the second embedding-sized segment).
    """
    spec = spec.resolved()
    return round((spec.vocab or 0) * spec.hidden * scale * weight_bytes) if spec.tied else 0


def projection_shapes(spec: ModelSpec, kind: str) -> list[ParamShape]:
    """Parameter shapes of one block's projections of ``kind``, weight then bias of each:
    ``qkv`` (GPT-2's fused c_attn, or q, k, v), ``o``, ``up`` (gate and up, or GPT-2's fc,
    plus every expert's and the router's for MoE) and ``down``."""
    spec = spec.resolved()
    assert spec.heads and spec.kv_heads and spec.head_dim and spec.ffn
    h = spec.hidden
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    bias = bool(spec.bias)
    if kind == "qkv":
        qkv_bias = bias or bool(spec.qkv_bias)
        widths = [q + 2 * kv] if spec.arch is Arch.gpt2 else [q, kv, kv]
        return [s for wd in widths for s in [(wd, h)] + ([(wd,)] if qkv_bias else [])]
    if kind == "o":
        return [(h, q)] + ([(h,)] if bias else [])
    per = 2 if spec.mlp is Mlp.swiglu else 1

    def ups(ffn: int, count: int) -> list[ParamShape]:
        return [s for _ in range(count * per) for s in [(ffn, h)] + ([(ffn,)] if bias else [])]

    def downs(ffn: int, count: int) -> list[ParamShape]:
        return [s for _ in range(count) for s in [(h, ffn)] + ([(h,)] if bias else [])]

    if spec.experts > 1:
        assert spec.expert_ffn and spec.shared_expert_ffn
        if kind == "up":  # every expert's, and the router
            return (
                [(spec.experts, h)]
                + ups(spec.expert_ffn, spec.experts)
                + ups(spec.shared_expert_ffn, spec.shared_experts)
                + ([(1, h)] if spec.shared_expert_gate else [])
            )
        return downs(spec.expert_ffn, spec.experts) + downs(
            spec.shared_expert_ffn, spec.shared_experts
        )
    return ups(spec.ffn, 1) if kind == "up" else downs(spec.ffn, 1)
