"""The vramfit command line: parse options, call the pure estimator, render or print JSON.

Expected failures (bad input, unknown names, unreadable files) surface as one line on
stderr and exit code 2; "does not fit" exits 1. Real bugs keep their traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from typer.exceptions import Abort, TyperException

from vramfit.config import (
    Arch,
    Attention,
    Checkpointing,
    Formula,
    KvDtype,
    Mode,
    ModelSpec,
    Optimizer,
    Precision,
    RunSpec,
    Workload,
)
from vramfit.errors import VramfitError

app = typer.Typer(
    name="vramfit",
    help="Will this model fit in my GPU's memory, and how much headroom is left?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_BAD_INPUT = 0, 1, 2

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
    "params": "--params",
}


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _fail(err: VramfitError) -> None:
    print(f"error: {err}", file=sys.stderr)
    raise typer.Exit(err.exit_code)


def _option_error(err: ValidationError) -> VramfitError:
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "options"
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and not isinstance(first["input"], dict):
        message += f", got {first['input']!r}"
    return VramfitError(message, field=OPTION_NAMES.get(field, field))


def _hardware(gpu_name: str | None) -> Any:
    """Catalog row -> estimator Hardware (None without --gpu)."""
    if gpu_name is None:
        return None
    from vramfit.catalog import find_gpu
    from vramfit.estimate.core import Hardware

    gpu = find_gpu(gpu_name)
    return Hardware(name=gpu.name, memory_bytes=gpu.memory_bytes,
                    compute_capability=COMPUTE_CAPABILITY.get(gpu.architecture))


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

    model = {**base_model, **{k: v for k, v in (model_overrides or {}).items() if v is not None}}
    if params is not None:
        model["params"] = parse_count(params, field="--params")
    if layers is not None:
        model["layers"] = layers
    if hidden is not None:
        model["hidden"] = hidden
    if "hidden" not in model:
        if "params" not in model:
            raise VramfitError("give --params (e.g. 1B), --layers and --hidden, or --preset NAME",
                               field="--params")
        arch = Arch(model.get("arch", Arch.llama))
        model["layers"], model["hidden"] = infer_shape(model["params"], model.get("layers"), arch)
    elif "layers" not in model:
        raise VramfitError("required with --hidden", field="--layers")

    workload = {**base_workload, **{k: v for k, v in (workload_overrides or {}).items() if v is not None}}
    if seq is not None:
        workload["seq"] = seq
    if batch is not None:
        workload["batch"] = batch
    try:
        return RunSpec(model=ModelSpec(**model), workload=Workload(**workload))
    except ValidationError as err:
        raise _option_error(err) from None


ParamsOpt = Annotated[Optional[str], typer.Option("--params", help="Parameter count: 1B, 350M, 1.5e9, 124439808.")]
LayersOpt = Annotated[Optional[int], typer.Option("--layers", help="Transformer blocks.")]
HiddenOpt = Annotated[Optional[int], typer.Option("--hidden", help="Model width.")]
SeqOpt = Annotated[Optional[int], typer.Option("--seq", help="Tokens per sequence [default: 2048].")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch", help="Sequences per step [default: 1].")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="A preset name (see `vramfit presets`) or a preset YAML file.")]
HfOpt = Annotated[Optional[Path], typer.Option("--hf-config", help="A local Hugging Face config.json (or its folder).")]
GpuOpt = Annotated[Optional[str], typer.Option("--gpu", help="GPU to check against (see `vramfit gpus`).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
ArchOpt = Annotated[Optional[Arch], typer.Option("--arch", help="Model family [default: llama].")]
HeadsOpt = Annotated[Optional[int], typer.Option("--heads", help="Attention heads [default: hidden/64].")]
KvHeadsOpt = Annotated[Optional[int], typer.Option("--kv-heads", help="Key/value heads (GQA) [default: heads].")]
FfnOpt = Annotated[Optional[int], typer.Option("--ffn", help="MLP intermediate size.")]
VocabOpt = Annotated[Optional[int], typer.Option("--vocab", help="Vocabulary size.")]
TiedOpt = Annotated[Optional[bool], typer.Option("--tied/--untied", help="lm_head shares the embedding.", show_default=False)]
PrecisionOpt = Annotated[Optional[Precision], typer.Option("--precision", help="fp32, amp-fp16/amp-bf16 (fp32 weights + autocast), or pure bf16/fp16 [default: amp-bf16].")]
OptimizerOpt = Annotated[Optional[Optimizer], typer.Option("--optimizer", help="Optimizer [default: adamw].")]
AttentionOpt = Annotated[Optional[Attention], typer.Option("--attention", help="flash (fused SDPA) or eager [default: flash].")]
CkptOpt = Annotated[Optional[Checkpointing], typer.Option("--checkpointing", help="Activation checkpointing [default: none].")]
ModeOpt = Annotated[Optional[Mode], typer.Option("--mode", help="train or infer [default: train].")]
GenOpt = Annotated[Optional[int], typer.Option("--gen-tokens", help="Tokens to generate (infer): adds the KV cache.")]
KvDtypeOpt = Annotated[Optional[KvDtype], typer.Option("--kv-dtype", help="KV cache dtype [default: compute dtype].")]


def _run_from_options(**o: Any) -> RunSpec:
    return build_run(
        params=o["params"], layers=o["layers"], hidden=o["hidden"], seq=o["seq"], batch=o["batch"],
        preset=o["preset"], hf_config=o["hf_config"],
        model_overrides={"arch": o["arch"], "heads": o["heads"], "kv_heads": o["kv_heads"],
                         "ffn": o["ffn"], "vocab": o["vocab"], "tied": o["tied"]},
        workload_overrides={"precision": o["precision"], "optimizer": o["optimizer"],
                            "attention": o["attention"], "checkpointing": o["checkpointing"],
                            "mode": o["mode"], "gen_tokens": o["gen_tokens"], "kv_dtype": o["kv_dtype"]},
    )


@app.command()
def estimate(
    params: ParamsOpt = None,
    layers: LayersOpt = None,
    hidden: HiddenOpt = None,
    seq: SeqOpt = None,
    batch: BatchOpt = None,
    gpu: GpuOpt = None,
    formula: Annotated[Formula, typer.Option("--formula", help="default: vramfit's per-phase model; seed: the origin notebook's formula.")] = Formula.default,
    preset: PresetOpt = None,
    hf_config: HfOpt = None,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    kv_heads: KvHeadsOpt = None,
    ffn: FfnOpt = None,
    vocab: VocabOpt = None,
    tied: TiedOpt = None,
    precision: PrecisionOpt = None,
    optimizer: OptimizerOpt = None,
    attention: AttentionOpt = None,
    checkpointing: CkptOpt = None,
    mode: ModeOpt = None,
    gen_tokens: GenOpt = None,
    kv_dtype: KvDtypeOpt = None,
    solve: Annotated[Optional[str], typer.Option("--solve", help="batch or seq: the largest value that fits --gpu.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Estimate the GPU memory a training step or inference pass needs, and whether it fits.

    Exit code: 0 fits (or no --gpu), 1 does not fit, 2 bad input.
    """
    try:
        run = _run_from_options(**locals())
        hardware = _hardware(gpu)
        if solve is not None and solve not in ("batch", "seq"):
            raise VramfitError(f"expected batch or seq, got {solve!r}", field="--solve")
        if solve is not None and hardware is None:
            raise VramfitError("needs --gpu", field="--solve")
    except VramfitError as err:
        _fail(err)
        return
    if formula is Formula.seed:
        _seed(run, hardware, as_json)
    elif solve is not None:
        _solve(run, hardware, solve, as_json)
    else:
        _default(run, hardware, as_json)


def _default(run: RunSpec, hardware: Any, as_json: bool) -> None:
    from vramfit.estimate.core import estimate as run_estimate
    from vramfit.estimate.solve import suggestions

    est = run_estimate(run, hardware)
    if as_json:
        print(json.dumps(estimate_json(est), indent=2))
    else:
        from vramfit.render import render_estimate

        tips = suggestions(run, hardware) if est.fits is False else []
        render_estimate(_console(), est, tips)
    raise typer.Exit(EXIT_DOES_NOT_FIT if est.fits is False else EXIT_FITS)


def estimate_json(est: Any) -> dict[str, Any]:
    """The documented JSON object for a default estimate (see README, "JSON output")."""
    hw = est.hardware
    return {
        "formula": "default",
        "params": est.params,
        "params_derived": est.counts.total,
        "params_active": est.counts.active,
        "model": est.run.model.model_dump(mode="json"),
        "workload": est.run.workload.model_dump(mode="json"),
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "total_bytes": est.total_bytes,
        "breakdown": est.breakdown,
        "phases": est.phases,
        "peak_phase": est.peak_phase,
        "peak_point": est.peak_point,
        "block_activation_bytes": est.block_activation_bytes,
        "kv_cache_bytes": est.kv_cache_bytes,
        "gpu": None if hw is None else {"name": hw.name, "memory_bytes": hw.memory_bytes},
        "fits": est.fits,
        "headroom_bytes": est.headroom_bytes,
        "notes": list(est.notes),
    }


def _seed(run: RunSpec, hardware: Any, as_json: bool) -> None:
    from vramfit.estimate.params import count_params
    from vramfit.estimate.seed import UNDERCOUNT_WARNING, seed_estimate

    spec = run.model
    params = spec.params or count_params(spec).total
    seed = seed_estimate(params, spec.layers, spec.hidden, run.workload.seq, run.workload.batch)
    parts = seed.parts_bytes()
    total = sum(parts.values())
    fits = None if hardware is None else total <= hardware.memory_bytes
    if as_json:
        print(json.dumps({
            "formula": "seed",
            "params": params,
            "total_bytes": total,
            "breakdown": parts,
            "seed_gb": seed.notebook_gb,
            "seed_unit": "notebook GB (= GiB, 2**30 bytes)",
            "gpu": None if hardware is None else {"name": hardware.name, "memory_bytes": hardware.memory_bytes},
            "fits": fits,
            "headroom_bytes": None if hardware is None else hardware.memory_bytes - total,
            "warning": UNDERCOUNT_WARNING,
        }, indent=2))
    else:
        from vramfit.render import render_seed

        render_seed(_console(), seed, hardware.name if hardware else None,
                    hardware.memory_bytes if hardware else None)
    raise typer.Exit(EXIT_DOES_NOT_FIT if fits is False else EXIT_FITS)


def _solve(run: RunSpec, hardware: Any, field: str, as_json: bool) -> None:
    from vramfit.estimate.solve import solve_max

    value, est = solve_max(run, hardware, field)  # type: ignore[arg-type]
    if as_json:
        print(json.dumps({"solve": field, "value": value, "gpu": hardware.name,
                          "estimate": None if est is None else estimate_json(est)}, indent=2))
    else:
        from vramfit.render import render_solve

        render_solve(_console(), field, value, hardware.name, est)
    raise typer.Exit(EXIT_FITS if value > 0 else EXIT_DOES_NOT_FIT)


@app.command()
def gpus(as_json: JsonOpt = False) -> None:
    """List the GPUs vramfit knows: memory, bandwidth and dense peak TFLOP/s per dtype."""
    from vramfit.catalog import DTYPES, catalog_rows

    rows = catalog_rows()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="GPU catalog (dense peak TFLOP/s; — = not supported)")
    for col in ("name", "memory", "GiB", "GB/s", *DTYPES):
        table.add_column(col, justify="left" if col in ("name", "memory") else "right")
    for r in rows:
        flops = ["—" if r["tflops"][d] is None else f"{r['tflops'][d]:g}" for d in DTYPES]
        table.add_row(r["name"], r["memory_label"], f"{r['memory_bytes'] / 2**30:.1f}",
                      f"{r['memory_bandwidth_gb_s']:g}", *flops)
    _console().print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for bad usage, exit codes as documented."""
    try:
        code = app(args=argv, prog_name="vramfit", standalone_mode=False)
    except VramfitError as err:
        print(f"error: {err}", file=sys.stderr)
        code = err.exit_code
    except TyperException as err:
        message = " ".join(err.format_message().replace("Value error, ", "").split())
        print(f"error: {message}", file=sys.stderr)
        code = getattr(err, "exit_code", EXIT_BAD_INPUT) or EXIT_BAD_INPUT
    except (Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
