"""List what autograd saves for backward in the reference models, tensor by tensor.

A diagnostic for the activation model in ``vramfit.estimate.activations``: it builds a
small reference model, runs one forward, walks the autograd graph from the loss and reads
every ``_saved_*`` tensor of every node, de-duplicated by storage. Parameters are reported
separately; what remains is the saved activations (and, under autocast, the cached 16-bit
weight copies). Run on a GPU so the kernels (SDPA, norms, autocast policy) are the real ones:

    PYTHONPATH=src python3 benchmarks/saved_tensors.py --out $OUT/saved.json

Without CUDA it runs on the CPU (whose autocast and attention kernels differ).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from vramfit.config import ModelSpec, Workload
from vramfit.measure.models import build_model
from vramfit.measure.train import _autocast, _dtype

CASES = [
    (
        "gpt2",
        {
            "arch": "gpt2",
            "layers": 2,
            "hidden": 256,
            "heads": 4,
            "vocab": 1000,
            "max_positions": 512,
        },
    ),
    ("llama", {"arch": "llama", "layers": 2, "hidden": 256, "heads": 4, "ffn": 704, "vocab": 1000}),
    (
        "llama-gqa",
        {
            "arch": "llama",
            "layers": 2,
            "hidden": 256,
            "heads": 4,
            "kv_heads": 2,
            "ffn": 704,
            "vocab": 1000,
        },
    ),
]
WORKLOADS = [
    {"precision": p, "attention": a, "checkpointing": c}
    for p in ("amp-bf16", "bf16", "fp32")
    for a in ("flash", "eager")
    # checkpointed graphs recompute when their saved tensors are read: measure those directly
    for c in ("none",)
]


def saved_tensors(loss: Any, params: set[int]) -> list[dict[str, Any]]:
    """Every distinct storage saved by a node reachable from ``loss.grad_fn``."""
    seen_nodes, seen_storages, out = set(), set(), []
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except Exception:  # some saved values cannot be unpacked (freed / recompute)
                continue
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                    continue
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in seen_storages or key == 0:
                    continue
                seen_storages.add(key)
                out.append(
                    {
                        "node": type(node).__name__,
                        "attr": attr,
                        "shape": list(t.shape),
                        "dtype": str(t.dtype).replace("torch.", ""),
                        "bytes": storage.nbytes(),
                        "param": key in params,
                    }
                )
        stack.extend(fn for fn, _ in node.next_functions)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = []
    for name, model in CASES:
        for w in WORKLOADS:
            spec = ModelSpec(**model)
            workload = Workload(batch=args.batch, seq=args.seq, **w)
            net = build_model(spec, workload, device, _dtype(torch, workload))
            net.train()
            params = {p.untyped_storage().data_ptr() for p in net.parameters()}
            x = torch.randint(0, 1000, (args.batch, args.seq), device=device)
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
            with _autocast(torch, workload, device):
                loss = net(x, x)
            end = torch.cuda.memory_allocated() - base if device == "cuda" else None
            tensors = saved_tensors(loss, params)
            by_kind: dict[str, int] = defaultdict(int)
            for t in tensors:
                if not t["param"]:
                    by_kind[f"{t['node']}.{t['attr']} {t['dtype']} {t['shape']}"] += t["bytes"]
            report.append(
                {
                    "model": name,
                    "workload": w,
                    "batch": args.batch,
                    "seq": args.seq,
                    "forward_end_allocated_minus_weights": end,
                    "saved_non_param_bytes": sum(t["bytes"] for t in tensors if not t["param"]),
                    "by_kind": dict(sorted(by_kind.items())),
                }
            )
            print(
                f"{name:10s} {w['precision']:9s} {w['attention']:6s} {w['checkpointing']:9s} "
                f"saved={report[-1]['saved_non_param_bytes']:>10,} fwd_end={end}"
            )
            del loss, net
            if device == "cuda":
                torch.cuda.empty_cache()
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
