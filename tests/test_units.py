"""Units: human parameter counts in, readable sizes out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vramfit.errors import VramfitError
from vramfit.units import format_bytes, format_count, parse_count


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500M", 500_000_000),
        ("1B", 1_000_000_000),
        ("1.5B", 1_500_000_000),
        ("7b", 7_000_000_000),
        ("350m", 350_000_000),
        ("1.5e9", 1_500_000_000),
        ("124439808", 124_439_808),
        ("125_000_000", 125_000_000),
        (" 2B ", 2_000_000_000),
        ("70K", 70_000),
        ("1T", 10**12),
        (124439808, 124_439_808),
    ],
)
def test_parse_count_accepts(text: str | int, expected: int) -> None:
    assert parse_count(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1Q", "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got '1Q'"),
        ("-1B", "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got '-1B'"),
        ("0", "--params: must be a positive count, got '0'"),
        ("nan", "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got 'nan'"),
        ("inf", "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got 'inf'"),
        ("", "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got ''"),
        ("1.5", "--params: must be a whole number of parameters, got '1.5'"),
        ("_1B", "--params: expected a count such as 1B, 350M, 1.5e9 or 124439808, got '_1B'"),
    ],
)
def test_parse_count_rejects_with_the_option_named(text: str, message: str) -> None:
    with pytest.raises(VramfitError) as info:
        parse_count(text)
    assert str(info.value) == message


@given(st.text(max_size=20))
def test_parse_count_never_crashes(text: str) -> None:
    """Any text either parses to a positive int or raises the domain error, nothing else."""
    try:
        value = parse_count(text)
    except VramfitError as err:
        assert err.field == "--params"
    else:
        assert isinstance(value, int) and value > 0


@given(st.integers(min_value=1000, max_value=10**15))
def test_parse_count_round_trips_integers(n: int) -> None:
    assert parse_count(str(n)) == n
    assert parse_count(f"{n:_}") == n


@pytest.mark.parametrize(
    ("count", "shown"),
    [(1_000_000_000, "1.00B"), (354_823_168, "354.8M"), (124_439_808, "124.4M"), (7_000, "7.0K")],
)
def test_format_count(count: int, shown: str) -> None:
    assert format_count(count) == shown


def test_format_bytes_uses_binary_units_with_honest_labels() -> None:
    assert format_bytes(2**30) == "1.00 GiB"
    assert format_bytes(8.125 * 2**20) == "8.12 MiB"
    assert format_bytes(512) == "512 B"
