"""Parameters, storage and optimizer state of LoRA / QLoRA fine-tuning. Pure: no torch.

What each function returns follows the library code it names (peft 0.21.2, bitsandbytes
0.50.2, transformers 5.17); tests/estimate/test_finetune.py checks it against the libraries
themselves on the CPU (peft's own parameter count, the tensors a real ``QuantState`` and a
real bitsandbytes optimizer hold).

Layer shapes are ``(out_features, in_features)``, as ``nn.Linear.weight`` holds them. GPT-2's
``Conv1D`` stores its weight transposed, ``(in, out)``, but peft reads ``in, out =
weight.shape`` for it (peft/tuners/lora/layer.py, ``fan_in_fan_out`` forced on), so its
adapters have the same shapes as a Linear's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from vramfit.config import (
    ALL_LINEAR,
    QUANT_STORAGE_BYTES,
    Arch,
    Lora,
    ModelSpec,
    Optimizer,
    PeftModelType,
    Quant,
    QuantKind,
)
from vramfit.estimate.params import param_tensors

Shape2 = tuple[int, int]


class LoraTargetError(ValueError):
    """A LoRA setting the architecture cannot take; ``field`` is its key in ``Lora``."""

    def __init__(self, field: str, reason: str, value: object) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.value = value


# peft 0.21.2 peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: the
# target_modules that LoraModel._prepare_adapter_config (peft/tuners/lora/model.py) fills in
# when LoraConfig.target_modules is None. phi3 has no entry: peft raises "Please specify
# `target_modules` or `target_parameters` in `peft_config`".
PEFT_DEFAULT_TARGETS: dict[PeftModelType, tuple[str, ...]] = {
    PeftModelType.llama: ("q_proj", "v_proj"),
    PeftModelType.mistral: ("q_proj", "v_proj"),
    PeftModelType.qwen2: ("q_proj", "v_proj"),
    PeftModelType.gemma: ("q_proj", "v_proj"),
    PeftModelType.gemma2: ("q_proj", "v_proj"),
    PeftModelType.gpt2: ("c_attn",),
}

_LLAMA_FAMILY = (
    PeftModelType.llama,
    PeftModelType.mistral,
    PeftModelType.qwen2,
    PeftModelType.gemma,
    PeftModelType.gemma2,
    PeftModelType.phi3,
)


@dataclass(frozen=True)
class BlockLinear:
    """One linear layer of a transformer block, as the Hugging Face module holds it."""

    path: str  # inside the block: "self_attn.q_proj", "mlp.c_proj"
    shape: Shape2  # (out_features, in_features)
    bias: bool

    @property
    def name(self) -> str:
        """The module's own name (the last part of its path)."""
        return self.path.rsplit(".", 1)[-1]


def default_model_type(spec: ModelSpec) -> PeftModelType:
    """The model_type a Lora without one means: gpt2 for arch gpt2, llama otherwise."""
    return PeftModelType.gpt2 if spec.arch is Arch.gpt2 else PeftModelType.llama


def block_linears(spec: ModelSpec, model_type: PeftModelType | None = None) -> list[BlockLinear]:
    """Every linear layer of one block in ``model.parameters()`` order (module registration
    order in the ``modeling_<type>.py`` ``__init__``s): Llama-family ``self_attn`` (q, k, v, o)
    then ``mlp`` (gate, up, down); Phi-3 registers ``o_proj`` before the fused ``qkv_proj``
    (modeling_phi3.py Phi3Attention) and fuses gate and up into ``gate_up_proj``; GPT-2
    ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``.
    Shapes come from ``params.param_tensors`` (the same reference modules)."""
    spec = spec.resolved()
    model_type = model_type or default_model_type(spec)
    assert spec.heads and spec.kv_heads and spec.head_dim and spec.ffn
    if spec.experts > 1:
        raise LoraTargetError("model_type", "mixture-of-experts models are not supported", None)
    h, ffn = spec.hidden, spec.ffn
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    qkv_bias, bias = bool(spec.bias or spec.qkv_bias), bool(spec.bias)
    if model_type is PeftModelType.gpt2:
        linears = [
            BlockLinear("attn.c_attn", (q + 2 * kv, h), qkv_bias),
            BlockLinear("attn.c_proj", (h, q), bias),
            BlockLinear("mlp.c_fc", (ffn, h), bias),
            BlockLinear("mlp.c_proj", (h, ffn), bias),
        ]
    elif model_type is PeftModelType.phi3:
        linears = [
            BlockLinear("self_attn.o_proj", (h, q), bias),
            BlockLinear("self_attn.qkv_proj", (q + 2 * kv, h), qkv_bias),
            BlockLinear("mlp.gate_up_proj", (2 * ffn, h), bias),
            BlockLinear("mlp.down_proj", (h, ffn), bias),
        ]
    else:
        linears = [
            BlockLinear("self_attn.q_proj", (q, h), qkv_bias),
            BlockLinear("self_attn.k_proj", (kv, h), qkv_bias),
            BlockLinear("self_attn.v_proj", (kv, h), qkv_bias),
            BlockLinear("self_attn.o_proj", (h, q), bias),
            BlockLinear("mlp.gate_proj", (ffn, h), bias),
            BlockLinear("mlp.up_proj", (ffn, h), bias),
            BlockLinear("mlp.down_proj", (h, ffn), bias),
        ]
    # the same parameters as params.param_tensors counts for the block (fused or not)
    tensors = param_tensors(spec)
    if sum(math.prod(x.shape) + (x.shape[0] if x.bias else 0) for x in linears) != sum(
        math.prod(s) for s in tensors.block_linear
    ):
        raise LoraTargetError(
            "model_type", f"a {model_type.value} block does not have these linear layers", None
        )
    return linears


def _matches(path: str, target: str) -> bool:
    # peft/tuners/tuners_utils.py check_target_module_exists: a list entry matches a module
    # whose full name equals it or ends with "." + entry
    return path == target or path.endswith("." + target)


def _model_type(spec: ModelSpec, lora: Lora) -> PeftModelType:
    model_type = lora.model_type or default_model_type(spec)
    if (model_type is PeftModelType.gpt2) != (spec.arch is Arch.gpt2):
        raise LoraTargetError(
            "model_type", f"{model_type.value} does not match arch {spec.arch.value}", model_type
        )
    return model_type


def lora_target_shapes(spec: ModelSpec, lora: Lora) -> list[BlockLinear]:
    """The block linears ``lora`` adapts, in parameter order; raises LoraTargetError naming
    the field for a target the model lacks, a model_type without a peft default, or a rank
    above a targeted layer's min(in, out)."""
    spec = spec.resolved()
    model_type = _model_type(spec, lora)
    linears = block_linears(spec, model_type)
    if lora.targets == ALL_LINEAR:
        # peft/tuners/tuners_utils.py _maybe_include_all_linear_layers: every nn.Linear /
        # Conv1D except the output embedding (lm_head); embeddings and norms are not linear
        chosen = list(linears)
    else:
        if lora.targets is None:
            defaults = PEFT_DEFAULT_TARGETS.get(model_type)
            if defaults is None:
                raise LoraTargetError(
                    "targets",
                    f"peft has no default target modules for model_type {model_type.value}; "
                    "list them or use all-linear",
                    None,
                )
            targets: list[str] = list(defaults)
        else:
            targets = list(lora.targets)
        for target in targets:
            if not any(_matches(x.path, target) for x in linears):
                names = ", ".join(x.name for x in linears)
                raise LoraTargetError(
                    "targets",
                    f"{target!r} is not a linear layer of a {model_type.value} block ({names})",
                    target,
                )
        chosen = [x for x in linears if any(_matches(x.path, t) for t in targets)]
    for x in chosen:
        if lora.r > min(x.shape):
            raise LoraTargetError(
                "r", f"{lora.r} exceeds min(in, out) = {min(x.shape)} of {x.path}", lora.r
            )
    return chosen


def int8_outlier_columns(spec: ModelSpec, outliers: dict[str, float]) -> dict[str, int]:
    """``Quant.int8_outliers`` as a column count per block-linear path (``mlp.down_proj``):
    each name matches as a peft target does (the path or its last parts); the fraction is
    of the layer's in_features. Raises LoraTargetError (field ``int8_outliers``) for a name
    the block lacks."""
    if not outliers:
        return {}
    linears = block_linears(spec)
    counts: dict[str, int] = {}
    for name, fraction in outliers.items():
        matched = [x for x in linears if _matches(x.path, name)]
        if not matched:
            names = ", ".join(x.name for x in linears)
            raise LoraTargetError(
                "int8_outliers", f"{name!r} is not a linear layer of the block ({names})", name
            )
        for x in matched:
            counts[x.path] = round(fraction * x.shape[1])
    return counts


def lora_tensors(spec: ModelSpec, lora: Lora) -> list[tuple[str, int, Shape2, Shape2]]:
    """``(module path, layer index, lora_A.weight shape, lora_B.weight shape)`` of every adapter
    in ``model.parameters()`` order: peft's lora.Linear registers ``lora_A`` as
    ``nn.Linear(in, r)`` (weight ``(r, in)``) and ``lora_B`` as ``nn.Linear(r, out)`` (weight
    ``(out, r)``), both without bias (peft/tuners/lora/layer.py LoraLayer.update_layer)."""
    spec = spec.resolved()
    chosen = lora_target_shapes(spec, lora)
    return [
        (x.path, layer, (lora.r, x.shape[1]), (x.shape[0], lora.r))
        for layer in range(spec.layers)
        for x in chosen
    ]


def trainable_shapes(spec: ModelSpec, lora: Lora) -> list[tuple[int, ...]]:
    """Shapes of every trainable tensor (lora_A, lora_B of each adapter) in the order the
    optimizer creates their state: ``model.parameters()`` order, as ``optimizer_state`` wants."""
    return [shape for _, _, a, b in lora_tensors(spec, lora) for shape in (a, b)]


def lora_params(spec: ModelSpec, lora: Lora) -> int:
    """Adapter parameters: r·(in + out) per adapted layer."""
    return sum(math.prod(a) + math.prod(b) for _, _, a, b in lora_tensors(spec, lora))


def packed_4bit_elements(elements: int, quant: Quant) -> int:
    """Elements of the packed tensor Params4bit holds: two 4-bit codes per byte, in
    ``quant_storage`` (bitsandbytes/backends/cuda/ops.py quantize_4bit:
    ``out = torch.empty(((n + 1) // (quant_storage.itemsize * 2), 1))``)."""
    return (elements + 1) // (QUANT_STORAGE_BYTES[quant.quant_storage] * 2)


def trainable_and_total(spec: ModelSpec, lora: Lora | None, quant: Quant | None) -> tuple[int, int]:
    """``(trainable, all)`` exactly as peft's ``print_trainable_parameters`` reports them
    (peft/peft_model.py get_nb_trainable_parameters).

    It sums ``numel()`` over ``named_parameters()`` (a tied lm_head counted once), except that
    a ``Params4bit`` counts ``numel() * 2 * element_size()``: the packed tensor's element count
    times the 4-bit codes each element holds, i.e. the layer's element count rounded up to a
    whole storage element. Int8Params keeps the layer's shape, so 8-bit counts are unchanged.
    Only the adapters are trainable (get_peft_model freezes the base; ``bias="none"``).
    """
    spec = spec.resolved()
    total = sum(param_tensors(spec).all(spec.layers))
    if quant is not None and quant.kind is not QuantKind.int8:
        model_type = lora.model_type if lora else None
        itemsize = QUANT_STORAGE_BYTES[quant.quant_storage]
        for x in block_linears(spec, model_type):
            n = math.prod(x.shape)
            total += spec.layers * (packed_4bit_elements(n, quant) * 2 * itemsize - n)
    trainable = lora_params(spec, lora) if lora is not None else 0
    return trainable, total + trainable


# --- bitsandbytes storage ---------------------------------------------------------------------

# bitsandbytes/functional.py get_4bit_type: a 16-entry fp32 code per quantized weight
_CODE_4BIT_ELEMENTS = 16
# quantize_blockwise for the nested absmax: blocksize 256 (functional.py quantize_4bit,
# ``quantize_blockwise(_absmax - offset, blocksize=256)``) with the 256-entry fp32 "dynamic"
# map, copied per weight (``code.to(A.device, copy=True)``)
_NESTED_BLOCKSIZE = 256
_CODE_8BIT_ELEMENTS = 256


def quantized_weight_tensors(shape: Shape2, quant: Quant) -> list[tuple[str, int]]:
    """``(name, bytes)`` of every device tensor bitsandbytes holds for one quantized linear
    weight of ``shape`` (out, in); the bias is not quantized and is not listed.

    4-bit (bitsandbytes/functional.py quantize_4bit, QuantState): ``weight`` the packed codes;
    ``absmax`` one fp32 per ``blocksize`` elements, or with double quant one uint8 per block
    plus ``nested_absmax`` (one fp32 per 256 blocks), ``nested_code`` (256 fp32) and
    ``offset`` (a 0-dim fp32, the mean of the absmax); ``code`` the 16-entry fp32 map.
    int8 (nn/modules.py Int8Params._quantize, int8_vectorwise_quant): ``weight`` int8 of the
    same shape and ``SCB`` one fp32 absmax per output row.
    """
    out_features, _ = shape
    elements = math.prod(shape)
    if quant.kind is QuantKind.int8:
        return [("weight", elements), ("SCB", 4 * out_features)]
    itemsize = QUANT_STORAGE_BYTES[quant.quant_storage]
    blocks = -(-elements // quant.blocksize)  # cuda/ops.py: blocks = -(n // -blocksize)
    tensors = [("weight", packed_4bit_elements(elements, quant) * itemsize)]
    if quant.double_quant:
        tensors += [
            ("absmax", blocks),
            ("nested_absmax", 4 * -(-blocks // _NESTED_BLOCKSIZE)),
            ("nested_code", 4 * _CODE_8BIT_ELEMENTS),
            ("offset", 4),
        ]
    else:
        tensors.append(("absmax", 4 * blocks))
    tensors.append(("code", 4 * _CODE_4BIT_ELEMENTS))
    return tensors


@dataclass(frozen=True)
class WeightStorage:
    """Bytes of a fine-tuned model's parameters and quantization state, by part.
    ``total`` is computed from the parts."""

    linear_weights: int  # block linear weights: packed 4-bit / int8, or in the base dtype
    quant_state: int  # absmax, nested absmax, codes, offsets (4-bit); SCB (int8)
    other: int  # embeddings, positions, norms, biases, lm_head: never quantized
    adapters: int  # LoRA A and B, fp32

    @property
    def parts(self) -> dict[str, int]:
        return {
            "linear_weights": self.linear_weights,
            "quant_state": self.quant_state,
            "other": self.other,
            "adapters": self.adapters,
        }

    @property
    def total(self) -> int:
        return sum(self.parts.values())


# peft casts fp16/bf16 adapter weights to fp32 (get_peft_model(autocast_adapter_dtype=True),
# peft/tuners/tuners_utils.py cast_adapter_dtype), whatever the base model's dtype
LORA_WEIGHT_BYTES = 4


def weight_storage(
    spec: ModelSpec,
    lora: Lora | None,
    quant: Quant | None,
    *,
    base_bytes: int = 2,
    prepared_for_kbit: bool = False,
) -> WeightStorage:
    """Bytes of every parameter and quantization tensor of ``spec`` loaded with ``base_bytes``
    per element (``torch_dtype``), quantized by ``quant`` and adapted by ``lora``.

    transformers quantizes every ``nn.Linear`` / ``Conv1D`` except the output embedding and
    tied weights (integrations/bitsandbytes.py replace_with_bnb_linear; quantizers/base.py
    get_keys_to_not_convert, used when ``llm_int8_skip_modules`` is None, its default): the
    block linears here. ``prepared_for_kbit``: peft's ``prepare_model_for_kbit_training`` casts
    every fp16/bf16 parameter that is not a Params4bit to fp32 (peft/utils/other.py), which
    includes the embeddings, lm_head, norms and biases (Int8Params are int8: not cast).
    """
    spec = spec.resolved()
    model_type = lora.model_type if lora else None
    linears = block_linears(spec, model_type)
    all_elements = sum(param_tensors(spec).all(spec.layers))
    linear_elements = spec.layers * sum(math.prod(x.shape) for x in linears)
    other_elements = all_elements - linear_elements
    other_bytes = 4 if prepared_for_kbit and base_bytes == 2 else base_bytes
    adapters = LORA_WEIGHT_BYTES * lora_params(spec, lora) if lora is not None else 0
    if quant is None:
        linear_bytes = base_bytes * linear_elements
        if prepared_for_kbit and base_bytes == 2:
            linear_bytes = 4 * linear_elements
        return WeightStorage(linear_bytes, 0, other_bytes * other_elements, adapters)
    data = stats = 0
    for x in linears:
        for name, nbytes in quantized_weight_tensors(x.shape, quant):
            if name == "weight":
                data += nbytes
            else:
                stats += nbytes
    return WeightStorage(
        spec.layers * data, spec.layers * stats, other_bytes * other_elements, adapters
    )


# --- optimizers -------------------------------------------------------------------------------


class StateOptimizer(str, Enum):
    """The optimizer classes behind the Hugging Face Trainer's ``optim=`` names."""

    torch_adamw = "torch.optim.AdamW"  # foreach (default) or fused
    bnb_adamw_8bit = "bitsandbytes.optim.AdamW(optim_bits=8)"
    bnb_paged_adamw_8bit = "bitsandbytes.optim.AdamW(optim_bits=8, is_paged=True)"
    bnb_paged_adamw_32bit = "bitsandbytes.optim.AdamW(optim_bits=32, is_paged=True)"
    adafactor = "transformers.optimization.Adafactor"
    sgd = "torch.optim.SGD"


# The class each --optimizer builds, where the state is this module's to describe (the Trainer
# names that build them: vramfit.config.TRAINER_OPTIM)
STATE_OPTIMIZER: dict[Optimizer, StateOptimizer] = {
    Optimizer.adam_8bit: StateOptimizer.bnb_adamw_8bit,
    Optimizer.paged_adamw_8bit: StateOptimizer.bnb_paged_adamw_8bit,
    Optimizer.paged_adamw_32bit: StateOptimizer.bnb_paged_adamw_32bit,
    Optimizer.adafactor_hf: StateOptimizer.adafactor,
}

# bitsandbytes/optim/optimizer.py Optimizer2State.init_state (0.50.2)
BNB_STATE_BLOCKSIZE = 256  # "blocksize = 256": one fp32 absmax per 256 state elements
BNB_MIN_8BIT_SIZE = 4096  # min_8bit_size default: smaller tensors keep fp32 states
BNB_PAGED_MIN_ELEMENTS = 100_000  # get_state_buffer: "p.numel() < 1e5" is never paged
_BNB_QMAP_BYTES = 2 * 4 * 256  # the "dynamic" and "udynamic" maps, 256 fp32 each


@dataclass(frozen=True)
class OptimizerState:
    """Optimizer state bytes. ``device`` is in PyTorch's caching allocator; ``paged`` is CUDA
    managed memory from bitsandbytes' own ``cget_managed_ptr`` (functional.py get_paged),
    which ``torch.cuda.memory_allocated`` never sees and the driver may evict to the host.
    ``tensors`` lists ``(parameter index, state name, bytes, paged)``."""

    device: int
    paged: int
    tensors: tuple[tuple[int, str, int, bool], ...]

    @property
    def total(self) -> int:
        return self.device + self.paged


def optimizer_state(
    shapes: list[tuple[int, ...]],
    optimizer: StateOptimizer,
    *,
    param_bytes: int = 4,
    fp32_states: frozenset[int] = frozenset(),
) -> OptimizerState:
    """State every trainable parameter of ``shapes`` gets after the first ``step()``.

    bitsandbytes AdamW (optimizer.py Optimizer2State.init_state): a parameter with fewer than
    4096 elements gets two fp32 states ``state1``/``state2``; otherwise 8-bit gets two uint8
    states plus ``absmax1``/``absmax2`` (one fp32 per 256 elements) and shares the two 256-entry
    fp32 qmaps of the optimizer (listed once, index -1). Paged: ``state1``/``state2`` of a
    parameter with at least 1e5 elements go to managed memory; absmax and smaller states stay
    in the caching allocator. Adafactor (transformers optimization.py, beta1=None): fp32
    ``exp_avg_sq_row`` (shape[:-1]) and ``exp_avg_sq_col`` (shape[:-2] + shape[-1:]) for a
    tensor of two or more dims, else a full fp32 ``exp_avg_sq``, plus the 0-dim fp32 ``RMS``.
    torch AdamW: ``exp_avg``/``exp_avg_sq`` in the parameter's dtype (``param_bytes``); its
    0-dim ``step`` lives on the host unless fused/capturable (torch/optim/adam.py), not counted.
    ``fp32_states``: indices of parameters a ``GlobalOptimManager`` override gives 32-bit
    states (``{"optim_bits": 32}``: the Trainer does it for every ``nn.Embedding``).
    """
    tensors: list[tuple[int, str, int, bool]] = []
    eight_bit = optimizer in (StateOptimizer.bnb_adamw_8bit, StateOptimizer.bnb_paged_adamw_8bit)
    paged = optimizer in (
        StateOptimizer.bnb_paged_adamw_8bit,
        StateOptimizer.bnb_paged_adamw_32bit,
    )
    any_8bit = False
    for index, shape in enumerate(shapes):
        n = math.prod(shape)
        if optimizer is StateOptimizer.torch_adamw:
            tensors += [(index, "exp_avg", n * param_bytes, False)]
            tensors += [(index, "exp_avg_sq", n * param_bytes, False)]
        elif optimizer is StateOptimizer.sgd:
            continue  # momentum 0: no state
        elif optimizer is StateOptimizer.adafactor:
            if len(shape) >= 2:
                tensors.append((index, "exp_avg_sq_row", 4 * math.prod(shape[:-1]), False))
                tensors.append(
                    (index, "exp_avg_sq_col", 4 * math.prod(shape[:-2] + shape[-1:]), False)
                )
            else:
                tensors.append((index, "exp_avg_sq", 4 * n, False))
            tensors.append((index, "RMS", 4, False))
        else:
            is_paged = paged and n >= BNB_PAGED_MIN_ELEMENTS
            if eight_bit and n >= BNB_MIN_8BIT_SIZE and index not in fp32_states:
                any_8bit = True
                blocks = -(-n // BNB_STATE_BLOCKSIZE)
                tensors += [
                    (index, "state1", n, is_paged),
                    (index, "state2", n, is_paged),
                    (index, "absmax1", 4 * blocks, False),
                    (index, "absmax2", 4 * blocks, False),
                ]
            else:
                tensors += [(index, "state1", 4 * n, is_paged), (index, "state2", 4 * n, is_paged)]
    if any_8bit:
        tensors.append((-1, "qmap1+qmap2", _BNB_QMAP_BYTES, False))
    return OptimizerState(
        device=sum(b for _, _, b, p in tensors if not p),
        paged=sum(b for _, _, b, p in tensors if p),
        tensors=tuple(tensors),
    )


def optimizer_step_temporary_bytes(
    shapes: list[tuple[int, ...]], optimizer: StateOptimizer, *, param_bytes: int = 4
) -> int:
    """The largest transient allocation inside ``step()`` (parameters are updated one by one).

    bitsandbytes 8-bit and 32-bit AdamW: none. Optimizer2State.update_step calls
    ``p.data.contiguous()`` (a no-op on a contiguous parameter) and one CUDA kernel that updates
    ``p``, the states and absmax in place (backends/cuda/ops.py
    _optimizer_update_8bit_blockwise_impl / _optimizer_update_32bit_impl).
    Adafactor (optimization.py step): ``grad**2 + eps`` and ``_approx_sq_grad``'s product are
    both live (fp32, the parameter's size) when the product is made; a 16-bit parameter also
    gets fp32 copies of its gradient and of itself. torch AdamW and SGD: owned by the main
    training estimator (``--optimizer adamw``), returned as 0 here.
    """
    if optimizer is not StateOptimizer.adafactor:
        return 0
    worst = 0
    for shape in shapes:
        n = math.prod(shape)
        copies = 2 if param_bytes == 2 else 0  # grad.float(), p.float()
        worst = max(worst, 4 * n * (2 + copies))
    return worst
