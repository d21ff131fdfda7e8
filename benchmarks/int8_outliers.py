"""LLM.int8 outlier columns of randomly initialised models, on the CPU, before measuring.

How many input columns of each block linear hold a value at or above ``llm_int8_threshold``
depends on the data, so the estimator takes it as an input (``quant.int8_outliers``,
``--int8-outliers``). The models ``benchmarks/collect.py`` measures are transformers'
random initialisations (``save_pretrained`` of ``from_config``, then loaded quantized); this
script builds the same configuration with a few layers on the CPU (the fraction is a
property of each layer's input distribution, which repeats from layer to layer), runs one
forward on random tokens of the case's batch x seq, and prints, per int8 case, the mean
fraction per linear as ``int8_outliers`` for the cases file:

    PYTHONPATH=src python benchmarks/int8_outliers.py --cases benchmarks/ft-validation4.yaml

(``--device cuda`` runs it on a GPU: a CPU without fast bf16 matmuls takes hours there.)

``measure`` reports the fractions it finds on the GPU after each int8 run (a note), so the
two can be compared.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from vramfit.config import ModelSpec, Workload


def fractions(
    spec: ModelSpec, workload: Workload, layers: int, threshold: float, device: str = "cpu"
) -> dict:
    import torch

    from vramfit.measure.hf import block_path, hf_config, import_transformers

    transformers = import_transformers()
    cfg = hf_config(spec.model_copy(update={"layers": layers}), workload)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    found: dict[str, list[float]] = {}

    def hook(name: str):
        def count(module, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float16)
            cols = int((x.abs() >= threshold).any(dim=0).sum())
            found.setdefault(name, []).append(cols / x.shape[-1])

        return count

    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{path}":
            module.register_forward_pre_hook(hook(block_path(path)))
    ids = torch.randint(0, cfg.vocab_size, (workload.batch, workload.seq), device=device)
    with torch.no_grad():
        model.base_model(input_ids=ids)  # the decoder layers: no block linear feeds lm_head
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(found.items()) if any(v)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2, help="layers built (default 2)")
    parser.add_argument(
        "--device", default="cpu", help="where to run (cuda: a CPU without fast bf16 matmuls "
        "takes hours for 7B-wide layers)"
    )
    args = parser.parse_args()
    for case in yaml.safe_load(args.cases.read_text()):
        quant = case.get("workload", {}).get("quant") or {}
        if quant.get("kind") != "int8":
            continue
        spec = ModelSpec.model_validate(case["model"]).resolved()
        workload = Workload.model_validate(case["workload"])
        found = fractions(
            spec, workload, args.layers, workload.quant.int8_threshold, args.device
        )
        print(f"{case['name']}: int8_outliers: {found}", flush=True)


if __name__ == "__main__":
    main()
