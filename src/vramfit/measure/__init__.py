"""Real GPU memory, measured with PyTorch: the estimator's calibration instrument.

torch is an optional extra (``pip install 'vramfit[measure]'``); these modules import it
inside functions only, so importing this package never needs it.
"""

from vramfit.measure.backend import Backend, CpuBackend, CudaBackend
from vramfit.measure.matmul import (
    MatmulMeasurement,
    MatmulPrediction,
    measure_matmul,
    measure_tflops,
    predict_matmul,
)
from vramfit.measure.models import build_model
from vramfit.measure.train import TrainMeasurement, measure_train

__all__ = [
    "Backend",
    "CpuBackend",
    "CudaBackend",
    "MatmulMeasurement",
    "MatmulPrediction",
    "TrainMeasurement",
    "build_model",
    "measure_matmul",
    "measure_tflops",
    "measure_train",
    "predict_matmul",
]
