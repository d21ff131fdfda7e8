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

import yaml
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
    adamw = "adamw"  # torch.optim.AdamW, foreach implementation (PyTorch's default on CUDA)
    adamw_fused = "adamw-fused"  # torch.optim.AdamW(fused=True)
    sgd = "sgd"
    sgd_momentum = "sgd-momentum"
    adam_8bit = "adam-8bit"  # bitsandbytes-style block-wise 8-bit states
    adafactor = "adafactor"  # factored second moment (Shazeer & Stern 2018)
    none = "none"  # gradients only (e.g. a forward/backward benchmark)


class Attention(str, Enum):
    flash = "flash"  # fused SDPA kernels: no s x s scores kept
    eager = "eager"  # explicit softmax(QK^T)V: s x s scores and probabilities saved


class Checkpointing(str, Enum):
    none = "none"
    selective = "selective"  # recompute the attention core only (Korthikanti et al. 2022)
    full = "full"  # keep each block's input, recompute the block in backward


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

    @model_validator(mode="before")
    @classmethod
    def _inference_defaults_to_bf16(cls, data: Any) -> Any:
        """Inference is served in 16 bits: without a precision, infer means bf16 weights,
        not amp's fp32 weights (which only training needs, as master weights)."""
        if isinstance(data, dict) and str(data.get("mode", "")).endswith("infer"):
            if data.get("precision") is None:
                data = {**data, "precision": Precision.bf16}
        return data

    @model_validator(mode="after")
    def _options_match_the_mode(self) -> Workload:
        if self.mode is Mode.train and self.gen_tokens:
            raise ValueError("gen_tokens only applies with mode infer (--mode infer)")
        if self.mode is Mode.train and self.kv_dtype is not None:
            raise ValueError("kv_dtype only applies with mode infer (--mode infer)")
        return self


class RunSpec(_Strict):
    """Everything an estimate needs: the model and the workload."""

    model: ModelSpec
    workload: Workload = Field(default_factory=Workload)

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
    def _context_fits_the_positions(self) -> RunSpec:
        spec, w = self.model.resolved(), self.workload
        if spec.positions is Positions.learned and spec.max_positions:
            if w.seq + w.gen_tokens > spec.max_positions:
                raise ValueError(
                    f"seq + gen_tokens ({w.seq + w.gen_tokens}) exceeds the model's "
                    f"{spec.max_positions} learned positions"
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


def read_yaml(path: Path) -> Any:
    """Read one YAML document with ``yaml.safe_load``, guarded by ``scan_yaml``; every failure
    is a VramfitError."""
    try:
        text = read_text_bounded(path, limit=MAX_YAML_BYTES)
    except VramfitError as err:
        if err.message == "is a directory":
            err.message = "is a directory, expected a YAML file"
        raise
    try:
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


def load_yaml(path: Path, model: type[BaseModel]) -> Any:
    """Load ``path`` and validate it as ``model``; one VramfitError for any failure."""
    data = read_yaml(path)
    if data is None:
        raise VramfitError("empty file", field=str(path))
    if not isinstance(data, dict):
        raise VramfitError(f"expected a mapping, got {type(data).__name__}", field=str(path))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, prefix=f"{path}: ") from None
