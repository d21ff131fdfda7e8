"""What an optimizer keeps and what its step makes, for the training steps of every profile.

The training step itself (forward, backward, recompute under checkpointing) is a schedule
over a profile's graph of ops: ``vramfit.estimate.profiles.reference`` for vramfit's own
reference loop, ``vramfit.estimate.schedule`` for the hf profile.
"""

from __future__ import annotations

import math

from vramfit.config import Optimizer
from vramfit.estimate.activations import FP32
from vramfit.estimate.params import ParamShape

# 8-bit Adam keeps two uint8 states plus one fp32 absmax per 2048-value block (Dettmers et al.
# 2022, "8-bit Optimizers via Block-wise Quantization", section 2); tensors under 4096 values
# keep 32-bit states (bitsandbytes ``min_8bit_size``).
ADAM8BIT_BLOCK = 2048
ADAM8BIT_MIN_SIZE = 4096


def optimizer_state_tensors(
    optimizer: Optimizer, shapes: list[ParamShape], weight_bytes: int
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
            if len(shape) == 2:
                out += [shape[0] * weight_bytes, shape[1] * weight_bytes]
            else:
                out.append(elements * weight_bytes)
    return out


def optimizer_step_temporaries(
    optimizer: Optimizer, param_elements: list[int], weight_bytes: int
) -> list[int]:
    """Tensors allocated only while ``optimizer.step()`` runs (bytes each).

    foreach AdamW materialises ``sqrt(exp_avg_sq)`` for every parameter at once
    (torch/optim/adam.py ``_multi_tensor_adam``: ``exp_avg_sq_sqrt = torch._foreach_sqrt``);
    the fused kernel updates in place. Adafactor builds a full-size variance estimate per
    parameter (torch/optim/_adafactor.py ``var_estimate = row_var @ col_var``), one parameter
    at a time: its ``foreach=None`` default selects the single-tensor implementation
    (measured: benchmarks/data/h200-validation). SGD updates in place.
    """
    if optimizer in (Optimizer.adamw, Optimizer.adafactor):
        return [e * weight_bytes for e in param_elements]
    return []
