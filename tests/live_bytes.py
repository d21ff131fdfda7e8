"""Bytes of the tensors PyTorch ops create, alive at once, on the CPU: the tests' view of
what a piece of library code allocates (the optimizers' steps, MatMul8bitLt's backward)."""

from __future__ import annotations


class LiveBytes:
    """Bytes of the tensors that aten ops create while active, alive at once: the peak.

    A TorchDispatchMode sees every op's outputs; an output that shares no storage with an
    input is a new allocation, freed when the last tensor object on its storage is collected.
    """

    def __init__(self) -> None:
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensor objects]
        self.live, self.now, self.peak = live, 0, 0
        tracker = self

        def drop(ptr: int) -> None:
            entry = live[ptr]
            entry[1] -= 1
            if entry[1] == 0:
                tracker.now -= entry[0]
                del live[ptr]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                result = func(*args, **(kwargs or {}))
                outs = result if isinstance(result, (list, tuple)) else [result]
                for out in outs:
                    if not isinstance(out, torch.Tensor):
                        continue
                    ptr = out.untyped_storage().data_ptr()
                    if ptr not in live:
                        inputs = [a for a in (*args, *(kwargs or {}).values())]
                        if any(
                            isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr
                            for a in inputs
                        ):
                            continue  # in place or a view of something older: not new
                        live[ptr] = [out.untyped_storage().nbytes(), 0]
                        tracker.now += live[ptr][0]
                        tracker.peak = max(tracker.peak, tracker.now)
                    live[ptr][1] += 1
                    weakref.finalize(out, drop, ptr)
                return result

        self.mode = Mode()
