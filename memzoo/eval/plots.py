"""Plots of a benchmark run (matplotlib, the ``eval`` extra): what the zoology / RULER papers show.

- accuracy vs d_model, one panel per test sequence length (zoology Fig. 2);
- accuracy vs state bytes, log scale (the recall-memory tradeoff of Based, arXiv 2402.18668);
- needle depth x length heatmap and accuracy vs length (token-level NIAH).

Lines are the best learning rate of the sweep, averaged over seeds, with +-1 std error bars;
hollow markers are the best seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["make_plots", "plot_acc_vs_dmodel", "plot_acc_vs_state", "plot_niah_heatmap", "plot_acc_vs_length"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'memzoo[eval]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict[str, Any], multi_data: bool) -> str:
    return f"{row['model']} (data {row['data_index']})" if multi_data else row["model"]


def plot_acc_vs_dmodel(summary: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One panel per test length (``seq_len=<T>`` slices), one line per model, x = d_model."""
    plt = _pyplot()
    rows = [r for r in summary if r["seq_len"] is not None and "/" not in r["slice"]]
    lengths = sorted({r["seq_len"] for r in rows})
    if not lengths:
        raise ValueError("summary has no per-length slices to plot")
    multi = len({(r["data_index"], r["seq_len"]) for r in rows}) > len(lengths)
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.2 * len(lengths) + 1, 3.2), sharey=True, squeeze=False)
    for ax, T in zip(axes[0], lengths):
        lines: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["seq_len"] == T:
                lines.setdefault(_label(r, multi), []).append(r)
        for label, pts in sorted(lines.items()):
            pts.sort(key=lambda r: r["d_model"])
            x = [p["d_model"] for p in pts]
            line = ax.errorbar(x, [p["mean"] for p in pts], yerr=[p["std"] for p in pts], marker="o", capsize=3,
                               label=label)
            ax.scatter(x, [p["best"] for p in pts], facecolors="none", edgecolors=line[0].get_color(), zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["d_model"] for r in rows}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_title(f"seq_len {T}")
        ax.set_xlabel("d_model")
        _score_limits(ax, rows[0]["metric"])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(rows[0]["metric"])
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path, plt)


def plot_acc_vs_state(summary: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Overall score (``all``) vs state bytes, one series per model (each point a width / data config)."""
    plt = _pyplot()
    rows = [r for r in summary if r["slice"] == "all" and r["state_bytes"]]
    if not rows:
        raise ValueError("summary has no 'all' slice with a known state size to plot")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for model in sorted({r["model"] for r in rows}):
        pts = sorted((r for r in rows if r["model"] == model), key=lambda r: r["state_bytes"])
        ax.errorbar([p["state_bytes"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                    marker="o", capsize=3, label=model)
    ax.set_xscale("log")
    ax.set_xlabel("state bytes per sequence (4 x state_size, longest test length)")
    return _finish_score_axis(ax, rows[0]["metric"], title, fig, path, plt)


def _score_limits(ax: Any, metric: str) -> None:
    """[0, 1] for an accuracy-type metric; a loss keeps matplotlib's own limits."""
    from .tasks import higher_is_better

    if higher_is_better(metric):
        ax.set_ylim(-0.02, 1.02)


def _finish_score_axis(ax: Any, metric: str, title: str | None, fig: Any, path: str | Path, plt: Any) -> Path:
    """A score axis (in [0, 1] for an accuracy) with grid, legend and title, saved."""
    ax.set_ylabel(metric)
    _score_limits(ax, metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return _save(fig, path, plt)


def _depth_cells(summary: list[dict[str, Any]]) -> dict[tuple[str, int], dict[tuple[int, int], float]]:
    cells: dict[tuple[str, int], dict[tuple[int, int], float]] = {}
    for r in summary:
        parts = r["slice"].split("/")
        if len(parts) == 2 and parts[1].startswith("depth="):
            cells.setdefault((r["model"], r["d_model"]), {})[(int(parts[1][6:]), r["seq_len"])] = r["mean"]
    return cells


def plot_niah_heatmap(summary: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Needle depth (rows) x test length (columns) heatmap, one panel per (model, d_model)."""
    plt = _pyplot()
    cells = _depth_cells(summary)
    if not cells:
        raise ValueError("summary has no seq_len=<T>/depth=<d> slices to plot")
    fig, axes = plt.subplots(1, len(cells), figsize=(3.4 * len(cells) + 1, 3.4), squeeze=False, layout="constrained")
    for ax, ((model, d), grid) in zip(axes[0], sorted(cells.items())):
        depths = sorted({k[0] for k in grid})
        lengths = sorted({k[1] for k in grid})
        img = [[grid.get((dp, T), float("nan")) for T in lengths] for dp in depths]
        im = ax.imshow(img, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(img):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(T) for T in lengths])
        ax.set_yticks(range(len(depths)), [f"{dp}%" for dp in depths])
        ax.set_xlabel("sequence length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{model} d={d}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    return _save(fig, path, plt, tight=False)


def plot_acc_vs_length(summary: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Score vs test length (all depths), one line per (model, d_model)."""
    plt = _pyplot()
    rows = [r for r in summary if r["seq_len"] is not None and "/" not in r["slice"]]
    if not rows:
        raise ValueError("summary has no per-length slices to plot")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for model, d in sorted({(r["model"], r["d_model"]) for r in rows}):
        pts = sorted((r for r in rows if r["model"] == model and r["d_model"] == d), key=lambda r: r["seq_len"])
        ax.errorbar([p["seq_len"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                    marker="o", capsize=3, label=f"{model} d={d}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    return _finish_score_axis(ax, rows[0]["metric"], title, fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_plots(task: str, summary: list[dict[str, Any]], plot_dir: str | Path, run_id: str) -> list[Path]:
    """The plots that fit ``task``, written as ``<plot_dir>/<run_id>_<kind>.png``."""
    plot_dir = Path(plot_dir)
    paths = [plot_acc_vs_dmodel(summary, plot_dir / f"{run_id}_acc_vs_dmodel.png", title=task)]
    if any(r["slice"] == "all" and r["state_bytes"] for r in summary):
        paths.append(plot_acc_vs_state(summary, plot_dir / f"{run_id}_acc_vs_state.png", title=task))
    if task == "niah":
        paths.append(plot_niah_heatmap(summary, plot_dir / f"{run_id}_niah_heatmap.png", title=task))
        paths.append(plot_acc_vs_length(summary, plot_dir / f"{run_id}_acc_vs_length.png", title=task))
    return paths
