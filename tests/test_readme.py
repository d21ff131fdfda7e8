"""The README's example outputs are the real output of their commands (tests/readme_examples.py
runs them; ``PYTHONPATH=src python tests/readme_examples.py`` rewrites the blocks)."""

from __future__ import annotations

import pytest

from readme_examples import README, blocks, expected_output, run

EXAMPLES = [
    example
    for _, examples in blocks(README.read_text(encoding="utf-8"))
    for example in examples
    if example.runnable
]


def test_the_readme_has_examples_to_check() -> None:
    assert sum(bool(example.output) for example in EXAMPLES) >= 3


@pytest.mark.parametrize("example", EXAMPLES, ids=[" ".join(e.argv[1:])[:70] for e in EXAMPLES])
def test_readme_example_is_the_real_output(example) -> None:
    code, real, err = run(example.argv)
    assert code in (0, 1), err  # runs (does not fit is fine), no usage error
    assert example.output == expected_output(example, real), (
        "README.md is out of date; rewrite its examples with "
        "PYTHONPATH=src python tests/readme_examples.py\n" + "\n".join(real)
    )
