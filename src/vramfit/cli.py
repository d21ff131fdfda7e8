"""The vramfit command line: parse options, call the library, render tables or print JSON.

Expected failures (bad input, unknown names, unreadable files, no torch, no CUDA) surface as one
line ``error: <field>: <reason>`` on stderr and exit code 2; "does not fit" (estimated, or an
out-of-memory while measuring) exits 1. Real bugs keep their traceback.

Start-up matters (``vramfit estimate`` runs in scripts and loops): everything beyond typer,
pydantic and the config models is imported inside the command that needs it, and torch only
inside ``measure``.
"""

# No ``from __future__ import annotations`` in this module: typer reads the commands'
# annotations at every start, and strings are compiled and evaluated first (~100 of them, read
# twice, for `estimate`: ~2 ms). The few names imported only for type checking are quoted.
import copy
import functools
import inspect
import os
import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.main
from pydantic import ValidationError
from typer.exceptions import Abort, TyperException

from vramfit.config import (
    MAX_BATCH,
    MAX_FFN,
    MAX_GPUS,
    MAX_HEADS,
    MAX_INT_DIGITS,
    MAX_LAYERS,
    MAX_TOKENS,
    MAX_VOCAB,
    MAX_WIDTH,
    Arch,
    Attention,
    Checkpointing,
    Formula,
    Fsdp,
    Impl,
    KvDtype,
    Logits,
    Loop,
    Mode,
    ModelSpec,
    Offload,
    Optimizer,
    Parallel,
    Precision,
    RunSpec,
    Workload,
)
from vramfit.errors import VramfitError, shorten, shown

if TYPE_CHECKING:
    from rich.console import Console

    from vramfit.estimate.core import Estimate, Hardware
    from vramfit.measure.backend import Backend
    from vramfit.measure.matmul import MatmulMeasurement
    from vramfit.measure.train import TrainMeasurement

app = typer.Typer(
    name="vramfit",
    help="Will this model fit in my GPU's memory, and how much headroom is left?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own help layout: two columns that wrap at the terminal's width (at most 80),
    # where rich's panel cut option names and help text short at 80 columns
    rich_markup_mode=None,
)

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_BAD_INPUT = 0, 1, 2


def _print_version(value: bool) -> None:
    if value:
        from vramfit import __version__

        print(f"vramfit {__version__}")
        raise typer.Exit(EXIT_FITS)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print vramfit's version and exit.",
        ),
    ] = False,
) -> None:
    """Will this model fit in my GPU's memory, and how much headroom is left?"""


# Maps config field names to the CLI options that set them, for error messages.
OPTION_NAMES = {
    "layers": "--layers",
    "hidden": "--hidden",
    "heads": "--heads",
    "kv_heads": "--kv-heads",
    "ffn": "--ffn",
    "vocab": "--vocab",
    "seq": "--seq",
    "batch": "--batch",
    "gen_tokens": "--gen-tokens",
    "kv_dtype": "--kv-dtype",
    "params": "--params",
    "optimizer": "--optimizer",
    "precision": "--precision",
    "attention": "--attention",
    "checkpointing": "--checkpointing",
    "mode": "--mode",
    "impl": "--impl",
    "loop": "--loop",
    "logits": "--logits",
    "quant": "--quant",
    "lora": "--lora-rank",
    "gpus": "--gpus",
    "fsdp": "--fsdp",
    "reshard_after_forward": "--reshard-after-forward",
    "hsdp_shard": "--gpus",
    "zero": "--zero",
    "ddp": "--ddp",
    "tp": "--tp",
    "sp": "--sp",
    "pp": "--pp",
    "micro_batches": "--micro-batches",
    "offload": "--offload",
}


def _console(*, stderr: bool = False) -> "Console":
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, stderr=stderr)


# str.splitlines() breaks on each of these; an error message must stay on one line.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


# The longest error line: whatever the input, a message quotes only a bounded part of it.
MAX_ERROR_CHARS = 300


def _print_error(message: str) -> None:
    """``error: <field>: <reason>`` on stderr, on one line whatever the input held."""
    line = shorten(message.translate(_LINE_BREAKS), MAX_ERROR_CHARS - len("error: "))
    print(f"error: {line}", file=sys.stderr)


def _fail(err: VramfitError) -> None:
    _print_error(str(err))
    raise typer.Exit(err.exit_code)


# The options that fill a field of a nested model (Workload.quant, Workload.lora)
NESTED_OPTIONS = {
    ("quant", "kind"): "--quant",
    ("quant", "double_quant"): "--quant-double",
    ("quant", "compute_dtype"): "--quant-compute-dtype",
    ("quant", "int8_threshold"): "--int8-threshold",
    ("quant", "int8_outliers"): "--int8-outliers",
    ("lora", "r"): "--lora-rank",
    ("lora", "alpha"): "--lora-alpha",
    ("lora", "dropout"): "--lora-dropout",
    ("lora", "targets"): "--lora-targets",
}


def _option_error(err: ValidationError) -> VramfitError:
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "model"
    nested = tuple(str(part) for part in first["loc"][:2])
    if nested in NESTED_OPTIONS:
        field = NESTED_OPTIONS[nested]
    message = _sentence(first["msg"])
    if first["type"] == "value_error":
        # a check across fields (model or workload validators): its message starts with the
        # field it is about, e.g. "hidden (1024) is not divisible by heads (7)"
        # (unless the error is already located at a field that has its own option)
        leading = message.split(" ", 1)[0].lower()
        if leading in OPTION_NAMES and field not in OPTION_NAMES:
            field = leading
    if "input" in first and not isinstance(first["input"], dict):
        message += f", got {shown(first['input'])}"
    return VramfitError(message, field=OPTION_NAMES.get(field, field))


# CUDA compute capability by architecture (NVIDIA CUDA C++ Programming Guide, "Compute
# Capabilities"); only the Hopper boundary changes an estimate (the cuBLAS workspace size).
COMPUTE_CAPABILITY = {
    "Volta": (7, 0),
    "Turing": (7, 5),
    "Ampere": (8, 0),
    "Ada Lovelace": (8, 9),
    "Hopper": (9, 0),
    "Blackwell": (10, 0),
}


def _hardware(gpu_name: str | None) -> "Hardware | None":
    """Catalog row -> estimator Hardware (None without --gpu)."""
    if gpu_name is None:
        return None
    from vramfit.catalog import find_gpu
    from vramfit.estimate.core import Hardware
    from vramfit.estimate.kernels import Multiprocessors

    gpu = find_gpu(gpu_name)
    mp = None
    if gpu.multiprocessors and gpu.threads_per_multiprocessor:
        mp = Multiprocessors(gpu.multiprocessors, gpu.threads_per_multiprocessor)
    return Hardware(
        name=gpu.name,
        memory_bytes=gpu.memory_bytes,
        compute_capability=COMPUTE_CAPABILITY.get(gpu.architecture),
        multiprocessors=mp,
    )


def build_run(
    *,
    params: str | None,
    layers: int | None,
    hidden: int | None,
    seq: int | None,
    batch: int | None,
    preset: str | None = None,
    hf_config: Path | None = None,
    model_overrides: dict[str, Any] | None = None,
    workload_overrides: dict[str, Any] | None = None,
    parallel_overrides: dict[str, Any] | None = None,
) -> RunSpec:
    """Merge a preset / HF config with CLI options (options win) into a validated RunSpec."""
    from vramfit.estimate.shape import infer_shape
    from vramfit.units import parse_count

    base_model: dict[str, Any] = {}
    base_workload: dict[str, Any] = {}
    if preset is not None and hf_config is not None:
        raise VramfitError("give --preset or --hf-config, not both", field="--preset")
    if preset is not None:
        from vramfit.presets import get_preset

        found = get_preset(preset)
        base_model = found.model.model_dump(exclude_defaults=True)
        if found.workload is not None:
            base_workload = found.workload.model_dump(exclude_defaults=True)
    elif hf_config is not None:
        from vramfit.hf import spec_from_hf_config

        base_model = spec_from_hf_config(hf_config).model_dump(exclude_defaults=True)

    overrides = {k: v for k, v in (model_overrides or {}).items() if v is not None}
    model = {**base_model, **overrides}
    if params is not None:
        model["params"] = parse_count(params, field="--params")
    if layers is not None:
        model["layers"] = layers
    if hidden is not None:
        model["hidden"] = hidden
    if "hidden" not in model:
        if "params" not in model:
            raise VramfitError(
                "give --params (e.g. 1B), --layers and --hidden, or --preset NAME",
                field="--params",
            )
        arch = Arch(model.get("arch", Arch.llama))
        try:
            shape = infer_shape(model["params"], model.get("layers"), arch)
        except ValidationError as err:  # e.g. --layers out of range
            raise _option_error(err) from None
        model["layers"], model["hidden"] = shape
    elif "layers" not in model:
        raise VramfitError("required with --hidden", field="--layers")

    overrides = {k: v for k, v in (workload_overrides or {}).items() if v is not None}
    workload = {**base_workload, **overrides}
    if seq is not None:
        workload["seq"] = seq
    if batch is not None:
        workload["batch"] = batch
    parallel = {k: v for k, v in (parallel_overrides or {}).items() if v is not None}
    try:
        layout = Parallel.model_validate(parallel)
    except ValidationError as err:
        raise _option_error(err) from None
    try:
        run = RunSpec(model=ModelSpec(**model), workload=Workload(**workload), parallel=layout)
        # The family defaults (heads = hidden / 64, ...) are checked only once filled in.
        run.model.resolved()
    except ValidationError as err:
        raise _option_error(err) from None
    except VramfitError as err:
        if err.field and err.field.startswith("parallel."):
            name = err.field.removeprefix("parallel.")
            err.field = PARALLEL_OPTIONS.get(name, f"--{name.replace('_', '-')}")
        elif err.field and err.field.startswith("workload."):  # a LoRA / quant check
            nested = tuple(err.field.removeprefix("workload.").split(".")[:2])
            err.field = NESTED_OPTIONS.get(nested, err.field)
        raise
    return run


_WHOLE_RE = re.compile(r"[+-]?[0-9]+")


def _whole(most: int, least: int | None = None) -> Any:
    """A typer parser for an integer option: plain digits only (``1.0``, ``1e3``, ``1_000`` and
    ``12\\n`` are refused, where pydantic's lax mode would take them), and no more than
    ``MAX_INT_DIGITS`` of them (Python refuses to parse 4,300). Ranges are checked by the config
    models, which name the bound; ``most`` is that bound, for the message about huge numbers.
    With ``least``, the parser checks the range itself (for options no model validates)."""

    def parse(text: str) -> int:
        if not _WHOLE_RE.fullmatch(text):
            raise typer.BadParameter(
                "Input should be a valid integer, unable to parse string as an integer"
            )
        if len(text.lstrip("+-")) > MAX_INT_DIGITS:
            raise typer.BadParameter(
                f"Input should be less than or equal to {most}, got {shown(text)}"
            )
        value = int(text)
        if least is not None and value < least:
            raise typer.BadParameter(f"Input should be greater than or equal to {least}")
        if least is not None and value > most:
            raise typer.BadParameter(f"Input should be less than or equal to {most}")
        return value

    return parse


# Shared options. Help text says "(default: X)" rather than "[default: X]": typer renders help
# with rich markup, which would swallow the brackets.
ParamsOpt = Annotated[
    str | None, typer.Option("--params", help="Parameter count: 1B, 350M, 1.5e9, 124439808.")
]
LayersOpt = Annotated[
    int | None, typer.Option("--layers", parser=_whole(MAX_LAYERS), help="Transformer blocks.")
]
HiddenOpt = Annotated[
    int | None, typer.Option("--hidden", parser=_whole(MAX_WIDTH), help="Model width.")
]
SeqOpt = Annotated[
    int | None,
    typer.Option("--seq", parser=_whole(MAX_TOKENS), help="Tokens per sequence (default: 2048)."),
]
BatchOpt = Annotated[
    int | None,
    typer.Option("--batch", parser=_whole(MAX_BATCH), help="Sequences per step (default: 1)."),
]
PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help="A preset name (see `vramfit presets`) or a preset YAML file."),
]
HfOpt = Annotated[
    Path | None,
    typer.Option("--hf-config", help="A local Hugging Face config.json (or its folder)."),
]
GpuOpt = Annotated[
    str | None, typer.Option("--gpu", help="GPU to check against (see `vramfit gpus`).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
ArchOpt = Annotated[Arch | None, typer.Option("--arch", help="Model family (default: llama).")]
HeadsOpt = Annotated[
    int | None,
    typer.Option("--heads", parser=_whole(MAX_HEADS), help="Attention heads (default: hidden/64)."),
]
KvHeadsOpt = Annotated[
    int | None,
    typer.Option(
        "--kv-heads", parser=_whole(MAX_HEADS), help="Key/value heads, GQA (default: heads)."
    ),
]
FfnOpt = Annotated[
    int | None, typer.Option("--ffn", parser=_whole(MAX_FFN), help="MLP intermediate size.")
]
VocabOpt = Annotated[
    int | None, typer.Option("--vocab", parser=_whole(MAX_VOCAB), help="Vocabulary size.")
]
TiedOpt = Annotated[
    bool | None,
    typer.Option("--tied/--untied", help="lm_head shares the embedding.", show_default=False),
]
PrecisionOpt = Annotated[
    Precision | None,
    typer.Option(
        "--precision",
        help="fp32, amp-fp16 / amp-bf16 (fp32 weights + autocast), or pure bf16 / fp16 "
        "(default: amp-bf16; bf16 with --mode infer).",
    ),
]
OptimizerOpt = Annotated[
    Optimizer | None,
    typer.Option(
        "--optimizer",
        metavar="<name>",
        help=f"Optimizer: {', '.join(o.value for o in Optimizer)}; adamw is torch.optim.AdamW's "
        "default (foreach) (default: adamw-fused with --loop trainer, as the Trainer's "
        "adamw_torch_fused; else adamw).",
    ),
]
AttentionOpt = Annotated[
    Attention | None,
    typer.Option("--attention", help="flash (fused SDPA) or eager (default: flash)."),
]
CkptOpt = Annotated[
    Checkpointing | None,
    typer.Option("--checkpointing", help="Activation checkpointing (default: none)."),
]
ModeOpt = Annotated[Mode | None, typer.Option("--mode", help="train or infer (default: train).")]
GenOpt = Annotated[
    int | None,
    typer.Option(
        "--gen-tokens",
        parser=_whole(MAX_TOKENS),
        help="Tokens to generate (infer): adds the KV cache.",
    ),
]
KvDtypeOpt = Annotated[
    KvDtype | None,
    typer.Option("--kv-dtype", help="KV cache dtype (default: the compute dtype)."),
]

ImplOpt = Annotated[
    Impl | None,
    typer.Option(
        "--impl",
        help="The code that runs the model: hf (Hugging Face transformers, the default) or "
        "reference (vramfit's own loop).",
    ),
]
LoopOpt = Annotated[
    Loop | None,
    typer.Option(
        "--loop",
        help="hf training loop: trainer (transformers.Trainer, the default), drops "
        "(loss = model(...).loss) or keeps-logits (outputs held through the step).",
    ),
]
LogitsOpt = Annotated[
    Logits | None,
    typer.Option(
        "--logits",
        help="infer: all (an eval / scoring forward) or last (generate; the default with "
        "--gen-tokens).",
    ),
]
DropoutOpt = Annotated[
    float | None,
    typer.Option(
        "--dropout", help="Dropout on embeddings, attention and residuals (default: the config's)."
    ),
]
MaxPosOpt = Annotated[
    int | None,
    typer.Option("--max-positions", help="Learned position table length (GPT-2: 1024)."),
]
ClipOpt = Annotated[
    bool | None,
    typer.Option(
        "--clip-grad/--no-clip-grad",
        help="clip_grad_norm_ before the step (default: on with --loop trainer).",
        show_default=False,
    ),
]

LoraRankOpt = Annotated[
    int | None, typer.Option("--lora-rank", help="peft LoRA adapters of this rank (hf).")
]
LoraAlphaOpt = Annotated[
    int | None, typer.Option("--lora-alpha", help="LoRA alpha (default: peft's, 8).")
]
LoraDropoutOpt = Annotated[
    float | None, typer.Option("--lora-dropout", help="LoRA dropout (default: 0).")
]
LoraTargetsOpt = Annotated[
    str | None,
    typer.Option(
        "--lora-targets",
        help="q_proj,v_proj,... or all-linear (default: peft's for the model_type).",
    ),
]
QuantOpt = Annotated[
    str | None,
    typer.Option(
        "--quant",
        help="bitsandbytes base weights: nf4 or fp4 (QLoRA with --lora-rank), or int8 "
        "(LLM.int8, load_in_8bit).",
    ),
]
QuantDoubleOpt = Annotated[
    bool | None,
    typer.Option(
        "--quant-double/--no-quant-double",
        help="Double quantization of the 4-bit constants (default: off, as BitsAndBytesConfig).",
        show_default=False,
    ),
]
QuantComputeOpt = Annotated[
    str | None,
    typer.Option(
        "--quant-compute-dtype",
        help="bnb_4bit_compute_dtype: fp32 (BitsAndBytesConfig's default), bf16 or fp16.",
    ),
]
Int8ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--int8-threshold",
        help="llm_int8_threshold of --quant int8 (default: 6.0, as BitsAndBytesConfig).",
    ),
]
Int8OutliersOpt = Annotated[
    str | None,
    typer.Option(
        "--int8-outliers",
        help="With --quant int8: down_proj=0.9,... the fraction of each layer's input columns "
        "that reach the threshold (the data decide; default: none). measure reports them.",
    ),
]


def _outlier_fractions(text: str) -> dict[str, float]:
    """``--int8-outliers down_proj=0.9,o_proj=0.01`` as a mapping; ranges and names are
    checked by the config models."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        try:
            if not eq or not name:
                raise ValueError
            fraction = float(value)
        except ValueError:
            raise VramfitError(
                f"expected NAME=FRACTION, got {shown(item)}", field="--int8-outliers"
            ) from None
        if name in out:
            raise VramfitError(f"{shown(name)} is given twice", field="--int8-outliers")
        out[name] = fraction
    return out


def _reshard(text: str) -> bool | int:
    """``--reshard-after-forward true|false|K``: FSDP2 takes a bool or an integer."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return _whole(MAX_GPUS)(text)


# Multi-GPU layout options (the RunSpec's ``parallel`` block).
GpusOpt = Annotated[
    int | None,
    typer.Option("--gpus", parser=_whole(MAX_GPUS), help="World size: ranks, one per GPU."),
]
FsdpOpt = Annotated[
    Fsdp | None,
    typer.Option("--fsdp", help="FSDP2 fully_shard on each decoder layer and the root."),
]
ReshardOpt = Annotated[
    str | None,
    typer.Option(
        "--reshard-after-forward",
        parser=_reshard,
        help="FSDP2 reshard_after_forward of the layers: true, false, or K (reshard to "
        "groups of K ranks) (default: true for full, false for shard-grad-op).",
        show_default=False,
    ),
]
ZeroOpt = Annotated[
    int | None,
    typer.Option("--zero", parser=_whole(3), help="DeepSpeed ZeRO stage 0-3 (modelled only)."),
]
DdpOpt = Annotated[
    bool | None,
    typer.Option("--ddp", help="DistributedDataParallel over the data-parallel ranks.",
                 show_default=False),
]
TpOpt = Annotated[
    int | None, typer.Option("--tp", parser=_whole(MAX_GPUS), help="Tensor-parallel degree.")
]
SpOpt = Annotated[
    bool | None,
    typer.Option("--sp", help="Sequence parallel (with --tp).", show_default=False),
]
PpOpt = Annotated[
    int | None, typer.Option("--pp", parser=_whole(MAX_GPUS), help="Pipeline stages (1F1B).")
]
MicroOpt = Annotated[
    int | None,
    typer.Option(
        "--micro-batches", parser=_whole(MAX_BATCH), help="Pipeline micro-batches per step."
    ),
]
OffloadOpt = Annotated[
    Offload | None,
    typer.Option("--offload", help="State kept on the CPU: optimizer or params."),
]

# The options `estimate` and `measure` (with --train) share, in --help order: the model beyond
# its size, the workload, fine-tuning and the multi-GPU layout. Each defaults to None (the
# preset's value, else the config model's default).
SHARED_RUN_OPTIONS: dict[str, Any] = {
    "arch": ArchOpt,
    "heads": HeadsOpt,
    "kv_heads": KvHeadsOpt,
    "ffn": FfnOpt,
    "vocab": VocabOpt,
    "tied": TiedOpt,
    "precision": PrecisionOpt,
    "optimizer": OptimizerOpt,
    "attention": AttentionOpt,
    "checkpointing": CkptOpt,
    "mode": ModeOpt,
    "gen_tokens": GenOpt,
    "kv_dtype": KvDtypeOpt,
    "impl": ImplOpt,
    "loop": LoopOpt,
    "logits": LogitsOpt,
    "dropout": DropoutOpt,
    "max_positions": MaxPosOpt,
    "clip_grad": ClipOpt,
    "lora_rank": LoraRankOpt,
    "lora_alpha": LoraAlphaOpt,
    "lora_dropout": LoraDropoutOpt,
    "lora_targets": LoraTargetsOpt,
    "quant": QuantOpt,
    "quant_double": QuantDoubleOpt,
    "quant_compute_dtype": QuantComputeOpt,
    "int8_threshold": Int8ThresholdOpt,
    "int8_outliers": Int8OutliersOpt,
    "gpus": GpusOpt,
    "fsdp": FsdpOpt,
    "reshard_after_forward": ReshardOpt,
    "zero": ZeroOpt,
    "ddp": DdpOpt,
    "tp": TpOpt,
    "sp": SpOpt,
    "pp": PpOpt,
    "micro_batches": MicroOpt,
    "offload": OffloadOpt,
}
# the shared options that shape the workload or the layout, which the seed formula has no term
# for: all but the architecture's, which count the parameters it does use
SEED_IGNORES = tuple(
    k
    for k in SHARED_RUN_OPTIONS
    if k not in ("arch", "heads", "kv_heads", "ffn", "vocab", "tied", "max_positions")
)


def _shared_run_options(after: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A command decorator: the command takes ``SHARED_RUN_OPTIONS`` right after its option
    ``after``. typer reads a command's options from its signature, so they are added there;
    they reach the command in its ``**shared`` keyword arguments."""

    def add(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = [p.name for p in own].index(after) + 1
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        shared = [
            inspect.Parameter(name, kind, default=None, annotation=annotation)
            for name, annotation in SHARED_RUN_OPTIONS.items()
        ]
        command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*own[:at], *shared, *own[at:]]
        )
        return command

    return add


# The RunSpec options of `estimate` and `measure --train`, by parameter name.
PARALLEL_OPTIONS = {
    "gpus": "--gpus",
    "fsdp": "--fsdp",
    "reshard_after_forward": "--reshard-after-forward",
    "zero": "--zero",
    "ddp": "--ddp",
    "tp": "--tp",
    "sp": "--sp",
    "pp": "--pp",
    "micro_batches": "--micro-batches",
    "offload": "--offload",
}
RUN_OPTIONS = {
    **PARALLEL_OPTIONS,
    "params": "--params",
    "layers": "--layers",
    "hidden": "--hidden",
    "seq": "--seq",
    "preset": "--preset",
    "hf_config": "--hf-config",
    "arch": "--arch",
    "heads": "--heads",
    "kv_heads": "--kv-heads",
    "ffn": "--ffn",
    "vocab": "--vocab",
    "tied": "--tied",
    "precision": "--precision",
    "optimizer": "--optimizer",
    "attention": "--attention",
    "checkpointing": "--checkpointing",
    "mode": "--mode",
    "gen_tokens": "--gen-tokens",
    "kv_dtype": "--kv-dtype",
    "impl": "--impl",
    "loop": "--loop",
    "logits": "--logits",
    "dropout": "--dropout",
    "max_positions": "--max-positions",
    "clip_grad": "--clip-grad",
    "lora_rank": "--lora-rank",
    "lora_alpha": "--lora-alpha",
    "lora_dropout": "--lora-dropout",
    "lora_targets": "--lora-targets",
    "quant": "--quant",
    "quant_double": "--quant-double",
    "quant_compute_dtype": "--quant-compute-dtype",
    "int8_threshold": "--int8-threshold",
    "int8_outliers": "--int8-outliers",
}


def _lora_and_quant(o: dict[str, Any]) -> dict[str, Any]:
    """The workload's ``lora`` and ``quant`` from their options (None when not asked)."""
    out: dict[str, Any] = {}
    lora_keys = ("lora_alpha", "lora_dropout", "lora_targets")
    if o["lora_rank"] is not None or any(o[k] is not None for k in lora_keys):
        if o["lora_rank"] is None:
            raise VramfitError("give --lora-rank with the other LoRA options", field="--lora-rank")
        lora: dict[str, Any] = {"r": o["lora_rank"]}
        if o["lora_alpha"] is not None:
            lora["alpha"] = o["lora_alpha"]
        if o["lora_dropout"] is not None:
            lora["dropout"] = o["lora_dropout"]
        targets = o["lora_targets"]
        if targets is not None:
            lora["targets"] = (
                targets if targets == "all-linear" else [t for t in targets.split(",") if t]
            )
        out["lora"] = lora
    if o["quant"] is not None:
        quant: dict[str, Any] = {"kind": o["quant"]}
        if o["quant_double"] is not None:
            quant["double_quant"] = o["quant_double"]
        if o["quant_compute_dtype"] is not None:
            quant["compute_dtype"] = o["quant_compute_dtype"]
        if o["int8_threshold"] is not None:
            quant["int8_threshold"] = o["int8_threshold"]
        if o["int8_outliers"] is not None:
            quant["int8_outliers"] = _outlier_fractions(o["int8_outliers"])
        out["quant"] = quant
    elif any(
        o[k] is not None
        for k in ("quant_double", "quant_compute_dtype", "int8_threshold", "int8_outliers")
    ):
        raise VramfitError(
            "give --quant nf4|fp4|int8 with the other quantization options", field="--quant"
        )
    return out


def _run_from_options(**o: Any) -> RunSpec:
    return build_run(
        params=o["params"],
        layers=o["layers"],
        hidden=o["hidden"],
        seq=o["seq"],
        batch=o["batch"],
        preset=o["preset"],
        hf_config=o["hf_config"],
        model_overrides={
            "arch": o["arch"],
            "heads": o["heads"],
            "kv_heads": o["kv_heads"],
            "ffn": o["ffn"],
            "vocab": o["vocab"],
            "tied": o["tied"],
            "max_positions": o["max_positions"],
            "resid_dropout": o["dropout"],
            "embd_dropout": o["dropout"],
            "attention_dropout": o["dropout"],
        },
        workload_overrides={
            "precision": o["precision"],
            "optimizer": o["optimizer"],
            "attention": o["attention"],
            "checkpointing": o["checkpointing"],
            "mode": o["mode"],
            "gen_tokens": o["gen_tokens"],
            "kv_dtype": o["kv_dtype"],
            "impl": o["impl"],
            "loop": o["loop"],
            "logits": o["logits"],
            "clip_grad": o["clip_grad"],
            **_lora_and_quant(o),
        },
        parallel_overrides={name: o.get(name) for name in PARALLEL_OPTIONS},
    )


class SolveField(str, Enum):
    """What ``--solve`` maximises (the choices typer lists in ``--help``)."""

    batch = "batch"
    seq = "seq"


@app.command()
@_shared_run_options(after="hf_config")
def estimate(
    params: ParamsOpt = None,
    layers: LayersOpt = None,
    hidden: HiddenOpt = None,
    seq: SeqOpt = None,
    batch: BatchOpt = None,
    gpu: GpuOpt = None,
    formula: Annotated[
        Formula,
        typer.Option(
            "--formula",
            help="default: vramfit's per-phase model; seed: the origin notebook's formula.",
        ),
    ] = Formula.default,
    preset: PresetOpt = None,
    hf_config: HfOpt = None,
    solve: Annotated[
        SolveField | None,
        typer.Option("--solve", help="batch or seq: the largest value that fits --gpu."),
    ] = None,
    as_json: JsonOpt = False,
    **shared: Any,
) -> None:
    """Estimate the GPU memory a training step or inference pass needs, and whether it fits.

    Exit code: 0 fits (or no --gpu), 1 does not fit, 2 bad input.
    """
    try:
        if formula is Formula.seed:
            ignored = next((k for k in SEED_IGNORES if shared.get(k) is not None), None)
            if ignored is not None:
                raise VramfitError(
                    "--formula seed does not take it: the notebook's formula counts the model's "
                    "parameters, --layers, --hidden, --seq and --batch only",
                    field="--" + ignored.replace("_", "-"),
                )
        run = _run_from_options(
            params=params,
            layers=layers,
            hidden=hidden,
            seq=seq,
            batch=batch,
            preset=preset,
            hf_config=hf_config,
            **shared,
        )
        hardware = _hardware(gpu)
        if solve is not None and hardware is None:
            raise VramfitError("needs --gpu", field="--solve")
        if solve is not None and formula is Formula.seed:
            raise VramfitError("works with vramfit's model, not --formula seed", field="--solve")
    except VramfitError as err:
        _fail(err)
        return
    if formula is Formula.seed:
        _seed(run, hardware, as_json)
    elif solve is not None:
        assert hardware is not None
        _solve(run, hardware, solve.value, as_json)
    else:
        _default(run, hardware, as_json)


@app.command()
def plan(
    gpus: Annotated[
        int, typer.Option("--gpus", parser=_whole(MAX_GPUS, least=2), help="World size.")
    ],
    gpu: Annotated[str, typer.Option("--gpu", help="GPU of every rank (see `vramfit gpus`).")],
    preset: PresetOpt = None,
    hf_config: HfOpt = None,
    params: ParamsOpt = None,
    layers: LayersOpt = None,
    hidden: HiddenOpt = None,
    seq: SeqOpt = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch", parser=_whole(MAX_BATCH), help="Sequences per data-parallel replica "
            "(default: 1)."
        ),
    ] = None,
    precision: PrecisionOpt = None,
    optimizer: OptimizerOpt = None,
    loop: Annotated[
        Loop | None,
        typer.Option(
            "--loop",
            help="hf training loop: drops (loss = model(...).loss; the default here: the loop "
            "measured under FSDP2), trainer (transformers.Trainer) or keeps-logits.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the multi-GPU layouts that fit --gpus GPUs, most headroom first, and why the rest
    do not.

    The layouts: FSDP2 (also over tensor-parallel shards), ZeRO 1-3, DDP with tensor and
    pipeline parallelism, each with and without full checkpointing. Rank 0's peak is
    extrapolated from 3- and 4-layer replays; confirm a choice with `vramfit estimate`.

    Exit code: 0 some layout fits, 1 none fits, 2 bad input.
    """
    import time

    from vramfit.estimate.plan import make_plan, more_gpus

    try:
        run = build_run(
            params=params, layers=layers, hidden=hidden, seq=seq, batch=batch, preset=preset,
            hf_config=hf_config,
            workload_overrides={
                "precision": precision, "optimizer": optimizer, "loop": loop or "drops",
            },
        )
        hardware = _hardware(gpu)
        assert hardware is not None
        started = time.perf_counter()
        result = make_plan(run.model, run.workload, gpus, hardware)
        more = None if result.fits else more_gpus(run.model, run.workload, gpus, hardware)
        elapsed = time.perf_counter() - started  # the larger world sizes' plans included
    except VramfitError as err:
        _fail(err)
        return
    rows = [_candidate_json(c) for c in result.fits + result.rejected]
    more_json = more and {
        "gpus": more.gpus,
        "gpus_tried": list(more.gpus_tried),
        "best": more.best and _candidate_json(more.best),
    }
    if as_json:
        _print_json(
            {
                "gpus": gpus,
                "gpu": _gpu_json(hardware),
                "workload": run.workload.model_dump(mode="json"),
                "fits": [r for r in rows if r["fits"]],
                "does_not_fit": [r for r in rows if not r["fits"]],
                "replays": result.replays,
                "elapsed_s": round(elapsed, 3),
                "more_gpus": more_json,
                "notes": [
                    "rank 0 (the busiest); peak extrapolated from 3- and 4-layer replays, device "
                    "total approximate: confirm with vramfit estimate",
                    "FSDP2 is measured (fake process group); ZeRO, DDP, TP and PP are modelled "
                    "only; NCCL is a model",
                ],
            }
        )
    else:
        from vramfit.render import render_plan

        render_plan(_console(), run, hardware, gpus, rows, elapsed, more_json)
    raise typer.Exit(EXIT_FITS if result.fits else EXIT_DOES_NOT_FIT)


def _candidate_json(c: Any) -> dict[str, Any]:
    par = c.parallel
    return {
        "layout": c.layout,
        "checkpointing": c.checkpointing.value,
        "parallel": {**par.model_dump(mode="json"), "dp": par.dp},
        "fits": c.reason is None,
        "peak_allocated_bytes": c.peak_allocated_bytes,
        "total_bytes": c.total_bytes,
        "headroom_bytes": c.headroom_bytes,
        "reason": c.reason,
        "near_boundary": c.near,  # the verdict is within the approximation (plan.LOW, HIGH)
        "floor_bytes": c.floor_bytes,  # the peak and what is outside the allocator
    }


def _print_json(document: Any) -> None:
    import json

    print(json.dumps(document, indent=2))


def _gpu_json(hardware: "Hardware | None") -> dict[str, Any] | None:
    if hardware is None:
        return None
    return {"name": hardware.name, "memory_bytes": hardware.memory_bytes}


# The dtype a run's matmuls use, as the catalog names its tensor-core throughput.
MATMUL_DTYPE = {
    "fp32": "tf32",
    "amp-fp16": "fp16",
    "amp-bf16": "bf16",
    "bf16": "bf16",
    "fp16": "fp16",
}


def _fast_dtypes(hardware: "Hardware | None") -> set[str] | None:
    """The dtypes the GPU has tensor cores for (catalog ``tflops`` not null); None without one."""
    if hardware is None:
        return None
    from vramfit.catalog import DTYPES, find_gpu

    try:
        gpu = find_gpu(hardware.name)
    except VramfitError:
        return None
    return {dtype for dtype in DTYPES if gpu.peak_tflops(dtype) is not None}


def sharding_note(est: "Estimate") -> list[str]:
    """For a full training run that does not fit one GPU: how many GPUs its model states alone
    need sharded (FSDP2 full, ZeRO-3: weights, gradients and optimizer state spread over every
    rank, ``plan.state_bytes_per_param``), and the plan to ask for."""
    from vramfit.config import Mode
    from vramfit.estimate.plan import ranks_for_states, state_bytes_per_param

    run, hardware = est.run, est.hardware
    w = run.workload
    if hardware is None or est.fits is not False or w.mode is not Mode.train:
        return []
    if not run.parallel.single or w.lora is not None or w.quant is not None:
        return []
    per_param = state_bytes_per_param(w)
    least = ranks_for_states(per_param, est.counts.total, hardware)
    if least < 2:  # the states fit one GPU: what does not is the activations
        return []
    gpus = 1 << (least - 1).bit_length()  # a power of two: plan's layouts divide it
    return [
        f"sharded over GPUs (FSDP2 full, ZeRO-3), the weights, gradients and optimizer state "
        f"alone ({per_param} bytes per parameter) need at least {least} x {hardware.name}, "
        f"before activations: `vramfit plan --gpus {gpus}` (with this model's options) lists "
        "the layouts that fit"
    ]


def dtype_notes(run: RunSpec, hardware: "Hardware | None") -> list[str]:
    """A note when the run's 16-bit matmul dtype has no tensor cores on the GPU (bf16 on a T4 or
    V100): the memory is the same, but PyTorch runs those matmuls without tensor cores."""
    fast = _fast_dtypes(hardware)
    precision = run.workload.precision.value
    dtype = MATMUL_DTYPE[precision]
    if fast is None or hardware is None or dtype in fast or dtype == "tf32":
        return []
    instead = "amp-fp16" if precision.startswith("amp-") else "fp16"
    hint = f"; --precision {instead} needs the same memory and runs fast" if "fp16" in fast else ""
    return [
        f"{hardware.name} has no {dtype} tensor cores: with --precision {precision} its "
        f"matmuls run without them, many times slower{hint}"
    ]


def _apply_change(run: RunSpec, change: str) -> RunSpec:
    """``run`` with a suggestion's options (``--precision fp16 --batch 2``) applied, validated."""
    options: dict[str, Any] = {}
    tokens = change.split()
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            following = tokens[i + 1] if i + 1 < len(tokens) else "--"
            value: Any = True if following.startswith("--") else following
            options[token[2:].replace("-", "_")] = value
    adapter_keys = (
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_targets",
        "quant",
        "quant_double",
        "quant_compute_dtype",
        "int8_threshold",
        "int8_outliers",
    )
    adapters = _lora_and_quant({k: options.pop(k, None) for k in adapter_keys})
    workload = {**run.workload.model_dump(), **options, **adapters}
    return RunSpec(model=run.model, workload=workload, parallel=run.parallel)


def honest_suggestions(run: RunSpec, hardware: "Hardware", est: "Estimate") -> list[Any]:
    """``estimate.solve.suggestions``, kept to dtypes the GPU runs fast (on a GPU without bf16
    tensor cores, ``--precision bf16`` becomes ``fp16``, which needs the same memory), and for
    inference with a KV cache, a smaller ``--kv-dtype`` too. ``est``: ``run``'s estimate."""
    from vramfit.estimate.solve import Suggestion, Totals, suggestions

    fast = _fast_dtypes(hardware) or {"fp16", "bf16"}
    totals = Totals(hardware, (run, est))  # each run estimated once, this one not again

    def priced(change: str) -> Suggestion | None:
        """The change's total, or None where the run cannot take it (an 8-bit KV cache with
        quantized weights: transformers has none)."""
        try:
            changed = _apply_change(run, change)
        except (ValueError, VramfitError):  # pydantic's ValidationError is a ValueError
            return None
        total = totals(changed)
        return Suggestion(change, total, total <= hardware.memory_bytes)

    tips = []
    for tip in suggestions(run, totals):
        if "bf16" in tip.change and "bf16" not in fast:
            if "fp16" not in fast:
                continue
            tip = priced(
                tip.change.replace("--precision bf16", "--precision fp16")
                .replace("--precision amp-bf16", "--precision amp-fp16")
                .replace("--quant-compute-dtype bf16", "--quant-compute-dtype fp16")
            )
        if tip is not None:
            tips.append(tip)
    w = run.workload
    if w.mode is Mode.infer and w.gen_tokens and w.kv_dtype not in (KvDtype.fp8, KvDtype.int8):
        # 8-bit KV caches are what serving stacks offer (vLLM's kv_cache_dtype fp8, TensorRT-LLM
        # int8): fp8 where the GPU has fp8 tensor cores, else int8 where it has int8 ones
        smaller = next((d for d in ("fp8", "int8") if d in fast), None)
        if smaller is not None:
            current = totals(run)
            kv = priced(f"--kv-dtype {smaller}")
            if kv is not None and kv.total_bytes < current:
                if not any(tip.fits for tip in tips) and tips:
                    both = priced(f"{tips[0].change} --kv-dtype {smaller}")
                    if both is not None and both.fits:
                        tips.insert(0, both)
                tips.append(kv)
    return sorted(tips, key=lambda tip: (not tip.fits, tip.total_bytes))


def _default(run: RunSpec, hardware: "Hardware | None", as_json: bool) -> None:
    from vramfit.estimate.core import estimate as run_estimate

    est = run_estimate(run, hardware)
    notes = dtype_notes(run, hardware) + sharding_note(est)
    if as_json:
        document = estimate_json(est)
        document["notes"] += notes
        _print_json(document)
    else:
        from vramfit.render import render_estimate

        tips = []
        if hardware is not None and est.fits is False:
            tips = honest_suggestions(run, hardware, est)
        render_estimate(_console(), est, tips, notes)
    raise typer.Exit(EXIT_DOES_NOT_FIT if est.fits is False else EXIT_FITS)


# What torch (or bitsandbytes) runs for each --optimizer: torch.optim.AdamW picks foreach
# only when both foreach and fused are None (torch/optim/adamw.py _default_to_fused_or_foreach)
OPTIMIZER_IMPLEMENTATION = {
    "adamw": "torch.optim.AdamW() -> foreach (_multi_tensor_adamw)",
    "adamw-foreach": "torch.optim.AdamW(foreach=True) -> _multi_tensor_adamw",
    "adamw-fused": "torch.optim.AdamW(fused=True) -> _fused_adamw",
    "adamw-forloop": "torch.optim.AdamW(fused=False) -> for-loop (_single_tensor_adamw)",
    "sgd": "torch.optim.SGD(momentum=0)",
    "sgd-momentum": "torch.optim.SGD(momentum=0.9)",
    "adam-8bit": "bitsandbytes.optim.AdamW8bit",
    "paged-adamw-8bit": "bitsandbytes.optim.AdamW(optim_bits=8, is_paged=True)",
    "paged-adamw-32bit": "bitsandbytes.optim.AdamW(optim_bits=32, is_paged=True)",
    "adafactor": "torch.optim.Adafactor",
    "adafactor-hf": "transformers.optimization.Adafactor(scale_parameter=False, "
    "relative_step=False)",
    "none": None,
}


def estimate_json(est: "Estimate") -> dict[str, Any]:
    """The documented JSON object for a default estimate (see README, "JSON output")."""
    return {
        "formula": "default",
        "params": est.params,
        "params_derived": est.counts.total,
        "params_active": est.counts.active,
        "model": est.run.model.model_dump(mode="json"),
        # impl: what was estimated (the reference loop where the hf profile has no model)
        "workload": {
            **est.run.workload.model_dump(mode="json"),
            "impl": est.implementation.value,
        },
        "optimizer_implementation": (
            OPTIMIZER_IMPLEMENTATION.get(est.run.workload.optimizer.value)
            if est.run.workload.mode is Mode.train
            else None  # inference runs no optimizer
        ),
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "total_bytes": est.total_bytes,
        "managed_bytes": est.managed_bytes,
        "breakdown": est.breakdown,
        "phases": est.phases,
        "peak_phase": est.peak_phase,
        "peak_point": est.peak_point,
        "block_activation_bytes": est.block_activation_bytes,
        "kv_cache_bytes": est.kv_cache_bytes,
        "gpu": _gpu_json(est.hardware),
        "fits": est.fits,
        "headroom_bytes": est.headroom_bytes,
        "notes": list(est.notes),
        **_limit_json(est),
        **_parallel_json(est),
    }


def _limit_json(est: "Estimate") -> dict[str, Any]:
    """Where the GPU's room decided the replay (absent otherwise): how often the allocator
    freed its cache to retry a cudaMalloc (``num_alloc_retries``), the total it holds where
    nothing limits it, and where it runs out of memory even so."""
    if est.unflushed_total_bytes is None and est.out_of_memory is None:
        return {}
    return {
        "alloc_retries": est.cache_flushes,
        "unlimited_total_bytes": est.unflushed_total_bytes,
        "out_of_memory_at": est.out_of_memory,
    }


def _parallel_json(est: "Estimate") -> dict[str, Any]:
    """The multi-GPU keys (absent on one GPU): the layout, rank 0's NCCL bytes (a model,
    included in ``total_bytes``), each stream's reserved pool, what is offloaded to the CPU."""
    par = est.run.parallel
    if par.single:
        return {}
    from vramfit.estimate.parallel import describe

    return {
        "parallel": {**par.model_dump(mode="json"), "dp": par.dp, "layout": describe(par)},
        "rank": 0,
        "nccl_bytes": est.nccl_bytes,
        "nccl_measured": False,
        "stream_reserved_bytes": est.stream_reserved_bytes,
        "cpu_bytes": est.cpu_bytes,
    }


def _seed(run: RunSpec, hardware: "Hardware | None", as_json: bool) -> None:
    from vramfit.estimate.params import count_params
    from vramfit.estimate.seed import UNDERCOUNT_WARNING, seed_estimate

    spec = run.model
    params = spec.params or count_params(spec).total
    seed = seed_estimate(params, spec.layers, spec.hidden, run.workload.seq, run.workload.batch)
    parts = seed.parts_bytes()
    total = sum(parts.values())
    fits = None if hardware is None else total <= hardware.memory_bytes
    if as_json:
        _print_json(
            {
                "formula": "seed",
                "params": params,
                "total_bytes": total,
                "breakdown": parts,
                "seed_gb": seed.notebook_gb,
                "seed_unit": "notebook GB (= GiB, 2**30 bytes)",
                "gpu": _gpu_json(hardware),
                "fits": fits,
                "headroom_bytes": None if hardware is None else hardware.memory_bytes - total,
                "warning": UNDERCOUNT_WARNING,
            }
        )
    else:
        from vramfit.render import render_seed

        render_seed(
            _console(),
            seed,
            hardware.name if hardware else None,
            hardware.memory_bytes if hardware else None,
        )
    raise typer.Exit(EXIT_DOES_NOT_FIT if fits is False else EXIT_FITS)


def _solve(run: RunSpec, hardware: "Hardware", field: str, as_json: bool) -> None:
    from vramfit.estimate.solve import solve_max

    solution = solve_max(run, hardware, field)  # type: ignore[arg-type]
    est = solution.estimate
    if as_json:
        _print_json(
            {
                "solve": field,
                "value": solution.value,
                "gpu": _gpu_json(hardware),
                "estimate": None if est is None else estimate_json(est),
                "largest": solution.largest,
                "limit": solution.limit,
                "checked_to": solution.checked_to,
                "bound": solution.bound,
                "too_big": list(solution.too_big),
            }
        )
    else:
        from vramfit.render import render_solve

        render_solve(_console(), solution, hardware.name)
        for note in dtype_notes(run, hardware):
            _console().print(f"note: {note}", markup=False)
    raise typer.Exit(EXIT_FITS if solution.value > 0 else EXIT_DOES_NOT_FIT)


@app.command()
def gpus(as_json: JsonOpt = False) -> None:
    """List the GPUs vramfit knows: memory, bandwidth and dense peak TFLOP/s per dtype."""
    from vramfit.catalog import DTYPES, catalog_rows

    rows = catalog_rows()
    if as_json:
        _print_json(rows)
        return
    from vramfit.render import render_gpus

    render_gpus(_console(), rows, DTYPES)


@app.command()
def presets(as_json: JsonOpt = False) -> None:
    """List the model presets: name, title, parameter count, published count and source."""
    from vramfit.presets import ALIASES, preset_rows

    rows = preset_rows()
    if as_json:
        _print_json(rows)
        return
    from vramfit.render import render_presets

    render_presets(_console(), rows, ALIASES)


@app.command()
def check(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="PATH",
            help="Preset files or folders of them (default: presets/).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check preset YAML files: schema, ranges and the published parameter count.

    Prints one `file:line: field: reason` line per problem and exits 1, or a one-line summary
    and exits 0.
    """
    from vramfit.check import check_paths, collect_files, summary_line

    targets = paths or [Path("presets")]
    for path in targets:
        try:
            exists = path.exists()
        except (OSError, ValueError) as exc:  # ENAMETOOLONG, a NUL byte
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            _fail(VramfitError(f"cannot open: {reason}", field=str(path)))
        if not exists:
            _fail(VramfitError("no such file or directory", field=str(path)))
    files = collect_files(targets)
    problems = check_paths(targets)
    for problem in problems:
        print(problem)
    if problems:
        print(summary_line(len(files), problems), file=sys.stderr)
        raise typer.Exit(EXIT_DOES_NOT_FIT)
    print(summary_line(len(files), problems))


@app.command("import-hf")
def import_hf(
    config_path: Annotated[
        Path,
        typer.Argument(
            metavar="CONFIG", help="A local Hugging Face config.json, or the folder holding it."
        ),
    ],
) -> None:
    """Print a preset YAML for a Hugging Face config.json (save it and pass it to --preset)."""
    from vramfit.hf import preset_yaml_from_hf

    sys.stdout.write(preset_yaml_from_hf(config_path))


# --- measure ---------------------------------------------------------------------------------

# Matmul label -> the dtype its product runs in (autocast runs matmuls in 16 bits), i.e. the
# catalog's peak to compare the achieved TFLOP/s with.
COMPUTE_DTYPE = {
    "fp32": "fp32",
    "fp16": "fp16",
    "bf16": "bf16",
    "amp-fp16": "fp16",
    "amp-bf16": "bf16",
}
_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*[x×]\s*(\d+)\s*$", re.IGNORECASE)
MAX_MATMUL_DIM = 1_000_000


def _cuda_backend() -> "Backend":
    """The first CUDA device; one-line VramfitErrors without torch or without CUDA."""
    import warnings

    from vramfit.measure.backend import CudaBackend

    with warnings.catch_warnings():
        # A torch wheel without numpy beside it warns on import; measure never needs numpy.
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        return CudaBackend()


def parse_shape(text: str) -> tuple[int, int, int]:
    """``1024x2048x1024`` -> (m, k, n): A is m x k, B is k x n."""
    match = _SHAPE_RE.match(text)
    dims = tuple(int(d) for d in match.groups()) if match else ()
    if len(dims) != 3 or not all(1 <= d <= MAX_MATMUL_DIM for d in dims):
        raise VramfitError(
            f"expected MxKxN with each size in 1..{MAX_MATMUL_DIM:,}, such as 1024x2048x1024, "
            f"got {text!r}",
            field="--shape",
        )
    return dims  # type: ignore[return-value]


def matmul_cells(
    dtype: Precision | None,
    bmm: bool,
    shape: str | None,
    batch: int | None,
    all_cells: bool,
) -> list[tuple[str, tuple[int, int, int], int | None]]:
    """The (dtype, (m, k, n), batch) cells to run: the notebook's by default.

    Without --bmm (or --batch) the defaults are the notebook's first cell (fp32, 1024x2048 @
    2048x1024); with it, its bmm cell (amp-bf16, 32 x 512x1024 @ 1024x512).
    """
    from vramfit.measure.matmul import NOTEBOOK_CELLS

    if all_cells:
        given = [
            name
            for name, value in (("--dtype", dtype), ("--shape", shape), ("--batch", batch))
            if value is not None
        ]
        if bmm:
            given.append("--bmm")
        if given:
            raise VramfitError(
                f"runs the notebook's cells as they are; drop {', '.join(given)}", field="--all"
            )
        return list(NOTEBOOK_CELLS)
    bmm = bmm or batch is not None
    default_dtype, default_shape, default_batch = NOTEBOOK_CELLS[-1] if bmm else NOTEBOOK_CELLS[0]
    return [
        (
            dtype.value if dtype is not None else default_dtype,
            parse_shape(shape) if shape is not None else default_shape,
            (batch or default_batch) if bmm else None,
        )
    ]


def _catalog_gpu(device_name: str) -> Any:
    """The catalog row of a CUDA device name (e.g. 'NVIDIA H200'), or None."""
    from vramfit.catalog import find_gpu

    try:
        return find_gpu(device_name)
    except VramfitError:
        return None


def matmul_json(
    device_name: str,
    cells: "list[MatmulMeasurement]",
    tflops: dict[str, float],
) -> dict[str, Any]:
    """The matmul table as one JSON-ready dict: bytes predicted (itemised) and measured per
    cell, and achieved TFLOP/s against the catalog's dense peak (and how they were timed)."""
    from vramfit.measure.matmul import TIMING

    gpu = _catalog_gpu(device_name)
    rows = []
    for cell in cells:
        parts = {f"{name}_bytes": n for name, n in cell.prediction.items()}
        rows.append(
            {
                "dtype": cell.dtype,
                "shape": list(cell.shape),
                "batch": cell.batch,
                "output_dtype": cell.output_dtype,
                "predicted": {
                    **parts,
                    "allocated_bytes": cell.predicted_bytes,
                    "peak_bytes": cell.predicted_peak_bytes,
                },
                "measured": {
                    "memory_allocated_bytes": cell.allocated_bytes,
                    "max_memory_allocated_bytes": cell.peak_bytes,
                    "workspace_bytes": cell.workspace_bytes,
                },
                "allocated_error_bytes": cell.predicted_bytes - cell.allocated_bytes,
                "peak_error_bytes": cell.predicted_peak_bytes - cell.peak_bytes,
            }
        )
    throughput = []
    for dtype, achieved in tflops.items():
        peak = gpu.peak_tflops(dtype) if gpu is not None else None
        throughput.append(
            {
                "dtype": dtype,
                "achieved_tflops": round(achieved, 3),
                "peak_tflops": peak,
                "percent_of_peak": None if not peak else round(100 * achieved / peak, 1),
            }
        )
    return {
        "device": device_name,
        "catalog_gpu": None if gpu is None else gpu.name,
        "torch": _torch_version(),
        "cells": rows,
        "tflops": throughput,
        "tflops_timing": TIMING,
    }


def _torch_version() -> str | None:
    # Only read once measure has imported torch; never imports it.
    return getattr(sys.modules.get("torch"), "__version__", None)


def _signed_error_pct(predicted: int | None, measured: int | None) -> float | None:
    if predicted is None or not measured:
        return None
    return round(100 * (predicted - measured) / measured, 2)


# Phase display order; measured inference also has a kv_cache phase the estimate does not.
PHASE_ORDER = ("forward", "backward", "optimizer", "kv_cache", "prefill", "decode")


def train_comparison(est: "Estimate", measured: "TrainMeasurement") -> dict[str, Any]:
    """``{predicted, measured, errors}``: the estimate's JSON, the measurement (all fields),
    and the signed error in percent, (predicted - measured) / measured, per phase peak and for
    ``peak_allocated_bytes`` and ``total_bytes`` (null where there is nothing to compare)."""
    import dataclasses

    names = set(est.phases) | set(measured.phases)
    phases = [p for p in PHASE_ORDER if p in names] + sorted(names - set(PHASE_ORDER))
    errors: dict[str, float | None] = {}
    if not measured.oom:
        for phase in phases:
            errors[phase] = _signed_error_pct(est.phases.get(phase), measured.phases.get(phase))
        errors["peak_allocated_bytes"] = _signed_error_pct(
            est.peak_allocated_bytes, measured.peak_allocated_bytes
        )
        # a fake process group allocates no NCCL memory: the device total is compared with
        # the prediction less NCCL's (zero on one GPU)
        errors["total_bytes"] = _signed_error_pct(
            est.total_bytes - est.nccl_bytes, measured.total_bytes
        )
    return {
        "predicted": estimate_json(est),
        "measured": dataclasses.asdict(measured),
        "errors": errors,
    }


@app.command()
@_shared_run_options(after="hf_config")
def measure(
    train: Annotated[
        bool,
        typer.Option(
            "--train",
            help="Run the configured model (training steps, or inference with --mode infer) "
            "instead of the notebook's matmuls.",
        ),
    ] = False,
    dtype: Annotated[
        Precision | None,
        typer.Option("--dtype", help="Matmul dtype (default: the notebook cell's)."),
    ] = None,
    bmm: Annotated[
        bool, typer.Option("--bmm", help="Batched matmul (the notebook's bmm cell).")
    ] = False,
    shape: Annotated[
        str | None,
        typer.Option(
            "--shape",
            help="Matmul MxKxN: A is MxK, B is KxN (default: 1024x2048x1024; bmm: 512x1024x512).",
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            parser=_whole(MAX_BATCH, least=1),
            help="With --train: sequences per step (default: 1). Else: the bmm batch "
            "(default: 32; implies --bmm).",
        ),
    ] = None,
    all_cells: Annotated[
        bool, typer.Option("--all", help="Run every notebook cell in one table.")
    ] = False,
    params: ParamsOpt = None,
    layers: LayersOpt = None,
    hidden: HiddenOpt = None,
    seq: SeqOpt = None,
    preset: PresetOpt = None,
    hf_config: HfOpt = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            parser=_whole(1000, least=1),
            help="With --train: training steps (default: 3).",
        ),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            "--memory-limit",
            metavar="<size>",
            help="With --train: let PyTorch's allocator hold at most this much "
            "(torch.cuda.set_per_process_memory_fraction), as on a smaller GPU: 24GiB, 16GB, "
            "or bytes; predicted with the same limit.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    **shared: Any,
) -> None:
    """Measure real GPU memory with PyTorch (CUDA), next to vramfit's prediction.

    Without --train: the seed notebook's matmul cells, predicted bytes (itemised) against
    torch.cuda.memory_allocated / max_memory_allocated, and achieved TFLOP/s against the
    catalog peak. With --train: the model of the estimate options, run for --steps steps,
    predicted against measured per phase.

    Needs torch: pip install 'vramfit[measure]'. Exit code: 0 measured, 1 out of memory,
    2 bad input / no torch / no CUDA.
    """
    options = {**locals(), **shared}  # every option by parameter name
    try:
        if train:
            for name, flag in (("dtype", "--dtype"), ("shape", "--shape")):
                if options[name] is not None:
                    raise VramfitError(
                        "only without --train (training uses --precision)", field=flag
                    )
            for name, flag in (("bmm", "--bmm"), ("all_cells", "--all")):
                if options[name]:
                    raise VramfitError("only without --train", field=flag)
            run = _run_from_options(**options)
            limit = None
            if memory_limit is not None:
                from vramfit.units import parse_size

                limit = parse_size(memory_limit, field="--memory-limit")
            _measure_train(run, steps or 3, as_json, limit)
        else:
            only_train = {"steps": "--steps", "memory_limit": "--memory-limit"}
            for name, flag in {**RUN_OPTIONS, **only_train}.items():
                if options[name] is not None:
                    raise VramfitError("only with --train", field=flag)
            _measure_matmul(matmul_cells(dtype, bmm, shape, batch, all_cells), as_json)
    except VramfitError as err:
        _fail(err)


def _oom_error_types() -> tuple[type[BaseException], ...]:
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    found = {getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError}
    return tuple(t for t in found if t is not None)


def _measure_matmul(
    cells: list[tuple[str, tuple[int, int, int], int | None]], as_json: bool
) -> None:
    from vramfit.measure import matmul

    backend = _cuda_backend()
    device_name = backend.name()
    try:
        measured = [
            matmul.measure_matmul(dtype, shape=shape, batch=batch, backend=backend)
            for dtype, shape, batch in cells
        ]
        compute = dict.fromkeys(COMPUTE_DTYPE[dtype] for dtype, _, _ in cells)
        tflops = {d: matmul.measure_tflops(d, backend=backend) for d in compute}
    except _oom_error_types():
        backend.empty_cache()
        print(f"Does not fit: {device_name} ran out of memory for this matmul.")
        raise typer.Exit(EXIT_DOES_NOT_FIT) from None
    document = matmul_json(device_name, measured, tflops)
    if as_json:
        _print_json(document)
        return
    from vramfit.render import render_matmul

    render_matmul(_console(), document)


def _measure_train(run: RunSpec, steps: int, as_json: bool, limit: int | None = None) -> None:
    from vramfit.estimate.core import Hardware
    from vramfit.estimate.core import estimate as run_estimate
    from vramfit.measure.train import measure_train

    if not run.parallel.single:
        from vramfit.measure.launch import visible_gpus

        if visible_gpus() >= run.parallel.gpus:
            if limit is not None:
                raise VramfitError("not with one process per GPU", field="--memory-limit")
            _measure_ranks(run, steps, as_json)
            return
    backend = _cuda_backend()
    if limit is not None:
        from vramfit.units import format_bytes

        _, device_total = backend.mem_get_info()
        if limit > device_total:
            raise VramfitError(
                f"is more than the GPU's {format_bytes(device_total)}", field="--memory-limit"
            )
    if as_json:
        measured = measure_train(run, steps=steps, backend=backend, memory_limit_bytes=limit)
    else:
        from vramfit.render import measure_progress

        with measure_progress(_console(stderr=True)) as on_progress:
            measured = measure_train(
                run, steps=steps, backend=backend, on_progress=on_progress,
                memory_limit_bytes=limit,
            )
    hardware = Hardware(
        name=measured.device_name,
        memory_bytes=measured.device_total_bytes,
        compute_capability=backend.compute_capability(),
        multiprocessors=backend.multiprocessors(),
        allocator_limit_bytes=limit,
    )
    comparison = train_comparison(run_estimate(run, hardware), measured)
    if as_json:
        _print_json(comparison)
    elif measured.oom:
        print(oom_line(measured, comparison["predicted"]["total_bytes"]))
    else:
        from vramfit.render import render_train_comparison

        render_train_comparison(_console(), comparison)
    raise typer.Exit(EXIT_DOES_NOT_FIT if measured.oom else EXIT_FITS)


def _measure_ranks(run: RunSpec, steps: int, as_json: bool) -> None:
    """``--gpus N`` on a machine with N GPUs: the real engine through torchrun and NCCL,
    every rank measured against the prediction (vramfit models the busiest rank), the device
    total with NCCL's memory included on both sides."""
    import dataclasses

    from vramfit.estimate.core import Hardware
    from vramfit.estimate.core import estimate as run_estimate
    from vramfit.measure.launch import launch
    from vramfit.measure.train import TrainMeasurement
    from vramfit.units import format_bytes

    n = run.parallel.gpus
    ranks = launch({"run": run.model_dump(mode="json"), "steps": steps}, n)
    measured = [TrainMeasurement(**r.result) for r in ranks]
    hardware = Hardware(
        name=measured[0].device_name, memory_bytes=measured[0].device_total_bytes
    )
    est = run_estimate(run, hardware)
    document = {
        "launcher": f"torchrun, {n} ranks, {ranks[0].backend}",
        "nccl_version": ranks[0].nccl_version,
        "predicted": estimate_json(est),
        "ranks": [
            {
                "rank": r.rank,
                "nccl_bytes": r.nccl_bytes,
                "measured": dataclasses.asdict(m),
                "errors": {
                    "peak_allocated_bytes": _signed_error_pct(
                        est.peak_allocated_bytes, m.peak_allocated_bytes
                    ),
                    "total_bytes": _signed_error_pct(est.total_bytes, m.total_bytes),
                    "nccl_bytes": _signed_error_pct(est.nccl_bytes, r.nccl_bytes),
                },
            }
            for r, m in zip(ranks, measured, strict=True)
        ],
    }
    if as_json:
        _print_json(document)
    else:
        print(
            f"{n} ranks through {document['launcher']} (NCCL {document['nccl_version']}), "
            f"busiest first; predicted per rank: peak {format_bytes(est.peak_allocated_bytes)}"
            f", device {format_bytes(est.total_bytes)} (NCCL {format_bytes(est.nccl_bytes)})"
        )
        for r, m in zip(document["ranks"], measured, strict=True):
            print(
                f"  rank {r['rank']}: peak {format_bytes(m.peak_allocated_bytes)}, device "
                f"{format_bytes(m.total_bytes)}, NCCL measured {format_bytes(r['nccl_bytes'])}"
            )
    raise typer.Exit(EXIT_DOES_NOT_FIT if any(m.oom for m in measured) else EXIT_FITS)


def oom_line(measured: "TrainMeasurement", predicted_total_bytes: int) -> str:
    """One line for an out-of-memory measurement: where it stopped, and the prediction."""
    from vramfit.units import format_bytes

    return (
        f"Does not fit: {measured.device_name} ({format_bytes(measured.device_total_bytes)}) "
        f"ran out of memory during {measured.reached or 'the run'}; "
        f"vramfit predicted {format_bytes(predicted_total_bytes)}."
    )


# --- entry point -----------------------------------------------------------------------------


def _sentence(text: str) -> str:
    """Lower-case the first letter of a message ('Missing x.' -> 'missing x'), drop the stop."""
    text = " ".join(text.replace("Value error, ", "").split()).rstrip(".")
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    return text


def usage_error_line(err: TyperException) -> str:
    """typer's usage errors as ``field: reason`` (the field is the option or argument)."""
    param = getattr(err, "param", None)
    option = getattr(err, "option_name", None)
    message = str(getattr(err, "message", "") or "")
    if param is not None:
        opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
        named = getattr(param, "metavar", None) or getattr(param, "name", None) or "argument"
        field = opts[0] if opts else str(named).upper()  # as the usage line names it
        if not message:
            return f"{field}: missing"
        return f"{field}: {_sentence(message)}"
    if option is not None:
        possibilities = sorted(getattr(err, "possibilities", None) or [])
        if message.startswith("No such option"):
            hint = f" (did you mean {', '.join(possibilities)}?)" if possibilities else ""
            return f"{shorten(str(option))}: no such option{hint}"
        reason = _sentence(message.replace(f"Option {option!r} ", ""))
        return f"{shorten(str(option))}: {shorten(reason)}"
    if message.startswith("No such command"):
        return f"command: {_sentence(shorten(message))}; run 'vramfit --help' to list them"
    return f"usage: {_sentence(err.format_message())}"


def _command_name(info: typer.models.CommandInfo) -> str:
    return info.name or typer.main.get_command_name(info.callback.__name__)


def _paragraphs(doc: str) -> str:
    """A command's docstring with each paragraph on one line, for click to wrap at the
    terminal's width (a docstring wrapped for the source would otherwise break short)."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _info in app.registered_commands:
    _info.help = _paragraphs(_info.help or inspect.getdoc(_info.callback) or "")
    # the command list shows the whole first sentence, wrapped, where click would cut it at
    # the column's width with "..."
    _info.short_help = _info.help.split("\n\n", 1)[0]


@functools.cache
def _command(name: str | None = None) -> Any:
    """The click command typer builds from ``app`` (built once: tests call ``main`` often);
    with ``name``, a group that holds only that subcommand."""
    if name is None:
        return typer.main.get_command(app)
    only = copy.copy(app)
    only.registered_commands = [i for i in app.registered_commands if _command_name(i) == name]
    return typer.main.get_command(only)


def _command_for(args: list[str]) -> Any:
    """The command that runs ``args``. Typer builds every option of every command up front
    (~10 ms, half of it for `measure`'s): when ``args`` start with a subcommand's name, only
    that one is built. Everything else (``--help``, ``--version``, an unknown command) gets
    the whole group."""
    named = [_command_name(info) for info in app.registered_commands]
    return _command(args[0] if args and args[0] in named else None)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for bad usage, exit codes as documented."""
    # pydantic looks for plugins in every installed distribution's entry points when it builds
    # the first validator (~3.5 ms for 131 distributions); vramfit's command line uses none.
    # An explicit setting is kept. (The vramfit process sets it before importing this module,
    # whose config models build validators at import.)
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = _command_for(args).main(
            args=args or ["--help"], prog_name="vramfit", standalone_mode=False
        )
    except VramfitError as err:
        _print_error(str(err))
        code = err.exit_code
    except TyperException as err:
        _print_error(usage_error_line(err))
        code = EXIT_BAD_INPUT
    except (Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
