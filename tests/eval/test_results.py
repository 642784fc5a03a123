"""Summaries (best-of-sweep, seeds), the CSV contract and the plots, from synthetic records."""

import math
import shutil
import subprocess

import pytest

from memzoo.eval.plots import plot_acc_vs_dmodel, plot_acc_vs_state, plot_niah_heatmap
from memzoo.eval.results import CSV_FIELDS, append_csv, csv_rows, slice_seq_len, summarize


def _record(model, d, lr, seed, acc, best):
    metrics = {"all": {"accuracy": acc, "exact_match": acc, "loss": 1 - acc, "n": 10}}
    for T in (64, 128):
        metrics[f"seq_len={T}"] = dict(metrics["all"])
        for depth in (0, 50, 100):
            metrics[f"seq_len={T}/depth={depth}"] = dict(metrics["all"])
    return {"model": model, "pattern": [model], "n_layers": 2, "d_model": d, "data_index": 0, "lr": lr, "seed": seed,
            "best_lr": best, "primary": "accuracy", "metrics": metrics, "params": 1000 * d,
            "state_floats": {"64": 10 * d, "128": 20 * d}, "steps": 5, "epochs_run": 1, "stopped_early": False,
            "wall_s": 1.0}


RECORDS = [_record(m, d, lr, s, acc, best) for m, base in (("a", 0.5), ("b", 0.2)) for d in (32, 64)
           for s, off in ((0, 0.0), (1, 0.2)) for lr, acc, best in ((1e-3, base + off, True), (1e-2, 0.0, False))]


def test_summary_best_of_sweep_over_seeds():
    rows = {(r["model"], r["d_model"], r["slice"]): r for r in summarize(RECORDS)}
    r = rows[("a", 32, "all")]
    assert r["mean"] == pytest.approx(0.6) and r["max"] == pytest.approx(0.7) and r["best"] == pytest.approx(0.7)
    assert r["std"] == pytest.approx(math.sqrt(0.02)) and r["n_seeds"] == 2 and r["lrs"] == [1e-3]
    assert rows[("a", 32, "seq_len=128")]["state_bytes"] == 4 * 20 * 32
    assert rows[("a", 32, "all")]["state_bytes"] == 4 * 20 * 32, "all: the longest test length"
    assert slice_seq_len("seq_len=256/depth=50") == 256 and slice_seq_len("all") is None


def test_summary_best_seed_of_a_loss_is_its_lowest():
    records = [dict(r, primary="loss") for r in RECORDS]
    r = {(r["model"], r["d_model"], r["slice"]): r for r in summarize(records)}[("a", 32, "all")]
    assert r["metric"] == "loss" and r["best"] == pytest.approx(0.3) and r["max"] == pytest.approx(0.5)


def test_csv_appends_and_rejects_other_headers(tmp_path):
    path = tmp_path / "r.csv"
    rows = csv_rows("run", "now", "niah", "ci", RECORDS)
    assert len(rows) == len(RECORDS) * 9
    append_csv(path, rows)
    append_csv(path, rows)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(CSV_FIELDS) and len(lines) == 1 + 2 * len(rows)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        append_csv(bad, rows)


@pytest.mark.parametrize("plot", [plot_acc_vs_dmodel, plot_acc_vs_state, plot_niah_heatmap])
def test_plots_are_written(tmp_path, plot):
    path = plot(summarize(RECORDS), tmp_path / "p.png", title="t")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000


def test_plots_refuse_empty_input(tmp_path):
    with pytest.raises(ValueError, match="depth"):
        plot_niah_heatmap([r for r in summarize(RECORDS) if "depth" not in r["slice"]], tmp_path / "p.png")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_tree_dirty_counts_changed_tracked_files_not_untracked_ones(tmp_path):
    from memzoo.eval.results import tree_dirty

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    assert tree_dirty(tmp_path) is None  # not a git tree
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "code")
    assert tree_dirty(tmp_path) is False
    (tmp_path / "run.json").write_text("{}\n")  # a run's own result file
    assert tree_dirty(tmp_path) is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert tree_dirty(tmp_path) is True
