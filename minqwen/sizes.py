"""The seven Qwen2.5 sizes, as their config.json files give them.

The hub is out of reach from where this book is built, so the numbers are written down here once and every
chapter (size advice, the architecture table, KV-cache bytes, `random:<size>` checkpoints) reads them from here.
"""

from __future__ import annotations

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


def parameter_count(size: str) -> int:
    """Exact number of parameters, counted from the config (embedding, layers, final norm, untied head)."""
    c = qwen25_config(size)
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = hidden // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    attention = hidden * hidden + hidden + 2 * (hidden * kv + kv) + hidden * hidden
    mlp = 3 * hidden * inter
    per_layer = attention + mlp + 2 * hidden
    head = 0 if c["tie_word_embeddings"] else vocab * hidden
    return vocab * hidden + c["num_hidden_layers"] * per_layer + hidden + head


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
