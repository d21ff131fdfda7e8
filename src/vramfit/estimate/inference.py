"""The memory timeline of inference: prefill of the prompt, then token-by-token decode.

Under ``torch.inference_mode`` nothing is saved for backward, so the peak is the
weights, the KV cache and the largest working set of one block, plus what the caching
allocator holds of the blocks' intermediates. The KV cache holds
``2 * layers * batch * kv_heads * head_dim * tokens`` elements (keys and values; GQA
shares each K/V head among ``heads / kv_heads`` query heads: Ainslie et al. 2023).
"""

from __future__ import annotations

import math

from vramfit.config import Arch, Attention, Mlp, ModelSpec, Positions, Workload
from vramfit.estimate.activations import FP32, INT64, attention_stats, norm_stats, shape_of
from vramfit.estimate.dtypes import dtypes_for, kv_bytes
from vramfit.estimate.params import count_params, param_tensors
from vramfit.estimate.timeline import Tape, Timeline


def kv_cache_bytes(spec: ModelSpec, workload: Workload) -> int:
    """Static KV cache for the prompt plus the generated tokens."""
    spec = spec.resolved()
    sh = shape_of(spec, workload)
    tokens = workload.seq + workload.gen_tokens
    if spec.sliding_window:
        # a sliding-window layer only ever attends to (and keeps) the last `window` tokens
        local = (
            spec.layers // spec.sliding_window_every
            if spec.sliding_window_every > 1
            else spec.layers
        )
        windowed = min(tokens, spec.sliding_window)
        per_token_layers = (spec.layers - local) * tokens + local * windowed
    else:
        per_token_layers = spec.layers * tokens
    return 2 * per_token_layers * sh.batch * sh.kv_width * kv_bytes(workload)


def build_inference_timeline(spec: ModelSpec, workload: Workload, workspace_bytes: int) -> Timeline:
    """Allocations of a prefill (and, with ``gen_tokens``, decode) pass, op by op.

    Under ``torch.inference_mode`` every tensor dies at its last use, so each block's
    intermediates come and go; the caching allocator keeps their segments, which is why the
    device holds more than the largest working set (measured: benchmarks/data/h200-traces).
    """
    spec = spec.resolved()
    counts = count_params(spec)
    scale = (spec.params or counts.total) / counts.total
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c, r = sh.tokens, sh.hidden, dt.compute, dt.residual
    tensors = param_tensors(spec)
    t = Tape(phase="prefill")
    act = "activations"

    t.op("start")
    t.persist(
        "weights", "weights", [round(e * scale * dt.weight) for e in tensors.all(spec.layers)]
    )
    t.persist("input ids", "activations", [n * INT64])
    if workload.gen_tokens:
        per_tensor = kv_cache_bytes(spec, workload) // (2 * spec.layers)
        t.persist("KV cache", "kv_cache", [per_tensor] * (2 * spec.layers))
    t.persist("cuBLAS workspace", "cublas_workspace", [workspace_bytes])

    def weight_cast(name: str, shapes: list[tuple[int, ...]]) -> None:
        # under inference_mode autocast keeps no cast cache: a 16-bit copy per use
        if dt.autocast:
            t.temp(
                f"{name} 16-bit weights",
                "autocast_weight_copies",
                sum(round(math.prod(s) * scale * dt.compute) for s in shapes),
            )

    def project(name: str, x: int | None, width: int, shapes: list[tuple[int, ...]]) -> int | None:
        cast = t.new(f"{name} 16-bit input", act, n * h * c) if dt.autocast else None
        weight_cast(name, shapes)
        out = t.new(name, act, n * width * c)
        t.free(cast)
        return out

    fused = spec.arch is Arch.gpt2
    widened = sh.kv_heads < sh.heads
    gated = spec.mlp is Mlp.swiglu
    norm_width = FP32 if dt.autocast else c
    t.op("embeddings")
    x = t.new("embedding output", act, n * h * r)
    block = tensors.block_linear
    for i in range(spec.layers):
        t.op(f"block {i} attention")
        normed = t.new(f"block {i} norm 1", act, n * h * norm_width)
        for size in norm_stats(n, spec.norm):
            t.temp(f"block {i} norm 1 statistics", act, size)
        if fused:
            qkv = project(f"block {i} q/k/v", normed, sh.q_width + 2 * sh.kv_width, list(block[:2]))
            q = k = v = qkv
        else:
            q = project(f"block {i} q", normed, sh.q_width, [block[0]])
            k = project(f"block {i} k", normed, sh.kv_width, [block[1]])
            v = project(f"block {i} v", normed, sh.kv_width, [block[2]])
        t.free(normed)
        if spec.positions is Positions.rope and not fused:
            t.op(f"block {i} rotary embedding")
            t.temp(f"block {i} rotary temporary", act, 2 * n * sh.q_width * c)
            q_rot = t.new(f"block {i} rotated q", act, n * sh.q_width * c)
            k_rot = t.new(f"block {i} rotated k", act, n * sh.kv_width * c)
            t.free(q, k)
            q, k = q_rot, k_rot
        t.op(f"block {i} attention core")
        wide = []
        if widened:
            wide = [t.new(f"block {i} widened {name}", act, n * sh.q_width * c) for name in "kv"]
        if workload.attention is Attention.eager:
            # scores, then the masked copy (the core's local ``scores`` until it returns), then
            # softmax (fp32 under autocast; see Dtypes.softmax_upcast), then its copy back to
            # 16 bits
            scores = t.new(f"block {i} scores", act, sh.scores * c)
            t.op(f"block {i} masked scores")
            masked = t.new(f"block {i} masked scores", act, sh.scores * c)
            t.free(scores)
            t.op(f"block {i} softmax")
            upcast = (
                t.new(f"block {i} fp32 scores", act, sh.scores * FP32)
                if dt.softmax_upcast
                else None
            )
            probs = t.new(f"block {i} softmax", act, sh.scores * dt.softmax)
            t.free(upcast)
            if dt.autocast:
                t.op(f"block {i} 16-bit softmax")
                probs16 = t.new(f"block {i} 16-bit softmax", act, sh.scores * c)
                t.free(probs)
                probs = probs16
            t.op(f"block {i} probs @ v")
            pv = t.new(f"block {i} probs @ v", act, n * sh.q_width * c)
            t.free(probs)
            t.op(f"block {i} attention output")
            t.free(pv, masked)
        else:
            t.temp(f"block {i} logsumexp", act, attention_stats(sh, workload)[0])
        out = t.new(f"block {i} attention output", act, n * sh.q_width * c)
        t.free(*wide)  # locals of the attention core
        t.op(f"block {i} output projection")
        proj = project(f"block {i} o", out, h, [block[-1 - (3 if gated else 2)]])
        t.free(out, q, k, v)  # q, k, v are the attention module's locals until it returns
        t.op(f"block {i} residual 1")
        x_mid = t.new(f"block {i} residual 1", act, n * h * r)
        t.free(proj, x)

        t.op(f"block {i} MLP")
        normed = t.new(f"block {i} norm 2", act, n * h * norm_width)
        f = n * sh.active_ffn * c
        first = project(f"block {i} MLP up", normed, sh.active_ffn, [])
        t.op(f"block {i} MLP activation")
        activated = t.new(f"block {i} MLP activation", act, f)
        t.free(first)
        if gated:
            up = project(f"block {i} MLP gate", normed, sh.active_ffn, [])
            t.op(f"block {i} MLP gate * up")
            product = t.new(f"block {i} MLP gate * up", act, f)
            t.free(activated, up)
            activated = product
        t.free(normed)
        t.op(f"block {i} MLP down projection")
        down = project(f"block {i} MLP down", activated, h, [])
        t.free(activated)
        t.op(f"block {i} residual 2")
        x = t.new(f"block {i} output", act, n * h * r)
        t.free(down, x_mid)
    t.op("final norm and logits")
    normed = t.new("final norm", act, n * h * norm_width)
    t.free(x)
    weight_cast("lm_head", [tensors.lm_head])
    t.free(normed, t.new("logits", "logits", sh.batch * sh.vocab * c))  # last position only
    if workload.gen_tokens:
        t.phase = "decode"
        t.op("last token")
        total = workload.seq + workload.gen_tokens
        if widened:  # repeat_kv widens one layer's whole cache for every new token
            t.temp("widened KV cache", act, 2 * sh.batch * sh.q_width * total * c)
        if kv_bytes(workload) != c:  # a cache in another dtype is converted for attention
            t.temp("converted KV cache", act, 2 * sh.batch * sh.kv_width * total * c)
        if workload.attention is Attention.eager:
            t.temp("decode scores", act, 2 * sh.batch * sh.heads * total * dt.softmax)
        t.temp("decode logits", "logits", sh.batch * sh.vocab * c)
    return t.finish()
