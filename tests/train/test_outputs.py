"""What a run leaves behind: metrics.jsonl, trackers, the plot, the exported model, and the command line."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import memzoo
from memzoo.train import load_tokenizer
from memzoo.train.cli import main
from memzoo.train.tracking import read_metrics, resolve_trackers

REPO = Path(__file__).resolve().parents[2]
TRAIN_KEYS = {"step", "time", "loss/train", "optim/lr", "optim/grad_norm", "optim/skipped_steps", "perf/tokens_per_s",
              "perf/tflops", "perf/mfu", "perf/step_time", "mem/max_alloc_gib", "tokens_seen"}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One 4-step run through ``memzoo-train``'s main(): eval every 2 steps, checkpoints, export."""
    out = tmp_path_factory.mktemp("cli") / "run"
    args = ["--preset", "tiny", "--model.d_model", "32", "--model.n_layers", "2", "--data.seq_len=32",
            "--train.micro_bs", "4", "--train.max_steps", "4", "--log.every", "1", "--log.eval_every", "2",
            "--log.eval_iters", "2", "--log.progress", "false", "--ckpt.every", "2", "--out_dir", str(out)]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(args) == 0
    return out, text.getvalue()


def test_metrics_jsonl_has_the_spec_names(cli_run):
    out, _ = cli_run
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss/train" in r]
    val = [r for r in records if "loss/val" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in val] == [2, 4]
    for r in train:
        assert set(r) == TRAIN_KEYS
        assert r["perf/mfu"] is None and r["mem/max_alloc_gib"] is None  # CPU: no peak FLOP/s, no CUDA memory
        assert r["tokens_seen"] == r["step"] * 4 * 32 and r["perf/tokens_per_s"] > 0 and r["optim/lr"] > 0
    for r in val:
        assert set(r) == {"step", "time", "loss/val", "ppl/val"}
        assert r["ppl/val"] == pytest.approx(torch.tensor(r["loss/val"]).exp().item(), rel=1e-5)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["preset"] == "tiny-attention"


def test_the_run_prints_where_its_outputs_went(cli_run):
    out, text = cli_run
    assert json.loads(text[:text.index("\n}\n") + 2])["out_dir"] == str(out)  # the resolved config comes first
    assert f"checkpoint: {out / 'checkpoints' / 'checkpoint_4'}" in text
    assert f"metrics:    {out / 'metrics.jsonl'}" in text and str(out / "final") in text


def test_from_pretrained_round_trip(cli_run, tmp_path):
    out, _ = cli_run
    model = memzoo.from_pretrained(out / "final")
    assert not model.training and model.lm_head.weight is model.embed.weight
    same = memzoo.from_pretrained(out / "checkpoints" / "checkpoint_4")  # Accelerate's folder, run config
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(ids).logits, same(ids).logits, rtol=0, atol=0)
    assert load_tokenizer(out / "final").kind == "byte"
    assert memzoo.ModelConfig.from_json((out / "final" / "config.json").read_text()) == model.config
    # Weights saved from a compiled / DDP-wrapped model carry prefixes; they load all the same.
    tensors = load_file(str(out / "final" / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # the tied head is stored once
    (tmp_path / "wrapped").mkdir()
    save_file({f"module._orig_mod.{k}": v for k, v in tensors.items()}, str(tmp_path / "wrapped" / "model.safetensors"))
    wrapped = memzoo.from_pretrained(tmp_path / "wrapped" / "model.safetensors", config=model.config)
    torch.testing.assert_close(wrapped(ids).logits, model(ids).logits, rtol=0, atol=0)
    del tensors["blocks.0.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['blocks.0.mlp.up_proj.weight'\]"):
        memzoo.from_pretrained(tmp_path / "broken.safetensors", config=model.config)


def test_plot_writes_a_png(cli_run, tmp_path):
    out, _ = cli_run
    png = tmp_path / "curves.png"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["plot", str(out), str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        main(["plot", str(tmp_path)])


def test_missing_tracker_warns_loudly(monkeypatch):
    import memzoo.train.tracking as tracking

    monkeypatch.setattr(tracking, "_available", lambda name: name == "tensorboard")
    with pytest.warns(RuntimeWarning, match="asks for 'wandb', but it is not installed"):
        assert resolve_trackers("tensorboard,wandb") == ["tensorboard"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_trackers("all") == ["tensorboard"]  # "all" means every installed one, quietly
        assert resolve_trackers("none") == []


def test_wandb_without_a_key_goes_offline(monkeypatch):
    import memzoo.train.tracking as tracking

    monkeypatch.setattr(tracking, "_available", lambda name: True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.warns(RuntimeWarning, match="logging offline"):
        resolve_trackers("wandb")
    import os

    assert os.environ["WANDB_MODE"] == "offline"


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from conftest import small_config

    from memzoo.train import train

    train(small_config(tmp_path, train__max_steps=2, log__report_to="tensorboard"))
    assert list(tmp_path.rglob("events.out.tfevents.*"))
    assert len([r for r in read_metrics(tmp_path) if "loss/train" in r]) == 2


def test_python_dash_m_works_from_a_checkout(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "memzoo.train", "--preset", "tiny-gla", "--print-config"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["model"]["pattern"] == ["gla"]
    bad = subprocess.run([sys.executable, "-m", "memzoo.train", "--optim.lr", "0"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "optim.lr must be a positive number" in bad.stderr
