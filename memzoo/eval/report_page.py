"""The results page of ``memzoo-bench report``: tables and plots built from the stored run JSONs only.

Every number on the page is a mean (and sample standard deviation) over the seeds whose JSON exists; a row with
no finished run says "pending" and a row with some seeds missing says how many ran.  Each table names the folder
and the file stems its numbers come from, and each row states what the paper reports and whether the small-scale
result agrees, or why the claim cannot be tested at this size.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .harness import load_segment, steps_per_epoch, test_segment_seeds
from .longmem_recall import ARMS as LONGMEM_ARMS
from .plots import _pyplot, _save
from .report import ROOT, Run, load_result
from .report_claims import CLAIMS as PAPER_CLAIMS
from .report_claims import Claim, seed_gap, trend_verdict
from .tasks.base import IGNORE

__all__ = ["write_page", "cell", "row_values"]

# MQAR sweeps at its first seed only; when that seed's best of the sweep trails every rerun seed (at the picked rate)
# by this much accuracy, the row says so: the rate was picked by a seed that did not learn the task at any rate.
TRAILS = 0.2

STUDY_TITLES = {"s4d_init": "S4D initialisations",
                "longmem": "LongMem: recall of facts older than the backbone's segment, bank on vs gate 0",
                "hmt": "HMT vs its backbone: held-out loss of byte-level language models"}


def _metric(payload: dict[str, Any], slice_name: str, metric: str) -> float | None:
    m = payload["record"]["metrics"].get(slice_name)
    return None if m is None else float(m[metric])


def cell(values: list[float], declared: int, digits: int = 2) -> str:
    """``mean ± sd`` over the finished seeds, with ``(k/n seeds)`` when some are missing; ``pending`` when none."""
    if not values:
        return "pending"
    text = f"{statistics.fmean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{digits}f}"
    if len(values) < declared:
        text += f" ({len(values)}/{declared} seeds)"
    return text


def row_values(results: list[dict[str, Any] | None], slice_name: str, metric: str) -> list[float]:
    vals = [_metric(p, slice_name, metric) for p in results if p is not None]
    return [v for v in vals if v is not None]


def _group(runs: list[Run], key: Callable[[Run], Any]) -> dict[Any, list[Run]]:
    groups: dict[Any, list[Run]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return groups


def _lengths(run: Run) -> list[int]:
    return [c.seq_len for c in run.data.test]


def _verdict(claim: Claim, value: float | None) -> str:
    if claim.check is None:
        return claim.untestable or "no numeric claim at this size"
    if value is None:
        return "pending"
    return "agrees" if claim.check(value) else "disagrees"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


Series = list[tuple[str, list[int], list[float | None]]]


def _length_table(runs: list[Run], res: dict[str, dict | None], label: Callable[[Run], str],
                  claim_of: Callable[[Run], Claim], label_name: str = "model",
                  compare: tuple[str, dict[str, dict | None]] | None = None) -> tuple[list[str], Series]:
    """Rows of exact match at 1x/2x/4x the training length, one per label; also the plotted series.

    ``compare``: (column name, payload per run key) of the same runs under another recipe, shown as one more
    column of exact match at 2x (left out when none of them is there)."""
    if compare is not None and not any(compare[1].get(r.key) for r in runs):
        compare = None
    rows, series = [], []
    for name, group in _group(runs, label).items():
        lens = _lengths(group[0])
        payloads = [res[r.key] for r in group]
        cells, means = [], []
        for T in lens:
            vals = row_values(payloads, f"seq_len={T}", "exact_match")
            cells.append(cell(vals, len(group)))
            means.append(statistics.fmean(vals) if vals else None)
        # Token accuracy at 1x beside exact match: a model that copies part of the passkey is told apart from one
        # at chance (1 in 10 digits).
        token_acc = cell(row_values(payloads, f"seq_len={lens[0]}", "accuracy"), len(group))
        claim = claim_of(group[0])
        two_x = means[1] if len(means) > 1 else None
        done = sum(p is not None for p in payloads)
        other = []
        if compare is not None and len(lens) > 1:
            other = [cell(row_values([compare[1].get(r.key) for r in group], f"seq_len={lens[1]}", "exact_match"),
                          len(group))]
        rows.append([f"`{name}`", str(lens[0]), *cells, token_acc, *other, f"{done}/{len(group)}", claim.paper,
                     _verdict(claim, two_x)])
        series.append((name, lens, means))
    header = [label_name, "train len", "EM 1x", "EM 2x", "EM 4x", "token acc 1x",
              *([compare[0]] if compare is not None else []), "runs", "paper reports", "agrees at 2x?"]
    return _table(header, rows), series


# Thirteen models and more share a plot: each name gets its own colour and marker, the same in every plot.
_MARKERS = "osD^v<>pP*Xhd"


def _style(name: str, names: list[str]) -> dict[str, Any]:
    """Colour and marker of ``name``: by its place in the zoo (so a model looks the same in every plot), else in
    ``names`` after the zoo; 20 colours x 13 markers before a repeat."""
    from matplotlib import colormaps

    from .report_suite import ZOO_NAMES

    order = [*ZOO_NAMES, *(n for n in names if n not in ZOO_NAMES)]
    i = order.index(name)
    return {"color": colormaps["tab20"](i % 20), "marker": _MARKERS[i % len(_MARKERS)]}


def _plot_lengths(series: Series, path: Path, title: str) -> Path | None:
    pts = [(n, [T / lens[0] for T in lens], m) for n, lens, m in series if any(v is not None for v in m)]
    if not pts:
        return None
    plt = _pyplot()
    names = [n for n, _, _ in pts]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, xs, means in pts:
        ax.plot([x for x, v in zip(xs, means) if v is not None], [v for v in means if v is not None], "-",
                label=name, **_style(name, names))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test length / train length")
    ax.set_ylabel("exact match (mean over seeds)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path, plt)


# One point of the MQAR plot: model, (T, kv), state floats, mean and sd of the best-of-sweep accuracy over seeds.
StatePoint = tuple[str, tuple[int, int], float, float, float]


def _plot_state(points: list[StatePoint], path: Path, title: str) -> Path | None:
    """Zoology's "memory vs recall" plot: one panel per (T, kv); each model a line through its widths, x its state
    size, y its accuracy (error bars: sd over seeds, clipped to [0, 1])."""
    if not points:
        return None
    return _save(_state_figure(points, title), path, _pyplot(), tight=False)


def _state_figure(points: list[StatePoint], title: str) -> Any:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    cells = sorted({p[1] for p in points})
    names = list(dict.fromkeys(p[0] for p in points))
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells) + 1.8, 4), sharey=True, squeeze=False)
    for ax, (T, kv) in zip(axes[0], cells):
        for name in names:
            pts = sorted((x, m, s) for n, c, x, m, s in points if n == name and c == (T, kv))
            if pts:
                # sd over seeds, clipped to the range an accuracy can take.
                yerr = [[min(s, m) for _, m, s in pts], [min(s, 1 - m) for _, m, s in pts]]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=yerr, linestyle="-", capsize=2,
                            label=name, **_style(name, names))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("state size (floats per sequence)")
        ax.set_title(f"T {T}, {kv} key-value pairs", fontsize=9)
        ax.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("MQAR accuracy (best of sweep)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        more = [(h, lab) for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in labels]
        handles += [h for h, _ in more]
        labels += [lab for _, lab in more]
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    return fig


def _img(page: Path, png: Path | None, alt: str) -> list[str]:
    if png is None:
        return [f"*({alt}: no finished runs yet.)*", ""]
    return [f"![{alt}]({png.relative_to(page.parent).as_posix()})", ""]


def _mqar_section(runs: list[Run], res: dict[str, dict | None], page: Path, img: Path, preset: str,
                  claim_of: Callable[..., Claim]) -> list[str]:
    groups = _group(runs, lambda r: (r.labels["model"], r.d_model, r.labels["T"], r.labels["kv"]))
    cells = tuple(dict.fromkeys((d, T, kv) for _, d, T, kv in groups))
    # Best of the learning-rate sweep per seed (zoology's reported number), for the seeds whose runs all finished.
    # A seed that reruns the sweep's best rate (``lr_from``) has one run, which is its best.
    best: dict[tuple, dict[int, tuple[float, float]]] = {}
    complete: dict[tuple, dict[int, float]] = {}
    for key, group in groups.items():
        best[key] = {}
        for r in group:
            p = res[r.key]
            if p is not None:
                acc = _metric(p, "all", "accuracy")
                if r.seed not in best[key] or acc > best[key][r.seed][0]:
                    best[key][r.seed] = (acc, p["config"]["lr"])
        complete[key] = {s: v[0] for s, v in best[key].items()
                         if all(res[r.key] is not None for r in group if r.seed == s)}
    # Each cell's training budget: rows trained for other epochs are not compared by the trends.
    budget = {key: f"{group[0].train.epochs} epochs" for key, group in groups.items()}
    rows: list[list[str]] = []
    points: list[StatePoint] = []
    # The overview: one row per model, one column per (width, T, kv) cell, best-of-sweep accuracy.
    overview: dict[str, dict[tuple[int, int, int], str]] = {}
    for (name, d, T, kv), group in groups.items():
        key, seeds = (name, d, T, kv), {r.seed for r in group}
        vals, sweep_seed = list(complete[key].values()), min(seeds)
        best_lr = f"{best[key][sweep_seed][1]:g}" if sweep_seed in complete[key] else "pending"
        reruns = [v for s, v in complete[key].items() if s != sweep_seed]
        if sweep_seed in complete[key] and reruns:
            trails = min(reruns) - complete[key][sweep_seed]
            if trails >= TRAILS:  # the rate was picked by a seed that did worse at every rate than the others at it
                best_lr += f" (sweep seed {trails:.2f} below its reruns)"
        per_seed = " / ".join(f"{complete[key][s]:.2f}" if s in complete[key] else "pending" for s in sorted(seeds))
        claim = claim_of(name, d, T, kv, cells)
        value = statistics.fmean(vals) if vals else None
        if claim.trends:
            tested = [trend_verdict(t, vals, list(complete.get((name, *t.versus), {}).values()),
                                    (budget[key], budget.get((name, *t.versus), budget[key])))
                      for t in claim.trends]
            versus, verdict = "; ".join(v for v, _ in tested), "; ".join(v for _, v in tested)
        else:
            versus, verdict = "", _verdict(claim, value)
        done = sum(res[r.key] is not None for r in group)
        rows.append([f"`{name}`", str(d), f"{T} ({kv})", best_lr, cell(vals, len(seeds)), per_seed,
                     f"{done}/{len(group)}",
                     claim.paper, versus, verdict])
        overview.setdefault(name, {})[(d, T, kv)] = cell(vals, len(seeds))
        if value is not None:
            state = next(res[r.key]["record"]["state_floats"].get(str(T)) for r in group if res[r.key] is not None)
            if state:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                points.append((name, (T, kv), float(state), value, sd))
    png = _plot_state(points, img / f"results-{preset}-mqar-state.png", f"MQAR: recall vs state ({preset})")
    header = ["model", "d_model", "T (kv)", "best LR", "accuracy, best LR", "per seed (first: the sweep)", "runs",
              "paper reports",
              "vs the neighbouring cell", "agrees?"]
    summary = _table(["model", *(f"d {d}, T {T} ({kv})" for d, T, kv in cells)],
                     [[f"`{name}`", *(row.get(c, "") for c in cells)] for name, row in overview.items()])
    return [*summary, "", *_img(page, png, "MQAR accuracy vs state size"),
            "<details><summary>Per cell: the sweep's best rate, the runs, the paper's claim and the verdict</summary>",
            "", *_table(header, rows), "", "</details>", ""]


def answer_in_view(inputs: Any, labels: Any, span: int, context: int) -> tuple[int, int]:
    """(scored positions whose answer token sits in the first ``context`` positions (MQAR's key-value pairs) and
    among the last ``span`` input tokens up to and including them, scored positions): the queries a model that looks
    only ``span`` tokens back can copy its answer for.  A filler token that equals the answer by chance is no source."""
    sources = torch.where(torch.arange(inputs.shape[1]) < context, inputs, -1)  # -1: no source
    views = torch.nn.functional.pad(sources, (span - 1, 0), value=-1).unfold(1, span, 1)  # [N, T, span]
    scored = labels != IGNORE
    return int(((views == labels[..., None]).any(-1) & scored).sum()), int(scored.sum())


def _windows(runs: list[Run]) -> list[int]:
    """The attention windows and segments of the MQAR models (``window`` / ``segment_len`` options)."""
    spans = {opts[k] for r in runs for opts in (r.spec.mixers or {}).values() for k in ("window", "segment_len")
             if opts.get(k)}
    return sorted(spans)


def _mqar_reach(runs: list[Run]) -> str:
    """A sentence giving, per window and (T, kv) cell, the share of test queries whose value lies within the window:
    about what a model reaches that looks its answers up only in that window."""
    spans = _windows(runs)
    if not spans:
        return ""
    cells = {(r.labels["T"], r.labels["kv"]): r.data for r in runs}  # one test set per cell, whatever the seed
    tests = {cell: [(c, load_segment(c, seed)) for c, seed in zip(data.test, test_segment_seeds(data))]
             for cell, data in cells.items()}
    shares = []
    for span in spans:
        parts = []
        for (T, kv), sets in tests.items():
            hit, total = (sum(x) for x in zip(*(answer_in_view(d.inputs, d.labels, span, c.context_len)
                                                for c, d in sets)))
            parts.append(f"{hit / total:.2f} at T {T} ({kv})")
        shares.append(f"within the last {span} tokens is {', '.join(parts)}")
    return (f" Of the test queries, the share whose value lies {'; '.join(shares)}: a model that looks its answers "
            "up only within such a window (`swa`; the attention of MAG, MAL and HMT's backbone; MAC's segment sees "
            "less) scores about that, and more only through a memory or state.")


def _budget(run: Run) -> str:
    """A run's training budget in words: examples, epochs and optimizer steps."""
    n, epochs = sum(c.num_examples for c in run.data.train), run.train.epochs
    return f"{n:,} training examples for {epochs} epochs ({steps_per_epoch(run.data, run.train) * epochs:,} steps)"


def _mqar_budget(runs: list[Run]) -> str:
    """What the training budget of ``runs`` means for reading the MQAR rows."""
    budgets: dict[int, str] = {}  # sequence length -> budget, in the grid's order
    for r in runs:
        budgets.setdefault(r.labels["T"], _budget(r))
    parts = [f"{budget} at T {T}" for T, budget in budgets.items()]
    return ("The budget is " + "; ".join(parts) + " (zoology: 12,500 steps at T 64). The learning rate follows a "
            "cosine over the run, so the epochs also set how long it stays near its peak: in the cpu preset, under "
            "8 epochs at T 128 even attention stayed at chance at every rate, and under 24 it learned within 5; at "
            "T 64, 24 epochs took titans_mlp from 0.15 to 0.94 (`benchmarks/results/report/archive/`, the two epochs "
            "probes and the 8-epoch T 64 runs). The trends compare cells of one budget only; a row whose "
            "neighbouring cell trained for other epochs says \"not comparable\". A model that does not find the "
            "recall mechanism early in it starts to memorise the training set: in the `curve` of such runs (the "
            "archived 8-epoch lr 5e-4 sweeps of gated_delta at d 64, mom and titans_mlp at d 128) the training loss "
            "keeps falling while the held-out loss climbs back to chance (ln of the vocabulary). So rows that stay low "
            "measure how fast a model learns recall as much as what its state can hold; "
            "`benchmarks/results/report/archive/` records a larger training set tried at the same step count, and why "
            "it was not kept.")


def _niah_budget(runs: list[Run]) -> str:
    """The needle study's training budget, read from its runs (one budget for every model), and its clipping."""
    parts = list(dict.fromkeys(f"{_budget(r)} at peak rate {r.lr:g}" + _clipping(r) for r in runs))
    rates = " (one rate for all, no sweep). " if len(parts) == 1 else " (no sweep). "
    text = ("Every model trains on " + "; ".join(parts) + rates
            + "That budget limits the slow learners: `benchmarks/niah_budget.py` retrains a row with more examples, "
            "epochs, another rate or other clipping, and its runs and what they show are in "
            "`benchmarks/results/niah-budget/`.")
    if any(r.train.grad_clip is not None for r in runs):
        text += (" Clipping moves some rows at this budget, in both directions: column `EM 2x unclipped` gives each "
                 "row under the study's former recipe, the same runs without clipping (kept in "
                 "`benchmarks/results/report/archive/niah-unclipped/`).")
    return text


def _unclipped(runs: list[Run], results_dir: Path) -> dict[str, dict | None]:
    """The stored unclipped twin of each clipped run: ``<key>.json`` in ``../archive/niah-unclipped/`` beside
    ``results_dir``, counted only when its config is the run's own with no clipping (``load_result``)."""
    archive = Path(results_dir).parent / "archive" / "niah-unclipped"
    if not archive.is_dir():
        return {}
    return {r.key: load_result(archive, dataclasses.replace(r, train=dataclasses.replace(r.train, grad_clip=None)))
            for r in runs if r.train is not None and r.train.grad_clip is not None}


def _clipping(run: Run) -> str:
    return "" if run.train.grad_clip is None else f", gradient norm clipped at {run.train.grad_clip:g}"


def _hmt_section(runs: list[Run], res: dict[str, dict | None], claim_of: Callable[[str], Claim]) -> list[str]:
    """Held-out loss per model (nats per byte, and bits per byte), each wrapped model against its bare backbone."""
    groups = _group(runs, lambda r: r.labels["model"])
    losses = {name: row_values([res[r.key] for r in group], "all", "loss") for name, group in groups.items()}
    base = next((name for name, group in groups.items() if group[0].spec.wrapper is None), None)
    rows = []
    for name, group in groups.items():
        vals, claim = losses[name], claim_of(name)
        gap, versus = None, "baseline"
        if name != base:
            gap = seed_gap(vals, losses.get(base, []), "loss")
            versus = "needs 2+ seeds of both" if gap is None else (
                f"{statistics.fmean(vals) - statistics.fmean(losses[base]):+.3f} ({gap:.1f} x spread)")
        done = sum(res[r.key] is not None for r in group)
        rows.append([f"`{name}`", cell(vals, len(group), 3), cell([v / math.log(2) for v in vals], len(group), 3),
                     versus, f"{done}/{len(group)}", claim.paper, _verdict(claim, gap)])
    header = ["model", "held-out nats/byte", "bits/byte", "vs backbone (nats)", "runs", "paper reports", "agrees?"]
    return _table(header, rows)


def _s4d_section(runs: list[Run], res: dict[str, dict | None], claim_of: Callable[[str], Claim]) -> list[str]:
    """Accuracy per initialisation, and the ordering the claim is about: each complex init's largest distance to
    another complex init, and Real's margin below the nearest complex init in units of the larger spread."""
    groups = _group(runs, lambda r: r.labels["model"])
    acc = {name: row_values([res[r.key] for r in group], "all", "accuracy") for name, group in groups.items()}
    real = "s4d-real"
    complex_inits = [n for n in groups if n != real]
    rows = []
    for name, group in groups.items():
        vals, value, versus = acc[name], None, "pending"
        if name == real:
            gaps = [seed_gap(acc[c], vals, "accuracy") for c in complex_inits]
            if all(g is not None for g in gaps):
                value = min(gaps)
                margin = min(statistics.fmean(acc[c]) for c in complex_inits) - statistics.fmean(vals)
                versus = f"{margin:.3f} below the lowest complex init ({value:.1f} x spread)"
            elif vals:
                versus = "needs 2+ seeds of every init"
        else:
            others = [statistics.fmean(acc[c]) for c in complex_inits if c != name and acc[c]]
            if vals and len(others) == len(complex_inits) - 1:
                value = max(abs(statistics.fmean(vals) - o) for o in others)
                versus = f"at most {value:.3f} from the other complex inits"
        done = sum(res[r.key] is not None for r in group)
        claim = claim_of(name)
        rows.append([f"`{name}`", cell(vals, len(group), 3), versus, f"{done}/{len(group)}", claim.paper,
                     _verdict(claim, value)])
    return _table(["model", "accuracy", "ordering", "runs", "paper reports", "agrees?"], rows)


def _longmem_section(runs: list[Run], res: dict[str, dict | None], claim_of: Callable[[str], Claim]) -> list[str]:
    """Held-out query accuracy and loss per arm of the LongMem runs (one run per seed holds every arm), chance, and
    the bank's margin over the gate-0 arm in units of the larger spread over seeds."""
    payloads = [res[r.key] for r in runs]
    done = f"{sum(p is not None for p in payloads)}/{len(runs)}"
    acc = {name: row_values(payloads, name, "accuracy") for name in LONGMEM_ARMS}
    gap = seed_gap(acc["longmem-on"], acc["longmem-off"], "accuracy")
    rows = []
    for name in LONGMEM_ARMS:
        claim, versus, value = claim_of(name), "", None
        if name == "longmem-on":
            value = gap
            versus = "needs 2+ seeds" if gap is None else (
                f"{statistics.fmean(acc[name]) - statistics.fmean(acc['longmem-off']):+.3f} ({gap:.1f} x spread)")
        rows.append([f"`{name}`", cell(acc[name], len(runs), 3), cell(row_values(payloads, name, "loss"), len(runs), 3),
                     versus, done, claim.paper, _verdict(claim, value)])
    n_values = runs[0].experiment.n_values
    rows.append([f"chance (1 / {n_values} values)", f"{1 / n_values:.3f}", f"{math.log(n_values):.3f}", "", "", "",
                 ""])
    header = ["arm", "query accuracy", "query loss", "on vs gate 0 (accuracy)", "runs", "paper reports", "agrees?"]
    return _table(header, rows)


def _work(run: Run) -> float:
    """A run's training work in tokens x width (what the estimate of a pending run scales by); a ``RUN_KINDS``
    experiment counts as one unit (its study's runs differ only in the seed)."""
    if run.experiment is not None:
        return 1.0
    tokens = sum(getattr(c, "num_examples", 1) * (getattr(c, "input_seq_len", None) or getattr(c, "seq_len", 1))
                 for c in run.data.train)
    return float(tokens * run.train.epochs * run.d_model)


def _model(run: Run) -> str:
    return run.spec.name if run.spec is not None else run.task


def _progress_row(study: str, runs: list[Run], payloads: list[dict[str, Any] | None]) -> str:
    """Finished runs, their mean CPU time, and the pending runs' CPU time estimated from the finished runs of the
    same model (of the whole study where a model has none), scaled by tokens x width."""
    done = [(r, p) for r, p in zip(runs, payloads) if p is not None]
    if not done:
        return f"| {study} | 0/{len(runs)} | not measured yet | not measured yet |"
    rate = {}  # CPU seconds per unit of work, by model and for the whole study
    for key in {_model(r) for r, _ in done} | {None}:
        same = [p["cpu_s"] / _work(r) for r, p in done if key is None or _model(r) == key]
        rate[key] = statistics.fmean(same)
    pending = sum(rate.get(_model(r), rate[None]) * _work(r) for r, p in zip(runs, payloads) if p is None)
    mean = statistics.fmean(p["cpu_s"] for _, p in done) / 60
    return f"| {study} | {len(done)}/{len(runs)} | {mean:.1f} | {pending / 3600:.1f} |"


def _claims(smoke: bool) -> dict[str, Callable[..., Claim]]:
    """The claim functions; for a smoke preset every verdict becomes "not tested"."""
    if not smoke:
        return PAPER_CLAIMS

    def untested(fn: Callable[..., Claim]) -> Callable[..., Claim]:
        return lambda *a: Claim(fn(*a).paper, None, "not tested (smoke preset)")

    return {k: untested(fn) for k, fn in PAPER_CLAIMS.items()}


def _section(title: str, intro: str, folder: str, stems: str, body: list[str]) -> list[str]:
    return [f"## {title}", "", intro, "", f"Run files: `{folder}/{stems}.json`.", "", *body, ""]


def write_page(preset: str, runs: list[Run], results_dir: str | Path, page: str | Path) -> Path:
    """Write the page for ``runs`` (one preset) from the JSONs in ``results_dir``; plots go to ``<page dir>/img``."""
    from .report_suite import PRESETS

    claims = _claims(not PRESETS[preset].tests_claims)
    page, results_dir = Path(page), Path(results_dir)
    img = page.parent / "img"
    by_key = {r.key: r for r in runs}
    res = {r.key: load_result(results_dir, r, by_key) for r in runs}
    done = [p for p in res.values() if p is not None]
    try:
        folder = results_dir.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        folder = str(results_dir)
    cpu_h = sum(p["cpu_s"] for p in done) / 3600
    commits = sorted({(p["environment"].get("git_commit") or "?")[:10]
                      + (" (uncommitted changes)" if p["environment"].get("git_dirty") else "") for p in done})
    machines = sorted({f"{p['environment'].get('device_name')} x{p['environment'].get('cpu_count')}" for p in done})
    compiled = sum(bool(p["environment"].get("torch_compile")) for p in done)
    by_study = _group(runs, lambda r: r.study)
    lines = [
        "# Results: the papers' claims at small scale",
        "",
        f"Written by `memzoo-bench report --preset {preset}` from the run files in `{folder}/` (one JSON per run: "
        "config, seed, git commit, machine, CPU time and the harness record). "
        f"**{len(done)} of {len(runs)} declared runs have finished**; the others are shown as *pending* (their "
        "results are never guessed). Rerunning the command trains only the missing runs.",
        "",
        f"CPU time of the finished runs: {cpu_h:.2f} h. Commits: {', '.join(commits) or 'none'}. "
        f"Machines: {', '.join(machines) or 'none'}."
        + (f" {compiled} of the runs trained through `torch.compile` (`--compile`; the same model, data and steps, "
           "fused kernels)." if compiled else ""),
        "",
        "| study | runs finished | CPU min per finished run | pending runs, CPU h (estimate) |",
        "|---|---|---|---|",
        *[_progress_row(s, g, [res[r.key] for r in g]) for s, g in by_study.items()],
        "",
        "A pending run's CPU time is estimated from the finished runs of the same model, scaled by training tokens "
        "x width: a rough guide (a step's cost grows faster than the width on a CPU; early stopping cuts runs short).",
        "",
        "Numbers are means ± sample standard deviation over seeds. EM = exact match of the whole passkey.",
        "",
    ]
    if "mac" in by_study:
        table, series = _length_table(by_study["mac"], res, lambda r: r.labels["variant"],
                                      lambda r: claims["mac"](r.labels["variant"]), "MAC variant")
        png = _plot_lengths(series, img / f"results-{preset}-mac.png", f"Titans MAC variants, passkey ({preset})")
        lines += _section("Titans MAC: cross-segment passkey recall",
                          "One change at a time from the paper's MAC layer (section 4.1): `paper` writes the memory "
                          "with the bare attention output (eq. 24 read literally, `memory_input=\"attention\"`), "
                          "`residual` with x + y (the default); `control-mag` is a MAG layer on the same task. "
                          "Training sequences are two segments, so the needle is one to seven segments back. "
                          "The experiments and what they show: [titans.md](titans.md).", folder,
                          "mac-<variant>-s<seed>",
                          [*table, "", *_img(page, png, "MAC variants: exact match vs length")])
    if "niah" in by_study:
        table, series = _length_table(by_study["niah"], res, lambda r: r.labels["model"],
                                      lambda r: claims["niah"](r.labels["model"]),
                                      compare=("EM 2x unclipped", _unclipped(by_study["niah"], results_dir)))
        png = _plot_lengths(series, img / f"results-{preset}-niah.png", f"Passkey vs length ({preset})")
        lines += _section("Needle (passkey) at 1x, 2x and 4x the training length",
                          "Token-level passkey (`memzoo.eval.tasks.niah`, vocabulary 64), trained at one length with "
                          "random depths, tested at five depths per length. Windows and segments are set so that "
                          "the needle is out of local reach at 2x. HMT over a windowed backbone is row `hmt_swa`, "
                          "its backbone alone is `swa` (its language-modelling claim is the `hmt` study). EM needs "
                          "all four value digits right; token acc is the share of them right at 1x (chance 0.1), "
                          "which tells a model that copies part of the passkey from one that learned nothing. "
                          + _niah_budget(by_study["niah"]) + " At this budget several rows vary widely between "
                          "seeds.",
                          folder, "niah-<model>-d<d>-s<seed>",
                          [*table, "", *_img(page, png, "passkey exact match vs length")])
    if "mqar" in by_study:
        lines += _section("MQAR: zoology Fig. 2 scaled to the CPU",
                          "Zoology's protocol (2 layers, no MLP, AdamW, cosine, early stop at 0.99; best of a "
                          "learning-rate sweep) at the widths and (T, kv) pairs of this preset. The sweep runs at "
                          "the first seed; the other seeds rerun its best rate. The overview gives each model's "
                          "best-of-sweep accuracy per cell; the table under the plot adds the best rate, the runs "
                          "and the verdicts. Attention is held to zoology's ~1.00 in every cell; every other model "
                          "to zoology's two trends for fixed-state models, each against a neighbouring cell of the "
                          "same model: higher than at the next smaller width (same T, kv), lower than at the "
                          "previous (T, kv) (same width). A trend agrees when the two means differ in the claimed "
                          "direction by more than the larger standard deviation over seeds. "
                          + _mqar_budget(by_study["mqar"]) + _mqar_reach(by_study["mqar"])
                          + " Cells run left to right, so a partly run preset has "
                          "its first cells complete.", folder,
                          "mqar-<model>-d<d>-T<T>-kv<kv>-{lr<lr>,best}-s<seed>",
                          _mqar_section(by_study["mqar"], res, page, img, preset, claims["mqar"]))
    # Studies whose table compares rows with each other: (table builder, file stems).
    compared = {"hmt": (_hmt_section, "hmt-<model>-s<seed>"), "s4d_init": (_s4d_section, "s4d_init-<model>-s<seed>"),
                "longmem": (_longmem_section, "longmem-recall-s<seed>")}
    for study, (table_of, stems) in compared.items():
        if study in by_study:
            lines += _section(STUDY_TITLES[study], " ".join((PAPER_CLAIMS[study].__doc__ or "").split()), folder,
                              stems, table_of(by_study[study], res, claims[study]))
    unpaged = [study for study in by_study if study not in ("mac", "niah", "mqar", *compared)]
    if unpaged:
        raise ValueError(f"write_page has no table for the studies {unpaged}: add a section for each")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page
