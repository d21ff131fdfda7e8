"""The memory timeline of inference: prefill of the prompt, then token-by-token decode.

Under ``torch.inference_mode`` nothing is saved for backward, so the peak is the
weights, the KV cache and the largest working set of one block. The KV cache holds
``2 * layers * batch * kv_heads * head_dim * tokens`` elements (keys and values; GQA
shares each K/V head among ``heads / kv_heads`` query heads: Ainslie et al. 2023).
"""

from __future__ import annotations

import math

from vramfit.config import Attention, Mlp, ModelSpec, Workload
from vramfit.estimate.activations import FP32, INT64, shape_of
from vramfit.estimate.dtypes import dtypes_for, kv_bytes
from vramfit.estimate.params import count_params, param_tensors
from vramfit.estimate.timeline import Timeline


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


def prefill_working_set(spec: ModelSpec, workload: Workload) -> int:
    """Largest set of short-lived tensors while one block runs on the whole prompt."""
    spec = spec.resolved()
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c = sh.tokens, sh.hidden, dt.compute
    residual = 2 * n * h * dt.residual  # block input and the running sum
    normed = n * h * (c + (FP32 if dt.autocast else 0))
    kv_seen = sh.q_width if sh.kv_heads < sh.heads else sh.kv_width
    attn = normed + n * (2 * sh.q_width + 2 * kv_seen) * c  # q, k, v, output
    if workload.attention is Attention.eager:
        attn += 2 * sh.batch * sh.heads * sh.seq * sh.seq * dt.softmax
    mlp_live = 2 if spec.mlp is Mlp.gelu else 3  # GELU in/out; SiLU(gate), up, product
    mlp = n * h * c + mlp_live * n * sh.active_ffn * c
    return residual + max(attn, mlp)


def build_inference_timeline(spec: ModelSpec, workload: Workload, workspace_bytes: int) -> Timeline:
    """Allocations of a prefill (and, with ``gen_tokens``, decode) pass."""
    spec = spec.resolved()
    counts = count_params(spec)
    params = spec.params or counts.total
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    t = Timeline()
    start = t.point("prefill", "start")
    blocks = [t.point("prefill", f"block {i}") for i in range(spec.layers)]
    logits_pt = t.point("prefill", "logits")
    decode_pt = t.point("decode", "last token") if workload.gen_tokens else None
    end = t.last

    scale = params / counts.total
    tensors = param_tensors(spec)
    weights = [round(e * scale * dt.weight) for e in tensors.all(spec.layers)]
    t.alloc("weights", "weights", weights, start, end, persistent=True)
    t.alloc("input ids", "activations", sh.tokens * INT64, start, end, persistent=True)
    t.alloc("cuBLAS workspace", "cublas_workspace", workspace_bytes, start, end, persistent=True)
    if workload.gen_tokens:
        per_tensor = kv_cache_bytes(spec, workload) // (2 * spec.layers)
        t.alloc(
            "KV cache", "kv_cache", [per_tensor] * (2 * spec.layers), start, end, persistent=True
        )
    if dt.autocast:
        # under inference_mode autocast keeps no cast cache: each block casts its weights
        # to 16 bits as it runs and drops them after (measured: benchmarks/data/h200-run1)
        casts = [round(math.prod(s) * scale * dt.compute) for s in tensors.block_linear]
        for i, point in enumerate(blocks):
            t.alloc(f"block {i} autocast weights", "autocast_weight_copies", casts, point, point)
        head = round(math.prod(tensors.lm_head) * dt.compute)
        t.alloc("lm_head autocast weight", "autocast_weight_copies", head, logits_pt, logits_pt)
    working = prefill_working_set(spec, workload)
    for i, point in enumerate(blocks):
        t.alloc(f"block {i} working set", "activations", working, point, point)
    # only the last position's logits are computed (as HF generate does)
    t.alloc("logits", "logits", sh.batch * sh.vocab * dt.compute, logits_pt, logits_pt)
    if decode_pt is not None:
        total = workload.seq + workload.gen_tokens
        widened = 2 * sh.batch * sh.q_width * total * dt.compute if sh.kv_heads < sh.heads else 0
        scores = (
            sh.batch * sh.heads * total * dt.softmax if workload.attention is Attention.eager else 0
        )
        t.alloc(
            "decode working set",
            "activations",
            widened + scores + sh.batch * sh.vocab * dt.compute,
            decode_pt,
            decode_pt,
        )
    return t
