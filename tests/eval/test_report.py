"""``memzoo-bench report``: the tiny suite runs into a folder, writes traceable JSONs and a page, and resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from memzoo.eval.cli import main as bench_main
from memzoo.eval.harness import train_one
from memzoo.eval.longmem_recall import ARMS as LONGMEM_ARMS
from memzoo.eval.longmem_recall import arm_metrics
from memzoo.eval.report import Run, _claim, load_result, run_path, run_suite
from memzoo.eval.report_claims import hmt_claim, longmem_claim, seed_gap
from memzoo.eval.report_page import _length_table, _longmem_section, _progress_row, _verdict, cell
from memzoo.eval.report_suite import PRESETS, STUDIES, build_suite


def _report(tmp_path, *extra: str) -> int:
    return bench_main(["report", "--preset", "tiny", "--out", str(tmp_path), "--no-progress", *extra])


def test_tiny_suite_writes_json_page_and_resumes(tmp_path, capsys):
    runs = [r for r in build_suite("tiny") if r.study == "mac"]
    assert _report(tmp_path, "--only", "mac", "--max-runs", "2") == 0
    first = [r for r in runs if run_path(tmp_path, r).exists()]
    assert [r.key for r in first] == [r.key for r in runs[:2]]
    payload = json.loads(run_path(tmp_path, first[0]).read_text())
    # Traceable: config (with the seed), commit, machine, CPU time and the harness record.
    assert payload["config"]["seed"] == first[0].seed and payload["config"]["model"]["mixers"]["titans_mac"]
    assert len(payload["environment"]["git_commit"] or "") in (0, 40)
    assert payload["environment"]["cpu_count"] >= 1 and payload["cpu_s"] >= 0
    assert set(payload["record"]["metrics"]) >= {"all", "seq_len=16", "seq_len=32", "seq_len=64"}
    page = (tmp_path / "results.md").read_text()
    assert f"**2 of {len(build_suite('tiny'))} declared runs have finished**" in page
    assert "| `paper` | 16 |" in page and "not tested (smoke preset)" in page
    # Rows with no finished run say so instead of showing a number.
    assert "| `paper-np16` | 16 | pending | pending | pending | pending | 0/1 |" in page
    assert "| `attention` | 24 | pending | pending | pending | pending | 0/1 |" in page
    assert (tmp_path / "img" / "results-tiny-mac.png").stat().st_size > 1000

    # Resumption: the finished runs are skipped (their files untouched), the next pending one runs.
    stamps = {r.key: run_path(tmp_path, r).stat().st_mtime_ns for r in first}
    capsys.readouterr()
    assert _report(tmp_path, "--only", "mac", "--max-runs", "1") == 0
    out = capsys.readouterr().out
    assert f"{len(runs)} runs selected, 2 already done, {len(runs) - 2} to run" in out and "ran 1, skipped 2" in out
    assert {r.key: run_path(tmp_path, r).stat().st_mtime_ns for r in first} == stamps
    assert run_path(tmp_path, runs[2]).exists() and not run_path(tmp_path, runs[3]).exists()
    assert json.loads(run_path(tmp_path, runs[2]).read_text())["resolved"]["model"]["pattern"]
    assert f"**3 of {len(build_suite('tiny'))} declared runs have finished**" in (tmp_path / "results.md").read_text()


def test_a_stored_run_with_another_config_is_not_reused(tmp_path):
    run = build_suite("tiny")[0]
    path = run_path(tmp_path, run)
    path.write_text(json.dumps({"config": {**run.config(), "lr": 123.0}}))
    assert load_result(tmp_path, run) is None
    path.write_text(json.dumps({"config": run.config()}))
    assert load_result(tmp_path, run) is not None
    # A field added to the config later with a None default does not orphan the runs stored before it.
    older = run.config()
    older["model"] = {k: v for k, v in older["model"].items() if v is not None}
    path.write_text(json.dumps({"config": older}))
    assert load_result(tmp_path, run) is not None
    # So does an option renamed since (the old name is still accepted): MAC's segment is now segment_len.
    mac = next(r for r in build_suite("tiny") if r.key == "mac-paper-s0")
    renamed = mac.config()
    opts = renamed["model"]["mixers"]["titans_mac"]
    opts["segment"] = opts.pop("segment_len")
    run_path(tmp_path, mac).write_text(json.dumps({"config": renamed}))
    assert load_result(tmp_path, mac) is not None
    opts["segment"] += 1
    run_path(tmp_path, mac).write_text(json.dumps({"config": renamed}))
    assert load_result(tmp_path, mac) is None
    path.write_text("{not json")
    assert load_result(tmp_path, run) is None


def test_a_stored_run_whose_defaults_changed_since_runs_again(tmp_path):
    from memzoo.eval.report import resolved_config

    run = next(r for r in build_suite("tiny") if r.key.startswith("mqar-titans_mlp"))
    path = run_path(tmp_path, run)
    resolved = resolved_config(run)
    assert resolved["model"]["mixers"]["titans"]["theta_max"] == 1.0  # a default, not an option the suite sets
    path.write_text(json.dumps({"config": run.config(), "resolved": resolved}))
    assert load_result(tmp_path, run) is not None
    # Trained when theta_max defaulted to something else: the config still matches, the model does not.
    then = json.loads(json.dumps(resolved))
    then["model"]["mixers"]["titans"]["theta_max"] = 0.5
    path.write_text(json.dumps({"config": run.config(), "resolved": then}))
    assert load_result(tmp_path, run) is None
    then["model"]["init_std"] = 0.01  # so does a model-level default
    then["model"]["mixers"]["titans"]["theta_max"] = 1.0
    path.write_text(json.dumps({"config": run.config(), "resolved": then}))
    assert load_result(tmp_path, run) is None
    # An option added since the run was stored is taken at its default, which keeps the old behaviour.
    then = json.loads(json.dumps(resolved))
    del then["model"]["mixers"]["titans"]["theta_max"], then["model"]["ffn_opts"]
    path.write_text(json.dumps({"config": run.config(), "resolved": then}))
    assert load_result(tmp_path, run) is not None
    # Experiments outside the harness keep all their settings in the config.
    assert resolved_config(next(r for r in build_suite("tiny") if r.experiment is not None)) is None


def test_a_field_renamed_since_the_run_does_not_make_it_run_again(tmp_path):
    from memzoo.eval.report import resolved_config

    run = next(r for r in build_suite("tiny") if r.key.startswith("mqar-titans_mac"))
    path = run_path(tmp_path, run)
    then = resolved_config(run)
    mac = then["model"]["mixers"]["titans_mac"]
    # Stored when TitansMACConfig called segment_len "segment" (its _renamed_fields): the same model.
    mac["segment"] = mac.pop("segment_len")
    path.write_text(json.dumps({"config": run.config(), "resolved": then}))
    assert load_result(tmp_path, run) is not None
    mac["segment"] += 1  # under its old name, another value is still another model
    path.write_text(json.dumps({"config": run.config(), "resolved": then}))
    assert load_result(tmp_path, run) is None


def test_every_preset_declares_every_study_with_unique_keys():
    for preset, scale in PRESETS.items():
        runs = build_suite(preset)
        assert {r.study for r in runs} == set(STUDIES)
        assert len({r.key for r in runs}) == len(runs)
        # The needle study tests at 1x, 2x and 4x the training length.
        niah = next(r for r in runs if r.study == "niah")
        assert [c.seq_len for c in niah.data.test] == [scale.niah_len * k for k in (1, 2, 4)]


def test_cell_shows_mean_spread_missing_seeds_and_pending():
    assert cell([], 3) == "pending"
    assert cell([0.5], 1) == "0.50"
    assert cell([0.5, 0.7], 3) == "0.60 ± 0.14 (2/3 seeds)"


def test_unknown_study_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown studies"):
        _report(tmp_path, "--only", "nope")


@pytest.mark.slow
def test_mac_learns_recall_across_segments():
    # The MAC study's residual row (docs/titans.md): the needle one segment back in training, tested at 2x the
    # training length, where it lies up to three segments back and only the memory can bring it over.
    run = next(r for r in build_suite("cpu") if r.key == "mac-residual-s0")
    rec = train_one(run.spec, run.d_model, run.data, run.lr, run.seed, run.train, task=run.task, progress=False)
    two_x = 2 * run.labels["train_len"]
    assert rec["metrics"][f"seq_len={two_x}"]["exact_match"] >= 0.9, rec["curve"]


def _fake_result(tmp_path, run, value: float, primary: str = "accuracy") -> None:
    payload = {"config": run.config(), "record": {"primary": primary, "metrics": {"all": {primary: value}}}}
    run_path(tmp_path, run).write_text(json.dumps(payload))


def test_a_sweep_on_a_loss_takes_the_lowest(tmp_path):
    base = next(r for r in build_suite("tiny") if r.study == "hmt")
    sweep = [dataclasses.replace(base, key=f"sweep-{i}", lr=lr) for i, lr in enumerate((1e-3, 3e-3))]
    best = dataclasses.replace(base, key="best-s1", lr=None, seed=1, lr_from=tuple(r.key for r in sweep))
    _fake_result(tmp_path, sweep[0], 2.1, "loss")
    _fake_result(tmp_path, sweep[1], 1.9, "loss")
    assert best.resolve(tmp_path, {r.key: r for r in (*sweep, best)}).lr == 3e-3


def test_tiny_hmt_study_trains_hmt_and_its_backbone_on_held_out_text(tmp_path):
    runs = [r for r in build_suite("tiny") if r.study == "hmt"]
    assert {r.labels["model"] for r in runs} == {"swa", "hmt_swa"}
    hmt, swa = (next(r for r in runs if r.labels["model"] == m) for m in ("hmt_swa", "swa"))
    # The same backbone and window; HMT adds its segment memory on top.
    assert hmt.spec.mixers == swa.spec.mixers and swa.spec.wrapper is None
    assert hmt.spec.wrapper["segment_len"] == swa.spec.mixers["attention"]["window"]
    assert _report(tmp_path, "--only", "hmt") == 0
    for r in runs:
        rec = json.loads(run_path(tmp_path, r).read_text())["record"]
        assert rec["primary"] == "loss" and 0 < rec["metrics"]["all"]["loss"] < 6 and not rec["stopped_early"]
    page = (tmp_path / "results.md").read_text()
    assert "## HMT vs its backbone" in page and "| model | held-out nats/byte | bits/byte |" in page
    assert "| `hmt_swa` |" in page and "| `swa` |" in page and "needs 2+ seeds of both" in page


def test_hmt_agrees_only_below_its_backbone_by_more_than_the_spread():
    claim = hmt_claim("hmt_swa")
    base = [2.10, 2.12, 2.08]  # sd 0.02

    def gap(vals, baseline=base):
        return seed_gap(vals, baseline, "loss")

    assert gap([1.93, 1.95, 1.91]) == pytest.approx(8.5)
    assert _verdict(claim, gap([1.93, 1.95, 1.91])) == "agrees"
    # Lower on average, but by less than the spread of the seeds.
    assert _verdict(claim, gap([2.09, 2.11, 2.07])) == "disagrees"
    assert _verdict(claim, gap([2.20, 2.22, 2.18])) == "disagrees"
    # The larger spread counts: a tight HMT does not make a noisy backbone's gap significant.
    assert gap([2.05, 2.05, 2.05], [2.0, 2.1, 2.2]) == pytest.approx(0.5)
    assert gap([1.9, 1.9], [2.0, 2.0]) == float("inf")
    assert _verdict(claim, gap([1.9])) == "pending"
    assert hmt_claim("swa").check is None


def test_longmem_arm_metrics_reads_each_arm_and_refuses_another_record():
    arm = {"query_acc": 0.5, "query_loss": 1.5}
    rec = {"memory": arm, "no_memory": {"query_acc": 0.1, "query_loss": 2.5},
           "backbone": {"stream_acc_local": 0.2, "stream_loss_local": 3.0}}
    assert arm_metrics(rec) == {"longmem-on": {"accuracy": 0.5, "loss": 1.5},
                                "longmem-off": {"accuracy": 0.1, "loss": 2.5},
                                "backbone": {"accuracy": 0.2, "loss": 3.0}}
    with pytest.raises(ValueError, match=r"lacks \['no_memory'\]"):
        arm_metrics({"memory": arm, "backbone": rec["backbone"]})


def test_tiny_longmem_study_runs_both_arms_per_seed_and_writes_its_table(tmp_path, capsys):
    runs = [r for r in build_suite("tiny") if r.study == "longmem"]
    assert [r.key for r in runs] == ["longmem-recall-s0"] and runs[0].task == "longmem_recall"
    assert _report(tmp_path, "--only", "longmem") == 0
    payload = json.loads(run_path(tmp_path, runs[0]).read_text())
    assert list(payload) == ["key", "study", "created", "config", "environment", "cpu_s", "wall_s", "record"]
    assert payload["config"]["experiment"] == dataclasses.asdict(PRESETS["tiny"].longmem)
    rec = payload["record"]
    # Both arms come from one run (one pretrained backbone); the page reads them as slices.
    assert {"memory", "no_memory", "backbone", "chance"} <= set(rec) and rec["primary"] == "accuracy"
    assert set(rec["metrics"]) == set(LONGMEM_ARMS)
    assert rec["metrics"]["longmem-on"]["accuracy"] == rec["memory"]["query_acc"]
    assert rec["metrics"]["longmem-off"]["loss"] == rec["no_memory"]["query_loss"]
    page = (tmp_path / "results.md").read_text()
    assert "Run files: `" + str(tmp_path) + "/longmem-recall-s<seed>.json`." in page
    assert "| arm | query accuracy | query loss | on vs gate 0 (accuracy) |" in page
    on = rec["metrics"]["longmem-on"]
    assert f"| `longmem-on` | {on['accuracy']:.3f} | {on['loss']:.3f} | needs 2+ seeds | 1/1 |" in page
    assert "| `longmem-off` |" in page and "| `backbone` |" in page and "| chance (1 / 8 values) | 0.125 |" in page
    # Resumed like any run: stored under the same config, skipped; under another config, not reused.
    capsys.readouterr()
    assert _report(tmp_path, "--only", "longmem", "--page-only") == 0 and load_result(tmp_path, runs[0])
    other = dataclasses.replace(runs[0], experiment=dataclasses.replace(runs[0].experiment, side_steps=4))
    assert load_result(tmp_path, other) is None


def test_a_run_kind_takes_its_settings_from_experiment_only():
    tiny = PRESETS["tiny"].longmem
    harness = next(r for r in build_suite("tiny") if r.study == "mqar")
    with pytest.raises(ValueError, match="needs experiment="):
        Run.of_experiment("x", "longmem", "longmem_recall", None, 0)
    with pytest.raises(ValueError, match="spec, lr must be None"):
        Run("x", "longmem", "longmem_recall", harness.spec, None, None, 1e-3, 0, None, experiment=tiny)
    with pytest.raises(ValueError, match="experiment is for the tasks"):
        dataclasses.replace(harness, experiment=tiny)
    with pytest.raises(ValueError, match="needs spec, data"):
        Run("x", "mqar", "mqar", None, 32, None, 1e-3, 0, harness.train)


def _longmem_rows(on: list[float], off: list[float], declared: int = 3) -> dict[str, list[str]]:
    runs = [r for r in build_suite("cpu") if r.study == "longmem"][:declared]
    res = {r.key: None for r in runs}
    for r, a, b in zip(runs, on, off):
        metrics = {"longmem-on": {"accuracy": a, "loss": 2.0}, "longmem-off": {"accuracy": b, "loss": 2.5},
                   "backbone": {"accuracy": 0.06, "loss": 5.0}}
        res[r.key] = {"record": {"metrics": metrics}}
    lines = _longmem_section(runs, res, longmem_claim)
    return {line.split(" | ")[0].strip("| `"): line.strip("| ").split(" | ") for line in lines[2:]}


def test_longmem_agrees_only_above_gate_0_by_more_than_the_spread():
    off = [0.066, 0.064, 0.066]
    rows = _longmem_rows([0.379, 0.234, 0.325], off)
    assert rows["longmem-on"][1] == "0.313 ± 0.073" and rows["longmem-off"][1] == "0.065 ± 0.001"
    assert rows["longmem-on"][3] == "+0.247 (3.4 x spread)" and rows["longmem-on"][-1] == "agrees"
    assert rows["longmem-off"][-1] == "baseline" and rows["chance (1 / 16 values)"][1] == "0.062"
    # Above on average, but by less than the larger spread; or below.
    assert _longmem_rows([0.30, 0.05, 0.10], off)["longmem-on"][-1] == "disagrees"
    assert _longmem_rows([0.05, 0.06, 0.05], off)["longmem-on"][-1] == "disagrees"
    # One seed: no spread, no verdict.
    one = _longmem_rows([0.5], [0.06])
    assert one["longmem-on"][3] == "needs 2+ seeds" and one["longmem-on"][-1] == "pending"
    assert one["longmem-on"][1] == "0.500 (1/3 seeds)"
    assert seed_gap([0.5, 0.5], [0.1, 0.1], "accuracy") == float("inf")
    assert seed_gap([0.1, 0.1], [0.5, 0.5], "loss") == float("inf")


def test_other_seeds_take_the_best_rate_of_the_sweep(tmp_path):
    base = next(r for r in build_suite("tiny") if r.study == "mqar")
    sweep = [dataclasses.replace(base, key=f"sweep-{i}", lr=lr) for i, lr in enumerate((1e-3, 3e-3, 1e-2))]
    best = dataclasses.replace(base, key="best-s1", lr=None, seed=1, lr_from=tuple(r.key for r in sweep))
    suite = {r.key: r for r in (*sweep, best)}
    _fake_result(tmp_path, sweep[0], 0.4)
    _fake_result(tmp_path, sweep[1], 0.9)
    # Pending while a sweep run is missing, however the run itself is stored.
    assert best.resolve(tmp_path, suite) is None and load_result(tmp_path, best, suite) is None
    _fake_result(tmp_path, sweep[2], 0.6)
    resolved = best.resolve(tmp_path, suite)
    assert resolved.lr == 3e-3 and resolved.seed == 1
    _fake_result(tmp_path, resolved, 0.8)
    assert load_result(tmp_path, best, suite) is not None
    # A stored run trained at a rate that is no longer the sweep's best is not reused.
    _fake_result(tmp_path, sweep[2], 0.95)
    assert load_result(tmp_path, best, suite) is None
    with pytest.raises(ValueError, match="give lr, or lr_from"):
        dataclasses.replace(base, lr=None)
    with pytest.raises(ValueError, match="not a run of the suite"):
        best.resolve(tmp_path, {})


def test_pending_cpu_time_is_scaled_from_the_same_models_finished_runs():
    base = next(r for r in build_suite("tiny") if r.study == "mqar")
    a64 = dataclasses.replace(base, key="a64")
    a128 = dataclasses.replace(base, key="a128", d_model=2 * base.d_model)
    other = dataclasses.replace(base, key="b", spec=dataclasses.replace(base.spec, name="other"))
    cheap = dataclasses.replace(base, key="c", spec=dataclasses.replace(base.spec, name="cheap"))
    runs = [a64, a128, other, cheap]
    # a64 finished in 1 CPU-h, cheap in 0.5 CPU-h: a128 (same model, twice the width) costs 2 h, "other" (no
    # finished run of its own) the study's mean rate, 0.75 h: 2.75 h pending.
    row = _progress_row("mqar", runs, [{"cpu_s": 3600.0}, None, None, {"cpu_s": 1800.0}])
    assert row == "| mqar | 2/4 | 45.0 | 2.8 |", row
    assert _progress_row("mqar", runs, [None] * 4).endswith("not measured yet |")


def test_needle_table_shows_token_accuracy_beside_exact_match():
    from memzoo.eval.report_claims import Claim

    run = next(r for r in build_suite("tiny") if r.study == "niah")
    lens = [c.seq_len for c in run.data.test]
    metrics = {f"seq_len={T}": {"exact_match": 0.0, "accuracy": 0.5 if i == 0 else 0.25} for i, T in enumerate(lens)}
    rows, _ = _length_table([run], {run.key: {"record": {"metrics": metrics}}}, lambda r: "m",
                            lambda r: Claim("paper", None, "untested"))
    header, row = rows[0].split(" | "), rows[2].split(" | ")
    assert header[5] == "token acc 1x" and row[5] == "0.50", rows
    assert row[2:5] == ["0.00"] * 3, rows


def test_needle_table_shows_the_unclipped_twins_at_2x(tmp_path):
    import json

    from memzoo.eval.report import resolved_config
    from memzoo.eval.report_claims import Claim
    from memzoo.eval.report_page import _unclipped

    runs = [r for r in build_suite("cpu") if r.study == "niah"][:2]
    lens = [c.seq_len for c in runs[0].data.test]
    results, archive = tmp_path / "cpu", tmp_path / "archive" / "niah-unclipped"
    archive.mkdir(parents=True)

    def stored(run, em2x):
        metrics = {f"seq_len={T}": {"exact_match": em2x if i == 1 else 0.0, "accuracy": 0.1}
                   for i, T in enumerate(lens)}
        return {"config": run.config(), "resolved": resolved_config(run), "record": {"metrics": metrics}}

    twin = dataclasses.replace(runs[0], train=dataclasses.replace(runs[0].train, grad_clip=None))
    (archive / f"{runs[0].key}.json").write_text(json.dumps(stored(twin, 0.75)))
    # A file of another run under the second key (clipped, as the suite's own): not its unclipped twin.
    (archive / f"{runs[1].key}.json").write_text(json.dumps(stored(runs[1], 0.5)))
    twins = _unclipped(runs, results)
    assert twins[runs[0].key]["record"]["metrics"][f"seq_len={lens[1]}"]["exact_match"] == 0.75
    assert twins[runs[1].key] is None
    res = {r.key: stored(r, 0.25) for r in runs}
    rows, _ = _length_table(runs, res, lambda r: r.labels["model"], lambda r: Claim("paper", None, "untested"),
                            compare=("EM 2x unclipped", twins))
    header, first, second = (row.split(" | ") for row in (rows[0], rows[2], rows[3]))
    assert header[6] == "EM 2x unclipped" and first[6] == "0.75", rows
    assert first[3] == "0.25" and second[6] == "pending", rows
    # No twin at all: no column.
    rows, _ = _length_table(runs, res, lambda r: r.labels["model"], lambda r: Claim("paper", None, "untested"),
                            compare=("EM 2x unclipped", {}))
    assert "unclipped" not in rows[0], rows


def test_needle_intro_states_the_budget_its_runs_trained_with():
    from memzoo.eval.report_page import _niah_budget

    runs = [r for r in build_suite("cpu") if r.study == "niah"]
    text = _niah_budget(runs)
    # 2,000 examples in batches of 32: 63 steps an epoch.
    assert "2,000 training examples for 10 epochs (630 steps) at peak rate 0.003, gradient norm clipped at 1 (one " \
           "rate for all" in text, text
    assert "archive/niah-unclipped/" in text, text
    other = dataclasses.replace(runs[0], train=dataclasses.replace(runs[0].train, epochs=30, grad_clip=None), lr=1e-3)
    text = _niah_budget([*runs, other])
    assert "10 epochs (630 steps) at peak rate 0.003, gradient norm clipped at 1; 2,000 training examples for 30 " \
           "epochs (1,890 steps) at peak rate 0.001 (no sweep)" in text, text
    unclipped = [dataclasses.replace(r, train=dataclasses.replace(r.train, grad_clip=None)) for r in runs]
    text = _niah_budget(unclipped)
    assert "at peak rate 0.003 (one rate for all" in text and "clipped" not in text, text


def test_cpu_preset_sweeps_at_one_seed_and_reruns_the_best_rate():
    runs = [r for r in build_suite("cpu") if r.study == "mqar"]
    keys = {r.key for r in runs}
    s = PRESETS["cpu"]
    for r in runs:
        if r.seed == s.seeds[0]:
            assert r.lr in s.mqar_lrs and not r.lr_from
        else:
            assert r.lr is None and len(r.lr_from) == len(s.mqar_lrs) and set(r.lr_from) <= keys
    # Cell by cell: every run of the first cell comes before any run of the second.
    first = [i for i, r in enumerate(runs) if (r.d_model, r.labels["T"]) == (s.d_models[0], s.mqar_grid[0][0])]
    assert first == list(range(len(first))) and len(first) == len(runs) // (len(s.d_models) * len(s.mqar_grid))


def test_each_mqar_cell_trains_for_its_own_epochs():
    s = PRESETS["cpu"]
    epochs = {T: e for (T, _), e in zip(s.mqar_grid, s.mqar_epochs)}
    assert epochs == {64: 24, 128: 24}
    for r in build_suite("cpu"):
        if r.study == "mqar":
            assert r.train.epochs == epochs[r.labels["T"]], r.key
    with pytest.raises(ValueError, match="mqar_epochs needs one value per cell of mqar_grid"):
        dataclasses.replace(s, mqar_epochs=(8,))
    # Cells with other epochs each get their own (the preset's two are equal, so this needs a Scale of its own).
    from memzoo.eval.report_suite import mqar_study

    mixed = dataclasses.replace(s, mqar_epochs=(8, 24))
    assert {(r.labels["T"], r.train.epochs) for r in mqar_study(mixed)} == {(64, 8), (128, 24)}


def test_workers_share_a_folder_through_lock_files(tmp_path, capsys):
    run = next(r for r in build_suite("tiny") if r.study == "mqar")
    path = run_path(tmp_path, run)
    lock = path.with_suffix(".lock")
    assert _claim(path) and lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not _claim(path)  # held by a live process (this one)
    # A worker holding the run makes run_suite leave it for later.
    assert run_suite([run], tmp_path, progress=False)["waiting"] == 1 and not path.exists()
    assert "held by another worker" in capsys.readouterr().out
    # A lock from another machine is respected; one left by a dead process here is taken over.
    lock.write_text("some-other-host 1")
    assert not _claim(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}")
    assert _claim(path)
    lock.unlink()
    stats = run_suite([run], tmp_path, progress=False)
    assert stats["done"] == 1 and path.exists() and not lock.exists()


def test_every_zoo_model_has_its_own_plot_style_and_the_state_plot_has_a_panel_per_cell(tmp_path):
    from memzoo.eval.report_page import _plot_state, _state_figure, _style
    from memzoo.eval.report_suite import ZOO_NAMES

    styles = [_style(n, []) for n in ZOO_NAMES]
    assert len({(s["color"], s["marker"]) for s in styles}) == len(ZOO_NAMES)
    assert len({s["color"] for s in styles}) == len(ZOO_NAMES)  # colour alone tells the lines apart
    assert _style("gated_delta", ["zz", "gated_delta"]) == _style("gated_delta", ["gated_delta"])
    assert _style("s4d-lin", ["s4d-lin"])["color"] != _style("attention", [])["color"]
    pts = [("attention", (64, 4), 2e3, 0.99, 0.01), ("attention", (64, 4), 4e3, 1.0, 0.0),
           ("mom", (128, 8), 1e4, 0.3, 0.2)]
    fig = _state_figure(pts, "t")
    assert [ax.get_title() for ax in fig.axes] == ["T 64, 4 key-value pairs", "T 128, 8 key-value pairs"]
    assert [len(ax.lines) > 0 for ax in fig.axes] == [True, True]
    import matplotlib.pyplot as plt

    plt.close(fig)
    open_before = set(plt.get_fignums())  # other tests in this process may have left figures open
    png = _plot_state(pts, tmp_path / "s.png", "t")
    assert png is not None and png.stat().st_size > 0
    assert set(plt.get_fignums()) == open_before  # the saved figure was closed


def _s4d_rows(acc: dict[str, list[float]]) -> dict[str, list[str]]:
    from memzoo.eval.report_claims import s4d_claim
    from memzoo.eval.report_page import _s4d_section

    runs = [r for r in build_suite("cpu") if r.study == "s4d_init"]
    res = {r.key: None for r in runs}
    for r in runs:
        vals = acc.get(r.labels["model"], [])
        if r.seed < len(vals):
            res[r.key] = {"record": {"metrics": {"all": {"accuracy": vals[r.seed]}}}}
    lines = _s4d_section(runs, res, s4d_claim)
    return {line.split(" | ")[0].strip("| `"): line.strip("| ").split(" | ") for line in lines[2:]}


def test_s4d_verdicts_test_the_ordering_complex_inits_together_and_real_below():
    measured = {"s4d-lin": [0.95, 0.94, 0.96], "s4d-inv": [0.95, 0.95, 0.955], "s4d-legs": [0.955, 0.95, 0.96],
                "s4d-real": [0.84, 0.82, 0.85]}
    rows = _s4d_rows(measured)
    assert [rows[m][-1] for m in measured] == ["agrees"] * 4
    assert rows["s4d-real"][2] == "0.113 below the lowest complex init (7.4 x spread)"
    assert rows["s4d-lin"][2] == "at most 0.005 from the other complex inits"
    # One complex init 3 points off the others: it disagrees (and the init it is far from does too).
    rows = _s4d_rows({**measured, "s4d-inv": [0.92, 0.92, 0.925]})
    assert rows["s4d-inv"][-1] == "disagrees" and rows["s4d-legs"][-1] == "disagrees"
    # Real below on average but within the spread of a complex init: disagrees.
    rows = _s4d_rows({**measured, "s4d-real": [0.95, 0.90, 0.92], "s4d-lin": [0.99, 0.90, 0.94]})
    assert rows["s4d-real"][-1] == "disagrees"
    # Real above the complex inits: disagrees.
    assert _s4d_rows({**measured, "s4d-real": [0.97, 0.97, 0.98]})["s4d-real"][-1] == "disagrees"
    # Missing seeds or inits: pending, never guessed.
    rows = _s4d_rows({**measured, "s4d-real": [0.84], "s4d-legs": []})
    assert rows["s4d-real"][2] == "needs 2+ seeds of every init" and rows["s4d-real"][-1] == "pending"
    assert rows["s4d-lin"][-1] == "pending" and rows["s4d-legs"][1] == "pending"


def test_answer_in_view_counts_queries_whose_pair_lies_within_the_span():
    from memzoo.eval.report_page import answer_in_view

    I = -100  # noqa: E741
    # Context k1 v1 k2 v2 (ids 1 10 2 20), then filler; queries: k1 at position 5 (answer 10 at position 1, 4 back),
    # k2 at position 9 (answer 20 at position 3, 6 back), where a filler token 20 at position 8 is no source.
    inputs = torch.tensor([[1, 10, 2, 20, 7, 1, 7, 7, 20, 2]])
    labels = torch.tensor([[I, I, I, I, I, 10, I, I, I, 20]])
    assert answer_in_view(inputs, labels, 4, 4) == (0, 2)
    assert answer_in_view(inputs, labels, 5, 4) == (1, 2)
    assert answer_in_view(inputs, labels, 7, 4) == (2, 2)
    assert answer_in_view(inputs, labels, 5, 10) == (2, 2)  # with the filler counted as a source, k2 too


def test_mqar_section_states_the_share_of_queries_within_the_window():
    from memzoo.eval.harness import load_segment, test_segment_seeds
    from memzoo.eval.report_page import _mqar_reach

    runs = [r for r in build_suite("tiny") if r.study == "mqar"]
    (window,) = {o["window"] for r in runs for o in r.spec.mixers.values() if o.get("window")}
    # An independent count: each query's value position in the context, against the window.
    c = runs[0].data.test[0]
    d = load_segment(c, test_segment_seeds(runs[0].data)[0])
    hit = total = 0
    for row, lab in zip(d.inputs.tolist(), d.labels.tolist()):
        for t, answer in enumerate(lab):
            if answer != -100:
                total += 1
                hit += t - row.index(answer) < window  # the value's first occurrence is its pair's
    text = _mqar_reach(runs)
    assert f"within the last {window} tokens is {hit / total:.2f} at T {c.input_seq_len} ({c.num_kv_pairs})" in text
    assert 0 < hit < total


def test_mqar_overview_has_a_row_per_model_and_a_column_per_cell(tmp_path):
    from memzoo.eval.report_claims import mqar_claim
    from memzoo.eval.report_page import _mqar_section

    runs = [r for r in build_suite("cpu") if r.study == "mqar"]
    res = {r.key: None for r in runs}
    for r in runs:  # the first cell's attention runs finished: sweep at seed 0, the best rate at seeds 1 and 2
        if r.labels["model"] == "attention" and (r.d_model, r.labels["T"]) == (64, 64):
            acc = {5e-4: 0.5, 1e-3: 0.99, 2e-3: 0.9}.get(r.lr, 0.98)
            res[r.key] = {"config": {"lr": r.lr or 1e-3}, "record": {"metrics": {"all": {"accuracy": acc}},
                                                                      "state_floats": {"64": 8192}}}
        # swa's sweep seed stays low at every rate while its reruns learn: the row says how far it trails.
        if r.labels["model"] == "swa" and (r.d_model, r.labels["T"]) == (64, 64):
            acc = {5e-4: 0.2, 1e-3: 0.18, 2e-3: 0.19}.get(r.lr, {1: 0.6, 2: 0.55}.get(r.seed))
            res[r.key] = {"config": {"lr": r.lr or 5e-4}, "record": {"metrics": {"all": {"accuracy": acc}},
                                                                      "state_floats": {"64": 4096}}}
    lines = _mqar_section(runs, res, tmp_path / "p.md", tmp_path / "img", "cpu", mqar_claim)
    assert lines[0] == "| model | d 64, T 64 (4) | d 128, T 64 (4) | d 64, T 128 (8) | d 128, T 128 (8) |"
    assert "| `attention` | 0.98 ± 0.01 | pending | pending | pending |" in lines
    assert sum(line.startswith("| `") for line in lines[:lines.index("")]) == 13
    detail = lines[lines.index(next(x for x in lines if x.startswith("<details>"))):]
    row = ("| `attention` | 64 | 64 (4) | 0.001 | 0.98 ± 0.01 | 0.99 / 0.98 / 0.98 | 5/5 | zoology Fig. 2: attention "
           "~1.00 |  | agrees |")
    assert row in detail
    swa = next(line for line in detail if line.startswith("| `swa` | 64 | 64 (4) |")).split(" | ")
    assert swa[3:6] == ["0.0005 (sweep seed 0.35 below its reruns)", "0.45 ± 0.22", "0.20 / 0.60 / 0.55"]
    # Less than TRAILS behind: no remark.
    res.update({k: {**v, "record": {**v["record"], "metrics": {"all": {"accuracy": 0.35}}}} for k, v in res.items()
                if v is not None and "swa" in k and "best" in k})
    lines = _mqar_section(runs, res, tmp_path / "p.md", tmp_path / "img", "cpu", mqar_claim)
    assert next(line for line in lines if line.startswith("| `swa` | 64 | 64 (4) |")).split(" | ")[3] == "0.0005"
    assert (tmp_path / "img" / "results-cpu-mqar-state.png").exists()


def _mqar_results(runs, acc_of):
    """Finished MQAR runs for every (model, d, T) ``acc_of`` gives seed accuracies for (the sweep at the first
    seed's value for every rate)."""
    res = {r.key: None for r in runs}
    for r in runs:
        accs = acc_of(r.labels["model"], r.d_model, r.labels["T"])
        if accs is not None:
            res[r.key] = {"config": {"lr": r.lr or 1e-3}, "record": {"metrics": {"all": {"accuracy": accs[r.seed]}},
                                                                      "state_floats": {str(r.labels["T"]): 1024}}}
    return res


def test_mqar_trends_test_each_row_against_its_neighbouring_cells(tmp_path):
    from memzoo.eval.report_claims import mqar_claim
    from memzoo.eval.report_page import _mqar_section

    runs = [r for r in build_suite("cpu") if r.study == "mqar"]
    # The same cells with T 64 trained for 8 epochs instead: other budgets (below).
    mixed = [dataclasses.replace(r, train=dataclasses.replace(r.train, epochs=8)) if r.labels["T"] == 64 else r
             for r in runs]
    table = {("gla", 64, 64): [0.20, 0.22, 0.24], ("gla", 128, 64): [0.50, 0.55, 0.60],   # rises: agrees
             ("gla", 64, 128): [0.30, 0.32, 0.34],                                          # rises with T: disagrees
             ("mom", 64, 64): [0.1, 0.5, 0.9], ("mom", 128, 64): [0.2, 0.6, 0.8],           # within the spread
             ("gated_delta", 64, 64): [0.97, 0.98, 0.99], ("gated_delta", 128, 64): [0.98, 0.99, 0.99],
             ("swa", 64, 64): [0.30, 0.31, 0.32], ("swa", 128, 64): [0.10, 0.11, 0.12],    # no width claim
             ("swa", 64, 128): [0.10, 0.11, 0.12],                                          # falls: agrees
             ("titans_mlp", 64, 64): [0.30, 0.31, 0.32]}                                    # neighbour pending

    def verdicts(runs):
        lines = _mqar_section(runs, _mqar_results(runs, lambda m, d, T: table.get((m, d, T))), tmp_path / "p.md",
                              tmp_path / "img", "cpu", mqar_claim)
        rows = {tuple(c.strip() for c in line.split("|")[1:4]): line.split("|")[-3:-1] for line in lines
                if line.startswith("| `")}
        return {k: (v[0].strip(), v[1].strip()) for k, v in rows.items() if len(k) == 3 and k[1].isdigit()}

    verdict = verdicts(runs)
    assert verdict["`gla`", "128", "64 (4)"] == ("width: +0.33 (6.6 x spread)", "width: agrees")
    assert verdict["`gla`", "64", "128 (8)"] == ("length: +0.10 (5.0 x spread)", "length: disagrees")
    assert verdict["`gla`", "64", "64 (4)"][1] == "the reference cell of the trends"
    assert verdict["`mom`", "128", "64 (4)"][1] == "width: within the spread"
    assert verdict["`gated_delta`", "128", "64 (4)"][1] == "width: not testable (both >= 0.95)"
    assert verdict["`swa`", "128", "64 (4)"][1] == "the reference cell of the trends"
    assert verdict["`swa`", "64", "128 (8)"][1] == "length: agrees"
    assert verdict["`titans_mlp`", "128", "64 (4)"][1] == "width: pending"
    # Cells trained for other epochs are not compared: 24-epoch T 128 rows against 8-epoch T 64 ones.
    verdict = verdicts(mixed)
    assert verdict["`gla`", "64", "128 (8)"] == ("length: trained 24 epochs here, 8 epochs there",
                                                 "length: not comparable (other budget)")
    assert verdict["`swa`", "64", "128 (8)"][1] == "length: not comparable (other budget)"
    assert verdict["`gla`", "128", "64 (4)"][1] == "width: agrees"
    # The last cell is tested on both axes; the attention rows keep zoology's absolute claim.
    d128_t128 = mqar_claim("gla", 128, 128, 8, ((64, 64, 4), (128, 64, 4), (64, 128, 8), (128, 128, 8)))
    assert [(t.label, t.versus, t.sign) for t in d128_t128.trends] == [("width", (64, 128, 8), 1),
                                                                        ("length", (128, 64, 4), -1)]
    assert not mqar_claim("attention", 128, 128, 8).trends and mqar_claim("attention", 64, 64, 4).check(0.95)


def test_a_study_without_a_table_is_refused_not_dropped(tmp_path):
    from memzoo.eval.report_page import write_page

    runs = [dataclasses.replace(r, study="new_study") for r in build_suite("tiny") if r.study == "s4d_init"]
    with pytest.raises(ValueError, match=r"no table for the studies \['new_study'\]"):
        write_page("tiny", runs, tmp_path, tmp_path / "results.md")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compile_trains_the_same_run_and_is_recorded_outside_its_config(tmp_path, capsys):
    from torch._dynamo.utils import counters

    from memzoo.eval.harness import train_one

    run = next(r for r in build_suite("tiny") if r.study == "mqar")
    kw = dict(task=run.task, progress=False)
    eager = train_one(run.spec, run.d_model, run.data, run.lr, run.seed, run.train, **kw)
    counters.clear()
    compiled = train_one(run.spec, run.d_model, run.data, run.lr, run.seed, run.train, compile=True, **kw)
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert counters["stats"]["unique_graphs"] >= 1  # the steps did go through the compiler
    # The same model, data and steps: the losses agree to rounding (fused kernels sum in another order).
    assert compiled["steps"] == eager["steps"] > 0
    for a, b in zip(eager["curve"], compiled["curve"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-4)

    assert _report(tmp_path, "--only", "mqar", "--max-runs", "1", "--compile") == 0
    payload = json.loads(run_path(tmp_path, run).read_text())
    assert payload["environment"]["torch_compile"] is True and payload["record"]["compiled"] is True
    assert "torch_compile" not in json.dumps(payload["config"])
    assert "1 of the runs trained through `torch.compile`" in (tmp_path / "results.md").read_text()
    # Not part of the config: an eager call counts the compiled run as done.
    capsys.readouterr()
    assert _report(tmp_path, "--only", "mqar", "--max-runs", "0") == 0
    assert "1 already done" in capsys.readouterr().out
    # A model named in --compile-skip trains eagerly.
    second = next(r for r in build_suite("tiny") if r.study == "mqar" and r.spec.name != run.spec.name)
    assert _report(tmp_path, "--only", "mqar", "--max-runs", "1", "--compile", "--compile-skip", second.spec.name) == 0
    payload = json.loads(run_path(tmp_path, second).read_text())
    assert "torch_compile" not in payload["environment"] and payload["record"]["compiled"] is False


def test_compile_skip_names_models_of_the_preset_and_needs_compile(tmp_path):
    with pytest.raises(SystemExit, match="unknown models \\['nope'\\]"):
        _report(tmp_path, "--compile", "--compile-skip", "nope", "--page-only")
    with pytest.raises(SystemExit, match="--compile-skip goes with --compile"):
        _report(tmp_path, "--compile-skip", "titans_mac", "--page-only")
