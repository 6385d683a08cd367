"""The engine: what turns a model into text. The request (defaults and input checks), the sampling filters, the
generate loop, streaming, and the fast engine with its static cache and CUDA graphs."""

from minqwen import submodules_on_demand

__getattr__ = submodules_on_demand(__name__)
