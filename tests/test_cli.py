"""The command line: exit codes, exact one-line errors, JSON output, and every command.

Exact stderr lines come from ``cli.main`` (it turns typer's usage errors and VramfitError into
``error: <field>: <reason>``), so those tests call ``main`` directly; happy paths that only need
stdout use typer's CliRunner. Golden numbers come from outside the code: the seed notebook's
worked examples, published parameter counts. ``measure`` runs on the CPU here with fakes in place
of the GPU (tests/gpu/ has the real CUDA runs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from vramfit import cli
from vramfit.cli import SHARED_RUN_OPTIONS, app, main
from vramfit.estimate.seed import UNDERCOUNT_WARNING

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "fixtures" / "hf"
BROKEN = ROOT / "tests" / "fixtures" / "check"
SEED_SHAPE = ["--layers", "24", "--seq", "128", "--batch", "4", "--formula", "seed"]
NO_TORCH = "torch is not installed; pip install 'vramfit[measure]'"

runner = CliRunner()

# A torch wheel without numpy beside it warns once on import; it says nothing about vramfit.
pytestmark = pytest.mark.filterwarnings("ignore:Failed to initialize NumPy:UserWarning")


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the terminal: wide, no colour, no forced terminal (as typer's own tests do)."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("_TYPER_FORCE_DISABLE_TERMINAL", "1")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``vramfit ARGS`` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code, out, err = run(capsys, *args, "--json")
    assert err == ""
    return code, json.loads(out)


# --- the seed formula -----------------------------------------------------------------------

# The notebook's three worked examples, as it prints them (in its own "GB", = GiB).
SEED_EXAMPLES = [
    (["--params", "500M", "--hidden", "1024"], 4.52),
    (["--params", "1B", "--hidden", "1024"], 7.45),
    (["--params", "2B", "--hidden", "2048"], 13.4),
]


@pytest.mark.parametrize(("args", "seed_gb"), SEED_EXAMPLES)
def test_seed_examples_json(
    capsys: pytest.CaptureFixture[str], args: list[str], seed_gb: float
) -> None:
    code, doc = run_json(capsys, "estimate", *args, *SEED_SHAPE)
    assert code == 0
    assert doc["formula"] == "seed"
    assert doc["seed_gb"] == seed_gb
    assert sum(doc["breakdown"].values()) == doc["total_bytes"]
    assert doc["gpu"] is None and doc["fits"] is None and doc["headroom_bytes"] is None


@pytest.mark.parametrize(("args", "seed_gb"), SEED_EXAMPLES)
def test_seed_examples_text_warn_in_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], seed_gb: float
) -> None:
    code, out, err = run(capsys, "estimate", *args, *SEED_SHAPE)
    assert code == 0 and err == ""
    assert f" {seed_gb:.2f} " in out or f" {seed_gb} " in out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {UNDERCOUNT_WARNING}"]


def test_seed_verdict_on_t4(capsys: pytest.CaptureFixture[str]) -> None:
    # The notebook: 13.4 GB "fits but borderline" on the 16 GB T4.
    code, doc = run_json(capsys, "estimate", *SEED_EXAMPLES[2][0], *SEED_SHAPE, "--gpu", "T4")
    assert code == 0
    assert doc["fits"] is True
    assert doc["headroom_bytes"] == doc["gpu"]["memory_bytes"] - doc["total_bytes"]


@pytest.mark.parametrize(
    ("option", "value"),
    [("--quant", "nf4"), ("--mode", "infer"), ("--precision", "fp32"), ("--optimizer", "sgd"),
     ("--lora-rank", "8"), ("--gpus", "8"), ("--checkpointing", "full")],
)
def test_seed_refuses_what_its_formula_has_no_term_for(
    capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    """The notebook's formula is parameters, layers, hidden, seq and batch: an option it would
    silently ignore is an error naming it, not the same total as without it."""
    code, _, err = run(capsys, "estimate", "--formula", "seed", "--preset", "llama-3.1-8b",
                       option, value)
    assert code == 2
    assert err == (
        f"error: {option}: --formula seed does not take it: the notebook's formula counts the "
        "model's parameters, --layers, --hidden, --seq and --batch only\n"
    )


def test_seed_takes_the_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    """Architecture options change the parameter count, which the formula uses."""
    args = ["estimate", "--formula", "seed", "--layers", "24", "--hidden", "1024", "--json"]
    _, small = run_json(capsys, *args, "--vocab", "1000")
    _, large = run_json(capsys, *args, "--vocab", "200000")
    assert large["params"] > small["params"] and large["total_bytes"] > small["total_bytes"]


def test_an_estimate_says_which_implementation_it_used(capsys: pytest.CaptureFixture[str]) -> None:
    """Mixtral's MoE blocks are not in the hf profile: the estimate falls back to the reference
    loop, and its header and JSON say so (they said 'transformers mixtral'). Inference runs no
    optimizer, so none is named."""
    args = ["estimate", "--preset", "mixtral-8x7b", "--mode", "infer"]
    _, doc = run_json(capsys, *args)
    assert doc["workload"]["impl"] == "reference"
    assert any("estimated with the reference implementation" in n for n in doc["notes"])
    assert doc["optimizer_implementation"] is None
    _, out, _ = run(capsys, *args)
    assert "· reference llama ·" in out and "transformers" not in out.splitlines()[0]
    _, doc = run_json(capsys, "estimate", "--preset", "llama-3.2-1b")
    assert doc["workload"]["impl"] == "hf" and doc["optimizer_implementation"]
    # a fallback whose workload the reference loop could not validate (a paged optimizer is
    # the hf profile's) is still an estimate, not a traceback (found by the fuzzer)
    code, doc = run_json(capsys, "estimate", "--layers", "1", "--hidden", "64", "--mode", "infer",
                         "--optimizer", "paged-adamw-8bit", "--kv-dtype", "fp32")
    assert code == 0 and doc["workload"]["impl"] == "reference"


# --- the default estimate: JSON schema and exit codes ---------------------------------------

REQUIRED_KEYS = {
    "params",
    "total_bytes",
    "breakdown",
    "formula",
    "gpu",
    "fits",
    "headroom_bytes",
    "peak_allocated_bytes",
    "phases",
    "peak_phase",
}


@pytest.mark.parametrize(
    "args",
    [
        ["--params", "1B", "--layers", "24", "--hidden", "1024", "--seq", "128", "--batch", "4"],
        ["--preset", "gpt2", "--mode", "infer", "--gen-tokens", "64"],
        ["--preset", "mixtral-8x7b", "--seq", "512", "--checkpointing", "full"],
        ["--hf-config", str(HF / "Qwen2.5-7B"), "--precision", "bf16", "--optimizer", "sgd"],
    ],
)
@pytest.mark.parametrize("gpu", [None, "H100"])
def test_json_schema(capsys: pytest.CaptureFixture[str], args: list[str], gpu: str | None) -> None:
    code, doc = run_json(capsys, "estimate", *args, *(["--gpu", gpu] if gpu else []))
    assert REQUIRED_KEYS <= set(doc)
    assert doc["formula"] == "default"
    assert isinstance(doc["params"], int) and doc["params"] > 0
    assert all(isinstance(v, int) and v > 0 for v in doc["breakdown"].values())
    assert sum(doc["breakdown"].values()) == doc["total_bytes"]
    assert all(isinstance(v, int) for v in doc["phases"].values())
    assert doc["peak_phase"] in doc["phases"]
    assert doc["peak_allocated_bytes"] == max(doc["phases"].values())
    assert doc["peak_allocated_bytes"] <= doc["total_bytes"]
    if gpu is None:
        assert (doc["gpu"], doc["fits"], doc["headroom_bytes"]) == (None, None, None)
        assert code == 0
    else:
        assert set(doc["gpu"]) == {"name", "memory_bytes"}
        assert doc["gpu"]["name"] == "H100-SXM"
        assert doc["headroom_bytes"] == doc["gpu"]["memory_bytes"] - doc["total_bytes"]
        assert doc["fits"] is (doc["headroom_bytes"] >= 0)
        assert code == (0 if doc["fits"] else 1)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--preset", "llama-3.2-1b", "--gpu", "T4"], 1),
        (["--preset", "llama-2-70b", "--gpu", "T4", "--json"], 1),
        (["--preset", "gpt2", "--seq", "512", "--gpu", "H100"], 0),
        (["--preset", "gpt2", "--seq", "512", "--gpu", "H100", "--json"], 0),
        (["--preset", "llama-2-70b"], 0),  # no --gpu: no verdict
        (["--preset", "seed-2b", "--formula", "seed", "--gpu", "T4"], 0),
        (["--preset", "llama-2-70b", "--formula", "seed", "--gpu", "T4"], 1),
    ],
)
def test_exit_code_is_the_verdict(
    capsys: pytest.CaptureFixture[str], args: list[str], code: int
) -> None:
    assert run(capsys, "estimate", *args)[0] == code


def test_every_component_has_a_label() -> None:
    from vramfit.estimate.core import COMPONENTS
    from vramfit.render import COMPONENT_LABELS

    assert set(COMPONENTS) <= set(COMPONENT_LABELS)


def test_does_not_fit_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "estimate", "--preset", "llama-3.2-1b", "--gpu", "T4")
    assert (code, err) == (1, "")
    assert "Does not fit on T4" in out
    assert "What would help" in out


def test_fits_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "estimate", "--preset", "gpt2", "--seq", "512", "--gpu", "H100")
    assert (code, err) == (0, "")
    assert "Fits on H100-SXM" in out
    assert "headroom" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--preset", "gpt2", "--seq", "1024"],
        ["--preset", "llama-3.2-1b", "--seq", "2048", "--checkpointing", "full"],
        ["--preset", "qwen2.5-0.5b", "--mode", "infer", "--gen-tokens", "256"],
    ],
)
def test_solve_batch_is_exact(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, doc = run_json(capsys, "estimate", *args, "--gpu", "H100", "--solve", "batch")
    assert code == 0
    n = doc["value"]
    assert n >= 1 and doc["gpu"] == {"name": "H100-SXM", "memory_bytes": 85_520_809_984}
    assert doc["estimate"]["workload"]["batch"] == n
    fits, at_n = run_json(capsys, "estimate", *args, "--gpu", "H100", "--batch", str(n))
    assert fits == 0 and at_n["fits"] is True
    assert at_n["total_bytes"] == doc["estimate"]["total_bytes"]
    too_big, above = run_json(capsys, "estimate", *args, "--gpu", "H100", "--batch", str(n + 1))
    assert too_big == 1 and above["fits"] is False


def test_solve_seq_is_exact(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--preset", "llama-3.2-1b", "--batch", "8", "--gpu", "A100-80GB"]
    code, doc = run_json(capsys, "estimate", *args, "--solve", "seq")
    assert code == 0
    n = doc["value"]
    assert run_json(capsys, "estimate", *args, "--seq", str(n))[0] == 0
    assert run_json(capsys, "estimate", *args, "--seq", str(n + 1))[0] == 1


def test_solve_nothing_fits(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(
        capsys, "estimate", "--preset", "llama-3.1-405b", "--gpu", "T4", "--solve", "batch"
    )
    assert code == 1
    assert doc["value"] == 0 and doc["estimate"] is None
    code, out, _ = run(
        capsys, "estimate", "--preset", "llama-3.1-405b", "--gpu", "T4", "--solve", "batch"
    )
    assert code == 1 and "Nothing fits on T4" in out


def test_options_override_the_preset(capsys: pytest.CaptureFixture[str]) -> None:
    _, base = run_json(capsys, "estimate", "--preset", "gpt2")
    _, more = run_json(capsys, "estimate", "--preset", "gpt2", "--batch", "8", "--seq", "512")
    assert base["params"] == more["params"] == 124_439_808  # GPT-2 124M, exact published count
    assert (more["workload"]["batch"], more["workload"]["seq"]) == (8, 512)


# --- --hf-config and import-hf --------------------------------------------------------------

# Published counts (see tests/test_hf.py for their sources).
HF_COUNTS = [
    ("gpt2", 124_439_808),
    ("Llama-2-7b-hf", 6_738_415_616),
    ("Meta-Llama-3-8B", 8_030_261_248),
    ("Mistral-7B-v0.1", 7_241_732_096),
    ("Mixtral-8x7B-v0.1", 46_702_792_704),
    ("pythia-160m", 162_322_944),
]


@pytest.mark.parametrize(("folder", "published"), HF_COUNTS)
def test_hf_config(capsys: pytest.CaptureFixture[str], folder: str, published: int) -> None:
    for path in (HF / folder, HF / folder / "config.json"):  # the folder or the file
        code, doc = run_json(capsys, "estimate", "--hf-config", str(path), "--seq", "256")
        assert code == 0
        assert doc["params"] == published


@pytest.mark.parametrize("folder", sorted(p.name for p in HF.iterdir() if p.is_dir()))
def test_import_hf_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, folder: str
) -> None:
    code, out, err = run(capsys, "import-hf", str(HF / folder))
    assert (code, err) == (0, "")
    preset = tmp_path / f"{folder}.yaml"
    preset.write_text(out, encoding="utf-8")
    _, from_hf = run_json(capsys, "estimate", "--hf-config", str(HF / folder), "--seq", "256")
    code, from_preset = run_json(capsys, "estimate", "--preset", str(preset), "--seq", "256")
    assert code == 0
    assert from_preset["params"] == from_hf["params"]
    assert from_preset["model"] == from_hf["model"]
    assert from_preset["total_bytes"] == from_hf["total_bytes"]
    # the imported file passes the checker as it is
    code, out, err = run(capsys, "check", str(preset))
    assert (code, out, err) == (0, "checked 1 file: all OK\n", "")


# --- other commands -------------------------------------------------------------------------


def _command_names() -> list[str]:
    return [
        info.name or info.callback.__name__.replace("_", "-")  # type: ignore[union-attr]
        for info in app.registered_commands
    ]


def test_the_commands() -> None:
    assert sorted(_command_names()) == [
        "check",
        "estimate",
        "gpus",
        "import-hf",
        "measure",
        "plan",
        "presets",
    ]


@pytest.mark.parametrize("name", _command_names())
def test_every_command_has_help(name: str) -> None:
    result = runner.invoke(app, [name, "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert f"Usage: vramfit {name}" in " ".join(result.stdout.split())
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    assert command.help, f"{name} has no docstring"
    for param in command.params:
        if param.name != "help":
            assert getattr(param, "help", None), f"{name}: {param.name} has no help text"


@pytest.mark.parametrize("name", ["estimate", "measure"])
def test_estimate_and_measure_take_the_shared_run_options(name: str) -> None:
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    names = [param.name for param in command.params]
    at = names.index("hf_config") + 1
    assert names[at : at + len(SHARED_RUN_OPTIONS)] == list(SHARED_RUN_OPTIONS)


def test_measure_help_says_how_to_install_torch() -> None:
    result = runner.invoke(app, ["measure", "--help"], catch_exceptions=False)
    assert "pip install 'vramfit[measure]'" in result.stdout  # not eaten as rich markup


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys)
    assert code == 0 and err == ""
    for name in _command_names():
        assert name in out


def test_gpus_json() -> None:
    result = runner.invoke(app, ["gpus", "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    names = {row["name"] for row in rows}
    assert {"T4", "H100-SXM", "H100-PCIe", "H200-SXM", "MI300X"} <= names
    t4 = next(row for row in rows if row["name"] == "T4")
    # the seed notebook's T4 figures: 8.1 TFLOPS fp32, 65 fp16, no bf16, no fp8
    assert t4["tflops"]["fp32"] == 8.1 and t4["tflops"]["fp16"] == 65
    assert t4["tflops"]["bf16"] is None and t4["tflops"]["fp8"] is None
    assert all(isinstance(row["memory_bytes"], int) for row in rows)


def test_gpus_table() -> None:
    result = runner.invoke(app, ["gpus"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "H100-SXM" in result.stdout and "GPU catalog" in result.stdout


def test_presets_json() -> None:
    result = runner.invoke(app, ["presets", "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert len(rows) >= 25
    assert all(
        set(row) == {"name", "title", "params", "published_params", "source"} for row in rows
    )
    by_name = {row["name"]: row for row in rows}
    assert {"seed-500m", "seed-1b", "seed-2b", "gpt2", "llama-2-7b", "mixtral-8x7b"} <= set(by_name)
    assert by_name["gpt2"]["params"] == 124_439_808
    assert by_name["seed-1b"]["params"] == 1_000_000_000


def test_presets_table() -> None:
    result = runner.invoke(app, ["presets"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "llama-3.1-8b" in result.stdout and "124.4M" in result.stdout
    assert "llama-3-8b → llama-3.1-8b" in result.stdout


def test_check_shipped_presets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    n_files = len(list((ROOT / "presets").glob("*.yaml")))
    assert run(capsys, "check", str(ROOT / "presets")) == (
        0,
        f"checked {n_files} files: all OK\n",
        "",
    )
    monkeypatch.chdir(ROOT)  # the default is presets/
    assert run(capsys, "check") == (0, f"checked {n_files} files: all OK\n", "")


@pytest.mark.parametrize("broken", sorted(BROKEN.glob("*.yaml")), ids=lambda p: p.name)
def test_check_broken_file(capsys: pytest.CaptureFixture[str], broken: Path) -> None:
    code, out, err = run(capsys, "check", str(broken))
    assert code == 1
    lines = out.splitlines()
    assert lines
    for line in lines:
        assert re.fullmatch(re.escape(str(broken)) + r"(:[0-9]+)?: \S+: .+", line), line
    assert err.startswith("checked 1 file: ")


def test_check_reports_every_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", str(BROKEN), str(ROOT / "presets" / "gpt2.yaml"))
    assert code == 1
    assert f"{BROKEN / 'unknown_key.yaml'}:11: model.hiden_size: unknown key" in out.splitlines()
    assert "gpt2.yaml" not in out
    n_broken = len(list(BROKEN.glob("*.yaml")))
    assert err.startswith(f"checked {n_broken + 1} files: ")


# --- one-line errors, exit 2 ----------------------------------------------------------------

ERRORS = [
    (
        ["estimate", "--batch", "abc"],
        "--batch: input should be a valid integer, unable to parse string as an integer",
    ),
    (["estimate", "--foo"], "--foo: no such option (did you mean --ffn, --loop?)"),
    (
        ["estimate", "--params", "1B", "--precision", "foo"],
        "--precision: 'foo' is not one of 'fp32', 'amp-fp16', 'amp-bf16', 'bf16', 'fp16'",
    ),
    (
        ["estimate", "--params", "1B", "--mode", "inference"],
        "--mode: 'inference' is not one of 'train', 'infer'",
    ),
    (["estimate", "--params", "1B", "--layers"], "--layers: requires an argument"),
    (["estimate", "--params", "1B", "--tied=yes"], "--tied: does not take a value"),
    (["estimate"], "--params: give --params (e.g. 1B), --layers and --hidden, or --preset NAME"),
    (["estimate", "--hidden", "1024"], "--layers: required with --hidden"),
    (
        # heads default to hidden / 64 = 33, which 2 KV heads cannot share
        ["estimate", "--layers", "2", "--hidden", "2112", "--kv-heads", "2"],
        "--heads: heads (33) is not a multiple of kv_heads (2)",
    ),
    (
        ["estimate", "--params", "1Q"],
        "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got '1Q'",
    ),
    (["estimate", "--params", "0"], "--params: must be a positive count, got '0'"),
    (
        ["estimate", "--params", "-1B"],
        "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got '-1B'",
    ),
    (
        ["estimate", "--params", "nan"],
        "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got 'nan'",
    ),
    (
        ["estimate", "--params", "1B", "--batch", "0"],
        "--batch: input should be greater than or equal to 1, got 0",
    ),
    (
        ["estimate", "--params", "1B", "--seq", "-5"],
        "--seq: input should be greater than or equal to 1, got -5",
    ),
    (
        ["estimate", "--params", "1B", "--layers", "-2"],
        "--layers: input should be greater than or equal to 1, got -2",
    ),
    (
        ["estimate", "--params", "1B", "--layers", "2", "--hidden", "0"],
        "--hidden: input should be greater than or equal to 1, got 0",
    ),
    (
        ["estimate", "--params", "1B", "--gpu", "h1000"],
        "--gpu: unknown GPU 'h1000'; did you mean: H100-SXM, H200-SXM, H100-PCIe?",
    ),
    (
        ["estimate", "--preset", "llama-9"],
        "--preset: unknown preset 'llama-9'; did you mean: llama-3-8b, llama-2-7b, llama-3-70b?",
    ),
    (
        ["estimate", "--preset", "gpt2", "--hf-config", str(HF / "gpt2")],
        "--preset: give --preset or --hf-config, not both",
    ),
    (
        ["estimate", "--params", "1B", "--solve", "tokens", "--gpu", "H100"],
        "--solve: 'tokens' is not one of 'batch', 'seq'",
    ),
    (["estimate", "--params", "1B", "--solve", "batch"], "--solve: needs --gpu"),
    (["frobnicate"], "command: no such command 'frobnicate'; run 'vramfit --help' to list them"),
    (["import-hf"], "CONFIG: missing"),
    (["presets", "--yaml"], "--yaml: no such option"),
    (["measure", "--seq", "128"], "--seq: only with --train"),
    (["measure", "--preset", "gpt2"], "--preset: only with --train"),
    (["measure", "--steps", "2"], "--steps: only with --train"),
    (["measure", "--memory-limit", "8GiB"], "--memory-limit: only with --train"),
    (
        ["measure", "--train", "--preset", "gpt2", "--memory-limit", "8 gigs"],
        "--memory-limit: expected a size such as 24GiB, 16GB or 25769803776, got '8 gigs'",
    ),
    (
        ["measure", "--train", "--dtype", "fp16"],
        "--dtype: only without --train (training uses --precision)",
    ),
    (["measure", "--train", "--all"], "--all: only without --train"),
    (["measure", "--train", "--steps", "0"], "--steps: input should be greater than or equal to 1"),
    (
        ["measure", "--dtype", "fp8"],
        "--dtype: 'fp8' is not one of 'fp32', 'amp-fp16', 'amp-bf16', 'bf16', 'fp16'",
    ),
    (
        ["measure", "--shape", "1024x2048"],
        "--shape: expected MxKxN with each size in 1..1,000,000, such as 1024x2048x1024, "
        "got '1024x2048'",
    ),
    (
        ["measure", "--all", "--dtype", "fp16", "--bmm"],
        "--all: runs the notebook's cells as they are; drop --dtype, --bmm",
    ),
]


@pytest.mark.parametrize(("args", "line"), ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], line: str
) -> None:
    code, out, err = run(capsys, *args)
    assert (code, out, err) == (2, "", f"error: {line}\n")


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_bad_files_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    header = "name: x\ntitle: t\nsource: s\npublished_params: 1000\n"
    cases = [
        (
            ["--preset", str(tmp_path / "missing.yaml")],
            f"{tmp_path / 'missing.yaml'}: no such file",
        ),
        (
            ["--hf-config", str(tmp_path / "missing.json")],
            f"{tmp_path / 'missing.json'}: no such file",
        ),
        (
            ["--preset", str(_write(tmp_path / "syntax.yaml", "name: x\nmodel: [1, 2\n"))],
            f"{tmp_path / 'syntax.yaml'}:3: invalid YAML: "
            "expected ',' or ']', but got '<stream end>'",
        ),
        (
            [
                "--preset",
                str(
                    _write(
                        tmp_path / "key.yaml",
                        header + "model:\n  layers: 2\n  hidden: 64\n  hiden: 3\n",
                    )
                ),
            ],
            f"{tmp_path / 'key.yaml'}: model.hiden: unknown key",
        ),
        (
            [
                "--preset",
                str(_write(tmp_path / "neg.yaml", header + "model:\n  layers: -2\n  hidden: 64\n")),
            ],
            f"{tmp_path / 'neg.yaml'}: model.layers: Input should be greater than or equal to 1",
        ),
        (
            ["--preset", str(_write(tmp_path / "empty.yaml", ""))],
            f"{tmp_path / 'empty.yaml'}: empty file",
        ),
        (
            ["--preset", str(tmp_path)],  # a directory
            f"--preset: {str(tmp_path)!r} is a directory; give a preset name or a .yaml file",
        ),
        (
            ["--hf-config", str(_write(tmp_path / "bert.json", '{"model_type": "bert"}'))],
            f"{tmp_path / 'bert.json'}: unsupported model_type 'bert'; supported: falcon, gemma, "
            "gemma2, gpt2, gpt_neox, llama, mistral, mixtral, phi3, qwen2, qwen2_moe",
        ),
        (
            ["--hf-config", str(_write(tmp_path / "broken.json", "{"))],
            f"{tmp_path / 'broken.json'}: invalid JSON: Expecting property name enclosed in double "
            "quotes (line 1)",
        ),
    ]
    for args, line in cases:
        code, out, err = run(capsys, "estimate", *args)
        assert (code, out, err) == (2, "", f"error: {line}\n"), args
    code, out, err = run(capsys, "check", str(tmp_path / "nowhere"))
    assert (code, out, err) == (
        2,
        "",
        f"error: {tmp_path / 'nowhere'}: no such file or directory\n",
    )
    code, out, err = run(capsys, "import-hf", str(tmp_path / "bert.json"))
    assert code == 2 and out == "" and err.count("\n") == 1


def test_usage_error_without_a_field_is_one_line() -> None:
    class Odd(typer.BadParameter):
        pass

    assert cli.usage_error_line(Odd("Something\n  odd.")) == "usage: invalid value: Something odd"


# --- start-up: estimate never imports torch --------------------------------------------------

NO_TORCH_COMMANDS = [
    ["estimate", "--params", "1B", "--layers", "24", "--hidden", "1024", "--seq", "128"],
    ["estimate", "--params", "1B", "--json"],
    ["estimate", "--preset", "llama-3-8b", "--gpu", "H100"],
    ["estimate", "--preset", "gpt2", "--gpu", "T4", "--solve", "batch"],
    ["estimate", "--params", "500M", "--layers", "24", "--hidden", "1024", "--formula", "seed"],
    ["gpus"],
    ["presets"],
    ["check", str(ROOT / "presets" / "gpt2.yaml")],
    ["import-hf", str(HF / "gpt2")],
    ["measure", "--help"],
]


@pytest.mark.parametrize("args", NO_TORCH_COMMANDS, ids=" ".join)
def test_never_imports_torch(args: list[str]) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from vramfit.cli import main
        try:
            main({args!r})
        except SystemExit as exc:
            code = exc.code
        assert "torch" not in sys.modules, "torch was imported"
        print("exit", code, file=sys.stderr)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert re.search(r"exit [01]$", done.stderr.strip()), done.stderr


# What a JSON estimate from options or a config.json leaves out of its start-up (each costs
# milliseconds there): PyYAML (no YAML is read), rich's renderables and the measuring code.
NOT_IMPORTED = ("yaml", "rich.console", "rich.table", "vramfit.render", "vramfit.measure")


@pytest.mark.parametrize(
    "args",
    [
        ["estimate", "--params", "1B", "--layers", "24", "--hidden", "1024", "--json"],
        ["estimate", "--hf-config", str(HF / "gpt2"), "--json"],
    ],
    ids=" ".join,
)
def test_json_estimate_imports_only_what_it_needs(args: list[str]) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from vramfit.cli import main
        try:
            main({args!r})
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        print(sorted(set({NOT_IMPORTED!r}) & set(sys.modules)), file=sys.stderr)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "[]"


# --- measure: no torch, no CUDA, out of memory ------------------------------------------------


@pytest.mark.parametrize("args", [["measure"], ["measure", "--train", "--preset", "gpt2"]])
def test_measure_without_torch(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert run(capsys, *args) == (2, "", f"error: measure: {NO_TORCH}\n")


def test_measure_without_torch_in_a_fresh_process() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; from vramfit.cli import main; main(['measure'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"error: measure: {NO_TORCH}\n")


def _torch_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure `import torch` gives a torch without CUDA (a stand-in when torch is absent)."""
    try:
        import torch
    except ImportError:
        fake = types.ModuleType("torch")
        fake.cuda = types.SimpleNamespace(is_available=lambda: False)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "torch", fake)
        return
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")


@pytest.mark.parametrize(
    "args",
    [["measure"], ["measure", "--all"], ["measure", "--train", "--preset", "gpt2", "--seq", "64"]],
)
def test_measure_without_cuda(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    _torch_without_cuda(monkeypatch)
    assert run(capsys, *args) == (2, "", "error: measure: no CUDA device available\n")


def test_measure_without_cuda_in_a_fresh_process() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code = "from vramfit.cli import main; main(['measure', '--train', '--preset', 'gpt2'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        "error: measure: no CUDA device available\n",
    )


class FakeGpu:
    """A stand-in CUDA backend: a name, a compute capability, and nothing else."""

    device = "cuda:0"

    def __init__(self, name: str = "NVIDIA H200") -> None:
        self._name = name

    def name(self) -> str:
        return self._name

    def compute_capability(self) -> tuple[int, int]:
        return (9, 0)

    def multiprocessors(self) -> Any:
        from vramfit.estimate.kernels import H200

        return H200

    def empty_cache(self) -> None:
        pass

    def mem_get_info(self) -> tuple[int, int]:
        return 0, 150_109_880_320


GIB = 2**30


def fake_measurement(**changes: Any) -> Any:
    from vramfit.measure.train import TrainMeasurement

    fields: dict[str, Any] = {
        "params": 124_439_808,
        "phases": {"forward": 3 * GIB, "backward": 4 * GIB, "optimizer": 2 * GIB},
        "phase_end": {"forward": 2 * GIB, "backward": 1 * GIB, "optimizer": 1 * GIB},
        "peak_allocated_bytes": 4 * GIB,
        "total_bytes": 5 * GIB,
        "reserved_peak_bytes": 4 * GIB + 2**20,
        "context_bytes": 500 * 2**20,
        "weights_bytes": 500_000_000,
        "steps": [
            {"step": s, "phase": p, "peak_allocated_bytes": 1, "end_allocated_bytes": 1}
            for s in (1, 2)
            for p in ("forward", "backward", "optimizer")
        ],
        "oom": False,
        "reached": None,
        "device_name": "NVIDIA H200",
        "device_total_bytes": 150_109_880_320,
        "torch_version": "2.11.0+cu130",
        "alloc_conf": None,
        "notes": ["adamw: torch.optim.AdamW(foreach=True, fused=False) [note]"],
    }
    fields.update(changes)
    return TrainMeasurement(**fields)


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the GPU and measure_train; returns the calls measure_train received."""
    from vramfit.measure import train

    calls: list[dict[str, Any]] = []
    result: dict[str, Any] = {}

    def measure_train(
        run: Any,
        *,
        steps: int,
        backend: Any,
        on_progress: Any = None,
        memory_limit_bytes: int | None = None,
    ) -> Any:
        calls.append(
            {"run": run, "steps": steps, "backend": backend, "limit": memory_limit_bytes}
        )
        if on_progress is not None:  # drive the progress display as the real one does
            for step in range(1, steps + 1):
                for phase in ("forward", "backward", "optimizer"):
                    on_progress(phase, step, steps)
        return fake_measurement(**result)

    monkeypatch.setattr(cli, "_cuda_backend", FakeGpu)
    monkeypatch.setattr(train, "measure_train", measure_train)
    calls.append(result)  # calls[0]: the fields the next measurement changes
    return calls


def test_measure_train_json(capsys: pytest.CaptureFixture[str], fake_train: list[Any]) -> None:
    args = ["measure", "--train", "--preset", "gpt2", "--batch", "4", "--seq", "512"]
    code, doc = run_json(capsys, *args, "--steps", "2", "--precision", "amp-bf16")
    assert code == 0
    assert set(doc) == {"predicted", "measured", "errors"}
    call = fake_train[1]
    assert call["steps"] == 2
    assert (call["run"].workload.batch, call["run"].workload.seq) == (4, 512)
    # predicted is what `vramfit estimate --json` prints for this GPU
    assert REQUIRED_KEYS <= set(doc["predicted"])
    assert doc["predicted"]["gpu"] == {"name": "NVIDIA H200", "memory_bytes": 150_109_880_320}
    assert doc["measured"]["phases"] == {
        "forward": 3 * GIB,
        "backward": 4 * GIB,
        "optimizer": 2 * GIB,
    }
    assert doc["measured"]["device_name"] == "NVIDIA H200"
    assert set(doc["errors"]) == {
        "forward",
        "backward",
        "optimizer",
        "peak_allocated_bytes",
        "total_bytes",
    }
    for phase, measured in doc["measured"]["phases"].items():
        predicted = doc["predicted"]["phases"][phase]
        assert doc["errors"][phase] == pytest.approx(
            100 * (predicted - measured) / measured, abs=0.01
        )
    total = doc["predicted"]["total_bytes"]
    assert doc["errors"]["total_bytes"] == pytest.approx(
        100 * (total - 5 * GIB) / (5 * GIB), abs=0.01
    )


def test_measure_memory_limit_is_measured_and_predicted_alike(
    capsys: pytest.CaptureFixture[str], fake_train: list[Any]
) -> None:
    """--memory-limit: measure_train runs under it, and the prediction replays within it (the
    fake's 4 GiB GPT-2 batch 64 does not fit 2 GiB: predicted out of memory)."""
    fake_train[0].update(
        memory_limit_bytes=2 * GIB, alloc_retries=1, oom=True, reached="step 1 forward"
    )
    args = ["measure", "--train", "--preset", "gpt2", "--batch", "64", "--seq", "512"]
    code, doc = run_json(capsys, *args, "--memory-limit", "2GiB")
    assert code == 1 and fake_train[1]["limit"] == 2 * GIB
    assert doc["predicted"]["fits"] is False and doc["predicted"]["out_of_memory_at"]
    code, doc = run_json(capsys, *args)
    assert fake_train[2]["limit"] is None and "out_of_memory_at" not in doc["predicted"]
    code, out, _ = run(capsys, *args, "--memory-limit", "2GiB")
    assert code == 1 and "out of memory" in out
    code, out, err = run(capsys, *args, "--memory-limit", "200GiB")
    assert (code, out, err) == (
        2, "", "error: --memory-limit: is more than the GPU's 139.80 GiB\n"
    )
    fake_train[0].update(oom=False, reached=None, memory_limit_bytes=8 * GIB)
    code, out, _ = run(capsys, *args[:-4], "--memory-limit", "8GiB")
    assert code == 0 and "allocator limit 8.00 GiB: cudaMalloc retried 1 times" in out


def test_measure_train_table(capsys: pytest.CaptureFixture[str], fake_train: list[Any]) -> None:
    code, out, err = run(capsys, "measure", "--train", "--preset", "gpt2", "--seq", "256")
    assert (code, err) == (0, "")  # no progress lines when stderr is not a terminal
    assert fake_train[1]["steps"] == 3  # the default
    assert "Predicted vs measured" in out
    for row in (
        "forward (peak allocated)",
        "backward (peak allocated)",
        "optimizer (peak allocated)",
        "peak allocated (max_memory_allocated)",
        "device total",
    ):
        assert row in out
    assert re.search(r"backward \(peak allocated\)\W+[0-9.]+\W+4\.00\W+[+-][0-9.]+%", out)
    assert "[note]" in out  # device/torch text is not read as markup


def test_measure_train_table_is_whole_at_80_columns(
    capsys: pytest.CaptureFixture[str], fake_train: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, "measure", "--train", "--preset", "gpt2", "--seq", "256")
    assert code == 0 and "…" not in out, out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_progress_display_on_a_terminal() -> None:
    import io

    from rich.console import Console

    from vramfit.render import measure_progress

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100, color_system=None)
    with measure_progress(console) as on_progress:
        on_progress("backward", 1, 3)
        on_progress("decode", 7, 16)
    assert "step 1: backward" in screen.getvalue()
    assert "decode, token 7" in screen.getvalue()


def test_measure_infer_maps_phases(
    capsys: pytest.CaptureFixture[str], fake_train: list[Any]
) -> None:
    fake_train[0].update(
        phases={"kv_cache": GIB, "prefill": 2 * GIB, "decode": GIB + 1},
        phase_end={"kv_cache": GIB, "prefill": GIB, "decode": GIB},
        steps=[],
        notes=[],
    )
    code, doc = run_json(
        capsys,
        "measure",
        "--train",
        "--preset",
        "gpt2",
        "--mode",
        "infer",
        "--gen-tokens",
        "16",
        "--seq",
        "128",
    )
    assert code == 0
    assert list(doc["errors"]) == [
        "kv_cache",
        "prefill",
        "decode",
        "peak_allocated_bytes",
        "total_bytes",
    ]
    assert doc["errors"]["kv_cache"] is None  # the estimate has no such phase
    assert doc["errors"]["prefill"] is not None and doc["errors"]["decode"] is not None


@pytest.mark.parametrize("as_json", [False, True])
def test_measure_out_of_memory(
    capsys: pytest.CaptureFixture[str], fake_train: list[Any], as_json: bool
) -> None:
    fake_train[0].update(
        oom=True, reached="step 1 backward", phases={"forward": 3 * GIB}, total_bytes=140 * GIB
    )
    args = ["measure", "--train", "--preset", "llama-2-7b", "--batch", "64"]
    code, out, err = run(capsys, *args, *(["--json"] if as_json else []))
    assert code == 1 and err == ""
    if as_json:
        doc = json.loads(out)
        assert doc["measured"]["oom"] is True and doc["measured"]["reached"] == "step 1 backward"
        assert doc["errors"] == {}
    else:
        assert out.count("\n") == 1
        assert out.startswith(
            "Does not fit: NVIDIA H200 (139.80 GiB) ran out of memory during "
            "step 1 backward; vramfit predicted "
        )


def test_measure_train_errors_from_the_measurement(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # measure_train's own checks (here: MoE is not measurable) come out as one line too
    pytest.importorskip("torch")
    monkeypatch.setattr(cli, "_cuda_backend", FakeGpu)
    code, out, err = run(capsys, "measure", "--train", "--preset", "mixtral-8x7b")
    assert (code, out) == (2, "")
    assert err.startswith("error: --preset: measure --impl hf: the hf profile does not describe")
    assert err.count("\n") == 1


@pytest.fixture
def fake_matmul(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Replace the GPU: each cell 'measures' exactly the prediction (32 MiB cuBLAS workspace, as
    on Hopper), except bmm cells, whose allocation is 512 bytes more."""
    from vramfit.measure import matmul

    calls: list[tuple[Any, ...]] = []

    def measure_matmul(dtype: str, *, shape: Any, batch: Any, backend: Any) -> Any:
        calls.append((dtype, shape, batch))
        predicted = matmul.predict_matmul(dtype, shape, batch, workspace_bytes=32 * 2**20)
        extra = 512 if batch else 0
        return matmul.MatmulMeasurement(
            dtype=dtype,
            shape=shape,
            batch=batch,
            output_dtype="bfloat16" if "bf16" in dtype else "float32",
            allocated_bytes=predicted.allocated_bytes + extra,
            peak_bytes=predicted.peak_bytes,
            workspace_bytes=32 * 2**20,
            predicted_bytes=predicted.allocated_bytes,
            predicted_peak_bytes=predicted.peak_bytes,
            prediction=predicted.parts,
        )

    def measure_tflops(dtype: str, backend: Any) -> float:
        calls.append(("tflops", dtype))
        return 100.0

    monkeypatch.setattr(cli, "_cuda_backend", FakeGpu)
    monkeypatch.setattr(matmul, "measure_matmul", measure_matmul)
    monkeypatch.setattr(matmul, "measure_tflops", measure_tflops)
    return calls


@pytest.mark.parametrize(
    ("args", "cell"),
    [
        ([], ("fp32", (1024, 2048, 1024), None)),  # the notebook's first cell
        (["--dtype", "fp16"], ("fp16", (1024, 2048, 1024), None)),
        (["--bmm"], ("amp-bf16", (512, 1024, 512), 32)),  # the notebook's bmm cell
        (["--batch", "8", "--dtype", "bf16"], ("bf16", (512, 1024, 512), 8)),
        (["--shape", "64x32x16", "--dtype", "amp-fp16"], ("amp-fp16", (64, 32, 16), None)),
        (["--shape", "64 x 32 x 16", "--bmm"], ("amp-bf16", (64, 32, 16), 32)),
    ],
)
def test_measure_matmul_cells(
    capsys: pytest.CaptureFixture[str],
    fake_matmul: list[Any],
    args: list[str],
    cell: tuple[Any, ...],
) -> None:
    code, doc = run_json(capsys, "measure", *args)
    assert code == 0
    assert fake_matmul[0] == cell
    assert [c for c in fake_matmul if c[0] == "tflops"] == [("tflops", cli.COMPUTE_DTYPE[cell[0]])]
    row = doc["cells"][0]
    assert (row["dtype"], tuple(row["shape"]), row["batch"]) == cell


def test_measure_matmul_all_json(
    capsys: pytest.CaptureFixture[str], fake_matmul: list[Any]
) -> None:
    code, doc = run_json(capsys, "measure", "--all")
    assert code == 0
    assert doc["device"] == "NVIDIA H200" and doc["catalog_gpu"] == "H200-SXM"
    assert [c["dtype"] for c in doc["cells"]] == [
        "fp32",
        "fp16",
        "amp-fp16",
        "amp-bf16",
        "amp-bf16",
    ]
    first = doc["cells"][0]
    # the notebook's fp32 cell: A (1024x2048) + B (2048x1024) + C (1024x1024) in fp32 = 20 MiB;
    # it printed 28.12 "MB" on a T4, whose cuBLAS workspace is 8.125 MiB
    assert first["predicted"]["inputs_bytes"] + first["predicted"]["output_bytes"] == 20 * 2**20
    assert first["predicted"]["allocated_bytes"] == sum(
        first["predicted"][k] for k in ("inputs_bytes", "output_bytes", "workspace_bytes")
    )
    assert first["allocated_error_bytes"] == 0
    assert doc["cells"][-1]["allocated_error_bytes"] == -512
    assert [t["dtype"] for t in doc["tflops"]] == ["fp32", "fp16", "bf16"]
    from vramfit.catalog import find_gpu

    h200 = find_gpu("H200")
    for row in doc["tflops"]:
        assert row["achieved_tflops"] == 100.0
        assert row["peak_tflops"] == h200.peak_tflops(row["dtype"])
        assert row["percent_of_peak"] == round(100 * 100.0 / row["peak_tflops"], 1)


def test_measure_matmul_all_table(
    capsys: pytest.CaptureFixture[str], fake_matmul: list[Any]
) -> None:
    code, out, err = run(capsys, "measure", "--all")
    assert (code, err) == (0, "")
    assert "memory_allocated" in out and "max_memory_allocated" in out
    assert "amp-bf16 bmm 32×512×1024 @ 1024×512" in out
    assert "exact" in out and "-512 B" in out
    assert "% of peak" in out


def test_measure_matmul_unknown_gpu(
    capsys: pytest.CaptureFixture[str], fake_matmul: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_cuda_backend", lambda: FakeGpu("Quantum GPU [prototype]"))
    code, doc = run_json(capsys, "measure")
    assert code == 0 and doc["catalog_gpu"] is None
    assert doc["tflops"][0]["peak_tflops"] is None and doc["tflops"][0]["percent_of_peak"] is None
    code, out, _ = run(capsys, "measure")
    assert "Quantum GPU [prototype] is not in the GPU catalog" in " ".join(out.split())


def test_measure_matmul_on_the_cpu(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real measure_matmul on the CPU (counters read 0): torch's output dtypes come through."""
    pytest.importorskip("torch")
    from vramfit.measure import matmul
    from vramfit.measure.backend import CpuBackend

    monkeypatch.setattr(cli, "_cuda_backend", CpuBackend)
    monkeypatch.setattr(matmul, "measure_tflops", lambda dtype, backend: 1.0)
    for dtype, out_dtype in (("fp32", "float32"), ("amp-bf16", "bfloat16"), ("bf16", "bfloat16")):
        code, doc = run_json(capsys, "measure", "--dtype", dtype, "--shape", "64x32x16")
        assert code == 0
        assert doc["cells"][0]["output_dtype"] == out_dtype
        assert doc["cells"][0]["measured"]["memory_allocated_bytes"] == 0
        assert doc["catalog_gpu"] is None  # "cpu"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--checkpointing", "selective"], "--checkpointing"),
        (["--gen-tokens", "8"], "--gen-tokens"),
        (["--kv-dtype", "fp8"], "--kv-dtype"),
        (["--impl", "reference", "--optimizer", "paged-adamw-8bit"], "--optimizer"),
    ],
)
def test_a_check_across_workload_fields_names_its_option(
    capsys: pytest.CaptureFixture[str], args: list[str], option: str
) -> None:
    code, out, err = run(capsys, "estimate", "--preset", "llama-3.2-1b", *args)
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {option}: ") and err.count("\n") == 1
