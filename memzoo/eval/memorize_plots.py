"""Plots of ``memzoo-bench memorize`` (the figures of Orhan 2023, arXiv 2303.17557, at our scale).

- recognition and recall vs exposures, one line per model and material (dashed: random strings);
- retention: recognition and recall vs updates on new items, one line per exposure count;
- in context: recognition and recall vs distractor length, one line per model and material.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plots import _pyplot

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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_exposures(models: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Scores right after the study phase against the number of exposures (0 = before studying)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for model, rows in models.items():
        for material in sorted({r["material"] for r in rows}):
            pts = sorted((r["exposures"], r) for r in rows
                         if r["material"] == material and r["phase"] in ("before", "study"))
            for ax, (key, label, chance) in zip(axes, _PANELS):
                ax.plot([k for k, _ in pts], [r[key] for _, r in pts], _style(material), marker="o",
                        label=f"{model} / {material}")
                ax.set_xscale("symlog", linthresh=1)
                ax.set_xlabel("exposures per item")
                ax.set_title(label)
                if chance is not None:
                    ax.axhline(chance, color="gray", lw=0.8, ls=":")
    return _finish(fig, axes, path, "Few-shot memories in weights: after studying (dashed: random strings)")


def plot_retention(models: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Scores against updates on new items after the study phase (update 0 = right after studying)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for model, rows in models.items():
        for material in sorted({r["material"] for r in rows}):
            for k in sorted({r["exposures"] for r in rows if r["phase"] == "study"}):
                pts = sorted((r["update"], r) for r in rows if r["material"] == material
                             and r["exposures"] == k and r["phase"] in ("study", "retention"))
                for ax, (key, label, chance) in zip(axes, _PANELS):
                    ax.plot([u for u, _ in pts], [r[key] for _, r in pts], _style(material),
                            label=f"{model} / {material} / k={k}")
                    ax.set_xlabel("updates on new items")
                    ax.set_title(label)
                    if chance is not None:
                        ax.axhline(chance, color="gray", lw=0.8, ls=":")
    return _finish(fig, axes, path, "Retention while training continues on new items (dashed: random strings)")


def plot_context(models: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """In-context scores against the distractor length between the study list and the probe."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for model, rows in models.items():
        for material in sorted({r["material"] for r in rows}):
            pts = sorted((r["distractor"], r) for r in rows if r["material"] == material)
            for ax, (key, label, chance) in zip(axes, _PANELS):
                ax.plot([d for d, _ in pts], [r[key] for _, r in pts], _style(material), marker="o",
                        label=f"{model} / {material}")
                ax.set_xscale("symlog", linthresh=16)
                ax.set_xlabel("distractor tokens")
                ax.set_title(label)
                if chance is not None:
                    ax.axhline(chance, color="gray", lw=0.8, ls=":")
    return _finish(fig, axes, path, "Few-shot memories in context (dashed: random strings)")
