"""The GPU catalog: the packaged rows, lookup by name, and the validation of a catalog.

Golden numbers come from outside the code: the seed notebook's H100 SXM and T4 figures,
the H200 total this project measured (nvidia-smi: 143771 MiB), and nvidia-smi totals seen
in public logs, which each row's memory_note quotes.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from vramfit.catalog import (
    DTYPES,
    Gpu,
    catalog_rows,
    find_gpu,
    load_catalog,
    normalize,
    parse_catalog,
)
from vramfit.config import parse_packaged_yaml
from vramfit.errors import VramfitError

MIB = 2**20

# The GPUs the catalog must cover, each by a name a user would type.
REQUIRED = [
    "T4",
    "L4",
    "A10G",
    "V100 16GB",
    "V100 32GB",
    "A100 40GB",
    "A100 80GB",
    "H100 SXM",
    "H100 PCIe",
    "H200",
    "B200",
    "RTX 3090",
    "RTX 4090",
    "RTX 5090",
    "MI300X",
]


@pytest.mark.parametrize("query", REQUIRED)
def test_every_required_gpu_is_present(query: str) -> None:
    assert find_gpu(query) in load_catalog()


def test_required_names_find_distinct_rows() -> None:
    assert len({find_gpu(query).name for query in REQUIRED}) == len(REQUIRED)


def test_seed_h100_sxm_figures() -> None:
    # The seed notebook's H100 SXM row: 67 / 989 / 989 / 1979 TFLOPS, 80 GB HBM3, 3.35 TB/s.
    gpu = find_gpu("H100-SXM")
    assert gpu.peak_tflops("fp32") == 67
    assert gpu.peak_tflops("fp16") == 989
    assert gpu.peak_tflops("bf16") == 989
    assert gpu.peak_tflops("fp8") == 1979
    assert gpu.memory_label == "80 GB HBM3"
    assert gpu.memory_bandwidth_gb_s == 3350


def test_seed_t4_figures() -> None:
    # The seed notebook's T4 row: 8.1 / 65 TFLOPS, no bf16, no fp8, 16 GB GDDR6, 320 GB/s.
    gpu = find_gpu("T4")
    assert gpu.peak_tflops("fp32") == 8.1
    assert gpu.peak_tflops("fp16") == 65
    assert gpu.peak_tflops("bf16") is None
    assert gpu.peak_tflops("fp8") is None
    assert gpu.peak_tflops("tf32") is None
    assert gpu.memory_label == "16 GB GDDR6"
    assert gpu.memory_bandwidth_gb_s == 320


def test_h200_memory_is_the_measured_total() -> None:
    # measured by this project on an H200: torch.cuda.get_device_properties(0).total_memory
    # = 150109880320 (nvidia-smi shows 143771 MiB; CUDA's total is what an OOM is decided on)
    assert find_gpu("H200").memory_bytes == 150109880320


@pytest.mark.parametrize(
    ("query", "mib"),
    [
        ("T4", 15360),
        ("H100-SXM", 81559),
        ("A100-80GB", 81920),
        ("A100-40GB", 40960),
        ("V100-16GB", 16160),
        ("RTX-4090", 24564),
    ],
)
def test_driver_reported_totals(query: str, mib: int) -> None:
    # nvidia-smi memory.total in public logs (and in the brief): not the marketed 16/80/40/24 GB
    assert find_gpu(query).memory_bytes == mib * MIB


@pytest.mark.parametrize("gpu", load_catalog(), ids=lambda gpu: gpu.name)
def test_memory_note_agrees_with_memory_bytes(gpu: Gpu) -> None:
    # A row that quotes an nvidia-smi total must store exactly that many MiB.
    match = re.search(r"nvidia-smi reports (\d+) MiB", gpu.memory_note or "")
    if match:
        assert gpu.memory_bytes == int(match.group(1)) * MIB


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("h100", "H100-SXM"),
        ("H100-SXM", "H100-SXM"),
        ("H100 SXM", "H100-SXM"),
        ("h100_sxm", "H100-SXM"),
        ("  H100SXM  ", "H100-SXM"),
        ("a100-80gb", "A100-SXM4-80GB"),
        ("A100_80GB", "A100-SXM4-80GB"),
        ("A100 40GB", "A100-SXM4-40GB"),
        ("a100-pcie-40gb", "A100-SXM4-40GB"),
        ("v100-32gb", "V100-SXM2-32GB"),
        ("h200", "H200-SXM"),
        ("rtx4090", "RTX-4090"),
        ("mi300x", "MI300X"),
        # device names as nvidia-smi / rocm report them
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA H200", "H200-SXM"),
        ("Tesla T4", "T4"),
        ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
        ("NVIDIA GeForce RTX 3090", "RTX-3090"),
        ("AMD Instinct MI300X", "MI300X"),
    ],
)
def test_names_and_aliases_resolve(query: str, expected: str) -> None:
    assert find_gpu(query).name == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("H1000", "unknown GPU 'H1000'; did you mean: H100-SXM, H200-SXM, H100-PCIe?"),
        # bare a100 / v100 are ambiguous on purpose: both memory sizes are offered first
        ("a100", "unknown GPU 'a100'; did you mean: A100-SXM4-40GB, A100-SXM4-80GB, H100-SXM?"),
        ("v100", "unknown GPU 'v100'; did you mean: V100-SXM2-16GB, V100-SXM2-32GB, H100-SXM?"),
        ("rtx", "unknown GPU 'rtx'; did you mean: RTX-3090, RTX-4090, RTX-5090?"),
        ("mi300", "unknown GPU 'mi300'; did you mean: MI300X?"),
        ("4090", "unknown GPU '4090'; did you mean: RTX-4090?"),
        ("zzzz", "unknown GPU 'zzzz'; run `vramfit gpus` to list them"),
        ("", "unknown GPU ''; run `vramfit gpus` to list them"),
        (" - ", "unknown GPU ' - '; run `vramfit gpus` to list them"),
    ],
)
def test_unknown_gpu_message(query: str, message: str) -> None:
    with pytest.raises(VramfitError) as info:
        find_gpu(query)
    assert info.value.message == message
    assert info.value.field == "--gpu"
    assert str(info.value) == f"--gpu: {message}"


@st.composite
def _respelled(draw: st.DrawFn) -> tuple[str, str]:
    """A catalog label with its case scrambled and separators sprinkled in; and its row."""
    gpu = draw(st.sampled_from(load_catalog()))
    label = draw(st.sampled_from([gpu.name, *gpu.aliases]))
    chars = [c for c in label if c not in " -_"]
    spelled = ""
    for char in chars:
        spelled += draw(st.sampled_from(["", " ", "-", "_"]))
        spelled += char.upper() if draw(st.booleans()) else char.lower()
    return spelled, gpu.name


@given(_respelled())
def test_lookup_ignores_case_and_separators(case: tuple[str, str]) -> None:
    spelled, name = case
    assert find_gpu(spelled).name == name


def test_no_name_or_alias_is_used_twice() -> None:
    labels = [normalize(label) for gpu in load_catalog() for label in (gpu.name, *gpu.aliases)]
    assert len(labels) == len(set(labels))


@pytest.mark.parametrize("gpu", load_catalog(), ids=lambda gpu: gpu.name)
def test_every_row_is_complete(gpu: Gpu) -> None:
    assert tuple(gpu.tflops) == DTYPES
    assert gpu.memory_bytes > 0
    assert gpu.memory_bandwidth_gb_s > 0
    assert gpu.peak_tflops("fp32") is not None  # every GPU does FP32
    assert gpu.source


def test_catalog_reads_the_same_with_libyaml() -> None:
    text = (resources.files("vramfit") / "data" / "gpus.yaml").read_text(encoding="utf-8")
    assert parse_packaged_yaml(text) == yaml.safe_load(text)
    assert load_catalog() == parse_catalog(yaml.safe_load(text))


def test_catalog_is_loaded_once() -> None:
    assert load_catalog() is load_catalog()


def test_rows_are_frozen() -> None:
    with pytest.raises(ValidationError):
        find_gpu("T4").memory_bytes = 1  # type: ignore[misc]


def test_peak_tflops_rejects_an_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'fp4'"):
        find_gpu("B200").peak_tflops("fp4")


def test_catalog_rows_are_json() -> None:
    rows = catalog_rows()
    assert json.loads(json.dumps(rows)) == rows
    assert [row["name"] for row in rows] == [gpu.name for gpu in load_catalog()]
    h200 = next(row for row in rows if row["name"] == "H200-SXM")
    assert h200["memory_bytes"] == 150109880320  # an exact int, not a float
    assert list(h200["tflops"]) == list(DTYPES)


# --- validation of a catalog document -------------------------------------------------


def _rows() -> list[dict]:
    return copy.deepcopy(catalog_rows()[:2])  # T4, L4


def test_parse_accepts_the_packaged_rows() -> None:
    assert [gpu.name for gpu in parse_catalog(_rows())] == ["T4", "L4"]


def _parse_error(data: object) -> str:
    with pytest.raises(VramfitError) as info:
        parse_catalog(data, source="gpus.yaml")
    return str(info.value)


def test_parse_rejects_a_duplicate_alias() -> None:
    rows = _rows()
    rows[1]["aliases"].append("Tesla T4")
    assert _parse_error(rows) == "gpus.yaml[1] (L4): 'Tesla T4' is already a name or alias of T4"


def test_parse_rejects_a_missing_tflops_key() -> None:
    rows = _rows()
    del rows[0]["tflops"]["int8"]
    rows[0]["tflops"]["fp4"] = 260
    assert _parse_error(rows) == (
        "gpus.yaml[0].tflops: tflops needs exactly the keys fp32, tf32, fp16, bf16, fp8, int8 "
        "(missing int8; unknown fp4)"
    )


def test_parse_rejects_a_non_positive_peak() -> None:
    rows = _rows()
    rows[0]["tflops"]["fp32"] = 0
    assert _parse_error(rows) == (
        "gpus.yaml[0].tflops: tflops.fp32 must be a positive number or null, got 0.0"
    )


def test_parse_rejects_an_unknown_key() -> None:
    rows = _rows()
    rows[1]["memory_gb"] = 24
    assert _parse_error(rows) == "gpus.yaml[1].memory_gb: unknown key"


def test_parse_rejects_zero_memory() -> None:
    rows = _rows()
    rows[0]["memory_bytes"] = 0
    assert _parse_error(rows) == "gpus.yaml[0].memory_bytes: Input should be greater than 0"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "gpus.yaml: expected a non-empty list of GPUs"),
        ([], "gpus.yaml: expected a non-empty list of GPUs"),
        ({"name": "T4"}, "gpus.yaml: expected a non-empty list of GPUs"),
        (["T4"], "gpus.yaml[0]: expected a mapping, got str"),
    ],
)
def test_parse_rejects_a_malformed_document(data: object, message: str) -> None:
    assert _parse_error(data) == message
