"""Scoring position, per-slice metrics, configs and the command-line config builder."""

import dataclasses
import json
import types

import pytest
import torch

from memzoo.eval import cli
from memzoo.eval.config import BenchConfig, BenchTrainConfig, DataSpec, ModelSpec, log_lrs
from memzoo.eval.harness import evaluate, mark_best, slice_metrics, step_lr, train_one
from memzoo.eval.presets import PRESETS, get_bench_preset
from memzoo.eval.tasks import IGNORE, make_task
from memzoo.eval.tasks.mqar import MQARConfig
from memzoo.eval.tasks.niah import NIAHConfig
from memzoo.eval.tasks.pydoc_lm import PydocLMConfig


class RecallOracle(torch.nn.Module):
    """Causal associative recall by lookup: at position t, predict the token that followed the
    latest earlier occurrence of x[t] inside the key-value context (``shift`` moves the guess)."""

    def __init__(self, vocab, ctx, shift=0):
        super().__init__()
        self.vocab, self.ctx, self.shift = vocab, ctx, shift

    def forward(self, x):
        B, T = x.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            table = {x[b, p].item(): x[b, p + 1].item() for p in range(0, self.ctx, 2)}
            for t in range(T):
                src = t - self.shift
                if 0 <= src < T and x[b, src].item() in table:
                    logits[b, t, table[x[b, src].item()]] = 1.0
        return types.SimpleNamespace(logits=logits)


def test_mqar_scores_the_prediction_at_the_query_key():
    cfg = MQARConfig(vocab_size=128, num_examples=64, input_seq_len=64, num_kv_pairs=8)
    data = make_task(cfg, 0)
    right = evaluate(RecallOracle(128, 16), data, batch_size=32)
    assert right["accuracy"].min() == 1.0 and right["exact_match"].min() == 1.0
    # The same lookup one position late (HF-style unshifted labels would reward this) scores ~0.
    late = evaluate(RecallOracle(128, 16, shift=1), data, batch_size=32)
    assert late["accuracy"].mean() < 0.1
    assert right["loss"].mean() < late["loss"].mean()


def test_slice_metrics_weights_examples_and_names_slices():
    a = make_task(NIAHConfig(num_examples=10, seq_len=64), 0)
    b = make_task(NIAHConfig(num_examples=30, seq_len=96), 0)
    sa = {k: torch.ones(10) for k in ("accuracy", "exact_match", "loss")}
    sb = {k: torch.zeros(30) for k in ("accuracy", "exact_match", "loss")}
    m = slice_metrics([sa, sb], [a, b])
    assert m["all"]["accuracy"] == pytest.approx(0.25) and m["all"]["n"] == 40
    assert m["seq_len=64"]["accuracy"] == 1.0 and m["seq_len=96"]["accuracy"] == 0.0
    assert m["seq_len=96/depth=50"]["n"] == 6
    assert set(m) >= {f"seq_len=64/depth={d}" for d in (0, 25, 50, 75, 100)}


def test_mark_best_picks_the_best_lr_per_seed():
    def rec(lr, seed, acc):
        return {"model": "m", "d_model": 8, "data_index": 0, "seed": seed, "lr": lr, "primary": "accuracy",
                "metrics": {"all": {"accuracy": acc}}}

    rs = [rec(1e-3, 0, 0.5), rec(1e-2, 0, 0.9), rec(1e-3, 1, 0.7), rec(1e-2, 1, 0.7)]
    mark_best(rs)
    assert [r["best_lr"] for r in rs] == [False, True, True, False]
    # A loss is best where it is lowest.
    losses = [{**r, "primary": "loss", "metrics": {"all": {"loss": r["metrics"]["all"]["accuracy"]}}} for r in rs]
    mark_best(losses)
    assert [r["best_lr"] for r in losses] == [True, False, True, False]


def test_a_loss_primary_never_stops_a_run_early():
    # Held-out loss (about 5.5 nats after a few steps) is above the accuracy threshold 0.99 from the start: it must
    # not read as "solved".
    data = DataSpec((PydocLMConfig(seq_len=16, num_examples=8),), (PydocLMConfig(split="test", seq_len=16,
                                                                                 num_examples=4),))
    train = BenchTrainConfig(epochs=3, batch_size=4, early_stop=0.99)
    rec = train_one(ModelSpec(("attention",)), 16, data, 1e-3, 0, train, task="pydoc_lm", progress=False)
    assert rec["primary"] == "loss" and rec["metrics"]["all"]["loss"] > 0.99
    assert rec["epochs_run"] == 3 and not rec["stopped_early"] and rec["steps"] == 6


def test_bench_config_round_trip_and_unknown_keys():
    for task, presets in PRESETS.items():
        for name in presets:
            cfg = get_bench_preset(task, name)
            assert BenchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    d = get_bench_preset("mqar", "ci").to_dict()
    d["data"][0]["train"][0]["train_power_a"] = 0.01
    with pytest.raises(ValueError, match="train_power_a"):
        BenchConfig.from_dict(d)
    d = get_bench_preset("mqar", "ci").to_dict()
    d["train"]["lr_schedule"] = "cosine"
    with pytest.raises(ValueError, match="lr_schedule"):
        BenchConfig.from_dict(d)
    with pytest.raises(ValueError, match="task"):
        dataclasses.replace(get_bench_preset("mqar", "ci"), task="nope")
    with pytest.raises(ValueError, match="batch_size"):
        BenchTrainConfig(batch_size=0)


def test_model_spec_and_lrs():
    spec = ModelSpec.parse("gated_delta+attention", {"attention": {"n_heads": 1}, "gla": {"x": 1}})
    assert spec.pattern == ("gated_delta", "attention") and spec.mixers == {"attention": {"n_heads": 1}}
    assert spec.name == "gated_delta+attention"
    assert log_lrs(1e-4, 1e-2, 4) == (1e-4, 0.000464159, 0.00215443, 0.01)
    with pytest.raises(ValueError, match="LR sweep"):
        log_lrs(1e-2, 1e-4, 3)
    with pytest.raises(ValueError, match="segment"):
        DataSpec((), (MQARConfig(),))


def _args(*argv):
    return cli._parser().parse_args(list(argv))


def test_cli_builds_the_issue_example_grid():
    cfg = cli.build_config(_args("mqar", "--model", "attention,attention+attention", "--d-model", "64,128",
                                 "--seq-len", "64,256", "--kv", "4,16", "--lr-sweep", "4", "--seeds", "3"))
    assert [m.pattern for m in cfg.models] == [("attention",), ("attention", "attention")]
    assert cfg.models[0].mixers == {"attention": {"n_heads": 1}}, "the preset's mixer options survive"
    assert cfg.d_models == (64, 128) and cfg.seeds == (0, 1, 2) and cfg.lrs == log_lrs(1e-4, 1e-2, 4)
    pairs = [(d.train[0].input_seq_len, d.train[0].num_kv_pairs) for d in cfg.data]
    assert pairs == [(64, 4), (64, 16), (256, 4), (256, 16)]
    assert [d.batch_size for d in cfg.data] == [512, 512, 256, 256]
    assert all(d.test[0].num_examples == 3000 for d in cfg.data)


def test_cli_errors_name_the_argument():
    with pytest.raises(ValueError, match="--kv"):
        cli.build_config(_args("mqar", "--seq-len", "32", "--kv", "16"))
    with pytest.raises(ValueError, match="--zip"):
        cli.build_config(_args("mqar", "--seq-len", "64,128", "--kv", "4", "--zip"))
    with pytest.raises(ValueError, match="--kv"):
        cli.build_config(_args("niah", "--kv", "4"))
    with pytest.raises(ValueError, match="preset"):
        cli.build_config(_args("mqar", "--preset", "nope"))
    with pytest.raises(ValueError, match="unknown mixer"):
        cli.build_config(_args("mqar", "--model", "no_such_mixer"))
    assert cli.main(["mqar", "--preset", "nope"]) == 2


def test_cli_niah_lengths_and_dump(capsys):
    cfg = cli.build_config(_args("niah", "--preset", "ci", "--train-len", "96", "--seq-len", "96,192,384"))
    assert cfg.data[0].train[0].seq_len == 96
    assert [t.seq_len for t in cfg.data[0].test] == [96, 192, 384]
    assert cli.main(["mqar", "--preset", "ci", "--dump-config"]) == 0
    assert BenchConfig.from_dict(json.loads(capsys.readouterr().out)) == get_bench_preset("mqar", "ci")


def test_unscored_rows_do_not_break_metrics():
    data = make_task(MQARConfig(vocab_size=128, num_examples=8, input_seq_len=32, num_kv_pairs=2), 0)
    data = data._replace(labels=torch.full_like(data.labels, IGNORE))
    s = evaluate(RecallOracle(128, 4), data)
    assert torch.isfinite(s["loss"]).all() and (s["accuracy"] == 0).all()


def test_step_lr_is_a_cosine_per_epoch_after_a_linear_warmup():
    train = BenchTrainConfig(epochs=4, warmup_steps=4)
    # Epoch rates: 0.5 (1 + cos(pi e / 4)) of the peak, the last epoch well above zero (stepped once per epoch).
    assert [step_lr(2.0, train, e) for e in range(4)] == pytest.approx([2.0, 1.7071068, 1.0, 0.2928932])
    # Warmup scales the first steps of the run: (step + 1) / warmup_steps, then 1.
    assert [step_lr(2.0, train, 0, s) for s in range(6)] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert step_lr(2.0, train, 2, 1) == pytest.approx(0.5)
    assert step_lr(2.0, dataclasses.replace(train, warmup_steps=0), 1, 0) == pytest.approx(1.7071068)
