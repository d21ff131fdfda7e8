"""The origin notebook's "will it fit" formula, reproduced exactly.

Source: the seed notebook's "Practical VRAM Estimation Formula (FP16 + AdamW)":

    VRAM_GB = 6 * (P_billions * 1000) / 1024  +  8 * L * H * S * B / 1024**3  +  1.5

Units, as the notebook writes them: the first term is "6 bytes per parameter" counted in
millions of parameters (MB) divided by 1024, i.e. GiB-like; the second divides bytes by
1024**3 (GiB); the 1.5 is a flat safety buffer. The result is in the notebook's own
"GB", which is really GiB: we label it "notebook GB (= GiB)" when displaying it.

It under-counts mixed-precision AdamW training: it assumes 6 B/param (fp16 weights plus
two fp16 Adam states), where real AMP AdamW keeps ~16 B/param (fp32 master weights, fp32
m and v, gradients) and activations 10-40x larger than 8 bytes per layer x hidden x token.
"""

from __future__ import annotations

from dataclasses import dataclass

SEED_BUFFER_GB = 1.5  # the notebook's flat "safety buffer"
SEED_BYTES_PER_PARAM = 6  # "FP16 weights (2 B) x 3 copies (weights, momentum, variance)"
SEED_ACTIVATION_BYTES = 8  # "4 bytes/activation x 2 (fwd/bwd)" per layer x hidden x token

UNDERCOUNT_WARNING = (
    "the seed formula under-counts mixed-precision AdamW training (6 B/param instead of ~16, "
    "and activations 10-40x too small); drop --formula seed for vramfit's per-phase model"
)


@dataclass(frozen=True)
class SeedEstimate:
    """The notebook's three terms, in the notebook's unit (GB meaning 2**30 bytes)."""

    param_gb: float
    activation_gb: float
    buffer_gb: float

    @property
    def total_gb(self) -> float:
        return self.param_gb + self.activation_gb + self.buffer_gb

    @property
    def notebook_gb(self) -> float:
        """The total as the notebook prints it: three significant figures (4.52, 7.45, 13.4).

        The notebook rounds its terms by hand (11.72 + 0.18 + 1.5 = 13.40 where the exact sum is
        13.406); three significant figures reproduce all three of its worked examples.
        """
        return float(f"{self.total_gb:.3g}")

    def parts_bytes(self) -> dict[str, int]:
        """The three terms as bytes (the notebook's GB is 2**30 bytes)."""
        return {
            "params_and_adam": round(self.param_gb * 2**30),
            "activations": round(self.activation_gb * 2**30),
            "buffer": round(self.buffer_gb * 2**30),
        }


def seed_estimate(params: int, layers: int, hidden: int, seq_len: int, batch: int) -> SeedEstimate:
    """Apply the notebook formula. ``params`` is a plain count (the notebook takes billions)."""
    p_billions = params / 1e9
    param_gb = SEED_BYTES_PER_PARAM * (p_billions * 1000) / 1024
    activation_gb = SEED_ACTIVATION_BYTES * layers * hidden * seq_len * batch / 1024**3
    return SeedEstimate(param_gb=param_gb, activation_gb=activation_gb, buffer_gb=SEED_BUFFER_GB)
