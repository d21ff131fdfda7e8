"""Rich rendering of estimates and tables. The only module besides cli.py that uses rich.

Every function takes a Console and data the CLI has already computed (an Estimate, or the same
JSON-ready dict that ``--json`` prints), so the table and the JSON never disagree. Text that
comes from files or the device (preset sources, notes, device names) is escaped: rich would
read ``[...]`` in it as markup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vramfit.units import GIB, MIB, format_bytes, format_count, format_times

if TYPE_CHECKING:  # `vramfit estimate` pays for importing only what its output needs
    from vramfit.estimate.core import Estimate
    from vramfit.estimate.seed import SeedEstimate
    from vramfit.estimate.solve import Solution, Suggestion

BAR_WIDTH = 30

# Components under 5 MiB would print as 0.00 GiB: the table leaves them out (the total and the
# JSON output keep them).
SMALLEST_ROW_BYTES = 5 * 2**20

COMPONENT_LABELS = {
    "weights": "weights",
    "autocast_weight_copies": "autocast 16-bit weight copies",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "optimizer_temp": "optimizer step temporaries",
    "activations": "saved activations",
    "activation_grads": "backward temporaries",
    "logits": "logits and loss",
    "kv_cache": "KV cache",
    "cublas_workspace": "cuBLAS workspaces",
    "allocator_rounding": "allocator rounding",
    "allocator_reserve": "allocator reserve",
    "managed_optimizer_state": "paged optimizer state",  # CUDA managed memory
    "cuda_context": "CUDA context",
    "sharded_weights": "weight shards (this rank)",
    "sharded_gradients": "gradient shards (this rank)",
    "unsharded_weights": "gathered weights (layers in flight)",
    "unsharded_gradients": "gathered gradients (layers in flight)",
    "collective_buffers": "all-gather / reduce-scatter buffers",
    "nccl": "NCCL buffers (model, unmeasured)",
}

INFERENCE_LABELS = {**COMPONENT_LABELS, "activations": "activations in flight"}


def _bar(part: int, whole: int) -> Text:
    filled = round(BAR_WIDTH * part / whole) if whole else 0
    return Text("█" * filled + "·" * (BAR_WIDTH - filled), style="cyan")


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:,.2f}"


def render_estimate(
    console: Console,
    est: Estimate,
    suggestions: list[Suggestion],
    notes: Sequence[str] = (),
) -> None:
    """Breakdown with a bar per component, the phase timeline, the notes (the estimate's and
    ``notes``), and the verdict."""
    spec, wl = est.run.model, est.run.workload
    active = f" ({format_count(est.counts.active)} active)" if spec.experts > 1 else ""
    if wl.mode.value == "train":
        how = (
            f"{wl.optimizer.value} · {wl.attention.value} attention · "
            f"checkpointing {wl.checkpointing.value}"
        )
        if wl.lora is not None:
            how += f" · LoRA r{wl.lora.r}"
        if wl.quant is not None:
            how += f" · {wl.quant.kind.value} base"
    else:
        how = f"{wl.gen_tokens} generated tokens"
    if est.implementation.value == "hf":
        family = spec.model_type.value if spec.model_type else spec.arch.value
        loop = f" ({wl.loop.value} loop)" if wl.mode.value == "train" else ""
        impl = f"transformers {family}{loop}"
    else:
        impl = f"reference {spec.arch.value}"
    console.print(
        f"[bold]{format_count(est.params)}[/] parameters{active} · {impl} · "
        f"{spec.layers} layers · hidden {spec.hidden} · {wl.mode.value} · "
        f"batch {wl.batch} × seq {wl.seq} · {wl.precision.value} · {how}"
    )
    if not est.run.parallel.single:
        from vramfit.estimate.parallel import describe

        pools = ", ".join(f"{k} {_gib(v)}" for k, v in est.stream_reserved_bytes.items())
        console.print(
            f"Rank 0 of {est.run.parallel.gpus} ({describe(est.run.parallel)}); "
            f"batch and seq per rank; reserved by stream (GiB): {pools}"
        )
    table = Table(
        title=f"Memory at the peak ({est.peak_phase}: {est.peak_point})", title_justify="left"
    )
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("share")
    # without autograd nothing is saved: the activations are the forward's tensors in flight
    labels = COMPONENT_LABELS if wl.mode.value == "train" else INFERENCE_LABELS
    for name, n_bytes in est.breakdown.items():
        if n_bytes < SMALLEST_ROW_BYTES:  # would print as 0.00 GiB
            continue
        table.add_row(labels.get(name, name), _gib(n_bytes), _bar(n_bytes, est.total_bytes))
    table.add_section()
    table.add_row("[bold]total on the device[/]", f"[bold]{_gib(est.total_bytes)}[/]", "")
    table.add_row("peak allocated by PyTorch", _gib(est.peak_allocated_bytes), "")
    console.print(table)

    phases = Table(title="Phase timeline (peak allocated in each phase)", title_justify="left")
    phases.add_column("phase")
    phases.add_column("GiB", justify="right")
    phases.add_column("")
    top = max(est.phases.values())
    for phase, n_bytes in est.phases.items():
        mark = " ← peak" if phase == est.peak_phase else ""
        phases.add_row(phase, _gib(n_bytes), Text.assemble(_bar(n_bytes, top), mark))
    console.print(phases)
    for note in (*est.notes, *notes):
        console.print(f"[yellow]note:[/] {escape(note)}")
    if est.out_of_memory is not None and est.hardware is not None:
        console.print(
            f"[bold red]Does not fit[/] on {est.hardware.name} "
            f"({format_bytes(est.hardware.memory_bytes)}): out of memory at "
            f"{escape(est.out_of_memory)}, even after freeing the allocator's cache."
        )
    elif est.cache_flushes and est.fits:
        assert est.hardware is not None
        console.print(
            f"[bold green]Fits[/] on {est.hardware.name} "
            f"({format_bytes(est.hardware.memory_bytes)}) by freeing the allocator's cache "
            f"{format_times(est.cache_flushes)}: the tensors peak at "
            f"{format_bytes(est.peak_allocated_bytes)}, its cache fills the rest."
        )
    else:
        _render_verdict(
            console,
            est.total_bytes,
            est.hardware.name if est.hardware else None,
            est.hardware.memory_bytes if est.hardware else None,
        )
    if est.fits is False and suggestions:
        console.print("What would help (each line on its own):")
        # a long combination goes over several lines, split between options, so that every
        # line stays within 80 columns; its total follows its last part
        parts = {s.change: _split_options(s.change, 42) for s in suggestions}
        lines = {c: [p[0]] + [f"  {x}" for x in p[1:]] for c, p in parts.items()}
        width = max(len(p[-1]) for p in lines.values())
        for s in suggestions:
            verdict = "[green]fits[/]" if s.fits else "[red]still too big[/]"
            *head, last = lines[s.change]
            for line in head:
                console.print(f"  {line}", markup=False)
            console.print(f"  {last:<{width}} → {_gib(s.total_bytes):>7} GiB  {verdict}")
        if any(s.change.startswith("--batch ") for s in suggestions):
            console.print("  (--solve batch finds the largest batch that fits)", markup=False)


def _split_options(change: str, width: int) -> list[str]:
    """``change`` in lines of at most ``width`` characters, broken before an option."""
    options = ["--" + o.strip() for o in change.split("--") if o.strip()]
    lines: list[str] = []
    for option in options:
        if lines and len(lines[-1]) + 1 + len(option) <= width:
            lines[-1] += " " + option
        else:
            lines.append(option)
    return lines or [change]


def _render_verdict(console: Console, total: int, gpu: str | None, memory: int | None) -> None:
    if gpu is None or memory is None:
        console.print(
            f"Needs [bold]{format_bytes(total)}[/] on the device. Add --gpu NAME for a verdict."
        )
        return
    if total <= memory:
        console.print(
            f"[bold green]Fits[/] on {gpu} ({format_bytes(memory)}): "
            f"{format_bytes(memory - total)} headroom ({(memory - total) / memory:.0%})."
        )
    else:
        console.print(
            f"[bold red]Does not fit[/] on {gpu} ({format_bytes(memory)}): "
            f"short by {format_bytes(total - memory)}."
        )


def render_seed(console: Console, seed: SeedEstimate, gpu: str | None, memory: int | None) -> None:
    """The notebook formula's three terms, in the notebook's own unit."""
    table = Table(
        title="Seed notebook formula (FP16 + AdamW), in notebook GB (= GiB, 2**30 bytes)",
        title_justify="left",
    )
    table.add_column("term")
    table.add_column("notebook GB", justify="right")
    table.add_row("params: 6 × P[M] / 1024", f"{seed.param_gb:.2f}")
    table.add_row("activations: 8·L·H·S·B / 1024³", f"{seed.activation_gb:.2f}")
    table.add_row("safety buffer", f"{seed.buffer_gb:.2f}")
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{seed.notebook_gb}[/]")
    console.print(table)
    from vramfit.estimate.seed import UNDERCOUNT_WARNING

    console.print(f"[yellow]warning:[/] {UNDERCOUNT_WARNING}", soft_wrap=True)  # one line
    _render_verdict(console, round(seed.total_gb * GIB), gpu, memory)


def render_solve(console: Console, solution: Solution, gpu: str) -> None:
    """The largest value that fits, and what the search could and could not prove."""
    field, value, est = solution.field, solution.value, solution.estimate
    where = gpu
    if solution.parallel is not None and not solution.parallel.single:
        from vramfit.estimate.parallel import describe

        # batch and seq are per rank (per replica), as every multi-GPU estimate gives them
        where = f"rank 0 of {describe(solution.parallel)} on {gpu} ({field} per rank)"
    if value == 0 or est is None:
        console.print(f"[bold red]Nothing fits[/] on {where}: even {field} 1 is too big.")
    else:
        memory = est.hardware.memory_bytes if est.hardware else 0
        found = "that fits" if solution.largest else "found that fits"
        console.print(
            f"Largest {field} {found} on {where}: [bold]{value}[/] "
            f"({format_bytes(est.total_bytes)} of {format_bytes(memory)})."
        )
        if est.cache_flushes:
            from vramfit.estimate.core import MEASURED_RETRIES

            uncertain = (
                f"; uncertain past {MEASURED_RETRIES} retries: measured runs predicted to fit "
                "after hundreds ran out of memory"
                if est.cache_flushes > MEASURED_RETRIES
                else ""
            )
            console.print(
                f"note: at {field} {value} the allocator frees its cache "
                f"{format_times(est.cache_flushes)} to fit: the "
                f"tensors peak at {format_bytes(est.peak_allocated_bytes)}{uncertain}"
            )
    if solution.too_big:
        shown = ", ".join(str(v) for v in solution.too_big[-5:])
        verb = "does" if len(solution.too_big) == 1 else "do"
        console.print(
            f"note: {field} {shown} {verb} not fit: the allocator's reserve is not monotone "
            f"in {field}"
        )
    if not solution.largest:
        console.print(
            f"note: {field} {solution.checked_to + 1} to {solution.bound} not checked: "
            "one of them may fit"
        )
    if solution.by_positions and solution.bound == solution.limit:
        console.print(f"note: {field} stops at {solution.limit}: the learned position table")


def render_gpus(console: Console, rows: list[dict[str, Any]], dtypes: Sequence[str]) -> None:
    """The GPU catalog: memory, bandwidth and dense peak TFLOP/s per dtype.

    Laid out for 80 columns: no vertical rules, and the marketing memory label (``80 GB
    HBM3``) and the sources are left to ``--json``, so every name and number prints whole."""
    table = Table(
        title="GPU catalog: memory (GiB), bandwidth (GB/s), dense peak TFLOP/s (— = none)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        caption="memory labels, notes and sources: vramfit gpus --json",
        caption_justify="left",
    )
    table.add_column("name", no_wrap=True)
    for col in ("GiB", "GB/s", *dtypes):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        flops = ["—" if r["tflops"][d] is None else f"{r['tflops'][d]:g}" for d in dtypes]
        table.add_row(
            escape(r["name"]),
            f"{r['memory_bytes'] / GIB:.1f}",
            f"{r['memory_bandwidth_gb_s']:g}",
            *flops,
        )
    console.print(table)


def render_presets(
    console: Console, rows: list[dict[str, Any]], aliases: Mapping[str, str]
) -> None:
    """The presets table, then the aliases they answer to and each preset's source.

    The sources (long URLs) are listed below the table, one a line, rather than squeezed into
    a column: at 80 columns every name, title and count prints whole."""
    table = Table(
        title="Model presets (use with --preset NAME)", title_justify="left", box=box.SIMPLE_HEAD
    )
    table.add_column("name", no_wrap=True)
    table.add_column("title", ratio=1)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("published", justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            Text(r["name"]),
            Text(r["title"]),
            format_count(r["params"]),
            format_count(r["published_params"]),
        )
    console.print(table)
    if aliases:
        pairs = ", ".join(f"{alias} → {name}" for alias, name in sorted(aliases.items()))
        console.print(Text(f"Aliases: {pairs}"))
    console.print("Sources:")
    for r in rows:
        console.print(Text(f"  {r['name']}: {r['source']}", overflow="fold"))


def _mib(n_bytes: int | None) -> str:
    return "—" if n_bytes is None else f"{n_bytes / MIB:,.2f}"


def _signed_bytes(n_bytes: int) -> Text:
    if n_bytes == 0:
        return Text("exact", style="green")
    return Text(f"{n_bytes:+,} B", style="yellow")


def render_matmul(console: Console, document: dict[str, Any]) -> None:
    """The notebook's matmul cells: predicted bytes, itemised, next to what torch allocated;
    then achieved TFLOP/s next to the catalog's peak."""
    torch = f", torch {document['torch']}" if document.get("torch") else ""
    console.print(Text(f"Device: {document['device']}{torch}"))
    # Four narrow tables rather than one of twelve columns: each fits 80 columns whole.
    cells = Table(title="Matmul cells", title_justify="left", box=box.SIMPLE_HEAD)
    cells.add_column("#", justify="right")
    cells.add_column("product")
    cells.add_column("output dtype")
    itemised = Table(title="Predicted, MiB (2**20 bytes)", title_justify="left")
    allocated = Table(title="After the op: memory_allocated, MiB", title_justify="left")
    peak = Table(title="During the op: max_memory_allocated, MiB", title_justify="left")
    for table, columns in (
        (itemised, ("inputs", "output", "autocast\ncopies", "cuBLAS\nworkspace", "total")),
        (allocated, ("predicted", "measured", "Δ")),
        (peak, ("predicted", "measured", "Δ")),
    ):
        table.add_column("#", justify="right")
        for col in columns:
            table.add_column(col, justify="right", no_wrap=True)
    for number, cell in enumerate(document["cells"], start=1):
        m, k, n = cell["shape"]
        batch = cell["batch"]
        label = f"{cell['dtype']} {'bmm ' + str(batch) + '×' if batch else ''}{m}×{k} @ {k}×{n}"
        predicted, measured = cell["predicted"], cell["measured"]
        cells.add_row(str(number), label, cell["output_dtype"])
        itemised.add_row(
            str(number),
            _mib(predicted["inputs_bytes"]),
            _mib(predicted["output_bytes"]),
            _mib(predicted["autocast_copies_bytes"]),
            _mib(predicted["workspace_bytes"]),
            _mib(predicted["allocated_bytes"]),
        )
        allocated.add_row(
            str(number),
            _mib(predicted["allocated_bytes"]),
            _mib(measured["memory_allocated_bytes"]),
            _signed_bytes(cell["allocated_error_bytes"]),
        )
        peak.add_row(
            str(number),
            _mib(predicted["peak_bytes"]),
            _mib(measured["max_memory_allocated_bytes"]),
            _signed_bytes(cell["peak_error_bytes"]),
        )
    for table in (cells, itemised, allocated, peak):
        console.print(table)
    console.print("Autocast copies live only during the op. Δ = predicted − measured, in bytes.")

    gpu = document["catalog_gpu"]
    title = (
        f"Dense matmul throughput (8192² products) vs the catalog peak of {gpu}"
        if gpu
        else "Dense matmul throughput (8192² products)"
    )
    flops = Table(title=title, title_justify="left", min_width=min(len(title), 80))
    flops.add_column("dtype")
    flops.add_column("achieved TFLOP/s", justify="right")
    flops.add_column("peak TFLOP/s", justify="right")
    flops.add_column("% of peak", justify="right")
    for row in document["tflops"]:
        if gpu is None:
            peak, share = "—", "—"
        elif row["peak_tflops"] is None:
            peak, share = "not supported", "—"
        else:
            peak, share = f"{row['peak_tflops']:g}", f"{row['percent_of_peak']:.1f}%"
        flops.add_row(row["dtype"], f"{row['achieved_tflops']:.1f}", peak, share)
    console.print(flops)
    if document.get("tflops_timing"):
        console.print(Text(f"Timed as: {document['tflops_timing']}."))
    if gpu is None:
        console.print(
            Text(f"{document['device']} is not in the GPU catalog: no peak to compare with.")
        )


def _pct(value: float | None) -> Text:
    if value is None:
        return Text("—")
    style = "green" if abs(value) <= 5 else "yellow" if abs(value) <= 15 else "red"
    return Text(f"{value:+.1f}%", style=style)


def render_train_comparison(console: Console, comparison: dict[str, Any]) -> None:
    """Predicted vs measured peak per phase, peak allocated and device total, signed error."""
    predicted, measured, errors = (
        comparison["predicted"],
        comparison["measured"],
        comparison["errors"],
    )
    workload = predicted["workload"]
    console.print(
        Text(
            f"{format_count(measured['params'])} parameters · {workload['mode']} · "
            f"batch {workload['batch']} × seq {workload['seq']} · {workload['precision']} · "
            f"{len({s['step'] for s in measured['steps']})} step(s) on {measured['device_name']} "
            f"({format_bytes(measured['device_total_bytes'])}), torch {measured['torch_version']}"
        )
    )
    table = Table(
        title="Predicted vs measured, GiB; error = (predicted − measured) / measured",
        title_justify="left",
    )
    table.add_column("")
    table.add_column("predicted", justify="right")
    table.add_column("measured", justify="right")
    table.add_column("error", justify="right")
    for phase, error in errors.items():
        if phase in ("peak_allocated_bytes", "total_bytes"):
            continue
        table.add_row(
            f"{phase} (peak allocated)",
            _gib_or_dash(predicted["phases"].get(phase)),
            _gib_or_dash(measured["phases"].get(phase)),
            _pct(error),
        )
    table.add_section()
    table.add_row(
        "peak allocated (max_memory_allocated)",
        _gib(predicted["peak_allocated_bytes"]),
        _gib(measured["peak_allocated_bytes"]),
        _pct(errors.get("peak_allocated_bytes")),
    )
    nccl = predicted.get("nccl_bytes", 0)
    table.add_row(
        "device total (used after the run)" + (" less NCCL" if nccl else ""),
        _gib(predicted["total_bytes"] - nccl),
        _gib(measured["total_bytes"]),
        _pct(errors.get("total_bytes")),
    )
    console.print(table)
    if "parallel" in predicted:
        console.print(
            f"[yellow]rank 0 of {predicted['parallel']['gpus']} "
            f"({predicted['parallel']['layout']}); communication is faked; NCCL's "
            f"{format_bytes(nccl)} is predicted only[/]"
        )
    console.print(
        f"measured: CUDA context {format_bytes(measured['context_bytes'])}, "
        f"weights {format_bytes(measured['weights_bytes'])}, "
        f"reserved peak {format_bytes(measured['reserved_peak_bytes'])}"
    )
    if measured.get("memory_limit_bytes") is not None or measured.get("alloc_retries"):
        limit = measured.get("memory_limit_bytes")
        console.print(
            f"allocator limit {'none' if limit is None else format_bytes(limit)}: cudaMalloc "
            f"retried {measured.get('alloc_retries', 0)} times after freeing the cache "
            f"(predicted {predicted.get('alloc_retries', 0)})"
        )
    for note in measured["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")


def _gib_or_dash(n_bytes: int | None) -> str:
    return "—" if n_bytes is None else _gib(n_bytes)


@contextmanager
def measure_progress(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    """A live progress display for ``measure_train``; yields its ``on_progress`` callback.

    Draw it on a stderr console so stdout stays clean; it disappears when done, and is not
    drawn at all when the console is not a terminal (a log file gets no progress lines).
    """
    if not console.is_terminal:
        yield lambda phase, step, total: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress:
        task = progress.add_task("building the model", total=None)

        def on_progress(phase: str, step: int, total: int) -> None:
            label = f"decode, token {step}" if phase == "decode" else f"step {step}: {phase}"
            progress.update(task, description=label, completed=step - 1, total=total)
            progress.refresh()  # phases can take minutes: show the new one at once

        yield on_progress


def _near(row: dict) -> str:
    """The mark of a plan row whose verdict lies within the plan's approximation."""
    return " ≈" if row["near_boundary"] else ""


def render_plan(
    console: Console,
    run: Any,
    hardware: Any,
    gpus: int,
    rows: list[dict[str, Any]],
    elapsed_s: float,
    more_gpus: dict[str, Any] | None = None,
) -> None:
    """The layouts that fit (most headroom first), then the rest with their reason; when none
    fits, what more GPUs would do (``more_gpus``: the plan's JSON key)."""
    wl = run.workload
    console.print(
        f"{format_count(run.model.params) + ' · ' if run.model.params else ''}"
        f"{run.model.layers} layers · hidden {run.model.hidden} on {gpus} x {hardware.name} "
        f"({_gib(hardware.memory_bytes)} GiB) · batch {wl.batch} x seq {wl.seq} per replica · "
        f"{wl.precision.value} · {wl.optimizer.value} · loop {wl.loop.value}"
    )
    if any(r["fits"] for r in rows):
        table = Table(
            title="Layouts that fit (rank 0, GiB; ckpt: checkpointing)",
            title_justify="left",
        )
        for name in ("layout", "ckpt", "peak", "total", "headroom"):
            table.add_column(name, justify="left" if name in ("layout", "ckpt") else "right")
        for r in rows:
            if r["fits"]:
                table.add_row(
                    r["layout"], r["checkpointing"], _gib(r["peak_allocated_bytes"]),
                    _gib(r["total_bytes"]), _gib(r["headroom_bytes"]) + _near(r),
                )
        console.print(table)
    else:
        console.print(f"[bold red]No layout fits {gpus} x {hardware.name}.[/]")
    rest = Table(title="Layouts that do not fit", title_justify="left")
    rest.add_column("layout")
    rest.add_column("ckpt")
    rest.add_column("why")
    for r in rows:
        if not r["fits"]:
            rest.add_row(r["layout"], r["checkpointing"], escape(r["reason"] or "") + _near(r))
    console.print(rest)
    if any(r["near_boundary"] for r in rows):
        console.print(
            "≈ within the plan's approximation of the device total (24% under to 11% over "
            "the full replay), or a refusal whose peak fits, which the allocator's cache "
            "flushes may fit: the verdict may be the other one; `vramfit estimate` with the "
            "layout decides"
        )
    if more_gpus is not None:
        best = more_gpus["best"]
        per_replica = f"batch {wl.batch} x seq {wl.seq} per replica"
        if best is not None:
            console.print(
                f"With --gpus {more_gpus['gpus']} ({per_replica}): {best['layout']}, "
                f"checkpointing {best['checkpointing']}, {_gib(best['total_bytes'])} GiB, "
                f"{_gib(best['headroom_bytes'])} GiB headroom (the fewest of "
                f"{', '.join(map(str, more_gpus['gpus_tried']))} GPUs tried; see `vramfit plan "
                f"--gpus {more_gpus['gpus']}`)."
            )
        elif more_gpus["gpus_tried"]:
            console.print(
                f"No layout fits up to {more_gpus['gpus']} GPUs either ({per_replica}; "
                "tensor parallelism stops at 8, and data parallelism does not shrink a "
                "replica's activations): lower --seq or --batch."
            )
    larger = more_gpus["gpus_tried"] if more_gpus else []
    also = f" (and those of {', '.join(map(str, larger))} GPUs)" if larger else ""
    console.print(
        f"[yellow]note:[/] {len(rows)} layouts{also} in {elapsed_s:.2f} s; peaks extrapolated "
        "from 3- and 4-layer replays, device totals approximate: confirm with `vramfit estimate`. "
        "FSDP2 is measured (fake process group); ZeRO, DDP, TP and PP are modelled only."
    )
