"""vramfit check: every broken file gives one clean Problem with its line; shipped presets pass."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vramfit.check import Problem, check_paths, collect_files, summary_line

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "check"

GPT2 = """\
name: {name}
title: GPT-2
source: tests
published_params: {published}
params_exact: {exact}
model:
  arch: gpt2
  layers: 12
  hidden: 768
  heads: 12
"""


def test_shipped_presets_all_pass() -> None:
    assert check_paths([ROOT / "presets"]) == []


@pytest.mark.parametrize(
    ("file", "line", "field", "reason"),
    [
        ("syntax_error.yaml", 7, "(yaml)", "invalid YAML: mapping values are not allowed here"),
        ("unknown_key.yaml", 11, "model.hiden_size", "unknown key"),
        ("negative_layers.yaml", 8, "model.layers", "Input should be greater than or equal to 1"),
        (
            "wrong_count.yaml",
            5,
            "published_params",
            "model has 124,439,808 parameters, published 124,000,000 (params_exact: true)",
        ),
        ("empty.yaml", 0, "(document)", "empty file"),
        ("bomb.yaml", 2, "(yaml)", "YAML anchors and aliases are not allowed"),
        ("deep.yaml", 2, "(yaml)", "nested deeper than 50 levels"),
    ],
)
def test_each_broken_file_gives_one_problem(file: str, line: int, field: str, reason: str) -> None:
    start = time.monotonic()
    problems = check_paths([FIXTURES / file])
    assert time.monotonic() - start < 5  # a YAML bomb must not expand
    assert problems == [Problem(FIXTURES / file, line, field, reason)]


def test_problem_str() -> None:
    assert str(Problem(Path("a.yaml"), 3, "model.layers", "bad")) == "a.yaml:3: model.layers: bad"
    assert (
        str(Problem(Path("a.yaml"), 0, "(document)", "empty file"))
        == "a.yaml: (document): empty file"
    )


def test_directory_is_scanned_sorted_for_yaml_only(tmp_path: Path) -> None:
    for name in ["b.yml", "a.yaml", "notes.txt"]:
        (tmp_path / name).write_text("", encoding="utf-8")
    assert collect_files([tmp_path]) == [tmp_path / "a.yaml", tmp_path / "b.yml"]
    assert len(collect_files([FIXTURES])) == 7


def test_rounded_count_allows_half_a_percent(tmp_path: Path) -> None:
    ok = tmp_path / "ok.yaml"  # 124.4M vs 124M: 0.35% apart
    ok.write_text(GPT2.format(name="ok", published="124_000_000", exact="false"), encoding="utf-8")
    far = tmp_path / "far.yaml"  # 124.4M vs 120M: 3.70% apart
    far.write_text(
        GPT2.format(name="far", published="120_000_000", exact="false"), encoding="utf-8"
    )
    assert check_paths([ok]) == []
    assert check_paths([far]) == [
        Problem(
            far,
            4,
            "published_params",
            "model has 124,439,808 parameters, published 120,000,000: 3.70% apart, more than 0.5%",
        )
    ]


def test_several_schema_errors_each_get_their_line(tmp_path: Path) -> None:
    file = tmp_path / "two.yaml"
    text = GPT2.format(name="two", published="124_439_808", exact="maybe").replace("12\n", "0\n", 1)
    file.write_text(text, encoding="utf-8")
    assert [(p.line, p.field) for p in check_paths([file])] == [
        (5, "params_exact"),
        (8, "model.layers"),
    ]


def test_missing_field_points_at_its_parent(tmp_path: Path) -> None:
    file = tmp_path / "nohidden.yaml"
    file.write_text(
        GPT2.format(name="x", published="1000", exact="false").replace("  hidden: 768\n", ""),
        encoding="utf-8",
    )
    assert check_paths([file]) == [Problem(file, 6, "model.hidden", "Field required")]


def test_model_level_error_points_at_model(tmp_path: Path) -> None:
    file = tmp_path / "heads.yaml"
    file.write_text(
        GPT2.format(name="x", published="1000", exact="false").replace("heads: 12", "heads: 7"),
        encoding="utf-8",
    )
    assert check_paths([file]) == [
        Problem(file, 6, "model", "hidden (768) is not divisible by heads (7)")
    ]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("- a\n- b\n", 1, "expected a mapping, got list"),
        ("# only a comment\n", 0, "empty file"),
    ],
)
def test_not_a_mapping(tmp_path: Path, text: str, line: int, reason: str) -> None:
    file = tmp_path / "x.yaml"
    file.write_text(text, encoding="utf-8")
    assert check_paths([file]) == [Problem(file, line, "(document)", reason)]


def test_two_documents_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "two.yaml"
    file.write_text("a: 1\n---\nb: 2\n", encoding="utf-8")
    [problem] = check_paths([file])
    assert (problem.line, problem.field) == (2, "(yaml)")


def test_missing_file_and_duplicate_names(tmp_path: Path) -> None:
    for name in ["a.yaml", "b.yaml"]:
        (tmp_path / name).write_text(
            GPT2.format(name="same", published="124_439_808", exact="true"), encoding="utf-8"
        )
    missing = tmp_path / "missing.yaml"
    assert check_paths([tmp_path, missing]) == [
        Problem(
            tmp_path / "b.yaml", 1, "name", f"duplicate preset name (also {tmp_path / 'a.yaml'})"
        ),
        Problem(missing, 0, "(file)", "no such file"),
    ]


@pytest.mark.parametrize(
    ("n_files", "problems", "line"),
    [
        (27, [], "checked 27 files: all OK"),
        (1, [], "checked 1 file: all OK"),
        (3, [Problem(Path("a"), 1, "f", "r")], "checked 3 files: 1 problem in 1 file"),
        (
            3,
            [
                Problem(Path("a"), 1, "f", "r"),
                Problem(Path("a"), 2, "g", "r"),
                Problem(Path("b"), 0, "h", "r"),
            ],
            "checked 3 files: 3 problems in 2 files",
        ),
    ],
)
def test_summary_line(n_files: int, problems: list[Problem], line: str) -> None:
    assert summary_line(n_files, problems) == line
