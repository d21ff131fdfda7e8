"""The README's example outputs are the real output of their commands (tests/readme_examples.py
runs them; ``PYTHONPATH=src python tests/readme_examples.py`` rewrites the blocks)."""

from __future__ import annotations

import pytest

from readme_examples import MEASURED_TABLES, README, blocks, expected_output, run

EXAMPLES = [
    example
    for _, examples in blocks(README.read_text(encoding="utf-8"))
    for example in examples
    if example.runnable
]


def test_the_readme_has_examples_to_check() -> None:
    assert sum(bool(example.output) for example in EXAMPLES) >= 3


def _param(example):
    """An example; the accuracy tables' run on the worker that estimates the committed tables
    (tests/test_measurements.py), whose estimates benchmarks/accuracy.py remembers."""
    tables = example.argv[1:2] == ["benchmarks/accuracy.py"]
    return pytest.param(
        example,
        id=" ".join(example.argv[1:])[:70],
        marks=[pytest.mark.xdist_group(MEASURED_TABLES)] if tables else [],
    )


@pytest.mark.parametrize("example", [_param(e) for e in EXAMPLES])
def test_readme_example_is_the_real_output(example) -> None:
    code, real, err = run(example.argv)
    assert code in (0, 1), err  # runs (does not fit is fine), no usage error
    assert example.output == expected_output(example, real), (
        "README.md is out of date; rewrite its examples with "
        "PYTHONPATH=src python tests/readme_examples.py\n" + "\n".join(real)
    )
