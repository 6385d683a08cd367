"""Quantization: what is inside a quantized checkpoint, and weights in fewer bits (chapter 6)."""

from minqwen import submodules_on_demand

__getattr__ = submodules_on_demand(__name__)
