"""minqwen: Qwen2.5 inference from scratch, the code the book builds chapter by chapter.

`minqwen.model` holds the model, `minqwen.engine` drives it, `minqwen.tokenizer` and `minqwen.weights` bring text
and checkpoints in, `minqwen.quant` reads quantized files and quantizes weights, `minqwen.parallel` splits a model
across processes, and `minqwen.tools` measures and checks. The names below are the public API. They load on first
use, so that `import minqwen`, and with it the command line, starts without importing torch: a Ctrl-C or a bad
argument is then answered before any heavy import.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "Qwen2": "minqwen.model.qwen2",
    "LoadError": "minqwen.model.config",
    "ModelConfig": "minqwen.model.config",
    "ConfigError": "minqwen.model.config",
    "DynamicKVCache": "minqwen.model.cache",
    "StaticKVCache": "minqwen.model.cache",
    "SamplingConfig": "minqwen.engine.sampling",
    "NumericalError": "minqwen.engine.request",
    "generate": "minqwen.engine.generate",
    "generate_tokens": "minqwen.engine.generate",
    "stream": "minqwen.engine.streaming",
    "FastQwen2": "minqwen.engine.fast",
    "SpeculativeDecoder": "minqwen.engine.speculative",
    "speculative_generate": "minqwen.engine.speculative",
    "quantize": "minqwen.quant.weight_only",
    "BPETokenizer": "minqwen.tokenizer",
    "render_chat": "minqwen.tokenizer",
    "fetch": "minqwen.weights",
    "FetchError": "minqwen.weights",
}
_SUBPACKAGES = ("model", "engine", "quant", "parallel", "tools", "tokenizer", "weights")
__all__ = sorted(_PUBLIC)


def submodules_on_demand(package: str):
    """A module `__getattr__` that imports `package.name` the first time `package.name` is used."""

    def __getattr__(name: str):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{package}.{name}":
                raise  # a dependency of that module is missing: say so, not that the name is
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"minqwen.{name}")
    if name not in _PUBLIC:
        raise AttributeError(f"module 'minqwen' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, *_SUBPACKAGES})
