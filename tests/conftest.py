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

# One intra-op thread per test process, set before anything imports torch: under pytest-xdist
# every CPU runs a worker, and torch's default of a thread per CPU (OpenMP threads that spin
# while they wait) oversubscribes them; the five torch-heavy files took 44-47 s on two cores
# that way and 25-26 s with one thread each. An explicit setting is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# The default ("ci") profile draws the same examples on every run (derandomize): a fresh clone's
# suite passes or fails with the code, not with the draw (a random draw once found a property's
# rare counterexample and spent minutes shrinking it). New draws are the fuzz profile's job.
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
    derandomize=True,
)
settings.register_profile(
    "fuzz", deadline=None, suppress_health_check=list(HealthCheck), print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Under pytest-xdist (the suite runs on every CPU) each worker counts its own fuzz inputs and
# hands them to the controller, which reports the sum.
_WORKER_INPUTS: dict[str, int] = {}


def _local_inputs() -> dict[str, int]:
    fuzz = sys.modules.get("test_cli_fuzz")
    return dict(getattr(fuzz, "INPUTS", None) or {})


def pytest_sessionfinish(session: Any) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a worker: send the counts to the controller
        workeroutput["fuzz_inputs"] = _local_inputs()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_testnodedown(node: Any, error: Any) -> None:
    for name, n in getattr(node, "workeroutput", {}).get("fuzz_inputs", {}).items():
        _WORKER_INPUTS[name] = _WORKER_INPUTS.get(name, 0) + n


def pytest_terminal_summary(terminalreporter: Any) -> None:
    inputs = _local_inputs()
    for name, n in _WORKER_INPUTS.items():
        inputs[name] = inputs.get(name, 0) + n
    if inputs:
        counts = ", ".join(f"{name} {n:,}" for name, n in sorted(inputs.items()))
        total = sum(inputs.values())
        terminalreporter.write_line(f"command-line fuzz inputs: {total:,} ({counts})")
