"""A typed Qwen2 config, read from a checkpoint's config.json and validated before any weight is touched."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ROPE_TYPES = ("default", "yarn")
SAMPLING_SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")

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


class LoadError(ValueError):
    """A checkpoint's file is missing, unreadable or corrupt, or its tensors do not match its config.json."""


class ConfigError(LoadError):
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
    pad_token_id: int | None = None
    # generation_config.json's sampling settings (do_sample, temperature, ...): what generate() uses by default.
    sampling_defaults: dict = field(default_factory=dict, compare=False)

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
    def from_dict(
        cls, raw: dict, source: str = "config", generation: dict | None = None
    ) -> ModelConfig:
        """A config from config.json's dict and, optionally, generation_config.json's.

        As in transformers' generate(), generation_config.json decides which tokens end a reply and which token
        pads finished rows (Instruct models stop on <|im_end|> and <|endoftext|>), and the sampling settings a
        caller does not pass.
        """
        generation = generation or {}
        ending = ("eos_token_id", "pad_token_id")
        raw = {**raw, **{k: generation[k] for k in ending if generation.get(k) is not None}}
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise ConfigError(
                f"{source} lacks {', '.join(missing)}; a Qwen2 config.json needs all of {', '.join(_REQUIRED)}"
            )
        _check_sizes(raw, source)
        if raw.get("model_type", "qwen2") != "qwen2":
            raise ConfigError(
                f"{source} is model_type {raw['model_type']!r}; minqwen runs Qwen2 / Qwen2.5 (qwen2) only"
            )
        if raw.get("use_sliding_window", False):
            raise ConfigError(
                f"{source} sets use_sliding_window=true; minqwen implements full attention only. Set it to false "
                f"(every released Qwen2.5 model does)"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(
                f"{source} sets hidden_act={raw['hidden_act']!r}; Qwen2's MLP is SwiGLU with silu"
            )
        if (
            raw["hidden_size"] % raw["num_attention_heads"]
            or raw["num_attention_heads"] % raw["num_key_value_heads"]
        ):
            raise ConfigError(
                f"{source}: hidden_size {raw['hidden_size']} must be a multiple of num_attention_heads "
                f"{raw['num_attention_heads']}, and num_attention_heads a multiple of num_key_value_heads "
                f"{raw['num_key_value_heads']}"
            )
        head_dim = raw["hidden_size"] // raw["num_attention_heads"]
        if raw.get("head_dim") not in (None, head_dim):
            raise ConfigError(
                f"{source} sets head_dim={raw['head_dim']}, but minqwen derives head_dim as hidden_size / "
                f"num_attention_heads = {head_dim}, as every Qwen2.5 model does"
            )
        windowed = sorted(
            {kind for kind in raw.get("layer_types") or () if kind != "full_attention"}
        )
        if windowed:
            raise ConfigError(
                f"{source} lists layer_types {windowed}; minqwen implements full_attention layers only"
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
            pad_token_id=raw.get("pad_token_id"),
            sampling_defaults={
                k: generation[k] for k in SAMPLING_SETTINGS if generation.get(k) is not None
            },
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"{path} does not exist; pass a checkpoint folder that holds config.json"
            )
        generation = path.with_name("generation_config.json")
        return cls.from_dict(
            read_json(path), str(path), read_json(generation) if generation.is_file() else None
        )


def read_json(path: Path, error: type[LoadError] = ConfigError) -> dict:
    """A JSON object from `path`, or an `error` that names the file and what is wrong with it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(
            f"{path} is not valid JSON ({problem}); restore the file or fetch the checkpoint again"
        ) from None
    if not isinstance(value, dict):
        raise error(
            f"{path} holds a JSON {type(value).__name__}, not an object; restore the file or fetch the "
            f"checkpoint again"
        )
    return value


def _check_sizes(raw: dict, source: str) -> None:
    """Every size a positive integer and the norm's epsilon a positive number, before any arithmetic on them."""
    for key in _REQUIRED:
        value = raw[key]
        if key == "rms_norm_eps":
            valid = _positive_number(value)
        else:
            valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if not valid:
            kind = "a positive number" if key == "rms_norm_eps" else "a positive integer"
            raise ConfigError(f"{source} sets {key}={value!r}; it must be {kind}")


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """rope_theta and scaling from either layout: 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters).

    For YaRN the pre-training context is resolved here, as transformers does: a top-level
    `original_max_position_embeddings` wins, then the one in the scaling dict, then `max_position_embeddings`.
    """
    parameters = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    theta = scaling.get("rope_theta", parameters.get("rope_theta", raw.get("rope_theta")))
    if theta is None:
        # transformers would fall back to 1e4 here, Qwen2.5 was trained with 1e6: neither guess is safe
        raise ConfigError(
            f"{source} sets no rope_theta (top level or in rope_parameters); Qwen2.5 uses 1000000.0"
        )
    if not _positive_number(theta):
        raise ConfigError(f"{source} sets rope_theta={theta!r}; it must be a positive number")
    # A legacy rope_scaling replaces rope_parameters' scaling, as in transformers; only rope_theta carries over.
    merged = {
        key: value
        for key, value in (scaling or parameters).items()
        if key not in ("rope_theta", "type")
    }
    rope_type = merged.pop("rope_type", (scaling or parameters).get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source} asks for rope type {rope_type!r}; minqwen supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    merged["original_max_position_embeddings"] = raw.get(
        "original_max_position_embeddings",
        merged.get("original_max_position_embeddings") or raw["max_position_embeddings"],
    )
    original = merged["original_max_position_embeddings"]
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise ConfigError(
            f"{source} sets original_max_position_embeddings={original!r}; it must be a positive integer"
        )
    if merged.get("factor") is None:
        merged["factor"] = (
            raw["max_position_embeddings"] / merged["original_max_position_embeddings"]
        )
    if not _positive_number(merged["factor"]):
        raise ConfigError(
            f"{source} sets the {rope_type} factor to {merged['factor']!r}; it must be a number >= 1"
        )
    if merged["factor"] < 1:
        raise ConfigError(
            f"{source}: YaRN factor {merged['factor']} is below 1; YaRN only stretches the context"
        )
    return float(theta), {"rope_type": rope_type, **merged}


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
