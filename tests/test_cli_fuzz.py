"""Fuzz the command line: whatever the options, ``main`` exits 0, 1 or 2 and never raises
anything but SystemExit; every exit 2 is exactly one line ``error: ...`` on stderr.

Sizes that are valid stay small (at most 48 layers, parameter counts up to 1e12): the estimate's
cost grows faster than linearly with the layer count, and these tests are about input handling,
not the estimator (tests/estimate/ has its properties).
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramfit.cli import main
from vramfit.config import Attention, Checkpointing, KvDtype, Mode, Optimizer, Precision

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Command-line arguments cannot hold NUL (they are C strings); anything else goes.
TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=16
)
NUMBER = st.one_of(
    st.integers(-(10**30), 0),
    st.integers(1, 100),
    st.integers(10**7, 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
).map(str)
JUNK = st.one_of(TEXT, NUMBER)


def _choices(enum: Any) -> st.SearchStrategy[str]:
    return st.sampled_from([member.value for member in enum])


def _or_junk(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    return st.one_of(valid.map(str), JUNK)


# option -> values: mostly valid ones, some junk
OPTIONS: dict[str, st.SearchStrategy[str]] = {
    "--params": _or_junk(
        st.one_of(
            st.sampled_from(["1B", "350M", "1.5B", "7b", "124439808", "125_000_000", "1.5e9"]),
            st.integers(1, 10**12),
        )
    ),
    "--layers": _or_junk(st.integers(1, 48)),
    "--hidden": _or_junk(st.integers(1, 128).map(lambda k: 64 * k)),
    "--seq": _or_junk(st.integers(1, 10**8)),
    "--batch": _or_junk(st.integers(1, 10**7)),
    "--heads": _or_junk(st.sampled_from([1, 2, 4, 8, 12, 16, 32, 64])),
    "--kv-heads": _or_junk(st.sampled_from([1, 2, 4, 8])),
    "--ffn": _or_junk(st.integers(1, 50_000)),
    "--vocab": _or_junk(st.integers(1, 300_000)),
    "--gpu": _or_junk(st.sampled_from(["T4", "h100", "A100-80GB", "H200", "b200", "mi300x"])),
    "--precision": _or_junk(_choices(Precision)),
    "--optimizer": _or_junk(_choices(Optimizer)),
    "--attention": _or_junk(_choices(Attention)),
    "--checkpointing": _or_junk(_choices(Checkpointing)),
    "--mode": _or_junk(_choices(Mode)),
    "--gen-tokens": _or_junk(st.integers(0, 10**6)),
    "--kv-dtype": _or_junk(_choices(KvDtype)),
    "--formula": _or_junk(st.sampled_from(["default", "seed"])),
    "--preset": _or_junk(st.sampled_from(["gpt2", "seed-1b", "llama-3.2-1b", "qwen2.5-0.5b"])),
    "--arch": _or_junk(st.sampled_from(["gpt2", "llama"])),
}
FLAGS = ["--json", "--tied", "--untied"]


def invoke(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with pytest.raises(SystemExit) as exited:
            main(argv)
    return exited.value.code, out.getvalue(), err.getvalue()


def check_outcome(argv: list[str], code: int, out: str, err: str) -> None:
    assert code in (0, 1, 2), (argv, code, err)
    if code == 2:
        assert err.startswith("error: ") and err.endswith("\n"), (argv, err)
        assert err.count("\n") == 1 and len(err.splitlines()) == 1, (argv, err)
    elif "--json" in argv and "--help" not in argv:
        document = json.loads(out)  # one JSON document, nothing else
        if not isinstance(document, dict):  # gpus / presets: a list
            return
        if "breakdown" in document:
            assert sum(document["breakdown"].values()) == document["total_bytes"]
        if document.get("fits") is not None:
            assert code == (0 if document["fits"] else 1)


@st.composite
def estimate_argv(draw: st.DrawFn) -> list[str]:
    """`estimate` with a random subset of its options, in random order, with random values."""
    names = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=7, unique=True))
    argv = ["estimate"]
    for name in names:
        argv += [name, draw(OPTIONS[name])]
    for flag in draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True)):
        argv.append(flag)
    return argv


@settings(FAST, max_examples=1500)
@given(estimate_argv())
def test_estimate_options(argv: list[str]) -> None:
    check_outcome(argv, *invoke(argv))


@st.composite
def valid_estimate_argv(draw: st.DrawFn) -> list[str]:
    """Options that are each valid on their own; combinations may still be refused."""
    argv = ["estimate", "--json"]
    argv += ["--layers", str(draw(st.integers(1, 16)))]
    argv += ["--hidden", str(64 * draw(st.integers(1, 64)))]
    argv += ["--seq", str(draw(st.integers(1, 10**6)))]
    argv += ["--batch", str(draw(st.integers(1, 10**4)))]
    for name in (
        "--precision",
        "--optimizer",
        "--attention",
        "--checkpointing",
        "--mode",
        "--gpu",
        "--arch",
        "--kv-dtype",
        "--gen-tokens",
        "--params",
    ):
        if draw(st.booleans()):
            strategy = {
                "--gpu": st.sampled_from(["T4", "H100", "A100-40GB", "H200", "RTX-4090"]),
                "--arch": st.sampled_from(["gpt2", "llama"]),
                "--gen-tokens": st.integers(0, 4096).map(str),
                "--params": st.integers(10**6, 10**11).map(str),
            }.get(name)
            if strategy is None:
                enum = {
                    "--precision": Precision,
                    "--optimizer": Optimizer,
                    "--attention": Attention,
                    "--checkpointing": Checkpointing,
                    "--mode": Mode,
                    "--kv-dtype": KvDtype,
                }[name]
                strategy = _choices(enum)
            value = draw(strategy)
            argv += [name, value]
    return argv


@settings(FAST, max_examples=250)
@given(valid_estimate_argv())
def test_valid_estimates(argv: list[str]) -> None:
    code, out, err = invoke(argv)
    check_outcome(argv, code, out, err)
    if code != 2:
        document = json.loads(out)
        assert document["total_bytes"] >= document["peak_allocated_bytes"] > 0


TOKENS = st.one_of(
    st.sampled_from(
        [*OPTIONS, *FLAGS, "--help", "--solve", "estimate", "gpus", "presets", "=", "-"]
    ),
    JUNK,
)


@settings(FAST, max_examples=1500)
@given(st.lists(TOKENS, max_size=8))
def test_any_argv(argv: list[str]) -> None:
    """Any token soup: unknown commands, options without values, values without options."""
    if "--solve" in argv:  # a solve runs dozens of estimates; test_solve covers it
        argv = [token for token in argv if token != "--solve"]
    check_outcome(argv, *invoke(argv))


@settings(FAST, max_examples=60)
@given(
    field=_or_junk(st.sampled_from(["batch", "seq"])),
    gpu=_or_junk(st.sampled_from(["T4", "H100", "A100-80GB"])),
    layers=st.integers(1, 8),
    hidden=st.integers(1, 16).map(lambda k: 64 * k),
)
def test_solve(field: str, gpu: str, layers: int, hidden: int) -> None:
    argv = [
        "estimate",
        "--layers",
        str(layers),
        "--hidden",
        str(hidden),
        "--solve",
        field,
        "--gpu",
        gpu,
        "--json",
    ]
    check_outcome(argv, *invoke(argv))


MATMUL_OPTIONS: dict[str, st.SearchStrategy[str]] = {
    "--dtype": _or_junk(_choices(Precision)),
    "--shape": _or_junk(st.sampled_from(["1024x2048x1024", "8x8x8", "1x1x1", "4 x 4 x 4"])),
    "--batch": _or_junk(st.integers(1, 64)),
    "--steps": _or_junk(st.integers(1, 5)),
    "--seq": _or_junk(st.integers(1, 64)),
    "--preset": _or_junk(st.sampled_from(["gpt2", "mixtral-8x7b"])),
}


@st.composite
def other_argv(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(["measure", "check", "import-hf", "gpus", "presets"]))
    argv = [command]
    if command == "measure":
        for name in draw(
            st.lists(st.sampled_from(sorted(MATMUL_OPTIONS)), max_size=3, unique=True)
        ):
            argv += [name, draw(MATMUL_OPTIONS[name])]
        flags = ["--train", "--bmm", "--all", "--json"]
        argv += draw(st.lists(st.sampled_from(flags), max_size=3, unique=True))
    elif command in ("check", "import-hf"):
        argv += draw(st.lists(TEXT.filter(lambda t: not t.startswith("/dev")), max_size=2))
    else:
        argv += draw(st.lists(st.sampled_from(["--json", "--help", "--bogus"]), max_size=2))
    return argv


@pytest.fixture(scope="module")
def _no_gpu() -> Any:
    """measure must not find a GPU here, whatever this machine has: no torch at all."""
    import sys

    saved = sys.modules.get("torch", ...)
    sys.modules["torch"] = None  # type: ignore[assignment]
    yield
    if saved is ...:
        del sys.modules["torch"]
    else:
        sys.modules["torch"] = saved


@settings(FAST, max_examples=600)
@given(other_argv())
def test_other_commands(_no_gpu: Any, argv: list[str]) -> None:
    code, out, err = invoke(argv)
    check_outcome(argv, code, out, err)
    if argv[0] == "measure" and code == 2 and "--help" not in argv:
        assert err.startswith("error: ")
