"""The DNRT library: RAA, the paper's activations, ARR and its memory, and model conversion."""
from .activations import ACTIVATIONS, GDN, make_activation
from .arr import ARR, find_layers
from .convert import ConversionReport, conversion_report, convert
from .kernels import set_fused
from .memory import ResponseMemory
from .raa import LazyRAA, RAA

__all__ = ["ACTIVATIONS", "ARR", "ConversionReport", "GDN", "LazyRAA", "RAA", "ResponseMemory", "conversion_report",
           "convert", "find_layers", "make_activation", "set_fused"]
