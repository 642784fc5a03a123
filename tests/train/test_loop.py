"""The Accelerate loop end to end on CPU: learning, exact resume, accumulation, two processes, skipping, saves."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import poison_third_forward, small_config

import memzoo
from memzoo.models import MIXERS
from memzoo.train import ConfigError, latest_checkpoint, train
from memzoo.train.checkpoint import CheckpointWarning
from memzoo.train.tracking import read_metrics


def losses(run: Path) -> dict[int, float]:
    recs = [r for r in read_metrics(run) if "loss/train" in r]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss/train"] for r in recs}


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_loss_decreases_on_the_tiny_preset(mixer, tmp_path):
    cfg = small_config(tmp_path, f"tiny-{mixer}", model__d_model=64, train__max_steps=30, sched__warmup_steps=5,
                       log__eval_every=30, log__eval_iters=4)
    summary = train(cfg)
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 31))
    first, last = curve[1], sum(curve[s] for s in range(26, 31)) / 5
    assert first > 5.0  # about ln(320) at initialisation
    assert last < first - 1.5, curve
    assert summary["val_loss"] < first - 1.0


@pytest.mark.parametrize("case", [
    # dropout draws from the RNG that the checkpoint restores; two micro-batches per step
    {"model__mixers__attention__dropout": 0.1, "train__grad_accum": 2},
    # persistent streams: the carried state of every row is saved and restored; segments with TBPTT
    {"data__pack": "stream", "data__segment_len": 16, "model__mixers__attention__window": 24},
], ids=["block-dropout-accum", "stream-segments"])
def test_resume_reproduces_the_uninterrupted_run(case, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(small_config(a, train__max_steps=6, ckpt__every=3, ckpt__keep=5, **case))
    ref = losses(a)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    shutil.copytree(a / "checkpoints" / "checkpoint_3", b / "checkpoints" / "checkpoint_3")
    shutil.copy(a / "metrics.jsonl", b / "metrics.jsonl")  # holds steps 1-6: the resumed run drops 4-6 first
    summary = train(small_config(b, train__max_steps=6, ckpt__every=3, ckpt__keep=5, ckpt__resume="auto", **case))
    assert summary["step"] == 6
    assert losses(b) == ref  # bit-identical, steps 1-3 kept from before and 4-6 recomputed


def test_resume_is_exact_when_accelerate_fails_to_restore_the_generators(tmp_path, monkeypatch):
    # numpy < 1.25 with torch >= 2.6: Accelerate cannot load its random_states file, logs at INFO and goes on.
    import accelerate.checkpointing

    case = {"model__mixers__attention__dropout": 0.1}
    a, b = tmp_path / "a", tmp_path / "b"
    train(small_config(a, train__max_steps=4, ckpt__every=2, ckpt__keep=5, **case))
    shutil.copytree(a / "checkpoints" / "checkpoint_2", b / "checkpoints" / "checkpoint_2")
    shutil.copy(a / "metrics.jsonl", b / "metrics.jsonl")
    load = accelerate.checkpointing.load

    def failing(path, *args, **kwargs):
        if "random_states" in str(path):
            raise RuntimeError("Weights only load failed")
        return load(path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "load", failing)
    torch.manual_seed(1234)  # whatever the generators hold before the resume must not matter
    with pytest.warns(CheckpointWarning, match="did not restore the random generators"):
        train(small_config(b, train__max_steps=4, ckpt__every=2, ckpt__keep=5, ckpt__resume="auto", **case))
    assert losses(b) == losses(a)


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    full = train(small_config(tmp_path / "full", train__micro_bs=4, train__grad_accum=1, train__max_steps=3))
    half = train(small_config(tmp_path / "half", train__micro_bs=2, train__grad_accum=2, train__max_steps=3))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "half")
    assert full["tokens_seen"] == half["tokens_seen"] == 3 * 4 * 32
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    norms = [[r["optim/grad_norm"] for r in read_metrics(tmp_path / n) if "optim/grad_norm" in r]
             for n in ("full", "half")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


_WORKER = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from conftest import small_config
import os
import memzoo.train.checkpoint as ckpt
from memzoo.train import train
torch.set_num_threads(1)
if os.environ.get("VERIFY_LOG"):  # record which ranks hash a checkpoint
    verify = ckpt.verify_checkpoint
    def logged(path):
        with open(os.environ["VERIFY_LOG"], "a") as f:
            f.write(os.environ["RANK"] + "\\n")
        return verify(path)
    ckpt.verify_checkpoint = logged
kw = dict(train__micro_bs=2, train__max_steps=3, log__eval_every=3)
kw.update(json.loads(sys.argv[2]))
train(small_config(Path(sys.argv[1]), **kw))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(out_dir: Path, overrides: dict) -> None:
    """A real 2-process (gloo, MULTI_CPU) run through torchrun, in fresh interpreters on a free port.

    Fresh processes rather than accelerate's fork-based debug_launcher: a fork after the parent has
    used its OpenMP pool can hang, and debug_launcher's fixed port collides under pytest-xdist.
    """
    worker = out_dir.parent / f"{out_dir.name}_worker.py"
    worker.write_text(_WORKER)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ACCELERATE_USE_CPU": "yes", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(worker), str(out_dir), json.dumps(overrides),
           str(Path(__file__).resolve().parent)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("overrides", [
    {},
    # DDP with several forward calls per backward, partial backwards under no_sync, per-rank carried state
    {"preset": "tiny-gla", "data__pack": "stream", "data__segment_len": 8, "data__detach_every": 2,
     "train__grad_accum": 2},
], ids=["block", "stream-segments-accum"])
def test_two_processes_equal_one_process_with_the_global_batch(overrides, tmp_path):
    run_two_processes(tmp_path / "ddp", overrides)
    single = train(small_config(tmp_path / "one", train__micro_bs=4, train__max_steps=3, log__eval_every=3,
                                **overrides))
    ddp, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in ddp] == [1, 2, 3, 3]  # written once, by the main process only
    assert ddp[-2]["tokens_seen"] == single["tokens_seen"] == 3 * 4 * 32 * overrides.get("train__grad_accum", 1)
    for step, loss in losses(tmp_path / "one").items():
        assert losses(tmp_path / "ddp")[step] == pytest.approx(loss, rel=1e-4)
    assert ddp[-1]["loss/val"] == pytest.approx(one[-1]["loss/val"], rel=1e-4)
    assert latest_checkpoint(tmp_path / "ddp").name == "checkpoint_3"
    if "data__pack" in overrides:
        assert {p.name for p in latest_checkpoint(tmp_path / "ddp").glob("stream_state_*.pt")} == {
            "stream_state_0.pt", "stream_state_1.pt"}


def test_two_processes_resume_auto_from_one_checkpoint_hashed_by_the_main_process(tmp_path, monkeypatch):
    run_two_processes(tmp_path / "ddp", {})
    log = tmp_path / "verified.txt"
    monkeypatch.setenv("VERIFY_LOG", str(log))
    run_two_processes(tmp_path / "ddp", {"ckpt__resume": "auto", "train__max_steps": 5, "log__eval_every": 5})
    # Rank 0 alone read and hashed checkpoint_3; both ranks resumed from it and ran steps 4 and 5.
    assert log.read_text().split() == ["0"]
    assert sorted(losses(tmp_path / "ddp")) == [1, 2, 3, 4, 5]
    assert latest_checkpoint(tmp_path / "ddp").name == "checkpoint_5"


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    poison_third_forward(monkeypatch)
    summary = train(small_config(tmp_path, train__max_steps=5, ckpt__export_safetensors=True))
    recs = [r for r in read_metrics(tmp_path) if "loss/train" in r]
    assert [r["optim/skipped_steps"] for r in recs] == [0, 0, 1, 1, 1]
    assert recs[2]["loss/train"] is None and recs[2]["optim/grad_norm"] is None  # NaN is written as null
    assert summary["skipped_steps"] == 1
    model = memzoo.from_pretrained(tmp_path / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(r["loss/train"] is not None for r in recs[3:])


def test_an_interrupted_save_is_never_resumed(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = {"n": 0}

    def dies_mid_save(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            Path(output_dir, "model.safetensors").write_bytes(b"half a file")
            raise RuntimeError("disk full")
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dies_mid_save)
    cfg = dict(train__max_steps=4, ckpt__every=2)
    with pytest.raises(RuntimeError, match="disk full"):
        train(small_config(tmp_path, **cfg))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".tmp_checkpoint_4", "checkpoint_2"]
    assert latest_checkpoint(tmp_path).name == "checkpoint_2"
    monkeypatch.setattr(Accelerator, "save_state", real)
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume auto"):
        train(small_config(tmp_path, **cfg))
    summary = train(small_config(tmp_path, ckpt__resume="auto", **cfg))
    assert summary["step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_2", "checkpoint_4"]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


def test_keep_last_k_and_resume_when_finished(tmp_path):
    train(small_config(tmp_path, train__max_steps=5, ckpt__every=1, ckpt__keep=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_4", "checkpoint_5"]
    again = train(small_config(tmp_path, train__max_steps=5, ckpt__every=1, ckpt__keep=2, ckpt__resume="auto"))
    assert again["step"] == 5 and sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]


def test_prepared_shards_with_varlen_packing(tmp_path):
    from memzoo.train import prepare

    prepare("pydoc", "byte", tmp_path / "data")
    summary = train(small_config(tmp_path / "run", data__source=f"prepared:{tmp_path / 'data'}",
                                 data__pack="varlen", train__max_steps=3, log__eval_every=3))
    assert summary["step"] == 3 and summary["val_loss"] is not None
    assert summary["tokens_seen"] == 3 * 4 * 32


def test_bpe_tokenizer_is_trained_saved_and_reused(tmp_path):
    cfg = dict(data__tokenizer="train:512", model__vocab_size=512, train__max_steps=2, ckpt__export_safetensors=True)
    train(small_config(tmp_path, **cfg))
    from memzoo.train import load_tokenizer

    tok = load_tokenizer(tmp_path / "final")
    assert tok.kind == "bpe" and (tmp_path / "tokenizer.json").is_file()
    assert tok.decode(tok.encode("def f(x): return x").tolist()) == "def f(x): return x"
    with pytest.raises(ConfigError, match=r"model.vocab_size=320 is smaller than the bpe tokenizer's vocabulary 512"):
        train(small_config(tmp_path / "small", **{**cfg, "model__vocab_size": 320}))


def test_max_tokens_sets_the_number_of_steps(tmp_path):
    summary = train(small_config(tmp_path, train__max_steps="none", train__max_tokens=300))
    assert summary["step"] == 3 and summary["tokens_seen"] == 3 * 4 * 32  # ceil(300 / 128)
