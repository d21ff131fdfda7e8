"""Hypothesis profiles for the suite.

``ci`` (the default) keeps the whole suite within its time budget; ``fuzz`` multiplies the
command-line fuzzers' budgets (tests/test_cli_fuzz.py) for a long run on demand:

    HYPOTHESIS_PROFILE=fuzz python -m pytest -q tests/test_cli_fuzz.py

Either way the fuzzers report how many inputs they ran, at the end of the session.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "fuzz", deadline=None, suppress_health_check=list(HealthCheck), print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    fuzz = sys.modules.get("test_cli_fuzz")
    if fuzz is not None and getattr(fuzz, "INPUTS", None):
        counts = ", ".join(f"{name} {n:,}" for name, n in sorted(fuzz.INPUTS.items()))
        total = sum(fuzz.INPUTS.values())
        terminalreporter.write_line(f"command-line fuzz inputs: {total:,} ({counts})")
