"""The seven Qwen2.5 sizes, as their config.json files give them, and the arithmetic of a model's size.

The hub is out of reach from where this book is built, so the numbers are written down here once. This module
is also the one home of size arithmetic: the tensors a config implies, its parameter count, the bytes one decode
step reads, the KV-cache bytes per token and the FLOPs of a prefill. Size advice (`minqwen.tools.hardware`), the
benchmark's roofline (`minqwen.tools.bench`) and `random:<size>` checkpoints (`minqwen.weights`) all read them here.
Each function takes a size ("7B"), a config.json dict or a `ModelConfig`.
"""

from __future__ import annotations

from math import prod

from minqwen.model.config import ModelConfig

SIZES = ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")

# size: (hidden, intermediate, layers, heads, kv_heads, vocab, tied, max_pos_base, rms_eps_base)
_TABLE = {
    "0.5B": (896, 4864, 24, 14, 2, 151936, True, 32768, 1e-6),
    "1.5B": (1536, 8960, 28, 12, 2, 151936, True, 131072, 1e-6),
    "3B": (2048, 11008, 36, 16, 2, 151936, True, 32768, 1e-6),
    "7B": (3584, 18944, 28, 28, 4, 152064, False, 131072, 1e-6),
    "14B": (5120, 13824, 48, 40, 8, 152064, False, 131072, 1e-5),
    "32B": (5120, 27648, 64, 40, 8, 152064, False, 131072, 1e-5),
    "72B": (8192, 29568, 80, 64, 8, 152064, False, 131072, 1e-5),
}

BOS_TOKEN_ID = 151643
EOS_TOKEN_ID_BASE = 151643
EOS_TOKEN_ID_INSTRUCT = 151645

INSTRUCT_GENERATION_CONFIG = {
    "bos_token_id": BOS_TOKEN_ID,
    "pad_token_id": BOS_TOKEN_ID,
    "do_sample": True,
    "eos_token_id": [EOS_TOKEN_ID_INSTRUCT, EOS_TOKEN_ID_BASE],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def check_size(size: str) -> str:
    if size not in _TABLE:
        raise ValueError(f"unknown Qwen2.5 size {size!r}; choose one of {', '.join(SIZES)}")
    return size


def qwen25_config(size: str, instruct: bool = True) -> dict:
    """The config.json of Qwen2.5-<size>(-Instruct), as a dict HF's Qwen2Config accepts."""
    hidden, intermediate, layers, heads, kv_heads, vocab, tied, max_pos, rms_eps = _TABLE[
        check_size(size)
    ]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 32768 if instruct else max_pos,
        "rms_norm_eps": 1e-6 if instruct else rms_eps,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID_INSTRUCT if instruct else EOS_TOKEN_ID_BASE,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
        "use_cache": True,
    }


def released_size(config: dict) -> str | None:
    """The Qwen2.5 size whose shape a config.json dict has (None for any other shape, such as a tiny test model)."""
    shape = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "vocab_size",
    )
    return next(
        (s for s in SIZES if all(qwen25_config(s)[k] == config.get(k) for k in shape)), None
    )


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def as_config(model: str | dict | ModelConfig) -> ModelConfig:
    """A size, a config.json dict or a ModelConfig, as a ModelConfig."""
    if isinstance(model, ModelConfig):
        return model
    raw = qwen25_config(model) if isinstance(model, str) else model
    return ModelConfig.from_dict(raw)


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def tensor_shapes(model: str | dict | ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2ForCausalLM checkpoint with its shape, in HF's names."""
    c = as_config(model)
    hidden, inter, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{name}.weight"] = (rows, hidden)
            shapes[p + f"self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def parameter_count(model: str | dict | ModelConfig) -> int:
    """Exact number of parameters: every tensor of the checkpoint (a tied head counts once)."""
    return sum(prod(shape) for shape in tensor_shapes(model).values())


def weight_bytes_per_step(model: str | dict | ModelConfig, dtype: str = "bfloat16") -> int:
    """Bytes of weights one forward pass reads: every layer, the final norm and the head. The embedding table
    counts only as a tied head; looking up a few rows of it costs nothing."""
    c = as_config(model)
    embedding = c.vocab_size * c.hidden_size
    untied_head = 0 if c.tie_word_embeddings else embedding
    return (parameter_count(c) - untied_head) * dtype_bytes(dtype)


def kv_cache_bytes_per_token(model: str | dict | ModelConfig, dtype: str = "bfloat16") -> int:
    """Keys and values of every layer for one token: 2 x layers x kv_heads x head_dim x bytes."""
    c = as_config(model)
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype_bytes(dtype)


def prefill_flops(model: str | dict | ModelConfig, batch: int, prompt: int) -> int:
    """Matrix-product FLOPs of a prefill: the projections for every token, causal attention (QK^T and the
    weighted sum of V over the visible keys), and the head once a row."""
    c = as_config(model)
    head = c.vocab_size * c.hidden_size
    projections = weight_bytes_per_step(c, "float16") // 2 - head
    visible_keys = prompt * (prompt + 1) // 2
    attention = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * visible_keys
    return batch * (2 * prompt * projections + attention + 2 * head)
