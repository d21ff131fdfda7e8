"""The GPU catalog: memory, bandwidth and peak throughput of the GPUs vramfit knows.

The rows live in ``data/gpus.yaml`` (package data), with a source and a note for each
figure; this module loads them once, validates them, and looks them up by name. Lookup
ignores case, spaces, ``-`` and ``_``, so ``h100``, ``H100 SXM`` and ``h100_sxm`` all find
the same row; an unknown name fails with the closest canonical names.
"""

from __future__ import annotations

import difflib
import functools
import math
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vramfit.config import parse_packaged_yaml, validation_error
from vramfit.errors import VramfitError, shown

# The throughput columns every row carries, in display order.
DTYPES: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8")

CATALOG_FILE = "gpus.yaml"
_MAX_SUGGESTIONS = 3


class Gpu(BaseModel):
    """One GPU model. Bytes are exact ints; throughput is dense peak from the vendor.

    ``memory_bytes`` is what the driver reports where that is known (see ``memory_note``),
    else the marketed capacity in its true unit. ``tflops`` maps every name in ``DTYPES``
    to TFLOP/s (TOPS for int8), or ``None`` where the hardware lacks the format.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="canonical name, e.g. 'H100-SXM'")
    aliases: list[str] = Field(description="other names it answers to")
    vendor: str = Field(min_length=1)
    architecture: str = Field(min_length=1)
    multiprocessors: int | None = Field(default=None, gt=0, description="SM count")
    threads_per_multiprocessor: int | None = Field(
        default=None, gt=0, description="max resident threads per SM"
    )
    memory_bytes: int = Field(gt=0, description="total device memory")
    memory_label: str = Field(min_length=1, description="the marketing string, e.g. '80 GB HBM3'")
    memory_note: str | None = Field(description="where memory_bytes comes from")
    memory_bandwidth_gb_s: float = Field(gt=0, description="peak memory bandwidth, GB/s (1e9)")
    tflops: dict[str, float | None] = Field(description="dense peak TFLOP/s per dtype")
    source: str = Field(min_length=1, description="the datasheet the row comes from")
    notes: str | None = None

    @field_validator("tflops")
    @classmethod
    def _every_dtype_once(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        missing = [dtype for dtype in DTYPES if dtype not in value]
        unknown = sorted(set(value) - set(DTYPES))
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing {', '.join(missing)}")
            if unknown:
                problems.append(f"unknown {', '.join(unknown)}")
            raise ValueError(
                f"tflops needs exactly the keys {', '.join(DTYPES)} ({'; '.join(problems)})"
            )
        for dtype, peak in value.items():
            if peak is not None and not (math.isfinite(peak) and peak > 0):
                raise ValueError(f"tflops.{dtype} must be a positive number or null, got {peak}")
        return {dtype: value[dtype] for dtype in DTYPES}

    def peak_tflops(self, dtype: str) -> float | None:
        """Dense peak TFLOP/s (TOPS for int8) for ``dtype``; None where the GPU lacks it."""
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        return self.tflops[dtype]


def normalize(name: str) -> str:
    """The lookup key of a name: lower case, without spaces, '-' or '_'."""
    return name.strip().lower().replace(" ", "").replace("-", "").replace("_", "")


def parse_catalog(data: Any, *, source: str = CATALOG_FILE) -> tuple[Gpu, ...]:
    """Validate a loaded catalog document: a list of GPU rows, no name or alias used twice.

    Every failure is one VramfitError naming ``source``, the row index and the field.
    """
    if not isinstance(data, list) or not data:
        raise VramfitError("expected a non-empty list of GPUs", field=source)
    gpus: list[Gpu] = []
    owner: dict[str, str] = {}
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise VramfitError(
                f"expected a mapping, got {type(entry).__name__}", field=f"{source}[{index}]"
            )
        try:
            gpu = Gpu.model_validate(entry)
        except ValidationError as err:
            raise validation_error(err, prefix=f"{source}[{index}].") from None
        for label in (gpu.name, *gpu.aliases):
            key = normalize(label)
            if not key:
                raise VramfitError("empty name or alias", field=f"{source}[{index}]")
            if key in owner:
                raise VramfitError(
                    f"{label!r} is already a name or alias of {owner[key]}",
                    field=f"{source}[{index}] ({gpu.name})",
                )
            owner[key] = gpu.name
        gpus.append(gpu)
    return tuple(gpus)


@functools.cache
def load_catalog() -> tuple[Gpu, ...]:
    """Every GPU in the packaged catalog, in file order (loaded and validated once)."""
    text = (
        resources.files("vramfit")
        .joinpath("data")
        .joinpath(CATALOG_FILE)
        .read_text(encoding="utf-8")
    )
    return parse_catalog(parse_packaged_yaml(text), source=CATALOG_FILE)


@functools.cache
def _index() -> dict[str, Gpu]:
    # parse_catalog has already refused duplicate keys, so this mapping loses nothing.
    return {normalize(label): gpu for gpu in load_catalog() for label in (gpu.name, *gpu.aliases)}


def find_gpu(name: str) -> Gpu:
    """The GPU called ``name`` (its canonical name or an alias; case, spaces, '-', '_' ignored).

    Raises VramfitError (field ``--gpu``) for an unknown name, suggesting up to three
    canonical names: first those with a name or alias that starts with ``name`` (so a bare
    ``a100`` offers both A100s), then the closest by ``difflib`` similarity.
    """
    if not name.isprintable() or len(name) > 100:
        raise VramfitError(
            f"unknown GPU {shown(name)}; run `vramfit gpus` to list them", field="--gpu"
        )
    index = _index()
    key = normalize(name)
    if key in index:
        return index[key]
    suggestions: list[str] = []
    if key:
        prefixed = [label for label in index if label.startswith(key)]
        similar = difflib.get_close_matches(key, list(index), n=len(index))
        for label in (*prefixed, *similar):
            canonical = index[label].name
            if canonical not in suggestions:
                suggestions.append(canonical)
    if not suggestions:
        raise VramfitError(
            f"unknown GPU {shown(name)}; run `vramfit gpus` to list them", field="--gpu"
        )
    close = ", ".join(suggestions[:_MAX_SUGGESTIONS])
    raise VramfitError(f"unknown GPU {shown(name)}; did you mean: {close}?", field="--gpu")


def catalog_rows() -> list[dict[str, Any]]:
    """The catalog as JSON-ready dicts (for ``vramfit gpus --json``); bytes stay exact ints."""
    return [gpu.model_dump(mode="json") for gpu in load_catalog()]
