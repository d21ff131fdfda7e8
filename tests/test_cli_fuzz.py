"""Fuzz the command line: whatever the options, files and presets, ``main`` exits 0, 1 or 2
and never raises anything but SystemExit; no output holds a traceback; every exit 2 is exactly
one line ``error: ...`` on stderr, at most ``MAX_LINE`` characters, whatever the input held.

Inputs are random options, token soups, and files: Hugging Face ``config.json`` files and
preset YAMLs mutated from real ones, then broken at the text level (deep nesting, 5,000-digit
integers, anchors, tags, truncation, bytes that are not UTF-8). Run in-process through
``vramfit.cli.main``; the paths that could hang or read forever (FIFOs, devices) are in
tests/test_hardening.py, in subprocesses with a time and memory limit.

Budgets: the default ``ci`` profile runs ~1,450 inputs in ~15 s of CPU; ``HYPOTHESIS_PROFILE=fuzz``
runs ``FUZZ_FACTOR`` times as many (see tests/conftest.py). Sizes that are valid stay small
(at most 48 layers): the estimate's cost grows faster than linearly with the layer count, and
these tests are about input handling, not the estimator (tests/estimate/ has its properties).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramfit.cli import main
from vramfit.config import Attention, Checkpointing, KvDtype, Mode, Optimizer, Precision

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_FACTOR = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1
MAX_LINE = 300  # the longest error line (vramfit.cli.MAX_ERROR_CHARS)
ROOT = Path(__file__).resolve().parents[1]

# inputs run, by test (conftest.py prints the total at the end of the session)
INPUTS: collections.Counter[str] = collections.Counter()


def budget(ci_examples: int) -> settings:
    """``ci_examples`` examples, times FUZZ_FACTOR under the fuzz profile."""
    return settings(FAST, max_examples=ci_examples * FUZZ_FACTOR)


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
# inputs that once got through or crashed (the hardening issue's reproducers)
NASTY = st.sampled_from(
    [
        "1_000_",
        "1._5B",
        "1.0",
        "1e3",
        "T4\n",
        " 7 ",
        "2",
        "9223372036854775808",
        "1" + "0" * 320,
        "9" * 5000,
        "-0",
        "+5",
        "0x10",
        "a" * 300,
        "\u2028",
    ]
)
JUNK = st.one_of(TEXT, NUMBER, NASTY)


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
    "--quant": _or_junk(st.sampled_from(["nf4", "fp4", "int8"])),
    "--lora-rank": _or_junk(st.sampled_from([1, 8, 16, 64])),
    "--gpus": _or_junk(st.sampled_from([1, 2, 4, 8, 64])),
    "--fsdp": _or_junk(st.sampled_from(["full", "shard-grad-op", "hybrid"])),
}
FLAGS = ["--json", "--tied", "--untied"]


def invoke(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured: (exit code, stdout, stderr)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?::?").split("::")[-1].split(" ")[0]
    INPUTS[test] += 1
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with pytest.raises(SystemExit) as exited:
            main(argv)
    return exited.value.code, out.getvalue(), err.getvalue()


def check_outcome(argv: list[str], code: int, out: str, err: str) -> None:
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in out + err, (argv, err)
    if code == 2:
        assert err.startswith("error: ") and err.endswith("\n"), (argv, err)
        assert err.count("\n") == 1 and len(err.splitlines()) == 1, (argv, err)
        assert len(err) <= MAX_LINE + 1, (argv, len(err), err[:400])
    if argv[:1] == ["check"] and "--help" not in argv:
        # one line per problem (stdout) and one summary line (stderr on problems)
        assert all(len(line) <= MAX_LINE for line in out.splitlines()), (argv, out[:400])
        assert len(err.splitlines()) <= 1, (argv, err[:400])
    if code == 2:
        pass
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


@budget(300)
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


@budget(120)
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


@budget(500)
@given(st.lists(TOKENS, max_size=8))
def test_any_argv(argv: list[str]) -> None:
    """Any token soup: unknown commands, options without values, values without options."""
    if "--solve" in argv:  # a solve runs dozens of estimates; test_solve covers it
        argv = [token for token in argv if token != "--solve"]
    check_outcome(argv, *invoke(argv))


@budget(60)
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


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """Valid values, one in ten junk: a command with several options then often runs."""
    return st.integers(0, 9).flatmap(lambda k: JUNK if k == 0 else valid.map(str))


PLAN_OPTIONS: dict[str, st.SearchStrategy[str]] = {
    "--gpus": _mostly(st.one_of(st.integers(1, 64), st.sampled_from([1024, 131_072]))),
    "--gpu": _mostly(st.sampled_from(["T4", "h100", "A100-80GB", "H200", "b200", "mi300x"])),
    "--preset": _mostly(st.sampled_from(["gpt2", "llama-3.2-1b", "llama-3.1-70b",
                                         "mixtral-8x7b"])),
    "--params": _mostly(st.sampled_from(["1B", "7b", "70B", "124439808"])),
    "--layers": _mostly(st.integers(1, 48)),
    "--hidden": _mostly(st.integers(1, 128).map(lambda k: 64 * k)),
    "--seq": _mostly(st.integers(1, 10**6)),
    "--batch": _mostly(st.integers(1, 64)),
    "--precision": _mostly(_choices(Precision)),
    "--optimizer": _mostly(_choices(Optimizer)),
    "--loop": _mostly(st.sampled_from(["trainer", "drops", "keeps-logits"])),
}


@st.composite
def plan_argv(draw: st.DrawFn) -> list[str]:
    """`plan`, mostly with its two required options and a preset (else a shape of random
    options), and a random subset of the workload's."""
    required = ["--gpus", "--gpu", "--preset"]
    names = [n for n in required if draw(st.integers(0, 9))]  # each kept 90%
    model = ["--params", "--layers", "--hidden"]
    rest = sorted(set(PLAN_OPTIONS) - set(required) - set(model))
    pool = rest if "--preset" in names else rest + model
    names += draw(st.lists(st.sampled_from(pool), max_size=4, unique=True))
    argv = ["plan"]
    for name in draw(st.permutations(names)):
        argv += [name, draw(PLAN_OPTIONS[name])]
    if draw(st.booleans()):
        argv.append("--json")
    return argv


@budget(15)
@given(plan_argv())
def test_plan(argv: list[str]) -> None:
    code, out, err = invoke(argv)
    check_outcome(argv, code, out, err)
    if code != 2 and "--json" in argv:
        document = json.loads(out)
        assert (document["more_gpus"] is None) == bool(document["fits"]), argv


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


@budget(300)
@given(other_argv())
def test_other_commands(_no_gpu: Any, argv: list[str]) -> None:
    code, out, err = invoke(argv)
    check_outcome(argv, code, out, err)
    if argv[0] == "measure" and code == 2 and "--help" not in argv:
        assert err.startswith("error: ")


# --- files: config.json and preset YAMLs -------------------------------------------------------

HF_CONFIGS = sorted((ROOT / "tests" / "fixtures" / "hf").glob("*/config.json"))
PRESET_FILES = sorted((ROOT / "presets").glob("*.yaml"))

HF_KEYS = [
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "max_position_embeddings",
    "sliding_window",
    "use_sliding_window",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
    "mlp_only_layers",
    "attention_bias",
    "mlp_bias",
    "new_decoder_architecture",
    "multi_query",
    "parallel_attn",
    "num_kv_heads",
    "num_ln_in_parallel_attn",
    "ffn_hidden_size",
    "bias",
    "_name_or_path",
]
PRESET_KEYS = {
    "": ["name", "title", "source", "published_params", "params_exact", "model", "workload"],
    "model": [
        "arch",
        "layers",
        "hidden",
        "heads",
        "kv_heads",
        "head_dim",
        "ffn",
        "vocab",
        "max_positions",
        "tied",
        "norm",
        "mlp",
        "positions",
        "bias",
        "experts",
        "experts_per_token",
        "expert_ffn",
        "shared_experts",
        "sliding_window",
        "sliding_window_every",
        "params",
    ],
    "workload": ["mode", "batch", "seq", "precision", "optimizer", "gen_tokens", "kv_dtype"],
}

SIZE = st.one_of(
    st.integers(1, 8),  # small, valid, fast to estimate
    st.integers(-3, 0),
    st.sampled_from([64, 128, 256, 1000, 32000, 50257, 2**24 + 1, 2**31, 2**63, 10**29]),
    st.integers(10**30, 10**40),
)
LEAF = st.one_of(
    SIZE,
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
    st.sampled_from(["llama", "gpt2", "mixtral", "falcon", "qwen2_moe", "gemma2", "infer", "fp8"]),
)
VALUE = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """``base`` with a few keys set to random values, deleted, or added."""
    data = dict(base)
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(keys), TEXT, NASTY))
        action = draw(st.sampled_from(["set", "set", "set", "delete"]))
        if action == "delete":
            data.pop(key, None)
        else:
            data[key] = draw(VALUE)
    return data


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def broken_text(draw: st.DrawFn, text: str, *, yaml_syntax: bool) -> bytes:
    """``text`` as bytes, perhaps damaged: what a truncated download or a hostile file holds."""
    kind = draw(
        st.sampled_from(
            ["as is"] * 6
            + ["truncate", "deep", "giant int", "not utf-8", "bom", "empty", "junk", "long line"]
            + (["anchors", "tag", "tabs"] if yaml_syntax else [])
        )
    )
    if kind == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif kind == "deep":
        depth = draw(st.sampled_from([60, 999, 3000, 100_000]))
        key = '"hidden_size": ' if not yaml_syntax else "  hidden: "
        text = text.replace(key, key + _nest(depth) + ("," if not yaml_syntax else "\n#"), 1)
        if key not in text:
            text = _nest(depth)
    elif kind == "giant int":
        digits = "9" * draw(st.sampled_from([31, 4301, 5000, 100_000]))
        text = text.replace("12", digits, 1) if "12" in text else digits
    elif kind == "not utf-8":
        return text.encode() + b"\xff\xfe\x80"
    elif kind == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    elif kind == "empty":
        text = draw(st.sampled_from(["", " ", "\n", "null", "~", "[]", "0", '""']))
    elif kind == "junk":
        text = draw(st.text(max_size=200))
    elif kind == "long line":
        text = text + "\n# " + "x" * 200_000 + "\n"
    elif kind == "anchors":
        text = 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\n'
        text += "c: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n" + text
    elif kind == "tag":
        text = text.replace("layers:", "layers: !!python/object:os.system", 1) + "\nx: !!int 1\n"
    elif kind == "tabs":
        text = text.replace("  ", "\t")
    return text.encode("utf-8", "surrogatepass")


@st.composite
def hf_file(draw: st.DrawFn) -> bytes:
    base = json.loads(draw(st.sampled_from(HF_CONFIGS)).read_text(encoding="utf-8"))
    # few layers keep the valid ones fast to estimate
    for key in ("num_hidden_layers", "n_layer"):
        if key in base:
            base[key] = draw(st.integers(1, 4))
    data = draw(mutated(base, HF_KEYS))
    return draw(broken_text(json.dumps(data, indent=1), yaml_syntax=False))


@st.composite
def preset_file(draw: st.DrawFn) -> bytes:
    base = yaml.safe_load(draw(st.sampled_from(PRESET_FILES)).read_text(encoding="utf-8"))
    base["model"] = {**base["model"], "layers": draw(st.integers(1, 4))}
    data = draw(mutated(base, PRESET_KEYS[""]))
    for section in ("model", "workload"):
        if isinstance(data.get(section), dict) and draw(st.booleans()):
            data[section] = draw(mutated(data[section], PRESET_KEYS[section]))
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return draw(broken_text(text, yaml_syntax=True))


ESTIMATE_EXTRAS = st.lists(
    st.sampled_from(
        [["--json"], ["--gpu", "T4"], ["--gpu", "H100"], ["--mode", "infer"], ["--seq", "64"]]
    ),
    max_size=2,
    unique_by=lambda extra: extra[0],
).map(lambda extras: [token for extra in extras for token in extra])


@pytest.fixture(scope="module")
def scratch() -> Any:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@budget(100)
@given(
    data=hf_file(), how=st.sampled_from(["estimate", "import-hf", "folder"]), extras=ESTIMATE_EXTRAS
)
def test_hf_config_files(scratch: Path, data: bytes, how: str, extras: list[str]) -> None:
    folder = scratch / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    if how == "import-hf":
        argv = ["import-hf", str(folder / "config.json")]
    else:
        target = folder if how == "folder" else folder / "config.json"
        argv = ["estimate", "--hf-config", str(target), "--batch", "1", *extras]
    code, out, err = invoke(argv)
    check_outcome(argv, code, out, err)
    if how == "import-hf" and code == 0:
        (scratch / "imported.yaml").write_text(out, encoding="utf-8")
        argv = ["check", str(scratch / "imported.yaml")]
        code, out, err = invoke(argv)
        check_outcome(argv, code, out, err)


@budget(60)
@given(
    data=preset_file(), how=st.sampled_from(["check", "estimate", "folder"]), extras=ESTIMATE_EXTRAS
)
def test_preset_files(scratch: Path, data: bytes, how: str, extras: list[str]) -> None:
    folder = scratch / "presets"
    folder.mkdir(exist_ok=True)
    (folder / "fuzzed.yaml").write_bytes(data)
    if how == "estimate":
        argv = ["estimate", "--preset", str(folder / "fuzzed.yaml"), *extras]
    else:
        argv = ["check", str(folder if how == "folder" else folder / "fuzzed.yaml")]
    check_outcome(argv, *invoke(argv))
