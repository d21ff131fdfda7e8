"""Tensor parallel of a transformers Llama-style model: the plan, applied with DTensor.

``parallelize_module`` (``torch.distributed.tensor.parallel``) with the decoder-layer plan of
transformers' ``LlamaConfig.base_model_tp_plan`` and torchtitan's ``apply_tp`` for Llama:
``ColwiseParallel`` on q / k / v / gate / up (weight ``Shard(0)``, input ``Replicate``,
output ``Shard(-1)`` as a local tensor), ``RowwiseParallel`` on o / down (weight
``Shard(1)``, output all-reduced to ``Replicate``). The attention's ``view(*shape, -1,
head_dim)`` then runs on heads / T local heads.

With sequence parallel (torchtitan's plan, ``use_local_output=True`` throughout so that the
residual adds run on plain tensors): ``SequenceParallel`` on both norms of each layer
(``Shard(1)`` activations, replicated weights), ``PrepareModuleInput`` all-gathering the
attention's and the MLP's input to ``Replicate``, and o / down ``RowwiseParallel(output_layouts
=Shard(1))``, a reduce-scatter.

Embeddings, the final norm and lm_head stay replicated, as the estimator models them
(``vramfit.estimate.parallel.tp_block``); transformers' ``_tp_plan`` and torchtitan shard
lm_head too, which neither this plan nor the estimator does. Replicated parameters are
``Replicate`` DTensors (``distribute_module``'s default partition), as are the norms' without
sequence parallel: the optimizer's foreach kernels refuse a list that mixes DTensors and plain
tensors, and FSDP2 then shards every parameter over the same 2-D mesh. Their modules take
and return plain tensors (``DTensor.from_local`` in, ``to_local`` out: views, no copies).
With sequence parallel the first
layer takes this rank's ``seq / T`` rows of the embeddings' output (``Replicate`` to
``Shard(1)``: a local split), the final norm runs on them, and lm_head's input is all-gathered
back (``PrepareModuleInput``), so the rotary angles and the masks, made by the model from the
full embeddings, see every position.
"""

from __future__ import annotations

from typing import Any

from vramfit.config import ModelSpec, ModelType, Parallel
from vramfit.errors import VramfitError

_PLAIN = {ModelType.llama, ModelType.mistral, ModelType.qwen2}


def check_tp_measurable(spec: ModelSpec) -> None:
    """The plan names q_proj ... down_proj: Llama-style models without experts."""
    if spec.model_type not in _PLAIN or spec.experts > 1:
        raise VramfitError(
            "measure --tp runs Llama-style models (llama, mistral, qwen2) only",
            field="--tp",
        )


def layer_plan(sp: bool) -> dict[str, Any]:
    """The plan of one decoder layer (module names relative to the layer)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan: dict[str, Any] = {
        name: ColwiseParallel()
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj")
    }
    rowwise = {"output_layouts": Shard(1)} if sp else {}
    plan["self_attn.o_proj"] = RowwiseParallel(**rowwise)
    plan["mlp.down_proj"] = RowwiseParallel(**rowwise)
    if sp:
        plan["input_layernorm"] = SequenceParallel()
        plan["post_attention_layernorm"] = SequenceParallel()
        # LlamaDecoderLayer calls self_attn(hidden_states=...) and self.mlp(hidden_states);
        # the gathered input stays a DTensor, so that q/k/v (gate/up) share it and its
        # backward reduce-scatters their summed Partial gradient once (torchtitan's plan)
        plan["self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        )
        plan["mlp"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        )
    return plan


def parallelize(torch: Any, model: Any, par: Parallel, device: str) -> Any:
    """Apply the plan to ``model`` (on the meta device) over the "tp" mesh dimension; returns
    the device mesh: 1-D ("tp",) for TP alone, 2-D ("dp", "tp") under FSDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        PrepareModuleInput,
        SequenceParallel,
        parallelize_module,
    )

    device_type = torch.device(device).type
    if par.dp > 1:
        mesh = init_device_mesh(device_type, (par.dp, par.tp), mesh_dim_names=("dp", "tp"))
    else:
        mesh = init_device_mesh(device_type, (par.tp,), mesh_dim_names=("tp",))
    tp_mesh = mesh["tp"]
    layers = model.model.layers
    for layer in layers:
        parallelize_module(layer, tp_mesh, layer_plan(par.sp))
    for layer in layers:
        if not par.sp:
            _replicate(layer.input_layernorm, tp_mesh)
            _replicate(layer.post_attention_layernorm, tp_mesh)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    _replicate(model.model.embed_tokens, tp_mesh)
    if tied:  # distribute_module registers new parameters: tie lm_head to the new one
        model.lm_head.weight = model.model.embed_tokens.weight
    if not par.sp:
        _replicate(model.model.norm, tp_mesh)
    # a DTensor already (tied) is left as it is; with SP its input is all-gathered
    _replicate(model.lm_head, tp_mesh, Shard(1) if par.sp else Replicate())
    if par.sp:
        parallelize_module(
            model,
            tp_mesh,
            {
                "model.layers.0": PrepareModuleInput(
                    input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                    use_local_output=True,
                ),
                "model.norm": SequenceParallel(use_local_output=True),
            },
        )
    return mesh


def _replicate(module: Any, mesh: Any, layout: Any = None) -> None:
    """``module``'s parameters as ``Replicate`` DTensors; it takes plain tensors laid out as
    ``layout`` (default ``Replicate``; ``Shard(1)`` is all-gathered first) and returns plain
    tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def wrap(_module: Any, inputs: tuple, device_mesh: Any) -> tuple:
        return tuple(
            DTensor.from_local(
                x, device_mesh, [layout or Replicate()], run_check=False
            ).redistribute(device_mesh, [Replicate()])
            if hasattr(x, "dim") and not isinstance(x, DTensor) else x
            for x in inputs
        )

    def unwrap(_module: Any, output: Any, _device_mesh: Any) -> Any:
        return output.to_local() if isinstance(output, DTensor) else output

    distribute_module(module, mesh, input_fn=wrap, output_fn=unwrap)
