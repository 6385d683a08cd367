"""Figures of the SwiGLU page (ch3/04)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F


def activations(minimum: tuple[float, float]) -> None:
    """silu against relu (left), and the gate's effect on one channel: silu(g) x u (right)."""
    z = torch.linspace(-6, 4, 500)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), width_ratios=(1, 1.15))
    left.plot(z, F.silu(z), label="silu(z) = z σ(z)")
    left.plot(z, F.relu(z), ls="--", label="relu(z)")
    left.plot(z, torch.sigmoid(z), color="gray", lw=1, label="σ(z): the share that passes")
    left.axhline(0, color="gray", lw=0.5)
    left.plot(*minimum, "o", color="tab:blue")
    left.annotate(
        f"minimum {minimum[1]:.3f} at z = {minimum[0]:.3f}",
        minimum,
        xytext=(-5.8, 1.4),
        fontsize=9,
        arrowprops={"arrowstyle": "->", "color": "gray"},
    )
    left.set(xlabel="z", ylim=(-0.6, 4))
    left.set_title("silu is a smooth relu that lets small negatives through")
    left.legend(loc="upper left", fontsize=9)

    g, u = torch.meshgrid(torch.linspace(-6, 4, 201), torch.linspace(-3, 3, 121), indexing="xy")
    product = F.silu(g) * u
    limit = product.abs().max().item()
    image = right.imshow(
        product,
        extent=(-6, 4, -3, 3),
        origin="lower",
        aspect="auto",
        cmap="RdBu_r",
        vmin=-limit,
        vmax=limit,
    )
    right.contour(g, u, product, levels=[-2, -1, -0.25, 0.25, 1, 2], colors="k", linewidths=0.5)
    right.set(xlabel="gate pre-activation g = (W_gate x)ᵢ", ylabel="up value u = (W_up x)ᵢ")
    right.set_title("what channel i passes on: silu(g) · u")
    fig.colorbar(image, ax=right, fraction=0.05)
    fig.tight_layout()
    show_figure(fig)


def gate_statistics(gates: dict[str, torch.Tensor], products: dict[str, torch.Tensor]) -> None:
    """Histograms of the gate pre-activations and of |silu(g) u| / the token's largest, per layer."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, gate in gates.items():
        left.hist(
            gate.flatten().float().cpu(),
            bins=200,
            range=(-8, 4),
            density=True,
            histtype="step",
            label=name,
        )
    left.axvline(0, color="gray", lw=0.5)
    left.set(xlabel="gate pre-activation g", ylabel="density")
    left.set_title("gate pre-activations on a real prompt")
    left.legend(fontsize=9)
    bins = torch.logspace(-6, 0, 61)
    for name, product in products.items():
        share = (product.abs() / product.abs().amax(-1, keepdim=True)).flatten().float().cpu()
        right.hist(share.clamp_min(1e-6), bins=bins, density=False, histtype="step", label=name)
    right.axvline(0.01, color="gray", ls="--", lw=1)
    right.text(0.012, right.get_ylim()[1] * 0.03, "1%", color="gray", fontsize=9)
    right.set_xscale("log")
    right.set(xlabel="|silu(g) · u| / the token's largest", ylabel="channels")
    right.set_title("what reaches down_proj: spread over orders of magnitude")
    right.legend(fontsize=9)
    fig.tight_layout()
    show_figure(fig)
