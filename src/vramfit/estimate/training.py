"""The memory timeline of one training step: forward, backward, optimizer step.

Steady state (step 2 onward): optimizer state and both cuBLAS workspaces exist from
the start; ``zero_grad(set_to_none=True)`` runs before the forward, so gradients are
born during backward and live through the optimizer step.
"""

from __future__ import annotations

from vramfit.config import Checkpointing, Mlp, ModelSpec, Optimizer, Positions, Workload
from vramfit.estimate.activations import (
    FP32,
    block_backward_transient,
    block_forward_transient,
    block_saved,
    block_saved_checkpointed,
    shape_of,
)
from vramfit.estimate.dtypes import dtypes_for
from vramfit.estimate.params import ParamCounts, count_params, norm_params
from vramfit.estimate.timeline import Timeline

# 8-bit Adam keeps two uint8 states plus one fp32 absmax per 2048-value block (Dettmers et al.
# 2022, "8-bit Optimizers via Block-wise Quantization", section 2); tensors under 4096 values
# keep 32-bit states (bitsandbytes ``min_8bit_size``).
ADAM8BIT_BLOCK = 2048
ADAM8BIT_MIN_SIZE = 4096


def optimizer_state_bytes(optimizer: Optimizer, counts: ParamCounts, weight_bytes: int, spec: ModelSpec) -> int:
    """Persistent optimizer state for all trainable parameters."""
    p = counts.total
    if optimizer in (Optimizer.adamw, Optimizer.adamw_fused):
        return 2 * p * weight_bytes  # exp_avg and exp_avg_sq in the parameter dtype (torch AdamW)
    if optimizer is Optimizer.sgd_momentum:
        return p * weight_bytes  # momentum_buffer
    if optimizer is Optimizer.adam_8bit:
        # norm weights narrower than min_8bit_size keep two fp32 states
        small = counts.norms if spec.hidden < ADAM8BIT_MIN_SIZE else 0
        large = p - small
        return round(2 * large * (1 + FP32 / ADAM8BIT_BLOCK)) + 2 * small * FP32
    if optimizer is Optimizer.adafactor:
        return weight_bytes * _adafactor_state_elements(spec, counts)
    return 0  # sgd, none


def _adafactor_state_elements(spec: ModelSpec, counts: ParamCounts) -> int:
    """torch.optim.Adafactor keeps a row and a column second-moment vector per matrix and a
    full variance per vector (Shazeer & Stern 2018, section 3): rows + cols per matrix."""
    spec = spec.resolved()
    assert spec.vocab and spec.ffn and spec.expert_ffn
    h = spec.hidden
    mlp_matrices = 2 if spec.mlp is Mlp.gelu else 3
    ffn = spec.expert_ffn if spec.experts > 1 else spec.ffn
    experts = spec.experts + spec.shared_experts if spec.experts > 1 else 1
    per_layer = 4 * 2 * h + experts * mlp_matrices * (h + ffn)  # q, k, v, o ~ (h + h) each
    embeddings = (spec.vocab + h) * (1 if spec.tied else 2)
    positions = (spec.max_positions or 0) + h if counts.positions else 0
    return spec.layers * per_layer + embeddings + positions + counts.norms


def linear_params_per_layer(spec: ModelSpec, counts: ParamCounts) -> int:
    """Parameters of one block that autocast casts (everything but its norms)."""
    return (counts.attention + counts.mlp + counts.router) // spec.layers


def build_training_timeline(spec: ModelSpec, workload: Workload, workspace_bytes: int) -> Timeline:
    """Allocations of one steady-state training step."""
    spec = spec.resolved()
    assert spec.norm and spec.vocab
    counts = count_params(spec)
    params = spec.params or counts.total
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c, v = sh.tokens, sh.hidden, dt.compute, sh.vocab
    layers = spec.layers
    # a declared --params scales every per-parameter term by the same factor
    scale = params / counts.total
    w_layer = round(linear_params_per_layer(spec, counts) * scale)
    norm_layer = round(spec.norms_per_layer * norm_params(h, spec.norm) * scale)
    head_params = v * h

    t = Timeline()
    start = t.point("forward", "start")
    fwd = [t.point("forward", f"block {i}") for i in range(layers)]
    logits_pt = t.point("forward", "logits and loss")
    t.point("forward", "end")
    loss_pt = t.point("backward", "loss gradient")
    head_pt = t.point("backward", "lm_head")
    bwd = {i: t.point("backward", f"block {i}") for i in reversed(range(layers))}
    embed_pt = t.point("backward", "embeddings")
    step_pt = t.point("optimizer", "step")
    end = t.last

    # persistent: weights, optimizer state, cuBLAS workspaces (one per handle: the forward
    # thread and the autograd engine's backward thread each have one)
    t.alloc("weights", "weights", params * dt.weight, start, end)
    states = optimizer_state_bytes(Optimizer(workload.optimizer), counts, dt.weight, spec)
    t.alloc("optimizer state", "optimizer_state", round(states * scale), start, end)
    t.alloc("cuBLAS workspaces", "cublas_workspace", 2 * workspace_bytes, start, end)

    saved = block_saved_checkpointed(spec, workload)
    full = block_saved(spec, workload)
    fwd_tmp = block_forward_transient(spec, workload)
    bwd_tmp = block_backward_transient(spec, workload)
    for i in range(layers):
        for part, n_bytes in saved.items():
            t.alloc(f"block {i} {part}", "activations", n_bytes, fwd[i], bwd[i])
        t.alloc(f"block {i} forward temporaries", "activations", fwd_tmp, fwd[i], fwd[i])
        if dt.autocast:
            # autocast caches a 16-bit copy of each weight; saved tensors keep it to backward
            t.alloc(f"block {i} autocast weights", "autocast_weight_copies", w_layer * c, fwd[i], bwd[i])
        if workload.checkpointing is Checkpointing.full:
            t.alloc(f"block {i} recomputed", "activations", sum(full.values()), bwd[i], bwd[i])
        grad_tmp = w_layer * c if dt.autocast else 0  # 16-bit weight grad before its fp32 cast
        t.alloc(f"block {i} backward temporaries", "activation_grads", bwd_tmp + grad_tmp, bwd[i], bwd[i])
        t.alloc(f"block {i} grads", "gradients", (w_layer + norm_layer) * dt.weight, bwd[i], end)

    # final norm + lm_head input, logits and the fp32 cross-entropy (HF upcasts logits)
    final_norm = n * h * dt.residual + 2 * n * FP32 + n * h * c
    t.alloc("final norm", "activations", final_norm, logits_pt, head_pt)
    logits_16 = n * v * c
    upcast = n * v * FP32 if c != FP32 else 0
    t.alloc("logits", "logits", logits_16 + upcast, logits_pt, logits_pt)
    t.alloc("log_softmax output", "logits", n * v * FP32, logits_pt, loss_pt)
    t.alloc("loss gradients", "logits", 2 * n * v * FP32, loss_pt, loss_pt)
    t.alloc("logits gradient", "logits", n * v * c, head_pt, head_pt)
    if dt.autocast:
        t.alloc("lm_head autocast weight", "autocast_weight_copies", head_params * c, logits_pt, head_pt)
    head_grad_tmp = head_params * c if dt.autocast else 0
    t.alloc("lm_head backward temporaries", "activation_grads", n * h * c + head_grad_tmp, head_pt, head_pt)
    # gradients of lm_head (the embedding's when tied) and the final norm
    head_grad = round((head_params + norm_params(h, spec.norm)) * scale) * dt.weight
    t.alloc("lm_head grads", "gradients", head_grad, head_pt, end)
    if not spec.tied:
        t.alloc("embedding grads", "gradients", round(v * h * scale) * dt.weight, embed_pt, end)
    else:
        t.alloc("embedding gradient (accumulated into tied)", "activation_grads", v * h * dt.weight, embed_pt, embed_pt)
    if spec.positions is Positions.learned:
        t.alloc("position grads", "gradients", round(counts.positions * scale) * dt.weight, embed_pt, end)

    temp = optimizer_step_temporary(Optimizer(workload.optimizer), params, dt.weight)
    t.alloc("optimizer step temporaries", "optimizer_temp", temp, step_pt, step_pt)
    return t


def optimizer_step_temporary(optimizer: Optimizer, params: int, weight_bytes: int) -> int:
    """Bytes allocated only while ``optimizer.step()`` runs.

    foreach AdamW materialises ``sqrt(exp_avg_sq)`` for every parameter at once
    (torch/optim/adam.py ``_multi_tensor_adam``: ``exp_avg_sq_sqrt = torch._foreach_sqrt``);
    the fused kernel updates in place. foreach Adafactor builds a full-size variance
    estimate per matrix (torch/optim/_adafactor.py ``var_estimates = [row_var @ col_var]``).
    SGD updates in place.
    """
    if optimizer in (Optimizer.adamw, Optimizer.adafactor):
        return params * weight_bytes
    return 0
