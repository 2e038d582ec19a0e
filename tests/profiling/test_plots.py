"""Plots render and the CLI writes PNG files."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from residency.profiling import plots  # noqa: E402


def test_figures_and_pngs(tiny_model, tmp_path):
    profile = tiny_model.profile([[1, 40, 41, 42], [1, 60, 61], [1, 9, 9, 9, 9]])
    fig = plots.mass_heatmap(profile, sort=True)
    assert fig.axes[0].images[0].get_array().shape == (profile.num_moe_layers, profile.num_experts)
    fig = plots.coverage_curves([profile, profile.select([0])], ["all", "first"])
    assert len(fig.axes[0].lines) >= 3
    fig = plots.prompt_jaccard(profile)
    assert fig.axes[0].images[0].get_array().shape == (3, 3)
    paths = plots.save_all(profile, tmp_path / "plots")
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
