"""Plots of ``memzoo-bench memorize`` (the figures of Orhan 2023, arXiv 2303.17557, at our scale).

- recognition and recall vs exposures, one line per model and material (dashed: random strings);
- retention: recognition and recall vs updates on new items, one line per exposure count;
- in context: recognition and recall vs distractor length, one line per model and material.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plots import _pyplot, _save

__all__ = ["plot_exposures", "plot_retention", "plot_context"]

_PANELS = (("recognition", "recognition (2-AFC)", 0.5), ("recall_exact", "recall (exact match)", None),
           ("recall_token_acc", "recall (token accuracy)", None))


def _style(material: str) -> str:
    return "-" if material == "sentences" else "--"


def _finish(fig: Any, axes: Any, path: str | Path, title: str) -> Path:
    for ax in axes:
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path, _pyplot())


def _panels(axes: Any, xs: list[Any], rows: list[dict[str, Any]], style: str, label: str, xlabel: str,
            marker: str | None = "o") -> None:
    for ax, (key, title, chance) in zip(axes, _PANELS):
        ax.plot(xs, [r[key] for r in rows], style, marker=marker, label=label)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        if chance is not None:
            ax.axhline(chance, color="gray", lw=0.8, ls=":")


def plot_exposures(models: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Scores right after the study phase against the number of exposures (0 = before studying)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for model, rows in models.items():
        for material in sorted({r["material"] for r in rows}):
            pts = sorted(((r["exposures"], r) for r in rows
                          if r["material"] == material and r["phase"] in ("before", "study")), key=lambda p: p[0])
            _panels(axes, [k for k, _ in pts], [r for _, r in pts], _style(material), f"{model} / {material}",
                    "exposures per item")
    for ax in axes:
        ax.set_xscale("symlog", linthresh=1)
    return _finish(fig, axes, path, "Few-shot memories in weights: after studying (dashed: random strings)")


def plot_retention(models: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Scores against updates on new items after the study phase (update 0 = right after studying)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for model, rows in models.items():
        for material in sorted({r["material"] for r in rows}):
            for k in sorted({r["exposures"] for r in rows if r["phase"] == "study"}):
                pts = sorted(((r["update"], r) for r in rows if r["material"] == material
                              and r["exposures"] == k and r["phase"] in ("study", "retention")), key=lambda p: p[0])
                _panels(axes, [u for u, _ in pts], [r for _, r in pts], _style(material),
                        f"{model} / {material} / k={k}", "updates on new items", marker=None)
    return _finish(fig, axes, path, "Retention while training continues on new items (dashed: random strings)")


def plot_context(models: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """In-context scores against the distractor length between the study list and the probe."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for model, rows in models.items():
        for material in sorted({r["material"] for r in rows}):
            pts = sorted(((r["distractor"], r) for r in rows if r["material"] == material), key=lambda p: p[0])
            _panels(axes, [d for d, _ in pts], [r for _, r in pts], _style(material), f"{model} / {material}",
                    "distractor tokens")
    for ax in axes:
        ax.set_xscale("symlog", linthresh=16)
    return _finish(fig, axes, path, "Few-shot memories in context (dashed: random strings)")
