"""Tools around the engine: the benchmark, the layer probe, the hardware report and size advice, the chi-square
test of samplers, and an adapter that lets the engine drive a transformers model."""

from minqwen import submodules_on_demand

__getattr__ = submodules_on_demand(__name__)
