"""Memory components are a closed set: a misspelt one is an error, not bytes lost."""

from __future__ import annotations

import pytest

from vramfit.estimate.graph import Component
from vramfit.estimate.timeline import COMPONENT_NAMES, Tape


def test_every_component_the_graph_names_is_one_the_tape_takes() -> None:
    assert {c.value for c in Component} == COMPONENT_NAMES


@pytest.mark.parametrize("method", ["new", "temp", "persist"])
def test_a_misspelt_component_is_an_error(method: str) -> None:
    tape = Tape()
    tape.op("start")
    size: object = [4] if method == "persist" else 4
    with pytest.raises(ValueError, match="unknown memory component 'activation'"):
        getattr(tape, method)("x", "activation", size)
