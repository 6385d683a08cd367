"""minqwen: Qwen2.5 inference from scratch, the code the book builds chapter by chapter."""

from .cache import DynamicKVCache, StaticKVCache
from .config import ConfigError, ModelConfig
from .hardware import hardware, memory_estimate, recommend_size
from .model import LoadError, Qwen2
from .weights import FetchError, fetch

__all__ = [
    "ConfigError",
    "DynamicKVCache",
    "FetchError",
    "LoadError",
    "ModelConfig",
    "Qwen2",
    "StaticKVCache",
    "fetch",
    "hardware",
    "memory_estimate",
    "recommend_size",
]
