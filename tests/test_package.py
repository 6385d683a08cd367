"""The package as a whole: its public API, and every reference its docstrings and comments make to itself."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import minqwen

PACKAGE = Path(minqwen.__file__).parent
REFERENCE = re.compile(r"`(minqwen(?:\.\w+)+)`")


def resolve(dotted: str):
    """What a reader gets for `dotted`: attributes from the package down, importing a submodule only where no
    attribute of that name exists (so `minqwen.generate` is the function, as `import minqwen` gives it)."""
    value = minqwen
    for name in dotted.split(".")[1:]:
        if hasattr(value, name):
            value = getattr(value, name)
        elif inspect.ismodule(value):
            value = importlib.import_module(f"{value.__name__}.{name}")
        else:
            raise AttributeError(f"{dotted}: {type(value).__name__} has no attribute {name!r}")
    return value


def references() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in REFERENCE.findall(path.read_text()):
            found.setdefault(name, []).append(str(path.relative_to(PACKAGE.parent)))
    return found


def test_docstrings_name_only_what_exists():
    refs = references()
    assert len(refs) >= 10, "the package's docstrings should point readers to each other"
    broken = {}
    for name, files in refs.items():
        try:
            resolve(name)
        except (AttributeError, ModuleNotFoundError) as error:
            broken[name] = (files, str(error))
    assert not broken, broken


def test_public_api_is_what_users_need():
    assert set(minqwen.__all__) == {
        "Qwen2",
        "ModelConfig",
        "fetch",
        "generate",
        "generate_tokens",
        "stream",
        "FastQwen2",
        "SpeculativeDecoder",
        "speculative_generate",
        "quantize",
        "BPETokenizer",
        "render_chat",
        "DynamicKVCache",
        "StaticKVCache",
        "SamplingConfig",
        "ConfigError",
        "LoadError",
        "FetchError",
        "NumericalError",
    }
    for name in minqwen.__all__:
        assert getattr(minqwen, name) is not None
    assert callable(minqwen.generate) and callable(minqwen.generate_tokens)
