"""What inference keeps besides a profile's forward: the static KV cache, and the matmul
libraries' workspaces (which training steps make too).

The KV cache holds ``2 * layers * batch * kv_heads * head_dim * tokens`` elements (keys and
values; GQA shares each K/V head among ``heads / kv_heads`` query heads: Ainslie et al.
2023). The prefill and decode steps themselves are graphs of ops that a profile builds
(``vramfit.estimate.profiles.reference.inference``, ``vramfit.estimate.schedule``).
"""

from __future__ import annotations

from vramfit.config import ModelSpec, Workload
from vramfit.estimate.activations import shape_of
from vramfit.estimate.dtypes import kv_bytes
from vramfit.estimate.overhead import CUBLASLT_WORKSPACE_BYTES
from vramfit.estimate.timeline import Tape


def kv_cache_bytes(spec: ModelSpec, workload: Workload) -> int:
    """Static KV cache for the prompt plus the generated tokens."""
    spec = spec.resolved()
    sh = shape_of(spec, workload)
    tokens = workload.seq + workload.gen_tokens
    if spec.sliding_window:
        # a sliding-window layer only ever attends to (and keeps) the last `window` tokens
        local = (
            spec.layers // spec.sliding_window_every
            if spec.sliding_window_every > 1
            else spec.layers
        )
        windowed = min(tokens, spec.sliding_window)
        per_token_layers = (spec.layers - local) * tokens + local * windowed
    else:
        per_token_layers = spec.layers * tokens
    return 2 * per_token_layers * sh.batch * sh.kv_width * kv_bytes(workload)


class Workspaces:
    """The matmul libraries' workspaces, which the first matmul on each thread takes from the
    caching allocator after its output (labelled traces, benchmarks/data/h200-traces):
    cuBLAS's, and cuBLASLt's own 1 MiB at the first projection with a bias (addmm's fused
    epilogue). A step that starts with them already made (``active=False``) makes none."""

    def __init__(self, t: Tape, cublas_bytes: int, active: bool = True) -> None:
        self.t, self.cublas_bytes, self.active = t, cublas_bytes, active
        self.made: set[str] = set()
        self.keys: set[int] = set()  # the tape keys of those made

    def matmul(self, thread: str, biased: bool) -> None:
        """A matmul on ``thread`` ("" for the only one), of a projection with a bias or not."""
        if not self.active:
            return
        suffix = f" ({thread})" if thread else ""
        for name, size, needed in (
            (f"cuBLAS workspace{suffix}", self.cublas_bytes, True),
            (f"cuBLASLt workspace{suffix}", CUBLASLT_WORKSPACE_BYTES, biased),
        ):
            if needed and name not in self.made:
                key = self.t.persist(name, "cublas_workspace", [size])
                if key is not None:
                    self.keys.add(key)
                self.made.add(name)
