"""minqwen: Qwen2.5 inference from scratch, the code the book builds chapter by chapter."""

from .cache import DynamicKVCache, StaticKVCache
from .config import ConfigError, ModelConfig
from .generate import generate, generate_tokens
from .hardware import hardware, memory_estimate, recommend_size
from .model import LoadError, Qwen2
from .sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    select_next_token,
    top_k_filter,
    top_p_filter,
)
from .tokenizer import BPETokenizer, render_chat
from .weights import FetchError, fetch

__all__ = [
    "BPETokenizer",
    "ConfigError",
    "DynamicKVCache",
    "FetchError",
    "LoadError",
    "ModelConfig",
    "Qwen2",
    "SamplingConfig",
    "StaticKVCache",
    "apply_repetition_penalty",
    "apply_temperature",
    "fetch",
    "generate",
    "generate_tokens",
    "hardware",
    "memory_estimate",
    "min_p_filter",
    "process_logits",
    "recommend_size",
    "render_chat",
    "select_next_token",
    "top_k_filter",
    "top_p_filter",
]
