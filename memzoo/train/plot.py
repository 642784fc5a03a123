"""``memzoo-train plot``: loss curves of one or more runs from their ``metrics.jsonl``, drawn to a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .tracking import read_metrics

__all__ = ["plot_runs"]


def plot_runs(runs: Sequence[str | Path], out: str | Path | None = None, *,
              metrics: Sequence[str] = ("loss/train", "loss/val"), x: str = "step") -> Path:
    """Plot ``metrics`` against ``x`` for every run directory; returns the PNG path.

    Raises:
        FileNotFoundError: a run has no ``metrics.jsonl``.
        ValueError: none of the runs logged any of ``metrics``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in runs]
    for r in runs:
        if not (r / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"plot: {str(r)!r} has no metrics.jsonl")
    out = Path(out) if out is not None else (runs[0] / "loss.png" if len(runs) == 1 else Path("loss.png"))
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for run in runs:
        records = read_metrics(run)
        for metric in metrics:
            pts = [(r[x], r[metric]) for r in records if r.get(metric) is not None and r.get(x) is not None]
            if pts:
                xs, ys = zip(*pts)
                style = "--" if metric.endswith("/val") else "-"
                ax.plot(xs, ys, style, marker="o" if len(pts) < 30 else None, markersize=3,
                        label=f"{run.name} {metric}" if len(runs) > 1 else metric)
                drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"plot: no run logged any of {list(metrics)}")
    ax.set_xlabel(x)
    ax.set_ylabel("loss (nats/token)" if all(m.startswith("loss/") for m in metrics) else "value")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
