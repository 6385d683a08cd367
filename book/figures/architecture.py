"""Figures and tables of the architecture page (ch2/01)."""

from __future__ import annotations

from helpers import show_figure

from collections import Counter

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.patches import FancyBboxPatch

from minqwen.model.config import ModelConfig

GRAY, BLUE, GREEN, ORANGE, PINK, RED = (
    "#eeeeee",
    "#dbe9f6",
    "#dff2df",
    "#fde5cc",
    "#f8dde6",
    "#c0392b",
)


def describe(module) -> str:
    """One line per module: its class and, for the kinds that hold weights, their shape."""
    shape = {
        "Linear": lambda m: f"{m.in_features} -> {m.out_features}, bias={m.bias is not None}",
        "Embedding": lambda m: f"{m.num_embeddings} x {m.embedding_dim}",
        "Qwen2RMSNorm": lambda m: f"{m.weight.shape[0]}, eps={m.variance_epsilon:.0e}",
    }
    kind = type(module).__name__
    return f"{kind}({shape[kind](module)})" if kind in shape else kind


def print_tree(modules: dict, layers: int) -> None:
    """The module tree: everything outside the decoder layers, and layer 0 in full."""
    for name, module in modules.items():
        if not name.startswith("model.layers.") or name.startswith("model.layers.0"):
            print(f"{name or '(root)':42s} {describe(module)}")
    rest = f"model.layers.1 ... model.layers.{layers - 1}"
    print(f"{rest:42s} {layers - 1} more Qwen2DecoderLayer, each shaped like model.layers.0")


def layer_structure(modules: dict, i: int) -> list[tuple[str, str]]:
    """The submodules of decoder layer `i`, named relative to the layer, with their shapes."""
    prefix = f"model.layers.{i}"
    return [
        (n.removeprefix(prefix), describe(m))
        for n, m in modules.items()
        if n.startswith(prefix + ".") or n == prefix
    ]


def parameter_kind(name: str) -> str:
    """The kind of module an HF parameter name belongs to, for the parameter budget."""
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "LM head"
    if "norm" in name:
        return "RMSNorm weights"
    part = name.split(".")[-2]
    if "self_attn" in name:
        return "attention biases (q, k, v)" if name.endswith("bias") else f"attention {part}"
    return f"MLP {part}"


def parameters_by_kind(model) -> Counter:
    kinds = Counter()
    for name, p in model.named_parameters():
        kinds[parameter_kind(name)] += p.numel()
    return kinds


def sizes_table(sizes, qwen25_config, parameter_count) -> pd.DataFrame:
    """One row per released size, the fields that vary between sizes (base configs)."""
    rows = {}
    for size in sizes:
        c = qwen25_config(size, instruct=False)
        rows[size] = {
            "hidden": c["hidden_size"],
            "heads": c["num_attention_heads"],
            "kv heads": c["num_key_value_heads"],
            "head dim": c["hidden_size"] // c["num_attention_heads"],
            "MLP width": c["intermediate_size"],
            "layers": c["num_hidden_layers"],
            "vocab": c["vocab_size"],
            "tied": "yes" if c["tie_word_embeddings"] else "no",
            "eps": f"{c['rms_norm_eps']:.0e}".replace("e-0", "e-"),
            "positions": c["max_position_embeddings"],
            "parameters": f"{parameter_count(size) / 1e9:.3f}B",
        }
    return pd.DataFrame(rows).T


def _box(ax, x, y, text, color, width=3.9, height=0.8, fontsize=10):
    ax.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - height / 2),
            width,
            height,
            boxstyle="round,pad=0.04",
            facecolor=color,
            edgecolor="0.3",
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    return x, y, height


def _arrow(ax, a, b):
    ax.annotate(
        "",
        xy=(b[0], b[1] + b[2] / 2),
        xytext=(a[0], a[1] - a[2] / 2),
        arrowprops=dict(arrowstyle="-|>", color="0.3"),
    )


def computation_graph(c: ModelConfig) -> None:
    """The model on the left, one decoder layer expanded on the right, with the shapes of `c`."""
    fig, ax = plt.subplots(figsize=(10.2, 7.6))
    ax.set(xlim=(0, 11.2), ylim=(1.6, 12.7))
    ax.axis("off")
    head = "tied to the embedding" if c.tie_word_embeddings else "its own matrix (untied)"
    left = [
        _box(ax, 2.2, 11.6, "input_ids [b, s]", GRAY),
        _box(ax, 2.2, 10.1, f"Embedding\n{c.vocab_size} x {c.hidden_size}", BLUE, height=1.0),
        _box(
            ax,
            2.2,
            8.3,
            f"Decoder layer x {c.num_hidden_layers}\nx: [b, s, {c.hidden_size}]",
            PINK,
            height=1.5,
        ),
        _box(ax, 2.2, 6.5, f"RMSNorm (eps {c.rms_norm_eps:.0e})", GREEN),
        _box(ax, 2.2, 5.0, f"LM head {c.hidden_size} -> {c.vocab_size}\n{head}", BLUE, height=1.0),
        _box(ax, 2.2, 3.5, f"logits [b, s, {c.vocab_size}]", GRAY),
    ]
    for a, b in zip(left, left[1:]):
        _arrow(ax, a, b)
    wide = dict(width=4.9)
    right = [
        _box(ax, 7.4, 12.0, f"x [b, s, {c.hidden_size}]", GRAY, height=0.5),
        _box(ax, 7.4, 11.15, "RMSNorm (input_layernorm)", GREEN, height=0.55),
        _box(
            ax,
            7.4,
            10.1,
            f"q_proj, k_proj, v_proj (with bias)\nq: {c.num_attention_heads} heads, "
            f"k, v: {c.num_key_value_heads} heads, x {c.head_dim}",
            ORANGE,
            height=0.9,
            **wide,
        ),
        _box(
            ax,
            7.4,
            9.05,
            f"RoPE on q and k (theta {c.rope_theta:.0e})",
            ORANGE,
            height=0.55,
            **wide,
        ),
        _box(
            ax,
            7.4,
            8.0,
            f"GQA: softmax(q kᵀ / √{c.head_dim} + causal) v\n"
            f"each kv head serves {c.kv_groups} query heads",
            ORANGE,
            height=0.9,
            **wide,
        ),
        _box(
            ax,
            7.4,
            6.95,
            f"o_proj {c.num_attention_heads * c.head_dim} -> {c.hidden_size}",
            ORANGE,
            height=0.55,
            **wide,
        ),
        _box(ax, 7.4, 6.1, "+", GRAY, width=0.7, height=0.5),
        _box(ax, 7.4, 5.25, "RMSNorm (post_attention_layernorm)", GREEN, height=0.55, **wide),
        _box(
            ax,
            7.4,
            4.15,
            f"SwiGLU MLP: down(silu(gate(x)) * up(x))\n"
            f"{c.hidden_size} -> {c.intermediate_size} -> {c.hidden_size}",
            BLUE,
            height=0.9,
            **wide,
        ),
        _box(ax, 7.4, 3.05, "+", GRAY, width=0.7, height=0.5),
        _box(ax, 7.4, 2.2, f"x [b, s, {c.hidden_size}]", GRAY, height=0.5),
    ]
    for a, b in zip(right, right[1:]):
        _arrow(ax, a, b)
    # The residual stream bypasses each block and is added back after it.
    for (start, end), x in zip(((right[0], right[6]), (right[6], right[9])), (10.3, 10.5)):
        ax.plot([start[0] + 1.0, x, x], [start[1], start[1], end[1]], color=RED, lw=1.4)
        ax.annotate(
            "",
            xy=(end[0] + 0.35, end[1]),
            xytext=(x, end[1]),
            arrowprops=dict(arrowstyle="-|>", color=RED, lw=1.4),
        )
    ax.text(10.75, 7.5, "residual stream", rotation=90, color=RED, fontsize=10, va="center")
    ax.plot([4.2, 4.9], [9.05, 12.25], ls=":", color="0.5")
    ax.plot([4.2, 4.9], [7.55, 1.95], ls=":", color="0.5")
    ax.text(2.2, 12.45, "Qwen2ForCausalLM", ha="center", fontsize=11, weight="bold")
    ax.text(7.4, 12.5, "one decoder layer (pre-norm)", ha="center", fontsize=11, weight="bold")
    show_figure(fig)


def parameters_of_one_model(kinds: Counter, title: str) -> None:
    """Horizontal bars: the parameters of each kind of module, in millions."""
    ordered = pd.Series(kinds).sort_values()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.barh(ordered.index, ordered.values / 1e6, color="#4c72b0")
    for y, v in enumerate(ordered.values):
        ax.text(v / 1e6 + 2, y, f"{v / 1e6:.2f}M", va="center", fontsize=9)
    ax.set(xlabel="parameters (millions)", title=title, xlim=(0, ordered.max() / 1e6 * 1.2))
    show_figure(fig)


def shares_by_size(share: pd.DataFrame) -> None:
    """Stacked bars: each size's parameters split into embedding + head, attention, MLP and norms."""
    fig, ax = plt.subplots(figsize=(9, 3.4))
    share.plot.barh(
        stacked=True, ax=ax, color=["#8c8c8c", "#dd8452", "#4c72b0", "#55a868"], width=0.7
    )
    ax.set(xlabel="share of parameters", ylabel="", title="Where the parameters are, by size")
    ax.invert_yaxis()
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    show_figure(fig)
