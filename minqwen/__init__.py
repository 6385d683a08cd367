"""minqwen: Qwen2.5 inference from scratch, the code the book builds chapter by chapter."""

from .cache import DynamicKVCache, StaticKVCache
from .config import ConfigError, ModelConfig
from .fast import FastQwen2
from .generate import generate, generate_tokens
from .model import LoadError, Qwen2
from .request import NumericalError
from .sampling import SamplingConfig
from .streaming import stream
from .tokenizer import BPETokenizer, render_chat
from .weights import FetchError, fetch

__all__ = [
    "BPETokenizer",
    "ConfigError",
    "DynamicKVCache",
    "FastQwen2",
    "FetchError",
    "LoadError",
    "ModelConfig",
    "NumericalError",
    "Qwen2",
    "SamplingConfig",
    "StaticKVCache",
    "fetch",
    "generate",
    "generate_tokens",
    "render_chat",
    "stream",
]
