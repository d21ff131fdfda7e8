"""The fine-tuning options of ``vramfit estimate``: JSON of the happy paths, one line per bad
combination (naming the option, exit 2)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vramfit.cli import app

runner = CliRunner()
SMALL = ["estimate", "--preset", "llama-3.2-1b", "--batch", "2", "--seq", "512"]


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    monkeypatch.setenv("NO_COLOR", "1")


def _json(*args: str) -> dict:
    result = runner.invoke(app, [*SMALL, *args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_lora_on_int8_weights() -> None:
    doc = _json("--quant", "int8", "--lora-rank", "8")
    assert doc["workload"]["quant"]["kind"] == "int8"
    assert doc["notes"] == []  # the hf profile models it (no fallback)
    nf4 = _json("--quant", "nf4", "--lora-rank", "8")
    # int8 rows (1 B/weight) against packed 4-bit pairs: more weight bytes
    assert doc["breakdown"]["weights"] > nf4["breakdown"]["weights"]


def test_int8_generate() -> None:
    doc = _json("--quant", "int8", "--mode", "infer", "--gen-tokens", "16")
    assert doc["notes"] == [] and doc["peak_allocated_bytes"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "int8", "--quant-double"], "--quant-double: applies to 4-bit (nf4, fp4) only"),
        (
            ["--quant", "int8", "--quant-compute-dtype", "bf16"],
            "--quant-compute-dtype: applies to 4-bit (nf4, fp4) only",
        ),
        (["--quant", "int4"], "--quant: input should be 'nf4', 'fp4' or 'int8'"),
        (["--quant-double"], "--quant: give --quant nf4|fp4|int8 with the other quantization"),
        (["--lora-rank", "8", "--lora-dropout", "2"], "--lora-dropout: input should be less"),
        (["--quant", "int8"], "--quant: quant weights are frozen in training: add LoRA"),
        (
            ["--impl", "reference", "--optimizer", "paged-adamw-8bit"],
            "--optimizer: optimizer paged-adamw-8bit is modelled by the hf profile",
        ),
        (["--int8-outliers", "down_proj=0.5"], "--quant: give --quant nf4|fp4|int8"),
        (
            ["--quant", "nf4", "--lora-rank", "8", "--int8-outliers", "down_proj=0.5"],
            "--int8-outliers: applies to int8 (LLM.int8) only",
        ),
        (
            ["--quant", "int8", "--lora-rank", "8", "--int8-outliers", "c_fc=0.5"],
            "--int8-outliers: 'c_fc' is not a linear layer of the block",
        ),
        (
            ["--quant", "int8", "--lora-rank", "8", "--int8-outliers", "down_proj"],
            "--int8-outliers: expected NAME=FRACTION",
        ),
        (
            ["--quant", "int8", "--lora-rank", "8", "--int8-outliers", "down_proj=1.5"],
            "--int8-outliers: must be a fraction in [0, 1]",
        ),
        (["--lora-rank", "8", "--lora-targets", "c_fc"], "--lora-targets: 'c_fc' is not a"),
    ],
)
def test_bad_combinations_name_the_option(args: list[str], message: str) -> None:
    result = runner.invoke(app, [*SMALL, *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_paged_optimizer_state_is_managed_memory() -> None:
    paged = _json("--optimizer", "paged-adamw-8bit")
    plain = _json("--optimizer", "adam-8bit")
    managed = paged["managed_bytes"]
    assert managed == paged["breakdown"]["managed_optimizer_state"] > 0
    assert sum(paged["breakdown"].values()) == paged["total_bytes"]
    # the same state, moved out of PyTorch's allocator: peak allocated drops by about it
    state = plain["breakdown"]["optimizer_state"] - paged["breakdown"]["optimizer_state"]
    assert abs(state - managed) < 2**20
    assert paged["peak_allocated_bytes"] < plain["peak_allocated_bytes"]
    assert any("evicts its pages to host memory" in n for n in paged["notes"])


def test_kv_dtype_falls_back_with_the_reason() -> None:
    doc = _json("--mode", "infer", "--gen-tokens", "16", "--kv-dtype", "fp8")
    assert any("optimum-quanto or HQQ" in n and "reference" in n for n in doc["notes"])


def test_int8_outlier_columns_are_kept_for_backward() -> None:
    """Each outlier column of an int8 layer's input is kept (x's dtype) until backward: the
    peak grows with the fraction, by about tokens x columns x 4 bytes per layer at most."""
    base = _json("--quant", "int8", "--lora-rank", "8")
    some = _json("--quant", "int8", "--lora-rank", "8", "--int8-outliers", "down_proj=0.5")
    every = _json("--quant", "int8", "--lora-rank", "8", "--int8-outliers", "down_proj=1")
    assert some["workload"]["quant"]["int8_outliers"] == {"down_proj": 0.5}
    peaks = [doc["peak_allocated_bytes"] for doc in (base, some, every)]
    assert peaks[0] < peaks[1] < peaks[2]
    # Llama-3.2-1B: 16 layers, ffn 8192, 2 x 512 tokens, fp32 inputs after
    # prepare_model_for_kbit_training: subA of every down_proj is at most 16 x 1024 x 8192 x 4
    assert peaks[2] - peaks[0] <= 16 * 1024 * 8192 * 4 * 1.1


def test_reshard_after_forward_takes_true_false_or_k() -> None:
    layout = ["--gpus", "8", "--fsdp", "full", "--reshard-after-forward"]
    peaks = {k: _json(*layout, k)["peak_allocated_bytes"] for k in ("true", "2", "false")}
    # keeping 1/2 of each layer between forward and backward sits between both ends
    assert peaks["true"] < peaks["2"] < peaks["false"]
    result = runner.invoke(app, [*SMALL, *layout, "3"])
    assert result.exit_code == 2 and "--reshard-after-forward" in result.stderr
