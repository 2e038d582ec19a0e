"""Plots of expert profiles (needs the ``plot`` extra: matplotlib). Each function returns the Figure.

Usable in notebooks (the figure displays itself) and from the CLI (``residency profile --plot DIR``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .profile import Profile


def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'residency[plot]'") from exc
    return plt


def mass_heatmap(profile: Profile, by: str = "gate_mass", sort: bool = False, title: str | None = None):
    """MoE layer × expert heatmap of each expert's share of its layer's ``by`` mass.

    ``sort=True`` orders each layer's experts by share (hot experts left), which shows how
    concentrated routing is; unsorted keeps expert ids on the x axis.
    """
    plt = _plt()
    values = profile._metric(by)
    share = values / values.sum(-1, keepdim=True).clamp(min=1e-30)
    if sort:
        share = share.sort(dim=-1, descending=True).values
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.22 * profile.num_moe_layers + 1.5)))
    image = ax.imshow(share.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert rank" if sort else "expert id")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or f"share of {by.replace('_', ' ')} per layer ({profile.tokens} tokens)")
    fig.colorbar(image, ax=ax, label="share of layer mass")
    fig.tight_layout()
    return fig


def coverage_curves(profiles: Profile | Sequence[Profile], labels: Sequence[str] | None = None,
                    by: str = "gate_mass"):
    """Fraction of mass covered by the top-n experts, averaged over layers (band: min-max over layers)."""
    plt = _plt()
    profiles = [profiles] if isinstance(profiles, Profile) else list(profiles)
    labels = list(labels) if labels is not None else [f"profile {i}" for i in range(len(profiles))]
    fig, ax = plt.subplots(figsize=(6, 4))
    for profile, label in zip(profiles, labels):
        v = profile._metric(by)
        curve = v.sort(dim=-1, descending=True).values.cumsum(-1) / v.sum(-1, keepdim=True).clamp(min=1e-30)
        x = torch.arange(1, curve.shape[1] + 1).numpy()
        ax.plot(x, curve.mean(0).numpy(), label=label)
        ax.fill_between(x, curve.min(0).values.numpy(), curve.max(0).values.numpy(), alpha=0.2)
    ax.plot([0, profiles[0].num_experts], [0, 1], "k:", linewidth=0.8, label="uniform")
    for level in (0.5, 0.8, 0.9, 0.95):
        ax.axhline(level, color="grey", linewidth=0.5)
    ax.set_xlabel("experts kept per layer (hottest first)")
    ax.set_ylabel(f"share of {by.replace('_', ' ')} covered")
    ax.set_ylim(0, 1.01)
    ax.legend()
    fig.tight_layout()
    return fig


def prompt_jaccard(profile: Profile, top_n: int | None = None):
    """Per-prompt similarity: mean over layers of the Jaccard of each prompt pair's top-n expert sets."""
    plt = _plt()
    matrix = profile.prompt_jaccard(top_n)
    side = 0.35 * profile.num_prompts
    fig, ax = plt.subplots(figsize=(max(4, side + 2), max(3.5, side + 1.5)))
    image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(profile.num_prompts), profile.prompt_names, rotation=90, fontsize=7)
    ax.set_yticks(range(profile.num_prompts), profile.prompt_names, fontsize=7)
    ax.set_title(f"top-{top_n or profile.top_k} Jaccard between prompts")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def save_all(profile: Profile, folder: str | Path) -> list[Path]:
    """Write the heatmap, coverage curves and prompt-Jaccard matrix as PNGs; returns their paths."""
    plt = _plt()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "mass_heatmap.png": mass_heatmap(profile),
        "mass_heatmap_sorted.png": mass_heatmap(profile, sort=True),
        "coverage.png": coverage_curves(profile, ["profile"]),
        "prompt_jaccard.png": prompt_jaccard(profile),
    }
    paths = []
    for name, fig in figures.items():
        path = folder / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
