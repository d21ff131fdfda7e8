"""Config models (pydantic) and the one YAML loader.

A run is a ``ModelSpec`` (the architecture) plus a ``Workload`` (what is done with
it). Every field carries its range, so bad input fails here, naming the field,
before any arithmetic runs. ``load_yaml`` turns YAML and validation errors into
one ``VramfitError``.
"""

from __future__ import annotations

import os
import re
import stat
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vramfit.errors import VramfitError


class Arch(str, Enum):
    """Model family: sets the defaults of the mechanism fields below."""

    gpt2 = "gpt2"  # LayerNorm, GELU MLP, biases, learned positions, tied embeddings
    llama = "llama"  # RMSNorm, SwiGLU, RoPE, no biases, untied lm_head


class Norm(str, Enum):
    layernorm = "layernorm"  # weight + bias
    rmsnorm = "rmsnorm"  # weight only


class Mlp(str, Enum):
    gelu = "gelu"  # up (h x ffn) -> GELU -> down (ffn x h)
    swiglu = "swiglu"  # gate and up (h x ffn each) -> SiLU(gate) * up -> down


class Positions(str, Enum):
    learned = "learned"  # a max_positions x hidden table (GPT-2)
    rope = "rope"  # rotary, no parameters (Su et al. 2021)


class Mode(str, Enum):
    train = "train"
    infer = "infer"


class Precision(str, Enum):
    """How weights are stored and matmuls run.

    ``amp-*``: fp32 weights, grads and optimizer state; matmuls autocast to 16 bits.
    ``bf16`` / ``fp16``: weights, grads and optimizer state all in that dtype.
    """

    fp32 = "fp32"
    amp_fp16 = "amp-fp16"
    amp_bf16 = "amp-bf16"
    bf16 = "bf16"
    fp16 = "fp16"


class Optimizer(str, Enum):
    adamw = "adamw"  # torch.optim.AdamW() on CUDA: the foreach implementation
    adamw_foreach = "adamw-foreach"  # the same, named for what torch picks
    adamw_fused = "adamw-fused"  # torch.optim.AdamW(fused=True)
    adamw_forloop = "adamw-forloop"  # torch.optim.AdamW(fused=False) or foreach=False
    sgd = "sgd"
    sgd_momentum = "sgd-momentum"
    adam_8bit = "adam-8bit"  # bitsandbytes-style block-wise 8-bit states
    # bitsandbytes.optim.AdamW(optim_bits=8 / 32, is_paged=True): the large states in CUDA
    # managed memory, outside PyTorch's caching allocator (hf profile)
    paged_adamw_8bit = "paged-adamw-8bit"
    paged_adamw_32bit = "paged-adamw-32bit"
    adafactor = "adafactor"  # torch.optim.Adafactor: factored second moment (Shazeer & Stern 2018)
    # transformers.optimization.Adafactor as the Trainer builds it (optim="adafactor"): fp32
    # factored second moments, no first moment (hf profile)
    adafactor_hf = "adafactor-hf"
    none = "none"  # gradients only (e.g. a forward/backward benchmark)


# transformers 5.17 OptimizerNames (training_args.py) -> what trainer_optimizer.py builds:
# _get_adamw_torch passes neither foreach nor fused for adamw_torch (torch then picks foreach
# on CUDA) and fused=True for adamw_torch_fused, TrainingArguments' default on torch >= 2.8;
# _get_bitsandbytes_optimizer builds bnb.optim.AdamW with optim_bits = 8 if "8bit" in the name
# else 32 and is_paged = "paged" in the name; _get_adafactor builds transformers' Adafactor with
# scale_parameter=False, relative_step=False; _get_sgd builds torch.optim.SGD (momentum 0).
# The one table in both directions: a Trainer name given as ``optimizer`` means its value
# (except "adafactor" and "sgd", which are also vramfit's own names: torch.optim's classes);
# ``vramfit measure --impl hf`` passes the first name listed for an optimizer to the Trainer.
TRAINER_OPTIM: dict[str, Optimizer] = {
    "adamw_torch": Optimizer.adamw,
    "adamw_torch_fused": Optimizer.adamw_fused,
    "adamw_bnb_8bit": Optimizer.adam_8bit,
    "adamw_8bit": Optimizer.adam_8bit,  # an alias of adamw_bnb_8bit in OptimizerNames
    "paged_adamw_8bit": Optimizer.paged_adamw_8bit,
    "paged_adamw_32bit": Optimizer.paged_adamw_32bit,
    "adafactor": Optimizer.adafactor_hf,
    "sgd": Optimizer.sgd,
}


def trainer_optim_name(optimizer: Optimizer) -> str | None:
    """The Trainer ``optim=`` name that builds ``optimizer`` (None: the Trainer has none)."""
    if optimizer is Optimizer.adamw_foreach:  # what torch.optim.AdamW() runs on CUDA
        optimizer = Optimizer.adamw
    return next((name for name, o in TRAINER_OPTIM.items() if o is optimizer), None)


_OPTIMIZER_VALUES = frozenset(o.value for o in Optimizer)

# What only the hf profile models (bitsandbytes' paged state, transformers' Adafactor)
HF_ONLY_OPTIMIZERS = frozenset(
    {Optimizer.paged_adamw_8bit, Optimizer.paged_adamw_32bit, Optimizer.adafactor_hf}
)


class Attention(str, Enum):
    flash = "flash"  # fused SDPA kernels: no s x s scores kept
    eager = "eager"  # explicit softmax(QK^T)V: s x s scores and probabilities saved


class Checkpointing(str, Enum):
    none = "none"
    selective = "selective"  # recompute the attention core only (Korthikanti et al. 2022)
    full = "full"  # keep each block's input, recompute the block in backward


class Impl(str, Enum):
    """Which implementation's code runs the model (``vramfit.estimate.profiles``)."""

    hf = "hf"  # Hugging Face transformers 5.x modeling code
    reference = "reference"  # vramfit's own reference loop (vramfit.measure.models)


class ModelType(str, Enum):
    """The Hugging Face ``model_type`` whose modeling code the hf profile follows."""

    gpt2 = "gpt2"
    llama = "llama"
    mistral = "mistral"
    qwen2 = "qwen2"
    gemma = "gemma"
    gemma2 = "gemma2"
    phi3 = "phi3"
    gpt_neox = "gpt_neox"
    falcon = "falcon"
    mixtral = "mixtral"
    qwen2_moe = "qwen2_moe"


class Loop(str, Enum):
    """What the training loop around the model keeps alive (hf profile)."""

    trainer = "trainer"  # transformers.Trainer: outputs dropped before backward, use_cache off
    drops = "drops"  # loss = model(**batch).loss: the outputs die after the forward
    keeps_logits = "keeps-logits"  # outputs = model(**batch) held through backward and step


class Logits(str, Enum):
    """Which positions' logits an inference forward computes (hf profile)."""

    all = "all"  # an evaluation / scoring forward: model(input_ids) keeps every position
    last = "last"  # generate()'s prefill: logits_to_keep=1


class KvDtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    fp8 = "fp8"
    int8 = "int8"


class Formula(str, Enum):
    default = "default"  # vramfit's per-component, per-phase model
    seed = "seed"  # the origin notebook's formula, reproduced exactly


DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}

# Upper bounds on every size, far above any published model, so nonsense (a vocabulary of 2**63)
# is refused naming the field instead of becoming a number of exabytes. The largest published
# figures: hidden 25,600 (Megatron-Turing NLG 530B), 128 attention heads (Llama-3.1-405B),
# MLP width 73,728 (PaLM 540B), vocabulary 262,144 (Gemma 3), 256 routed experts (DeepSeek-V3),
# 126 layers (Llama-3.1-405B), 1.6T parameters (Switch-C). The bounds give each 8-60x room.
MAX_LAYERS = 512
MAX_WIDTH = 2**20  # hidden, head_dim
MAX_HEADS = 2**14
MAX_FFN = 2**22
MAX_VOCAB = 2**24
MAX_EXPERTS = 4096  # Switch-C: 2048 experts (Fedus et al. 2022)
MAX_SHARED_EXPERTS = 64  # DeepSeek-V2: 2; Qwen-MoE: 1
# Expert MLPs over the whole model: Kimi K2 has 61 x (384 + 1) = 23,485, Switch-C 15 x 2048. The
# estimate walks every expert's tensors, so this also bounds its time and memory.
MAX_EXPERT_LAYERS = 2**15
MAX_PARAMS = 10**15  # 1000T
# The smallest count that makes a transformer: one block of width 8 with a 16-token vocabulary
# already has ~1,000 parameters; `--params 2` is a typo, not a model.
MIN_PARAMS = 1000
MAX_TOKENS = 100_000_000  # seq, gen_tokens, positions, window: 100M tokens of context
MAX_BATCH = 10_000_000


class _Strict(BaseModel):
    # defer_build: a model's validator is built on first use, so `estimate` does not pay for
    # the ones it never touches (Preset, the catalog)
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class ModelSpec(_Strict):
    """The architecture of a decoder-only transformer.

    Fields left as ``None`` take the family default of ``arch`` (see ``resolved``).
    """

    arch: Arch = Field(default=Arch.llama, description="model family: gpt2 or llama")
    layers: int = Field(ge=1, le=MAX_LAYERS, description="transformer blocks")
    hidden: int = Field(ge=1, le=MAX_WIDTH, description="model (residual) width")
    heads: int | None = Field(default=None, ge=1, le=MAX_HEADS, description="attention heads")
    kv_heads: int | None = Field(
        default=None, ge=1, le=MAX_HEADS, description="key/value heads (GQA)"
    )
    head_dim: int | None = Field(default=None, ge=1, le=MAX_WIDTH, description="per-head width")
    ffn: int | None = Field(default=None, ge=1, le=MAX_FFN, description="MLP intermediate size")
    vocab: int | None = Field(default=None, ge=1, le=MAX_VOCAB, description="vocabulary size")
    max_positions: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TOKENS,
        description="learned position table length (learned positions only)",
    )
    tied: bool | None = Field(default=None, description="lm_head shares the embedding matrix")
    norm: Norm | None = None
    mlp: Mlp | None = None
    positions: Positions | None = None
    bias: bool | None = Field(default=None, description="biases on every linear layer and norm")
    qkv_bias: bool | None = Field(default=None, description="biases on q, k, v only (Qwen)")
    norms_per_layer: int = Field(default=2, ge=0, le=8, description="norms inside each block")
    experts: int = Field(
        default=1, ge=1, le=MAX_EXPERTS, description="routed MLP experts (1 = dense)"
    )
    experts_per_token: int = Field(default=1, ge=1, description="experts each token is routed to")
    expert_ffn: int | None = Field(
        default=None, ge=1, le=MAX_FFN, description="intermediate size of an expert"
    )
    shared_experts: int = Field(
        default=0, ge=0, le=MAX_SHARED_EXPERTS, description="always-on experts (Qwen-MoE)"
    )
    shared_expert_ffn: int | None = Field(default=None, ge=1, le=MAX_FFN)
    shared_expert_gate: bool = Field(default=False, description="sigmoid gate on the shared expert")
    sliding_window: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS, description="local attention window"
    )
    sliding_window_every: int = Field(
        default=1,
        ge=1,
        le=MAX_LAYERS,
        description="1: every layer is local; 2: every other layer (Gemma-2)",
    )
    params: int | None = Field(
        default=None,
        ge=MIN_PARAMS,
        le=MAX_PARAMS,
        description="declared parameter count; overrides the derived one",
    )
    model_type: ModelType | None = Field(
        default=None, description="Hugging Face model_type (default: gpt2 or llama by arch)"
    )
    resid_dropout: float | None = Field(
        default=None, ge=0, lt=1, description="dropout on each block's two branch outputs"
    )
    embd_dropout: float | None = Field(
        default=None, ge=0, lt=1, description="dropout on the embedding output"
    )
    attention_dropout: float | None = Field(
        default=None, ge=0, lt=1, description="dropout on the attention probabilities"
    )

    @model_validator(mode="after")
    def _shapes_agree(self) -> ModelSpec:
        heads = self.heads
        if heads is not None and self.head_dim is None and self.hidden % heads:
            raise ValueError(f"hidden ({self.hidden}) is not divisible by heads ({heads})")
        if heads is not None and self.kv_heads is not None and heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) is not a multiple of kv_heads ({self.kv_heads})")
        if self.experts_per_token > self.experts:
            raise ValueError("experts_per_token exceeds experts")
        expert_layers = self.layers * (self.experts + self.shared_experts)
        if self.experts > 1 and expert_layers > MAX_EXPERT_LAYERS:
            raise ValueError(
                f"layers x (experts + shared_experts) is {expert_layers:,}, more than "
                f"{MAX_EXPERT_LAYERS:,} expert MLPs (Kimi K2 has 61 x 385)"
            )
        return self

    def resolved(self) -> ModelSpec:
        """A copy with every family default filled in (``max_positions`` stays None without
        learned positions; ``params`` stays as declared)."""
        family = ARCH_DEFAULTS[self.arch]
        values = self.model_dump()
        for key, default in family.items():
            if values.get(key) is None:
                values[key] = default
        if values["heads"] is None:
            # head width 64, as GPT-2 and GPT-3 use (Radford et al. 2019; Brown et al. 2020);
            # Llama uses 128 (Touvron et al. 2023): its presets give heads explicitly
            values["heads"] = max(1, self.hidden // 64) if self.hidden % 64 == 0 else 1
        if values["kv_heads"] is None:
            values["kv_heads"] = values["heads"]
        if values["head_dim"] is None:
            values["head_dim"] = self.hidden // values["heads"]
        if values["ffn"] is None:
            values["ffn"] = default_ffn(self.hidden, Mlp(values["mlp"]))
        if values["expert_ffn"] is None:
            values["expert_ffn"] = values["ffn"]
        if values["shared_expert_ffn"] is None:
            values["shared_expert_ffn"] = values["expert_ffn"]
        if values["model_type"] is None:
            values["model_type"] = ModelType.gpt2 if self.arch is Arch.gpt2 else ModelType.llama
        # transformers' config defaults: GPT2Config resid_pdrop = embd_pdrop = attn_pdrop = 0.1;
        # the Llama-derived configs have attention_dropout 0.0 and no other dropout
        default_p = 0.1 if ModelType(values["model_type"]) is ModelType.gpt2 else 0.0
        for key in ("resid_dropout", "embd_dropout", "attention_dropout"):
            if values[key] is None:
                values[key] = default_p
        return ModelSpec.model_validate(values)


def default_ffn(hidden: int, mlp: Mlp) -> int:
    """Default MLP width: 4h for GELU (GPT-2); for SwiGLU, 2/3 of 4h rounded up to a multiple of
    256, as Llama's reference code does (Touvron et al. 2023, model.py ``multiple_of=256``)."""
    if mlp is Mlp.gelu:
        return 4 * hidden
    return 256 * -(-(8 * hidden // 3) // 256)


ARCH_DEFAULTS: dict[Arch, dict[str, Any]] = {
    Arch.gpt2: {
        "norm": Norm.layernorm,
        "mlp": Mlp.gelu,
        "positions": Positions.learned,
        "bias": True,
        "qkv_bias": True,
        "tied": True,
        "vocab": 50257,
        "max_positions": 1024,
    },
    Arch.llama: {
        "norm": Norm.rmsnorm,
        "mlp": Mlp.swiglu,
        "positions": Positions.rope,
        "bias": False,
        "qkv_bias": False,
        "tied": False,
        "vocab": 32000,
    },
}


class Workload(_Strict):
    """What is done with the model: training step or inference, and how."""

    mode: Mode = Mode.train
    batch: int = Field(default=1, ge=1, le=MAX_BATCH, description="sequences per step")
    seq: int = Field(default=2048, ge=1, le=MAX_TOKENS, description="tokens per sequence")
    precision: Precision = Precision.amp_bf16
    optimizer: Optimizer = Optimizer.adamw
    attention: Attention = Attention.flash
    checkpointing: Checkpointing = Checkpointing.none
    gen_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS, description="tokens generated (infer)")
    kv_dtype: KvDtype | None = Field(default=None, description="KV cache dtype (infer)")
    impl: Impl = Field(default=Impl.hf, description="the implementation that runs the model")
    loop: Loop = Field(default=Loop.trainer, description="what the training loop keeps (hf)")
    logits: Logits | None = Field(
        default=None, description="inference logits: all positions or the last (hf)"
    )
    clip_grad: bool | None = Field(
        default=None, description="clip_grad_norm_ before the step (default: on with the Trainer)"
    )
    lora: Lora | None = Field(default=None, description="peft LoRA adapters (hf)")
    quant: Quant | None = Field(default=None, description="bitsandbytes base weights (hf)")

    @model_validator(mode="before")
    @classmethod
    def _defaults_follow_the_run(cls, data: Any) -> Any:
        """Inference is served in 16 bits: without a precision, infer means bf16 weights, not
        amp's fp32 weights (which only training needs, as master weights). Without an
        optimizer, the Trainer's default (``adamw_torch_fused`` on torch >= 2.8,
        transformers/training_args.py) or, for a plain loop, ``torch.optim.AdamW()``."""
        if not isinstance(data, dict):
            return data
        name = data.get("optimizer")
        if isinstance(name, str) and name in TRAINER_OPTIM and name not in _OPTIMIZER_VALUES:
            # a Trainer name; "adafactor" and "sgd" are vramfit's own (torch.optim's) first
            data = {**data, "optimizer": TRAINER_OPTIM[name]}
        if str(data.get("mode", "")).endswith("infer") and data.get("precision") is None:
            data = {**data, "precision": Precision.bf16}
        if data.get("optimizer") is None:
            impl, loop = str(data.get("impl") or "hf"), str(data.get("loop") or "trainer")
            trainer = impl.endswith("hf") and loop.endswith("trainer")
            data = {**data, "optimizer": Optimizer.adamw_fused if trainer else Optimizer.adamw}
        return data

    @model_validator(mode="after")
    def _options_match_the_mode(self) -> Workload:
        if self.mode is Mode.train and self.gen_tokens:
            raise ValueError("gen_tokens only applies with mode infer (--mode infer)")
        if self.mode is Mode.train and self.kv_dtype is not None:
            raise ValueError("kv_dtype only applies with mode infer (--mode infer)")
        if self.mode is Mode.train and self.logits is not None:
            raise ValueError("logits only applies with mode infer (--mode infer)")
        if self.impl is not Impl.hf and self.optimizer in HF_ONLY_OPTIMIZERS:
            raise ValueError(
                f"optimizer {self.optimizer.value} is modelled by the hf profile (impl hf)"
            )
        if self.trainer and self.mode is Mode.train and trainer_optim_name(self.optimizer) is None:
            hint = ""
            if self.optimizer is Optimizer.adafactor:
                hint = " (the Trainer's optim='adafactor' is adafactor-hf)"
            raise ValueError(
                f"optimizer {self.optimizer.value} is not one the Trainer builds "
                f"(TrainingArguments.optim): with it, use loop drops or keeps-logits{hint}"
            )
        if self.impl is Impl.hf and self.checkpointing is Checkpointing.selective:
            raise ValueError(
                "checkpointing selective is not in transformers, which checkpoints whole "
                "decoder layers: use checkpointing full (or impl reference for selective)"
            )
        return self

    @property
    def trainer(self) -> bool:
        """The Hugging Face Trainer runs the step."""
        return self.impl is Impl.hf and self.loop is Loop.trainer

    @property
    def clips(self) -> bool:
        return self.trainer if self.clip_grad is None else self.clip_grad


class Fsdp(str, Enum):
    """PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) on each decoder layer and the root."""

    none = "none"
    full = "full"  # FULL_SHARD: parameters resharded after forward, re-gathered in backward
    shard_grad_op = "shard-grad-op"  # reshard_after_forward=False: kept from forward to backward
    hybrid = "hybrid"  # HSDP: sharded within a group of hsdp_shard ranks, replicated across


class Offload(str, Enum):
    none = "none"
    optimizer = "optimizer"  # DeepSpeed offload_optimizer: fp32 master + Adam states on the CPU
    params = "params"  # FSDP2 CPUOffloadPolicy / ZeRO-3 offload_param: sharded states on the CPU


MAX_GPUS = 2**17  # 131,072 ranks: above the largest published training runs (~100k GPUs)


class Parallel(_Strict):
    """How a training step is spread over ``gpus`` ranks (the world size).

    ``gpus = tp * pp * dp``: tensor parallel (``tp``), pipeline stages (``pp``) and the
    data-parallel size that is left, over which DDP replicates, or FSDP2 / ZeRO shard.
    At most one data-parallel engine: ``fsdp``, ``zero`` or ``ddp``.
    """

    gpus: int = Field(default=1, ge=1, le=MAX_GPUS, description="world size (ranks, one per GPU)")
    fsdp: Fsdp = Field(default=Fsdp.none, description="FSDP2 fully_shard on each decoder layer")
    reshard_after_forward: bool | int | None = Field(
        default=None,
        description="FSDP2 reshard_after_forward of the decoder layers (default: by --fsdp); "
        "an integer K reshards to groups of K ranks after forward",
    )
    hsdp_shard: int | None = Field(
        default=None, ge=1, le=MAX_GPUS, description="ranks a hybrid FSDP shard group spans"
    )
    zero: int = Field(default=0, ge=0, le=3, description="DeepSpeed ZeRO stage (0: off)")
    ddp: bool = Field(default=False, description="DistributedDataParallel (replicated)")
    bucket_mib: int = Field(default=25, ge=1, le=2**14, description="DDP bucket_cap_mb")
    gradient_as_bucket_view: bool = Field(
        default=False, description="DDP gradient_as_bucket_view: .grad views the buckets"
    )
    tp: int = Field(default=1, ge=1, le=MAX_GPUS, description="tensor-parallel degree")
    sp: bool = Field(default=False, description="sequence parallel (with tp > 1)")
    pp: int = Field(default=1, ge=1, le=MAX_GPUS, description="pipeline stages")
    micro_batches: int | None = Field(
        default=None, ge=1, le=MAX_BATCH, description="pipeline micro-batches per step (1F1B)"
    )
    offload: Offload = Field(default=Offload.none, description="state offloaded to the CPU")

    @model_validator(mode="after")
    def _layout_is_possible(self) -> Parallel:
        if self.gpus % (self.tp * self.pp):
            _field_error(
                "gpus", f"{self.gpus} is not divisible by tp x pp = {self.tp * self.pp}", self.gpus
            )
        engines = [name for name, on in (
            ("fsdp", self.fsdp is not Fsdp.none), ("zero", self.zero > 0), ("ddp", self.ddp)
        ) if on]
        if len(engines) > 1:
            _field_error(engines[1], f"choose one of {' / '.join(engines)}", True)
        if self.dp > 1 and not engines:
            _field_error(
                "gpus",
                f"the data-parallel size {self.dp} needs an engine: fsdp, zero or ddp",
                self.gpus,
            )
        if self.reshard_after_forward is not None and self.fsdp is Fsdp.none:
            _field_error("reshard_after_forward", "applies with fsdp only", True)
        k = self.reshard_after_forward
        if k is not None and not isinstance(k, bool):
            # fully_shard (_get_post_forward_mesh_info): a divisor of the shard mesh size, 1
            # meaning False and the size itself True; DTensor (TP) parameters cannot reshard
            # to a smaller mesh (FSDPParam.to_sharded_post_forward)
            if k < 1 or self.shard % k:
                _field_error(
                    "reshard_after_forward",
                    f"an integer must divide the shard group ({self.shard})",
                    k,
                )
            if self.tp > 1 and 1 < k < self.shard:
                _field_error(
                    "reshard_after_forward",
                    "resharding to a smaller group is not possible with tp (DTensor "
                    "parameters)",
                    k,
                )
        if self.hsdp_shard is not None:
            if self.fsdp is not Fsdp.hybrid:
                _field_error("hsdp_shard", "applies with fsdp hybrid only", self.hsdp_shard)
            if self.dp % self.hsdp_shard:
                _field_error(
                    "hsdp_shard",
                    f"the data-parallel size {self.dp} is not divisible by {self.hsdp_shard}",
                    self.hsdp_shard,
                )
        if self.sp and self.tp == 1:
            _field_error("sp", "sequence parallel needs tp > 1", True)
        if self.micro_batches is not None and self.pp == 1:
            _field_error("micro_batches", "applies with pp > 1 (pipeline stages)", True)
        if self.offload is Offload.optimizer and self.zero == 0:
            _field_error("offload", "optimizer offload is DeepSpeed's: needs zero 1-3", "optimizer")
        if self.offload is Offload.params and not (self.zero == 3 or self.fsdp is not Fsdp.none):
            _field_error("offload", "params offload needs zero 3 or fsdp", "params")
        if (self.tp > 1 or self.pp > 1) and self.zero > 0:
            _field_error("zero", "ZeRO is modelled without tp / pp (use fsdp)", self.zero)
        if self.pp > 1 and self.fsdp is not Fsdp.none:
            _field_error("pp", "pipeline stages are modelled with DDP-style replicas only", self.pp)
        return self

    @property
    def dp(self) -> int:
        """The data-parallel size: ranks that hold the same tensor-parallel shard and stage."""
        return self.gpus // (self.tp * self.pp)

    @property
    def shard(self) -> int:
        """How many ranks a data-parallel engine shards its states over (1: replicated)."""
        if self.fsdp is Fsdp.hybrid:
            return self.hsdp_shard or min(8, self.dp)
        if self.fsdp is not Fsdp.none or self.zero > 0:
            return self.dp
        return 1

    @property
    def reshards(self) -> bool | int:
        """FSDP2's reshard_after_forward for the decoder layers (an int: to K ranks)."""
        k = self.reshard_after_forward
        if k is None:
            return self.fsdp is not Fsdp.shard_grad_op
        if not isinstance(k, bool) and k in (1, self.shard):  # as fully_shard reads them
            return k == self.shard
        return k

    @property
    def single(self) -> bool:
        """One GPU and no engine: the single-device model, unchanged."""
        return self.gpus == 1 and self.fsdp is Fsdp.none and self.zero == 0 and not self.ddp


class RunSpec(_Strict):
    """Everything an estimate needs: the model and the workload."""

    model: ModelSpec
    workload: Workload = Field(default_factory=Workload)
    parallel: Parallel = Field(default_factory=Parallel)

    @model_validator(mode="before")
    @classmethod
    def _default_seq_fits_the_positions(cls, data: Any) -> Any:
        """Without an explicit seq, a model with a learned position table (GPT-2: 1024) gets
        its full table instead of the 2048-token default."""
        if not isinstance(data, dict) or "model" not in data:
            return data
        model, workload = data["model"], data.get("workload", {})
        try:
            spec = (
                model if isinstance(model, ModelSpec) else ModelSpec.model_validate(model)
            ).resolved()
            wl = workload if isinstance(workload, Workload) else Workload.model_validate(workload)
        except (ValidationError, ValueError, TypeError):
            return data  # reported by the normal validation below
        if "seq" in wl.model_fields_set or spec.positions is not Positions.learned:
            return data
        table = spec.max_positions or 0
        if 0 < table < wl.seq + wl.gen_tokens:
            seq = max(1, table - wl.gen_tokens)
            return {**data, "workload": wl.model_copy(update={"seq": seq})}
        return data

    @model_validator(mode="after")
    def _adapters_fit_the_model(self) -> RunSpec:
        """LoRA targets and ranks, and quantization, checked against the architecture
        (``FinetuneSpec``), as the hf profile runs them."""
        w = self.workload
        if w.lora is None and w.quant is None:
            return self
        if w.impl is not Impl.hf:
            raise ValueError("lora and quant are modelled by the hf profile (impl hf)")
        from vramfit.estimate.profiles.hf import hf_unsupported

        unsupported = hf_unsupported(self.model.resolved(), w)
        if unsupported:  # the reference loop it would fall back to has neither
            what = "quant" if w.quant is not None else "lora"
            raise ValueError(f"{what} is modelled by the hf profile, and {unsupported}")
        if w.mode is Mode.train and w.quant is not None and w.lora is None:
            # prepare_model_for_kbit_training freezes every parameter (peft/utils/other.py) and
            # the Trainer refuses "purely quantized models" (trainer_utils.py)
            raise ValueError(
                "quant weights are frozen in training: add LoRA adapters (lora, --lora-rank)"
            )
        spec = self.model.resolved()
        lora = w.lora
        if lora is not None and lora.model_type is None:
            mt = spec.model_type.value if spec.model_type else None
            if mt in PeftModelType._value2member_map_:
                lora = Lora.model_validate({**lora.model_dump(), "model_type": mt})
        try:
            FinetuneSpec.model_validate({"model": spec, "lora": lora, "quant": w.quant})
        except ValidationError as err:
            raise validation_error(err, prefix="workload.") from None
        return self

    @model_validator(mode="after")
    def _context_fits_the_positions(self) -> RunSpec:
        spec, w = self.model.resolved(), self.workload
        if spec.positions is Positions.learned and spec.max_positions:
            if w.seq + w.gen_tokens > spec.max_positions:
                raise ValueError(
                    f"seq + gen_tokens ({w.seq + w.gen_tokens}) exceeds the model's "
                    f"{spec.max_positions} learned positions"
                )
        return self


    @model_validator(mode="after")
    def _layout_fits_the_model(self) -> RunSpec:
        """Tensor parallel splits heads, K/V heads and the MLP width over ``tp`` ranks
        (DTensor colwise/rowwise); pipeline stages split the layers; micro-batches split the
        batch. A layout that cannot split them fails naming the field."""
        par, w = self.parallel, self.workload
        if par.single:
            return self
        spec = self.model.resolved()
        where = "parallel."
        if w.mode is not Mode.train:
            raise VramfitError("multi-GPU layouts are modelled for training (mode train)",
                               field=f"{where}gpus")
        if w.impl is not Impl.hf:
            raise VramfitError("multi-GPU layouts are modelled for impl hf", field=f"{where}gpus")
        if w.lora is not None or w.quant is not None:
            raise VramfitError("multi-GPU layouts are modelled without lora / quant",
                               field=f"{where}gpus")
        if spec.experts > 1:
            raise VramfitError("multi-GPU layouts are modelled for dense models",
                               field=f"{where}gpus")
        from vramfit.estimate.profiles.hf import hf_unsupported

        unsupported = hf_unsupported(spec, w)
        if unsupported:  # one GPU falls back to the reference loop; the layouts do not
            raise VramfitError(
                f"multi-GPU layouts are modelled by the hf profile, and {unsupported}",
                field=f"{where}gpus",
            )
        assert spec.heads and spec.kv_heads and spec.ffn
        for name, value in (("heads", spec.heads), ("kv_heads", spec.kv_heads),
                            ("ffn", spec.ffn)):
            if value % par.tp:
                raise VramfitError(f"model.{name} ({value}) is not divisible by tp ({par.tp})",
                                   field=f"{where}tp")
        if par.sp and w.seq % par.tp:
            raise VramfitError(f"seq ({w.seq}) is not divisible by tp ({par.tp})",
                               field=f"{where}sp")
        if par.pp > spec.layers:
            raise VramfitError(f"{par.pp} stages for {spec.layers} layers", field=f"{where}pp")
        if par.micro_batches is not None and w.batch % par.micro_batches:
            raise VramfitError(
                f"batch ({w.batch}) is not divisible by micro_batches ({par.micro_batches})",
                field=f"{where}micro_batches",
            )
        return self


class Preset(_Strict):
    """A preset file: a named architecture with its published parameter count."""

    name: str = Field(min_length=1)
    title: str = Field(min_length=1, description="human name, e.g. 'Llama-2 7B'")
    source: str = Field(min_length=1, description="where the architecture and count come from")
    published_params: int = Field(
        ge=MIN_PARAMS, le=MAX_PARAMS, description="parameter count the source publishes"
    )
    params_exact: bool = Field(
        default=False, description="the published count is exact (else it is rounded: 0.5% slack)"
    )
    model: ModelSpec
    workload: Workload | None = None


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(document)"


def validation_error(err: ValidationError, *, prefix: str = "") -> VramfitError:
    """Turn a pydantic ValidationError into one VramfitError naming the first bad field."""
    first = err.errors()[0]
    field = _location(tuple(first["loc"]))
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return VramfitError(message, field=f"{prefix}{field}")


# A config.json or preset is a few KB; vramfit reads nothing larger than this, so no path (a
# device, a FIFO, a runaway file) can make it read without bound.
MAX_FILE_BYTES = 4 * 2**20
# YAML is parsed in pure Python (~1 MB/s): its cap is lower, so a refusal stays fast.
MAX_YAML_BYTES = 2**20
# Integers in a file are parsed only up to this many digits: Python refuses more than 4,300
# (and bounds above make anything past 16 digits an error anyway).
MAX_INT_DIGITS = 30
# YAML structure: a preset nests 2 levels deep and has ~30 nodes.
MAX_YAML_DEPTH = 50
MAX_YAML_EVENTS = 100_000


def read_bounded(path: Path, *, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at ``path``; at most ``limit`` bytes are ever read.

    FIFOs, devices (``/dev/zero``) and sockets, directly or through a symlink, are refused
    without reading: the file is opened non-blocking (a FIFO without a writer would block an
    ordinary open forever) and checked with ``fstat``. Every failure is one VramfitError
    naming the path.
    """
    field = str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise VramfitError("no such file", field=field) from None
    except IsADirectoryError:
        raise VramfitError("is a directory", field=field) from None
    except (OSError, ValueError) as exc:  # ENAMETOOLONG, EACCES, ELOOP, an embedded NUL...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise VramfitError(f"cannot open: {reason}", field=field) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise VramfitError("is a directory", field=field)
        if not stat.S_ISREG(info.st_mode):
            raise VramfitError("not a regular file (a device, FIFO or socket)", field=field)
        if info.st_size > limit:
            raise VramfitError(f"larger than {limit // 2**20} MiB", field=field)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(2**20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # it grew while being read
            raise VramfitError(f"larger than {limit // 2**20} MiB", field=field)
        return b"".join(chunks)
    except OSError as exc:
        raise VramfitError(f"cannot read: {exc.strerror or exc}", field=field) from None
    finally:
        os.close(fd)


def read_text_bounded(path: Path, *, limit: int = MAX_FILE_BYTES) -> str:
    """``read_bounded`` decoded as UTF-8 (one VramfitError when it is not)."""
    try:
        return read_bounded(path, limit=limit).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VramfitError(
            f"not UTF-8 text (byte {exc.start}: {exc.reason})", field=str(path)
        ) from None


# A plain scalar that YAML 1.1 resolves as an int (decimal, 0x, 0o, 0b, sexagesimal, with _).
_YAML_INTEGER = re.compile(r"[-+]?[0-9][0-9a-fA-FxXoObB_:]*")
_YAML_INT_TAG = "tag:yaml.org,2002:int"


def scan_yaml(text: str) -> tuple[int, str] | None:
    """Refuse, before anything is built, what could blow up or hang: anchors and aliases
    (billion laughs), deep nesting (the composer recurses), huge documents, and integers of
    more than ``MAX_INT_DIGITS`` digits (Python refuses to parse 4,300). Returns (line, reason)
    or None. Raises yaml.YAMLError for invalid YAML."""
    import yaml  # only where YAML is read: an estimate from options alone never needs it

    depth = 0
    for count, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
        line = event.start_mark.line + 1
        if count > MAX_YAML_EVENTS:
            return line, f"more than {MAX_YAML_EVENTS:,} YAML nodes"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            return line, "YAML anchors and aliases are not allowed"
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                return line, f"nested deeper than {MAX_YAML_DEPTH} levels"
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_INT_DIGITS:
            plain = event.implicit[0] and _YAML_INTEGER.fullmatch(event.value)
            if plain or event.tag == _YAML_INT_TAG:
                return line, f"an integer of more than {MAX_INT_DIGITS} digits"
    return None


def parse_packaged_yaml(text: str) -> Any:
    """A YAML document shipped with vramfit (a preset, the GPU catalog), parsed by libyaml where
    PyYAML was built with it: ~8x faster than its pure-Python parser (the catalog: 16 ms ->
    2 ms). CI checks these files, so they skip ``scan_yaml``; a user's file keeps the
    pure-Python parser, whose error messages vramfit quotes. Both parsers build the same
    documents from the shipped files (tests/test_presets.py, tests/test_catalog.py)."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_yaml(path: Path, *, packaged: bool = False) -> Any:
    """Read one YAML document with ``yaml.safe_load``, guarded by ``scan_yaml`` (or with
    ``parse_packaged_yaml`` for a ``packaged`` file); every failure is a VramfitError."""
    import yaml

    try:
        text = read_text_bounded(path, limit=MAX_YAML_BYTES)
    except VramfitError as err:
        if err.message == "is a directory":
            err.message = "is a directory, expected a YAML file"
        raise
    try:
        if packaged:
            return parse_packaged_yaml(text)
        unsafe = scan_yaml(text)
        if unsafe is not None:
            line, reason = unsafe
            raise VramfitError(reason, field=f"{path}:{line}")
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise VramfitError(f"invalid YAML: {exc.problem or exc.context}", field=where) from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise VramfitError(f"invalid YAML: {type(exc).__name__}", field=str(path)) from None


def load_yaml(path: Path, model: type[BaseModel], *, packaged: bool = False) -> Any:
    """Load ``path`` (see ``read_yaml``) and validate it as ``model``; one VramfitError for
    any failure."""
    data = read_yaml(path, packaged=packaged)
    if data is None:
        raise VramfitError("empty file", field=str(path))
    if not isinstance(data, dict):
        raise VramfitError(f"expected a mapping, got {type(data).__name__}", field=str(path))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, prefix=f"{path}: ") from None


# --- Fine-tuning: LoRA adapters (peft) and bitsandbytes quantization --------------------------
# Self-contained: the models below only read ModelSpec. What they mean in bytes is computed in
# vramfit.estimate.finetune (imported lazily in the validators: that module imports this one).
# The imports stay with the block so that the block is one local edit of this file.

from typing import Literal  # noqa: E402

from pydantic import ValidationInfo, field_validator  # noqa: E402
from pydantic_core import InitErrorDetails, PydanticCustomError  # noqa: E402


class PeftModelType(str, Enum):
    """A Hugging Face ``model_type``: decides the module names peft matches and its default
    targets. ``ModelSpec.arch`` alone cannot tell Mistral from Phi-3 (fused qkv_proj)."""

    llama = "llama"
    mistral = "mistral"
    qwen2 = "qwen2"
    gemma = "gemma"
    gemma2 = "gemma2"
    phi3 = "phi3"
    gpt2 = "gpt2"


ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND (peft/utils/constants.py)


class Lora(BaseModel):
    """A peft ``LoraConfig`` (peft 0.21): defaults are LoraConfig's (peft/tuners/lora/config.py:
    ``r=8``, ``lora_alpha=8``, ``lora_dropout=0.0``, ``target_modules=None``, ``bias="none"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(default=8, ge=1, le=65536, description="adapter rank (LoraConfig.r)")
    alpha: int = Field(default=8, ge=1, description="LoraConfig.lora_alpha; scales B·A by alpha/r")
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="LoraConfig.lora_dropout on the adapter input"
    )
    targets: list[str] | Literal["all-linear"] | None = Field(
        default=None,
        description="module names (peft suffix match, e.g. q_proj or mlp.c_proj), 'all-linear' "
        "(every linear layer but the output layer), or None for peft's default for model_type",
    )
    model_type: PeftModelType | None = Field(
        default=None,
        description="Hugging Face model_type; None: llama for arch llama, gpt2 for arch gpt2",
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_are_a_list(cls, value: Any) -> Any:
        # peft reads any other string as a regular expression over module names
        if isinstance(value, str) and value != ALL_LINEAR:
            raise ValueError(f"{value!r}: give a list of module names, or 'all-linear'")
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, 'all-linear', or leave it out")
        return value


class QuantKind(str, Enum):
    nf4 = "nf4"  # 4-bit NormalFloat (Dettmers et al. 2023, QLoRA)
    fp4 = "fp4"  # 4-bit float; BitsAndBytesConfig's default bnb_4bit_quant_type
    int8 = "int8"  # LLM.int8() (Dettmers et al. 2022): int8 rows + one fp32 scale per row


class ComputeDtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class QuantStorage(str, Enum):
    """``bnb_4bit_quant_storage``: the dtype the packed 4-bit pairs are stored as."""

    uint8 = "uint8"
    int8 = "int8"
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


QUANT_STORAGE_BYTES: dict[QuantStorage, int] = {
    QuantStorage.uint8: 1,
    QuantStorage.int8: 1,
    QuantStorage.fp16: 2,
    QuantStorage.bf16: 2,
    QuantStorage.fp32: 4,
}

# bitsandbytes.functional.quantize_4bit accepts exactly these block sizes (functional.py:920)
BNB_4BIT_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class Quant(BaseModel):
    """A transformers ``BitsAndBytesConfig`` (transformers 5.17, bitsandbytes 0.50.2).

    Defaults are BitsAndBytesConfig's: ``bnb_4bit_use_double_quant=False``,
    ``bnb_4bit_compute_dtype=float32``, ``bnb_4bit_quant_storage=uint8``,
    ``llm_int8_threshold=6.0``; ``blocksize`` is Params4bit's default 64
    (bitsandbytes/nn/modules.py), which BitsAndBytesConfig does not expose.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: QuantKind = Field(description="nf4 / fp4 (load_in_4bit) or int8 (load_in_8bit)")
    double_quant: bool = Field(
        default=False, description="bnb_4bit_use_double_quant: 8-bit absmax, 4-bit only"
    )
    compute_dtype: ComputeDtype = Field(
        default=ComputeDtype.fp32, description="bnb_4bit_compute_dtype: Linear4bit casts x to it"
    )
    blocksize: int = Field(default=64, description="elements per 4-bit absmax (4-bit only)")
    quant_storage: QuantStorage = Field(
        default=QuantStorage.uint8, description="bnb_4bit_quant_storage (4-bit only)"
    )
    int8_threshold: float = Field(
        default=6.0, ge=0.0, description="llm_int8_threshold: outlier columns kept in fp16"
    )
    # Which input columns reach the threshold is up to the data: none in a well-conditioned
    # model; nearly every down_proj column of a randomly initialised 4096-wide Llama
    # (benchmarks/int8_outliers.py). bitsandbytes keeps those columns of x for backward.
    int8_outliers: dict[str, float] = Field(
        default_factory=dict,
        description="LLM.int8: per block linear (peft-style name, e.g. down_proj), the "
        "fraction of its input columns holding a value >= int8_threshold",
    )

    @field_validator("int8_outliers")
    @classmethod
    def _fractions(cls, outliers: dict[str, float]) -> dict[str, float]:
        for name, fraction in outliers.items():
            if not 0.0 <= fraction <= 1.0:
                _field_error(("int8_outliers", name), "must be a fraction in [0, 1]", fraction)
        return outliers

    @model_validator(mode="after")
    def _four_bit_options(self) -> Quant:
        if self.blocksize not in BNB_4BIT_BLOCKSIZES:
            _field_error("blocksize", f"must be one of {list(BNB_4BIT_BLOCKSIZES)}", self.blocksize)
        if self.kind is QuantKind.int8:
            four_bit_only = "applies to 4-bit (nf4, fp4) only"
            if self.double_quant:
                _field_error("double_quant", four_bit_only, True)
            if self.blocksize != 64:
                _field_error("blocksize", four_bit_only, self.blocksize)
            if self.quant_storage is not QuantStorage.uint8:
                _field_error("quant_storage", four_bit_only, self.quant_storage.value)
            if self.compute_dtype is not ComputeDtype.fp32:
                # Linear8bitLt quantizes x from fp16 and returns x's dtype: no compute dtype
                _field_error("compute_dtype", four_bit_only, self.compute_dtype.value)
            if self.int8_threshold == 0 and any(self.int8_outliers.values()):
                # MatMul8bitLt looks for outlier columns only with threshold > 0
                _field_error("int8_outliers", "need int8_threshold > 0", self.int8_outliers)
        elif self.int8_threshold != 6.0:  # (the default: a dumped Quant carries it)
            _field_error("int8_threshold", "applies to int8 (LLM.int8) only", self.int8_threshold)
        elif self.int8_outliers:
            _field_error("int8_outliers", "applies to int8 (LLM.int8) only", self.int8_outliers)
        return self

    @property
    def bits(self) -> int:
        return 8 if self.kind is QuantKind.int8 else 4


def _field_error(loc: str | tuple[str, ...], message: str, value: Any) -> None:
    """Raise a ValidationError (a ValueError) located at ``loc`` inside the model being
    validated, so the one-line error names the field (``lora.r``), not the whole model."""
    where = (loc,) if isinstance(loc, str) else loc
    raise ValidationError.from_exception_data(
        "finetune",
        [
            InitErrorDetails(
                type=PydanticCustomError("value_error", message), loc=where, input=value
            )
        ],
    )


class FinetuneSpec(_Strict):
    """A model with optional LoRA adapters and optional bitsandbytes quantization.

    Cross-checks against the architecture: every LoRA target names a module the model has,
    the rank fits every targeted layer (r <= min(in, out)), peft has a default target list for
    the model_type when ``targets`` is None, and the model_type matches ``model.arch``.
    """

    model: ModelSpec
    lora: Lora | None = None
    quant: Quant | None = None

    @field_validator("lora")
    @classmethod
    def _lora_fits_the_model(cls, lora: Lora | None, info: ValidationInfo) -> Lora | None:
        spec = info.data.get("model")
        if lora is None or spec is None or spec.experts > 1:
            return lora  # a mixture of experts is refused below, naming model.experts
        from vramfit.estimate.finetune import LoraTargetError, lora_target_shapes

        try:
            lora_target_shapes(spec, lora)
        except LoraTargetError as exc:
            _field_error(exc.field, exc.reason, exc.value)
        return lora

    @field_validator("quant")
    @classmethod
    def _outliers_name_layers(cls, quant: Quant | None, info: ValidationInfo) -> Quant | None:
        spec = info.data.get("model")
        if quant is None or spec is None or spec.experts > 1 or not quant.int8_outliers:
            return quant
        from vramfit.estimate.finetune import LoraTargetError, int8_outlier_columns

        try:
            int8_outlier_columns(spec, quant.int8_outliers)
        except LoraTargetError as exc:
            _field_error(exc.field, exc.reason, exc.value)
        return quant

    @model_validator(mode="after")
    def _dense_models_only(self) -> FinetuneSpec:
        if self.model.experts > 1 and (self.lora is not None or self.quant is not None):
            _field_error(
                ("model", "experts"),
                "LoRA and quantization are modelled for dense models only",
                self.model.experts,
            )
        return self
