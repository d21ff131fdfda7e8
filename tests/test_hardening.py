"""The hardening issue's reproducers, each in its own process under a 10 s and 2 GiB limit.

Each one once printed a traceback, hung, read gigabytes or accepted nonsense with exit 0. Now
each ends in one line on stderr naming the field, exit 2 (``check``: its problem lines and
exit 1). They run in one child process limited to 2 GiB of address space, each case under a
10 s alarm.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 10
MEMORY_LIMIT_BYTES = 2 * 2**30
LONG = "a" * 300


def _limit_memory() -> None:  # runs in the child, before vramfit starts
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    os.mkfifo(folder / "fifo")
    os.mkfifo(folder / "fifo.yaml")
    (folder / "zero.yaml").symlink_to("/dev/zero")
    (folder / "nested.json").write_text("[" * 3000, encoding="utf-8")
    digits = "9" * 5000
    (folder / "bigint.json").write_text(
        '{"model_type": "llama", "num_hidden_layers": ' + digits + "}", encoding="utf-8"
    )
    preset = (
        "name: x\ntitle: x\nsource: x\npublished_params: {n}\nmodel: {{layers: 2, hidden: 64}}\n"
    )
    (folder / "bigint.yaml").write_text(preset.format(n=digits), encoding="utf-8")
    (folder / "huge-ffn.json").write_text(
        '{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, '
        '"num_attention_heads": 1, "intermediate_size": 1' + "0" * 20 + ', "vocab_size": 100}',
        encoding="utf-8",
    )
    (folder / "empty").mkdir()
    return folder


# (argv, exit code, expected stderr line; {d} is the folder of hostile files)
CASES = [
    (
        ["estimate", "--preset", "gpt2", "--gpu", "T4", "--solve", "seq"],
        0,
        "",  # the answer (seq 1024, the learned position table) on stdout
    ),
    (
        ["estimate", "--hf-config", "/dev/zero"],
        2,
        "/dev/zero: not a regular file (a device, FIFO or socket)",
    ),
    (["import-hf", "/dev/zero"], 2, "/dev/zero: not a regular file (a device, FIFO or socket)"),
    (["check", "/dev/zero"], 1, "checked 1 file: 1 problem in 1 file"),
    (["check", "/dev/urandom"], 1, "checked 1 file: 1 problem in 1 file"),
    (
        ["estimate", "--preset", "{d}/zero.yaml"],
        2,
        "{d}/zero.yaml: not a regular file (a device, FIFO or socket)",
    ),
    (
        ["estimate", "--hf-config", "{d}/fifo"],
        2,
        "{d}/fifo: not a regular file (a device, FIFO or socket)",
    ),
    (
        ["estimate", "--preset", "{d}/fifo"],
        2,
        "{d}/fifo: not a regular file (a device, FIFO or socket)",
    ),
    (
        ["estimate", "--preset", "{d}/fifo.yaml"],
        2,
        "{d}/fifo.yaml: not a regular file (a device, FIFO or socket)",
    ),
    (["check", "{d}/fifo.yaml"], 1, "checked 1 file: 1 problem in 1 file"),
    (
        ["estimate", "--hf-config", "{d}/nested.json"],
        2,
        "{d}/nested.json: invalid JSON: nested too deeply",
    ),
    (["import-hf", "{d}/nested.json"], 2, "{d}/nested.json: invalid JSON: nested too deeply"),
    (["check", "{d}/nested.json"], 1, "checked 1 file: 1 problem in 1 file"),
    (
        ["estimate", "--hf-config", "{d}/bigint.json"],
        2,
        "{d}/bigint.json: invalid JSON: an integer of 5,000 digits (at most 30)",
    ),
    (
        ["import-hf", "{d}/bigint.json"],
        2,
        "{d}/bigint.json: invalid JSON: an integer of 5,000 digits (at most 30)",
    ),
    (
        ["estimate", "--preset", "{d}/bigint.yaml"],
        2,
        "{d}/bigint.yaml:4: an integer of more than 30 digits",
    ),
    (["check", "{d}/bigint.yaml"], 1, "checked 1 file: 1 problem in 1 file"),
    (
        ["estimate", "--preset", LONG + ".yaml"],
        2,
        "a" * 79 + "…" + "a" * 35 + ".yaml: cannot open: File name too long",
    ),
    (
        ["estimate", "--hf-config", LONG],
        2,
        "a" * 79 + "…" + "a" * 40 + ": cannot open: File name too long",
    ),
    (["check", LONG], 2, "a" * 79 + "…" + "a" * 40 + ": cannot open: File name too long"),
    (
        ["estimate", "--preset", LONG],
        2,
        "--preset: unknown preset '"
        + "a" * 79
        + "…"
        + "a" * 40
        + "'; run 'vramfit presets' to list them",
    ),
    (  # 150 characters, 300 bytes: under a length cap in characters, over the file system's
        ["estimate", "--preset", "é" * 150],
        2,
        "--preset: unknown preset '"
        + "é" * 79
        + "…"
        + "é" * 40
        + "'; run 'vramfit presets' to list them",
    ),
    (
        ["estimate", "--layers", "2", "--hidden", "64", "--ffn", "1" + "0" * 320],
        2,
        "--ffn: input should be less than or equal to 4194304, got '"
        + "1"
        + "0" * 78
        + "…"
        + "0" * 40
        + "'",
    ),
    (
        ["estimate", "--layers", "2", "--hidden", "64", "--vocab", "1" + "0" * 320],
        2,
        "--vocab: input should be less than or equal to 16777216, got '"
        + "1"
        + "0" * 78
        + "…"
        + "0" * 40
        + "'",
    ),
    (
        ["import-hf", "{d}/huge-ffn.json"],
        2,
        "{d}/huge-ffn.json: ffn: Input should be less than or equal to 4194304",
    ),
    (
        ["estimate", "--params", "1_000_"],
        2,
        "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got '1_000_'",
    ),
    (
        ["estimate", "--params", "1._5B"],
        2,
        "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got '1._5B'",
    ),
    (
        ["estimate", "--params", "1B", "--layers", "1.0"],
        2,
        "--layers: input should be a valid integer, unable to parse string as an integer",
    ),
    (
        ["estimate", "--params", "1B", "--gpu", "T4\n"],
        2,
        "--gpu: unknown GPU 'T4\\n'; run `vramfit gpus` to list them",
    ),
    (
        ["estimate", "--params", "2"],
        2,
        "--params: 2 parameters is not a transformer; at least 1,000",
    ),
    (
        ["estimate", "--params", "1B", "--vocab", "9223372036854775808"],
        2,
        "--vocab: input should be less than or equal to 16777216, got 9223372036854775808",
    ),
    (["check", "{d}/empty"], 1, "checked 0 files: 1 problem in 1 file"),
    (["check", "{d}"], 1, "checked 3 files: 3 problems in 3 files"),  # fifo, zero, bigint
]


# Runs every case through vramfit.cli.main in one process (one start-up, not 30), each under
# an alarm: a read that blocks (a FIFO) is interrupted and reported, not waited for.
DRIVER = """
import contextlib, io, json, signal, sys, time
from vramfit.cli import main

class Hung(Exception):
    pass

def hung(signum, frame):
    raise Hung()

signal.signal(signal.SIGALRM, hung)
results = []
for argv in json.loads(sys.stdin.read()):
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    signal.alarm(LIMIT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    except BaseException as exc:
        code = f"raised {type(exc).__name__}"
    finally:
        signal.alarm(0)
    results.append([code, out.getvalue(), err.getvalue(), time.monotonic() - started])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(files: Path) -> list[tuple[int | str, str, str, float]]:
    """Every case's (exit code, stdout, stderr, seconds), from one process limited to 2 GiB."""
    cases = [[arg.replace("{d}", str(files)) for arg in argv] for argv, _, _ in CASES]
    done = subprocess.run(
        [sys.executable, "-c", DRIVER.replace("LIMIT", str(TIME_LIMIT_S))],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "80"},
        preexec_fn=_limit_memory,
        timeout=TIME_LIMIT_S * len(CASES),
        check=True,
    )
    return [tuple(result) for result in json.loads(done.stdout)]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[" ".join(c[0])[:60] for c in CASES])
def test_reproducer_ends_in_one_line(
    files: Path, outcomes: list[tuple[int | str, str, str, float]], index: int
) -> None:
    argv, code, line = CASES[index]
    got_code, out, err, elapsed_s = outcomes[index]
    expected = line.replace("{d}", str(files))
    if code == 2:
        expected = f"error: {expected}"
    assert (got_code, err) == (code, f"{expected}\n" if expected else ""), out[:300]
    assert "Traceback" not in out
    assert elapsed_s < TIME_LIMIT_S


def test_a_fifo_does_not_block_a_fresh_process(files: Path) -> None:
    """The FIFO again, end to end: a process of its own returns at once."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vramfit", "estimate", "--hf-config", str(files / "fifo")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=TIME_LIMIT_S,
        preexec_fn=_limit_memory,
    )
    assert done.returncode == 2 and time.monotonic() - started < TIME_LIMIT_S
