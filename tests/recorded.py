"""The recorded H200 runs the tests replay, read once per test process.

``benchmarks/data/h200-traces/*.json*`` and the traces recorded with the hf and fine-tuning
sets hold the allocator events of real runs (``benchmarks/trace.py``); ``benchmarks/*.yaml`` the
cases they ran. Both the allocator test (tests/estimate/test_allocator.py) and the
step-program test (tests/estimate/test_traces.py) parametrize over the traces, so the files
(16 MB) are parsed once, not once per module.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import yaml

from vramfit.estimate.allocator import CachingAllocator

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TRACES = BENCHMARKS / "data" / "h200-traces"
# traces recorded with a validation set, kept beside its measurements
SET_TRACES = (
    BENCHMARKS / "data" / "h200-hf-validation3" / "hf3-cpp-frames.json.gz",
    BENCHMARKS / "data" / "h200-hf-validation4" / "hf4-frames.json.gz",
    BENCHMARKS / "data" / "h200-hf-validation2" / "hf2-trainer-cpp-frames.json.gz",
    BENCHMARKS / "data" / "h200-hf-validation2" / "hf2-gpt2-cpp-frames.json.gz",
    BENCHMARKS / "data" / "h200-hf-validation1" / "hf1-phi3-generate-frames.json.gz",
    BENCHMARKS / "data" / "h200-hf-calibration" / "hf-calibration-phi3-cpp-frames.json.gz",
    BENCHMARKS / "data" / "h200-ft-validation7" / "ft7-phi3-lora-cpp-frames.json.gz",
    BENCHMARKS / "data" / "h200-hf-validation5" / "hf5-phi3-trainer-cpp-frames.json.gz",
    *sorted((BENCHMARKS / "data" / "h200-parallel-traces").glob("*.json.gz")),
    *sorted((BENCHMARKS / "data" / "h200-qlora-load").glob("*.json.gz")),
    *sorted((BENCHMARKS / "data" / "h200-int8-load").glob("*.json.gz")),
)
# traces whose recorded peak is the phases' only: ``vramfit measure`` read its counters
# after building the model before it counted the build (de6db48); the build peaks there
BUILD_UNCOUNTED = {"hf4-gemma-2-2b-infer-b1-s2048-gen2-bf16-eager"}
# the label of from_pretrained's first request (transformers' modeling_utils.py): a quantized
# run's trace starts with the from_config model ``vramfit measure`` saves as its checkpoint
WARMUP = "caching_allocator_warmup"
# libyaml's loader where PyYAML has it: the benchmark case files are 1 MB of YAML
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def traces() -> tuple[dict, ...]:
    """Every recorded trace, in file order."""
    return tuple(
        t
        for path in (*sorted(TRACES.glob("*.json*")), *SET_TRACES)
        for t in json.loads(
            gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text()
        )
    )


# traces recorded once ``vramfit measure`` reset the peak at from_pretrained (measure/hf.py):
# their recorded peak and reserved bytes are the run's from the load on, not the whole trace's
RESET_AT_LOAD = {
    "ft9-phi-3-mini-qlora-nf4dq-r16-all-b2-s1024-trainer",
    "ft3-qwen2.5-7b-int8-infer-b4-s1024-eval-fp16",
    "ft5-qwen2.5-1.5b-int8-infer-b8-s1024-gen32",
}
# what ``vramfit measure`` runs after its figures are read (an LLM.int8 run's outlier count)
AFTER_THE_RUN = "int8_outlier_fractions"


def run_end(trace: dict) -> int:
    """The index past the measured run's last event: where a post-measurement diagnostic
    (``AFTER_THE_RUN``) begins, or the trace's end."""
    places = trace.get("places", [])
    after = {i for i, place in enumerate(places) if AFTER_THE_RUN in place}
    events = trace["events"]
    return next((i for i, e in enumerate(events) if after and e[3] in after), len(events))


def load_start(trace: dict) -> int | None:
    """The index of a traced quantized run's first ``from_pretrained`` request (None: the
    trace does not label it). What comes before is the random model the measurement builds
    with ``from_config``, saves as the checkpoint to load and frees."""
    places = trace.get("places", [])
    marked = {i for i, place in enumerate(places) if WARMUP in place}
    if not marked:
        return None
    return next((i for i, e in enumerate(trace["events"]) if e[3] in marked), None)


def release_segment(alloc: CachingAllocator, address: int, size: int) -> None:
    """The real allocator returned the segment at ``address`` (``empty_cache``, or a retry's
    ``release_cached_blocks``): in ``alloc`` it must be one free block, which goes too."""
    for _, _, pool in alloc.pools():
        for free_size, free_address, block in pool.entries():
            if free_address == address and block.prev is None and block.next is None:
                assert free_size == size
                pool.remove(block)
                alloc._segments.remove(block)
                alloc.reserved -= size
                return
    raise AssertionError(f"segment {address:#x} of {size} bytes is not a free segment")


def trace(name: str) -> dict:
    return next(t for t in traces() if t["name"] == name)


@functools.cache
def cases() -> dict[str, dict]:
    """Every benchmark case by name (the cases the traces ran among them)."""
    out = {}
    # a trace's own case file last: a validation set may measure a case of the same name
    # for more steps than its trace ran
    paths = sorted(BENCHMARKS.glob("*.yaml"), key=lambda p: (p.stem.endswith("-traces"), p.name))
    for path in paths:
        for case in yaml.load(path.read_text(), Loader=_LOADER) or []:
            out[case["name"]] = case
    return out
