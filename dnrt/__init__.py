"""Dynamic Neural Response Tuning (ICLR 2024) for PyTorch: Response-Adaptive Activation and Aggregated
Response Regularization as drop-in modules for any model and any training loop."""
from .errors import DNRTError
from .nn import (ACTIVATIONS, ARR, GDN, RAA, ConversionReport, LazyRAA, ResponseMemory, conversion_report, convert,
                 find_layers, make_activation, set_fused)

__version__ = "0.1.0"
__all__ = [
    "ACTIVATIONS", "ARR", "ConversionReport", "DNRTError", "GDN", "LazyRAA", "RAA", "ResponseMemory",
    "conversion_report", "convert", "find_layers", "make_activation", "set_fused",
]
