"""The seed notebook's formula reproduces the notebook's own worked examples."""

from __future__ import annotations

import pytest

from vramfit.estimate.seed import seed_estimate


@pytest.mark.parametrize(
    ("params", "layers", "hidden", "printed"),
    [
        # the notebook: "Total: 2.93 + 0.09 + 1.5 = 4.52 GB", "7.45 GB", "13.4 GB"
        (500_000_000, 24, 1024, 4.52),
        (1_000_000_000, 24, 1024, 7.45),
        (2_000_000_000, 24, 2048, 13.4),
    ],
)
def test_worked_examples(params: int, layers: int, hidden: int, printed: float) -> None:
    assert seed_estimate(params, layers, hidden, seq_len=128, batch=4).notebook_gb == printed


def test_terms_as_the_notebook_prints_them() -> None:
    seed = seed_estimate(1_000_000_000, 24, 1024, seq_len=128, batch=4)
    assert round(seed.param_gb, 2) == 5.86  # "6 x 1000 / 1024 ~ 5.86 GB"
    assert round(seed.activation_gb, 2) == 0.09
    assert seed.buffer_gb == 1.5
