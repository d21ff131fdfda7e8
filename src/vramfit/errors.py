"""The one domain error every expected failure is raised as, and how inputs are echoed in it."""

from __future__ import annotations

import reprlib
from typing import Any

# An error message quotes at most this many characters of what the user gave (a path, a
# value, a name): a 4 MiB config or a 300-character file name must not come back whole.
ECHO_CHARS = 120

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = ECHO_CHARS
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 3, 6, 6
_repr.maxlong = 40


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` itself when short, else its head and tail around an ellipsis (``limit`` chars):
    the end of a path (its file name) is kept."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head) :]}"


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, bounded: long strings, huge integers and deep or
    long containers are elided (``reprlib``), so no input comes back at full length."""
    if isinstance(value, str):
        return repr(shorten(value))
    if isinstance(value, int) and value.bit_length() > 1000:  # repr() refuses > 4300 digits
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        return shorten(_repr.repr(value))
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"


class VramfitError(Exception):
    """An expected failure: bad input, unknown name, unreadable file.

    ``field`` names what was wrong (an option, a YAML key path, a file); the CLI
    prints ``field: message`` on one line and exits 2 (``exit_code``).
    """

    def __init__(self, message: str, *, field: str | None = None, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.exit_code = exit_code

    def __str__(self) -> str:
        message = shorten(self.message, 2 * ECHO_CHARS)
        return f"{shorten(self.field)}: {message}" if self.field else message
