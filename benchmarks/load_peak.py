"""What loading a quantized model allocates on the GPU: ``from_pretrained`` with a
``BitsAndBytesConfig``, as users load one, traced by PyTorch's allocator history.

For each case: a random model (``hf_config`` of a cases-file entry) saved on the CPU, then
loaded with quantization onto the GPU under ``torch.cuda.memory._record_memory_history``.
Prints the load's peak allocated bytes, the bytes allocated after it, the reserved bytes,
and every allocation of at least ``--min-mib`` MiB with the frame that made it and whether it
was freed before the load returned. Run on a CUDA machine from the repository root:

    PYTHONPATH=src python3 benchmarks/load_peak.py --cases benchmarks/ft-validation6.yaml \
        --only ft6-gemma-2-2b-nf4-infer-b4-s1024-gen64
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

import yaml

from vramfit.config import ModelSpec, Workload


def load(spec: ModelSpec, workload: Workload, min_mib: float) -> None:
    import torch

    from vramfit.measure.hf import hf_config, import_transformers

    transformers = import_transformers()
    cfg = hf_config(spec, workload)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    del model
    quant = workload.quant
    config = (
        transformers.BitsAndBytesConfig(load_in_8bit=True)
        if quant.kind.value == "int8"
        else transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.kind.value,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    )
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, dtype=torch.bfloat16, device_map={"": "cuda"}
        )
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    shutil.rmtree(folder, ignore_errors=True)
    mib = 2**20
    print(
        f"  load peak allocated {torch.cuda.max_memory_allocated() / mib:.1f} MiB, "
        f"allocated after {torch.cuda.memory_allocated() / mib:.1f} MiB, "
        f"reserved {torch.cuda.memory_reserved() / mib:.1f} MiB"
    )
    # in trace order, each free ends the allocation then live at its address (a later
    # allocation may reuse the address: it is a block of its own)
    allocs: list[tuple[dict, bool]] = []
    live: dict[int, int] = {}  # address -> index in allocs
    for e in snap["device_traces"][0]:
        if e["action"] == "alloc":
            live[e["addr"]] = len(allocs)
            allocs.append((e, False))
        elif e["action"] == "free_completed" and e["addr"] in live:
            i = live.pop(e["addr"])
            allocs[i] = (allocs[i][0], True)
    for e, freed in allocs:
        if e["size"] >= min_mib * mib:
            frames = [
                f"{Path(f['filename']).name}:{f['line']} {f['name']}"
                for f in e.get("frames", [])
                if f["filename"].endswith(".py")
            ][:3]
            state = "freed" if freed else "kept"
            print(f"  alloc {e['size'] / mib:9.1f} MiB {state:5s} {' < '.join(frames)}")
    segments = sorted(s["total_size"] for s in snap["segments"])
    print(f"  segments: {len(segments)}, largest {[round(s / mib) for s in segments[-6:]]} MiB")
    del loaded
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=Path, action="append", required=True)
    parser.add_argument("--only", action="append", default=[], help="case names (repeatable)")
    parser.add_argument("--min-mib", type=float, default=64.0)
    parser.add_argument("--layers", type=int, help="build this many layers instead")
    args = parser.parse_args()
    cases = [case for path in args.cases for case in yaml.safe_load(path.read_text())]
    for case in cases:
        if case["name"] not in args.only or not case.get("workload", {}).get("quant"):
            continue
        print(case["name"])
        model = {**case["model"], **({"layers": args.layers} if args.layers else {})}
        spec = ModelSpec.model_validate(model).resolved()
        load(spec, Workload.model_validate(case["workload"]), args.min_mib)


if __name__ == "__main__":
    main()
