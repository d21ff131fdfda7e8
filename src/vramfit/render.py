"""Rich rendering of estimates and tables. The only module besides cli.py that uses rich."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vramfit.estimate.core import Estimate
from vramfit.estimate.seed import UNDERCOUNT_WARNING, SeedEstimate
from vramfit.estimate.solve import Suggestion
from vramfit.units import GIB, format_bytes, format_count

BAR_WIDTH = 30

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
    "allocator_reserve": "allocator reserve",
    "cuda_context": "CUDA context",
}


def _bar(part: int, whole: int) -> Text:
    filled = round(BAR_WIDTH * part / whole) if whole else 0
    return Text("█" * filled + "·" * (BAR_WIDTH - filled), style="cyan")


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:,.2f}"


def render_estimate(console: Console, est: Estimate, suggestions: list[Suggestion]) -> None:
    """Breakdown with a bar per component, the phase timeline, and the verdict."""
    spec, wl = est.run.model, est.run.workload
    active = f" ({format_count(est.counts.active)} active)" if spec.experts > 1 else ""
    console.print(
        f"[bold]{format_count(est.params)}[/] parameters{active} · {spec.arch.value} · "
        f"{spec.layers} layers · hidden {spec.hidden} · {wl.mode.value} · batch {wl.batch} × seq {wl.seq} · "
        f"{wl.precision.value}"
        + (f" · {wl.optimizer.value} · {wl.attention.value} attention · checkpointing {wl.checkpointing.value}"
           if wl.mode.value == "train" else f" · {wl.gen_tokens} generated tokens")
    )
    table = Table(title=f"Memory at the peak ({est.peak_phase}: {est.peak_point})", title_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("share")
    for name, n_bytes in est.breakdown.items():
        table.add_row(COMPONENT_LABELS.get(name, name), _gib(n_bytes), _bar(n_bytes, est.total_bytes))
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
    for note in est.notes:
        console.print(f"[yellow]note:[/] {note}")
    _render_verdict(console, est.total_bytes, est.hardware.name if est.hardware else None,
                    est.hardware.memory_bytes if est.hardware else None)
    if est.fits is False and suggestions:
        console.print("What would help (one change at a time):")
        for s in suggestions:
            verdict = "[green]fits[/]" if s.fits else "[red]still too big[/]"
            console.print(f"  {s.change:<28} → {_gib(s.total_bytes)} GiB  {verdict}")


def _render_verdict(console: Console, total: int, gpu: str | None, memory: int | None) -> None:
    if gpu is None or memory is None:
        console.print(f"Needs [bold]{format_bytes(total)}[/] on the device. Add --gpu NAME for a verdict.")
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
    table = Table(title="Seed notebook formula (FP16 + AdamW), in notebook GB (= GiB, 2**30 bytes)",
                  title_justify="left")
    table.add_column("term")
    table.add_column("notebook GB", justify="right")
    table.add_row("params: 6 × P[M] / 1024", f"{seed.param_gb:.2f}")
    table.add_row("activations: 8·L·H·S·B / 1024³", f"{seed.activation_gb:.2f}")
    table.add_row("safety buffer", f"{seed.buffer_gb:.2f}")
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{seed.notebook_gb}[/]")
    console.print(table)
    console.print(f"[yellow]warning:[/] {UNDERCOUNT_WARNING}")
    _render_verdict(console, round(seed.total_gb * GIB), gpu, memory)


def render_solve(console: Console, field: str, value: int, gpu: str, est: Estimate | None) -> None:
    if value == 0 or est is None:
        console.print(f"[bold red]Nothing fits[/] on {gpu}: even {field} 1 is too big.")
        return
    console.print(
        f"Largest {field} that fits on {gpu}: [bold]{value}[/] "
        f"({format_bytes(est.total_bytes)} of {format_bytes(est.hardware.memory_bytes if est.hardware else 0)})."
    )
