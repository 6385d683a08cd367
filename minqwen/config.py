"""A typed Qwen2 config, read from a checkpoint's config.json and validated before any weight is touched."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ROPE_TYPES = ("default", "yarn")

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
)


class ConfigError(ValueError):
    """config.json describes a model minqwen cannot run, or lacks a key it needs."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> ModelConfig:
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise ConfigError(f"{source} lacks {', '.join(missing)}; a Qwen2 config.json needs all of {', '.join(_REQUIRED)}")
        if raw.get("model_type", "qwen2") != "qwen2":
            raise ConfigError(f"{source} is model_type {raw['model_type']!r}; minqwen runs Qwen2 / Qwen2.5 (qwen2) only")
        if raw.get("use_sliding_window", False):
            raise ConfigError(
                f"{source} sets use_sliding_window=true; minqwen implements full attention only. Set it to false "
                f"(every released Qwen2.5 model does)"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source} sets hidden_act={raw['hidden_act']!r}; Qwen2's MLP is SwiGLU with silu")
        if raw["hidden_size"] % raw["num_attention_heads"] or raw["num_attention_heads"] % raw["num_key_value_heads"]:
            raise ConfigError(
                f"{source}: hidden_size {raw['hidden_size']} must divide into num_attention_heads "
                f"{raw['num_attention_heads']}, which must divide into num_key_value_heads {raw['num_key_value_heads']}"
            )
        theta, scaling = _rope(raw, source)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            **{key: raw[key] for key in _REQUIRED},
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist; pass a checkpoint folder that holds config.json")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """rope_theta and scaling from either layout: 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters)."""
    parameters = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**parameters, **scaling}
    theta = merged.pop("rope_theta", raw.get("rope_theta", 1_000_000.0))
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source} asks for rope type {rope_type!r}; minqwen supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    if "factor" not in merged:
        raise ConfigError(f"{source}: rope type {rope_type!r} needs a 'factor' in rope_scaling")
    return float(theta), {"rope_type": rope_type, **merged}
