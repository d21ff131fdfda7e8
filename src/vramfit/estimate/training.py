"""The memory timeline of one training step: forward, backward, optimizer step.

Steady state (step 2 onward): optimizer state and both cuBLAS workspaces exist from
the start; ``zero_grad(set_to_none=True)`` runs before the forward, so gradients are
born during backward and live through the optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vramfit.config import Checkpointing, ModelSpec, Optimizer, Workload
from vramfit.estimate.activations import (
    FP32,
    INT64,
    block_backward_transient,
    block_forward_transient,
    block_tensors,
    norm_stats,
    rope_tables,
    shape_of,
)
from vramfit.estimate.dtypes import dtypes_for
from vramfit.estimate.params import Shape, count_params, param_tensors
from vramfit.estimate.timeline import Timeline

# 8-bit Adam keeps two uint8 states plus one fp32 absmax per 2048-value block (Dettmers et al.
# 2022, "8-bit Optimizers via Block-wise Quantization", section 2); tensors under 4096 values
# keep 32-bit states (bitsandbytes ``min_8bit_size``).
ADAM8BIT_BLOCK = 2048
ADAM8BIT_MIN_SIZE = 4096


def optimizer_state_tensors(
    optimizer: Optimizer, shapes: list[Shape], weight_bytes: int
) -> list[int]:
    """Bytes of each persistent optimizer-state tensor for parameters of ``shapes``."""
    out: list[int] = []
    for shape in shapes:
        elements = math.prod(shape)
        if optimizer in (Optimizer.adamw, Optimizer.adamw_fused):
            out += [elements * weight_bytes] * 2  # exp_avg, exp_avg_sq in the param dtype
        elif optimizer is Optimizer.sgd_momentum:
            out.append(elements * weight_bytes)  # momentum_buffer
        elif optimizer is Optimizer.adam_8bit:
            if elements < ADAM8BIT_MIN_SIZE:
                out += [elements * FP32] * 2
            else:  # uint8 state + fp32 absmax per block, for each of the two moments
                out += [elements + -(-elements // ADAM8BIT_BLOCK) * FP32] * 2
        elif optimizer is Optimizer.adafactor:
            # a row and a column second moment per matrix, a full variance per vector
            # (Shazeer & Stern 2018, section 3; torch.optim.Adafactor)
            out += (
                [shape[0] * weight_bytes, shape[1] * weight_bytes]
                if len(shape) == 2
                else [elements * weight_bytes]
            )
    return out


def build_training_timeline(
    spec: ModelSpec, workload: Workload, workspace_bytes: int, *, first_step: bool = False
) -> Timeline:
    """Allocations of one training step, tensor by tensor.

    Steady state (``first_step=False``): optimizer state and both cuBLAS workspaces exist
    from the start. The first step creates the workspaces at the first forward and backward
    matmul and the optimizer state lazily inside ``optimizer.step()`` (torch.optim
    ``_init_group``), which shapes how the caching allocator lays out its segments.
    """
    spec = spec.resolved()
    assert spec.norm and spec.vocab
    counts = count_params(spec)
    # a declared --params scales every per-parameter tensor by the same factor
    scale = (spec.params or counts.total) / counts.total
    dt = dtypes_for(workload.precision)
    sh = shape_of(spec, workload)
    n, h, c, v = sh.tokens, sh.hidden, dt.compute, sh.vocab
    layers = spec.layers
    tensors = param_tensors(spec)

    def sized(elements: Sequence[int], per_element: int | float) -> list[int]:
        return [round(e * scale * per_element) for e in elements]

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

    all_params = tensors.all(layers)
    t.alloc("weights", "weights", sized(all_params, dt.weight), start, end, persistent=True)
    t.alloc(
        "input ids and targets", "activations", [n * INT64, n * INT64], start, end, persistent=True
    )
    state_sizes = optimizer_state_tensors(
        Optimizer(workload.optimizer), tensors.all_shapes(layers), dt.weight
    )
    t.alloc(
        "optimizer state",
        "optimizer_state",
        sized(state_sizes, 1),
        step_pt if first_step else start,
        end,
        persistent=True,
    )
    # one cuBLAS workspace per handle: the forward thread's and the autograd engine's
    t.alloc(
        "cuBLAS workspace (forward)",
        "cublas_workspace",
        workspace_bytes,
        fwd[0] if first_step else start,
        end,
        persistent=True,
    )
    if not first_step:
        t.alloc(
            "cuBLAS workspace (backward)",
            "cublas_workspace",
            workspace_bytes,
            start,
            end,
            persistent=True,
        )

    t.alloc("RoPE tables", "activations", rope_tables(spec, workload), start, bwd[0])
    block_elements = [math.prod(shape) for shape in tensors.block]
    linear_elements = [math.prod(shape) for shape in tensors.block_linear]
    saved = block_tensors(spec, workload)
    recompute = block_tensors(
        spec, workload.model_copy(update={"checkpointing": Checkpointing.none})
    )
    fwd_tmp = block_forward_transient(spec, workload)
    bwd_tmp = block_backward_transient(spec, workload)
    for i in range(layers):
        for part, sizes in saved.items():
            t.alloc(f"block {i} {part}", "activations", sizes, fwd[i], bwd[i])
        t.alloc(f"block {i} forward temporaries", "activations", fwd_tmp, fwd[i], fwd[i])
        if dt.autocast:
            # autocast caches a 16-bit copy of each weight; saved tensors keep it to backward
            t.alloc(
                f"block {i} autocast weights",
                "autocast_weight_copies",
                sized(linear_elements, c),
                fwd[i],
                bwd[i],
            )
        if workload.checkpointing is Checkpointing.full:
            t.alloc(
                f"block {i} recomputed",
                "activations",
                [x for p in recompute.values() for x in p],
                bwd[i],
                bwd[i],
            )
        grad_tmp = sum(sized(linear_elements, c)) if dt.autocast else 0  # 16-bit grads pre-cast
        t.alloc(
            f"block {i} backward temporaries",
            "activation_grads",
            [bwd_tmp, grad_tmp],
            bwd[i],
            bwd[i],
        )
        t.alloc(f"block {i} grads", "gradients", sized(block_elements, dt.weight), bwd[i], end)

    # final norm + lm_head input, logits and the fp32 cross-entropy (HF upcasts logits)
    final_norm = [n * h * dt.residual, *norm_stats(n, spec.norm), n * h * c]
    t.alloc("final norm", "activations", final_norm, logits_pt, head_pt)
    upcast = [n * v * FP32] if c != FP32 else []
    t.alloc("logits", "logits", [n * v * c, *upcast], logits_pt, logits_pt)
    t.alloc("log_softmax output", "logits", n * v * FP32, logits_pt, loss_pt)
    t.alloc("loss gradients", "logits", [n * v * FP32, n * v * FP32], loss_pt, loss_pt)
    t.alloc("logits gradient", "logits", n * v * c, head_pt, head_pt)
    head_matrix = math.prod(tensors.lm_head)
    if dt.autocast:
        t.alloc(
            "lm_head autocast weight",
            "autocast_weight_copies",
            sized([head_matrix], c),
            logits_pt,
            head_pt,
        )
    # lm_head backward, in the order the allocator sees it (measured trace,
    # benchmarks/data/h200-traces): the weight gradient (16-bit first under autocast), the
    # backward thread's cuBLAS workspace on its first matmul, then the input gradient
    if dt.autocast:
        t.alloc(
            "lm_head 16-bit weight gradient",
            "activation_grads",
            sized([head_matrix], c),
            head_pt,
            head_pt,
        )
    # gradients of the final norm and lm_head (the embedding's, when tied: it is computed here)
    head_grads = [math.prod(shape) for shape in tensors.head] + ([head_matrix] if spec.tied else [])
    t.alloc("lm_head grads", "gradients", sized(head_grads, dt.weight), head_pt, end)
    if first_step:
        t.alloc(
            "cuBLAS workspace (backward)",
            "cublas_workspace",
            workspace_bytes,
            head_pt,
            end,
            persistent=True,
        )
    t.alloc("lm_head input gradient", "activation_grads", n * h * c, head_pt, head_pt)
    if spec.tied:
        # the embedding's own gradient is computed, then accumulated into the tied one
        t.alloc(
            "embedding gradient (accumulated)",
            "activation_grads",
            sized([head_matrix], dt.weight),
            embed_pt,
            embed_pt,
        )
        positions = [math.prod(shape) for shape in tensors.embeddings[1:]]
        t.alloc("position grads", "gradients", sized(positions, dt.weight), embed_pt, end)
    else:
        embeddings = [math.prod(shape) for shape in tensors.embeddings]
        t.alloc("embedding grads", "gradients", sized(embeddings, dt.weight), embed_pt, end)

    temp = optimizer_step_temporaries(Optimizer(workload.optimizer), all_params, dt.weight)
    t.alloc("optimizer step temporaries", "optimizer_temp", sized(temp, 1), step_pt, step_pt)
    return t


def optimizer_step_temporaries(
    optimizer: Optimizer, param_elements: list[int], weight_bytes: int
) -> list[int]:
    """Tensors allocated only while ``optimizer.step()`` runs (bytes each).

    foreach AdamW materialises ``sqrt(exp_avg_sq)`` for every parameter at once
    (torch/optim/adam.py ``_multi_tensor_adam``: ``exp_avg_sq_sqrt = torch._foreach_sqrt``);
    the fused kernel updates in place. foreach Adafactor builds a full-size variance
    estimate per matrix (torch/optim/_adafactor.py ``var_estimates = [row_var @ col_var]``).
    SGD updates in place.
    """
    if optimizer in (Optimizer.adamw, Optimizer.adafactor):
        return [e * weight_bytes for e in param_elements]
    return []
