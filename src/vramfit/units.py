"""Human units: parameter counts in ("1.5B", "350m", "1.5e9") and bytes out.

This is the only module that knows about suffixes. Bytes stay ``int`` everywhere
else and are turned into GiB / GB here, for display only.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from vramfit.config import MAX_PARAMS, MIN_PARAMS
from vramfit.errors import VramfitError, shown

_COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
# Digits in groups joined by single underscores, as Python writes them (1_000_000, never 1_000_
# or 1._5); an optional fraction and exponent; one suffix. Only spaces may surround it.
_DIGITS = r"[0-9]+(?:_[0-9]+)*"
_COUNT_RE = re.compile(
    rf"\A *({_DIGITS}(?:\.(?:{_DIGITS})?)?(?:e\+?[0-9]{{1,3}})?) *([kmbgt]?) *\Z", re.I
)
MAX_COUNT_CHARS = 40

GIB = 2**30
MIB = 2**20
GB = 10**9


def parse_count(text: str | int, *, field: str = "--params") -> int:
    """Parse a positive count such as ``500M``, ``1.5B``, ``7b``, ``1.5e9`` or ``125_000_000``.

    Suffixes are decimal (K = 1e3, M = 1e6, B/G = 1e9, T = 1e12), as model cards use them.
    Raises VramfitError naming ``field`` for anything that is not a positive whole count.
    """
    if isinstance(text, bool):
        raise VramfitError(f"expected a count such as 1B or 350M, got {text!r}", field=field)
    if isinstance(text, int):
        value = Decimal(text) if text.bit_length() < 128 else Decimal(MAX_PARAMS + 1)
    else:
        match = _COUNT_RE.match(str(text)) if len(str(text)) <= MAX_COUNT_CHARS else None
        if not match:
            raise VramfitError(
                f"expected a count such as 1B, 350M, 1.5e9 or 124439808, got {shown(str(text))}",
                field=field,
            )
        number, suffix = match.group(1).replace("_", ""), match.group(2).lower()
        try:
            value = Decimal(number) * _COUNT_SUFFIXES[suffix]
        except InvalidOperation:
            raise VramfitError(f"not a number: {shown(str(text))}", field=field) from None
    if not value.is_finite() or value <= 0:
        raise VramfitError(f"must be a positive count, got {shown(str(text))}", field=field)
    if value > MAX_PARAMS:
        raise VramfitError(
            f"implausibly large ({shown(str(text))}); the limit is {MAX_PARAMS // 10**12}T",
            field=field,
        )
    if value != value.to_integral_value():
        raise VramfitError(
            f"must be a whole number of parameters, got {shown(str(text))}", field=field
        )
    if value < MIN_PARAMS:
        raise VramfitError(
            f"{int(value):,} parameters is not a transformer; at least {MIN_PARAMS:,}",
            field=field,
        )
    return int(value)


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}  # fmt: skip
_SIZE_RE = re.compile(rf"\A *({_DIGITS}(?:\.{_DIGITS})?) *([kmgt]i?b|b)? *\Z", re.I)
MAX_SIZE = 2**50  # 1 PiB: more memory than any GPU


def parse_size(text: str, *, field: str) -> int:
    """Parse a memory size such as ``24GiB``, ``16 GB``, ``1.5TiB`` or ``25769803776`` (bytes):
    binary units (KiB, MiB, GiB, TiB) and decimal ones (KB, MB, GB, TB). Raises VramfitError
    naming ``field`` for anything else, or for a size of under 1 byte or over 1 PiB."""
    match = _SIZE_RE.match(text) if len(text) <= MAX_COUNT_CHARS else None
    if not match:
        raise VramfitError(
            f"expected a size such as 24GiB, 16GB or 25769803776, got {shown(text)}", field=field
        )
    number, unit = Decimal(match.group(1).replace("_", "")), (match.group(2) or "").lower()
    value = int(number * _SIZE_UNITS[unit])
    if not 1 <= value <= MAX_SIZE:
        raise VramfitError(f"must be from 1 byte to 1 PiB, got {shown(text)}", field=field)
    return value


def format_times(n: int) -> str:
    """``1`` -> ``once``, ``7`` -> ``7 times``."""
    return "once" if n == 1 else f"{n} times"


def format_count(count: int) -> str:
    """``1000000000`` -> ``1.00B``, ``354823168`` -> ``354.8M``, ``124439808`` -> ``124.4M``."""
    if count >= 10**12:
        return f"{count / 10**12:.2f}T"
    if count >= 10**9:
        return f"{count / 10**9:.2f}B"
    if count >= 10**6:
        return f"{count / 10**6:.1f}M"
    if count >= 10**3:
        return f"{count / 10**3:.1f}K"
    return str(count)


def format_bytes(n_bytes: int | float) -> str:
    """Bytes in the largest binary unit that keeps the number readable (KiB, MiB, GiB)."""
    sign = "-" if n_bytes < 0 else ""
    size = abs(n_bytes)
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 2**10)):
        if size >= scale:
            return f"{sign}{size / scale:.2f} {unit}"
    return f"{sign}{int(size)} B"
