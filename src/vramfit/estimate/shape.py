"""A plausible transformer shape for a bare parameter count (``--params`` without ``--hidden``)."""

from __future__ import annotations

from vramfit.config import Arch, ModelSpec
from vramfit.estimate.params import count_params

# GPT-3's family (Brown et al. 2020, Table 2.1) and Llama keep hidden / layers near 128.
ASPECT = 128
WIDTH_STEP = 64  # hidden sizes are multiples of the 64-wide head
MAX_LAYERS = 512  # ModelSpec.layers' bound


def infer_shape(params: int, layers: int | None, arch: Arch) -> tuple[int, int]:
    """(layers, hidden) of a ``arch`` model whose derived count is closest to ``params``."""
    if layers is None:
        # params ~ 12 * L * h^2 with h = ASPECT * L (Kaplan et al. 2020, eq. 2.1: N ~ 12 L d^2)
        layers = min(MAX_LAYERS, max(1, round((params / (12 * ASPECT**2)) ** (1 / 3))))

    def error(hidden: int) -> int:
        return abs(count_params(ModelSpec(arch=arch, layers=layers, hidden=hidden)).total - params)

    # the count grows with hidden: bisection on the 64-wide grid, then the nearer neighbour
    low, high = 1, 2
    while (
        count_params(ModelSpec(arch=arch, layers=layers, hidden=high * WIDTH_STEP)).total < params
    ):
        low, high = high, high * 2
        if high * WIDTH_STEP > 1_000_000:
            break
    while high - low > 1:
        mid = (low + high) // 2
        if (
            count_params(ModelSpec(arch=arch, layers=layers, hidden=mid * WIDTH_STEP)).total
            < params
        ):
            low = mid
        else:
            high = mid
    best = min((low, high), key=lambda k: error(k * WIDTH_STEP))
    return layers, best * WIDTH_STEP
