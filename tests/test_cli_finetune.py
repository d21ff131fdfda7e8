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
