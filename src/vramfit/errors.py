"""The one domain error every expected failure is raised as."""

from __future__ import annotations


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
        return f"{self.field}: {self.message}" if self.field else self.message
