"""Honest output: dtype notes and suggestions that fit the GPU, tables whole at 80 columns,
``--version`` and ``--help``."""

from __future__ import annotations

import io
import itertools
import json
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from vramfit.cli import main, matmul_json
from vramfit.measure.matmul import NOTEBOOK_CELLS, MatmulMeasurement, predict_matmul

ROOT = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


# --- dtypes the GPU runs fast -----------------------------------------------------------------

# GPUs whose datasheets list no bf16 tensor-core throughput (Turing, Volta), and some that do.
NO_BF16 = ["T4", "V100-SXM2-16GB", "V100-SXM2-32GB"]
BF16 = ["L4", "A10G", "A100-SXM4-80GB", "H100-SXM"]


@pytest.mark.parametrize("gpu", NO_BF16)
@pytest.mark.parametrize("precision", ["bf16", "amp-bf16"])
def test_bf16_without_tensor_cores_gets_a_note(
    capsys: pytest.CaptureFixture[str], gpu: str, precision: str
) -> None:
    args = ["estimate", "--params", "125M", "--gpu", gpu, "--precision", precision]
    code, out, _ = run(capsys, *args, "--json")
    notes = json.loads(out)["notes"]
    instead = "amp-fp16" if precision == "amp-bf16" else "fp16"
    assert (
        f"{gpu} has no bf16 tensor cores: with --precision {precision} its matmuls run without "
        f"them, many times slower; --precision {instead} needs the same memory and runs fast"
    ) in notes
    code, out, _ = run(capsys, *args)
    assert f"note: {gpu} has no bf16 tensor cores" in out


@pytest.mark.parametrize("gpu", BF16)
def test_no_note_where_bf16_runs_fast(capsys: pytest.CaptureFixture[str], gpu: str) -> None:
    _, out, _ = run(capsys, "estimate", "--params", "125M", "--gpu", gpu, "--json")
    assert not any("tensor cores" in note for note in json.loads(out)["notes"])


def _suggestions(out: str) -> list[str]:
    lines = out.split("What would help (each line on its own):\n", 1)[1].splitlines()
    return [line.strip() for line in lines if "→" in line]


@pytest.mark.parametrize("gpu", NO_BF16)
def test_suggestions_never_offer_bf16_where_it_is_slow(
    capsys: pytest.CaptureFixture[str], gpu: str
) -> None:
    # the smallest preset that does not fit on each (fewer layers: a cheaper test)
    preset = "llama-3.2-3b" if gpu == "V100-SXM2-32GB" else "llama-3.2-1b"
    code, out, _ = run(capsys, "estimate", "--preset", preset, "--gpu", gpu)
    tips = _suggestions(out)
    assert code == 1 and tips
    assert not any("bf16" in tip for tip in tips), tips
    assert any(tip.startswith("--precision fp16") for tip in tips), tips


def test_the_fp16_suggestion_costs_what_bf16_does(capsys: pytest.CaptureFixture[str]) -> None:
    """Both are 2 bytes an element: on a T4 the fp16 line shows the total a bf16 run has."""
    _, out, _ = run(capsys, "estimate", "--preset", "llama-3.2-1b", "--gpu", "T4")
    fp16 = next(t for t in _suggestions(out) if re.match(r"--precision fp16 +→", t))
    args = ["estimate", "--preset", "llama-3.2-1b", "--precision", "bf16", "--json"]
    _, doc, _ = run(capsys, *args)
    assert f"{json.loads(doc)['total_bytes'] / 2**30:.2f} GiB" in fp16


def test_suggestions_offer_bf16_where_it_is_fast(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "estimate", "--preset", "llama-3.2-1b", "--gpu", "A10G")
    assert any(tip.startswith("--precision bf16") for tip in _suggestions(out))


@pytest.mark.parametrize(
    "args",
    [
        [],  # the single changes, then combined ones: their first step is a single change
        ["--mode", "infer", "--gen-tokens", "512", "--batch", "64"],  # and --kv-dtype priced
    ],
    ids=["train", "infer"],
)
def test_suggestions_estimate_each_run_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """Pricing what would help estimates every run it prices once, the command's own run not
    again: 9 estimates where there were 11 for Llama-3.1-405B on an H100."""
    import vramfit.estimate.core as core
    import vramfit.estimate.solve as solve

    real, asked = core.estimate, []

    def estimate(run: object, hardware: object = None) -> object:
        asked.append(run.model_dump_json())  # type: ignore[attr-defined]
        return real(run, hardware)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "estimate", estimate)
    monkeypatch.setattr(solve, "estimate", estimate)
    code, out, _ = run(capsys, "estimate", "--preset", "llama-3.2-1b", "--gpu", "T4", *args)
    assert code == 1 and len(_suggestions(out)) >= 3
    assert len(asked) == len(set(asked)) >= 4, len(asked)


@pytest.mark.parametrize(
    "args",
    [
        # on four GPUs: each change is priced in the same layout, and LoRA is not offered
        # (multi-GPU layouts are modelled without adapters)
        ["--gpus", "4", "--fsdp", "full", "--seq", "4096"],
        [],  # QLoRA under autocast, its bf16 compute dtype as fp16 on a T4
        ["--mode", "infer", "--gen-tokens", "512", "--batch", "64"],  # quantized weights
        # a quantized model has no 8-bit KV cache to offer (this was a traceback)
        ["--mode", "infer", "--gen-tokens", "512", "--batch", "64", "--seq", "4096", "--quant",
         "nf4"],
    ],
    ids=["fsdp", "train", "infer", "infer-nf4"],
)
def test_every_suggestion_is_what_the_run_with_that_change_needs(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    base = ["estimate", "--preset", "llama-3.2-1b", "--gpu", "T4", *args]
    code, out, err = run(capsys, *base)
    tips = _suggestions(out)
    assert code == 1 and tips and "Traceback" not in out + err, out + err
    lines = out.split("What would help (each line on its own):\n", 1)[1].splitlines()
    changes = []
    for tip in tips:
        # a change over several lines: its options are on the lines before the one with "→"
        at = next(i for i, line in enumerate(lines) if line.strip() == tip)
        first = at
        while first and "→" not in lines[first - 1] and lines[first - 1].startswith("  "):
            first -= 1
        change = " ".join(" ".join(lines[first : at + 1]).split("→")[0].split())
        shown = float(tip.split("→")[1].split()[0].replace(",", ""))
        code, doc, err = run(capsys, *base, *change.split(), "--json")
        assert code in (0, 1), (change, err)
        assert round(json.loads(doc)["total_bytes"] / 2**30, 2) == shown, change
        if "--gpus" in args:
            assert "--lora-rank" not in change and "--quant" not in change
        if "--lora-rank" in change and "--quant" in change:  # QLoRA: under autocast
            assert not re.search(r"--precision (bf16|fp16)", change), change
        changes.append(change)
    if args[-2:] == ["--batch", "64"]:
        assert "--quant nf4 --quant-compute-dtype fp16" in changes, changes


def test_solve_keeps_the_layout(capsys: pytest.CaptureFixture[str]) -> None:
    """Llama-3.2-1B does not train on one T4 at batch 1, but does on four under FSDP2."""
    base = ["estimate", "--preset", "llama-3.2-1b", "--gpu", "T4", "--gpus", "4", "--fsdp", "full"]
    code, out, _ = run(capsys, *base, "--solve", "batch", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["value"] >= 1 and doc["largest"]
    for batch, fits in ((doc["value"], True), (doc["value"] + 1, False)):
        _, out, _ = run(capsys, *base, "--batch", str(batch), "--json")
        assert json.loads(out)["fits"] is fits
    _, out, _ = run(capsys, *base, "--solve", "batch")
    assert "on rank 0 of FSDP2 full 4 on T4 (batch per rank)" in " ".join(out.split())


@pytest.mark.parametrize(("gpu", "kv_dtype"), [("L4", "fp8"), ("H100", "fp8"), ("A10G", "int8")])
def test_inference_suggests_a_smaller_kv_cache(
    capsys: pytest.CaptureFixture[str], gpu: str, kv_dtype: str
) -> None:
    args = ["--mode", "infer", "--gen-tokens", "256", "--batch", "256", "--gpu", gpu]
    code, out, _ = run(capsys, "estimate", "--preset", "llama-3.1-8b", *args)
    assert code == 1
    assert any(f"--kv-dtype {kv_dtype}" in tip for tip in _suggestions(out)), out


def test_no_kv_suggestion_without_a_fast_8_bit_type(capsys: pytest.CaptureFixture[str]) -> None:
    """V100: no fp8 and no int8 tensor cores in its datasheet."""
    args = ["--mode", "infer", "--gen-tokens", "256", "--batch", "256", "--gpu", "V100-SXM2-32GB"]
    _, out, _ = run(capsys, "estimate", "--preset", "llama-3.1-8b", *args)
    assert not any("--kv-dtype" in tip for tip in _suggestions(out))


# --- 80 columns -------------------------------------------------------------------------------

COMMANDS = [
    ["gpus"],
    ["presets"],
    ["estimate", "--params", "1B", "--layers", "24"],
    ["estimate", "--preset", "qwen2.5-0.5b", "--gpu", "T4", "--checkpointing", "full"],
    ["estimate", "--preset", "llama-3-8b", "--gpu", "T4", "--mode", "infer", "--gen-tokens", "512"],
    ["estimate", "--preset", "gpt2", "--formula", "seed", "--gpu", "T4"],
    ["estimate", "--preset", "gpt2", "--gpu", "T4", "--solve", "seq"],
    ["check", str(ROOT / "presets")],
]


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a[:3]) for a in COMMANDS])
def test_tables_are_whole_at_80_columns(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERMINAL_WIDTH", "80")
    _, out, err = run(capsys, *args)
    assert "…" not in out, out
    # the seed formula's warning is one line by design (a log keeps it whole)
    lines = [line for line in out.splitlines() if not line.startswith("warning: ")]
    assert max(len(line) for line in lines) <= 80


def _matmul_document() -> dict:
    """measure --all's document, from the predictions and the H200 figures committed in
    benchmarks/data/h200-validation/measure_cli.txt (52, 42, 50, 50, 176 MiB allocated)."""
    workspace = 32 * 2**20
    cells = []
    for dtype, shape, batch in NOTEBOOK_CELLS:
        p = predict_matmul(dtype, shape, batch, workspace_bytes=workspace)
        cells.append(
            MatmulMeasurement(
                dtype=dtype,
                shape=shape,
                batch=batch,
                output_dtype="float32" if dtype == "fp32" else "bfloat16",
                allocated_bytes=p.allocated_bytes + 512,
                peak_bytes=p.peak_bytes - 33_554_432,
                workspace_bytes=workspace,
                predicted_bytes=p.allocated_bytes,
                predicted_peak_bytes=p.peak_bytes,
                prediction=p.parts,
            )
        )
    tflops = {"fp32": 51.3, "fp16": 688.0, "bf16": 702.4}
    return matmul_json("NVIDIA H200", cells, tflops)


def _render(function, *args) -> str:
    screen = io.StringIO()
    function(Console(file=screen, width=80, color_system=None), *args)
    return screen.getvalue()


def test_measure_all_is_whole_at_80_columns() -> None:
    from vramfit.render import render_matmul

    out = _render(render_matmul, _matmul_document())
    assert "…" not in out, out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "+33,554,432 B" in out
    for header in ("autocast", "cuBLAS", "Δ", "amp-bf16 bmm 32×512×1024 @ 1024×512", "-512 B"):
        assert header in out, header


def test_gpus_table_names_every_gpu_whole(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "gpus")
    _, doc, _ = run(capsys, "gpus", "--json")
    for row in json.loads(doc):
        assert re.search(rf"^ *{re.escape(row['name'])} ", out, re.MULTILINE), row["name"]


# --- more GPUs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "least"),
    [
        # 16 bytes x 70,553,706,496 parameters / 79.65 GiB = 13.2 (8 bytes in bf16: 6.6);
        # 16 x 8,030,261,248 / 79.65 GiB = 1.5, and 4 (bf16 SGD) x 8.03B = 0.4
        (["--preset", "llama-3.1-70b", "--gpu", "H100"], 14),
        (["--preset", "llama-3.1-70b", "--gpu", "H100", "--precision", "bf16"], 7),
        (["--preset", "llama-3.1-8b", "--gpu", "H100"], 2),
        (["--preset", "llama-3.1-8b", "--gpu", "H100", "--precision", "bf16", "--optimizer",
          "sgd"], None),  # its states fit; the activations do not
        (["--preset", "llama-3.1-70b", "--gpu", "H100", "--lora-rank", "16"], None),
        (["--preset", "llama-3.1-70b", "--gpu", "H100", "--mode", "infer"], None),
    ],
)
def test_a_run_too_big_for_one_gpu_says_how_many_its_states_need(
    capsys: pytest.CaptureFixture[str], args: list[str], least: int | None
) -> None:
    code, out, _ = run(capsys, "estimate", *args, "--json")
    doc = json.loads(out)
    notes = [n for n in doc["notes"] if n.startswith("sharded over GPUs")]
    if least is None:
        assert not notes or doc["fits"], notes
        return
    assert code == 1 and len(notes) == 1
    gpus = 1 << (least - 1).bit_length()
    need = f"need at least {least} x H100-SXM, before activations: `vramfit plan --gpus {gpus}`"
    assert need in notes[0]


# --- component labels ---------------------------------------------------------------------


def test_inference_shows_activations_in_flight_and_its_kv_cache(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No autograd, nothing saved: an inference peak's activations are the forward's tensors in
    flight, and the DynamicCache the prefill has filled so far is the KV cache row."""
    args = ["estimate", "--preset", "llama-3-8b", "--mode", "infer", "--batch", "8"]
    _, out, _ = run(capsys, *args, "--gen-tokens", "512")
    assert "activations in flight" in out and "saved activations" not in out
    kv = re.search(r"KV cache\W+([0-9.]+)", out)
    # every layer's K and V at the peak (the last block's MLP): 8 x 2048 tokens x 8 KV heads
    # x 128 x bf16 x 2 x 32 layers
    assert kv and float(kv[1]) == 8 * 2048 * 8 * 128 * 2 * 2 * 32 / 2**30, out
    _, out, _ = run(capsys, "estimate", "--preset", "llama-3-8b")
    assert "saved activations" in out and "in flight" not in out


# --- --version and --help ---------------------------------------------------------------------


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    if sys.version_info >= (3, 11):
        import tomllib

        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
        version = pyproject["project"]["version"]
    else:  # pragma: no cover
        version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert run(capsys, "--version") == (0, f"vramfit {version}\n", "")


def _broken_short(lines: list[str], width: int) -> list[str]:
    """Lines of a paragraph that end where the next line's first word would still have fit:
    line breaks that came from the source, not from wrapping at ``width``."""
    return [
        a
        for a, b in itertools.pairwise(lines)
        if a.strip() and b.strip() and len(a.strip()) + 1 + len(b.split()[0]) <= width
    ]


def _definition_cells(out: str) -> list[list[str]]:
    """The text of each entry of the help's definition lists (Options:, Commands:), as its
    lines: click writes an entry's name, then its text wrapped in a column of its own (on the
    next lines when the name is too wide)."""
    cells: list[list[str]] = []
    listing = False
    for line in out.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            listing = line in ("Arguments:", "Options:", "Commands:")
        elif not line.strip():  # a list ends at a blank line
            listing = False
        elif not listing:
            continue
        elif line[2] != " ":  # a name, and its text where it fits beside it
            text = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            cells.append(text[1:])
        else:
            cells[-1].append(line.strip())
    return cells


@pytest.mark.parametrize(
    "name", ["", "estimate", "plan", "gpus", "presets", "check", "measure", "import-hf"]
)
def test_help_is_whole_and_wrapped_at_80_columns(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Every help screen fits 80 columns with nothing cut short ("..." or "…"): option names,
    their text and the command list's sentences whole, each paragraph wrapped at the width
    rather than at the docstring's own line breaks (cli._paragraphs)."""
    monkeypatch.setenv("COLUMNS", "80")
    _, out, _ = run(capsys, *([name] if name else []), "--help")
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80, out
    cut = [line for line in lines[1:] if line.endswith("...") or "…" in line]
    assert not cut, out
    prose = list(itertools.takewhile(lambda line: not re.match(r"\S.*:$", line), lines[1:]))
    assert not _broken_short(prose, 76), out  # click: 78 columns, indented by 2
    cells = _definition_cells(out)
    assert len(cells) >= 2 and all(cells), out
    width = max(len(line) for cell in cells for line in cell)
    for cell in cells:
        assert not _broken_short(cell, width), out
    if not name:
        assert len(cells) == 2 + 7  # --version, --help and the seven commands


def test_solve_lists_its_choices_in_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    _, out, _ = run(capsys, "estimate", "--help")
    assert re.search(r"--solve\s+\S*batch\|seq", out), out


def test_solve_notes_bf16_without_tensor_cores(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "estimate", "--preset", "gpt2", "--gpu", "T4", "--solve", "batch")
    assert code == 0 and "note: T4 has no bf16 tensor cores" in out


# --- when the GPU fills up ----------------------------------------------------------------------


def test_a_fit_by_the_allocators_cache_flushes_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama-3.1-8B, FSDP2 full over 4 A100-40GB with full checkpointing: where nothing limits
    the allocator it holds 50.41 GiB; on the GPU it frees its cache 5 times and fits."""
    monkeypatch.setenv("COLUMNS", "80")
    args = ["estimate", "--preset", "llama-3.1-8b", "--gpu", "A100-SXM4-40GB", "--gpus", "4",
            "--fsdp", "full", "--checkpointing", "full", "--loop", "drops", "--optimizer", "adamw"]
    code, out, _ = run(capsys, *args)
    text = " ".join(out.split())
    assert code == 0
    assert "Fits on A100-SXM4-40GB (40.00 GiB) by freeing the allocator's cache 5 times" in text
    assert "where nothing limits it, the run holds 50.41 GiB" in text
    code, out, _ = run(capsys, *args, "--json")
    doc = json.loads(out)
    assert (doc["fits"], doc["alloc_retries"], doc["out_of_memory_at"]) == (True, 5, None)
    assert doc["total_bytes"] <= doc["gpu"]["memory_bytes"] < doc["unlimited_total_bytes"]
    code, out, _ = run(capsys, *args, "--solve", "batch")
    text = " ".join(out.split())
    assert code == 0 and "note: at batch 3 the allocator frees its cache 9 times to fit" in text


def test_out_of_memory_even_after_the_flushes_says_where(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["estimate", "--preset", "mixtral-8x7b", "--layers", "3", "--seq", "2048", "--batch",
            "8", "--precision", "fp16", "--checkpointing", "full", "--gpu", "A100-SXM4-40GB"]
    code, out, _ = run(capsys, *args)
    text = " ".join(out.split())
    assert code == 1 and "short by" not in text
    assert (
        "Does not fit on A100-SXM4-40GB (40.00 GiB): out of memory at backward: log_softmax "
        "backward, even after freeing the allocator's cache." in text
    )
    code, out, _ = run(capsys, *args, "--json")
    doc = json.loads(out)
    assert (doc["fits"], doc["out_of_memory_at"]) == (False, "backward: log_softmax backward")
    assert doc["alloc_retries"] >= 1 and doc["unlimited_total_bytes"] is None
